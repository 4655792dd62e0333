// Recording (--record-dir): in a call of two pages (peer-to-peer under the default --topology auto) a page presses
// Record, the room moves to the SFU and is recorded; every page (and a late joiner) shows the REC indicator, the page
// stops it; the file the server wrote plays in Chromium's own <video> and decodes cleanly in Debian's ffmpeg. A room
// that must stay peer-to-peer (--topology mesh) refuses, and the page says why.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { assertLoopbackOnly, connectedPeers, launchBrowser, openPage, ownId, sfuFramesFrom, startServer, uniqueRoom, until } from './helpers.mjs';

/** Every file under `dir`. @param {string} dir @returns {string[]} */
const filesUnder = (dir) =>
  readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? filesUnder(path.join(dir, e.name)) : [path.join(dir, e.name)]));

/** @param {import('playwright-core').Page} page */
const recShown = (page) => page.evaluate(() => !document.getElementById('rec-pill')?.hidden);

describe('recording', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let mesh;
  /** @type {import('playwright-core').Browser} */
  let browser;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'webcall-e2e-rec-'));

  before(async () => {
    assertLoopbackOnly();
    server = await startServer({ args: ['--record-dir', dir] });
    mesh = await startServer({ args: ['--topology', 'mesh', '--record-dir', dir] });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.kill();
    await mesh?.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  it('a page records the room, everyone sees it, and the file plays in Chromium', async () => {
    const room = uniqueRoom('rec');
    const a = await openPage(browser, `${server.url}/r/${room}?name=A`);
    const b = await openPage(browser, `${server.url}/r/${room}?name=B`);
    await connectedPeers(a, 1, 30000);
    await connectedPeers(b, 1, 30000);
    const [idA, idB] = await Promise.all([a, b].map(ownId));
    assert.equal(await a.evaluate(() => window.webcall.call.sfu), null, 'two pages talk peer-to-peer');
    assert.equal(await recShown(a), false, 'no indicator before');
    await a.click('#btn-record');
    for (const p of [a, b]) await until(p, () => !document.getElementById('rec-pill')?.hidden, undefined, 10000);
    // The room moved to the SFU for it: the media now passes the server.
    await until(b, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    // (While the tile moves, its track may still be the peer-to-peer connection's: getStats refuses it.)
    for (const t0 = Date.now(); (await sfuFramesFrom(b, idA).catch(() => -1)) <= 10; ) {
      assert.ok(Date.now() - t0 < 30000, 'B decodes A over the SFU');
      await b.waitForTimeout(200);
    }
    assert.equal(await a.getAttribute('#btn-record', 'aria-pressed'), 'true');
    assert.match((await b.textContent('#toast')) ?? '', /Recording started by A/);
    // Someone joining while it records sees it at once.
    const late = await openPage(browser, `${server.url}/r/${room}?name=Late`);
    await until(late, () => !document.getElementById('rec-pill')?.hidden, undefined, 10000);
    await late.close();
    await a.waitForTimeout(6000);
    await a.click('#btn-record');
    for (const p of [a, b]) await until(p, () => document.getElementById('rec-pill')?.hidden === true, undefined, 10000);

    // A's camera file: written on the server's own thread; done once ffprobe reads its duration.
    const deadline = Date.now() + 30000;
    /** @type {string|undefined} */
    let file;
    for (;;) {
      file = filesUnder(dir).find((f) => path.basename(f).includes(`-${idA}-video-`));
      if (file) {
        try {
          const d = execFileSync('ffprobe', ['-v', 'error', '-show_entries', 'format=duration', '-of', 'csv=p=0', file]).toString().trim();
          if (Number(d) > 0) break;
        } catch {
          /* not finished */
        }
      }
      assert.ok(Date.now() < deadline, `no finished recording of A in ${JSON.stringify(filesUnder(dir))}`);
      await a.waitForTimeout(300);
    }
    const names = filesUnder(dir).map((f) => path.basename(f));
    for (const id of [idA, idB]) {
      for (const kind of ['audio', 'video']) assert.ok(names.some((n) => n.includes(`-${id}-${kind}-`) && n.endsWith('.webm')), `${id} ${kind} in ${names}`);
    }
    assert.equal(path.basename(path.dirname(file)), room, 'one directory per room');
    const decodeErrors = execFileSync('ffmpeg', ['-v', 'error', '-i', file, '-f', 'null', '-'], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
    assert.equal(decodeErrors, '');
    const frames = Number(
      execFileSync('ffprobe', ['-v', 'error', '-count_frames', '-select_streams', 'v:0', '-show_entries', 'stream=nb_read_frames', '-of', 'csv=p=0', file])
        .toString()
        .trim(),
    );
    console.log(`recording ${path.basename(file)}: ${statSync(file).size} bytes, ${frames} frames`);
    assert.ok(frames > 30, `${frames} frames`);

    // The bytes, played by the page's own <video> from a Blob URL.
    const played = await b.evaluate(async (b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const v = document.createElement('video');
      v.muted = true;
      v.src = URL.createObjectURL(new Blob([bytes], { type: 'video/webm' }));
      document.body.append(v);
      await v.play();
      const t0 = performance.now();
      while (v.currentTime < 1.5 && !v.error && performance.now() - t0 < 20000) await new Promise((r) => setTimeout(r, 100));
      const r = { width: v.videoWidth, time: v.currentTime, error: v.error?.message ?? null, decoded: v.getVideoPlaybackQuality().totalVideoFrames, duration: v.duration };
      // Then to the end, fast: through every layer change the recording made.
      v.playbackRate = 8;
      const t1 = performance.now();
      while (!v.ended && !v.error && performance.now() - t1 < 30000) await new Promise((r) => setTimeout(r, 100));
      Object.assign(r, { ended: v.ended, endError: v.error?.message ?? null, endWidth: v.videoWidth, endTime: v.currentTime });
      v.remove();
      return r;
    }, readFileSync(file).toString('base64'));
    console.log('played in Chromium:', JSON.stringify(played));
    assert.equal(played.error, null);
    assert.ok(played.width > 0 && played.time >= 1.5 && played.decoded > 5, JSON.stringify(played));
    assert.ok(played.ended && played.endError === null, `played to the end: ${JSON.stringify(played)}`);
    for (const p of [a, b]) assert.deepEqual(p.errors, []);
    await a.close();
    await b.close();
  });

  it('a peer-to-peer room cannot be recorded, and the page says why', async () => {
    const p = await openPage(browser, `${mesh.url}/r/${uniqueRoom('rec-p2p')}?name=P`);
    await until(p, () => window.webcall.call.state === 'in-call');
    await p.click('#btn-record');
    await until(p, () => /peer-to-peer/.test(document.getElementById('toast')?.textContent ?? ''), undefined, 10000);
    assert.equal(await recShown(p), false);
    await p.close();
  });
});
