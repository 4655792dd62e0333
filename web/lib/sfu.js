// @ts-check
/**
 * SFU rooms (docs/protocol.md, *SFU rooms*): one RTCPeerConnection to the server, which publishes our tracks and
 * receives everyone else's. The server addresses us as peer `sfu`; it renegotiates when participants come and go
 * (its offers carry `tracks`: which m-line, by `mid`, carries whose media). Perfect negotiation with the page as
 * the polite side. No DOM.
 *
 * Events of `SfuSession` (`CustomEvent`): `track` `{peer, track, peerMid}` (a track of participant `peer` arrived;
 * `peerMid` is its m-line in the publisher's own connection, which tells camera from screen), `track-ended`
 * `{peer, track}` (its m-line was stopped), `state` `{state}` (the connection state changed), `offered` (an offer
 * of ours was set: our m-lines have their mids).
 *
 * Simulcast: our camera goes out as three VP8 layers (rids q, h, f at a quarter, half and full size); the server
 * forwards each subscriber the layer its tiles need, told by `view` messages ({@link SfuSession#reportViews}).
 */

import { MAX_CHAT_TEXT, cleanName } from './channel.js';

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
   * @param {boolean} [opts.publish] false (subscribe-only tokens): our m-lines are `inactive`, we only receive
   */
  constructor({ signaling, config, localStream, tracks, publish = true }) {
    super();
    this.signaling = signaling;
    this.pc = new RTCPeerConnection(config);
    /** @type {Map<string, {peer: string, kind: string, peerMid: string}>} mid -> publisher, from the server's last offer */
    this.mapping = new Map();
    /** @type {Map<string, MediaStreamTrack>} mid -> the remote track received on it */
    this.received = new Map();
    this.makingOffer = false;
    this.closed = false;
    /** @type {Promise<void>} server messages are handled one after the other */
    this.queue = Promise.resolve();
    const pc = this.pc;
    // Publishing only on these two: the server sends others' media on m-lines of its own.
    // A client offers first, so even a receive-only one has m-lines of its own to offer (inactive ones).
    const direction = publish ? 'sendonly' : 'inactive';
    this.audioTx = pc.addTransceiver(tracks.audio ?? 'audio', { direction, streams: [localStream] });
    this.videoTx = addVideo(pc, tracks.video, localStream, direction);
    /** @type {RTCRtpTransceiver|null} our screen share, on an m-line of its own (made at the first share) */
    this.screenTx = null;
    /** @type {(() => void)[]} waiting for our next offer to be set (its mids are known then) */
    this.offered = [];
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
      for (const f of this.offered.splice(0)) f();
      this.dispatchEvent(new CustomEvent('offered'));
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
        this.mapping = new Map(
          msg.tracks.map((/** @type {any} */ t) => [String(t.mid), { peer: t.peer, kind: t.kind, peerMid: String(t.peerMid ?? '') }]),
        );
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
    this.dispatchEvent(new CustomEvent('track', { detail: { peer: m.peer, track, peerMid: m.peerMid } }));
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

  /**
   * Sends our screen on its own m-line (added at the first share, which renegotiates; reused after). Resolves once
   * that m-line has its mid (the others learn it from our `media` data as `screenMid`).
   * @param {MediaStreamTrack} track @param {MediaStream} stream
   */
  async addScreen(track, stream) {
    if (this.screenTx) {
      await this.screenTx.sender.replaceTrack(track);
      return;
    }
    const offered = new Promise((resolve) => this.offered.push(() => resolve(undefined)));
    this.screenTx = this.pc.addTransceiver(track, { direction: 'sendonly', streams: [stream] });
    // Bounded: a lost negotiation must not hold the share up (the mid comes with the next media state then).
    await Promise.race([offered, new Promise((r) => setTimeout(r, 5000))]);
  }

  /** Stops sending our screen (the m-line stays for the next share: no renegotiation). */
  async removeScreen() {
    await this.screenTx?.sender.replaceTrack(null);
  }

  /** The mid our screen goes out on, once negotiated. */
  get screenMid() {
    return this.screenTx?.mid ?? null;
  }

  close() {
    this.closed = true;
    for (const f of this.offered.splice(0)) f();
    const pc = this.pc;
    pc.onnegotiationneeded = pc.onicecandidate = pc.ontrack = pc.onconnectionstatechange = null;
    pc.close();
  }
}

/**
 * Our camera's sender: three simulcast layers where the browser takes them, else one.
 * @param {RTCPeerConnection} pc @param {MediaStreamTrack|null} track @param {MediaStream} stream
 * @param {RTCRtpTransceiverDirection} direction
 */
function addVideo(pc, track, stream, direction) {
  try {
    return pc.addTransceiver(track ?? 'video', { direction, streams: [stream], sendEncodings: LAYERS });
  } catch (e) {
    console.warn('no simulcast here, one layer', e);
    return pc.addTransceiver(track ?? 'video', { direction, streams: [stream] });
  }
}

/**
 * A remote participant of an SFU room, shaped like a mesh `Peer` for the UI (id, name, remoteStream, remoteScreen,
 * remoteMedia, hand, pc, …): its tracks come over the page's one connection to the server, its chat, media state,
 * name and hand as signaling `data` (docs/protocol.md).
 */
