// @ts-check
/** The call page (/r/<room>): pre-join screen, then the call; DOM around the client library in /lib. */

import { Signaling, defaultSignalingUrl } from '../lib/signaling.js';
import { Call, cleanName, getLocalMedia } from '../lib/call.js';
import { formatBitrate } from '../lib/stats.js';
import { bestGrid, tileOrder, tilesPerPage } from './layout.js';
import { closeDialog, dialogOpen, openDialog } from './dialog.js';
import { watchViews } from './views.js';

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

const params = new URLSearchParams(location.search);
const room = decodeURIComponent(location.pathname.replace(/^\/r\//, '').replace(/\/$/, ''));
const flag = (/** @type {string} */ k, /** @type {boolean} */ dflt) => {
  const v = params.get(k);
  return v === null ? dflt : !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
};
const relayOnly = flag('relay', false);
const token = params.get('token') ?? '';
const claims = decodeToken(token);
/** A subscribe-only token (its `permissions` lack `publish`): the page joins receive-only. */
const subscribeOnly = !!claims && Array.isArray(claims.permissions) && !claims.permissions.includes('publish');
/** A token with a `name` claim: the server shows that name, whatever we send. */
const tokenName = claims && typeof claims.name === 'string' ? cleanName(claims.name) : '';
const want = { audio: flag('audio', true) && !subscribeOnly, video: flag('video', true) && !subscribeOnly };
// `?defer` (benchmarks: media ready, join on `webcall.join()`) and `?join=1` (kiosks, automation) skip the pre-join screen.
const deferJoin = params.has('defer');
/** This tab was in this room's call before a reload: it goes back in at once, with the same choices. */
const resumeKey = `webcall.in-call.${room}`;
const resumed = (() => {
  try {
    return JSON.parse(sessionStorage.getItem(resumeKey) ?? 'null');
  } catch {
    return null;
  }
})();
const skipPrejoin = deferJoin || flag('join', false) || !!resumed;
/** Seconds without the server (and without any live peer connection) before the page gives up; for tests. */
const giveUpSecs = Number(params.get('giveup')) || 0;
let name = tokenName || cleanName(resumed?.name ?? params.get('name') ?? localStorage.getItem('webcall.name') ?? '');

document.title = `${room} · webcall`;
$('room-name').textContent = room;
$('pj-room').textContent = room;
// The password does not stay in the address bar (nor in history) once read.
if (params.has('password')) {
  const clean = new URL(location.href);
  clean.searchParams.delete('password');
  history.replaceState(null, '', clean);
}

/**
 * The claims of a join token (a JWT: its payload is readable; the server checks the signature).
 * @param {string} t @returns {any}
 */
function decodeToken(t) {
  const part = t.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(decodeURIComponent(escape(atob(b64 + '==='.slice((b64.length + 3) % 4)))));
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Overlay dialog, banner, toast, announcements

/**
 * @typedef {object} OverlayInput
 * @property {string} label
 * @property {string} [type]
 * @property {string} [value]
 * @property {string} [error] shown under the field
 */

/**
 * Shows the modal message (focus moves into it and stays there).
 * @param {string} title @param {string} text
 * @param {{label: string, primary?: boolean, action: (value: string) => void}[]} actions
 * @param {string} kind a stable name for tests and styling
 * @param {OverlayInput} [input] a field (the first primary action gets its value; Enter submits)
 */
function showOverlay(title, text, actions, kind, input) {
  $('overlay-title').textContent = title;
  $('overlay-text').textContent = text;
  const form = /** @type {HTMLFormElement} */ ($('overlay-form'));
  const field = /** @type {HTMLInputElement} */ ($('overlay-input'));
  form.hidden = !input;
  if (input) {
    $('overlay-label').textContent = input.label;
    field.type = input.type ?? 'text';
    field.value = input.value ?? '';
    $('overlay-error').textContent = input.error ?? '';
    $('overlay-error').hidden = !input.error;
    field.setAttribute('aria-invalid', String(!!input.error));
  }
  const box = $('overlay-actions');
  const buttons = actions.map((a) => {
    const b = document.createElement('button');
    b.className = `btn ${a.primary ? 'primary' : 'ghost'}`;
    b.textContent = a.label;
    b.onclick = () => a.action(field.value);
    return b;
  });
  box.replaceChildren(...buttons);
  form.onsubmit = (ev) => {
    ev.preventDefault();
    const primary = actions.find((a) => a.primary) ?? actions[0];
    primary?.action(field.value);
  };
  $('overlay').dataset.kind = kind;
  openDialog($('overlay'), { focus: input ? field : buttons.find((_, i) => actions[i].primary) ?? buttons[0] });
}
const hideOverlay = () => closeDialog($('overlay'));
const homeAction = { label: 'Start another call', action: () => (location.href = '/') };

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

/** Says something to screen readers only. @param {string} text */
function announce(text) {
  $('announce').textContent = text;
}

// ---------------------------------------------------------------------------------------------------------------
// Browser support

function unsupportedReason() {
  if (!window.isSecureContext) {
    return {
      kind: 'insecure',
      title: 'This page needs a secure connection',
      text:
        `Browsers allow the camera, the microphone and calls only on secure pages, and ${location.origin} is not one. ` +
        'Open the call over https:// — start the server with --tls-cert and --tls-key, or with --tls-self-signed for a ' +
        'quick test (accept the certificate warning once) — or use http://localhost on the server itself.',
    };
  }
  if (typeof RTCPeerConnection !== 'function' || !('restartIce' in RTCPeerConnection.prototype)) {
    return { kind: 'unsupported', title: 'Browser not supported', text: 'This browser does not support modern WebRTC. Use a current Chrome, Edge, Firefox or Safari.' };
  }
  if (!navigator.mediaDevices?.getUserMedia) return { kind: 'unsupported', title: 'Browser not supported', text: 'This browser cannot use a camera or microphone.' };
  if (typeof WebSocket !== 'function') return { kind: 'unsupported', title: 'Browser not supported', text: 'This browser does not support WebSockets.' };
  return null;
}

/** Room names the server takes (docs/protocol.md). */
const VALID_ROOM = /^[A-Za-z0-9_-]{1,64}$/;
if (!VALID_ROOM.test(room)) {
  // The server answers such a link with this page (status 400): say what is wrong and offer a name that works.
  const fixed = room.replace(/[^A-Za-z0-9_-]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 64);
  document.body.dataset.phase = 'bad-room';
  $('room-name').textContent = room;
  showOverlay(
    'This room name is not valid',
    `Room names are 1–64 letters, digits, “-” or “_”; “${room}” has other characters.` + (fixed ? ` Did you mean “${fixed}”?` : ''),
    [...(fixed ? [{ label: `Go to “${fixed}”`, primary: true, action: () => (location.href = `/r/${fixed}${location.search}`) }] : []), homeAction],
    'bad-room-name',
  );
  throw new Error(`invalid room name ${JSON.stringify(room)}`);
}

const unsupported = unsupportedReason();
if (unsupported) {
  document.body.dataset.phase = 'unsupported';
  showOverlay(unsupported.title, unsupported.text, [homeAction], unsupported.kind);
  throw new Error(unsupported.text);
}

// ---------------------------------------------------------------------------------------------------------------
// The call

// The page speaks the SFU messages, so the server moves the room to its SFU when a third person joins
// (`--topology auto`). `?mesh=1` joins as a client without SFU: the room stays peer-to-peer (up to --max-peers).
const signaling = new Signaling({
  url: defaultSignalingUrl(),
  room,
  name,
  token,
  password: params.get('password') ?? resumed?.password ?? '',
  backoff: giveUpSecs ? { giveUpAfter: giveUpSecs * 1000 } : {},
  sfu: !flag('mesh', false),
});
const call = new Call({ signaling, name, relayOnly, publish: !subscribeOnly });
watchViews(call);
// The SFU's active speaker (debounced on the server): one tile at a time, ours included.
call.addEventListener('speaker', (ev) => {
  const id = /** @type {CustomEvent} */ (ev).detail.peer === call.id ? 'local' : /** @type {CustomEvent} */ (ev).detail.peer;
  for (const [tid, t] of tiles) t.el.classList.toggle('active-speaker', tid === id);
  const t = tiles.get(id);
  if (t) {
    t.lastSpoke = performance.now();
    if (t.el.classList.contains('offpage')) layout();
  }
});
/** Test and debugging hook. */
// @ts-ignore
window.webcall = { call, signaling, room, name, snapshot: () => call.snapshot() };

const grid = $('grid');
/**
 * @typedef {object} TileInfo
 * @property {HTMLElement} el
 * @property {boolean} local
 * @property {boolean} screen a screen share's tile (the person's camera has a tile of its own)
 * @property {number} since
 * @property {number} lastSpoke
 * @property {number} level
 */
/** @type {Map<string, TileInfo>} peer id (or 'local') → tile */
const tiles = new Map();
/** @type {string|null} the pinned tile's id */
let pinned = null;
let page = 0;

/** @param {string} id @param {string} label */
function makeTile(id, label) {
  const tpl = /** @type {HTMLTemplateElement} */ ($('tile-tpl'));
  const tile = /** @type {HTMLElement} */ (/** @type {Element} */ (tpl.content.firstElementChild).cloneNode(true));
  tile.dataset.peer = id;
  tiles.set(id, { el: tile, local: id.startsWith('local'), screen: id.endsWith(':screen'), since: performance.now(), lastSpoke: 0, level: 0 });
  if (id.endsWith(':screen')) tile.classList.add('screen');
  setTileName(tile, label);
  const pin = /** @type {HTMLElement} */ (tile.querySelector('.pin'));
  pin.onclick = () => setPinned(pinned === id ? null : id);
  /** @type {HTMLElement} */ (tile.querySelector('.full')).onclick = () => fullscreen(tile);
  tile.addEventListener('dblclick', () => fullscreen(tile));
  grid.append(tile);
  layout();
  renderPeople();
  return tile;
}

/** @param {HTMLElement} tile @param {string} label */
function setTileName(tile, label) {
  const plain = label.replace(/ \(you\)$/, '');
  /** @type {HTMLElement} */ (tile.querySelector('.name')).textContent = label;
  /** @type {HTMLElement} */ (tile.querySelector('.avatar span')).textContent = initials(plain);
  tile.style.setProperty('--hue', String(hue(plain)));
  /** @type {HTMLElement} */ (tile.querySelector('.pin')).setAttribute('aria-label', `Pin ${plain}`);
  /** @type {HTMLElement} */ (tile.querySelector('.full')).setAttribute('aria-label', `Show ${plain} full screen`);
  describeTile(tile);
}

/** The tile's state in words, for screen readers (its label). @param {HTMLElement} tile */
function describeTile(tile) {
  const label = tile.querySelector('.name')?.textContent ?? '';
  if (tile.classList.contains('screen')) {
    tile.setAttribute('aria-label', `${label}, screen share`);
    return;
  }
  const parts = [label];
  parts.push(tile.dataset.audio === 'off' ? 'microphone muted' : 'microphone on');
  parts.push(tile.dataset.video === 'off' ? 'camera off' : 'camera on');
  if (tile.dataset.screen === 'on') parts.push('presenting');
  if (tile.dataset.hand === 'on') parts.push('hand raised');
  if (tile.classList.contains('speaking')) parts.push('speaking');
  const st = tile.querySelector('.tile-state')?.textContent;
  if (st) parts.push(st);
  tile.setAttribute('aria-label', parts.join(', '));
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

/** @param {string|null} id */
function setPinned(id) {
  pinned = id && tiles.has(id) ? id : null;
  for (const [tid, t] of tiles) {
    const on = tid === pinned;
    t.el.classList.toggle('pinned', on);
    const b = /** @type {HTMLElement} */ (t.el.querySelector('.pin'));
    b.setAttribute('aria-pressed', String(on));
  }
  page = 0;
  layout();
  renderPeople();
}

/** @param {HTMLElement} el */
function fullscreen(el) {
  if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
  else el.requestFullscreen?.().catch(() => toast('Full screen is not available here'));
}

/** Lays the tiles out: a grid (paged past what fits), or one big tile (pinned or presenting) beside a strip. */
function layout() {
  const n = tiles.size;
  grid.dataset.count = String(n);
  // A remote screen share takes the stage unless someone is pinned.
  const presenter = [...tiles].find(([, t]) => !t.local && t.screen)?.[0] ?? null;
  const spot = pinned ?? presenter;
  for (const [id, t] of tiles) {
    t.el.classList.toggle('presenting', id === presenter);
    t.el.classList.toggle('spot', id === spot && n > 1);
  }
  const stage = $('stage');
  const style = getComputedStyle(stage);
  const width = stage.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const height = stage.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
  const order = tileOrder(
    [...tiles].map(([id, t]) => ({ id, pinned: id === pinned, presenting: id === presenter, lastSpoke: t.lastSpoke, local: t.local, since: t.since })),
  );
  order.forEach((t, i) => (/** @type {TileInfo} */ (tiles.get(t.id)).el.style.order = String(i)));
  if (spot && n > 1) {
    grid.dataset.layout = 'spotlight';
    // As many others as fit beside (or, on a phone, under) the big tile; the most recent speakers first.
    const phone = width <= 744;
    const stripW = Math.max(160, Math.round(width * 0.2));
    const fit = phone
      ? 3 * Math.max(1, Math.floor((height * 0.38) / ((width - 16) / 3 + 8)))
      : Math.max(1, Math.floor((height + 12) / ((stripW * 9) / 16 + 12)));
    grid.style.setProperty('--strip-w', `${stripW}px`);
    const others = order.filter((t) => t.id !== spot).slice(0, fit);
    const ids = new Set([spot, ...others.map((t) => t.id)]);
    for (const [id, t] of tiles) t.el.classList.toggle('offpage', !ids.has(id));
    $('pager').hidden = true;
  } else {
    delete grid.dataset.layout;
    const per = Math.max(1, tilesPerPage(width, height));
    const pages = Math.max(1, Math.ceil(n / per));
    page = Math.min(page, pages - 1);
    const shown = order.slice(page * per, page * per + per);
    const ids = new Set(shown.map((t) => t.id));
    for (const [id, t] of tiles) t.el.classList.toggle('offpage', !ids.has(id));
    const pagerH = pages > 1 ? 44 : 0;
    const g = bestGrid(shown.length, width, height - pagerH);
    grid.style.setProperty('--tile-w', `${g.w}px`);
    grid.style.setProperty('--tile-h', `${g.h}px`);
    grid.style.setProperty('--cols', String(g.cols));
    $('pager').hidden = pages <= 1;
    $('page-info').textContent = `${page + 1} / ${pages}`;
  }
  const people = [...tiles.values()].filter((t) => !t.screen).length;
  $('people').textContent = String(people);
  $('btn-people-top').setAttribute('aria-label', `${people} ${people === 1 ? 'person' : 'people'} in the call: show the list`);
}
new ResizeObserver(() => layout()).observe($('stage'));
$('page-prev').onclick = () => {
  page = Math.max(0, page - 1);
  layout();
};
$('page-next').onclick = () => {
  page++;
  layout();
};

const STATE_TEXT = /** @type {Record<string, string>} */ ({
  new: 'Connecting…',
  connecting: 'Connecting…',
  connected: '',
  disconnected: 'Connection unstable — reconnecting…',
  failed: 'Connection failed — retrying…',
  closed: 'Disconnected',
});

const localTile = makeTile('local', `${name || 'You'} (you)`);
localTile.classList.add('local');
localTile.dataset.state = 'connected';
const localVideo = /** @type {HTMLVideoElement} */ (localTile.querySelector('video'));
localVideo.muted = true;

function renderLocal() {
  const st = call.mediaState();
  localTile.dataset.audio = st.audio ? 'on' : 'off';
  localTile.dataset.video = st.video ? 'on' : 'off';
  localTile.dataset.screen = st.screen ? 'on' : 'off';
  localTile.dataset.hand = call.handRaised ? 'on' : 'off';
  setTileName(localTile, `${call.name || 'You'} (you)`);
  /** @type {HTMLElement} */ (localTile.querySelector('.tag')).textContent = st.screen ? 'Presenting' : call.publish ? '' : 'Watching';
  // Only attach a stream that has video: a <video> with an empty stream would delay the page's load event forever.
  const src = call.localStream.getVideoTracks().length ? call.localStream : null;
  for (const v of [localVideo, /** @type {HTMLVideoElement} */ ($('pj-video'))]) {
    if (v.srcObject !== src) v.srcObject = src;
    if (src) v.play().catch(() => {});
  }
  const micOn = !!call.tracks.mic && call.micEnabled;
  const camOn = call.cameraEnabled && !!call.tracks.camera;
  setCtl('btn-mic', micOn, micOn ? 'Mute microphone (m)' : 'Unmute microphone (m)');
  setCtl('btn-cam', camOn, camOn ? 'Turn camera off (c)' : 'Turn camera on (c)');
  setCtl('pj-mic', micOn, micOn ? 'Join with microphone off' : 'Join with microphone on');
  setCtl('pj-cam', camOn, camOn ? 'Join with camera off' : 'Join with camera on');
  $('pj-off').hidden = camOn;
  $('pj-off').textContent = call.publish ? 'Camera is off' : 'Watching only';
  for (const id of ['btn-mic', 'btn-cam', 'btn-screen', 'm-screen', 'm-flip', 'pj-mic', 'pj-cam']) {
    /** @type {HTMLButtonElement} */ ($(id)).disabled = !call.publish;
  }
  setCtl('btn-screen', st.screen, st.screen ? 'Stop sharing' : 'Share screen');
  $('m-screen').querySelector('span').textContent = st.screen ? 'Stop sharing' : 'Share screen';
  setCtl('btn-hand', call.handRaised, call.handRaised ? 'Lower hand (h)' : 'Raise hand (h)');
  $('m-hand').querySelector('span').textContent = call.handRaised ? 'Lower hand' : 'Raise hand';
  describeTile(localTile);
  screenTile('local:screen', 'Your screen', call.tracks.screen ? new MediaStream([call.tracks.screen]) : null);
  watchMicLevel();
  renderPeople();
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
  // A late event of a connection that was replaced (the room moved to the SFU) must not take the tile back.
  if (call.peers.get(peer.id) !== peer) return;
  let tile = tiles.get(peer.id)?.el;
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
  const handBefore = tile.dataset.hand;
  tile.dataset.hand = peer.hand ? 'on' : 'off';
  if (peer.hand && handBefore === 'off') toast(`${peer.name || 'Guest'} raised their hand`);
  const screenBefore = tile.dataset.screen;
  tile.dataset.screen = peer.remoteMedia.screen ? 'on' : 'off';
  if (screenBefore !== tile.dataset.screen) layout();
  /** @type {HTMLElement} */ (tile.querySelector('.tag')).textContent = peer.remoteMedia.screen ? 'Presenting' : '';
  describeTile(tile);
  screenTile(`${peer.id}:screen`, `${peer.name || 'Guest'} (screen)`, peer.remoteMedia.screen && peer.remoteScreen.getVideoTracks().length ? peer.remoteScreen : null);
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
  renderPeople();
}

/**
 * The tile of a screen share (beside the person's camera tile): made, updated or (stream null) removed.
 * @param {string} id @param {string} label @param {MediaStream|null} stream
 */
function screenTile(id, label, stream) {
  let t = tiles.get(id);
  if (!stream) {
    if (t) {
      t.el.remove();
      tiles.delete(id);
      if (pinned === id) pinned = null;
      layout();
      renderPeople();
    }
    return;
  }
  if (!t) {
    makeTile(id, label);
    t = /** @type {TileInfo} */ (tiles.get(id));
    t.el.dataset.screen = 'on';
    t.el.dataset.audio = 'off';
    /** @type {HTMLElement} */ (t.el.querySelector('.tag')).textContent = 'Screen';
    layout();
  }
  setTileName(t.el, label);
  const video = /** @type {HTMLVideoElement} */ (t.el.querySelector('video'));
  video.muted = true;
  if (video.srcObject !== stream) video.srcObject = stream;
  if (video.paused) video.play().catch(() => {});
}

function showSoundButton() {
  if (document.getElementById('btn-sound')) return;
  const b = document.createElement('button');
  b.id = 'btn-sound';
  b.className = 'btn primary sound';
  b.textContent = 'Click to turn sound on';
  b.onclick = () => {
    for (const [, t] of tiles) {
      if (t.local || t.screen) continue;
      const v = /** @type {HTMLVideoElement} */ (t.el.querySelector('video'));
      v.muted = false;
      v.play().catch(() => {});
    }
    b.remove();
  };
  document.body.append(b);
}

/** Removes every remote tile (the call is over or failed). */
function clearRemoteTiles() {
  for (const [id, t] of [...tiles]) {
    if (t.local) continue;
    t.el.remove();
    tiles.delete(id);
  }
  if (pinned && !tiles.has(pinned)) pinned = null;
  layout();
  renderPeople();
}

call.addEventListener('local-media', renderLocal);
call.addEventListener('peer-added', (ev) => {
  const peer = /** @type {CustomEvent} */ (ev).detail.peer;
  renderPeer(peer);
  if (peer.name) announce(`${peer.name} joined the call`);
});
call.addEventListener('peer-updated', (ev) => renderPeer(/** @type {CustomEvent} */ (ev).detail.peer));
call.addEventListener('peer-removed', (ev) => {
  const peer = /** @type {CustomEvent} */ (ev).detail.peer;
  for (const id of [peer.id, `${peer.id}:screen`]) {
    tiles.get(id)?.el.remove();
    tiles.delete(id);
    if (pinned === id) pinned = null;
  }
  layout();
  renderPeople();
  if (call.state === 'in-call' && peer.name) toast(`${peer.name} left the call`);
});
call.addEventListener('notice', (ev) => toast(/** @type {CustomEvent} */ (ev).detail.message));

// The server's recording of this room (SFU rooms, --record-dir): everyone sees the REC indicator.
function renderRecording() {
  const on = call.recording;
  $('rec-pill').hidden = !on;
  setCtl('btn-record', on, on ? 'Stop recording this call' : 'Record this call on the server');
  /** @type {HTMLElement} */ ($('btn-record').querySelector('span')).textContent = on ? 'Stop rec' : 'Record';
  /** @type {HTMLElement} */ ($('m-record').querySelector('span')).textContent = on ? 'Stop recording' : 'Record on the server';
}
function toggleRecording() {
  call.setRecording(!call.recording);
}
call.addEventListener('recording', (ev) => {
  const { active, by } = /** @type {CustomEvent} */ (ev).detail;
  renderRecording();
  const who = by === 'api' ? 'the server' : by === call.id ? 'you' : by ? call.peers.get(by)?.name || 'someone' : null;
  if (who) toast(active ? `Recording started by ${who}` : `Recording stopped by ${who}`);
  announce(active ? 'This call is being recorded' : 'This call is no longer being recorded');
});

const PILL = /** @type {Record<string, string>} */ ({
  idle: 'Not connected',
  joining: 'Connecting…',
  'in-call': 'Connected',
  reconnecting: 'Reconnecting…',
  ended: 'Left',
  failed: 'Not connected',
});

call.addEventListener('state', (ev) => {
  const state = /** @type {CustomEvent} */ (ev).detail.state;
  if (document.body.dataset.phase !== 'prejoin' || state !== 'joining') document.body.dataset.phase = state;
  const pill = $('conn-pill');
  pill.dataset.state = state;
  pill.textContent = PILL[state] ?? state;
  if (state === 'in-call') {
    // A reload of this tab rejoins at once (a Leave forgets it).
    sessionStorage.setItem(resumeKey, JSON.stringify({ name: call.name, password: signaling.password, audio: joinChoice.audio, video: joinChoice.video, micOn: joinChoice.micOn }));
    hideOverlay();
    setBanner(null);
    if (!call.publish) setBanner('You are watching and listening: this link does not allow sending audio or video.', 'info', 'receive-only');
    else if (call.mediaProblems.length) setBanner(mediaProblemText(), 'warn', 'media');
    layout();
  }
  if (state === 'ended') {
    clearRemoteTiles();
    setBanner(null);
    showOverlay('You left the call', `Room “${room}”.`, [{ label: 'Rejoin', primary: true, action: () => location.reload() }, homeAction], 'ended');
  }
});

/** What a reconnect `reason` means, in words. @param {string|null|undefined} reason */
function reasonText(reason) {
  if (!reason) return '';
  if (reason === 'unavailable') return 'The server cannot reach its room store right now.';
  if (reason === 'rate-limited' || /^close 1008 rate-limited/.test(reason)) return 'Too many connections or joins from your network right now.';
  if (reason === 'server-shutdown' || /^close 1001/.test(reason)) return 'The server is restarting.';
  if (/^close 1012/.test(reason)) return 'The server lost its state and asked everyone to join again.';
  if (/^close 1008/.test(reason)) return `The server closed the connection (${reason.replace(/^close 1008 ?/, '') || 'policy'}).`;
  if (/^close 1009/.test(reason)) return 'A message was too large for the server.';
  return '';
}

signaling.addEventListener('state', (ev) => {
  const { state, delay, reason } = /** @type {CustomEvent} */ (ev).detail;
  if (state !== 'reconnecting' || call.state === 'ended' || call.state === 'failed') return;
  // An attempt starting (no delay) after a failed one: keep the banner, which says why the last one failed (e.g.
  // rate-limited); replacing it with a bare "reconnecting" would hide the reason after the first backoff.
  const b = $('banner');
  if (delay === undefined && !b.hidden && b.dataset.kind === 'reconnecting') return;
  const secs = delay ? ` (retrying in ${Math.max(1, Math.round(delay / 1000))} s)` : '';
  const why = reasonText(reason);
  const live = [...call.peers.values()].some((p) => p.pc.connectionState === 'connected');
  const what = signaling.id ? 'Connection to the server lost' : 'Cannot reach the server';
  const tail = live ? ' Your call continues directly between you meanwhile.' : '';
  setBanner(`${what} — reconnecting…${secs}${why ? ` ${why}` : ''}${tail}`, 'warn', 'reconnecting');
  $('conn-pill').dataset.state = 'reconnecting';
  $('conn-pill').textContent = 'Reconnecting…';
});

call.addEventListener('fatal', (ev) => {
  const { code, message } = /** @type {CustomEvent} */ (ev).detail;
  setBanner(null);
  clearRemoteTiles();
  const retry = { label: 'Try again', primary: true, action: () => rejoin() };
  if (code === 'room-full') {
    showOverlay('This room is full', `“${room}” already has as many people as it can hold. Try again later or start another call.`, [retry, homeAction], 'room-full');
  } else if (code === 'server-full') {
    showOverlay('The server is full', 'This server has as many calls as it can hold right now. Try again in a few minutes.', [retry, homeAction], 'server-full');
  } else if (code === 'unauthorized') {
    askAccess(message ?? '');
  } else if (code === 'bad-room-name') {
    showOverlay('This room name is not valid', 'Room names are 1–64 letters, digits, “-” or “_”.', [{ ...homeAction, primary: true }], 'bad-room-name');
  } else if (code === 'resumed-elsewhere') {
    showOverlay('Call opened elsewhere', 'You joined this call from another tab or window, so this one was disconnected.', [{ label: 'Use this tab', primary: true, action: () => rejoin() }, homeAction], 'resumed-elsewhere');
  } else if (code === 'unreachable') {
    showOverlay('Cannot reach the server', 'The connection to the server was lost and could not be restored. Check your network, then try again.', [retry, homeAction], 'unreachable');
  } else {
    showOverlay('Could not join the call', message ?? code, [retry, homeAction], code);
  }
});

/**
 * The join was refused with `unauthorized`: a room password (asked for here, with the server's words) or a join
 * token (only a new link helps). @param {string} message
 */
function askAccess(message) {
  const aboutPassword = /password/i.test(message) && !/token/i.test(message);
  if (!aboutPassword) {
    const text = token
      ? `The server did not accept this link’s join token: ${message}. Ask the person who sent the link for a new one.`
      : `This server admits only people with an invitation link (a join token): ${message}. Ask the organiser for a link.`;
    showOverlay('This link cannot join the call', text, [{ label: 'Try again', primary: true, action: () => rejoin() }, homeAction], 'unauthorized');
    return;
  }
  const wrong = !!signaling.password;
  showOverlay(
    'This room is locked',
    `“${room}” has a password. Enter it to join.`,
    [
      {
        label: 'Join',
        primary: true,
        action: (value) => {
          if (!value) {
            $('overlay-error').textContent = 'Enter the room password.';
            $('overlay-error').hidden = false;
            return;
          }
          signaling.password = value;
          rejoin();
        },
      },
      homeAction,
    ],
    'password',
    { label: 'Room password', type: 'password', error: wrong ? `Wrong password (${message}). Try again.` : '' },
  );
}

/** Joins again after a failure: media again, the same choices. */
function rejoin() {
  hideOverlay();
  call.rejoin({ audio: joinChoice.audio, video: joinChoice.video }).then(() => {
    if (!joinChoice.micOn) call.setMicEnabled(false);
  });
}

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
// Speaking: audio levels (remote: the receivers' synchronization sources, no getStats; local: WebAudio)

/** @type {{ctx: AudioContext, analyser: AnalyserNode, track: MediaStreamTrack, src: MediaStreamAudioSourceNode}|null} */
let micMeter = null;
function watchMicLevel() {
  const track = call.tracks.mic;
  if (micMeter?.track === track) return;
  if (micMeter) {
    micMeter.src.disconnect();
    micMeter.ctx.close().catch(() => {});
    micMeter = null;
  }
  if (!track || track.readyState === 'ended') return;
  try {
    const ctx = new AudioContext();
    const src = ctx.createMediaStreamSource(new MediaStream([track]));
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 512;
    src.connect(analyser);
    micMeter = { ctx, analyser, track, src };
  } catch {
    micMeter = null;
  }
}
// An AudioContext made before any click may start suspended (autoplay policy): the first click or key wakes it.
for (const type of ['pointerdown', 'keydown']) {
  document.addEventListener(type, () => {
    if (micMeter?.ctx.state === 'suspended') micMeter.ctx.resume().catch(() => {});
  });
}
const micBuf = new Float32Array(512);
function micLevel() {
  if (!micMeter || !call.micEnabled) return 0;
  micMeter.analyser.getFloatTimeDomainData(micBuf);
  let sum = 0;
  for (const x of micBuf) sum += x * x;
  return Math.min(1, Math.sqrt(sum / micBuf.length) * 4);
}

const SPEAKING = 0.03;
setInterval(() => {
  const now = performance.now();
  const mine = micLevel();
  /** @type {HTMLMeterElement} */ ($('pj-level')).value = mine;
  /** @type {Map<string, number>} */
  const levels = new Map([['local', mine]]);
  for (const peer of call.peers.values()) {
    let lvl = 0;
    for (const r of peer.pc.getReceivers()) {
      if (r.track?.kind !== 'audio') continue;
      for (const s of r.getSynchronizationSources?.() ?? []) lvl = Math.max(lvl, s.audioLevel ?? 0);
    }
    levels.set(peer.id, peer.remoteMedia.audio ? lvl : 0);
  }
  let changed = false;
  for (const [id, t] of tiles) {
    const lvl = levels.get(id) ?? 0;
    t.level = lvl;
    const speaking = lvl > SPEAKING;
    if (speaking) t.lastSpoke = now;
    const show = now - t.lastSpoke < 600;
    if (t.el.classList.contains('speaking') !== show) {
      t.el.classList.toggle('speaking', show);
      describeTile(t.el);
      changed = true;
    }
  }
  // Paging: a speaker off the visible page comes onto it.
  if (changed && [...tiles.values()].some((t) => t.el.classList.contains('offpage') && t.el.classList.contains('speaking'))) layout();
}, 200);

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
    const tile = tiles.get(peer.id)?.el;
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
// Side panel: chat and people

const chatLog = $('chat-log');
const chatInput = /** @type {HTMLInputElement} */ ($('chat-input'));
let unread = 0;
/** @param {'none'|'chat'|'people'} panel */
function setPanel(panel) {
  document.body.dataset.panel = panel;
  document.body.dataset.chat = panel === 'chat' ? 'open' : 'closed';
  setCtl('btn-chat', panel === 'chat', 'Chat');
  setCtl('btn-people', panel === 'people', 'People');
  if (panel === 'chat') {
    unread = 0;
    $('chat-badge').hidden = true;
    chatInput.focus();
  }
  if (panel === 'people') {
    renderPeople();
    /** @type {HTMLElement|null} */ ($('people-panel').querySelector('button'))?.focus();
  }
  layout();
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
$('chat-close').onclick = () => setPanel('none');
$('people-close').onclick = () => setPanel('none');

/** The participant list: name, microphone, hand, pin. */
function renderPeople() {
  if (document.body.dataset.panel !== 'people') return;
  const list = $('people-list');
  const rows = [...tiles].filter(([, t]) => !t.screen).map(([id, t]) => {
    const li = document.createElement('li');
    li.dataset.peer = id;
    const n = document.createElement('span');
    n.className = 'pl-name';
    n.textContent = t.el.querySelector('.name')?.textContent ?? '';
    const st = document.createElement('span');
    st.className = 'pl-state';
    const bits = [];
    if (t.el.dataset.hand === 'on') bits.push('✋ hand raised');
    bits.push(t.el.dataset.audio === 'off' ? 'muted' : 'mic on');
    if (t.el.dataset.video === 'off') bits.push('camera off');
    st.textContent = bits.join(' · ');
    const pin = document.createElement('button');
    pin.className = 'btn ghost small';
    pin.textContent = pinned === id ? 'Unpin' : 'Pin';
    pin.setAttribute('aria-label', `${pinned === id ? 'Unpin' : 'Pin'} ${n.textContent}`);
    pin.onclick = () => setPinned(pinned === id ? null : id);
    li.append(n, st, pin);
    return li;
  });
  list.replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------------------------------------
// Devices

/**
 * Fills the device <select>s (the dialog's and the pre-join screen's).
 */
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
    sel.disabled = list.length === 0 || !call.publish;
    return list.length;
  };
  fill('sel-audio', 'audioinput', call.devices.audio);
  fill('sel-video', 'videoinput', call.devices.video);
  fill('pj-sel-audio', 'audioinput', call.devices.audio);
  fill('pj-sel-video', 'videoinput', call.devices.video);
  const hasSink = 'setSinkId' in HTMLMediaElement.prototype;
  $('lbl-speaker').hidden = !hasSink || fill('sel-speaker', 'audiooutput', null) === 0;
}
function openDevices() {
  fillDevices();
  openDialog($('devices'), { onEscape: closeDevices });
}
const closeDevices = () => closeDialog($('devices'));
$('devices-done').onclick = closeDevices;
for (const [sel, kind] of /** @type {const} */ ([['sel-audio', 'audio'], ['pj-sel-audio', 'audio'], ['sel-video', 'video'], ['pj-sel-video', 'video']])) {
  $(sel).addEventListener('change', async (ev) => {
    await call.switchDevice(kind, /** @type {HTMLSelectElement} */ (ev.target).value);
    fillDevices();
  });
}
$('sel-speaker').addEventListener('change', (ev) => {
  const id = /** @type {HTMLSelectElement} */ (ev.target).value;
  for (const [pid, t] of tiles) {
    if (pid !== 'local') /** @type {any} */ (t.el.querySelector('video')).setSinkId?.(id).catch(() => {});
  }
});

/** Front/back camera: the next camera in the list, or the other facing mode where there is one camera. */
async function flipCamera() {
  if (!call.tracks.camera) return toast('Turn the camera on first');
  const cams = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === 'videoinput' && d.deviceId);
  if (cams.length > 1) {
    const i = cams.findIndex((d) => d.deviceId === call.devices.video);
    await call.switchDevice('video', cams[(i + 1) % cams.length].deviceId);
    toast(`Camera: ${cams[(i + 1) % cams.length].label || 'next camera'}`);
    return;
  }
  const facing = call.tracks.camera.getSettings().facingMode === 'environment' ? 'user' : 'environment';
  try {
    await call.tracks.camera.applyConstraints({ facingMode: facing });
    toast(facing === 'user' ? 'Front camera' : 'Back camera');
  } catch {
    toast('This device has one camera');
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Controls, menu and shortcuts

const toggleMic = () => call.setMicEnabled(!(call.micEnabled && call.tracks.mic));
const toggleCam = () => call.setCameraEnabled(!(call.cameraEnabled && call.tracks.camera));
const toggleScreen = () => (call.screenSharing ? call.stopScreenShare() : call.startScreenShare());
const toggleHand = () => {
  call.setHand(!call.handRaised);
  announce(call.handRaised ? 'Your hand is raised' : 'Your hand is lowered');
};
const hangUp = () => {
  sessionStorage.removeItem(resumeKey);
  call.hangUp();
};

function rename() {
  closeMenu();
  showOverlay(
    'Change your name',
    'The others see the new name at once.',
    [
      {
        label: 'Save',
        primary: true,
        action: (value) => {
          const v = cleanName(value);
          if (!v) {
            $('overlay-error').textContent = 'Enter a name.';
            $('overlay-error').hidden = false;
            return;
          }
          call.setName(v);
          localStorage.setItem('webcall.name', v);
          hideOverlay();
        },
      },
      { label: 'Cancel', action: hideOverlay },
    ],
    'rename',
    { label: 'Your name', value: call.name },
  );
  $('overlay-input').setAttribute('maxlength', '64');
  openDialog($('overlay'), { onEscape: hideOverlay, focus: $('overlay-input') });
}

$('btn-mic').onclick = toggleMic;
$('btn-cam').onclick = toggleCam;
$('btn-screen').onclick = toggleScreen;
$('btn-chat').onclick = () => setPanel(document.body.dataset.panel === 'chat' ? 'none' : 'chat');
$('btn-people').onclick = $('btn-people-top').onclick = () => setPanel(document.body.dataset.panel === 'people' ? 'none' : 'people');
$('btn-hand').onclick = toggleHand;
$('btn-stats').onclick = toggleStats;
$('btn-hangup').onclick = hangUp;
async function invite() {
  const link = `${location.origin}/r/${encodeURIComponent(room)}`;
  try {
    await navigator.clipboard.writeText(link);
    toast('Invite link copied — send it to the people you want to call');
  } catch {
    prompt('Copy this invite link:', link);
  }
}
$('btn-invite').onclick = invite;

/** Where broadcast tools publish into this room (WHIP) and players watch it (WHEP); see docs/whip.md. */
function broadcastInfo() {
  const base = `${location.origin}/whip/${encodeURIComponent(room)}`;
  const whip = `${base}?name=Stage`;
  const whep = `${location.origin}/whep/${encodeURIComponent(room)}`;
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(whip);
      toast('WHIP server URL copied');
    } catch {
      prompt('Copy this WHIP server URL:', whip);
    }
  };
  showOverlay(
    'Stream into this call',
    `OBS: Settings → Stream → Service “WHIP”, Server ${whip} (the name after “name=” is what people here see). ` +
      'Bearer Token: a join token that may publish on servers that use tokens; otherwise the room password, if the room has one. ' +
      `Players (WHEP) watch the active speaker at ${whep}.`,
    [{ label: 'Copy server URL', primary: true, action: copy }, { label: 'Close', action: hideOverlay }],
    'broadcast',
  );
}

const menu = $('more-menu');
function openMenu() {
  menu.hidden = false;
  $('btn-more').setAttribute('aria-expanded', 'true');
  setCtl('btn-more', true, 'More');
  /** @type {HTMLElement} */ (menu.querySelector('button:not([disabled])'))?.focus();
}
function closeMenu(/** @type {boolean} */ refocus = false) {
  if (menu.hidden) return;
  menu.hidden = true;
  $('btn-more').setAttribute('aria-expanded', 'false');
  setCtl('btn-more', false, 'More');
  if (refocus) $('btn-more').focus();
}
$('btn-more').onclick = (ev) => {
  ev.stopPropagation();
  menu.hidden ? openMenu() : closeMenu();
};
/** @param {string} id @param {() => void} fn */
const item = (id, fn) =>
  ($(id).onclick = () => {
    closeMenu();
    fn();
  });
item('m-screen', toggleScreen);
item('m-people', () => setPanel('people'));
item('m-hand', toggleHand);
item('m-flip', flipCamera);
item('m-devices', openDevices);
item('m-stats', toggleStats);
item('m-fullscreen', () => fullscreen(document.documentElement));
item('m-invite', invite);
item('m-broadcast', broadcastInfo);
item('m-record', toggleRecording);
$('btn-record').onclick = toggleRecording;
$('m-rename').onclick = rename;
menu.addEventListener('keydown', (ev) => {
  const items = /** @type {HTMLElement[]} */ ([...menu.querySelectorAll('button:not([disabled])')]);
  const i = items.indexOf(/** @type {HTMLElement} */ (document.activeElement));
  if (ev.key === 'ArrowDown') items[(i + 1) % items.length]?.focus();
  else if (ev.key === 'ArrowUp') items[(i - 1 + items.length) % items.length]?.focus();
  else if (ev.key === 'Escape') closeMenu(true);
  else return;
  ev.preventDefault();
  ev.stopPropagation();
});
document.addEventListener('click', (ev) => {
  if (!menu.hidden && !(/** @type {Element} */ (ev.target).closest('.more-wrap'))) closeMenu();
});

document.addEventListener('keydown', (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.repeat || dialogOpen()) return;
  const target = /** @type {Element} */ (ev.target);
  if (target.closest('input, textarea, select, [contenteditable]')) {
    if (ev.key === 'Escape') /** @type {HTMLElement} */ (target).blur();
    return;
  }
  if (call.state !== 'in-call' && call.state !== 'reconnecting') return;
  const key = ev.key.toLowerCase();
  if (key === 'm') toggleMic();
  else if (key === 'c') toggleCam();
  else if (key === 's') toggleStats();
  else if (key === 'h') toggleHand();
  else if (key === 'q') hangUp();
  else if (key === 'escape' && document.body.dataset.panel !== 'none') setPanel('none');
  else return;
  ev.preventDefault();
});

// Leaving the page says bye, so the others see us go at once (and our seat is free for a reload).
addEventListener('pagehide', () => {
  if (call.state !== 'ended') call.hangUp();
});

// ---------------------------------------------------------------------------------------------------------------
// Pre-join screen, then join

/** What the user chose on the pre-join screen (kept for a rejoin). */
const joinChoice = resumed
  ? { audio: !!resumed.audio && want.audio, video: !!resumed.video && want.video, micOn: resumed.micOn !== false }
  : { audio: want.audio, video: want.video, micOn: true };

const nameInput = /** @type {HTMLInputElement} */ ($('pj-name'));
const pwInput = /** @type {HTMLInputElement} */ ($('pj-password'));
nameInput.value = name;
pwInput.value = signaling.password;
if (tokenName) {
  nameInput.readOnly = true;
  nameInput.title = 'Your invitation sets this name';
}
if (subscribeOnly) {
  const note = $('pj-note');
  note.hidden = false;
  note.textContent = 'This link lets you watch and listen: your camera and microphone stay off.';
}

function join() {
  const typed = cleanName(nameInput.value);
  name = tokenName || typed || `Guest ${Math.floor(1000 + Math.random() * 9000)}`;
  if (typed && !tokenName) localStorage.setItem('webcall.name', typed);
  call.name = name;
  signaling.name = name;
  // @ts-ignore
  window.webcall.name = name;
  signaling.password = pwInput.value;
  joinChoice.micOn = call.micEnabled;
  joinChoice.audio = !!call.tracks.mic || joinChoice.audio;
  joinChoice.video = !!call.tracks.camera;
  document.body.dataset.phase = 'joining';
  $('prejoin').hidden = true;
  renderLocal();
  layout();
  call.join();
}
$('pj-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  join();
});
$('pj-mic').onclick = toggleMic;
$('pj-cam').onclick = toggleCam;

renderLocal();
// @ts-ignore
window.webcall.join = () => call.join();
if (skipPrejoin) {
  const choice = resumed ? { audio: joinChoice.audio, video: joinChoice.video } : want;
  (deferJoin ? call.prepare(choice) : call.start(choice)).then(() => {
    if (!joinChoice.micOn) call.setMicEnabled(false);
    renderLocal();
    if (call.mediaProblems.length) setBanner(mediaProblemText(), 'warn', 'media');
  });
} else {
  document.body.dataset.phase = 'prejoin';
  $('prejoin').hidden = false;
  /** @type {HTMLButtonElement} */ ($('prejoin-join')).disabled = true;
  call.prepare(want).then(() => {
    renderLocal();
    fillDevices();
    /** @type {HTMLButtonElement} */ ($('prejoin-join')).disabled = false;
    if (call.mediaProblems.length) {
      const note = $('pj-note');
      note.hidden = false;
      note.textContent = /** @type {string} */ (mediaProblemText()).replace(/You joined/, 'You will join');
    }
    (nameInput.value ? $('prejoin-join') : nameInput).focus();
  });
}
navigator.mediaDevices.addEventListener?.('devicechange', () => fillDevices());
// Keep `getLocalMedia` reachable for debugging from the console.
// @ts-ignore
window.webcall.getLocalMedia = getLocalMedia;
