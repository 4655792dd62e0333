// Everything the server can refuse or require, from the page: room passwords (set on the pre-join screen, asked
// for on `unauthorized`, `?password=` links), join tokens (`?token=`, subscribe-only tokens join receive-only), and
// the failures (room full, server full, rate-limited, server shutdown, room store unavailable) with words on the page and devices released.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { ROOT, axeViolations, connectedPeers, decodesVideoFrom, e2e, screenshot, snapshot, startRedis, uniqueRoom, until } from './helpers.mjs';

const BINARY = process.env.WEBCALL_BIN ?? path.join(ROOT, 'target/debug/webcall');
const t = e2e();

/** Keeps the page's current local tracks, to check later that they were stopped. @param {import('playwright-core').Page} p */
const keepTracks = (p) =>
  p.evaluate(() => {
    // @ts-ignore
    window.__tracks = window.webcall.call.localStream.getTracks();
    // @ts-ignore
    return window.__tracks.length;
  });
/** Every kept track has ended (camera and microphone released). @param {import('playwright-core').Page} p */
const tracksEnded = (p) =>
  until(p, () => {
    // @ts-ignore
    const kept = /** @type {MediaStreamTrack[]} */ (window.__tracks);
    const s = window.webcall.call.snapshot();
    return kept.every((tr) => tr.readyState === 'ended') && Object.values(s.tracks).every((x) => x === null);
  });
/** The overlay dialog of `kind`, visible; returns its title and text. @param {import('playwright-core').Page} p @param {string} kind */
const overlay = (p, kind) =>
  until(
    p,
    (k) => {
      const o = document.querySelector('#overlay');
      if (!(o instanceof HTMLElement) || o.hidden || o.dataset.kind !== k) return false;
      return { title: document.querySelector('#overlay-title')?.textContent, text: document.querySelector('#overlay-text')?.textContent };
    },
    kind,
  );
const notConnecting = async (p) => assert.notEqual(await p.textContent('#conn-pill'), 'Connecting…');

