// WHIP and WHEP with a client not written here: medooze's whip-whep (npm; by the author of RFC 9725) running in
// Chromium on another origin (so CORS is exercised). A WHIP publisher of Chromium's fake-camera test pattern appears
// in a room as a participant whose video the room's page decodes; a WHEP player decodes a page's video; DELETE
// makes the publisher leave. The refusals (content type, SDP, room name, auth) are checked over plain HTTP.
import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { assertLoopbackOnly, launchBrowser, openPage, sfuFramesFrom, startServer, uniqueRoom, until } from './helpers.mjs';

const WHIP_WHEP = path.dirname(createRequire(import.meta.url).resolve('whip-whep/whip.js'));

/** The tool page: loads the client library and exposes start functions. */
const TOOL_PAGE = `<!doctype html><meta charset="utf-8"><title>whip tool</title><video id="v" muted autoplay playsinline></video>
<script type="module">
import { WHIPClient } from '/whip.js';
import { WHEPClient } from '/whep.js';
// Every request the client makes, with its answer's status (trickle PATCHes happen behind its back).
window.requests = [];
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  const r = await realFetch(url, init);
  window.requests.push(\`\${init?.method ?? 'GET'} \${r.status}\`);
  return r;
};
window.publish = async (url, token, codec) => {
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 320, height: 240 } });
  const pc = new RTCPeerConnection();
  for (const track of stream.getTracks()) {
    const t = pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    // Only this codec, as OBS offers only H.264.
    const only = RTCRtpSender.getCapabilities('video').codecs.filter((c) => c.mimeType === codec && !/packetization-mode=0/.test(c.sdpFmtpLine ?? ''));
    if (codec && track.kind === 'video') t.setCodecPreferences(only);
  }
  const client = new WHIPClient();
  await client.publish(pc, url, token);
  window.whip = { pc, client };
  return client.resourceURL.href;
};
window.view = async (url, token) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('audio', { direction: 'recvonly' });
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.ontrack = (e) => {
    if (e.track.kind === 'video') document.getElementById('v').srcObject = new MediaStream([e.track]);
  };
  const client = new WHEPClient();
  await client.view(pc, url, token);
  window.whep = { pc, client };
  return client.resourceURL.href;
};
window.framesDecoded = async (pc) => {
  let n = 0;
  (await pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') n = Math.max(n, s.framesDecoded ?? 0);
  });
  return n;
};
// whip-whep 1.2.0 puts the restart answer's candidates into the SDP with Array#join() (commas between them), which
// breaks with more than one candidate (the SFU has a UDP and an ICE-TCP one): joined with nothing for that call.
window.restart = async () => {
  const join = Array.prototype.join;
  Array.prototype.join = function (sep) {
    return join.call(this, sep ?? '');
  };
  try {
    await window.whip.client.restart();
  } finally {
    Array.prototype.join = join;
  }
};
window.ready = true;
</script>`;

