// @ts-check
/**
 * A webcall call: local media, one RTCPeerConnection per remote peer (a mesh), perfect negotiation over the
 * signaling client, chat and media state over a data channel per peer, stats. No DOM: the UI listens to events.
 *
 * Events (`CustomEvent`, data in `detail`):
 * - `state`        `{state}` — `joining`, `in-call`, `reconnecting`, `ended`, `failed`
 * - `peer-added`   `{peer}`; `peer-updated` `{peer}` (connection state, name, remote media, hand, stream); `peer-removed` `{peer}`
 * - `local-media`  `{}` — local tracks or their enabled state changed
 * - `chat`         `{from, name, text, ts, local}`
 * - `stats`        `{}` — every peer's `stats` was refreshed
 * - `fatal`        `{code, message}` from signaling (room full, …)
 * - `notice`       `{message}` — something the user should know (screen share ended, device failed, …)
 */

import { summarize } from './stats.js';
import { SFU_PEER, SfuRemote, SfuSession } from './sfu.js';

/** Data channel label and id (negotiated on both sides, so no in-band DCEP is needed). */
export const CHAT_CHANNEL = { label: 'chat', id: 0 };
const MAX_CHAT_TEXT = 4000;
/** How long a `disconnected` connection may stay so before an ICE restart. */
const DISCONNECTED_GRACE_MS = 3000;
/** Minimum time between two ICE restarts of one connection. */
const RESTART_MIN_INTERVAL_MS = 5000;
/** How long a newcomer waits for the offer of a peer already in the room before offering itself. */
const FIRST_OFFER_TIMEOUT_MS = 8000;
/** How long after a use (or a welcome into a busy room) the next spare peer connection is built. */
const SPARE_DELAY_MS = 3000;

/**
 * @typedef {object} MediaState what a peer sends, as told over the data channel
 * @property {boolean} audio microphone on (not muted)
 * @property {boolean} video camera on
 * @property {boolean} screen sharing the screen (on a video track of its own, beside the camera)
 * @property {string} [screenStream] the id of the stream (msid) the screen track is sent with
 */

/**
 * Local media, with graceful degradation: asks for what was wanted, then for less.
 * @param {{audio: boolean, video: boolean, audioDevice?: string|null, videoDevice?: string|null}} want
 * @returns {Promise<{audio: MediaStreamTrack|null, video: MediaStreamTrack|null, problems: {kind: 'audio'|'video', error: string}[]}>}
 */
export async function getLocalMedia(want) {
  /** @type {{kind: 'audio'|'video', error: string}[]} */
  const problems = [];
  if (!navigator.mediaDevices?.getUserMedia) {
    if (want.audio) problems.push({ kind: 'audio', error: 'unsupported' });
    if (want.video) problems.push({ kind: 'video', error: 'unsupported' });
    return { audio: null, video: null, problems };
  }
  const audioC = want.audioDevice ? { deviceId: { exact: want.audioDevice } } : true;
  const videoC = {
    width: { ideal: 1280 },
    height: { ideal: 720 },
    frameRate: { ideal: 30 },
    ...(want.videoDevice ? { deviceId: { exact: want.videoDevice } } : {}),
  };
  /** @param {boolean} a @param {boolean} v */
  const ask = (a, v) => navigator.mediaDevices.getUserMedia({ audio: a ? audioC : false, video: v ? videoC : false });
  /** @type {MediaStreamTrack|null} */
  let audio = null;
  /** @type {MediaStreamTrack|null} */
  let video = null;
  if (want.audio && want.video) {
    try {
      const s = await ask(true, true);
      return { audio: s.getAudioTracks()[0] ?? null, video: s.getVideoTracks()[0] ?? null, problems };
    } catch {
      // Fall through: ask for each alone, to learn which one is the problem.
    }
  }
  if (want.audio) {
    try {
      audio = (await ask(true, false)).getAudioTracks()[0] ?? null;
    } catch (e) {
      problems.push({ kind: 'audio', error: mediaErrorName(e) });
    }
  }
  if (want.video) {
    try {
      video = (await ask(false, true)).getVideoTracks()[0] ?? null;
    } catch (e) {
      problems.push({ kind: 'video', error: mediaErrorName(e) });
    }
  }
  return { audio, video, problems };
}

/** @param {any} e @returns {string} `denied`, `missing`, `busy` or the error name */
function mediaErrorName(e) {
  switch (e?.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'denied';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'missing';
    case 'NotReadableError':
    case 'AbortError':
      return 'busy';
    default:
      return e?.name ?? 'error';
  }
}

/** A display name as the server takes it: at most 64 characters, no control characters. @param {string} name */
export function cleanName(name) {
  // eslint-disable-next-line no-control-regex
  return name.replace(/[\u0000-\u001f\u007f]/g, '').trim().slice(0, 64);
}

/** @param {RTCPeerConnection} pc */
function createChatChannel(pc) {
  return pc.createDataChannel(CHAT_CHANNEL.label, { negotiated: true, id: CHAT_CHANNEL.id, ordered: true });
}

/**
 * A peer connection built ahead, for the next peer: creating the connection, its data channel and transceivers
 * costs blocking round trips to WebRTC's thread, which then are not on the call's path. Built once we have our media
 * (before the welcome: for the peers already in the room), and while idle after a welcome and after each use (for
 * the next `hello`). Our tracks are on it with `addTrack` (Peer.attachOwnTracks): a remote offer adopts those
 * transceivers, and our own offer adds the kinds we have no track for.
 * @typedef {object} Spare
 * @property {RTCPeerConnection} pc
 * @property {RTCDataChannel} dc
 * @property {RTCRtpTransceiver|null} audioTx
 * @property {RTCRtpTransceiver|null} videoTx
 * @property {string} iceKey the `iceServers` (JSON) it has
 * @property {string|null} forId our id (the welcome's) it belongs to; null: built before the welcome
 * @property {Promise<string|null>|null} offer a spare for the next `hello` (built after the welcome) has its offer
 *   made and set ahead (`Call.primeSpare`): the SDP, or null when that failed; null: not primed (it may answer)
 * @property {string|null} sdp that offer's SDP once it is set
 * @property {(RTCIceCandidateInit|null)[]} candidates local candidates of a primed spare, held until it is taken
 */

