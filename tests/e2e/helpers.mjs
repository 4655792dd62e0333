// Shared helpers of the browser end-to-end tests: the real `webcall` server binary, Debian's chromium driven
// through playwright-core and Debian's firefox-esr through puppeteer-core (WebDriver BiDi). Run inside the network
// namespace of scripts/test.sh: loopback and a test-only veth pair, nothing else.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before } from 'node:test';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const ARTIFACTS = path.join(ROOT, 'test-artifacts');
const BINARY = process.env.WEBCALL_BIN ?? path.join(ROOT, 'target/debug/webcall');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const FIREFOX = process.env.FIREFOX ?? '/usr/bin/firefox-esr';

/** The test-only interface of the e2e namespace (see `E2E_NETNS` in scripts/test.sh) and its one address. */
export const TEST_IFACE = 'wc0';
export const TEST_ADDR = '198.18.0.1';
/** The namespace scripts/test.sh gives the browser tests (lo, plus a veth pair whose both ends stay inside). */
export const NETNS_SETUP =
  'ip link set lo up && ip link add wc0 type veth peer name wc1 && ' +
  'echo 1 > /proc/sys/net/ipv6/conf/wc0/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/wc1/disable_ipv6 && ' +
  `ip addr add ${TEST_ADDR}/24 dev wc0 && ip link set wc0 up && ip link set wc1 up && ip route add default dev wc0`;

/**
 * Refuses to run where a browser's ICE could reach beyond the test's own namespace: every test page must only ever
 * talk to 127.0.0.0/8, ::1, or the test-only address on `wc0` — a veth whose peer `wc1` (no address) is in the same
 * namespace, so nothing sent there can leave it. Firefox gathers no loopback candidates, hence that address.
 * @param {{requireTestIface?: boolean}} [opts] require `wc0` (Firefox needs it)
 */
export function assertLoopbackOnly({ requireTestIface = false } = {}) {
  const hint =
    `run the browser tests in a namespace of their own: unshare --net sh -c '${NETNS_SETUP} && ` +
    "node --test --test-concurrency=1 tests/e2e/'";
  const ifaces = Object.entries(os.networkInterfaces());
  const outside = ifaces.filter(
    ([name, addrs]) => addrs.some((a) => !a.internal) && !(name === TEST_IFACE && addrs.every((a) => a.address === TEST_ADDR)),
  );
  if (outside.length) {
    throw new Error(`network interfaces other than loopback are present (${outside.map(([n]) => n).join(', ')}); ${hint}`);
  }
  const hasTestIface = ifaces.some(([name]) => name === TEST_IFACE);
  if (hasTestIface) {
    // Every link of this namespace: wc0 must be a veth whose peer is here too (a peer elsewhere has link_netnsid).
    /** @type {any[]} */
    const links = JSON.parse(execFileSync('ip', ['-j', '-d', 'link', 'show'], { encoding: 'utf8' }));
    const wc0 = links.find((l) => l.ifname === TEST_IFACE);
    const peer = links.find((l) => l.ifname === wc0?.link);
    const inside =
      wc0?.linkinfo?.info_kind === 'veth' && wc0.link_netnsid === undefined && peer?.linkinfo?.info_kind === 'veth' && peer.link === TEST_IFACE;
    // (The peer end has no address, checked above: a packet to anywhere but 127/8 or wc0 goes nowhere.)
    if (!inside) throw new Error(`${TEST_IFACE} is not a veth pair inside this namespace; ${hint}`);
  } else if (requireTestIface) {
    throw new Error(`Firefox gathers no loopback ICE candidates and needs ${TEST_IFACE} (${TEST_ADDR}); ${hint}`);
  }
}

/**
 * Starts `webcall serve` and resolves once it prints its address.
 * @param {{port?: number, args?: string[]}} [opts]
 */
