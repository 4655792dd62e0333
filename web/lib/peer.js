// @ts-check
/**
 * One remote peer of a mesh call: its RTCPeerConnection with perfect negotiation (docs/protocol.md; the peer with
 * the smaller id is polite), trickle ICE, an ICE restart when the connection fails or stays disconnected, our
 * tracks on it, its tracks sorted into camera/microphone and screen, and the data channel (chat, media state,
 * name, hand). It belongs to a `Call` (call.js), which gives it our media, our name and the signaling client, and
 * on which it dispatches `peer-updated` and `chat`. No DOM.
 */

import { MAX_CHAT_TEXT, cleanName, createChatChannel, readMessage } from './channel.js';

/** How long a `disconnected` connection may stay so before an ICE restart. */
const DISCONNECTED_GRACE_MS = 3000;
/** Minimum time between two ICE restarts of one connection. */
const RESTART_MIN_INTERVAL_MS = 5000;
/** How long a newcomer waits for the offer of a peer already in the room before offering itself. */
const FIRST_OFFER_TIMEOUT_MS = 8000;

/** @typedef {import('./channel.js').MediaState} MediaState */
/** @typedef {import('./spare.js').Spare} Spare */
/** @typedef {import('./call.js').Call} Call */

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
    /** its media comes through the SFU now; closes soon (`retire`) */
    this.retired = false;
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
    const msg = readMessage(data);
    if (!msg) return;
    // Retired (the participant's media comes through the SFU now): what still arrives here belongs to its successor.
    const current = this.retired ? this.call.peers.get(this.id) : this;
    current?.handleData(msg);
  }

  /** A data channel message (or, in an SFU room, the `data` of a signaling message), parsed. @param {any} msg */
  handleData(msg) {
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
      // Which SFU m-line is the screen: kept for the `SfuRemote` that takes over from us when the room moves.
      if (typeof msg.screenMid === 'string' && msg.screenMid) /** @type {any} */ (this.remoteMedia).screenMid = msg.screenMid;
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

  /**
   * The participant's media comes through the SFU now (call.js): this connection leaves the UI at once but stays up
   * for `ms`, so the other side's tile of us keeps playing until its SFU media of us arrives too.
   * @param {number} ms
   */
  retire(ms) {
    this.retired = true;
    if (this.emitTimer) clearTimeout(this.emitTimer);
    this.emitTimer = null;
    if (this.disconnectTimer) clearTimeout(this.disconnectTimer);
    if (this.firstOfferTimer) clearTimeout(this.firstOfferTimer);
    this.pc.onconnectionstatechange = this.pc.onnegotiationneeded = null;
    if (ms <= 0) this.close();
    else setTimeout(() => this.close(), ms);
  }

  /** @private */
  emit() {
    if (this.closed || this.retired || this.emitTimer) return;
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
