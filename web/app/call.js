// @ts-check
/** The call page (/r/<room>): DOM around the client library in /lib. */

import { Signaling, defaultSignalingUrl } from '../lib/signaling.js';
import { Call } from '../lib/call.js';
import { formatBitrate } from '../lib/stats.js';

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const params = new URLSearchParams(location.search);
const room = decodeURIComponent(location.pathname.replace(/^\/r\//, '').replace(/\/$/, ''));
const flag = (/** @type {string} */ k, /** @type {boolean} */ dflt) => {
  const v = params.get(k);
  return v === null ? dflt : !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
};
const want = { audio: flag('audio', true), video: flag('video', true) };
const relayOnly = flag('relay', false);
const name = (params.get('name') ?? localStorage.getItem('webcall.name') ?? '').trim().slice(0, 64) ||
  `Guest ${Math.floor(1000 + Math.random() * 9000)}`;

document.title = `${room} · webcall`;
$('room-name').textContent = room;

// ---------------------------------------------------------------------------------------------------------------
// Overlay, banner, toast

/**
 * @param {string} title @param {string} text
 * @param {{label: string, primary?: boolean, action: () => void}[]} actions
 * @param {string} kind a stable name for tests and styling
 */
function showOverlay(title, text, actions, kind) {
  $('overlay-title').textContent = title;
  $('overlay-text').textContent = text;
  const box = $('overlay-actions');
  box.replaceChildren(
    ...actions.map((a) => {
      const b = document.createElement('button');
      b.className = `btn ${a.primary ? 'primary' : 'ghost'}`;
      b.textContent = a.label;
      b.onclick = a.action;
      return b;
    }),
  );
  $('overlay').dataset.kind = kind;
  $('overlay').hidden = false;
}
const homeAction = { label: 'Start another call', action: () => (location.href = '/') };
const rejoinAction = { label: 'Rejoin', primary: true, action: () => location.reload() };

/** @param {string|null} text @param {'info'|'warn'|'error'} [level] @param {string} [kind] */
function setBanner(text, level = 'info', kind = '') {
  const b = $('banner');
  b.hidden = !text;
  b.textContent = text ?? '';
  b.dataset.level = level;
  b.dataset.kind = kind;
}

/** @type {ReturnType<typeof setTimeout>|undefined} */
let toastTimer;
/** @param {string} text */
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 3500);
}

// ---------------------------------------------------------------------------------------------------------------
// Browser support

function unsupportedReason() {
  if (!window.isSecureContext) return 'Calls need a secure page: open this link over https:// (or on localhost).';
  if (typeof RTCPeerConnection !== 'function' || !('restartIce' in RTCPeerConnection.prototype)) {
    return 'This browser does not support modern WebRTC. Use a current Chrome, Edge, Firefox or Safari.';
  }
  if (!navigator.mediaDevices?.getUserMedia) return 'This browser cannot use a camera or microphone.';
  if (typeof WebSocket !== 'function') return 'This browser does not support WebSockets.';
  return null;
}

const unsupported = unsupportedReason();
if (unsupported) {
  document.body.dataset.phase = 'unsupported';
  showOverlay('Browser not supported', unsupported, [homeAction], 'unsupported');
  throw new Error(unsupported);
}

// ---------------------------------------------------------------------------------------------------------------
// The call

// `?sfu=1`: this page speaks the SFU messages, so the server may move the room to its SFU (opt-in for now).
const signaling = new Signaling({ url: defaultSignalingUrl(), room, name, sfu: params.get('sfu') === '1' });
const call = new Call({ signaling, name, relayOnly });
/** Test and debugging hook. */
// @ts-ignore
window.webcall = { call, signaling, room, name, snapshot: () => call.snapshot() };

const grid = $('grid');
/** @type {Map<string, HTMLElement>} peer id (or 'local') → tile */
const tiles = new Map();

/** @param {string} id @param {string} label */
function makeTile(id, label) {
  const tpl = /** @type {HTMLTemplateElement} */ ($('tile-tpl'));
  const tile = /** @type {HTMLElement} */ (/** @type {Element} */ (tpl.content.firstElementChild).cloneNode(true));
  tile.dataset.peer = id;
  setTileName(tile, label);
  tiles.set(id, tile);
  grid.append(tile);
  layout();
  return tile;
}