/** An HS256 join token, as `webcall token` makes. */
function mint(secret, room, name, permissions = ['join', 'publish']) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ room, name, exp: Math.floor(Date.now() / 1000) + 600, permissions })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** Serves the tool page and the library on its own origin (127.0.0.1, another port). */
async function startToolServer() {
  const server = http.createServer((req, res) => {
    const file = { '/whip.js': 'whip.js', '/whep.js': 'whep.js' }[req.url ?? ''];
    if (file) {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(readFileSync(path.join(WHIP_WHEP, file)));
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(TOOL_PAGE);
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', () => r(undefined)));
  const addr = /** @type {import('node:net').AddressInfo} */ (server.address());
  return { url: `http://127.0.0.1:${addr.port}/`, close: () => new Promise((r) => server.close(r)) };
}

/**
 * Waits until `read()` (a frame count) grows by more than `frames`.
 * @param {() => Promise<number>} read @param {string} what
 */
async function framesRise(read, what, frames = 10, timeout = 30000) {
  let start = await read();
  const deadline = Date.now() + timeout;
  for (;;) {
    const now = await read();
    if (start < 0) start = now;
    else if (now > start + frames) return;
    if (Date.now() > deadline) assert.fail(`${what}: frames decoded went from ${start} to ${now} only`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('WHIP and WHEP', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  /** @type {Awaited<ReturnType<typeof startToolServer>>} */
  let tools;
  /** @type {import('playwright-core').Browser} */
  let browser;

  before(async () => {
    assertLoopbackOnly();
    server = await startServer();
    tools = await startToolServer();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await tools?.close();
    await server?.kill();
  });

  it('a WHIP publisher is a participant whose test pattern the room page decodes; WHEP plays a page; DELETE leaves', async () => {
    const room = uniqueRoom('whip');
    const page = await openPage(browser, `${server.url}/r/${room}?name=Watcher&sfu=1`);
    await until(page, () => window.webcall?.call.state === 'in-call');

    // The page says where to point OBS.
    await page.click('#btn-more');
    await page.click('#m-broadcast');
    const info = await page.textContent('#overlay-text');
    const whipUrl = info?.match(/Server (\S+)/)?.[1];
    assert.equal(whipUrl, `${server.url}/whip/${room}?name=Stage`, info ?? '');
    assert.ok(info?.includes(`${server.url}/whep/${room}`), info ?? '');
    await page.click('#overlay-actions button:last-child');

    const tool = await openPage(browser, tools.url, { join: false });
    await until(tool, () => window.ready === true);
    const resource = await tool.evaluate((url) => window.publish(url), whipUrl.replace('name=Stage', 'name=OBS-test'));
    assert.match(resource, new RegExp(`^${server.url}/whip/${room}/[A-Za-z0-9]{24}$`));

    // The page moved to the SFU (a WHIP publisher needs it), sees the publisher by name and decodes its video.
    await until(page, () => window.webcall.call.sfu?.pc.connectionState === 'connected', undefined, 30000);
    await until(page, () => [...window.webcall.call.peers.values()].some((p) => p.name === 'OBS-test'), undefined, 30000);
    const whipId = await page.evaluate(() => [...window.webcall.call.peers.values()].find((p) => p.name === 'OBS-test').id);
    await framesRise(() => sfuFramesFrom(page, whipId), 'room page from the WHIP publisher');
    assert.equal(await tool.evaluate(() => window.whip.pc.connectionState), 'connected');
    assert.match(await (await fetch(`${server.url}/metrics`)).text(), /^webcall_whip_sessions 1$/m);
    // The client trickled its candidates with PATCH (If-Match: the ETag of the POST's answer) and was answered 204.
    await until(tool, () => window.requests.includes('PATCH 204'));
    assert.deepEqual(await tool.evaluate(() => window.requests.filter((r) => !r.endsWith(' 204'))), ['POST 201']);
    // An ICE restart (PATCH with If-Match: *) is answered 200 with new credentials; the media goes on.
    const firstUfrag = await tool.evaluate(() => window.whip.pc.remoteDescription.sdp.match(/a=ice-ufrag:(.*)\r\n/)[1]);
    await tool.evaluate(() => window.restart());
    assert.ok((await tool.evaluate(() => window.requests)).includes('PATCH 200'));
    assert.notEqual(await tool.evaluate(() => window.whip.pc.remoteDescription.sdp.match(/a=ice-ufrag:(.*)\r\n/)[1]), firstUfrag);
    // The media runs over the restarted ICE session: the selected pair's remote candidate has the server's new ufrag.
    await until(
      tool,
      async () => {
        const ufrag = window.whip.pc.remoteDescription.sdp.match(/a=ice-ufrag:(.*)\r\n/)[1];
        const stats = await window.whip.pc.getStats();
        let pair;
        stats.forEach((s) => s.type === 'transport' && (pair = stats.get(s.selectedCandidatePairId)));
        const remote = pair && stats.get(pair.remoteCandidateId);
        return window.whip.pc.connectionState === 'connected' && remote?.usernameFragment === ufrag;
      },
      undefined,
      20000,
    );
    await framesRise(() => sfuFramesFrom(page, whipId), 'room page from the WHIP publisher after an ICE restart');

    // WHEP: a player on another origin watches the page's participant (chosen by ?peer=).
    const pageId = await page.evaluate(() => window.webcall.call.id);
    const player = await openPage(browser, tools.url, { join: false });
    await until(player, () => window.ready === true);
    const watched = await player.evaluate((url) => window.view(url), `${server.url}/whep/${room}?peer=${pageId}`);
    assert.match(watched, new RegExp(`^${server.url}/whep/${room}/[A-Za-z0-9]{24}$`));
    await framesRise(() => player.evaluate(() => window.framesDecoded(window.whep.pc)), 'WHEP player from the page');
    await until(player, () => document.getElementById('v').videoWidth > 0);

    // Without ?peer= a player follows the active speaker (audio levels). The page's microphone is off: the WHIP
    // publisher (4:3) speaks. Then it falls silent and the page (16:9) speaks: the player switches to the page.
    const aspect = (p) => p.evaluate(() => {
      const v = document.getElementById('v');
      return v.videoHeight > 0 ? v.videoWidth / v.videoHeight : 0;
    });
    await page.evaluate(() => window.webcall.call.localStream.getAudioTracks().forEach((t) => (t.enabled = false)));
    const follower = await openPage(browser, tools.url, { join: false });
    await until(follower, () => window.ready === true);
    await follower.evaluate((url) => window.view(url), `${server.url}/whep/${room}`);
    await framesRise(() => follower.evaluate(() => window.framesDecoded(window.whep.pc)), 'WHEP player of the speaker');
    await until(follower, () => Math.abs(document.getElementById('v').videoWidth / document.getElementById('v').videoHeight - 4 / 3) < 0.05, undefined, 30000);
    await tool.evaluate(() => window.whip.pc.getSenders().forEach((s) => s.track?.kind === 'audio' && (s.track.enabled = false)));
    await page.evaluate(() => window.webcall.call.localStream.getAudioTracks().forEach((t) => (t.enabled = true)));
    const switchedBy = Date.now() + 30000;
    while (Math.abs((await aspect(follower)) - 16 / 9) > 0.05) {
      if (Date.now() > switchedBy) assert.fail(`the player did not switch to the page's video: aspect ${await aspect(follower)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    await framesRise(() => follower.evaluate(() => window.framesDecoded(window.whep.pc)), 'WHEP player after the switch');
    await follower.evaluate(() => window.whep.client.stop());

    // DELETE (the client's stop()) ends the publisher: the page gets its bye.
    await tool.evaluate(() => window.whip.client.stop());
    await until(page, (id) => !window.webcall.call.peers.has(id), whipId, 20000);
    const again = await fetch(resource, { method: 'PATCH', body: '', headers: { 'content-type': 'application/trickle-ice-sdpfrag' } });
    assert.equal(again.status, 404, 'the session is over');
    await player.evaluate(() => window.whep.client.stop());
    assert.equal((await tool.evaluate(() => window.requests)).at(-1), 'DELETE 200');
    assert.equal((await player.evaluate(() => window.requests)).at(-1), 'DELETE 200');
  });

  it('answers CORS preflights and refuses bad requests with a status and a sentence', async () => {
    const room = uniqueRoom('whip');
    const pre = await fetch(`${server.url}/whip/${room}`, {
      method: 'OPTIONS',
      headers: { origin: 'http://127.0.0.1:1', 'access-control-request-method': 'POST' },
    });
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get('access-control-allow-origin'), '*');
    assert.match(pre.headers.get('access-control-allow-methods') ?? '', /PATCH/);
    assert.match(pre.headers.get('access-control-expose-headers') ?? '', /Location/);

    const opened = await fetch(`${server.url}/whip/${room}`);
    assert.equal(opened.status, 405);
    assert.match(await opened.text(), /POST an SDP offer/);
    const post = (url, body, type = 'application/sdp') =>
      fetch(url, { method: 'POST', body, headers: { 'content-type': type } });
    let r = await post(`${server.url}/whip/${room}`, 'v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n', 'text/plain');
    assert.equal(r.status, 415);
    assert.match(await r.text(), /application\/sdp/);
    r = await post(`${server.url}/whip/${room}`, 'hello');
    assert.equal(r.status, 400);
    assert.match(await r.text(), /SDP/);
    r = await post(`${server.url}/whip/${room}`, 'v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n');
    assert.equal(r.status, 400, 'an offer without ICE credentials or fingerprint');
    assert.match(await r.text(), /SFU cannot use this offer/);
    r = await post(`${server.url}/whip/no%20spaces`, 'v=0\r\nm=video 9 X 96\r\n');
    assert.equal(r.status, 400);
    assert.match(await r.text(), /room name/);
    r = await post(`${server.url}/whep/${room}`, 'v=0\r\nm=video 9 X 96\r\n');
    assert.equal(r.status, 404, 'nothing to watch in an empty room');
    assert.match(await r.text(), /no call/);

    // A server without an SFU says so.
    const mesh = await startServer({ args: ['--topology', 'mesh'] });
    try {
      r = await post(`${mesh.url}/whip/${room}`, 'v=0\r\nm=video 9 X 96\r\n');
      assert.equal(r.status, 503);
      assert.match(await r.text(), /runs no SFU/);
    } finally {
      await mesh.kill();
    }
  });

  it('with --auth-secret, WHIP needs a Bearer token; an H.264-only publisher (as OBS) reaches the page', async () => {
    const secret = 'whip-test-secret';
    const secured = await startServer({ args: ['--auth-secret', secret] });
    try {
      const room = uniqueRoom('whip');
      const page = await openPage(browser, `${secured.url}/r/${room}?name=Watcher&sfu=1&token=${mint(secret, room, 'Watcher')}`);
      await until(page, () => window.webcall?.call.state === 'in-call');
      const tool = await openPage(browser, tools.url, { join: false });
      await until(tool, () => window.ready === true);
      // The token's name claim wins over ?name=.
      const token = mint(secret, room, 'Stage');
      await tool.evaluate(([url, token]) => window.publish(url, token, 'video/H264'), [`${secured.url}/whip/${room}?name=Other`, token]);
      await until(page, () => [...window.webcall.call.peers.values()].some((p) => p.name === 'Stage'), undefined, 30000);
      const id = await page.evaluate(() => [...window.webcall.call.peers.values()].find((p) => p.name === 'Stage').id);
      await framesRise(() => sfuFramesFrom(page, id), 'room page from the H.264 WHIP publisher');
      const codec = await page.evaluate(async () => {
        const stats = await window.webcall.call.sfu.pc.getStats();
        const codecs = new Map();
        stats.forEach((s) => s.type === 'codec' && codecs.set(s.id, s.mimeType));
        let found = [];
        stats.forEach((s) => s.type === 'inbound-rtp' && s.kind === 'video' && found.push(codecs.get(s.codecId)));
        return found;
      });
      assert.ok(codec.includes('video/H264'), `the page receives H.264: ${codec}`);
      // DELETE needs the same token; without it, 401.
      const resource = await tool.evaluate(() => window.whip.client.resourceURL.href);
      assert.equal((await fetch(resource, { method: 'DELETE' })).status, 401);
      await tool.evaluate(() => window.whip.client.stop());
      assert.equal((await tool.evaluate(() => window.requests)).at(-1), 'DELETE 200');

      const r = await fetch(`${secured.url}/whip/${uniqueRoom('whip')}`, {
        method: 'POST',
        body: 'v=0\r\nm=video 9 X 96\r\n',
        headers: { 'content-type': 'application/sdp' },
      });
      assert.equal(r.status, 401);
      assert.equal(r.headers.get('www-authenticate'), 'Bearer');
      assert.match(await r.text(), /webcall token/);
      const bad = await fetch(`${secured.url}/whip/${uniqueRoom('whip')}`, {
        method: 'POST',
        body: 'v=0\r\nm=video 9 X 96\r\n',
        headers: { 'content-type': 'application/sdp', authorization: 'Bearer not-a-token' },
      });
      assert.equal(bad.status, 401);
      assert.match(await bad.text(), /token/);
    } finally {
      await secured.kill();
    }
  });
});