export class Peer {
  /**
   * @param {Call} call
   * @param {string} id
   * @param {string} name
   * @param {boolean} initiator true when we make the first offer (we were in the room first)
   * @param {Spare|null} [spare] a peer connection built ahead, with its data channel and our tracks
   */
  constructor(call, id, name, initiator, spare = null) {
    this.call = call;
    this.id = id;
    this.name = name;
    /** The peer with the lexicographically smaller id is polite (docs/protocol.md). */
    this.polite = /** @type {string} */ (call.id) < id;
    this.pc = spare?.pc ?? new RTCPeerConnection(call.pcConfig());
    /** @type {RTCRtpTransceiver|null} */
    this.audioTx = spare?.audioTx ?? null;
    /** @type {RTCRtpTransceiver|null} */
    this.videoTx = spare?.videoTx ?? null;
    /** the peer's microphone and camera */
    this.remoteStream = new MediaStream();
    /** the peer's screen share (its own video track and stream) */
    this.remoteScreen = new MediaStream();
    /** @type {Map<MediaStreamTrack, string>} every received track and the stream id it came with */
    this.received = new Map();
    /** @type {RTCRtpTransceiver|null} the transceiver our screen goes out on */
    this.screenTx = null;
    /** @type {MediaState} */
    this.remoteMedia = { audio: true, video: true, screen: false };
    /** the peer's hand is raised (data channel `hand`) */
    this.hand = false;
    /** @type {Set<string>} stream ids the peer has shared its screen with (so a late track is not taken for a camera) */
    this.screenIds = new Set();
    /** @type {RTCPeerConnectionState} */
    this.state = this.pc.connectionState;
    /** @type {import('./stats.js').StatsSummary|null} */
    this.stats = null;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    /** @type {(RTCIceCandidateInit|null)[]} candidates that came before a remote description */
    this.pendingCandidates = [];
    this.awaitingFirstOffer = !initiator;
    this.lastRestart = 0;
    this.iceRestarts = 0;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this.disconnectTimer = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this.firstOfferTimer = null;
    /** @type {ReturnType<typeof setTimeout>|null} a `peer-updated` event to come */
    this.emitTimer = null;
    this.closed = false;
    /** @type {Promise<void>} signaling messages of this peer are handled one after the other */
    this.queue = Promise.resolve();

    const pc = this.pc;
    /** @type {(RTCIceCandidateInit|null)[]|null} our candidates held until our primed offer has gone out */
    this.heldCandidates = initiator && spare?.offer ? spare.candidates : null;
    this.dc = spare?.dc ?? createChatChannel(pc);
    this.dc.onopen = () => {
      this.sendData(this.call.mediaState());
      // Our current name (it may have changed since the server told the peer) and hand.
      this.sendData({ type: 'name', name: this.call.name });
      if (this.call.handRaised) this.sendData({ type: 'hand', raised: true });
      // Sharing already: this peer gets the screen too (after the first negotiation, on a transceiver of its own).
      if (this.call.tracks.screen) this.addScreen();
      this.emit();
    };
    this.dc.onmessage = (ev) => this.onData(ev.data);

    if (initiator) {
      this.addOwnTransceivers();
    } else {
      // Attach our media now, with addTrack: the remote offer's m-sections take over these transceivers, so the
      // answer needs no replaceTrack round trips (transceivers made by addTransceiver would not be reused).
      // A spare has them already.
      if (!spare) this.attachOwnTracks();
      this.firstOfferTimer = setTimeout(() => {
        // The offer of the peer already in the room never came (lost with a dropped connection): offer ourselves.
        if (this.awaitingFirstOffer && !this.closed && !this.pc.remoteDescription) this.startOffering();
      }, FIRST_OFFER_TIMEOUT_MS);
    }

    pc.onnegotiationneeded = () => {
      // While an offer of ours is being made, that offer covers the change (or the event fires again once stable).
      if (this.awaitingFirstOffer || this.makingOffer) return;
      this.negotiate();
    };
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && !candidate.candidate) return; // legacy empty candidate; the null event follows
      if (this.heldCandidates) this.heldCandidates.push(candidate ? candidate.toJSON() : null);
      else this.sendCandidate(candidate ? candidate.toJSON() : null);
    };
    pc.ontrack = ({ track, streams }) => {
      this.received.set(track, streams[0]?.id ?? '');
      this.placeTracks();
      track.onmute = track.onunmute = () => this.emit();
      track.addEventListener('ended', () => {
        this.received.delete(track);
        this.placeTracks();
      });
    };
    pc.onconnectionstatechange = () => this.onConnectionState();
    // The first offer goes out at once: `negotiationneeded` is a task of its own, which a busy page (a call page
    // that is rendering video) runs tens of milliseconds later. Perfect negotiation makes the direct offer safe.
    // A primed spare has it made and set already (an offer is nobody's in particular until it is sent).
    if (initiator && spare?.sdp) this.sendPrimedOffer(spare.sdp);
    else if (initiator && spare?.offer) this.sendPrimedOffer(spare.offer);
    else if (initiator) this.negotiate();
  }

  /**
   * Sorts the received tracks into the camera/microphone stream and the screen stream: the screen is the video
   * track that came with the stream id the peer announced (`media.screenStream`); of the others, the newest of each
   * kind (a renegotiation may bring a new one). @private
   */
  placeTracks() {
    const screenId = this.remoteMedia.screen ? this.remoteMedia.screenStream : undefined;
    /** @type {Map<string, MediaStreamTrack>} */
    const main = new Map();
    /** @type {MediaStreamTrack|null} */
    let screen = null;
    for (const [track, sid] of this.received) {
      if (track.readyState === 'ended') continue;
      if (track.kind === 'video' && screenId && sid === screenId) screen = track;
      else if (!(track.kind === 'video' && this.screenIds.has(sid))) main.set(track.kind, track);
    }
    /** @param {MediaStream} stream @param {MediaStreamTrack[]} want */
    const sync = (stream, want) => {
      for (const t of stream.getTracks()) if (!want.includes(t)) stream.removeTrack(t);
      for (const t of want) if (!stream.getTracks().includes(t)) stream.addTrack(t);
    };
    sync(this.remoteStream, [...main.values()]);
    sync(this.remoteScreen, screen ? [screen] : []);
    this.emit();
  }

  /** Sends our screen to this peer, on a transceiver of its own (renegotiates once per share). */
  addScreen() {
    const track = this.call.tracks.screen;
    if (!track || this.closed || !this.call.screenStream) return;
    if (this.screenTx && !this.screenTx.stopped) {
      this.screenTx.direction = 'sendonly';
      this.screenTx.sender.replaceTrack(track).catch((e) => console.warn('screen replaceTrack', e));
      this.screenTx.sender.setStreams?.(this.call.screenStream);
    } else {
      this.screenTx = this.pc.addTransceiver(track, { direction: 'sendonly', streams: [this.call.screenStream] });
    }
  }

  /** Stops sending our screen to this peer (the transceiver stays, inactive, for the next share). */
  removeScreen() {
    if (!this.screenTx || this.screenTx.stopped || this.closed) return;
    this.screenTx.sender.replaceTrack(null).catch(() => {});
    this.screenTx.direction = 'inactive';
  }

  /** @private @param {RTCIceCandidateInit|null} candidate */
  sendCandidate(candidate) {
    this.call.signaling.send({ type: 'candidate', to: this.id, candidate });
  }

  /**
   * The spare's offer (set on it before this peer came), then the candidates it has gathered since: at once when
   * the offer is set, else when it is. @private @param {string|Promise<string|null>} offer
   */
  async sendPrimedOffer(offer) {
    let sdp = null;
    if (typeof offer === 'string') {
      sdp = offer;
    } else {
      this.makingOffer = true;
      try {
        sdp = await offer;
      } finally {
        this.makingOffer = false;
      }
    }
    if (this.closed) return;
    if (sdp && this.pc.signalingState === 'have-local-offer') this.call.signaling.send({ type: 'offer', to: this.id, sdp });
    const held = this.heldCandidates ?? [];
    this.heldCandidates = null;
    for (const c of held) this.sendCandidate(c);
    // Priming failed (or a remote offer came first and is being answered): negotiate as without a spare.
    if (!sdp && this.pc.signalingState === 'stable' && !this.pc.remoteDescription) this.negotiate();
  }

  /** Before the first remote offer: our tracks on addTrack transceivers, which that offer adopts. @private */
  attachOwnTracks() {
    const stream = this.call.localStream;
    for (const kind of /** @type {const} */ (['audio', 'video'])) {
      const track = this.call.outgoing(kind);
      if (!track) continue; // adopted from the offer, with replaceTrack, once it is there
      const sender = this.pc.addTrack(track, stream);
      const tx = this.pc.getTransceivers().find((t) => t.sender === sender) ?? null;
      if (kind === 'audio') this.audioTx = tx;
      else this.videoTx = tx;
    }
  }

  /** We make the first offer after all (hello after a resumed welcome, or no offer came). */
  startOffering() {
    this.awaitingFirstOffer = false;
    if (this.firstOfferTimer) clearTimeout(this.firstOfferTimer);
    this.firstOfferTimer = null;
    this.addOwnTransceivers();
    this.negotiate();
  }

  /** @private */
  addOwnTransceivers() {
    const stream = this.call.localStream;
    // Both kinds in every offer (receive-only too); tracks attached before (attachOwnTracks) are kept.
    if (!this.audioTx) {
      this.audioTx = this.pc.addTransceiver(this.call.outgoing('audio') ?? 'audio', {
        direction: this.call.direction(),
        streams: [stream],
      });
    }
    if (!this.videoTx) {
      this.videoTx = this.pc.addTransceiver(this.call.outgoing('video') ?? 'video', {
        direction: this.call.direction(),
        streams: [stream],
      });
    }
  }

  /** After the first remote offer: send our media on the transceivers it created. @private */
  async adoptTransceivers() {
    /** @type {Promise<void>[]} */
    const replacing = [];
    for (const t of this.pc.getTransceivers()) {
      if (t.mid === null || t.stopped) continue;
      const kind = t.receiver.track.kind;
      if (kind === 'audio' && !this.audioTx && t !== this.videoTx) this.audioTx = t;
      else if (kind === 'video' && !this.videoTx && t !== this.audioTx) this.videoTx = t;
      else continue;
      t.direction = this.call.direction();
      const track = this.call.outgoing(/** @type {'audio'|'video'} */ (kind));
      if (t.sender.track !== track) replacing.push(t.sender.replaceTrack(track));
      t.sender.setStreams?.(this.call.localStream);
    }
    // Together, not one after the other: each is a round trip to WebRTC's own thread.
    await Promise.all(replacing);
  }

  /** @private */
  async negotiate() {
    if (this.closed) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      const desc = this.pc.localDescription;
      if (desc && desc.type === 'offer') this.call.signaling.send({ type: 'offer', to: this.id, sdp: desc.sdp });
    } catch (e) {
      console.warn(`negotiation with ${this.id} failed`, e);
    } finally {
      this.makingOffer = false;
    }
  }

  /** @param {{type: string, sdp?: string, candidate?: RTCIceCandidateInit|null}} msg */
  handleSignal(msg) {
    this.queue = this.queue.then(() => this.handleSignalNow(msg)).catch((e) => console.warn('signal', msg.type, e));
    return this.queue;
  }

  /** @private @param {{type: string, sdp?: string, candidate?: RTCIceCandidateInit|null}} msg */
  async handleSignalNow(msg) {
    if (this.closed) return;
    const pc = this.pc;
    if (msg.type === 'offer' || msg.type === 'answer') {
      const description = { type: /** @type {RTCSdpType} */ (msg.type), sdp: msg.sdp ?? '' };
      const readyForOffer = !this.makingOffer && (pc.signalingState === 'stable' || this.settingRemoteAnswer);
      const offerCollision = description.type === 'offer' && !readyForOffer;
      this.ignoreOffer = !this.polite && offerCollision;
      if (this.ignoreOffer) return;
      if (description.type === 'answer' && pc.signalingState !== 'have-local-offer') return; // stale answer
      this.settingRemoteAnswer = description.type === 'answer';
      try {
        await pc.setRemoteDescription(description); // rolls back our own offer when needed (polite side)
      } finally {
        this.settingRemoteAnswer = false;
      }
      if (description.type === 'offer') {
        if (this.awaitingFirstOffer || !this.audioTx || !this.videoTx) {
          this.awaitingFirstOffer = false;
          if (this.firstOfferTimer) clearTimeout(this.firstOfferTimer);
          await this.adoptTransceivers();
        }
        // The answer leaves as soon as it is made: applying it (setLocalDescription, which sets up the transports)
        // then overlaps its trip to the peer and the peer's setRemoteDescription. Messages of this peer are handled
        // one after the other (this.queue), so nothing changes the signaling state in between.
        const answer = await pc.createAnswer();
        this.call.signaling.send({ type: 'answer', to: this.id, sdp: answer.sdp });
        await pc.setLocalDescription(answer);
      }
      const pending = this.pendingCandidates;
      this.pendingCandidates = [];
      for (const c of pending) await this.addCandidate(c);
    } else if (msg.type === 'candidate') {
      const c = msg.candidate ?? null;
      if (!pc.remoteDescription) {
        this.pendingCandidates.push(c);
        return;
      }
      await this.addCandidate(c);
    }
  }

  /** @private @param {RTCIceCandidateInit|null} c */
  async addCandidate(c) {
    try {
      if (c) await this.pc.addIceCandidate(c);
      else await this.pc.addIceCandidate(); // end of candidates
    } catch (e) {
      if (!this.ignoreOffer && c) console.warn(`candidate from ${this.id} refused`, e);
    }
  }

  /** @private */
  onConnectionState() {
    const s = this.pc.connectionState;
    this.state = s;
    if (s === 'connected') {
      if (this.disconnectTimer) clearTimeout(this.disconnectTimer);
      this.disconnectTimer = null;
    } else if (s === 'failed') {
      this.restartIce();
    } else if (s === 'disconnected' && !this.disconnectTimer) {
      this.disconnectTimer = setTimeout(() => {
        this.disconnectTimer = null;
        if (this.pc.connectionState === 'disconnected') this.restartIce();
      }, DISCONNECTED_GRACE_MS);
    }
    this.emit();
  }

  /** ICE restart (rate-limited); perfect negotiation makes it safe from either side. */
  restartIce() {
    if (this.closed) return;
    const now = Date.now();
    if (now - this.lastRestart < RESTART_MIN_INTERVAL_MS) {
      // Try again once the interval is over, if still needed.
      setTimeout(() => {
        const s = this.pc.connectionState;
        if (s === 'failed' || s === 'disconnected') this.restartIce();
      }, RESTART_MIN_INTERVAL_MS - (now - this.lastRestart) + 10);
      return;
    }
    this.lastRestart = now;
    this.iceRestarts++;
    this.pc.restartIce();
  }

  /** @param {object} msg */
  sendData(msg) {
    if (this.dc.readyState !== 'open') return false;
    this.dc.send(JSON.stringify(msg));
    return true;
  }

  /** @private @param {any} data */
  onData(data) {
    let msg;
    try {
      msg = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    if (msg.type === 'chat' && typeof msg.text === 'string') {
      const name = typeof msg.name === 'string' && msg.name ? msg.name : this.name;
      const ts = typeof msg.ts === 'number' ? msg.ts : Date.now();
      this.call.dispatchEvent(
        new CustomEvent('chat', {
          detail: { from: this.id, name, text: msg.text.slice(0, MAX_CHAT_TEXT), ts, local: false },
        }),
      );
    } else if (msg.type === 'media') {
      this.remoteMedia = { audio: msg.audio !== false, video: msg.video !== false, screen: msg.screen === true };
      if (typeof msg.screenStream === 'string' && msg.screenStream) {
        this.remoteMedia.screenStream = msg.screenStream;
        this.screenIds.add(msg.screenStream);
      }
      this.placeTracks();
    } else if (msg.type === 'name' && typeof msg.name === 'string') {
      this.name = cleanName(msg.name) || this.name;
      this.emit();
    } else if (msg.type === 'hand') {
      this.hand = msg.raised === true;
      this.emit();
    }
  }

  /** Sends our current outgoing tracks (after a mute, camera or device change). */
  async updateSenders() {
    if (this.audioTx && !this.audioTx.stopped) await this.audioTx.sender.replaceTrack(this.call.outgoing('audio'));
    if (this.videoTx && !this.videoTx.stopped) await this.videoTx.sender.replaceTrack(this.call.outgoing('video'));
  }

  /** @private */
  emit() {
    if (this.closed || this.emitTimer) return;
    // In a task of its own (and coalesced): the UI's work (a <video> to start, a tile to lay out) must not hold up
    // the signaling that the event came with — `track` fires just before setRemoteDescription resolves, and the
    // answer is made right after.
    this.emitTimer = setTimeout(() => {
      this.emitTimer = null;
      if (!this.closed) this.call.dispatchEvent(new CustomEvent('peer-updated', { detail: { peer: this } }));
    }, 0);
  }

  close() {
    this.closed = true;
    if (this.disconnectTimer) clearTimeout(this.disconnectTimer);
    if (this.firstOfferTimer) clearTimeout(this.firstOfferTimer);
    if (this.emitTimer) clearTimeout(this.emitTimer);
    this.pc.onconnectionstatechange = this.pc.onnegotiationneeded = this.pc.onicecandidate = this.pc.ontrack = null;
    this.dc.onmessage = this.dc.onopen = null;
    this.pc.close();
  }
}

