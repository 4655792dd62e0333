// @ts-check
/**
 * Modal dialogs that take and keep focus: the rest of the page is made `inert` while one is open (Tab cannot leave
 * it, screen readers see only it), focus goes to its first control and back to where it was on close, Escape
 * closes it when it may be closed.
 */

const FOCUSABLE = 'button:not([disabled]), [href], input:not([disabled]):not([type="hidden"]), select:not([disabled]), textarea, [tabindex]:not([tabindex="-1"])';

/** @type {{el: HTMLElement, back: Element|null, onEscape: (() => void)|null}[]} */
const stack = [];

/** Everything in <body> that is not an open dialog. */
function background() {
  const open = new Set(stack.map((d) => d.el));
  return /** @type {HTMLElement[]} */ ([...document.body.children]).filter(
    (el) => !open.has(el) && !['SCRIPT', 'TEMPLATE'].includes(el.tagName) && !el.classList.contains('toast'),
  );
}

function applyInert() {
  const top = stack[stack.length - 1]?.el ?? null;
  for (const el of /** @type {HTMLElement[]} */ ([...document.body.children])) {
    if (['SCRIPT', 'TEMPLATE'].includes(el.tagName) || el.classList.contains('toast')) continue;
    el.inert = top !== null && el !== top;
  }
  if (!top) for (const el of background()) el.inert = false;
}

/**
 * Opens `el` (an element directly in <body>) as a modal dialog.
 * @param {HTMLElement} el
 * @param {{onEscape?: (() => void)|null, focus?: HTMLElement|null}} [opts] onEscape: how Escape closes it (none: it stays)
 */
export function openDialog(el, { onEscape = null, focus = null } = {}) {
  const existing = stack.find((d) => d.el === el);
  if (existing) {
    existing.onEscape = onEscape;
  } else {
    stack.push({ el, back: document.activeElement, onEscape });
  }
  el.hidden = false;
  applyInert();
  const first = focus ?? /** @type {HTMLElement|null} */ (el.querySelector('[autofocus]') ?? el.querySelector(FOCUSABLE));
  (first ?? el).focus();
}

/** Closes the dialog `el` (focus goes back to where it was). @param {HTMLElement} el */
export function closeDialog(el) {
  const i = stack.findIndex((d) => d.el === el);
  el.hidden = true;
  if (i < 0) return;
  const [d] = stack.splice(i, 1);
  applyInert();
  if (d.back instanceof HTMLElement && d.back.isConnected && !d.back.closest('[inert]')) d.back.focus();
}

/** Whether a modal dialog is open. */
export const dialogOpen = () => stack.length > 0;

document.addEventListener(
  'keydown',
  (ev) => {
    const top = stack[stack.length - 1];
    if (!top) return;
    if (ev.key === 'Escape' && top.onEscape) {
      ev.preventDefault();
      ev.stopPropagation();
      top.onEscape();
    } else if (ev.key === 'Tab') {
      // Wrap around inside the dialog (inert already keeps focus out of the rest of the page).
      const items = /** @type {HTMLElement[]} */ ([...top.el.querySelectorAll(FOCUSABLE)]).filter((x) => x.offsetParent !== null);
      if (!items.length) return;
      const first = items[0];
      const last = items[items.length - 1];
      if (ev.shiftKey && document.activeElement === first) {
        ev.preventDefault();
        last.focus();
      } else if (!ev.shiftKey && document.activeElement === last) {
        ev.preventDefault();
        first.focus();
      }
    }
  },
  true,
);