/** @param {HTMLElement} tile @param {string} label */
function setTileName(tile, label) {
  const plain = label.replace(/\s*\(you\)$/, '');
  /** @type {HTMLElement} */ (tile.querySelector('.name')).textContent = label;
  /** @type {HTMLElement} */ (tile.querySelector('.avatar span')).textContent = initials(plain);
  tile.style.setProperty('--hue', String(hue(plain)));
}

/** @param {string} s */
const initials = (s) =>
  s
    .split(/\s+/)
    .filter(Boolean)
    .slice(0, 2)
    .map((w) => w[0].toUpperCase())
    .join('') || '?';
/** @param {string} s */
const hue = (s) => [...s].reduce((h, c) => (h * 31 + c.charCodeAt(0)) % 360, 17);

function layout() {
  const n = grid.children.length;
  grid.dataset.count = String(n);
  // Someone presenting (remote screen share): their tile takes the stage, the others line up beside it.
  const presenter = /** @type {HTMLElement|null} */ (grid.querySelector('.tile:not(.local)[data-screen="on"]'));
  for (const t of grid.querySelectorAll('.tile.presenting')) if (t !== presenter) t.classList.remove('presenting');
  if (presenter && n > 1) {
    presenter.classList.add('presenting');
    grid.dataset.layout = 'spotlight';
    grid.style.setProperty('--others', String(n - 1));
  } else {
    delete grid.dataset.layout;
  }
  const cols = n <= 1 ? 1 : n <= 4 ? 2 : n <= 9 ? 3 : 4;
  grid.style.setProperty('--cols', String(cols));
  grid.style.setProperty('--rows', String(Math.ceil(n / cols)));
  $('people').textContent = String(n);
  $('people').title = `${n} ${n === 1 ? 'person' : 'people'} in the call`;
}

const STATE_TEXT = /** @type {Record<string, string>} */ ({
  new: 'Connecting…',
  connecting: 'Connecting…',
  connected: '',
  disconnected: 'Connection unstable — reconnecting…',
  failed: 'Connection failed — retrying…',
  closed: 'Disconnected',
});

const localTile = makeTile('local', `${name} (you)`);
localTile.classList.add('local');
localTile.dataset.state = 'connected';
const localVideo = /** @type {HTMLVideoElement} */ (localTile.querySelector('video'));
localVideo.muted = true;

function renderLocal() {
  const st = call.mediaState();
  localTile.dataset.audio = st.audio ? 'on' : 'off';
  localTile.dataset.video = st.video ? 'on' : 'off';
  localTile.dataset.screen = st.screen ? 'on' : 'off';
  /** @type {HTMLElement} */ (localTile.querySelector('.tag')).textContent = st.screen ? 'Presenting' : '';
  // Only attach a stream that has video: a <video> with an empty stream would delay the page's load event forever.
  const src = call.localStream.getVideoTracks().length ? call.localStream : null;
  if (localVideo.srcObject !== src) localVideo.srcObject = src;
  if (src) localVideo.play().catch(() => {});
  setCtl('btn-mic', !!call.tracks.mic && call.micEnabled, call.micEnabled ? 'Mute microphone (m)' : 'Unmute microphone (m)');
  setCtl('btn-cam', call.cameraEnabled && !!call.tracks.camera, call.cameraEnabled ? 'Turn camera off (c)' : 'Turn camera on (c)');
  setCtl('btn-screen', st.screen, st.screen ? 'Stop sharing' : 'Share screen');
}

/** @param {string} id @param {boolean} on @param {string} title */
function setCtl(id, on, title) {
  const b = $(id);
  b.dataset.on = String(on);
  b.title = title;
  b.setAttribute('aria-pressed', String(on));
}