export class Call extends EventTarget {
  /**
   * @param {object} opts
   * @param {import('./signaling.js').Signaling} opts.signaling
   * @param {string} opts.name our display name
   * @param {boolean} [opts.relayOnly] iceTransportPolicy `relay`
   * @param {boolean} [opts.publish] false: receive only (subscribe-only tokens): no local media, `recvonly` media
   */
  constructor({ signaling, name, relayOnly = false, publish = true }) {
    super();
    this.signaling = signaling;
    this.name = name;
    this.relayOnly = relayOnly;
    this.publish = publish;
    this.handRaised = false;
    // While a peer connection is up, media flows without the server: a signaling outage does not end the call.
    signaling.keepTrying = () => [...this.peers.values()].some((p) => p.pc.connectionState === 'connected');
    /** @type {string|null} */
    this.id = null;
    /** @type {Map<string, Peer>} */
    this.peers = new Map();
    /** @type {'idle'|'joining'|'in-call'|'reconnecting'|'ended'|'failed'} */
    this.state = 'idle';
    /** the stream our senders are tagged with and the preview shows */
    this.localStream = new MediaStream();
    /** @type {{mic: MediaStreamTrack|null, camera: MediaStreamTrack|null, screen: MediaStreamTrack|null}} */
    this.tracks = { mic: null, camera: null, screen: null };
    this.micEnabled = true;
    this.cameraEnabled = true;
    /** @type {{audio: string|null, video: string|null}} chosen device ids */
    this.devices = { audio: null, video: null };
    /** @type {{kind: 'audio'|'video', error: string}[]} */
    this.mediaProblems = [];
    /** @type {ReturnType<typeof setInterval>|null} */
    this.statsTimer = null;
    this.joined = false;
    /** @type {Spare|null} */
    this.spare = null;
    /** @type {ReturnType<typeof setTimeout>|null} a spare to build */
    this.spareTimer = null;
    /** @type {number|null} */
    this.spareIdle = null;
    /** @type {MediaStream|null} the stream our screen track is sent with (its id tells peers which track it is) */
    this.screenStream = null;
    /** @type {SfuSession|null} our one connection to the server in an SFU room (docs/protocol.md) */
    this.sfu = null;
    this.bindSignaling();
  }

