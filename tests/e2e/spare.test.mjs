// The web client's spare peer connection: built while idle after the welcome, with our offer already set (primed),
// taken by the next hello (the call works on it: media both ways, the negotiated chat channel), rebuilt after the
// use, dropped on hang-up. A newcomer's spare (built before its welcome) is not primed: it answers.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connectedPeers, decodesVideoFrom, e2e, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

describe('spare peer connection', () => {
  const server = t.server();
  /** @type {import('playwright-core').Page} */
  let alice;
  /** @type {import('playwright-core').Page} */
  let bob;

  it('the first peer to arrive is called on the spare, which has the welcome’s ICE servers', async () => {
    const room = uniqueRoom('spare');
    alice = await t.open(`${server.url}/r/${room}?name=Alice`);
    await until(alice, () => window.webcall?.call.state === 'in-call' && !!window.webcall.call.spare);
    // Primed: our offer is set on it (audio, video and the chat channel), its candidates are held for the peer.
    await until(alice, () => window.webcall.call.spare.pc.signalingState === 'have-local-offer');
    assert.ok(
      await alice.evaluate(() => {
        const sdp = window.webcall.call.spare.pc.localDescription?.sdp ?? '';
        return ['m=audio', 'm=video', 'm=application'].every((m) => sdp.includes(m));
      }),
    );
    assert.ok(
      await alice.evaluate(() => {
        const { call, signaling } = window.webcall;
        // @ts-ignore
        window.__spare = call.spare.pc;
        return call.spare.iceKey === JSON.stringify(signaling.iceServers) && call.spare.forId === call.id;
      }),
    );
    bob = await t.open(`${server.url}/r/${room}?name=Bob`);
    const [bobId] = await connectedPeers(alice, 1);
    const [aliceId] = await connectedPeers(bob, 1);
    // @ts-ignore
    assert.ok(await alice.evaluate((id) => window.webcall.call.peers.get(id).pc === window.__spare, bobId));
    // Bob answered Alice's offer (on his spare from before the welcome, which is not primed).
    assert.equal(await bob.evaluate((id) => window.webcall.call.peers.get(id).pc.localDescription?.type, aliceId), 'answer');
    await decodesVideoFrom(alice, bobId);
    await decodesVideoFrom(bob, aliceId);
    // The chat channel (negotiated, id 0) of the spare opens and carries messages.
    await until(alice, (id) => window.webcall.call.peers.get(id)?.dc.readyState === 'open', bobId);
    await bob.evaluate(() => {
      // @ts-ignore
      window.__chat = [];
      // @ts-ignore
      window.webcall.call.addEventListener('chat', (e) => window.__chat.push(e.detail.text));
    });
    await alice.evaluate(() => window.webcall.call.sendChat('on the spare'));
    // @ts-ignore
    await until(bob, () => window.__chat.includes('on the spare'));
  });

  it('a new spare is built after the use, and dropped on hang-up', async () => {
    // @ts-ignore
    await until(alice, () => !!window.webcall.call.spare && window.webcall.call.spare.pc !== window.__spare);
    await until(alice, () => window.webcall.call.spare.pc.signalingState === 'have-local-offer');
    const closed = await alice.evaluate(() => {
      const spare = window.webcall.call.spare;
      window.webcall.call.hangUp();
      return window.webcall.call.spare === null && spare.pc.signalingState === 'closed';
    });
    assert.ok(closed);
  });
});
