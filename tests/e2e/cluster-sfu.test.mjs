// SFU rooms across a cluster (docs/cluster.md, *SFU rooms*): three `webcall serve --redis` nodes sharing one real
// redis-server, one page on each. The third join moves the room to the SFU of the third page's node, and every page
// decodes the others through it, whichever node its signaling goes to. When that node is killed (SIGKILL), the
// others are told (`topology` with `restart`), connect to the SFU of a live node and decode each other again.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { decodesOverSfu, e2e, ownId, startRedis, startServer, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

/** The SFU sessions of a node, from its /metrics. @param {string} url */
const sfuSessions = async (url) => {
  const text = await (await fetch(`${url}/metrics`)).text();
  return Number(/^webcall_sfu_sessions (\d+)/m.exec(text)?.[1] ?? NaN);
};

describe('an SFU room across cluster nodes', () => {
  /** @type {Awaited<ReturnType<typeof startRedis>>} */
  let redis;
  /** @type {Awaited<ReturnType<typeof startServer>>[]} */
  let nodes = [];
  /** @type {import('playwright-core').Page[]} */
  let pages = [];
  /** @type {string[]} */
  let ids = [];
  const room = uniqueRoom('span');

  before(async () => {
    redis = await startRedis();
    nodes = await Promise.all(
      ['n1', 'n2', 'n3'].map((id) => startServer({ args: ['--redis', redis.url, '--node-id', id, '--node-ttl', '1s'] })),
    );
  });
  after(async () => {
    await Promise.all(nodes.map((n) => n.kill()));
    redis?.kill();
  });

  it('pages on three nodes decode each other through one node’s SFU', async () => {
    for (const [i, n] of nodes.entries()) {
      pages.push(await t.open(`${n.url}/r/${room}?name=P${i}`));
      // One after the other: the third join moves the room to the SFU (of the third page's node).
      ids.push(await until(pages[i], () => window.webcall.call.state === 'in-call' && window.webcall.call.id));
    }
    for (const p of pages) await until(p, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 60000);
    for (const [i, p] of pages.entries()) {
      for (const [j, id] of ids.entries()) if (j !== i) await decodesOverSfu(p, id, { timeout: 60000 });
    }
    assert.deepEqual(await Promise.all(nodes.map((n) => sfuSessions(n.url))), [0, 0, 3], 'the media lives on n3 only');
    for (const p of pages) assert.deepEqual(p.errors, []);
  });

  it('when that node dies, the others’ media resumes through a live node', async () => {
    const [a, b] = pages;
    for (const p of [a, b]) {
      await p.evaluate(() => {
        // @ts-ignore
        window.__oldPc = window.webcall.call.sfu.pc;
      });
    }
    await nodes[2].kill();
    for (const p of [a, b]) {
      // A new connection to the SFU (the old one died with its node), and it connects.
      // @ts-ignore
      await until(p, () => window.webcall.call.sfu && window.webcall.call.sfu.pc !== window.__oldPc, undefined, 60000);
      await until(p, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 60000);
    }
    await decodesOverSfu(a, ids[1], { timeout: 60000 });
    await decodesOverSfu(b, ids[0], { timeout: 60000 });
    // The third page's participant left with its node.
    for (const p of [a, b]) await until(p, (id) => !window.webcall.call.peers.has(id), ids[2], 30000);
    assert.deepEqual(await Promise.all(nodes.slice(0, 2).map((n) => sfuSessions(n.url))), [2, 0], 'the media moved to n1');
    assert.equal(await ownId(a), ids[0], 'the page kept its session: only its SFU connection is new');
    for (const p of [a, b]) assert.deepEqual(p.errors, []);
  });
});