  get screenSharing() {
    return this.tracks.screen !== null;
  }

  /**
   * Gets local media (degrading to audio-only or receive-only) and joins.
   * @param {{audio: boolean, video: boolean}} want
   */
  async start(want) {
    this.joined = true; // prepare builds no spare: join does, once the WebSocket is on its way
    await this.prepare(want);
    this.joined = false;
    this.join();
  }

  /**
   * Gets local media (as `start`) without joining yet: the preview runs, `join` connects later.
   * @param {{audio: boolean, video: boolean}} want
   */
  async prepare(want) {
    this.setState('joining');
    if (!this.publish) want = { audio: false, video: false };
    const media = await getLocalMedia({ ...want, audioDevice: this.devices.audio, videoDevice: this.devices.video });
    this.mediaProblems = media.problems;
    this.tracks.mic = media.audio;
    this.tracks.camera = media.video;
    this.micEnabled = !!media.audio;
    this.cameraEnabled = !!media.video;
    this.devices.audio = media.audio?.getSettings().deviceId ?? this.devices.audio;
    this.devices.video = media.video?.getSettings().deviceId ?? this.devices.video;
    this.refreshLocalStream();
    if (!this.joined) this.buildSpare();
  }

  /** Connects to the room (after `prepare`). */
  join() {
    if (this.joined) return;
    this.joined = true;
    this.setState('joining');
    this.statsTimer = setInterval(() => this.refreshStats(), 1000);
    this.signaling.start();
    // While the WebSocket connects: the connection for a peer already in the room.
    if (!this.spare) this.buildSpare();
  }

