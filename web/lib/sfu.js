// @ts-check
/**
 * SFU rooms (docs/protocol.md, *SFU rooms*): one RTCPeerConnection to the server, which publishes our tracks and
 * receives everyone else's. The server addresses us as peer `sfu`; it renegotiates when participants come and go
 * (its offers carry `tracks`: which m-line, by `mid`, carries whose media). Perfect negotiation with the page as
 * the polite side. No DOM.
 *
 * Events of `SfuSession` (`CustomEvent`): `track` `{peer, track}` (a track of participant `peer` arrived),
 * `track-ended` `{peer, track}` (its m-line was stopped), `state` `{state}` (the connection state changed).
 *
 * Simulcast: our camera goes out as three VP8 layers (rids q, h, f at a quarter, half and full size); the server
 * forwards each subscriber the layer its tiles need, told by `view` messages ({@link SfuSession#reportViews}).
 */

/** The simulcast layers we publish, smallest first (docs/protocol.md, *Simulcast*). */
export const LAYERS = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/** The reserved peer id of the server's SFU. */
export const SFU_PEER = 'sfu';

export class SfuSession extends EventTarget {
  /**
   * @param {object} opts
   * @param {{send: (msg: object) => void}} opts.signaling
   * @param {RTCConfiguration} opts.config
   * @param {MediaStream} opts.localStream the stream our senders are tagged with
   * @param {{audio: MediaStreamTrack|null, video: MediaStreamTrack|null}} opts.tracks what we send
   */
  constructor({ signaling, config, localStream, tracks }) {
    super();
    this.signaling = signaling;
    this.pc = new RTCPeerConnection(config);
    /** @type {Map<string, {peer: string, kind: string}>} mid -> publisher, from the server's last offer */
    this.mapping = new Map();
    /** @type {Map<string, MediaStreamTrack>} mid -> the remote track received on it */
    this.received = new Map();
    this.makingOffer = false;
    this.closed = false;
    /** @type {Promise<void>} server messages are handled one after the other */
    this.queue = Promise.resolve();
    const pc = this.pc;
    // Publishing only on these two: the server sends others' media on m-lines of its own.
    this.audioTx = pc.addTransceiver(tracks.audio ?? 'audio', { direction: 'sendonly', streams: [localStream] });
    this.videoTx = addVideo(pc, tracks.video, localStream);
    /** @type {Map<MediaStreamTrack, {width: number, height: number}>} how large the page shows received tracks */
    this.views = new Map();
    /** @type {string} the last `view` sent (nothing is sent when it would not change) */
    this.lastView = '';
    pc.onnegotiationneeded = () => this.offer();
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && !candidate.candidate) return;
      this.signaling.send({ type: 'candidate', to: SFU_PEER, candidate: candidate ? candidate.toJSON() : null });
    };
    pc.ontrack = ({ track, transceiver }) => this.onTrack(track, transceiver.mid);
    pc.onconnectionstatechange = () =>
      this.dispatchEvent(new CustomEvent('state', { detail: { state: pc.connectionState } }));
  }

  /** @private */
  async offer() {
    if (this.closed) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      this.signaling.send({ type: 'offer', to: SFU_PEER, sdp: this.pc.localDescription?.sdp });
    } catch (e) {
      console.warn('sfu offer', e);
    } finally {
      this.makingOffer = false;
    }
  }

  /**
   * An `offer`/`answer` from `sfu`.
   * @param {any} msg
   */
  handle(msg) {
    this.queue = this.queue.then(() => this.handleNow(msg)).catch((e) => console.warn('sfu signal', e));
  }

  /** @private @param {any} msg */
  async handleNow(msg) {
    if (this.closed) return;
    const pc = this.pc;
    if (msg.type === 'offer') {
      if (Array.isArray(msg.tracks)) {
        this.mapping = new Map(msg.tracks.map((/** @type {any} */ t) => [String(t.mid), { peer: t.peer, kind: t.kind }]));
      }
      // Polite: an offer of ours that collides is rolled back (setRemoteDescription does it); the server ignored it
      // and `negotiationneeded` brings it again once stable.
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await pc.setLocalDescription();
      this.signaling.send({ type: 'answer', to: SFU_PEER, sdp: pc.localDescription?.sdp });
      this.reconcile();
      this.sendViews();
    } else if (msg.type === 'answer') {
      if (pc.signalingState !== 'have-local-offer') return;
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
    }
  }

  /** @private @param {MediaStreamTrack} track @param {string|null} mid */
  onTrack(track, mid) {
    const m = mid === null ? undefined : this.mapping.get(mid);
    if (!m || mid === null) return; // our own send-only m-lines, or not (yet) mapped
    this.received.set(mid, track);
    this.dispatchEvent(new CustomEvent('track', { detail: { peer: m.peer, track } }));
  }

  /** Tracks whose m-line the server stopped (participant left) end; mapped ones without a track event get one. */
  reconcile() {
    for (const [mid, track] of [...this.received]) {
      if (!this.mapping.has(mid)) {
        this.received.delete(mid);
        this.dispatchEvent(new CustomEvent('track-ended', { detail: { track } }));
      }
    }
    for (const t of this.pc.getTransceivers()) {
      if (t.mid && this.mapping.has(t.mid) && !this.received.has(t.mid) && !t.stopped) {
        this.onTrack(t.receiver.track, t.mid);
      }
    }
  }

  /**
   * How large the page shows received video tracks, in device pixels; `0×0` for a track it does not show (hidden,
   * on another page, the tab in the background). Tracks never reported get the server's default (the best layer).
   * @param {Map<MediaStreamTrack, {width: number, height: number}>} views
   */
  reportViews(views) {
    this.views = views;
    this.sendViews();
  }

  /** @private Sends `view` for the received video m-lines whose size is known, when it changed. */
  sendViews() {
    if (this.closed) return;
    const tracks = [];
    for (const [mid, track] of this.received) {
      const v = track.kind === 'video' ? this.views.get(track) : undefined;
      if (v) tracks.push({ mid, width: Math.round(v.width), height: Math.round(v.height) });
    }
    const msg = JSON.stringify(tracks);
    if (!tracks.length || msg === this.lastView) return;
    this.lastView = msg;
    this.signaling.send({ type: 'view', tracks });
  }

  /** What we send changed (mute, camera, screen share). */
  async updateSenders(/** @type {MediaStreamTrack|null} */ audio, /** @type {MediaStreamTrack|null} */ video) {
    await this.audioTx.sender.replaceTrack(audio);
    await this.videoTx.sender.replaceTrack(video);
  }

  close() {
    this.closed = true;
    const pc = this.pc;
    pc.onnegotiationneeded = pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
    pc.close();
  }
}

