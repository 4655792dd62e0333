// @ts-check
/**
 * The spare peer connection of a call (at most one): built ahead, so that the next peer's connection costs nothing
 * on the call's path. No DOM.
 */

import { createChatChannel } from './channel.js';

/** How long after a use (or a welcome into a busy room) the next spare peer connection is built. */
const SPARE_DELAY_MS = 3000;

/** @typedef {import('./call.js').Call} Call */

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
 *   made and set ahead (`SparePool.prime`): the SDP, or null when that failed; null: not primed (it may answer)
 * @property {string|null} sdp that offer's SDP once it is set
 * @property {(RTCIceCandidateInit|null)[]} candidates local candidates of a primed spare, held until it is taken
 */

/** Builds, primes, hands out and drops the spare of one call, as the call's state and media change. */
export class SparePool {
  /** @param {Call} call the call it builds for (its id, state, ICE servers, media and peer connection config) */
  constructor(call) {
    this.call = call;
    /** @type {Spare|null} */
    this.spare = null;
    /** @type {ReturnType<typeof setTimeout>|null} a spare to build */
    this.timer = null;
    /** @type {number|null} */
    this.idle = null;
  }

  /** Whether the spare (if any) still fits our id, ICE servers and tracks. @param {string|null} [id] our id */
  fits(id = this.call.id) {
    const s = this.spare;
    const call = this.call;
    return (
      !!s &&
      s.forId === id &&
      s.iceKey === JSON.stringify(call.signaling.iceServers) &&
      s.pc.signalingState === (s.offer && s.pc.localDescription ? 'have-local-offer' : 'stable') &&
      (s.audioTx?.sender.track ?? null) === call.outgoing('audio') &&
      (s.videoTx?.sender.track ?? null) === call.outgoing('video')
    );
  }

  /** Builds the spare peer connection now (unless there is one, or the room is on the SFU). */
  build() {
    const call = this.call;
    if (this.spare || call.sfu || typeof RTCPeerConnection === 'undefined') return;
    try {
      const pc = new RTCPeerConnection(call.pcConfig());
      const dc = createChatChannel(pc);
      /** @type {Spare} */
      const spare = { pc, dc, audioTx: null, videoTx: null, iceKey: JSON.stringify(call.signaling.iceServers), forId: call.id, offer: null, sdp: null, candidates: [] };
      for (const kind of /** @type {const} */ (['audio', 'video'])) {
        const track = call.outgoing(kind);
        if (!track) continue;
        const sender = pc.addTrack(track, call.localStream);
        const tx = pc.getTransceivers().find((t) => t.sender === sender) ?? null;
        if (kind === 'audio') spare.audioTx = tx;
        else spare.videoTx = tx;
      }
      this.spare = spare;
    } catch (e) {
      console.warn('spare peer connection', e);
    }
    this.prime();
  }

  /**
   * Once we are in the room, the spare waits for a `hello`, to which we send the first offer: that offer is made
   * and set now (with transceivers for the kinds we have no track for, as Peer.addOwnTransceivers), and its
   * candidates are held, so that on the `hello` it goes out at once. A spare built before the welcome is not
   * primed: it may answer the offer of a peer already in the room.
   */
  prime() {
    const spare = this.spare;
    const call = this.call;
    if (!spare || spare.offer || call.state !== 'in-call' || !call.id || spare.forId !== call.id) return;
    const pc = spare.pc;
    pc.onicecandidate = ({ candidate }) => {
      if (candidate && !candidate.candidate) return;
      spare.candidates.push(candidate ? candidate.toJSON() : null);
    };
    spare.offer = (async () => {
      try {
        const direction = call.direction();
        if (!spare.audioTx) spare.audioTx = pc.addTransceiver('audio', { direction, streams: [call.localStream] });
        if (!spare.videoTx) spare.videoTx = pc.addTransceiver('video', { direction, streams: [call.localStream] });
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
   * room and after each use, the delay keeps the build clear of the call being set up.
   * @param {number} delay
   */
  schedule(delay) {
    if (this.spare || this.timer !== null || this.call.state !== 'in-call') return;
    const build = () => {
      this.timer = this.idle = null;
      if (this.call.state === 'in-call') this.build();
    };
    this.timer = setTimeout(() => {
      if (typeof requestIdleCallback === 'function') this.idle = requestIdleCallback(build, { timeout: 1000 });
      else build();
    }, delay);
  }

  /**
   * The spare peer connection if it still fits (else none: it is dropped), and a new one to come. A primed spare
   * (our offer set) is only for a peer we offer to; for another it stays. @param {boolean} initiator
   */
  take(initiator) {
    if (this.spare?.offer && !initiator) return null;
    const fits = this.fits();
    const spare = fits ? this.spare : null;
    if (fits) this.spare = null;
    else this.drop();
    this.schedule(SPARE_DELAY_MS);
    return spare;
  }

  /** Closes the spare and cancels the one to come. */
  drop() {
    if (this.timer !== null) clearTimeout(this.timer);
    if (this.idle !== null) cancelIdleCallback(this.idle);
    this.timer = this.idle = null;
    if (this.spare) {
      this.spare.pc.close();
      this.spare = null;
    }
  }

  /**
   * A welcome came (before our id and peers are taken from it). A spare built for another id or other ICE servers
   * (TURN credentials are minted per welcome) is no use; one built before the first welcome gets this welcome's ICE
   * servers (no gathering has started on it). @param {any} welcome
   */
  welcome(welcome) {
    const iceServers = this.call.signaling.iceServers;
    if (this.spare?.forId === null && (welcome.idChanged || !welcome.resumed)) {
      try {
        this.spare.pc.setConfiguration({ ...this.spare.pc.getConfiguration(), iceServers });
        this.spare.iceKey = JSON.stringify(iceServers);
        this.spare.forId = welcome.id;
      } catch (e) {
        console.warn('spare setConfiguration', e);
      }
    }
    if (this.spare && !this.fits(welcome.id)) this.drop();
  }

  /** We are in the room: prime the spare, or build one (soon if the room has others, whose calls come first). @param {boolean} busy */
  inCall(busy) {
    this.prime();
    this.schedule(busy ? SPARE_DELAY_MS : 0);
  }

  /** Our tracks changed: a spare that no longer fits is replaced. */
  refit() {
    if (this.spare && !this.fits()) {
      this.drop();
      this.schedule(0);
    }
  }
}
