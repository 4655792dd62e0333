// SFU rooms. Pages join with "sfu":true by default, so a third page joining a peer-to-peer pair moves the room to
// the server's SFU: all three decode each other's video over their one connection to the server, and no tile stalls
// during the move. Chat and screen share in an SFU room, a relay-only page reaching the SFU through the built-in TURN,
// a grid that pages past what fits with 25+ participants, and a v1 client refused with needs-sfu.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  assertLoopbackOnly,
  connectedPeers,
  decodesOverSfu,
  launchBrowser,
  openPage,
  startServer,
  uniqueRoom,
  until,
} from './helpers.mjs';

/**
 * No tile may go longer than this without a new frame during the move: a liveness bound for two loaded cores, not a
 * speed figure (seen: 0.1–0.4 s idle, up to 1.5 s with other builds running, also on tiles that never moved).
 */
const STALL_BOUND_MS = 3000;

/**
 * Starts sampling, every 100 ms, how long each remote camera tile of `page` goes without a new frame on screen
 * (from its first frame on). @param {import('playwright-core').Page} page
 */
const watchStalls = (page) =>
  page.evaluate(() => {
    /** @type {{gaps: Record<string, number>, last: Record<string, {frames: number, at: number}>, timer?: any}} */
    const w = { gaps: {}, last: {} };
    // @ts-ignore
    window.stallWatch = w;
    w.timer = setInterval(() => {
      const now = performance.now();
      for (const tile of document.querySelectorAll('.tile[data-peer]:not(.local):not(.screen)')) {
        const id = /** @type {HTMLElement} */ (tile).dataset.peer ?? '';
        const v = tile.querySelector('video');
        const frames = v?.getVideoPlaybackQuality().totalVideoFrames ?? 0;
        const l = w.last[id];
        if (!l) {
          if (frames > 0) w.last[id] = { frames, at: now };
          continue;
        }
        if (frames > 0 && frames !== l.frames) {
          l.frames = frames;
          l.at = now;
        }
        w.gaps[id] = Math.max(w.gaps[id] ?? 0, now - l.at);
      }
    }, 100);
  });

