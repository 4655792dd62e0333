// Shared helpers of the browser end-to-end tests: the real `webcall` server binary and Debian's chromium driven
// through playwright-core. Run inside a network namespace that has only loopback (see scripts/test.sh).
import { spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const ARTIFACTS = path.join(ROOT, 'test-artifacts');
const BINARY = process.env.WEBCALL_BIN ?? path.join(ROOT, 'target/debug/webcall');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

/**
 * Refuses to run where Chromium's ICE could reach beyond loopback: every test page must only ever talk to
 * 127.0.0.0/8 or ::1.
 */
export function assertLoopbackOnly() {
  const ifaces = Object.entries(os.networkInterfaces());
  const outside = ifaces.filter(([, addrs]) => addrs.some((a) => !a.internal));
  if (outside.length) {
    throw new Error(
      `network interfaces other than loopback are present (${outside.map(([n]) => n).join(', ')}); run the browser ` +
        "tests in a namespace with only lo: unshare --net sh -c 'ip link set lo up && node --test --test-concurrency=1 tests/e2e/'",
    );
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
      const m = out.match(/webcall listening on (http:\/\/[^\s]+)/);
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

/**
 * Opens a page in its own browser context (own storage, like another person).
 * @param {import('playwright-core').Browser} browser
 * @param {string} url
 */
export async function openPage(browser, url) {
  const context = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    permissions: ['camera', 'microphone'],
  });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[page ${url}] uncaught:`, e.message));
  page.on('console', (m) => {
    if (m.type() === 'error' || process.env.WEBCALL_E2E_VERBOSE) console.error(`[page ${url}] ${m.type()}: ${m.text()}`);
  });
  await page.goto(url);
  return page;
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
  );
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