export async function startServer({ port = 0, args = [] } = {}) {
  // Each server gets its own STUN/TURN port unless the test chooses one (the default 3478 would collide).
  const ownTurn = args.some((a) => a === '--turn-listen' || a === '--no-turn' || a === '--ice-servers');
  const turnArgs = ownTurn ? [] : ['--turn-listen', '127.0.0.1:0'];
  const proc = spawn(BINARY, ['serve', '--listen', `127.0.0.1:${port}`, ...turnArgs, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // The SFU's media port (default 7882) would collide between servers too; a --media-listen in args wins.
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn', WEBCALL_MEDIA_LISTEN: '127.0.0.1:0' },
  });
  let stderr = '';
  proc.stderr.on('data', (d) => {
    stderr += d;
    if (process.env.WEBCALL_E2E_VERBOSE) process.stderr.write(d);
  });
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server did not start in 15 s; stderr:\n${stderr}`)), 15000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/webcall listening on (https?:\/\/[^\s]+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before listening; stderr:\n${stderr}`));
    });
  });
  const actualPort = Number(new URL(url).port);
  return {
    url,
    port: actualPort,
    proc,
    /** Kills the server (SIGKILL: no goodbye to anyone) and waits for it to be gone. */
    async kill(signal = 'SIGKILL') {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const gone = new Promise((r) => proc.once('exit', r));
      proc.kill(signal);
      await gone;
    },
  };
}

/**
 * Starts a real redis-server on a loopback port (for `--redis` servers) and resolves once it answers; `kill()` ends it.
 * @param {number} [port] a random one above 21000 unless given
 */
export async function startRedis(port = 21000 + Math.floor(Math.random() * 20000)) {
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', os.tmpdir()], {
    stdio: 'ignore',
  });
  const deadline = Date.now() + 10000;
  for (;;) {
    const up = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => (s.destroy(), resolve(true)));
      s.on('error', () => resolve(false));
    });
    if (up) break;
    if (Date.now() > deadline) throw new Error('redis-server did not start (scripts/test.sh installs it)');
    await new Promise((r) => setTimeout(r, 50));
  }
  return { url: `redis://127.0.0.1:${port}`, proc, kill: () => proc.kill('SIGKILL') };
}

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
  // getDisplayMedia: pick the (fake) screen without a picker.
  '--auto-select-desktop-capture-source=Entire screen',
];

/** Launches Debian's chromium (never a downloaded one) with a fresh profile. @param {string[]} [extraArgs] */
export async function launchBrowser(extraArgs = []) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [...CHROMIUM_ARGS, ...extraArgs],
    timeout: 30000,
  });
}

/** Firefox's equivalents of the Chromium flags above (fake devices, no prompts, plain host candidates, autoplay). */
export const FIREFOX_PREFS = {
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
  'media.peerconnection.ice.obfuscate_host_addresses': false,
  // Lets ICE use the TURN server on 127.0.0.1.
  'media.peerconnection.ice.loopback': true,
  'media.autoplay.default': 0,
  'media.autoplay.blocking_policy': 0,
  'network.captive-portal-service.enabled': false,
  'network.connectivity-service.enabled': false,
  'browser.safebrowsing.update.enabled': false,
};

/**
 * Launches Debian's firefox-esr (never a downloaded one) through puppeteer-core over WebDriver BiDi, fresh profile.
 * @returns {Promise<import('puppeteer-core').Browser>}
 */
export async function launchFirefox() {
  // Loaded here: only the Firefox tests need it.
  const { default: puppeteer } = await import('puppeteer-core');
  return puppeteer.launch({
    browser: 'firefox',
    protocol: 'webDriverBiDi',
    executablePath: FIREFOX,
    headless: true,
    extraPrefsFirefox: FIREFOX_PREFS,
    timeout: 30000,
  });
}

/**
 * `openPage` for Firefox: a page in its own browser context (user context), errors kept on `page.errors`, the
 * pre-join screen passed unless `join: false`. Close it with `page.browserContext().close()`.
 * @param {import('puppeteer-core').Browser} browser @param {string} url
 * @param {{viewport?: {width: number, height: number}, join?: boolean}} [opts]
 * @returns {Promise<import('puppeteer-core').Page & {errors: string[]}>}
 */
