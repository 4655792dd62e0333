// Browser call setup: two headless Chromium pages through webcall vs a zero-cost baseline, in the same run.
//
// webcall: page B opens /r/ROOM?defer (loads, paints, gets its camera, does not join); then page A opens /r/ROOM and
// is in the call; then the benchmark calls B's `webcall.join()`. Times are B's, from the moment B's client sends
// `join` to B's RTCPeerConnection reporting ICE connected, connected (DTLS), and
// the first decoded frame of A's video (getStats framesDecoded > 0, polled every 5 ms).
// baseline: both pages in one browser context get the same media, and exchange offer/answer/candidates over a
// BroadcastChannel (no server, no network hop); A offers when B says hello, as in webcall. Same marks, same poll.
//
// Run by bench/browser.sh inside a network namespace with only loopback. Prints one JSON object per call.
import { BASELINE_PAGE } from './baseline-page.mjs';
import { assertLoopbackOnly, launchBrowser, startServer, uniqueRoom, until } from '../tests/e2e/helpers.mjs';

const CALLS = Number(process.env.CALLS ?? 10);
const TIMEOUT = 20000;

// Marks (epoch ms, sub-ms precision) on every page: join sent, ICE connected, connected, first decoded frame.
const INSTRUMENT = () => {
  const t = {};
  window.__bench = t;
  const mark = (k) => {
    if (!(k in t)) t[k] = performance.timeOrigin + performance.now();
  };
  window.__mark = mark;
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (d) {
    if (typeof d === 'string' && /"type":"join"/.test(d)) mark('join');
    return send.call(this, d);
  };
  // When the offer arrives and the answer leaves (webcall: over the WebSocket; baseline marks them itself).
  const WS = window.WebSocket;
  window.WebSocket = class extends WS {
    constructor(...a) {
      super(...a);
      this.addEventListener('message', (e) => {
        if (typeof e.data === 'string' && /"type":"offer"/.test(e.data)) mark('offer');
      });
    }
  };
  const sendWs = WS.prototype.send;
  WS.prototype.send = function (d) {
    if (typeof d === 'string' && /"type":"answer"/.test(d)) mark('answer');
    return sendWs.call(this, d);
  };
  const PC = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends PC {
    constructor(...a) {
      super(...a);
      this.addEventListener('iceconnectionstatechange', () => {
        if (this.iceConnectionState === 'connected' || this.iceConnectionState === 'completed') mark('ice');
      });
      this.addEventListener('connectionstatechange', () => {
        if (this.connectionState === 'connected') mark('dtls');
      });
      this.addEventListener('track', (e) => {
        if (e.track.kind !== 'video') return;
        const poll = async () => {
          let n = 0;
          (await this.getStats(e.track)).forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') n = Math.max(n, s.framesDecoded ?? 0);
          });
          if (n > 0) mark('frame');
          else if (performance.now() < 60000) setTimeout(poll, 5);
        };
        poll();
      });
    }
  };
};

const ms = (t) => ({
  offer: t.offer - t.join,
  answer: t.answer - t.join,
  ice: t.ice - t.join,
  dtls: t.dtls - t.join,
  frame: t.frame - t.join,
});

async function newContext(browser) {
  const ctx = await browser.newContext({ permissions: ['camera', 'microphone'] });
  await ctx.addInitScript(INSTRUMENT);
  return ctx;
}

async function webcallCall(browser, url) {
  const room = uniqueRoom('bench');
  const [ca, cb] = [await newContext(browser), await newContext(browser)];
  try {
    // Like the baseline, whose two pages are opened before either loads anything: both windows first. A new headless
    // window starts renderers of its own (and an omnibox-popup WebUI renderer) whose start-up must not overlap the
    // measured call; A's window used to be opened just before the call, and its start-up ran into it.
    const b = await cb.newPage();
    const a = await ca.newPage();
    // B's page (its load and first paint, its camera) is ready before A's call starts; `?defer` holds B's join until
    // the benchmark calls `webcall.join()`.
    await b.goto(`${url}/r/${room}?name=B&defer`);
    await until(b, () => !!window.webcall?.call.tracks.camera && !!window.webcall.call.tracks.mic, undefined, TIMEOUT);
    await a.goto(`${url}/r/${room}?name=A&join=1`);
    await until(a, () => window.webcall?.call.state === 'in-call', undefined, TIMEOUT);
    // A has been in the room a while, as the baseline's A has its peer connection before the join: its client's
    // spare peer connection (web/lib/call.js, built when idle after the welcome) is there. Clients without one
    // (older builds) do not wait.
    await until(a, () => !('spare' in window.webcall.call) || !!window.webcall.call.spare, undefined, TIMEOUT);
    await b.evaluate(() => window.webcall.join());
    const t = await until(b, () => ('frame' in (window.__bench ?? {}) ? window.__bench : false), undefined, TIMEOUT);
    return ms(t);
  } finally {
    await ca.close();
    await cb.close();
  }
}


async function baselineCall(browser, url) {
  const room = uniqueRoom('base');
  const ctx = await newContext(browser);
  try {
    const [a, b] = [await ctx.newPage(), await ctx.newPage()];
    // Any page of the server's origin: a secure context (127.0.0.1) for getUserMedia, nothing else running.
    await a.goto(`${url}/healthz`);
    await b.goto(`${url}/healthz`);
    await a.evaluate(BASELINE_PAGE, { role: 'A', room });
    await b.evaluate(BASELINE_PAGE, { role: 'B', room });
    await b.evaluate(() => window.__go());
    const t = await until(b, () => ('frame' in window.__bench ? window.__bench : false), undefined, TIMEOUT);
    return ms(t);
  } finally {
    await ctx.close();
  }
}

assertLoopbackOnly();
const server = await startServer({ args: ['--max-joins-per-ip', '100000'] });
const browser = await launchBrowser();
try {
  // One warm-up call of each (first page loads, codec start-up), not recorded.
  await webcallCall(browser, server.url);
  await baselineCall(browser, server.url);
  for (let i = 0; i < CALLS; i++) {
    // Alternate, so drift on a shared machine does not favour one.
    for (const [kind, f] of i % 2 ? [['baseline', baselineCall], ['webcall', webcallCall]] : [['webcall', webcallCall], ['baseline', baselineCall]]) {
      const r = await f(browser, server.url);
      console.log(JSON.stringify({ bench: 'browser', kind, call: i, ...r }));
    }
  }
} finally {
  await browser.close();
  await server.kill();
}
