// @ts-check
/** The start page: pick a name and a room (random or typed), then go to /r/<room>. */

const ADJECTIVES = ['amber', 'brave', 'calm', 'clever', 'cosy', 'bright', 'gentle', 'happy', 'lucky', 'quiet', 'rapid', 'sunny', 'swift', 'tidy', 'vivid', 'witty'];
const NOUNS = ['otter', 'falcon', 'maple', 'harbor', 'comet', 'meadow', 'panda', 'river', 'lantern', 'pebble', 'orchid', 'island', 'fox', 'summit', 'willow', 'koala'];

/** @template T @param {T[]} list @returns {T} */
const pick = (list) => list[crypto.getRandomValues(new Uint32Array(1))[0] % list.length];
export const randomRoom = () => `${pick(ADJECTIVES)}-${pick(NOUNS)}-${100 + (crypto.getRandomValues(new Uint32Array(1))[0] % 900)}`;
const VALID = /^[A-Za-z0-9_-]{1,64}$/;

const form = /** @type {HTMLFormElement} */ (document.getElementById('start'));
const nameInput = /** @type {HTMLInputElement} */ (document.getElementById('name'));
const roomInput = /** @type {HTMLInputElement} */ (document.getElementById('room'));
const roomError = /** @type {HTMLElement} */ (document.getElementById('room-error'));

nameInput.value = localStorage.getItem('webcall.name') ?? '';
roomInput.value = randomRoom();
(nameInput.value ? roomInput : nameInput).focus();

document.getElementById('shuffle')?.addEventListener('click', () => {
  roomInput.value = randomRoom();
  roomError.hidden = true;
});
roomInput.addEventListener('input', () => {
  roomError.hidden = VALID.test(roomInput.value.trim()) || roomInput.value === '';
});
form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const room = roomInput.value.trim();
  if (!VALID.test(room)) {
    roomError.hidden = false;
    roomInput.focus();
    return;
  }
  const name = nameInput.value.trim().slice(0, 64);
  if (name) localStorage.setItem('webcall.name', name);
  location.href = `/r/${encodeURIComponent(room)}${name ? `?name=${encodeURIComponent(name)}` : ''}`;
});