  /** @private */
  bindSignaling() {
    const s = this.signaling;
    s.addEventListener('state', (ev) => {
      const st = /** @type {CustomEvent} */ (ev).detail.state;
      if (st === 'reconnecting' && this.state === 'in-call') this.setState('reconnecting');
    });
    s.addEventListener('welcome', (ev) => this.onWelcome(/** @type {CustomEvent} */ (ev).detail));
    s.addEventListener('hello', (ev) => {
      const { from, name } = /** @type {CustomEvent} */ (ev).detail;
      if (this.sfu) {
        this.addRemote(from, name ?? '');
        return;
      }
      const existing = this.peers.get(from);
      if (existing && !existing.pc.remoteDescription && existing.awaitingFirstOffer) {
        // We knew of it from a resumed welcome; the hello tells us that we are the one to offer.
        existing.name = name ?? existing.name;
        existing.startOffering();
        return;
      }
      if (existing) this.removePeer(from);
      this.addPeer(from, name ?? '', true);
    });
    for (const type of ['offer', 'answer', 'candidate']) {
      s.addEventListener(type, (ev) => {
        const msg = /** @type {CustomEvent} */ (ev).detail;
        if (msg.from === SFU_PEER) {
          this.sfu?.handle(msg);
          return;
        }
        let peer = this.peers.get(msg.from);
        if (!peer) {
          if (type !== 'offer') return;
          peer = this.addPeer(msg.from, '', false);
        }
        peer.handleSignal(msg);
      });
    }
    s.addEventListener('bye', (ev) => this.removePeer(/** @type {CustomEvent} */ (ev).detail.from));
    s.addEventListener('topology', (ev) => {
      if (/** @type {CustomEvent} */ (ev).detail.mode === 'sfu') this.enterSfu();
    });
    s.addEventListener('fatal', (ev) => {
      const detail = /** @type {CustomEvent} */ (ev).detail;
      this.leaveSfu();
      this.closePeers();
      this.releaseMedia();
      this.stopStats();
      this.joined = false;
      this.setState('failed');
      this.dispatchEvent(new CustomEvent('fatal', { detail }));
    });
  }

  /** @private @param {any} welcome */
  onWelcome(welcome) {
    // A subscribe-only token: receive only, whatever we had prepared.
    if (welcome.publish === false && this.publish) this.setPublish(false);
    // A spare built for another id or other ICE servers (TURN credentials are minted per welcome) is no use; one
    // built before the first welcome gets this welcome's ICE servers (no gathering has started on it).
    if (this.spare?.forId === null && (welcome.idChanged || !welcome.resumed)) {
      try {
        this.spare.pc.setConfiguration({ ...this.spare.pc.getConfiguration(), iceServers: this.signaling.iceServers });
        this.spare.iceKey = JSON.stringify(this.signaling.iceServers);
        this.spare.forId = welcome.id;
      } catch (e) {
        console.warn('spare setConfiguration', e);
      }
    }
    if (this.spare && !this.spareFits(welcome.id)) this.dropSpare();
    /** @type {{id: string, name: string}[]} */
    const others = Array.isArray(welcome.peers) ? welcome.peers : [];
    if (welcome.idChanged || !welcome.resumed) {
      // A new session: every old peer connection belongs to ids that are gone (an SFU room says so again).
      this.leaveSfu();
      this.closePeers();
      this.id = welcome.id;
      for (const p of others) this.addPeer(p.id, p.name ?? '', false);
    } else {
      this.id = welcome.id;
      const present = new Set(others.map((p) => p.id));
      for (const id of [...this.peers.keys()]) if (!present.has(id)) this.removePeer(id);
      for (const peer of this.peers.values()) {
        try {
          peer.pc.setConfiguration({ ...peer.pc.getConfiguration(), iceServers: welcome.iceServers ?? [] });
        } catch (e) {
          console.warn('setConfiguration', e);
        }
        // Signaling messages may have been lost with the old connection: an ICE restart recovers.
        if (peer.pc.connectionState !== 'connected' && peer.pc.remoteDescription) peer.restartIce();
      }
      for (const p of others) if (!this.peers.has(p.id)) this.addPeer(p.id, p.name ?? '', false);
    }
    this.setState('in-call');
    this.primeSpare();
    this.scheduleSpare(others.length ? SPARE_DELAY_MS : 0);
  }