/** @param {import('../lib/call.js').Peer} peer */
function renderPeer(peer) {
  let tile = tiles.get(peer.id);
  if (!tile) tile = makeTile(peer.id, peer.name || 'Guest');
  setTileName(tile, peer.name || 'Guest');
  const state = peer.pc.connectionState;
  tile.dataset.state = state;
  let text = STATE_TEXT[state] ?? state;
  if (state === 'failed' && relayOnly && signaling.iceServers.every((s) => !JSON.stringify(s.urls).includes('turn'))) {
    text = 'Connection failed: relay-only mode, but the server offers no TURN relay';
  }
  /** @type {HTMLElement} */ (tile.querySelector('.tile-state')).textContent = text;
  const videoTrack = peer.remoteStream.getVideoTracks()[0];
  const videoOn = peer.remoteMedia.video && !!videoTrack && !videoTrack.muted;
  tile.dataset.audio = peer.remoteMedia.audio ? 'on' : 'off';
  tile.dataset.video = videoOn ? 'on' : 'off';
  const screenBefore = tile.dataset.screen;
  tile.dataset.screen = peer.remoteMedia.screen ? 'on' : 'off';
  if (screenBefore !== tile.dataset.screen) layout();
  /** @type {HTMLElement} */ (tile.querySelector('.tag')).textContent = peer.remoteMedia.screen ? 'Presenting' : '';
  const video = /** @type {HTMLVideoElement} */ (tile.querySelector('video'));
  // Attach once there are tracks (an empty stream would hold the page's load event).
  if (video.srcObject !== peer.remoteStream && peer.remoteStream.getTracks().length) {
    video.srcObject = peer.remoteStream;
  }
  if (video.paused && peer.remoteStream.getTracks().length) {
    video.play().catch((e) => {
      if (e?.name === 'NotAllowedError') {
        // Autoplay with sound was refused: play muted and offer to turn the sound on.
        video.muted = true;
        video.play().catch(() => {});
        showSoundButton();
      }
    });
  }
}

function showSoundButton() {
  if (document.getElementById('btn-sound')) return;
  const b = document.createElement('button');
  b.id = 'btn-sound';
  b.className = 'btn primary sound';
  b.textContent = 'Click to turn sound on';
  b.onclick = () => {
    for (const [id, t] of tiles) {
      if (id === 'local') continue;
      const v = /** @type {HTMLVideoElement} */ (t.querySelector('video'));
      v.muted = false;
      v.play().catch(() => {});
    }
    b.remove();
  };
  document.body.append(b);
}

call.addEventListener('local-media', renderLocal);
call.addEventListener('peer-added', (ev) => renderPeer(/** @type {CustomEvent} */ (ev).detail.peer));
call.addEventListener('peer-updated', (ev) => renderPeer(/** @type {CustomEvent} */ (ev).detail.peer));
call.addEventListener('peer-removed', (ev) => {
  const peer = /** @type {CustomEvent} */ (ev).detail.peer;
  const tile = tiles.get(peer.id);
  tiles.delete(peer.id);
  tile?.remove();
  layout();
  if (call.state === 'in-call' && peer.name) toast(`${peer.name} left the call`);
});
call.addEventListener('notice', (ev) => toast(/** @type {CustomEvent} */ (ev).detail.message));

call.addEventListener('state', (ev) => {
  const state = /** @type {CustomEvent} */ (ev).detail.state;
  document.body.dataset.phase = state;
  const pill = $('conn-pill');
  pill.dataset.state = state;
  pill.textContent = { joining: 'Connecting…', 'in-call': 'Connected', reconnecting: 'Reconnecting…', ended: 'Left', failed: 'Offline' }[
    /** @type {string} */ (state)
  ] ?? state;
  if (state === 'in-call') {
    setBanner(mediaProblemText(), 'warn', call.mediaProblems.length ? 'media' : '');
  }
  if (state === 'ended') {
    for (const [id, t] of tiles) if (id !== 'local') t.remove();
    showOverlay('You left the call', `Room “${room}”.`, [rejoinAction, homeAction], 'ended');
  }
});

signaling.addEventListener('state', (ev) => {
  const { state, delay } = /** @type {CustomEvent} */ (ev).detail;
  if (state === 'reconnecting' && call.state !== 'ended') {
    const secs = delay ? ` (retrying in ${Math.max(1, Math.round(delay / 1000))} s)` : '';
    setBanner(`Connection to the server lost — reconnecting…${secs}`, 'warn', 'reconnecting');
  }
});

call.addEventListener('fatal', (ev) => {
  const { code, message } = /** @type {CustomEvent} */ (ev).detail;
  setBanner(null);
  for (const [id, t] of tiles) if (id !== 'local') t.remove();
  layout();
  if (code === 'room-full') {
    showOverlay('This room is full', `“${room}” already has as many people as it can hold. Try again later or start another call.`, [
      { label: 'Try again', primary: true, action: () => location.reload() },
      homeAction,
    ], 'room-full');
  } else if (code === 'resumed-elsewhere') {
    showOverlay('Call opened elsewhere', 'You joined this call from another tab or window, so this one was disconnected.', [rejoinAction, homeAction], 'resumed-elsewhere');
  } else if (code === 'unreachable') {
    showOverlay('Cannot reach the server', 'The connection to the server was lost and could not be restored.', [
      { label: 'Try again', primary: true, action: () => location.reload() },
      homeAction,
    ], 'unreachable');
  } else {
    showOverlay('Could not join the call', message ?? code, [rejoinAction, homeAction], code);
  }
});

