// Room capacity, meshes, and joining without (some) local media.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connectedPeers, decodesVideoFrom, e2e, launchBrowser, openPage, passPrejoin, screenshot, snapshot, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

/** Closes the contexts of the given pages (each page is alone in its context). */
const closeAll = (pages) => Promise.all(pages.map((p) => p.context().close()));

// `?mesh=1`: pages that join without SFU keep the room peer-to-peer, so --max-peers bounds it.
describe('capacity-2 room', () => {
  const server = t.server(['--max-peers', '2']);

  it('a third page sees the room-full message and the call of the two goes on', async () => {
    const room = uniqueRoom('full');
    const a = await t.open(`${server.url}/r/${room}?name=A&mesh=1`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=B&mesh=1`);
    await connectedPeers(a, 1);
    await connectedPeers(b, 1);
    const c = await t.open(`${server.url}/r/${room}?name=C&mesh=1`);
    await until(c, () => {
      const o = document.querySelector('#overlay');
      return o && !o.hidden && o.dataset.kind === 'room-full';
    });
    assert.match(await c.textContent('#overlay-title'), /room is full/i);
    await screenshot(c, 'room-full.png');
    const sc = await snapshot(c);
    assert.equal(sc.state, 'failed');
    assert.equal(sc.peers.length, 0);
    // No retry loop against a full room, and the two others are untouched.
    assert.equal(sc.signaling, 'failed');
    await connectedPeers(a, 1);
    await connectedPeers(b, 1);
    await closeAll([a, b, c]);
  });
});

describe('capacity-4 room', () => {
  const server = t.server(['--max-peers', '4']);

  it('three pages form a mesh: each has two connected peers and decodes both', async () => {
    const room = uniqueRoom('mesh');
    const pages = [];
    for (const name of ['One', 'Two', 'Three']) {
      const p = await t.open(`${server.url}/r/${room}?name=${name}&mesh=1`);
      await until(p, () => window.webcall?.call.state === 'in-call');
      pages.push(p);
    }
    const ids = await Promise.all(pages.map((p) => p.evaluate(() => window.webcall.call.id)));
    for (const [i, p] of pages.entries()) {
      const peers = await connectedPeers(p, 2, 30000);
      assert.deepEqual([...peers].sort(), ids.filter((_, j) => j !== i).sort());
      for (const id of peers) await decodesVideoFrom(p, id, 5, 30000);
      assert.equal(await p.textContent('#people'), '3');
    }
    await screenshot(pages[0], 'mesh-3.png');
    await closeAll(pages);
  });
});

describe('start page', () => {
  const server = t.server();

  it('suggests a random room, refuses a bad name, and joins the call with the typed name', async () => {
    const p = await t.open(`${server.url}/`);
    const suggested = await p.inputValue('#room');
    assert.match(suggested, /^[A-Za-z0-9_-]{1,64}$/);
    await p.fill('#name', 'Dana');
    await screenshot(p, 'home.png');
    await p.fill('#room', 'no spaces!');
    await p.click('button[type=submit]');
    assert.ok(await p.isVisible('#room-error'));
    assert.equal(new URL(p.url()).pathname, '/');
    await p.click('#shuffle');
    const room = await p.inputValue('#room');
    assert.notEqual(room, 'no spaces!');
    await Promise.all([p.waitForURL(`**/r/${room}?name=Dana`), p.click('button[type=submit]')]);
    // The pre-join screen has the name from the start page.
    await until(p, () => document.body.dataset.phase === 'prejoin');
    assert.equal(await p.inputValue('#pj-name'), 'Dana');
    await passPrejoin(p);
    await until(p, () => window.webcall?.call.state === 'in-call');
    assert.equal(await p.textContent('#room-name'), room);
    assert.match(await p.textContent('.tile.local .name'), /Dana/);
    await screenshot(p, 'alone-in-room.png');
    await p.context().close();
  });
});

describe('links that cannot work as they are', () => {
  const server = t.server();

  it('a bad room in the URL gets the page (status 400) with the rule and a room that works', async () => {
    const p = await t.open(`${server.url}/`, { join: false });
    const resp = await p.goto(`${server.url}/r/bad%20room!?name=Eve`);
    assert.equal(resp?.status(), 400);
    await until(p, () => document.querySelector('#overlay')?.dataset.kind === 'bad-room-name' && !document.querySelector('#overlay').hidden);
    assert.match(await p.textContent('#overlay-title'), /room name is not valid/i);
    assert.match(await p.textContent('#overlay-text'), /letters, digits/);
    await screenshot(p, 'bad-room.png');
    await Promise.all([p.waitForURL('**/r/bad-room?name=Eve'), p.click('#overlay-actions button.primary')]);
    await passPrejoin(p);
    await until(p, () => window.webcall?.call.state === 'in-call');
    assert.equal(await p.textContent('#room-name'), 'bad-room');
    await p.context().close();
  });

  it('a page on a non-secure origin (a LAN address over http) says how to fix it', async () => {
    // lan.test resolves to loopback; http://lan.test is not a secure context (only localhost is), as a LAN IP.
    const browser = await launchBrowser([`--host-resolver-rules=MAP lan.test 127.0.0.1`]);
    try {
      const p = await openPage(browser, `http://lan.test:${server.port}/r/${uniqueRoom('lan')}`, { join: false, permissions: [] });
      await until(p, () => document.querySelector('#overlay')?.dataset.kind === 'insecure');
      assert.match(await p.textContent('#overlay-title'), /secure connection/i);
      const text = await p.textContent('#overlay-text');
      assert.match(text, /https:\/\//);
      assert.match(text, /--tls-self-signed/);
      await screenshot(p, 'insecure-origin.png');
    } finally {
      await browser.close();
    }
  });
});

describe('TLS port', () => {
  const server = t.server(['--tls-self-signed']);

  it('http:// on the TLS port redirects to https:// and the call page works there', async () => {
    assert.match(server.url, /^https:/);
    const room = uniqueRoom('tls');
    const plain = `http://127.0.0.1:${server.port}/r/${room}?name=Plain`;
    const p = await t.open(plain, { ignoreHTTPSErrors: true });
    assert.equal(p.url(), `https://127.0.0.1:${server.port}/r/${room}?name=Plain`);
    await until(p, () => window.webcall?.call.state === 'in-call');
    await p.context().close();
  });
});

describe('joining without local media', () => {
  const server = t.server();

  it('camera denied: joins audio-only with a clear message; the other side gets its audio', async () => {
    const room = uniqueRoom('nocam');
    const a = await t.open(`${server.url}/r/${room}?name=Cam`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=NoCam`, {
      setup: (ctx) =>
        ctx.addInitScript(() => {
          const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
          navigator.mediaDevices.getUserMedia = async (c) => {
            if (c && c.video) throw new DOMException('Permission denied', 'NotAllowedError');
            return real(c);
          };
        }),
    });
    const [aId] = await connectedPeers(b, 1);
    const [bId] = await connectedPeers(a, 1);
    const banner = await until(b, () => {
      const el = document.querySelector('#banner');
      return el && !el.hidden && el.dataset.kind === 'media' ? el.textContent : false;
    });
    assert.match(banner, /camera/i);
    assert.match(banner, /denied/i);
    assert.match(banner, /audio only/i);
    // B still sees A, and A gets B's audio (and shows B's avatar: no video).
    await decodesVideoFrom(b, aId);
    await screenshot(b, 'camera-denied.png');
    await until(a, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.video === 'off', bId);
    await until(
      a,
      async (id) => {
        let n = 0;
        (await window.webcall.call.peers.get(id).pc.getStats()).forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'audio') n = s.packetsReceived ?? 0;
        });
        return n > 20;
      },
      bId,
    );
    await closeAll([a, b]);
  });

  it('?audio=0&video=0 joins receive-only and still sees and hears the other side', async () => {
    const room = uniqueRoom('recv');
    const a = await t.open(`${server.url}/r/${room}?name=Sender`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=Watcher&audio=0&video=0`);
    const [aId] = await connectedPeers(b, 1);
    await connectedPeers(a, 1);
    const sb = await snapshot(b);
    assert.deepEqual(sb.media, { type: 'media', audio: false, video: false, screen: false });
    await decodesVideoFrom(b, aId);
    await closeAll([a, b]);
  });

  it('a browser without WebRTC gets the unsupported-browser message', async () => {
    const p = await t.open(`${server.url}/r/${uniqueRoom('old')}`, {
      join: false,
      permissions: [],
      setup: (ctx) =>
        ctx.addInitScript(() => {
          delete window.RTCPeerConnection;
        }),
    });
    await until(p, () => document.querySelector('#overlay')?.dataset.kind === 'unsupported');
    assert.match(await p.textContent('#overlay-text'), /WebRTC/);
    await p.context().close();
  });
});
