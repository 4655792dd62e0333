// Calls survive a page reload and a server restart.
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { connectedPeers, decodesVideoFrom, e2e, ownId, screenshot, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

describe('resilience', () => {
  const server = t.server();

  /** Two pages in a fresh room, connected. */
  async function pair(prefix) {
    const room = uniqueRoom(prefix);
    const a = await t.open(`${server.url}/r/${room}?name=A`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=B`);
    await connectedPeers(a, 1);
    await connectedPeers(b, 1);
    return [a, b];
  }

  it('reloading one page mid-call re-establishes the call', async () => {
    const [a, b] = await pair('reload');
    const oldA = await ownId(a);
    await a.reload();
    await until(a, () => window.webcall?.call.state === 'in-call');
    const newA = await ownId(a);
    assert.notEqual(newA, oldA);
    // B saw the old A leave (bye on pagehide) and the new one arrive: exactly one peer, the new A.
    const [peerOfB] = await connectedPeers(b, 1);
    assert.equal(peerOfB, newA);
    const [peerOfA] = await connectedPeers(a, 1);
    assert.equal(peerOfA, await ownId(b));
    await decodesVideoFrom(b, newA);
    await decodesVideoFrom(a, peerOfA);
    await Promise.all([a.context().close(), b.context().close()]);
  });

  it('killing and restarting the server: both pages reconnect and call again without a reload', async () => {
    const [a, b] = await pair('restart');
    const before = { a: await ownId(a), b: await ownId(b) };
    // Marks that survive only if the pages are not reloaded.
    await a.evaluate(() => (window.__noReload = true));
    await b.evaluate(() => (window.__noReload = true));

    await server.kill();
    for (const p of [a, b]) {
      await until(p, () => {
        const el = document.querySelector('#banner');
        return el && !el.hidden && el.dataset.kind === 'reconnecting' && /reconnecting/i.test(el.textContent);
      });
    }
    await screenshot(a, 'reconnecting.png');
    await server.restart();

    // The new server does not know the old sessions: fresh ids, new peer connections.
    const [peerOfA] = await connectedPeers(a, 1, 30000);
    const [peerOfB] = await connectedPeers(b, 1, 30000);
    const after = { a: await ownId(a), b: await ownId(b) };
    assert.notEqual(after.a, before.a);
    assert.notEqual(after.b, before.b);
    assert.equal(peerOfA, after.b);
    assert.equal(peerOfB, after.a);
    await decodesVideoFrom(a, peerOfA);
    await decodesVideoFrom(b, peerOfB);
    assert.equal(await a.evaluate(() => window.__noReload), true);
    assert.equal(await b.evaluate(() => window.__noReload), true);
    await until(a, () => document.querySelector('#banner').hidden);
    await Promise.all([a.context().close(), b.context().close()]);
  });
});