function mediaProblemText() {
  const p = call.mediaProblems;
  if (!p.length) return null;
  const what = (/** @type {string} */ kind) => (kind === 'audio' ? 'microphone' : 'camera');
  const why = (/** @type {string} */ e) =>
    ({ denied: 'access was denied', missing: 'none was found', busy: 'it is in use by another app', unsupported: 'this browser cannot use it' })[e] ??
    `it failed (${e})`;
  const parts = p.map((x) => `no ${what(x.kind)}: ${why(x.error)}`);
  const mode = call.tracks.mic ? (call.tracks.camera ? '' : ' You joined with audio only.') : call.tracks.camera ? ' You joined with video only.' : ' You joined receive-only: you can see and hear the others.';
  return `${parts.join('; ')[0].toUpperCase()}${parts.join('; ').slice(1)}.${mode}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Stats

let statsOn = false;
function toggleStats() {
  statsOn = !statsOn;
  document.body.dataset.stats = statsOn ? 'on' : 'off';
  setCtl('btn-stats', statsOn, 'Connection stats (s)');
  renderStats();
}
function renderStats() {
  if (!statsOn) return;
  for (const peer of call.peers.values()) {
    const tile = tiles.get(peer.id);
    const s = peer.stats;
    if (!tile) continue;
    const pre = /** @type {HTMLElement} */ (tile.querySelector('.tile-stats'));
    if (!s) {
      pre.textContent = 'no stats yet';
      continue;
    }
    const v = s.videoIn;
    const o = s.videoOut;
    pre.textContent = [
      `path     ${s.pairType ?? '–'}${s.remotePairType ? ` ↔ ${s.remotePairType}` : ''}${s.protocol ? ` (${s.protocol})` : ''}`,
      `rtt      ${s.rtt === null ? '–' : `${Math.round(s.rtt * 1000)} ms`}`,
      `in       ${formatBitrate(s.bitrateIn)}`,
      `out      ${formatBitrate(s.bitrateOut)}`,
      `video in ${v && v.width ? `${v.width}×${v.height} @ ${v.fps ?? 0} fps` : '–'}`,
      `video out${o ? ` ${o.width}×${o.height} @ ${o.fps ?? 0} fps` : ' –'}`,
      `lost     ${s.packetsLost} packets`,
    ].join('\n');
  }
}
call.addEventListener('stats', renderStats);

// ---------------------------------------------------------------------------------------------------------------
// Chat

const chatLog = $('chat-log');
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));
let unread = 0;
function setChatOpen(/** @type {boolean} */ open) {
  document.body.dataset.chat = open ? 'open' : 'closed';
  setCtl('btn-chat', open, 'Chat');
  if (open) {
    unread = 0;
    $('chat-badge').hidden = true;
    chatInput.focus();
  }
}
call.addEventListener('chat', (ev) => {
  const { name: from, text, ts, local } = /** @type {CustomEvent} */ (ev).detail;
  const li = document.createElement('li');
  li.className = local ? 'me' : 'them';
  const head = document.createElement('div');
  head.className = 'meta';
  const who = document.createElement('b');
  who.textContent = local ? 'You' : from || 'Guest';
  const when = document.createElement('time');
  const d = new Date(ts);
  when.dateTime = d.toISOString();
  when.textContent = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  head.append(who, when);
  const body = document.createElement('p');
  body.textContent = text;
  li.append(head, body);
  chatLog.append(li);
  chatLog.scrollTop = chatLog.scrollHeight;
  if (!local && document.body.dataset.chat !== 'open') {
    unread++;
    $('chat-badge').textContent = String(unread);
    $('chat-badge').hidden = false;
    toast(`${from || 'Guest'}: ${text.length > 60 ? `${text.slice(0, 60)}…` : text}`);
  }
});
$('chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  call.sendChat(chatInput.value);
  chatInput.value = '';
});
$('chat-close').onclick = () => setChatOpen(false);

// ---------------------------------------------------------------------------------------------------------------
// Devices

async function fillDevices() {
  let devices = [];
  try {
    devices = await navigator.mediaDevices.enumerateDevices();
  } catch {
    return;
  }
  /** @param {string} selId @param {MediaDeviceKind} kind @param {string|null} current */
  const fill = (selId, kind, current) => {
    const sel = /** @type {HTMLSelectElement} */ ($(selId));
    const list = devices.filter((d) => d.kind === kind && d.deviceId);
    sel.replaceChildren(
      ...list.map((d, i) => {
        const o = document.createElement('option');
        o.value = d.deviceId;
        o.textContent = d.label || `${kind === 'audioinput' ? 'Microphone' : kind === 'videoinput' ? 'Camera' : 'Speaker'} ${i + 1}`;
        o.selected = d.deviceId === current;
        return o;
      }),
    );
    sel.disabled = list.length === 0;
    return list.length;
  };
  fill('sel-audio', 'audioinput', call.devices.audio);
  fill('sel-video', 'videoinput', call.devices.video);
  const hasSink = 'setSinkId' in HTMLMediaElement.prototype;
  $('lbl-speaker').hidden = !hasSink || fill('sel-speaker', 'audiooutput', null) === 0;
}
function toggleDevices() {
  const pop = $('devices');
  pop.hidden = !pop.hidden;
  setCtl('btn-devices', !pop.hidden, 'Choose devices');
  if (!pop.hidden) fillDevices();
}
$('sel-audio').addEventListener('change', (ev) => call.switchDevice('audio', /** @type {HTMLSelectElement} */ (ev.target).value));
$('sel-video').addEventListener('change', (ev) => call.switchDevice('video', /** @type {HTMLSelectElement} */ (ev.target).value));
$('sel-speaker').addEventListener('change', (ev) => {
  const id = /** @type {HTMLSelectElement} */ (ev.target).value;
  for (const [pid, t] of tiles) {
    if (pid !== 'local') /** @type {any} */ (t.querySelector('video')).setSinkId?.(id).catch(() => {});
  }
});
document.addEventListener('click', (ev) => {
  const pop = $('devices');
  if (!pop.hidden && !(/** @type {Element} */ (ev.target).closest('.devices-wrap'))) toggleDevices();
});

// ---------------------------------------------------------------------------------------------------------------
// Controls and shortcuts

const toggleMic = () => call.setMicEnabled(!(call.micEnabled && call.tracks.mic));
const toggleCam = () => call.setCameraEnabled(!(call.cameraEnabled && call.tracks.camera));
const hangUp = () => call.hangUp();

$('btn-mic').onclick = toggleMic;
$('btn-cam').onclick = toggleCam;
$('btn-screen').onclick = () => (call.screenSharing ? call.stopScreenShare() : call.startScreenShare());
$('btn-chat').onclick = () => setChatOpen(document.body.dataset.chat !== 'open');
$('btn-stats').onclick = toggleStats;
$('btn-devices').onclick = toggleDevices;
$('btn-hangup').onclick = hangUp;
$('btn-invite').onclick = async () => {
  const link = `${location.origin}/r/${encodeURIComponent(room)}`;
  try {
    await navigator.clipboard.writeText(link);
    toast('Invite link copied — send it to the people you want to call');
  } catch {
    prompt('Copy this invite link:', link);
  }
};

document.addEventListener('keydown', (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat) return;
  const target = /** @type {Element} */ (ev.target);
  if (target.closest('input, textarea, select, [contenteditable]')) {
    if (ev.key === 'Escape') /** @type {HTMLElement} */ (target).blur();
    return;
  }
  if (call.state === 'ended' || call.state === 'failed') return;
  const key = ev.key.toLowerCase();
  if (key === 'm') toggleMic();
  else if (key === 'c') toggleCam();
  else if (key === 's') toggleStats();
  else if (key === 'q') hangUp();
  else return;
  ev.preventDefault();
});

// Leaving the page says bye, so the others see us go at once (and our seat is free for a reload).
addEventListener('pagehide', () => {
  if (call.state !== 'ended') call.hangUp();
});

renderLocal();
// `?defer`: get the media and show the preview, but join only when `window.webcall.join()` is called (benchmarks:
// the page is loaded and painted, with its camera running, before the measured join).
const deferJoin = params.has('defer');
// @ts-ignore
window.webcall.join = () => call.join();
(deferJoin ? call.prepare(want) : call.start(want)).then(() => {
  renderLocal();
  if (call.mediaProblems.length) setBanner(mediaProblemText(), 'warn', 'media');
  navigator.mediaDevices.addEventListener?.('devicechange', () => {
    if (!$('devices').hidden) fillDevices();
  });
});