/**
 * Our video sender: three simulcast layers where the browser takes them, else one.
 * @param {RTCPeerConnection} pc @param {MediaStreamTrack|null} track @param {MediaStream} stream
 */
function addVideo(pc, track, stream) {
  try {
    return pc.addTransceiver(track ?? 'video', { direction: 'sendonly', streams: [stream], sendEncodings: LAYERS });
  } catch (e) {
    console.warn('no simulcast here, one layer', e);
    return pc.addTransceiver(track ?? 'video', { direction: 'sendonly', streams: [stream] });
  }
}

/**
 * A remote participant of an SFU room, shaped like a mesh `Peer` for the UI (id, name, remoteStream, pc, …):
 * its tracks come over the page's one connection to the server.
 */
export class SfuRemote {
  /**
   * @param {string} id
   * @param {string} name
   * @param {SfuSession} session
   * @param {() => void} onChange
   */
  constructor(id, name, session, onChange) {
    this.id = id;
    this.name = name;
    this.pc = session.pc;
    this.remoteStream = new MediaStream();
    this.remoteMedia = { audio: true, video: true, screen: false };
    /** @type {import('./stats.js').StatsSummary|null} */
    this.stats = null;
    this.polite = true;
    this.iceRestarts = 0;
    this.dc = { readyState: 'closed' };
    this.closed = false;
    this.onChange = onChange;
  }

  /** @param {MediaStreamTrack} track */
  addTrack(track) {
    for (const old of this.remoteStream.getTracks()) if (old.kind === track.kind) this.remoteStream.removeTrack(old);
    this.remoteStream.addTrack(track);
    track.onmute = track.onunmute = () => this.onChange();
    this.onChange();
  }

  /** @param {MediaStreamTrack} track */
  removeTrack(track) {
    if (!this.remoteStream.getTracks().includes(track)) return;
    this.remoteStream.removeTrack(track);
    this.onChange();
  }

  // The mesh Peer's interface, with nothing to do over the SFU.
  async updateSenders() {}
  /** @param {object} _msg */
  sendData(_msg) {}
  restartIce() {}
  /** A late peer-to-peer message of this participant (its side has not moved yet): nothing to do. */
  handleSignal() {}
  close() {
    this.closed = true;
  }
}