export class SfuRemote {
  /**
   * @param {string} id
   * @param {string} name
   * @param {SfuSession} session
   * @param {EventTarget} call where `chat` events go
   * @param {() => void} onChange
   */
  constructor(id, name, session, call, onChange) {
    this.id = id;
    this.name = name;
    this.pc = session.pc;
    this.call = call;
    /** the participant's microphone and camera */
    this.remoteStream = new MediaStream();
    /** the participant's screen share */
    this.remoteScreen = new MediaStream();
    /** @type {import('./channel.js').MediaState & {screenMid?: string}} */
    this.remoteMedia = { audio: true, video: true, screen: false };
    this.hand = false;
    /** @type {Map<string, MediaStreamTrack>} publisher's mid -> track, in arrival order */
    this.received = new Map();
    /** @type {Set<string>} publisher mids that carried its screen (a late track there is not its camera) */
    this.screenMids = new Set();
    /** @type {import('./stats.js').StatsSummary|null} */
    this.stats = null;
    this.polite = true;
    this.iceRestarts = 0;
    this.dc = { readyState: 'closed' };
    this.closed = false;
    this.onChange = onChange;
  }

  /** Takes over what the peer-to-peer connection knew of the participant (a room moving to the SFU). @param {any} peer */
  inherit(peer) {
    this.remoteMedia = { ...peer.remoteMedia };
    if (this.remoteMedia.screenMid) this.screenMids.add(this.remoteMedia.screenMid);
    this.hand = !!peer.hand;
    this.name = peer.name || this.name;
  }

  /** The page's connection to the SFU was replaced (the SFU moved): the old one's tracks are gone. @param {SfuSession} session */
  rebind(session) {
    this.pc = session.pc;
    for (const [k, t] of [...this.received]) if (t.readyState === 'ended') this.received.delete(k);
    this.placeTracks();
  }

  /** @param {MediaStreamTrack} track @param {string} [peerMid] */
  addTrack(track, peerMid = `${track.kind}:${track.id}`) {
    this.received.set(peerMid, track);
    track.onmute = track.onunmute = () => this.onChange();
    track.addEventListener('ended', () => this.removeTrack(track));
    this.placeTracks();
  }

  /** @param {MediaStreamTrack} track */
  removeTrack(track) {
    for (const [k, t] of this.received) if (t === track) this.received.delete(k);
    this.placeTracks();
  }

  /** Camera and microphone in `remoteStream`, the screen (the mid the participant named) in `remoteScreen`. @private */
  placeTracks() {
    const screenMid = this.remoteMedia.screen ? this.remoteMedia.screenMid : undefined;
    /** @type {Map<string, MediaStreamTrack>} */
    const main = new Map();
    /** @type {MediaStreamTrack|null} */
    let screen = null;
    for (const [mid, track] of this.received) {
      if (track.readyState === 'ended') continue;
      if (track.kind === 'video' && screenMid && mid === screenMid) screen = track;
      else if (!(track.kind === 'video' && this.screenMids.has(mid)) && !main.has(track.kind)) main.set(track.kind, track);
    }
    /** @param {MediaStream} stream @param {MediaStreamTrack[]} want */
    const sync = (stream, want) => {
      for (const t of stream.getTracks()) if (!want.includes(t)) stream.removeTrack(t);
      for (const t of want) if (!stream.getTracks().includes(t)) stream.addTrack(t);
    };
    sync(this.remoteStream, [...main.values()]);
    sync(this.remoteScreen, screen ? [screen] : []);
    this.onChange();
  }

  /** The participant's `data` (chat, media, name, hand), as a peer-to-peer data channel would carry it. @param {any} msg */
  handleData(msg) {
    if (!msg || typeof msg !== 'object') return;
    if (msg.type === 'chat' && typeof msg.text === 'string') {
      const name = typeof msg.name === 'string' && msg.name ? msg.name : this.name;
      const ts = typeof msg.ts === 'number' ? msg.ts : Date.now();
      this.call.dispatchEvent(
        new CustomEvent('chat', { detail: { from: this.id, name, text: msg.text.slice(0, MAX_CHAT_TEXT), ts, local: false } }),
      );
    } else if (msg.type === 'media') {
      this.remoteMedia = { audio: msg.audio !== false, video: msg.video !== false, screen: msg.screen === true };
      if (typeof msg.screenMid === 'string' && msg.screenMid) {
        this.remoteMedia.screenMid = msg.screenMid;
        this.screenMids.add(msg.screenMid);
      }
      this.placeTracks();
    } else if (msg.type === 'name' && typeof msg.name === 'string') {
      this.name = cleanName(msg.name) || this.name;
      this.onChange();
    } else if (msg.type === 'hand') {
      this.hand = msg.raised === true;
      this.onChange();
    }
  }

  // The mesh Peer's interface, with nothing to do over the SFU (the call sends data and media for everyone).
  async updateSenders() {}
  /** @param {object} _msg */
  sendData(_msg) {
    return false;
  }
  addScreen() {}
  removeScreen() {}
  restartIce() {}
  /** A late peer-to-peer message of this participant (its side has not moved yet): nothing to do. */
  handleSignal() {}
  close() {
    this.closed = true;
  }
}
