// A browser call forced through webcall's own TURN relay (?relay=1). Skipped (with the reason) while `webcall
// serve` does not offer a turn: server in welcome.iceServers.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { ROOT, connectedPeers, decodesVideoFrom, e2e, startServer, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

const BINARY = process.env.WEBCALL_BIN ?? path.join(ROOT, 'target/debug/webcall');

/** A TCP port free right now on 127.0.0.1 (TURN listens on UDP and TCP of the same port). */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const help = (() => {
  try {
    return execFileSync(BINARY, ['serve', '--help'], { encoding: 'utf8' });
  } catch {
    return '';
  }
})();
const hasTurnFlags = help.includes('--turn-listen');

describe('relay-only call through the built-in TURN server', () => {
  let server;
  let turnUrls = [];

  before(async () => {
    assert.ok(hasTurnFlags, 'webcall serve must have --turn-listen');
    const turnPort = await freePort();
    const args = ['--turn-listen', `127.0.0.1:${turnPort}`];
    // Relaying to loopback peers is refused by default (it would expose the server's own services).
    args.push('--turn-allow-peer', '127.0.0.0/8');
    server = await startServer({ args });
    const probe = await t.open(`${server.url}/r/${uniqueRoom('probe')}?audio=0&video=0`);
    await until(probe, () => window.webcall?.call.state === 'in-call');
    turnUrls = await probe.evaluate(() =>
      window.webcall.signaling.iceServers.flatMap((s) => [s.urls].flat()).filter((u) => /^turns?:/.test(u)),
    );
    await probe.context().close();
  });

  after(async () => {
    await server?.kill();
  });

  it('both sides select a relay candidate pair and decode video', async () => {
    assert.ok(turnUrls.length > 0, 'welcome.iceServers carries turn: URLs');
    const room = uniqueRoom('relay');
    const a = await t.open(`${server.url}/r/${room}?name=A&relay=1`);
    await until(a, () => window.webcall?.call.state === 'in-call');
    const b = await t.open(`${server.url}/r/${room}?name=B&relay=1`);
    const [bId] = await connectedPeers(a, 1, 30000);
    const [aId] = await connectedPeers(b, 1, 30000);
    for (const [page, peer] of [
      [a, bId],
      [b, aId],
    ]) {
      const stats = await until(page, (id) => {
        const s = window.webcall.call.peers.get(id)?.stats;
        return s && s.pairType ? s : false;
      }, peer);
      assert.equal(stats.pairType, 'relay', JSON.stringify(stats));
      await decodesVideoFrom(page, peer);
    }
  });
});
