// `webcall peer` (native, str0m) and a Chromium page in one room: the page decodes the peer's VP8 test pattern and
// its Opus tone, the peer records the page's video to IVF, and chat goes both ways between stdin/stdout and the page.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { connectedPeers, decodesVideoFrom, e2e, startPeer, startServer, uniqueRoom, until } from './helpers.mjs';

const t = e2e();

/** Frames of a VP8 IVF file, after checking its header. */
function ivfFrames(file) {
  const b = readFileSync(file);
  assert.equal(b.subarray(0, 4).toString(), 'DKIF');
  assert.equal(b.subarray(8, 12).toString(), 'VP80');
  let o = 32;
  let n = 0;
  while (o + 12 <= b.length) {
    const size = b.readUInt32LE(o);
    assert.ok(size > 0 && o + 12 + size <= b.length, `frame ${n} fits`);
    if (n === 0) assert.equal(b[o + 12] & 1, 0, 'the recording starts with a keyframe');
    o += 12 + size;
    n += 1;
  }
  assert.equal(b.readUInt32LE(24), n, 'frame count in the header');
  return n;
}

describe('native peer and browser', () => {
  let server;
  let page;
  let peer;
  let dir;
  let nativeId = '';

  before(async () => {
    server = await startServer();
    dir = mkdtempSync(path.join(os.tmpdir(), 'webcall-native-'));
    const room = uniqueRoom('native');
    const ws = `ws://127.0.0.1:${server.port}/ws`;
    peer = startPeer(['--server', ws, '--room', room, '--name', 'Native', '--send', 'testsrc', '--size', '320x180',
      '--record', dir, '--chat', '--ip', '127.0.0.1', '--stats-every', '1s']);
    await peer.waitLine(/^joined room /);
    page = await t.open(`${server.url}/r/${room}?name=Browser`);
  });

  after(async () => {
    peer?.proc.kill('SIGKILL');
    await server?.kill();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('the page connects to the native peer and decodes its VP8', async () => {
    [nativeId] = await connectedPeers(page, 1, 30000);
    await peer.waitLine(/^peer \S+ connected$/);
    await decodesVideoFrom(page, nativeId, 30, 30000);
  });

  it('the page receives and decodes the native peer’s Opus audio', async () => {
    // Packets arrive, the decoder turns them into samples, and the samples carry the tone (not silence).
    const audio = (id) =>
      page.evaluate(async (id) => {
        const peer = window.webcall.call.peers.get(id);
        let r = null;
        (await peer?.pc.getStats())?.forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'audio') r = s;
        });
        return r && { packets: r.packetsReceived ?? 0, samples: r.totalSamplesReceived ?? 0, energy: r.totalAudioEnergy ?? 0, codec: r.codecId };
      }, id);
    const poll = async (what, ok) => {
      const deadline = Date.now() + 30000;
      for (;;) {
        const a = await audio(nativeId);
        if (a && ok(a)) return a;
        if (Date.now() > deadline) throw new Error(`${what}: ${JSON.stringify(a)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const start = await poll('no inbound audio stream from the native peer', () => true);
    // One second of 20 ms packets and 48 kHz samples more than at the start.
    const later = await poll(`audio from the native peer did not grow from ${JSON.stringify(start)}`, (a) =>
      a.packets >= start.packets + 50 && a.samples >= start.samples + 48000 && a.energy > start.energy);
    const codec = await page.evaluate(async ({ id, codecId }) => {
      let mime = '';
      (await window.webcall.call.peers.get(id).pc.getStats()).forEach((s) => {
        if (s.id === codecId) mime = s.mimeType;
      });
      return mime;
    }, { id: nativeId, codecId: later.codec });
    assert.equal(codec.toLowerCase(), 'audio/opus');
  });

  it('the native peer records the page’s video and receives its audio', async () => {
    await peer.waitLine(/^peer \S+ recording \d+x\d+ to /);
    await peer.waitLine(/^stats peer=\S+ .*frames_in=([3-9]\d|\d{3,})/, 30000);
    await peer.waitLine(/^stats peer=\S+ .*audio_in=([5-9]\d|\d{3,})/, 30000);
  });

  it('chat goes both ways', async () => {
    await peer.waitLine(/^peer \S+ chat open$/);
    await page.click('#btn-chat');
    await page.fill('#chat-input', 'hello native');
    await page.press('#chat-input', 'Enter');
    await peer.waitLine(/^chat Browser: hello native$/);
    peer.proc.stdin.write('hello browser\n');
    await until(page, () => [...document.querySelectorAll('#chat-log li.them')].some((li) => li.textContent.includes('hello browser')));
    assert.match(await page.textContent('#chat-log li.them'), /Native/);
  });

  it('leaves with exit code 0 and a playable recording', async () => {
    peer.proc.kill('SIGTERM');
    assert.equal(await peer.exited, 0, `${peer.lines.join('\n')}\n${peer.stderr()}`);
    const files = readdirSync(dir).filter((f) => f.endsWith('.ivf'));
    assert.equal(files.length, 1, files.join(','));
    assert.ok(ivfFrames(path.join(dir, files[0])) >= 30);
    await until(page, () => window.webcall.snapshot().peers.length === 0);
  });
});
