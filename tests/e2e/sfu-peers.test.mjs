// SFU rooms with native peers: one Chromium page plus six `webcall peer --sfu` in one room (`--topology sfu`); the
// page decodes several of them over its one connection to the server, and the native peers record the page's video.
// Then ICE-TCP: with UDP to the media port dropped in this namespace (nftables), two pages still reach the SFU over
// TCP on the same port number (RFC 6544) and decode each other.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { decodesOverSfu, e2e, ownId, startPeer, startServer, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

/** Frames on the page's SFU connection are enough here (no tile check), within 60 s: six native peers load the machine. */
const SFU_PEERS_WAIT = { tile: false, moved: false, timeout: 60000 };

/** The protocol of the page's selected candidate pair to the SFU (`udp`/`tcp`), once there is one. */
const sfuPairProtocol = (page) =>
  until(page, async () => {
    const pc = window.webcall.call.sfu?.pc;
    if (!pc) return null;
    let proto = null;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        const pair = stats.get(s.selectedCandidatePairId);
        proto = stats.get(pair?.localCandidateId)?.protocol ?? null;
      }
    });
    return proto;
  }, undefined, 30000);

/** @param {string} ws @param {string} room @param {string} name @param {string[]} [extra] */
const nativePeer = (ws, room, name, extra = []) =>
  startPeer(['--server', ws, '--room', room, '--name', name, '--sfu', '--send', 'testsrc', '--size', '320x180',
    '--ip', '127.0.0.1', '--stats-every', '1s', ...extra]);

describe('SFU room: a page and six native peers', () => {
  const server = t.server(['--topology', 'sfu']);
  const room = uniqueRoom('sfu6');
  /** @type {ReturnType<typeof startPeer>[]} */
  const peers = [];
  /** @type {string[]} */
  const dirs = [];

  after(() => {
    for (const p of peers) p.proc.kill('SIGKILL');
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it('the page decodes native peers over the SFU and they record the page', async () => {
    const ws = `ws://127.0.0.1:${server.port}/ws`;
    for (let i = 0; i < 6; i++) {
      const dir = mkdtempSync(path.join(os.tmpdir(), `webcall-sfu6-${i}-`));
      dirs.push(dir);
      peers.push(nativePeer(ws, room, `N${i}`, ['--record', dir]));
    }
    const nativeIds = [];
    for (const p of peers) nativeIds.push((await p.waitLine(/^joined room /)).split(' as ')[1].trim());
    const page = await t.open(`${server.url}/r/${room}?name=Browser&sfu=1`);
    await until(page, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 60000);
    const pageId = await ownId(page);
    // Several of the six, not all: decoding six streams on a loaded 2-core machine is slow, not wrong.
    for (const id of nativeIds.slice(0, 3)) await decodesOverSfu(page, id, SFU_PEERS_WAIT);
    // Each native peer receives the page's video through the SFU and records it.
    for (const p of peers) await p.waitLine(new RegExp(`^peer ${pageId} recording \\d+x\\d+ to `), 60000);
    for (const p of peers) await p.waitLine(new RegExp(`^stats peer=${pageId} .*pair="sfu" frames_in=[1-9]`), 60000);
    // And every native peer gets the five others.
    for (const [i, p] of peers.entries()) {
      for (const id of nativeIds.filter((_, j) => j !== i)) {
        await p.waitLine(new RegExp(`^stats peer=${id} .*pair="sfu" frames_in=[1-9]`), 60000);
      }
    }
    for (const d of dirs) assert.ok(readdirSync(d).some((f) => f.endsWith(`${pageId}.ivf`)), `a recording of the page in ${d}`);
  });
});

describe('SFU over ICE-TCP when UDP is blocked', () => {
  // A media port of our own, so that the rule drops only this server's UDP (TURN off: no relay around it).
  const mediaPort = 20000 + Math.floor(Math.random() * 20000);
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  const table = `webcall_sfu_tcp_${process.pid}`;
  const nft = (/** @type {string[]} */ ...args) => execFileSync('nft', args, { stdio: 'pipe' });

  before(async () => {
    server = await startServer({ args: ['--topology', 'sfu', '--no-turn', '--media-listen', `127.0.0.1:${mediaPort}`] });
    // Inside this test's own network namespace only (assertLoopbackOnly ran in e2e()'s before hook).
    nft('add', 'table', 'inet', table);
    nft('add', 'chain', 'inet', table, 'out', '{ type filter hook output priority 0; }');
    nft('add', 'rule', 'inet', table, 'out', 'udp', 'dport', String(mediaPort), 'drop');
  });

  after(async () => {
    await server?.kill();
    try {
      nft('delete', 'table', 'inet', table);
    } catch {
      // Not made (nft failed in before): nothing to remove.
    }
  });

  it('two pages reach the SFU over TCP and decode each other', async () => {
    const room = uniqueRoom('sfutcp');
    const page = await t.open(`${server.url}/r/${room}?name=Browser&sfu=1`);
    await until(page, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 60000);
    assert.equal(await sfuPairProtocol(page), 'tcp');
    const other = await t.open(`${server.url}/r/${room}?name=Other&sfu=1`);
    await until(other, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 60000);
    assert.equal(await sfuPairProtocol(other), 'tcp');
    await decodesOverSfu(page, await ownId(other), SFU_PEERS_WAIT);
    await decodesOverSfu(other, await ownId(page), SFU_PEERS_WAIT);
  });
});