/** Stops the sampling; the longest gap per tile (ms). @param {import('playwright-core').Page} page */
const stalls = (page) =>
  page.evaluate(() => {
    // @ts-ignore
    const w = window.stallWatch;
    clearInterval(w.timer);
    return /** @type {Record<string, number>} */ (w.gaps);
  });

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
    // Relaying to loopback is refused by default (the server's own services); the SFU's media port is on loopback.
    server = await startServer({ args: ['--turn-listen', '127.0.0.1:0', '--turn-allow-peer', '127.0.0.0/8'] });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await server?.kill();
  });

  it('a third page moves a peer-to-peer pair to the SFU seamlessly and all three decode each other', async () => {
    const a = await openPage(browser, `${server.url}/r/${room}?name=A`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await openPage(browser, `${server.url}/r/${room}?name=B`);
    await connectedPeers(a, 1);
    await connectedPeers(b, 1);
    assert.equal(await a.evaluate(() => window.webcall.call.sfu), null, 'two peers stay peer-to-peer');
    const [idA, idB] = await Promise.all([a, b].map(ownId));
    // Both tiles show peer-to-peer video before the move.
    await until(a, (id) => (document.querySelector(`.tile[data-peer="${id}"] video`)?.getVideoPlaybackQuality().totalVideoFrames ?? 0) > 5, idB, 30000);
    await until(b, (id) => (document.querySelector(`.tile[data-peer="${id}"] video`)?.getVideoPlaybackQuality().totalVideoFrames ?? 0) > 5, idA, 30000);
    await watchStalls(a);
    await watchStalls(b);

    const c = await openPage(browser, `${server.url}/r/${room}?name=C`);
    await watchStalls(c);
    pages = [a, b, c];
    for (const p of pages) {
      await until(p, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
      await connectedPeers(p, 2, 30000);
    }
    ids = await Promise.all(pages.map(ownId));
    for (const [i, p] of pages.entries()) {
      for (const id of ids.filter((_, j) => j !== i)) await decodesOverSfu(p, id);
    }
    // Past the point where the peer-to-peer connections are closed (call.js RETIRE_MS), tiles still play.
    await a.waitForTimeout(11000);
    for (const [i, p] of pages.entries()) {
      for (const id of ids.filter((_, j) => j !== i)) await decodesOverSfu(p, id, { frames: 5 });
    }
    const gaps = await Promise.all(pages.map(stalls));
    console.log('longest gap without a new frame per tile during the move (ms):', JSON.stringify(gaps));
    for (const [i, g] of gaps.entries()) {
      assert.equal(Object.keys(g).length, 2, `page ${i} watched both tiles: ${JSON.stringify(g)}`);
      for (const [id, ms] of Object.entries(g)) assert.ok(ms < STALL_BOUND_MS, `page ${i}: tile ${id} stalled ${Math.round(ms)} ms`);
    }
    // The peer-to-peer connections are gone: the only connection is the server's.
    assert.equal(await a.evaluate(() => [...window.webcall.call.peers.values()].every((p) => p.pc === window.webcall.call.sfu.pc)), true);
    // Tiles are labelled with the participants' names; nobody was announced as gone or new during the move.
    assert.equal(await a.textContent(`.tile[data-peer="${ids[2]}"] .name`), 'C');
    assert.equal(await c.textContent(`.tile[data-peer="${ids[0]}"] .name`), 'A');
    assert.doesNotMatch((await a.textContent('#toast')) ?? '', /left the call/);
    for (const p of pages) assert.deepEqual(p.errors, []);
  });

  it('chat, mute and raised hands go through the server in an SFU room', async () => {
    const [a, b, c] = pages;
    await a.click('#btn-chat');
    await a.fill('#chat-input', 'hello over the SFU');
    await a.press('#chat-input', 'Enter');
    for (const p of [b, c]) {
      await until(p, () => [...document.querySelectorAll('#chat-log li.them')].some((li) => li.textContent?.includes('hello over the SFU')));
      assert.match((await p.textContent('#chat-log li.them b')) ?? '', /^A$/);
    }
    assert.equal(await a.locator('#chat-log li.me').count(), 1, 'shown once locally');
    await c.click('#btn-mic');
    await c.click('#btn-hand');
    for (const p of [a, b]) {
      await until(p, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.getAttribute('data-audio') === 'off', ids[2]);
      await until(p, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.getAttribute('data-hand') === 'on', ids[2]);
    }
    await c.click('#btn-mic');
    await until(a, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.getAttribute('data-audio') === 'on', ids[2]);
  });

  it('a screen share is a tile of its own next to the camera, through the SFU', async () => {
    const [a, b, c] = pages;
    await a.click('#btn-screen');
    for (const p of [b, c]) {
      await until(p, (id) => !!document.querySelector(`.tile[data-peer="${id}:screen"]`), ids[0], 30000);
      await decodesOverSfu(p, ids[0], { screen: true });
      await decodesOverSfu(p, ids[0], { frames: 5 });
      // Camera and screen are different tracks.
      const same = await p.evaluate((id) => {
        const peer = window.webcall.call.peers.get(id);
        return peer.remoteScreen.getVideoTracks()[0] === peer.remoteStream.getVideoTracks()[0];
      }, ids[0]);
      assert.equal(same, false);
    }
    // Someone joining during the share gets it as a tile of its own too (A says which m-line is its screen).
    const late = await openPage(browser, `${server.url}/r/${room}?name=Late`);
    await until(late, (id) => !!document.querySelector(`.tile[data-peer="${id}:screen"]`), ids[0], 30000);
    await decodesOverSfu(late, ids[0], { screen: true });
    await decodesOverSfu(late, ids[0]);
    await late.close();
    await a.click('#btn-screen');
    for (const p of [b, c]) await until(p, (id) => !document.querySelector(`.tile[data-peer="${id}:screen"]`), ids[0]);
    await decodesOverSfu(b, ids[0], { frames: 5 });
    for (const p of [a, b, c]) assert.deepEqual(p.errors, []);
  });

  it('a relay-only page (?relay=1) reaches the SFU through the built-in TURN and decodes the others', async () => {
    const d = await openPage(browser, `${server.url}/r/${room}?name=D&relay=1`);
    await until(d, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    const type = await d.evaluate(async () => {
      let pair = null;
      const stats = await window.webcall.call.sfu.pc.getStats();
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      return pair ? stats.get(pair.localCandidateId)?.candidateType : null;
    });
    assert.equal(type, 'relay');
    for (const id of ids) await decodesOverSfu(d, id);
    const idD = await ownId(d);
    await decodesOverSfu(pages[0], idD);
    await d.close();
    await connectedPeers(pages[0], 2, 30000);
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
    await page.close();
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

  it('?mesh=1 keeps a room of three peer-to-peer', async () => {
    const r = uniqueRoom('mesh');
    const ps = [];
    for (const n of ['X', 'Y', 'Z']) {
      const p = await openPage(browser, `${server.url}/r/${r}?name=${n}&mesh=1`);
      await until(p, () => window.webcall?.call.state === 'in-call');
      ps.push(p);
    }
    for (const p of ps) await connectedPeers(p, 2, 30000);
    for (const p of ps) assert.equal(await p.evaluate(() => window.webcall.call.sfu), null);
    await Promise.all(ps.map((p) => p.close()));
  });

  it('a room that moves while someone shares the screen, muted: the share and the mute come along', async () => {
    const r = uniqueRoom('moveshare');
    const a = await openPage(browser, `${server.url}/r/${r}?name=A`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await openPage(browser, `${server.url}/r/${r}?name=B`);
    await connectedPeers(b, 1);
    const idA = await ownId(a);
    await a.click('#btn-screen');
    await a.click('#btn-mic');
    await until(b, (id) => !!document.querySelector(`.tile[data-peer="${id}:screen"]`), idA, 30000);
    const c = await openPage(browser, `${server.url}/r/${r}?name=C`);
    for (const p of [b, c]) {
      await until(p, (id) => window.webcall.call.peers.get(id)?.pc === window.webcall.call.sfu?.pc, idA, 30000);
      await until(p, (id) => !!document.querySelector(`.tile[data-peer="${id}:screen"]`), idA, 30000);
      await decodesOverSfu(p, idA, { screen: true });
      await decodesOverSfu(p, idA);
      await until(p, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.getAttribute('data-audio') === 'off', idA);
    }
    await Promise.all([a, b, c].map((p) => p.close()));
  });

  it('with 25+ participants the grid pages: only what fits is shown, the pager moves through the rest', async () => {
    const r = uniqueRoom('many');
    const p = await openPage(browser, `${server.url}/r/${r}?name=Host`);
    await until(p, () => window.webcall?.call.state === 'in-call');
    // 26 more participants: plain WebSocket clients that speak SFU but publish nothing (tiles with avatars).
    await p.evaluate(
      ({ url, room }) => {
        // @ts-ignore
        window.extra = Array.from({ length: 26 }, (_, i) => {
          const ws = new WebSocket(url);
          ws.onopen = () => ws.send(JSON.stringify({ type: 'join', room, name: `Guest ${i + 1}`, sfu: true }));
          return ws;
        });
      },
      { url: `${server.url.replace('http', 'ws')}/ws`, room: r },
    );
    await until(p, () => document.querySelectorAll('.tile').length === 27, undefined, 30000);
    assert.ok(await p.evaluate(() => window.webcall.call.sfu !== null), 'the room is on the SFU');
    const shown = () => p.evaluate(() => [...document.querySelectorAll('.tile:not(.offpage)')].map((t) => /** @type {HTMLElement} */ (t).dataset.peer));
    const first = await shown();
    assert.ok(first.length < 27 && first.length >= 4, `first page shows ${first.length} tiles`);
    assert.ok(first.includes('local'), 'our own tile is on the first page');
    assert.equal(await p.isVisible('#pager'), true);
    assert.match((await p.textContent('#page-info')) ?? '', /^1 \/ \d+$/);
    await p.click('#page-next');
    const second = await shown();
    assert.ok(second.length > 0 && second.every((id) => !first.includes(id)), 'the next page shows others');
    assert.equal(await p.textContent('#people'), '27');
    await p.evaluate(() => {
      // @ts-ignore
      for (const ws of window.extra) ws.send(JSON.stringify({ type: 'bye' }));
    });
    await until(p, () => document.querySelectorAll('.tile').length === 1, undefined, 30000);
    await p.close();
  });
});