describe('room password', () => {
  const server = t.server();

  it('the first joiner locks the room from the pre-join screen; others are asked for the password', async () => {
    const room = uniqueRoom('pw');
    const a = await t.open(`${server.url}/r/${room}?name=Owner`, { join: false });
    await until(a, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    await a.fill('#pj-password', 'open sesame');
    await a.click('#prejoin-join');
    await until(a, () => window.webcall.call.state === 'in-call');

    // Without the password: a prompt that says why, the devices released, no "Connecting…".
    const b = await t.open(`${server.url}/r/${room}?name=Guest`, { join: false });
    await until(b, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    await keepTracks(b);
    await b.click('#prejoin-join');
    const asked = await overlay(b, 'password');
    assert.match(asked.title, /locked/i);
    assert.match(asked.text, /password/i);
    await tracksEnded(b);
    await notConnecting(b);
    // Focus is in the dialog's field.
    assert.equal(await b.evaluate(() => document.activeElement?.id), 'overlay-input');
    await screenshot(b, 'password-prompt.png');
    assert.deepEqual(await axeViolations(b), []);

    // A wrong one: the error in words, asked again.
    await b.fill('#overlay-input', 'wrong');
    await b.press('#overlay-input', 'Enter');
    await until(b, () => !document.querySelector('#overlay-error').hidden && /wrong password/i.test(document.querySelector('#overlay-error').textContent));
    assert.equal((await snapshot(b)).state, 'failed');
    // The right one: in the call, connected to the owner.
    await b.fill('#overlay-input', 'open sesame');
    await b.press('#overlay-input', 'Enter');
    const [ownerId] = await connectedPeers(b, 1);
    await decodesVideoFrom(b, ownerId);
    await connectedPeers(a, 1);

    // A ?password= link goes straight through (after the pre-join screen), and the password leaves the address bar.
    const c = await t.open(`${server.url}/r/${room}?name=Linked&password=${encodeURIComponent('open sesame')}`);
    await connectedPeers(c, 2);
    assert.ok(!c.url().includes('password'));
    await Promise.all([a, b, c].map((p) => p.context().close()));
  });
});

describe('join tokens', () => {
  const secret = 'e2e-secret-0123456789';
  const server = t.server(['--auth-secret', secret]);
  /** @param {string[]} args */
  const mint = (args) => execFileSync(BINARY, ['token', '--auth-secret', secret, ...args], { encoding: 'utf8' }).trim();

  it('a page without a token says it needs an invitation link, and releases its devices', async () => {
    const p = await t.open(`${server.url}/r/${uniqueRoom('tok')}?name=NoToken`, { join: false });
    await until(p, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    await keepTracks(p);
    await p.click('#prejoin-join');
    const o = await overlay(p, 'unauthorized');
    assert.match(o.title, /cannot join/i);
    assert.match(o.text, /token/i);
    await tracksEnded(p);
    await notConnecting(p);
    await p.context().close();
  });

  it('a ?token= link joins with the token’s name; a subscribe-only token joins receive-only and says so', async () => {
    const room = uniqueRoom('tok');
    const host = await t.open(`${server.url}/r/${room}?token=${mint(['--room', room, '--name', 'Host From Token'])}`);
    await until(host, () => window.webcall.call.state === 'in-call');
    const viewer = await t.open(`${server.url}/r/${room}?name=Viewer&token=${mint(['--room', room, '--subscribe-only'])}`, { join: false });
    await until(viewer, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    assert.match(await viewer.textContent('#pj-note'), /watch and listen/i);
    // No camera or microphone was asked for.
    assert.deepEqual((await snapshot(viewer)).tracks, { mic: null, camera: null, screen: null });
    await viewer.click('#prejoin-join');
    const [hostId] = await connectedPeers(viewer, 1);
    const [viewerId] = await connectedPeers(host, 1);
    const banner = await until(viewer, () => {
      const b = document.querySelector('#banner');
      return b instanceof HTMLElement && !b.hidden && b.dataset.kind === 'receive-only' ? b.textContent : false;
    });
    assert.match(banner, /watching and listening/i);
    assert.equal((await snapshot(viewer)).publish, false);
    assert.equal(await viewer.getAttribute('#btn-mic', 'disabled'), '');
    // The host's name comes from its token; the viewer sees and hears the host.
    assert.equal(await viewer.textContent(`.tile[data-peer="${hostId}"] .name`), 'Host From Token');
    await decodesVideoFrom(viewer, hostId);
    // Every audio/video transceiver of the viewer only receives.
    const dirs = await viewer.evaluate(
      (id) => window.webcall.call.peers.get(id).pc.getTransceivers().filter((x) => x.mid !== null && x.receiver.track.kind !== 'application').map((x) => x.currentDirection),
      hostId,
    );
    assert.ok(dirs.length >= 2 && dirs.every((d) => d === 'recvonly'), JSON.stringify(dirs));
    await until(host, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.video === 'off', viewerId);
    await screenshot(viewer, 'subscribe-only.png');

    // A third person moves the room to the SFU: the viewer keeps watching through the server and sends nothing.
    const third = await t.open(`${server.url}/r/${room}?token=${mint(['--room', room, '--name', 'Third'])}`);
    await until(viewer, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    await connectedPeers(viewer, 2, 30000);
    await until(viewer, (id) => {
      const call = window.webcall.call;
      const peer = call.peers.get(id);
      return peer?.pc === call.sfu.pc && peer.remoteStream.getVideoTracks().length > 0;
    }, hostId, 30000);
    await decodesVideoFrom(viewer, hostId, 10, 30000);
    const sfuDirs = await viewer.evaluate(() =>
      window.webcall.call.sfu.pc.getTransceivers().filter((x) => x.mid !== null).map((x) => x.currentDirection),
    );
    assert.ok(sfuDirs.length >= 2 && sfuDirs.every((d) => d === 'recvonly' || d === 'inactive'), JSON.stringify(sfuDirs));
    assert.deepEqual(viewer.errors, []);
    await Promise.all([host, viewer, third].map((p) => p.context().close()));
  });
});

describe('server limits', () => {
  // `?mesh=1`: a third page would otherwise move the room to the SFU (whose cap is --max-sfu-peers, at least 3).
  const full = t.server(['--max-peers', '2', '--max-rooms', '1']);

  it('room full and server full: words, a way forward, devices released', async () => {
    const room = uniqueRoom('lim');
    const a = await t.open(`${full.url}/r/${room}?name=A&mesh=1`);
    await until(a, () => window.webcall.call.state === 'in-call');
    const a2 = await t.open(`${full.url}/r/${room}?name=A2&mesh=1`);
    await connectedPeers(a2, 1);

    const b = await t.open(`${full.url}/r/${room}?name=B&mesh=1`, { join: false });
    await until(b, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    await keepTracks(b);
    await b.click('#prejoin-join');
    const o = await overlay(b, 'room-full');
    assert.match(o.title, /room is full/i);
    await tracksEnded(b);
    await notConnecting(b);
    assert.deepEqual(await b.$$eval('#overlay-actions button', (bs) => bs.map((x) => x.textContent)), ['Try again', 'Start another call']);
    // The way forward works: once a seat is free, "Try again" joins (with the camera and microphone again).
    await a2.context().close();
    await until(a, () => window.webcall.call.peers.size === 0);
    await b.click('#overlay-actions button.primary');
    await connectedPeers(b, 1);
    await connectedPeers(a, 1);
    assert.equal((await snapshot(b)).tracks.camera, 'live');
    await b.context().close();

    const c = await t.open(`${full.url}/r/${uniqueRoom('other')}?name=C`, { join: false });
    await until(c, () => document.body.dataset.phase === 'prejoin' && !document.querySelector('#prejoin-join').disabled);
    await keepTracks(c);
    await c.click('#prejoin-join');
    assert.match((await overlay(c, 'server-full')).title, /server is full/i);
    await tracksEnded(c);
    await notConnecting(c);
    await Promise.all([a, c].map((p) => p.context().close()));
  });
});

describe('rate limits and shutdown', () => {
  const server = t.server(['--max-joins-per-ip', '1', '--shutdown-timeout', '1s']);

  it('a rate-limited join says so and keeps retrying; a server shutdown says the server is restarting', async () => {
    const a = await t.open(`${server.url}/r/${uniqueRoom('rl')}?name=A`);
    await until(a, () => window.webcall.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${uniqueRoom('rl')}?name=B`);
    const text = await until(b, () => {
      const el = document.querySelector('#banner');
      return el instanceof HTMLElement && !el.hidden && el.dataset.kind === 'reconnecting' ? el.textContent : false;
    });
    assert.match(text, /too many connections or joins/i);
    assert.match(text, /retrying in \d+ s/);
    await notConnecting(b);
    await b.context().close();

    // SIGTERM: the server tells every connection `server-shutdown` and closes it (1001).
    await server.kill('SIGTERM');
    const down = await until(a, () => {
      const el = document.querySelector('#banner');
      return el instanceof HTMLElement && !el.hidden && el.dataset.kind === 'reconnecting' ? el.textContent : false;
    });
    assert.match(down, /server is restarting/i);
    assert.notEqual((await snapshot(a)).state, 'failed');
    await a.context().close();
  });
});

describe('the room store unavailable (cluster mode)', () => {
  // A real redis-server on loopback inside the test's namespace; the server shares rooms through it (--redis).
  const redisPort = 21000 + Math.floor(Math.random() * 20000);
  /** @type {import('node:child_process').ChildProcess|null} */
  let redis = null;
  before(async () => {
    redis = (await startRedis(redisPort)).proc;
  });
  after(() => redis?.kill('SIGKILL'));
  const server = t.server(['--redis', `redis://127.0.0.1:${redisPort}`]);

  it('a join while Redis does not answer says so, keeps retrying, and gets in once Redis is back', async () => {
    // SIGSTOP: Redis keeps its connections but answers nothing, so the join times out as `unavailable`.
    /** @type {import('node:child_process').ChildProcess} */ (redis).kill('SIGSTOP');
    try {
      const p = await t.open(`${server.url}/r/${uniqueRoom('unav')}?name=U`);
      const text = await until(
        p,
        () => {
          const el = document.querySelector('#banner');
          return el instanceof HTMLElement && !el.hidden && el.dataset.kind === 'reconnecting' ? el.textContent : false;
        },
        undefined,
        30000,
      );
      assert.match(text, /cannot reach its room store/i);
      assert.match(text, /retrying in \d+ s/);
      await notConnecting(p);
      /** @type {import('node:child_process').ChildProcess} */ (redis).kill('SIGCONT');
      await until(p, () => window.webcall.call.state === 'in-call', undefined, 30000);
      await p.context().close();
    } finally {
      /** @type {import('node:child_process').ChildProcess} */ (redis).kill('SIGCONT');
    }
  });
});
