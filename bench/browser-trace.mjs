// Diagnostic companion of bench/browser.mjs: one webcall call and one baseline call (the same set-up), with a
// timeline of both pages — signaling messages, ICE candidates (type, address), ICE/DTLS states and the
// peer-connection calls — printed relative to B's join. Not a benchmark (no repetition, no medians).
//
//   unshare --net sh -c 'ip link set lo up && WEBCALL_BIN=target/release/webcall CALLS=2 node bench/browser-trace.mjs'
import { BASELINE_PAGE } from './baseline-page.mjs';
import { assertLoopbackOnly, launchBrowser, startServer, uniqueRoom, until } from '../tests/e2e/helpers.mjs';

const CALLS = Number(process.env.CALLS ?? 1);
const TIMEOUT = 20000;
// BASE_DC=1: the baseline pages also get the negotiated data channel; BASE_VIDEO=1: they show both videos.
const VARIANT = { dc: !!process.env.BASE_DC, video: !!process.env.BASE_VIDEO };
const ONLY = process.env.ONLY ?? '';

const TRACE = () => {
  const log = [];
  window.__log = log;
  const now = () => performance.timeOrigin + performance.now();
  const ev = (what, extra) => {
    log.push({ t: now(), what, ...(extra ?? {}) });
    if (window.__traceMarks) performance.mark(what);
  };
  window.__traceMarks = true;
  window.__ev = ev;
  const t = {};
  window.__bench = t;
  window.__mark = (k) => {
    if (!(k in t)) t[k] = now();
    ev('mark ' + k);
  };
  const WS = window.WebSocket;
  const typeOf = (d) => (typeof d === 'string' ? (d.match(/"type":"(\w+)"/) || [])[1] : '?');
  const cand = (d) => {
    const m = typeof d === 'string' && d.match(/candidate:\S+ \d+ (\w+) \d+ (\S+) (\d+) typ (\w+)/);
    return m ? `${m[4]} ${m[1]} ${m[2]}:${m[3]}` : undefined;
  };
  window.WebSocket = class extends WS {
    // How long the client's own handler of each message runs.
    set onmessage(fn) {
      super.onmessage = fn && ((e) => {
        const t0 = now();
        fn.call(this, e);
        ev(`ws< ${typeOf(e.data)} handled in ${(now() - t0).toFixed(1)} ms`);
      });
    }
    get onmessage() {
      return super.onmessage;
    }
    constructor(...a) {
      super(...a);
      this.addEventListener('message', (e) => {
        const ty = typeOf(e.data);
        if (ty === 'offer') window.__mark('offer');
        ev('ws< ' + ty, { c: ty === 'candidate' ? cand(e.data) ?? 'end' : undefined });
      });
    }
  };
  const sendWs = WS.prototype.send;
  WS.prototype.send = function (d) {
    const ty = typeOf(d);
    if (ty === 'join') window.__mark('join');
    if (ty === 'answer') window.__mark('answer');
    ev('ws> ' + ty, { c: ty === 'candidate' ? cand(d) ?? 'end' : undefined });
    return sendWs.call(this, d);
  };
  const PC = window.RTCPeerConnection;
  let n = 0;
  for (const m of ['setLocalDescription', 'setRemoteDescription', 'addIceCandidate', 'createOffer', 'createAnswer', 'setConfiguration', 'addTrack', 'addTransceiver', 'createDataChannel']) {
    const orig = PC.prototype[m];
    PC.prototype[m] = function (...a) {
      ev(`pc${this.__n} ${m}(${m.endsWith('Description') ? a[0]?.type ?? '' : ''})`);
      const t0 = now();
      const r = orig.apply(this, a);
      if (!(r && typeof r.then === 'function') && now() - t0 > 1) ev(`pc${this.__n} ${m} returned after ${(now() - t0).toFixed(1)} ms`);
      if (r && typeof r.then === 'function') r.then(() => ev(`pc${this.__n} ${m} done`), (e) => ev(`pc${this.__n} ${m} failed ${e}`));
      return r;
    };
  }
  window.RTCPeerConnection = class extends PC {
    constructor(...a) {
      const t0 = now();
      super(...a);
      this.__n = n++;
      ev(`pc${this.__n} new (${(now() - t0).toFixed(1)} ms) ${JSON.stringify(a[0] ?? {}).slice(0, 160)}`);
      this.addEventListener('icecandidate', (e) => ev(`pc${this.__n} icecandidate`, { c: e.candidate ? cand(e.candidate.candidate) ?? e.candidate.candidate : 'end' }));
      this.addEventListener('icegatheringstatechange', () => ev(`pc${this.__n} gathering ${this.iceGatheringState}`));
      this.addEventListener('signalingstatechange', () => ev(`pc${this.__n} signaling ${this.signalingState}`));
      this.addEventListener('negotiationneeded', () => ev(`pc${this.__n} negotiationneeded`));
      this.addEventListener('iceconnectionstatechange', () => {
        ev(`pc${this.__n} ice ${this.iceConnectionState}`);
        if (this.iceConnectionState === 'connected' || this.iceConnectionState === 'completed') window.__mark('ice');
      });
      this.addEventListener('connectionstatechange', () => {
        ev(`pc${this.__n} conn ${this.connectionState}`);
        if (this.connectionState === 'connected') window.__mark('dtls');
      });
      this.addEventListener('track', (e) => {
        ev(`pc${this.__n} track ${e.track.kind}`);
        if (e.track.kind !== 'video') return;
        const poll = async () => {
          let f = 0;
          (await this.getStats(e.track)).forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') f = Math.max(f, s.framesDecoded ?? 0);
          });
          if (f > 0) window.__mark('frame');
          else if (performance.now() < 60000) setTimeout(poll, 5);
        };
        poll();
      });
      window.__pcs = [...(window.__pcs ?? []), this];
    }
  };
  // Long tasks on the main thread.
  try {
    new PerformanceObserver((l) => l.getEntries().forEach((e) => log.push({ t: performance.timeOrigin + e.startTime, what: `longtask ${e.duration.toFixed(0)} ms` }))).observe({ type: 'longtask', buffered: true });
  } catch {}
};