export async function openFirefoxPage(browser, url, opts = {}) {
  const context = await browser.createBrowserContext();
  const page = /** @type {import('puppeteer-core').Page & {errors: string[]}} */ (await context.newPage());
  await page.setViewport(opts.viewport ?? { width: 1280, height: 800 });
  page.errors = [];
  page.on('pageerror', (e) => {
    const msg = e instanceof Error ? e.message : String(e);
    page.errors.push(`uncaught: ${msg}`);
    console.error(`[firefox ${url}] uncaught:`, msg);
  });
  page.on('console', (m) => {
    if (m.type() === 'error') page.errors.push(m.text());
    if (m.type() === 'error' || process.env.WEBCALL_E2E_VERBOSE) console.error(`[firefox ${url}] ${m.type()}: ${m.text()}`);
  });
  await page.goto(url);
  if (opts.join !== false) await passPrejoin(/** @type {any} */ (page));
  return page;
}

/**
 * @typedef {object} OpenOptions
 * @property {{width: number, height: number}} [viewport]
 * @property {boolean} [join] on the call page, press "Join" on the pre-join screen (default true)
 * @property {(ctx: import('playwright-core').BrowserContext) => Promise<void>} [setup] before the page loads
 * @property {string[]} [permissions] default camera and microphone
 * @property {boolean} [ignoreHTTPSErrors] accept a self-signed certificate (servers with --tls-self-signed)
 */

/**
 * Opens a page in its own browser context (own storage, like another person). Console errors and uncaught
 * exceptions are printed and kept on `page.errors`. On the call page the pre-join screen is passed with its Join
 * button (as a person would) unless `join: false`.
 * @param {import('playwright-core').Browser} browser
 * @param {string} url
 * @param {OpenOptions} [opts]
 * @returns {Promise<import('playwright-core').Page & {errors: string[]}>}
 */
export async function openPage(browser, url, opts = {}) {
  const context = await browser.newContext({
    viewport: opts.viewport ?? { width: 1280, height: 800 },
    permissions: opts.permissions ?? ['camera', 'microphone'],
    ignoreHTTPSErrors: opts.ignoreHTTPSErrors ?? false,
  });
  if (opts.setup) await opts.setup(context);
  const page = /** @type {import('playwright-core').Page & {errors: string[]}} */ (await context.newPage());
  page.errors = [];
  page.on('pageerror', (e) => {
    page.errors.push(`uncaught: ${e.message}`);
    console.error(`[page ${url}] uncaught:`, e.message);
  });
  page.on('console', (m) => {
    if (m.type() === 'error') page.errors.push(m.text());
    if (m.type() === 'error' || process.env.WEBCALL_E2E_VERBOSE) console.error(`[page ${url}] ${m.type()}: ${m.text()}`);
  });
  await page.goto(url);
  if (opts.join !== false) await passPrejoin(page);
  return page;
}

/**
 * On the call page: waits for the pre-join screen (if the page has one) and presses Join. A page that goes
 * straight into the call, or that shows something else (an error dialog), is left as it is.
 * @param {import('playwright-core').Page} page
 */
export async function passPrejoin(page) {
  if (!new URL(page.url()).pathname.startsWith('/r/')) return;
  const ready = await until(
    page,
    () => {
      const phase = document.body?.dataset.phase;
      if (!document.querySelector('#prejoin') || (phase && phase !== 'loading' && phase !== 'prejoin')) return 'none';
      if (phase === 'prejoin' && !document.querySelector('#prejoin-join')?.hasAttribute('disabled')) return 'ready';
      return false;
    },
    undefined,
    20000,
  );
  if (ready === 'ready') await page.click('#prejoin-join');
}

/**
 * The shared set-up of a test file: one Chromium for the whole file (each page in a new context of it), servers
 * started per suite, every context closed at the end.
 *
 *   const t = e2e();                       // at the top of the file
 *   describe('…', () => {
 *     const srv = t.server(['--max-peers', '2']);   // started before the suite's tests, killed after
 *     it('…', async () => { const p = await t.open(`${srv.url}/r/room`); … });
 *   });
 *
 * With `firefox: true` the file also gets one Firefox (`t.firefox`, pages from `t.openFirefox`), and the
 * namespace must have the test-only interface (see `assertLoopbackOnly`).
 * @param {{browserArgs?: string[], firefox?: boolean}} [opts]
 */
