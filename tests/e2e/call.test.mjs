// Two browsers in one room: connection, video both ways, chat, mute, screen share, stats, hang-up, screenshots.
import { before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import {
  connectedPeers,
  decodesVideoFrom,
  e2e,
  fullStatsPanel,
  ownId,
  screenshot,
  snapshot,
  uniqueRoom,
  until,
} from './helpers.mjs';

const t = e2e();

describe('two-party call', () => {
  const server = t.server();
  /** @type {import('playwright-core').Page} */
  let alice;
  /** @type {import('playwright-core').Page} */
  let bob;
  let aliceId = '';
  let bobId = '';

  before(async () => {
    const room = uniqueRoom('duo');
    alice = await t.open(`${server.url}/r/${room}?name=Alice`);
    await until(alice, () => window.webcall?.call.state === 'in-call');
    bob = await t.open(`${server.url}/r/${room}?name=Bob`);
  });

  it('both pages connect and decode each other’s video', async () => {
    [bobId] = await connectedPeers(alice, 1);
    [aliceId] = await connectedPeers(bob, 1);
    assert.equal(await ownId(alice), aliceId);
    assert.equal(await ownId(bob), bobId);
    await decodesVideoFrom(alice, bobId);
    await decodesVideoFrom(bob, aliceId);
    // Names travel with hello / welcome.
    assert.equal(await alice.textContent(`.tile[data-peer="${bobId}"] .name`), 'Bob');
    assert.equal(await bob.textContent(`.tile[data-peer="${aliceId}"] .name`), 'Alice');
  });

  it('stats panel shows the selected candidate pair, rtt and bit rates', async () => {
    await alice.keyboard.press('s');
    const text = await fullStatsPanel(alice, bobId);
    assert.match(text, /lost\s+\d+ packets/);
    const s = (await snapshot(alice)).peers[0].stats;
    assert.equal(s.pairType, 'host');
    assert.ok(s.bitrateIn > 0 && s.bitrateOut > 0, JSON.stringify(s));
  });

  it('saves screenshots of the call', async () => {
    // Chat open on Alice's side for a fuller picture; stats on (from the previous test).
    await screenshot(alice, 'call-alice-stats.png');
    await alice.keyboard.press('s');
    await screenshot(bob, 'call-bob.png');
    // Phone-sized window: tiles stack, controls shrink.
    await bob.setViewportSize({ width: 390, height: 844 });
    await screenshot(bob, 'call-bob-phone.png');
    await bob.setViewportSize({ width: 1280, height: 800 });
  });

  it('chat goes both ways and is shown locally with name and time', async () => {
    await alice.click('#btn-chat');
    await alice.fill('#chat-input', 'Hello Bob 👋');
    await alice.press('#chat-input', 'Enter');
    await until(bob, () => [...document.querySelectorAll('#chat-log li.them')].some((li) => li.textContent.includes('Hello Bob 👋')));
    const bobSees = await bob.textContent('#chat-log li.them');
    assert.match(bobSees, /Alice/);
    assert.match(bobSees, /\d{1,2}:\d{2}/);
    assert.match(await alice.textContent('#chat-log li.me'), /You.*Hello Bob/s);
    // Unread badge on the closed chat.
    assert.equal(await bob.textContent('#chat-badge'), '1');

    await bob.click('#btn-chat');
    await bob.fill('#chat-input', 'Hi Alice');
    await bob.click('#chat-form button');
    await until(alice, () => [...document.querySelectorAll('#chat-log li.them')].some((li) => li.textContent.includes('Hi Alice')));
    assert.match(await alice.textContent('#chat-log li.them'), /Bob/);
    await screenshot(alice, 'call-alice-chat.png');
    await alice.click('#chat-close');
    await bob.click('#chat-close');
  });

  it('mute is visible on the other side, and unmute too', async () => {
    await alice.keyboard.press('m');
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.audio === 'off', aliceId);
    assert.equal((await snapshot(bob)).peers[0].remoteMedia.audio, false);
    // The muted microphone sends silence: Bob's inbound audio level drops to (about) zero.
    await until(bob, () => {
      const lvl = window.webcall.call.peers.values().next().value?.stats?.audioLevelIn;
      return typeof lvl === 'number' && lvl < 0.01;
    });
    assert.equal(await alice.getAttribute('#btn-mic', 'data-on'), 'false');
    await alice.keyboard.press('m');
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.audio === 'on', aliceId);
    await until(bob, () => (window.webcall.call.peers.values().next().value?.stats?.audioLevelIn ?? 0) > 0.01);
  });

  it('camera off shows the avatar on the other side; camera on brings video back', async () => {
    await alice.keyboard.press('c');
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.video === 'off', aliceId);
    assert.ok(await bob.isVisible(`.tile[data-peer="${aliceId}"] .avatar`));
    await alice.keyboard.press('c');
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.video === 'on', aliceId);
    await decodesVideoFrom(bob, aliceId);
  });

  it('screen share reaches the other side beside the camera, as a tile of its own', async () => {
    // Bob's inbound video streams: the screen travels with the RTP video-content-type extension (contentType
    // "screenshare"), the camera without it. Frames decoded per stream, keyed by its content type.
    const videoIn = async (id) => {
      /** @type {Record<string, number>} */
      const out = {};
      (await window.webcall.call.peers.get(id).pc.getStats()).forEach((s) => {
        if (s.type === 'inbound-rtp' && s.kind === 'video') {
          const k = s.contentType ?? 'camera';
          out[k] = Math.max(out[k] ?? 0, s.framesDecoded ?? 0);
        }
      });
      return out;
    };
    const before = await bob.evaluate(videoIn, aliceId);
    assert.deepEqual(Object.keys(before), ['camera']);

    await alice.click('#btn-screen');
    await until(alice, () => window.webcall.call.screenSharing, undefined, 10000);
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.screen === 'on', aliceId);
    // The screen's tile shows the screen, and it takes the stage.
    await until(bob, (id) => {
      const v = document.querySelector(`.tile[data-peer="${id}:screen"] video`);
      return v instanceof HTMLVideoElement && v.videoWidth > 0 && document.querySelector('#grid').dataset.layout === 'spotlight';
    }, aliceId);
    assert.match(await bob.textContent(`.tile[data-peer="${aliceId}:screen"] .name`), /Alice \(screen\)/);
    // Both streams are decoded at once: the camera goes on while the screen is shared.
    const during = await until(bob, `(${videoIn})(${JSON.stringify(aliceId)}).then((v) => (v.screenshare ?? 0) > 10 && v.camera > ${before.camera + 10} ? v : false)`);
    await until(bob, `(${videoIn})(${JSON.stringify(aliceId)}).then((v) => v.screenshare > ${during.screenshare} && v.camera > ${during.camera})`);
    await decodesVideoFrom(bob, aliceId);
    await screenshot(bob, 'call-bob-sees-screen.png');

    await alice.click('#btn-screen');
    await until(bob, (id) => document.querySelector(`.tile[data-peer="${id}"]`)?.dataset.screen === 'off', aliceId);
    await until(bob, (id) => !document.querySelector(`.tile[data-peer="${id}:screen"]`) && !document.querySelector('#grid').dataset.layout, aliceId);
    await decodesVideoFrom(bob, aliceId);
  });

  it('hang up makes the other page show the peer gone', async () => {
    await bob.keyboard.press('q');
    await until(bob, () => document.querySelector('#overlay')?.dataset.kind === 'ended' && !document.querySelector('#overlay').hidden);
    await until(alice, (id) => !document.querySelector(`.tile[data-peer="${id}"]`) && window.webcall.call.peers.size === 0, bobId);
    assert.equal(await alice.textContent('#people'), '1');
  });
});