async function newContext(browser) {
  const ctx = await browser.newContext({ permissions: ['camera', 'microphone'] });
  await ctx.addInitScript(TRACE);
  return ctx;
}

async function pairs(page) {
  return page.evaluate(async () => {
    const out = [];
    for (const pc of window.__pcs ?? []) {
      if (pc.connectionState === 'closed') continue;
      const st = await pc.getStats();
      const byId = new Map();
      st.forEach((s) => byId.set(s.id, s));
      st.forEach((s) => {
        if (s.type === 'candidate-pair' && (s.nominated || s.state === 'succeeded'))
          out.push(`pc${pc.__n} pair ${byId.get(s.localCandidateId)?.candidateType}/${byId.get(s.localCandidateId)?.protocol} -> ${byId.get(s.remoteCandidateId)?.candidateType} ${s.state}${s.nominated ? ' nominated' : ''}`);
      });
    }
    return out;
  });
}

function print(kind, logs, join) {
  const all = [];
  for (const [who, log] of Object.entries(logs)) for (const e of log) all.push({ who, ...e });
  all.sort((x, y) => x.t - y.t);
  // One line per call: when things happened (from B's join) and how long the description calls took.
  const at = (who, re) => all.find((e) => e.who === who && e.t >= join - 1 && re.test(e.what))?.t;
  const d = (x) => (x === undefined ? '-' : (x - join).toFixed(0));
  const dur = (who, call) => {
    const s = at(who, new RegExp(`^pc\\d+ ${call}\\(`));
    const e = at(who, new RegExp(`^pc\\d+ ${call} done`));
    return s && e ? (e - s).toFixed(0) : '-';
  };
  const bAnswer = at('B', /^mark answer/);
  const bCand = all.find((e) => e.who === 'B' && e.t >= (bAnswer ?? Infinity) && /(ws|bc)> candidate/.test(e.what))?.t;
  console.log(
    `summary ${kind}: offer ${d(at('B', /^mark offer/))} answer ${d(bAnswer)} ice ${d(at('B', /^mark ice/))} dtls ${d(at('B', /^mark dtls/))} frame ${d(at('B', /^mark frame/))}` +
      ` | A sld ${dur('A', 'setLocalDescription')} B srd ${dur('B', 'setRemoteDescription')} B sld ${dur('B', 'setLocalDescription')} A srd ${dur('A', 'setRemoteDescription')}` +
      ` | B 1st cand after answer +${bCand && bAnswer ? (bCand - bAnswer).toFixed(0) : '-'} | A hello ${d(at('A', /(ws|bc)< hello/))} A offer out ${d(at('A', /ws> offer|^pc\d+ setLocalDescription done/))} A answer in ${d(at('A', /(ws|bc)< answer/))} A frame ${d(at('A', /^mark frame/))}`,
  );
  if (process.env.SUMMARY) return;
  console.log(`join at ${new Date(join).toISOString()} (${join.toFixed(1)})`);
  console.log(`--- ${kind}`);
  for (const e of all) if (e.t >= join - 50) console.log(`${(e.t - join).toFixed(1).padStart(8)} ${e.who} ${e.what}${e.c ? ' ' + e.c : ''}`);
}

