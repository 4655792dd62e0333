// `webcall peer --relay` (native, str0m + its TURN client) and a Chromium page with ?relay=1 in one room: both
// sides gather only relay candidates on webcall's built-in TURN, the selected pair is relay on both, the page decodes
// the peer's VP8 and the peer records the page's video.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connectedPeers, decodesVideoFrom, e2e, startPeer, startServer, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

describe('native peer and browser, both relay-only', () => {
  let server;
  let page;
  let peer;
  let dir;

  before(async () => {
    // Relaying to loopback peers is refused by default; this test's peers are all on loopback.
    server = await startServer({ args: ['--turn-listen', '127.0.0.1:0', '--turn-allow-peer', '127.0.0.0/8'] });
    dir = mkdtempSync(path.join(os.tmpdir(), 'webcall-native-relay-'));
    const room = uniqueRoom('nrelay');
    peer = startPeer(['--server', `ws://127.0.0.1:${server.port}/ws`, '--room', room, '--name', 'Native', '--relay',
      '--send', 'testsrc', '--size', '320x180', '--record', dir, '--ip', '127.0.0.1', '--stats-every', '1s']);
    await peer.waitLine(/^joined room /);
    page = await t.open(`${server.url}/r/${room}?name=Browser&relay=1`);
  });

  after(async () => {
    peer?.proc.kill('SIGKILL');
    await server?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('both sides select a relay pair', async () => {
    const [nativeId] = await connectedPeers(page, 1, 30000);
    await peer.waitLine(/^peer \S+ local candidate relay 127\.0\.0\.1:\d+/);
    const line = await peer.waitLine(/^peer \S+ selected pair /);
    assert.match(line, / local=relay remote=relay$/, line);
    const stats = await until(page, (id) => {
      const s = window.webcall.call.peers.get(id)?.stats;
      return s && s.pairType ? s : false;
    }, nativeId);
    assert.equal(stats.pairType, 'relay', JSON.stringify(stats));
    await decodesVideoFrom(page, nativeId, 30, 30000);
  });

  it('the native peer records the page’s video through the relay', async () => {
    await peer.waitLine(/^stats peer=\S+ .*frames_in=([3-9]\d|\d{3,})/, 30000);
    peer.proc.kill('SIGTERM');
    assert.equal(await peer.exited, 0, peer.lines.join('\n'));
    const files = readdirSync(dir).filter((f) => f.endsWith('.ivf'));
    assert.equal(files.length, 1, files.join(','));
    assert.ok(statSync(path.join(dir, files[0])).size > 1000);
    assert.ok(!peer.lines.some((l) => / local candidate (host|srflx) /.test(l)), 'relay only');
  });
});
