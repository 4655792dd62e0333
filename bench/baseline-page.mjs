// The zero-cost baseline of bench/browser.mjs and bench/browser-trace.mjs: the same media and peer connection
// set-up as web/lib/call.js, signaled over a BroadcastChannel between two pages of one browser context (no server,
// no network hop). Runs inside the page (page.evaluate), so it uses nothing from this module's scope. Pages must
// define window.__mark; window.__ev (the trace's event log) is optional. `variant` adds what webcall's pages have
// (diagnostics only, never in the benchmark): dc, a negotiated data channel; video, both videos shown.
export const BASELINE_PAGE = async ({ role, room, variant = {} }) => {
  const ev = window.__ev ?? (() => {});
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: true,
    video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
  });
  const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle' });
  for (const track of stream.getTracks()) pc.addTransceiver(track, { direction: 'sendrecv', streams: [stream] });
  // Diagnostic variants (never in the benchmark): what webcall's pages have that these do not.
  if (variant.dc) pc.createDataChannel('chat', { negotiated: true, id: 0, ordered: true });
  if (variant.video) {
    const v = document.createElement('video');
    Object.assign(v, { autoplay: true, muted: true, playsInline: true, srcObject: stream });
    v.style.width = '640px';
    document.body.append(v);
    pc.ontrack = (e) => {
      if (e.track.kind !== 'video') return;
      const r = document.createElement('video');
      Object.assign(r, { autoplay: true, muted: true, playsInline: true, srcObject: e.streams[0] ?? new MediaStream([e.track]) });
      r.style.width = '640px';
      document.body.append(r);
    };
  }
  const ch = new BroadcastChannel(`bench-${room}`);
  pc.onicecandidate = (e) => { ev('bc> candidate'); ch.postMessage({ candidate: e.candidate ? e.candidate.toJSON() : null }); };
  ch.onmessage = async ({ data }) => {
    ev('bc< ' + (data.hello ? 'hello' : data.sdp ? data.sdp.type : 'candidate'));
    if (data.hello && role === 'A') {
      await pc.setLocalDescription();
      ch.postMessage({ sdp: pc.localDescription.toJSON() });
    } else if (data.sdp) {
      if (data.sdp.type === 'offer') window.__mark('offer');
      await pc.setRemoteDescription(data.sdp);
      if (data.sdp.type === 'offer') {
        await pc.setLocalDescription();
        window.__mark('answer');
        ch.postMessage({ sdp: pc.localDescription.toJSON() });
      }
    } else if (data.candidate) {
      await pc.addIceCandidate(data.candidate);
    }
  };
  window.__go = () => {
    window.__mark('join');
    ch.postMessage({ hello: true });
  };
};