export function e2e({ browserArgs = [], firefox = false } = {}) {
  /** @type {import('playwright-core').Browser|null} */
  let browser = null;
  /** @type {import('puppeteer-core').Browser|null} */
  let ff = null;
  const fixture = {
    get browser() {
      if (!browser) throw new Error('the browser starts in the file’s before hook');
      return browser;
    },
    /**
     * Starts a `webcall serve` with `args` before the tests of the enclosing suite (or file) and kills it after.
     * The returned handle's fields (`url`, `port`, `kill`, `restart`) are valid inside tests.
     * @param {string[]} [args]
     */
    server(args = []) {
      const handle = {
        /** @type {Awaited<ReturnType<typeof startServer>>|null} */
        current: null,
        get url() {
          return /** @type {any} */ (handle.current).url;
        },
        get port() {
          return /** @type {any} */ (handle.current).port;
        },
        get proc() {
          return /** @type {any} */ (handle.current).proc;
        },
        /** @param {string} [signal] */
        kill: (signal) => handle.current?.kill(signal),
        /** Starts it again on the same port (after `kill`). */
        async restart() {
          handle.current = await startServer({ port: handle.current?.port ?? 0, args });
        },
      };
      before(async () => {
        handle.current = await startServer({ args });
      });
      after(async () => {
        await handle.current?.kill();
      });
      return handle;
    },
    /** Opens a page in a new context of the shared browser. @param {string} url @param {OpenOptions} [opts] */
    open: (url, opts) => openPage(fixture.browser, url, opts),
    get firefox() {
      if (!ff) throw new Error('Firefox starts in the file’s before hook, with e2e({ firefox: true })');
      return ff;
    },
    /** Opens a page in a new context of the shared Firefox. @param {string} url @param {{join?: boolean, viewport?: {width: number, height: number}}} [opts] */
    openFirefox: (url, opts) => openFirefoxPage(fixture.firefox, url, opts),
  };
  before(async () => {
    assertLoopbackOnly({ requireTestIface: firefox });
    [browser, ff] = await Promise.all([launchBrowser(browserArgs), firefox ? launchFirefox() : null]);
  });
  after(async () => {
    await Promise.all([browser?.close(), ff?.close()]);
  });
  return fixture;
}

/** A room name nobody else uses. */
export const uniqueRoom = (prefix = 'e2e') => `${prefix}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;

/**
 * Waits (bounded) until `fn` returns (or resolves to) a truthy value in the page; returns that value. Polls from
 * Node with `page.evaluate`, which awaits promises (`page.waitForFunction` would take a returned Promise as truthy).
 * @template T
 * @param {import('playwright-core').Page} page
 * @param {((arg: any) => T) | string} fn a function, or an expression
 * @param {any} [arg]
 * @param {number} [timeout]
 */
export async function until(page, fn, arg, timeout = 20000) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = typeof fn === 'string' ? await page.evaluate(fn) : await page.evaluate(fn, arg);
      if (last) return last;
    } catch (e) {
      // A navigation (reload) destroys the context in the middle of an evaluate: try again.
      if (!/context was destroyed|navigat/i.test(String(e))) throw e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${String(fn).slice(0, 300)} (last value ${JSON.stringify(last)})`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/**
 * Waits until the tile of `peerId` shows a full stats panel (path, rtt, bit rates both ways, video size and rate);
 * returns its text. Works on Chromium and Firefox pages. @param {any} page @param {string} peerId
 */
export const fullStatsPanel = (page, peerId) =>
  until(
    page,
    (id) => {
      const t = document.querySelector(`.tile[data-peer="${id}"] .tile-stats`)?.textContent ?? '';
      const ok =
        /^path\s+host/m.test(t) &&
        /^rtt\s+\d+ ms/m.test(t) &&
        /^in\s+[\d.]+ [kM]b\/s/m.test(t) &&
        /^out\s+[\d.]+ [kM]b\/s/m.test(t) &&
        /^video in \d+×\d+ @ \d+ fps/m.test(t);
      return ok ? t : false;
    },
    peerId,
  );