  /** The configuration of every peer connection. */
  pcConfig() {
    return {
      iceServers: this.signaling.iceServers,
      iceTransportPolicy: /** @type {RTCIceTransportPolicy} */ (this.relayOnly ? 'relay' : 'all'),
      bundlePolicy: /** @type {RTCBundlePolicy} */ ('max-bundle'),
      // Candidates (host, and the TURN allocation) are gathered as soon as the connection exists — for a spare, long
      // before the call — and handed out at setLocalDescription, instead of being gathered only then.
      iceCandidatePoolSize: 1,
    };
  }

  /** @private @param {string|null} [id] our id */
  spareFits(id = this.id) {
    const s = this.spare;
    return (
      !!s &&
      s.forId === id &&
      s.iceKey === JSON.stringify(this.signaling.iceServers) &&
      s.pc.signalingState === (s.offer && s.pc.localDescription ? 'have-local-offer' : 'stable') &&
      (s.audioTx?.sender.track ?? null) === this.outgoing('audio') &&
      (s.videoTx?.sender.track ?? null) === this.outgoing('video')
    );
  }

  /** Builds the spare peer connection now. @private */
  buildSpare() {
    if (this.spare || this.sfu || typeof RTCPeerConnection === 'undefined') return;
    try {
      const pc = new RTCPeerConnection(this.pcConfig());
      const dc = createChatChannel(pc);
      /** @type {Spare} */
      const spare = { pc, dc, audioTx: null, videoTx: null, iceKey: JSON.stringify(this.signaling.iceServers), forId: this.id, offer: null, sdp: null, candidates: [] };
      for (const kind of /** @type {const} */ (['audio', 'video'])) {
        const track = this.outgoing(kind);
        if (!track) continue;
        const sender = pc.addTrack(track, this.localStream);
        const tx = pc.getTransceivers().find((t) => t.sender === sender) ?? null;
        if (kind === 'audio') spare.audioTx = tx;
        else spare.videoTx = tx;
      }
      this.spare = spare;
    } catch (e) {
      console.warn('spare peer connection', e);
    }
    this.primeSpare();
  }

