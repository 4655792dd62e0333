// @ts-check
/**
 * A webcall call: local media, one `Peer` (peer.js) per remote peer (a mesh) or one connection to the server's SFU
 * (sfu.js), the signaling session that drives them, chat and media state over each peer's data channel
 * (channel.js), a spare peer connection built ahead (spare.js), stats. No DOM: the UI listens to events. How to use
 * it without our UI: README.md in this directory.
 *
 * Events (`CustomEvent`, data in `detail`):
 * - `state`        `{state}` — `joining`, `in-call`, `reconnecting`, `ended`, `failed`
 * - `peer-added`   `{peer}`; `peer-updated` `{peer}` (connection state, name, remote media, hand, stream); `peer-removed` `{peer}`
 * - `local-media`  `{}` — local tracks or their enabled state changed
 * - `chat`         `{from, name, text, ts, local}`
 * - `stats`        `{}` — every peer's `stats` was refreshed
 * - `fatal`        `{code, message}` from signaling (room full, …)
 * - `notice`       `{message}` — something the user should know (screen share ended, device failed, …)
 * - `recording`    `{active, by}` — the server started or stopped recording the room (`by`: a peer id, `api`, or null)
 * - `recording-error` `{code, message}` — `setRecording` was refused (no --record-dir, peer-to-peer room, no permission)
 */

import { summarize } from './stats.js';
import { SFU_PEER, SfuRemote, SfuSession } from './sfu.js';
import { MAX_CHAT_TEXT, cleanName } from './channel.js';
import { getLocalMedia } from './media.js';
import { Peer } from './peer.js';
import { SparePool } from './spare.js';

// What the page and other users of the library import from here (the modules they come from may move).
export { CHAT_CHANNEL, cleanName } from './channel.js';
export { getLocalMedia } from './media.js';
export { Peer } from './peer.js';

/** @typedef {import('./channel.js').MediaState} MediaState */