/**
 * What `page` decodes of participant `id`'s camera (or, `screen`, its screen share) over its SFU connection: `n`, the
 * frames decoded (getStats of that participant's track; -1 before the page has an SFU connection and the track, and,
 * with `moved`, while the participant's tile still shows the peer-to-peer connection), `w`, its tile's video width,
 * and `fw`, the width of the frames decoded (0 until one is).
 */
const sfuVideo = (page, id, { screen = false, moved = true } = {}) =>
  page.evaluate(
    async ({ id, screen, moved }) => {
      const call = window.webcall.call;
      const peer = call.peers.get(id);
      const track = (screen ? peer?.remoteScreen : peer?.remoteStream)?.getVideoTracks()[0];
      if (!call.sfu || !track || (moved && peer.pc !== call.sfu.pc)) return { n: -1, w: 0, fw: 0 };
      let n = 0;
      let fw = 0;
      (await call.sfu.pc.getStats(track)).forEach((s) => {
        if (s.type !== 'inbound-rtp' || s.kind !== 'video') return;
        n = Math.max(n, s.framesDecoded ?? 0);
        if ((s.framesDecoded ?? 0) > 0) fw = s.frameWidth ?? 0;
      });
      const video = document.querySelector(`.tile[data-peer="${screen ? `${id}:screen` : id}"] video`);
      return { n, w: video instanceof HTMLVideoElement && video.srcObject ? video.videoWidth : 0, fw };
    },
    { id, screen, moved },
  );

/**
 * Frames `page` decoded from participant `id` over its SFU connection (getStats of that participant's video track);
 * -1 before the page has an SFU connection and the track. @param {import('playwright-core').Page} page @param {string} id
 */
export const sfuFramesFrom = async (page, id) => (await sfuVideo(page, id, { moved: false })).n;

/**
 * The frame width of the video `page` receives from participant `id` over the SFU (0 until it decodes).
 * @param {import('playwright-core').Page} page @param {string} id
 */
export const sfuFrameWidthFrom = async (page, id) => (await sfuVideo(page, id, { moved: false })).fw;

/**
 * Waits until `page` decodes more than `frames` new video frames from participant `peerId` over the SFU: its camera
 * (or, `screen`, its screen share) track on the page's SFU connection (`moved`: once its tile left the peer-to-peer
 * connection), and, with `tile`, its tile's <video> has a width.
 * @param {import('playwright-core').Page} page @param {string} peerId
 */