  /**
   * Once we are in the room, the spare waits for a `hello`, to which we send the first offer: that offer is made
   * and set now (with transceivers for the kinds we have no track for, as Peer.addOwnTransceivers), and its
   * candidates are held, so that on the `hello` it goes out at once. A spare built before the welcome is not
   * primed: it may answer the offer of a peer already in the room. @private
   */
  primeSpare() {
    const spare = this.spare;
    if (!spare || spare.offer || this.state !== 'in-call' || !this.id || spare.forId !== this.id) return;
    const pc = spare.pc;
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && !candidate.candidate) return;
      spare.candidates.push(candidate ? candidate.toJSON() : null);
    };
    spare.offer = (async () => {
      try {
        const direction = this.direction();
        if (!spare.audioTx) spare.audioTx = pc.addTransceiver('audio', { direction, streams: [this.localStream] });
        if (!spare.videoTx) spare.videoTx = pc.addTransceiver('video', { direction, streams: [this.localStream] });
        await pc.setLocalDescription();
        spare.sdp = pc.localDescription?.sdp ?? null;
        return spare.sdp;
      } catch (e) {
        if (pc.signalingState !== 'closed') console.warn('spare offer', e);
        return null;
      }
    })();
  }

  /**
   * Builds a spare peer connection after `delay` ms, when the page is next idle. After a welcome with peers in the
   * room and after each use, the delay keeps the build clear of the call being set up. @private
   * @param {number} delay
   */
  scheduleSpare(delay) {
    if (this.spare || this.spareTimer !== null || this.state !== 'in-call') return;
    const build = () => {
      this.spareTimer = this.spareIdle = null;
      if (this.state === 'in-call') this.buildSpare();
    };
    this.spareTimer = setTimeout(() => {
      if (typeof requestIdleCallback === 'function') this.spareIdle = requestIdleCallback(build, { timeout: 1000 });
      else build();
    }, delay);
  }

  /**
   * The spare peer connection if it still fits (else none: it is dropped), and a new one to come. A primed spare
   * (our offer set) is only for a peer we offer to; for another it stays. @private @param {boolean} initiator
   */
  takeSpare(initiator) {
    if (this.spare?.offer && !initiator) return null;
    const fits = this.spareFits();
    const spare = fits ? this.spare : null;
    if (fits) this.spare = null;
    else this.dropSpare();
    this.scheduleSpare(SPARE_DELAY_MS);
    return spare;
  }

  /** @private */
  dropSpare() {
    if (this.spareTimer !== null) clearTimeout(this.spareTimer);
    if (this.spareIdle !== null) cancelIdleCallback(this.spareIdle);
    this.spareTimer = this.spareIdle = null;
    if (this.spare) {
      this.spare.pc.close();
      this.spare = null;
    }
  }

  /** @private @param {string} id @param {string} name @param {boolean} initiator */
  addPeer(id, name, initiator) {
    const peer = new Peer(this, id, name, initiator, this.takeSpare(initiator));
    this.peers.set(id, peer);
    this.dispatchEvent(new CustomEvent('peer-added', { detail: { peer } }));
    return peer;
  }

  /** The room sends media through the server from now on: one connection to it replaces the mesh. */
  enterSfu() {
    if (this.sfu) return;
    this.dropSpare();
    const session = new SfuSession({
      signaling: this.signaling,
      config: this.pcConfig(),
      localStream: this.localStream,
      tracks: { audio: this.outgoing('audio'), video: this.outgoing('video') },
    });
    this.sfu = session;
    /** @type {Map<string, MediaStreamTrack[]>} tracks of participants whose peer-to-peer tile still shows */
    const waiting = new Map();
    /** @param {string} peer */
    const takeOver = (peer) => {
      const remote = this.addRemote(peer, this.peers.get(peer)?.name ?? '');
      for (const t of waiting.get(peer) ?? []) remote.addTrack(t);
      waiting.delete(peer);
    };
    session.addEventListener('track', (ev) => {
      const { peer, track } = /** @type {CustomEvent} */ (ev).detail;
      const remote = this.peers.get(peer);
      if (remote instanceof SfuRemote) return remote.addTrack(track);
      // A peer-to-peer connection keeps its tile until the SFU's video of that participant arrives (a seamless move).
      waiting.set(peer, [...(waiting.get(peer) ?? []), track]);
      if (track.kind !== 'video') return; // audio moves with the video (or with the fallback below)
      if (!track.muted) return takeOver(peer);
      track.addEventListener('unmute', () => this.sfu === session && waiting.has(peer) && takeOver(peer), { once: true });
    });
    session.addEventListener('state', () => {
      if (session.pc.connectionState !== 'connected') return;
      // Participants that send no video through the SFU move over a moment after it connects.
      setTimeout(() => {
        if (this.sfu !== session) return;
        for (const [id, p] of [...this.peers]) if (!(p instanceof SfuRemote)) takeOver(id);
      }, 5000);
    });
    session.addEventListener('track-ended', (ev) => {
      for (const p of this.peers.values()) if (p instanceof SfuRemote) p.removeTrack(/** @type {CustomEvent} */ (ev).detail.track);
    });
    session.addEventListener('state', () => {
      for (const p of this.peers.values()) this.emitRemote(p);
    });
  }

  /** @private */
  leaveSfu() {
    this.sfu?.close();
    this.sfu = null;
  }

  /** @private @param {string} id @param {string} name */
  addRemote(id, name) {
    if (!this.sfu) throw new Error('not in an SFU room');
    const existing = this.peers.get(id);
    if (existing instanceof SfuRemote) return existing;
    if (existing) this.removePeer(id);
    /** @type {SfuRemote} */
    const remote = new SfuRemote(id, name, this.sfu, () => this.emitRemote(remote));
    this.peers.set(id, /** @type {any} */ (remote));
    this.dispatchEvent(new CustomEvent('peer-added', { detail: { peer: remote } }));
    return remote;
  }

  /** @private @param {any} peer */
  emitRemote(peer) {
    setTimeout(() => {
      if (!peer.closed) this.dispatchEvent(new CustomEvent('peer-updated', { detail: { peer } }));
    }, 0);
  }

  /** @param {string} id */
  removePeer(id) {
    const peer = this.peers.get(id);
    if (!peer) return;
    this.peers.delete(id);
    peer.close();
    this.dispatchEvent(new CustomEvent('peer-removed', { detail: { peer } }));
  }

  /** @private */
  closePeers() {
    for (const id of [...this.peers.keys()]) this.removePeer(id);
  }

  /** @private @param {Call['state']} state */
  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: { state } }));
  }

  /**
   * The track we send for a kind: the microphone (also when muted: it then sends silence), the camera when on
   * (the screen goes on a transceiver of its own: Peer.addScreen).
   * sharing, else the camera when on.
   * @param {'audio'|'video'} kind
   */
  outgoing(kind) {
    if (!this.publish) return null;
    if (kind === 'audio') return this.tracks.mic;
    return this.cameraEnabled ? this.tracks.camera : null;
  }

  /** The direction of our audio and video transceivers. @returns {RTCRtpTransceiverDirection} */
  direction() {
    return this.publish ? 'sendrecv' : 'recvonly';
  }

  /**
   * Receive only from now on (a subscribe-only welcome): local media stops, every transceiver becomes `recvonly`
   * (which renegotiates). @param {boolean} publish
   */
  setPublish(publish) {
    if (publish === this.publish) return;
    this.publish = publish;
    if (!publish) {
      this.releaseMedia();
      for (const p of this.peers.values()) {
        for (const t of [p.audioTx, p.videoTx]) if (t && !t.stopped) t.direction = 'recvonly';
      }
    }
    this.dispatchEvent(new CustomEvent('local-media', { detail: {} }));
  }

  /** Stops every local track (camera and microphone lights go off) and drops the spare connection. */
  releaseMedia() {
    for (const t of Object.values(this.tracks)) t?.stop();
    this.tracks = { mic: null, camera: null, screen: null };
    this.dropSpare();
    this.refreshLocalStream();
    for (const p of this.peers.values()) p.updateSenders().catch(() => {});
  }

  /** Changes our display name; the others learn it over the data channel (`name`). @param {string} name */
  setName(name) {
    name = cleanName(name);
    if (!name || name === this.name) return;
    this.name = name;
    // A later join (a reconnect that is not resumed) carries it too.
    this.signaling.name = name;
    for (const p of this.peers.values()) p.sendData({ type: 'name', name });
    this.dispatchEvent(new CustomEvent('local-media', { detail: {} }));
  }

  /** Raises or lowers our hand (data channel `hand`). @param {boolean} raised */
  setHand(raised) {
    this.handRaised = raised;
    for (const p of this.peers.values()) p.sendData({ type: 'hand', raised });
    this.dispatchEvent(new CustomEvent('local-media', { detail: {} }));
  }

  /** @returns {MediaState} */
  mediaState() {
    return {
      // @ts-ignore: `type` is part of the data channel message
      type: 'media',
      audio: !!this.tracks.mic && this.micEnabled,
      video: !!this.outgoing('video'),
      screen: this.screenSharing,
      ...(this.screenStream && this.screenSharing ? { screenStream: this.screenStream.id } : {}),
    };
  }

  /** @private */
  refreshLocalStream() {
    const want = [this.tracks.mic, this.outgoing('video')].filter((t) => t !== null);
    for (const t of this.localStream.getTracks()) if (!want.includes(t)) this.localStream.removeTrack(t);
    for (const t of want) if (t && !this.localStream.getTracks().includes(t)) this.localStream.addTrack(t);
    if (this.tracks.mic) this.tracks.mic.enabled = this.micEnabled;
    this.dispatchEvent(new CustomEvent('local-media', { detail: {} }));
  }

  /** @private */
  async mediaChanged() {
    this.refreshLocalStream();
    if (this.spare && !this.spareFits()) {
      this.dropSpare();
      this.scheduleSpare(0);
    }
    await Promise.all([...this.peers.values()].map((p) => p.updateSenders().catch((e) => console.warn(e))));
    await this.sfu?.updateSenders(this.outgoing('audio'), this.outgoing('video')).catch((e) => console.warn(e));
    const state = this.mediaState();
    for (const p of this.peers.values()) p.sendData(state);
  }

  /** @param {boolean} on */
  async setMicEnabled(on) {
    if (on && !this.tracks.mic) {
      const media = await getLocalMedia({ audio: true, video: false, audioDevice: this.devices.audio });
      if (!media.audio) {
        this.notice(`Microphone unavailable (${media.problems[0]?.error ?? 'error'})`);
        return;
      }
      this.tracks.mic = media.audio;
    }
    this.micEnabled = on;
    await this.mediaChanged();
  }

  /** Camera off stops the camera (its light goes off); on asks for it again. Neither renegotiates. @param {boolean} on */
  async setCameraEnabled(on) {
    if (on && !this.tracks.camera) {
      const media = await getLocalMedia({ audio: false, video: true, videoDevice: this.devices.video });
      if (!media.video) {
        this.notice(`Camera unavailable (${media.problems[0]?.error ?? 'error'})`);
        return;
      }
      this.tracks.camera = media.video;
      this.devices.video = media.video.getSettings().deviceId ?? this.devices.video;
    }
    if (!on && this.tracks.camera) {
      this.tracks.camera.stop();
      this.tracks.camera = null;
    }
    this.cameraEnabled = on;
    await this.mediaChanged();
  }

  /** Shares the screen beside the camera: a video track of its own to every peer (one renegotiation each). */
  async startScreenShare() {
    if (this.tracks.screen) return;
    if (!navigator.mediaDevices?.getDisplayMedia) {
      this.notice('Screen sharing is not supported by this browser');
      return;
    }
    /** @type {MediaStream} */
    let stream;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
    } catch (e) {
      if (/** @type {any} */ (e)?.name !== 'NotAllowedError') this.notice('Could not share the screen');
      return;
    }
    const track = stream.getVideoTracks()[0];
    if (!track) return;
    track.contentHint = 'detail';
    track.addEventListener('ended', () => {
      if (this.tracks.screen === track) this.stopScreenShare();
    });
    this.tracks.screen = track;
    this.screenStream = new MediaStream([track]);
    // The stream id goes first (data channel), so that the track is known as the screen when it arrives.
    await this.mediaChanged();
    for (const p of this.peers.values()) p.addScreen();
  }

  async stopScreenShare() {
    const t = this.tracks.screen;
    if (!t) return;
    this.tracks.screen = null;
    t.stop();
    for (const p of this.peers.values()) p.removeScreen();
    await this.mediaChanged();
  }

  /** Switches microphone or camera (replaceTrack on every connection). @param {'audio'|'video'} kind @param {string} deviceId */
  async switchDevice(kind, deviceId) {
    this.devices[kind] = deviceId;
    if (kind === 'audio') {
      if (!this.tracks.mic) return;
      const media = await getLocalMedia({ audio: true, video: false, audioDevice: deviceId });
      if (!media.audio) return this.notice('Could not open that microphone');
      this.tracks.mic.stop();
      this.tracks.mic = media.audio;
    } else {
      if (!this.tracks.camera) return;
      const media = await getLocalMedia({ audio: false, video: true, videoDevice: deviceId });
      if (!media.video) return this.notice('Could not open that camera');
      this.tracks.camera.stop();
      this.tracks.camera = media.video;
    }
    await this.mediaChanged();
  }

  /** Sends a chat message to everyone (and shows it locally). @param {string} text */
  sendChat(text) {
    text = text.trim().slice(0, MAX_CHAT_TEXT);
    if (!text) return;
    const msg = { type: 'chat', text, name: this.name, ts: Date.now() };
    for (const p of this.peers.values()) p.sendData(msg);
    this.dispatchEvent(new CustomEvent('chat', { detail: { from: this.id, name: this.name, text, ts: msg.ts, local: true } }));
  }

  /** @private @param {string} message */
  notice(message) {
    this.dispatchEvent(new CustomEvent('notice', { detail: { message } }));
  }

  /** @private */
  async refreshStats() {
    await Promise.all(
      [...this.peers.values()].map(async (p) => {
        if (p.closed || p.pc.connectionState === 'closed') return;
        try {
          p.stats = await summarize(p.pc, p.stats);
        } catch {
          /* closed meanwhile */
        }
      }),
    );
    this.dispatchEvent(new CustomEvent('stats', { detail: {} }));
  }

  /** @private */
  stopStats() {
    if (this.statsTimer) clearInterval(this.statsTimer);
    this.statsTimer = null;
  }

  /** Leaves the room, closes every connection and stops local media. */
  hangUp() {
    if (this.state === 'ended') return;
    this.signaling.leave();
    this.leaveSfu();
    this.closePeers();
    this.stopStats();
    this.releaseMedia();
    this.joined = false;
    this.setState('ended');
  }

  /**
   * After a failed join (`fatal`): gets local media again and joins again (with the signaling's current `token`,
   * `password` and `name`). @param {{audio: boolean, video: boolean}} want
   */
  async rejoin(want) {
    await this.prepare(want);
    this.join();
  }

  /** A plain-data picture of the call, for tests and debugging. */
  snapshot() {
    return {
      id: this.id,
      state: this.state,
      signaling: this.signaling.state,
      media: this.mediaState(),
      publish: this.publish,
      hand: this.handRaised,
      tracks: Object.fromEntries(Object.entries(this.tracks).map(([k, t]) => [k, t ? t.readyState : null])),
      mediaProblems: this.mediaProblems,
      peers: [...this.peers.values()].map((p) => ({
        id: p.id,
        name: p.name,
        polite: p.polite,
        connectionState: p.pc.connectionState,
        iceConnectionState: p.pc.iceConnectionState,
        signalingState: p.pc.signalingState,
        dataChannel: p.dc.readyState,
        remoteMedia: p.remoteMedia,
        hand: p.hand,
        iceRestarts: p.iceRestarts,
        stats: p.stats,
      })),
    };
  }
}