async function webcallCall(browser, url) {
  const room = uniqueRoom('trace');
  const [ca, cb] = [await newContext(browser), await newContext(browser)];
  try {
    const b = await cb.newPage();
    await b.goto(`${url}/r/${room}?name=B&defer`);
    await until(b, () => !!window.webcall?.call.tracks.camera && !!window.webcall.call.tracks.mic, undefined, TIMEOUT);
    const a = await ca.newPage();
    await a.goto(`${url}/r/${room}?name=A&join=1`);
    await until(a, () => window.webcall?.call.state === 'in-call', undefined, TIMEOUT);
    await until(a, () => !('spare' in window.webcall.call) || !!window.webcall.call.spare, undefined, TIMEOUT);
    if (process.env.SETTLE) await new Promise((r) => setTimeout(r, Number(process.env.SETTLE)));
    // CHROME_TRACE=file: a Chromium trace (all processes) of this call, from just before B's join.
    if (process.env.CHROME_TRACE) await browser.startTracing(undefined, { path: process.env.CHROME_TRACE, categories: ['toplevel', 'devtools.timeline', 'blink.user_timing', 'webrtc', 'disabled-by-default-devtools.timeline'] });
    await b.evaluate(() => window.webcall.join());
    const t = await until(b, () => ('frame' in (window.__bench ?? {}) ? window.__bench : false), undefined, TIMEOUT);
    await new Promise((r) => setTimeout(r, 300));
    if (process.env.CHROME_TRACE) await browser.stopTracing();
    print('webcall', { A: await a.evaluate(() => window.__log), B: await b.evaluate(() => window.__log) }, t.join);
    if (!process.env.SUMMARY) console.log((await pairs(a)).map((s) => 'A ' + s).join('\n'));
    if (!process.env.SUMMARY) console.log((await pairs(b)).map((s) => 'B ' + s).join('\n'));
  } finally {
    await ca.close();
    await cb.close();
  }
}


async function baselineCall(browser, url) {
  const room = uniqueRoom('tbase');
  const ctx = await newContext(browser);
  try {
    const [a, b] = [await ctx.newPage(), await ctx.newPage()];
    await a.goto(`${url}/healthz`);
    await b.goto(`${url}/healthz`);
    await a.evaluate(BASELINE_PAGE, { role: 'A', room, variant: VARIANT });
    await b.evaluate(BASELINE_PAGE, { role: 'B', room, variant: VARIANT });
    await b.evaluate(() => window.__go());
    const t = await until(b, () => ('frame' in window.__bench ? window.__bench : false), undefined, TIMEOUT);
    await new Promise((r) => setTimeout(r, 300));
    print('baseline', { A: await a.evaluate(() => window.__log), B: await b.evaluate(() => window.__log) }, t.join);
    if (!process.env.SUMMARY) console.log((await pairs(a)).map((s) => 'A ' + s).join('\n'));
    if (!process.env.SUMMARY) console.log((await pairs(b)).map((s) => 'B ' + s).join('\n'));
  } finally {
    await ctx.close();
  }
}

assertLoopbackOnly();
// SERVER_ARGS: extra server flags for a diagnostic (e.g. --no-turn: no STUN/TURN servers in iceServers).
const server = await startServer({ args: ['--max-joins-per-ip', '100000', ...(process.env.SERVER_ARGS ?? '').split(' ').filter(Boolean)] });
const browser = await launchBrowser();
try {
  for (let i = 0; i <= CALLS; i++) {
    if (ONLY !== 'baseline') await webcallCall(browser, server.url);
    if (ONLY !== 'webcall') await baselineCall(browser, server.url);
  }
} finally {
  await browser.close();
  await server.kill();
}