export async function decodesOverSfu(
  page,
  peerId,
  { frames = 10, screen = false, tile = true, moved = true, timeout = 30000 } = {},
) {
  const read = () => sfuVideo(page, peerId, { screen, moved });
  let start = await read();
  const deadline = Date.now() + timeout;
  for (;;) {
    const now = await read();
    if (start.n < 0) start = now;
    else if (now.n > start.n + frames && (!tile || now.w > 0)) return;
    if (Date.now() > deadline) {
      const what = `${peerId}${screen ? ' (screen)' : ''}`;
      throw new Error(`no video from ${what} over the SFU: ${JSON.stringify({ start, now })}`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Snapshot of the call (window.webcall.snapshot()). @param {import('playwright-core').Page} page */
export const snapshot = (page) => page.evaluate(() => window.webcall.snapshot());

/**
 * Waits until the page has exactly `n` peers, all with connectionState `connected`; returns their ids.
 * @param {import('playwright-core').Page} page @param {number} n @param {number} [timeout]
 */
export async function connectedPeers(page, n, timeout = 20000) {
  return until(
    page,
    (n) => {
      const s = window.webcall?.snapshot();
      if (!s || s.state !== 'in-call' || s.peers.length !== n) return false;
      return s.peers.every((p) => p.connectionState === 'connected') ? s.peers.map((p) => p.id) : false;
    },
    n,
    timeout,
  );
}

/**
 * Waits until the page decodes video from peer `peerId`: `framesDecoded` of the inbound video stream grows by more
 * than `frames` (read from getStats() directly), and the peer's <video> element has a width.
 * @param {import('playwright-core').Page} page @param {string} peerId
 */
export async function decodesVideoFrom(page, peerId, frames = 10, timeout = 20000) {
  const read = () =>
    page.evaluate(async (id) => {
      const peer = window.webcall.call.peers.get(id);
      if (!peer) return -1;
      let n = 0;
      (await peer.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') n = Math.max(n, s.framesDecoded ?? 0);
      });
      return n;
    }, peerId);
  const start = await read();
  await until(
    page,
    async ({ id, start, frames }) => {
      const peer = window.webcall.call.peers.get(id);
      if (!peer) return false;
      let n = 0;
      (await peer.pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') n = Math.max(n, s.framesDecoded ?? 0);
      });
      const video = document.querySelector(`.tile[data-peer="${id}"] video`);
      return n > start + frames && video instanceof HTMLVideoElement && video.videoWidth > 0;
    },
    { id: peerId, start, frames },
    timeout,
  ).catch(async (e) => {
    // Say where the video stopped (never arrived, arrived but not decoded, decoded but not shown), so a rare
    // failure explains itself.
    const why = await page
      .evaluate(async (id) => {
        const peer = window.webcall.call.peers.get(id);
        if (!peer) return 'no such peer';
        const out = [`connection=${peer.pc.connectionState} ice=${peer.pc.iceConnectionState} signaling=${peer.pc.signalingState}`];
        (await peer.pc.getStats()).forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'video') {
            const { packetsReceived, packetsLost, framesReceived, framesDecoded, keyFramesDecoded, pliCount, firCount, nackCount } = s;
            out.push(`inbound ${s.id}: ${JSON.stringify({ packetsReceived, packetsLost, framesReceived, framesDecoded, keyFramesDecoded, pliCount, firCount, nackCount })}`);
          }
        });
        const video = document.querySelector(`.tile[data-peer="${id}"] video`);
        out.push(`tile video: ${video instanceof HTMLVideoElement ? `${video.videoWidth}x${video.videoHeight} paused=${video.paused}` : 'none'}`);
        return out.join('; ');
      }, peerId)
      .catch((err) => `stats unavailable: ${err}`);
    throw new Error(`${e.message}\n  video from ${peerId}: ${why}`);
  });
}

/** @param {import('playwright-core').Page} page @param {string} name */
export async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, name);
  await page.screenshot({ path: file });
  return file;
}

/** Id of this page's own peer. @param {import('playwright-core').Page} page */
export const ownId = (page) => page.evaluate(() => window.webcall.call.id);

/** Starts `webcall peer`; collects its stdout lines. */
export function startPeer(args) {
  const proc = spawn(BINARY, ['peer', ...args], { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  const lines = [];
  let buf = '';
  proc.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      lines.push(buf.slice(0, i));
      if (process.env.WEBCALL_E2E_VERBOSE) console.error(`[peer] ${buf.slice(0, i)}`);
      buf = buf.slice(i + 1);
    }
  });
  let stderr = '';
  proc.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise((r) => proc.once('exit', (code) => r(code)));
  return {
    proc,
    lines,
    exited,
    stderr: () => stderr,
    /** Waits (bounded) for a stdout line matching `re`; returns it. */
    async waitLine(re, timeout = 30000) {
      const t0 = Date.now();
      for (;;) {
        const l = lines.find((x) => re.test(x));
        if (l) return l;
        if (Date.now() - t0 > timeout) throw new Error(`no line ${re} from webcall peer; got:\n${lines.join('\n')}\n${stderr}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
  };
}

const AXE_SOURCE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

/**
 * Runs axe-core (WCAG 2.x A and AA rules) on the page as it is now; returns the serious and critical violations,
 * each as `rule: target (summary)`.
 * @param {import('playwright-core').Page} page
 */
export async function axeViolations(page) {
  // Evaluated, not added as a <script>: the page's Content-Security-Policy allows only its own scripts.
  await page.evaluate(AXE_SOURCE);
  const result = await page.evaluate(() =>
    // @ts-ignore
    window.axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] }, resultTypes: ['violations'] }),
  );
  return result.violations
    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .flatMap((v) => v.nodes.map((n) => `${v.id}: ${n.target.join(' ')} (${n.failureSummary?.split('\n').slice(1).join(' ').trim()})`));
}
