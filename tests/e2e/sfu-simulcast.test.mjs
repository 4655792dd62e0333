// SFU rooms, simulcast and active speaker (docs/protocol.md, *Simulcast*, *Active speaker*): a page that shows a
// participant's tile small receives a smaller layer of that participant's camera than a page that shows it large
// (frameWidth of the inbound stream), and the server's active-speaker event reaches the pages (a tone on one page,
// silence on the other) and highlights the speaker's tile.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  assertLoopbackOnly,
  launchBrowser,
  openPage,
  ownId,
  sfuFrameWidthFrom,
  startServer,
  uniqueRoom,
  until,
} from './helpers.mjs';

/** A WAV file of a steady 440 Hz tone at half scale (Chromium loops it as its fake microphone). */
function toneWav() {
  const rate = 48000;
  const n = rate * 2;
  const buf = Buffer.alloc(44 + n * 2);
  buf.write('RIFF', 0);
  buf.writeUInt32LE(36 + n * 2, 4);
  buf.write('WAVEfmt ', 8);
  buf.writeUInt32LE(16, 16);
  buf.writeUInt16LE(1, 20); // PCM
  buf.writeUInt16LE(1, 22); // mono
  buf.writeUInt32LE(rate, 24);
  buf.writeUInt32LE(rate * 2, 28);
  buf.writeUInt16LE(2, 32);
  buf.writeUInt16LE(16, 34);
  buf.write('data', 36);
  buf.writeUInt32LE(n * 2, 40);
  for (let i = 0; i < n; i++) buf.writeInt16LE(Math.round(16000 * Math.sin((2 * Math.PI * 440 * i) / rate)), 44 + i * 2);
  const file = path.join(mkdtempSync(path.join(os.tmpdir(), 'webcall-tone-')), 'tone.wav');
  writeFileSync(file, buf);
  return file;
}

describe('SFU simulcast', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  /** @type {import('playwright-core').Browser} */
  let browser;

  before(async () => {
    assertLoopbackOnly();
    server = await startServer({ args: ['--topology', 'sfu'] });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.kill();
  });

  it('a page showing a tile small gets a smaller layer than a page showing it large', async () => {
    const room = uniqueRoom('simulcast');
    const a = await openPage(browser, `${server.url}/r/${room}?name=A&sfu=1`);
    await until(a, () => window.webcall?.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    const aId = await ownId(a);
    // A publishes three layers.
    const rids = await until(
      a,
      () => window.webcall.call.sfu?.videoTx.sender.getParameters().encodings.map((e) => e.rid).join(','),
    );
    assert.equal(rids, 'q,h,f');
    const large = await openPage(browser, `${server.url}/r/${room}?name=Large&sfu=1`, { viewport: { width: 1280, height: 800 } });
    const small = await openPage(browser, `${server.url}/r/${room}?name=Small&sfu=1`, { viewport: { width: 420, height: 340 } });
    let widths = { large: 0, small: 0 };
    const deadline = Date.now() + 90000;
    // Layers come up as A's encoder and the server's estimates settle; liveness only, no timing asserted.
    for (;;) {
      widths = { large: await sfuFrameWidthFrom(large, aId), small: await sfuFrameWidthFrom(small, aId) };
      if (widths.small > 0 && widths.large > widths.small) break;
      if (Date.now() > deadline) assert.fail(`no layer difference: ${JSON.stringify(widths)}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    console.log(`frameWidth of A's video: large tile ${widths.large}, small tile ${widths.small}`);
    const tileWidth = (p) => p.evaluate((id) => document.querySelector(`.tile[data-peer="${id}"] video`)?.getBoundingClientRect().width, aId);
    console.log(`A's tile: ${await tileWidth(large)} px on the large page, ${await tileWidth(small)} px on the small one`);
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    const switches = Number(metrics.match(/^webcall_sfu_layer_switches_total (\d+)/m)?.[1]);
    console.log(`webcall_sfu_layer_switches_total ${switches}`);
    assert.ok(Number.isFinite(switches));
    for (const p of [a, large, small]) await p.context().close();
  });
});

describe('SFU active speaker', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  /** @type {import('playwright-core').Browser} */
  let quiet;
  /** @type {import('playwright-core').Browser} */
  let loud;

  before(async () => {
    assertLoopbackOnly();
    server = await startServer({ args: ['--topology', 'sfu'] });
    quiet = await launchBrowser();
    loud = await launchBrowser([`--use-file-for-fake-audio-capture=${toneWav()}`]);
  });

  after(async () => {
    await Promise.all([quiet?.close(), loud?.close()]);
    await server?.kill();
  });

  it('the page with sound becomes the active speaker on every page, and its tile is highlighted', async () => {
    const room = uniqueRoom('speaker');
    const q = await openPage(quiet, `${server.url}/r/${room}?name=Quiet&sfu=1`);
    await until(q, () => window.webcall?.call.state === 'in-call');
    // Silence: the quiet page's microphone is off (its fake device would beep now and then).
    await q.evaluate(() => window.webcall.call.setMicEnabled(false));
    const l = await openPage(loud, `${server.url}/r/${room}?name=Loud&sfu=1`);
    await until(l, () => window.webcall?.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    const loudId = await ownId(l);
    const got = await until(q, () => window.webcall.call.activeSpeaker, undefined, 60000);
    assert.equal(got, loudId, 'the quiet page hears that the loud one speaks');
    await until(q, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.classList.contains('active-speaker'), loudId);
    assert.equal(await until(l, () => window.webcall.call.activeSpeaker, undefined, 30000), loudId);
    await until(l, () => document.querySelector('.tile.local')?.classList.contains('active-speaker'));
    assert.equal(await q.locator('.tile.active-speaker').count(), 1, 'one tile at a time');
  });
});
