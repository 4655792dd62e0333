// SFU rooms: a third page joining a peer-to-peer pair moves the room to the server's SFU, and all three decode each
// other's video over their one connection to the server; a v1 client (no "sfu":true) is refused with needs-sfu.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { assertLoopbackOnly, connectedPeers, launchBrowser, openPage, startServer, uniqueRoom, until } from './helpers.mjs';

/**
 * Waits until `page` decodes video from participant `peerId` over the SFU: the inbound stream of that participant's
 * own video track decodes more than `frames` frames, and its tile's <video> has a width and plays.
 * @param {import('playwright-core').Page} page @param {string} peerId
 */
async function decodesOverSfu(page, peerId, frames = 10) {
  const read = () =>
    page.evaluate(async (id) => {
      const call = window.webcall.call;
      const peer = call.peers.get(id);
      const track = peer?.remoteStream.getVideoTracks()[0];
      // Until the SFU's media of this participant arrives, its tile is still the peer-to-peer connection's.
      if (!call.sfu || !track || peer.pc !== call.sfu.pc) return { n: -1, t: -1 };
      let n = 0;
      (await call.sfu.pc.getStats(track)).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') n = Math.max(n, s.framesDecoded ?? 0);
      });
      const video = document.querySelector(`.tile[data-peer="${id}"] video`);
      const t = video instanceof HTMLVideoElement && video.videoWidth > 0 ? video.currentTime : -1;
      return { n, t };
    }, peerId);
  let start = await read();
  const deadline = Date.now() + 30000;
  for (;;) {
    const now = await read();
    if (start.n < 0 || start.t < 0) start = now;
    else if (now.n > start.n + frames && now.t > start.t) return;
    if (Date.now() > deadline) assert.fail(`no video from ${peerId} over the SFU: ${JSON.stringify({ start, now })}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** @param {import('playwright-core').Page} page */
const ownId = (page) => page.evaluate(() => window.webcall.call.id);

describe('SFU room', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  /** @type {import('playwright-core').Browser} */
  let browser;
  const room = uniqueRoom('sfu');
  /** @type {import('playwright-core').Page[]} */
  let pages = [];
  /** @type {string[]} */
  let ids = [];

  before(async () => {
    assertLoopbackOnly();
    server = await startServer();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.kill();
  });

  it('a third page moves a peer-to-peer pair to the SFU and all three decode each other', async () => {
    const a = await openPage(browser, `${server.url}/r/${room}?name=A&sfu=1`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await openPage(browser, `${server.url}/r/${room}?name=B&sfu=1`);
    await connectedPeers(a, 1);
    await connectedPeers(b, 1);
    assert.equal(await a.evaluate(() => window.webcall.call.sfu), null, 'two peers stay peer-to-peer');

    const c = await openPage(browser, `${server.url}/r/${room}?name=C&sfu=1`);
    pages = [a, b, c];
    for (const p of pages) {
      await until(p, () => window.webcall.call.sfu?.pc.connectionState === 'connected');
      await connectedPeers(p, 2, 30000);
    }
    ids = await Promise.all(pages.map(ownId));
    for (const [i, p] of pages.entries()) {
      for (const id of ids.filter((_, j) => j !== i)) await decodesOverSfu(p, id);
    }
    // Tiles are labelled with the participants' names.
    assert.equal(await a.textContent(`.tile[data-peer="${ids[2]}"] .name`), 'C');
    assert.equal(await c.textContent(`.tile[data-peer="${ids[0]}"] .name`), 'A');
  });

  it('a v1 client joining the SFU room gets needs-sfu', async () => {
    // A plain WebSocket (Node 20 has none built in: the browser's), speaking protocol v1 only.
    const page = await openPage(browser, `${server.url}/`);
    const msg = await page.evaluate(
      ({ url, room }) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.onopen = () => ws.send(JSON.stringify({ type: 'join', room, name: 'old' }));
          ws.onmessage = (ev) => {
            resolve(JSON.parse(String(ev.data)));
            ws.close();
          };
          ws.onerror = () => reject(new Error('websocket error'));
        }),
      { url: `${server.url.replace('http', 'ws')}/ws`, room },
    );
    assert.equal(msg.type, 'error');
    assert.equal(msg.code, 'needs-sfu');
    assert.equal(msg.ref, 'join');
  });

  it('when the third leaves, the two others stay on the SFU and keep decoding each other', async () => {
    const [a, b, c] = pages;
    await c.close();
    for (const p of [a, b]) await connectedPeers(p, 1, 30000);
    assert.ok(await a.evaluate(() => window.webcall.call.sfu !== null), 'the room stays on the SFU');
    assert.equal(await a.locator(`.tile[data-peer="${ids[2]}"]`).count(), 0, "C's tile is gone");
    await decodesOverSfu(a, ids[1]);
    await decodesOverSfu(b, ids[0]);
  });
});