/** How long a peer-to-peer connection stays up after its participant's media moved to the SFU (the other side's move). */
const RETIRE_MS = 10000;

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
    /** The room is being recorded by the server (`recording` messages; docs/recording.md). */
    this.recording = false;
    /** our name changed since we joined (newcomers of an SFU room are told) */
    this.renamed = false;
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
    /** the spare peer connection, built ahead for the next peer (spare.js) */
    this.spares = new SparePool(this);
    /** @type {MediaStream|null} the stream our screen track is sent with (its id tells peers which track it is) */
    this.screenStream = null;
    /** @type {SfuSession|null} our one connection to the server in an SFU room (docs/protocol.md) */
    this.sfu = null;
    /** @type {string|null} the active speaker the server last announced (SFU rooms) */
    this.activeSpeaker = null;
    this.bindSignaling();
  }

  /** @returns {import('./spare.js').Spare|null} the spare peer connection (spare.js), if one is built */
  get spare() {
    return this.spares.spare;
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
    if (!this.joined) this.spares.build();
  }

  /** Connects to the room (after `prepare`). */
  join() {
    if (this.joined) return;
    this.joined = true;
    this.setState('joining');
    this.statsTimer = setInterval(() => this.refreshStats(), 1000);
    this.signaling.start();
    // While the WebSocket connects: the connection for a peer already in the room.
    if (!this.spare) this.spares.build();
  }

  /** @private */
  bindSignaling() {
    const s = this.signaling;
    s.addEventListener('state', (ev) => {
      const st = /** @type {CustomEvent} */ (ev).detail.state;
      if (st === 'reconnecting' && this.state === 'in-call') this.setState('reconnecting');
    });
    s.addEventListener('welcome', (ev) => {
      const w = /** @type {CustomEvent} */ (ev).detail;
      // A fresh session hears the room's recording state right after its welcome; a resumed one keeps it.
      if (!w.resumed) this.setRecordingState(false, null);
      this.onWelcome(w);
    });
    s.addEventListener('recording', (ev) => {
      const { active, by } = /** @type {CustomEvent} */ (ev).detail;
      this.setRecordingState(!!active, typeof by === 'string' ? by : null);
    });
    s.addEventListener('error', (ev) => {
      const e = /** @type {CustomEvent} */ (ev).detail;
      if (e.ref === 'record') {
        this.notice(`Recording: ${e.message ?? e.code}`);
        this.dispatchEvent(new CustomEvent('recording-error', { detail: { code: e.code, message: e.message } }));
      }
    });
    s.addEventListener('hello', (ev) => {
      const { from, name } = /** @type {CustomEvent} */ (ev).detail;
      if (this.sfu) {
        this.addRemote(from, name ?? '');
        // The newcomer learns what differs from the defaults (mesh peers say it when their data channel opens).
        this.announceState();
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
    s.addEventListener('data', (ev) => {
      const msg = /** @type {CustomEvent} */ (ev).detail;
      const peer = this.peers.get(msg.from);
      if (peer && msg.data && typeof msg.data === 'object') peer.handleData(msg.data);
    });
    s.addEventListener('bye', (ev) => this.removePeer(/** @type {CustomEvent} */ (ev).detail.from));
    s.addEventListener('topology', (ev) => {
      const { mode, restart } = /** @type {CustomEvent} */ (ev).detail;
      if (mode !== 'sfu') return;
      if (restart) this.restartSfu();
      else this.enterSfu();
    });
    s.addEventListener('speaker', (ev) => {
      // The server's active speaker of an SFU room (its id may be ours).
      this.activeSpeaker = String(/** @type {CustomEvent} */ (ev).detail.peer);
      this.dispatchEvent(new CustomEvent('speaker', { detail: { peer: this.activeSpeaker } }));
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
    this.spares.welcome(welcome);
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
    this.spares.inCall(others.length > 0);
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

  /** @private @param {string} id @param {string} name @param {boolean} initiator */
  addPeer(id, name, initiator) {
    const peer = new Peer(this, id, name, initiator, this.spares.take(initiator));
    this.peers.set(id, peer);
    this.dispatchEvent(new CustomEvent('peer-added', { detail: { peer } }));
    return peer;
  }

  /**
   * The room sends media through the server from now on: one connection to it replaces the mesh. Seamless: each
   * participant's peer-to-peer connection keeps its tile until the SFU brings that participant's video, and stays
   * up a while longer (`Peer.retire`) for the other side's move.
   */
  enterSfu() {
    if (this.sfu) return;
    this.spares.drop();
    const session = new SfuSession({
      signaling: this.signaling,
      config: this.pcConfig(),
      localStream: this.localStream,
      tracks: { audio: this.outgoing('audio'), video: this.outgoing('video') },
      publish: this.publish,
    });
    this.sfu = session;
    if (this.tracks.screen && this.screenStream) {
      session.addScreen(this.tracks.screen, this.screenStream).then(() => this.sendToAll(this.mediaState()));
    }
    this.announceState();
    /** @type {Map<string, {track: MediaStreamTrack, peerMid: string}[]>} tracks of participants whose peer-to-peer tile still shows */
    const waiting = new Map();
    // Peer-to-peer connections that are not up (a newcomer's, made from its welcome) have nothing to keep playing.
    for (const [id, p] of [...this.peers]) if (p.pc.connectionState !== 'connected') this.addRemote(id, p.name);
    /** @param {string} peer */
    const takeOver = (peer) => {
      const remote = this.addRemote(peer, this.peers.get(peer)?.name ?? '');
      for (const t of waiting.get(peer) ?? []) remote.addTrack(t.track, t.peerMid);
      waiting.delete(peer);
    };
    session.addEventListener('track', (ev) => {
      const { peer, track, peerMid } = /** @type {CustomEvent} */ (ev).detail;
      const remote = this.peers.get(peer);
      if (remote instanceof SfuRemote) return remote.addTrack(track, peerMid);
      // A peer-to-peer connection keeps its tile until the SFU's video of that participant arrives (a seamless move).
      waiting.set(peer, [...(waiting.get(peer) ?? []), { track, peerMid }]);
      if (track.kind !== 'video') return; // audio moves with the video (or with the fallback below)
      // Switch once the SFU's video has decoded a frame: its first packets (unmute) may come before a keyframe.
      const still = () => this.sfu === session && waiting.has(peer);
      const ready = () => still() && decoded(session.pc, track).then(() => still() && takeOver(peer));
      if (!track.muted) return ready();
      track.addEventListener('unmute', ready, { once: true });
    });
    session.addEventListener('state', () => {
      if (session.pc.connectionState !== 'connected') return;
      // Participants that send no video through the SFU move over a moment after it connects.
      setTimeout(() => {
        if (this.sfu !== session) return;
        for (const [id, p] of [...this.peers]) if (!(p instanceof SfuRemote)) takeOver(id);
      }, 5000);
    });
    // Our screen's mid can change (an offer of ours rolled back in a glare, then made again): the others must know it.
    let toldScreenMid = '';
    session.addEventListener('offered', () => {
      const mid = session.screenMid;
      if (this.screenSharing && mid && mid !== toldScreenMid) {
        toldScreenMid = mid;
        this.sendToAll(this.mediaState());
      }
    });
    session.addEventListener('track-ended', (ev) => {
      for (const p of this.peers.values()) if (p instanceof SfuRemote) p.removeTrack(/** @type {CustomEvent} */ (ev).detail.track);
    });
    session.addEventListener('state', () => {
      for (const p of this.peers.values()) this.emitRemote(p);
    });
  }

  /**
   * The room's SFU moved (with --redis, the server node that ran it died): a new connection to the new one. The
   * participants' tiles stay and take the tracks the new connection brings. @private
   */
  restartSfu() {
    if (!this.sfu) return this.enterSfu();
    this.leaveSfu();
    this.enterSfu();
    for (const p of this.peers.values()) if (p instanceof SfuRemote) p.rebind(/** @type {SfuSession} */ (this.sfu));
  }

  /** @private */
  leaveSfu() {
    this.sfu?.close();
    this.sfu = null;
  }

  /**
   * The participant `id` as seen through the SFU. A peer-to-peer `Peer` of it is replaced in place (same tile, no
   * leave/join) and retired. @private @param {string} id @param {string} name
   */
  addRemote(id, name) {
    if (!this.sfu) throw new Error('not in an SFU room');
    const existing = this.peers.get(id);
    if (existing instanceof SfuRemote) return existing;
    /** @type {SfuRemote} */
    const remote = new SfuRemote(id, name, this.sfu, this, () => this.emitRemote(remote));
    this.peers.set(id, /** @type {any} */ (remote));
    if (existing) {
      remote.inherit(existing);
      // Only a connected one has pictures to keep up (the other side's tile of us, too).
      existing.retire(existing.pc.connectionState === 'connected' ? RETIRE_MS : 0);
      this.emitRemote(remote);
    } else {
      this.dispatchEvent(new CustomEvent('peer-added', { detail: { peer: remote } }));
    }
    return remote;
  }

  /**
   * To everyone in the call: over each data channel in a peer-to-peer room, as signaling `data` in an SFU room.
   * @param {object} msg
   */
  sendToAll(msg) {
    if (this.sfu) this.signaling.send({ type: 'data', data: msg });
    else for (const p of this.peers.values()) p.sendData(msg);
  }

  /** In an SFU room: says what differs from a newcomer's defaults (muted, camera off, sharing, hand, a new name). @private */
  announceState() {
    const st = this.mediaState();
    if (!st.audio || !st.video || st.screen) this.sendToAll(st);
    if (this.handRaised) this.sendToAll({ type: 'hand', raised: true });
    if (this.renamed) this.sendToAll({ type: 'name', name: this.name });
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
    this.spares.drop();
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
    this.renamed = true;
    this.sendToAll({ type: 'name', name });
    this.dispatchEvent(new CustomEvent('local-media', { detail: {} }));
  }

  /** Raises or lowers our hand (data channel `hand`). @param {boolean} raised */
  setHand(raised) {
    this.handRaised = raised;
    this.sendToAll({ type: 'hand', raised });
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
      ...(this.sfu?.screenMid && this.screenSharing ? { screenMid: this.sfu.screenMid } : {}),
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
    this.spares.refit();
    await Promise.all([...this.peers.values()].map((p) => p.updateSenders().catch((e) => console.warn(e))));
    await this.sfu?.updateSenders(this.outgoing('audio'), this.outgoing('video')).catch((e) => console.warn(e));
    this.sendToAll(this.mediaState());
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
    // Through the SFU: on an m-line of our own, whose mid the others learn next (`screenMid`).
    if (this.sfu) {
      await this.sfu.addScreen(track, this.screenStream);
      this.sendToAll(this.mediaState());
    }
  }

  async stopScreenShare() {
    const t = this.tracks.screen;
    if (!t) return;
    this.tracks.screen = null;
    t.stop();
    for (const p of this.peers.values()) p.removeScreen();
    await this.sfu?.removeScreen().catch(() => {});
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
    this.sendToAll(msg);
    this.dispatchEvent(new CustomEvent('chat', { detail: { from: this.id, name: this.name, text, ts: msg.ts, local: true } }));
  }

  /** Asks the server to start or stop recording the room (SFU rooms; the server says who may). @param {boolean} on */
  setRecording(on) {
    this.signaling.send({ type: 'record', action: on ? 'start' : 'stop' });
  }

  /** @private @param {boolean} active @param {string|null} by */
  setRecordingState(active, by) {
    const changed = active !== this.recording;
    this.recording = active;
    if (changed || by) this.dispatchEvent(new CustomEvent('recording', { detail: { active, by } }));
  }

  /** @private @param {string} message */
  notice(message) {
    this.dispatchEvent(new CustomEvent('notice', { detail: { message } }));
  }

  /** @private */
  async refreshStats() {
    // One getStats per connection: in an SFU room every participant shares the one to the server.
    /** @type {Map<RTCPeerConnection, any[]>} */
    const byPc = new Map();
    for (const p of this.peers.values()) {
      if (p.closed || p.pc.connectionState === 'closed') continue;
      byPc.set(p.pc, [...(byPc.get(p.pc) ?? []), p]);
    }
    await Promise.all(
      [...byPc].map(async ([pc, peers]) => {
        try {
          const stats = await summarize(pc, peers[0].stats);
          for (const p of peers) p.stats = stats;
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

/**
 * Resolves when `track` has decoded a frame (inbound-rtp `framesDecoded`), or after `boundMs` (so a browser without
 * that figure, or a publisher that stays silent, still moves).
 * @param {RTCPeerConnection} pc @param {MediaStreamTrack} track @param {number} [boundMs]
 * @returns {Promise<void>}
 */
async function decoded(pc, track, boundMs = 4000) {
  const until = Date.now() + boundMs;
  while (Date.now() < until && pc.connectionState !== 'closed') {
    try {
      const stats = await pc.getStats(track);
      for (const s of stats.values()) if (s.type === 'inbound-rtp' && (s.framesDecoded ?? 0) > 0) return;
    } catch {
      return; // the receiver went away: nothing to wait for
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}
