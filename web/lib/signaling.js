// @ts-check
/**
 * Signaling client for webcall protocol v1 (docs/protocol.md).
 *
 * One WebSocket to `/ws`. After `join` the server answers `welcome`; when the connection drops the client
 * reconnects with exponential backoff (bounded delay, bounded total time) and sends the `resume` token of the last
 * `welcome`. A `welcome` with another `id` (`resumed: false`) means the old session is gone: listeners get
 * `welcome` with `idChanged: true` and must rebuild their peer connections.
 *
 * Events (all `CustomEvent`s, data in `detail`):
 * - `state`   `{state, attempt?, delay?, reason?}` — `connecting`, `joined`, `reconnecting`, `failed`, `closed`;
 *             `reason` says why the last attempt failed: an error code of the join (`unavailable`, `rate-limited`,
 *             `server-shutdown`) or `close <code> <reason>` of the WebSocket
 * - `welcome` the welcome message plus `idChanged` (bool) and `previousId`
 * - `hello`, `offer`, `answer`, `candidate`, `bye` — the relayed message
 * - `error`   an `error` message that did not end the session
 * - `fatal`   `{code, message}` — the session cannot continue (room full, replaced by another tab, gave up)
 */

/** @typedef {'idle'|'connecting'|'joined'|'reconnecting'|'failed'|'closed'} SignalingState */

/**
 * @typedef {object} Backoff
 * @property {number} initial    first retry delay, ms
 * @property {number} max        largest delay, ms
 * @property {number} giveUpAfter stop retrying after this long without a welcome, ms
 */

/** Error codes after which retrying the same join cannot help. */
const FATAL_JOIN_CODES = new Set(['room-full', 'server-full', 'bad-room-name', 'unauthorized', 'needs-sfu']);
/** Error codes of a join that a later attempt may get past: the connection is dropped and retried with backoff. */
const RETRY_JOIN_CODES = new Set(['unavailable', 'rate-limited', 'server-shutdown']);

export class Signaling extends EventTarget {
  /**
   * @param {object} opts
   * @param {string} opts.url       WebSocket URL, e.g. `ws://host/ws`
   * @param {string} opts.room
   * @param {string} [opts.name]
   * @param {string} [opts.token] a join token (servers with `--auth-secret`)
   * @param {string} [opts.password] the room password (set by the first joiner, required from later ones)
   * @param {Partial<Backoff>} [opts.backoff]
   * @param {boolean} [opts.sfu] join with `"sfu":true`: this page can take part in SFU rooms (sfu.js)
   */
  constructor({ url, room, name = '', token = '', password = '', backoff = {}, sfu = false }) {
    super();
    this.url = url;
    this.room = room;
    this.name = name;
    this.token = token;
    this.password = password;
    /** @type {() => boolean} while true, an outage never ends in `unreachable` (the call's media still flows) */
    this.keepTrying = () => false;
    /** @type {string|null} why the last attempt failed (see the `state` event) */
    this.reason = null;
    this.sfu = sfu;
    /** @type {Backoff} */
    this.backoff = { initial: 250, max: 5000, giveUpAfter: 120000, ...backoff };
    /** @type {SignalingState} */
    this.state = 'idle';
    /** @type {string|null} our peer id in the room */
    this.id = null;
    /** @type {string|null} */
    this.resumeToken = null;
    /** @type {RTCIceServer[]} */
    this.iceServers = [];
    /** @type {WebSocket|null} */
    this.ws = null;
    this.attempt = 0;
    /** @type {number|null} time of the first failed attempt of the current outage */
    this.outageSince = null;
    /** @type {ReturnType<typeof setTimeout>|null} */
    this.retryTimer = null;
    /** messages sent while the connection was down; flushed after a resumed welcome, dropped otherwise */
    /** @type {object[]} */
    this.outbox = [];
    this.onOnline = () => {
      if (this.state === 'reconnecting' && this.retryTimer) {
        clearTimeout(this.retryTimer);
        this.retryTimer = null;
        this.open();
      }
    };
  }

  /** Connects and joins. */
  start() {
    if (this.state !== 'idle' && this.state !== 'closed' && this.state !== 'failed') return;
    this.attempt = 0;
    this.outageSince = null;
    globalThis.addEventListener?.('online', this.onOnline);
    this.open();
  }

  /** @param {SignalingState} state @param {object} [extra] */
  setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent('state', { detail: { state, ...extra } }));
  }

  /** @private */
  open() {
    this.setState(this.attempt === 0 && !this.id ? 'connecting' : 'reconnecting', { attempt: this.attempt });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      /** @type {Record<string, string|boolean>} */
      const join = { type: 'join', room: this.room, name: this.name };
      if (this.resumeToken) join.resume = this.resumeToken;
      if (this.token) join.token = this.token;
      if (this.password) join.password = this.password;
      if (this.sfu) join.sfu = true;
      ws.send(JSON.stringify(join));
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      let msg;
      try {
        msg = JSON.parse(typeof ev.data === 'string' ? ev.data : '');
      } catch {
        console.warn('signaling: ignoring a frame that is not JSON');
        return;
      }
      this.handle(msg);
    };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      if (this.state === 'closed' || this.state === 'failed') return;
      if (ev.code === 4000) {
        this.fail('resumed-elsewhere', 'This call was opened in another tab or window.');
        return;
      }
      // A reason a join error gave before the close (rate-limited, server-shutdown) says more than the close code.
      if (!this.reason) this.reason = `close ${ev.code}${ev.reason ? ` ${ev.reason}` : ''}`;
      this.scheduleRetry();
    };
    ws.onerror = () => {
      /* a close event follows */
    };
  }

  /** @private */
  scheduleRetry() {
    const now = Date.now();
    if (this.outageSince === null) this.outageSince = now;
    if (now - this.outageSince > this.backoff.giveUpAfter && !this.keepTrying()) {
      this.fail('unreachable', 'Could not reach the server.');
      return;
    }
    const base = Math.min(this.backoff.max, this.backoff.initial * 2 ** this.attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    this.attempt++;
    this.setState('reconnecting', { attempt: this.attempt, delay, reason: this.reason });
    this.reason = null;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.open();
    }, delay);
  }

  /** @private @param {string} code @param {string} message */
  fail(code, message) {
    this.teardown();
    this.setState('failed', { code });
    this.dispatchEvent(new CustomEvent('fatal', { detail: { code, message } }));
  }

  /** @private */
  teardown() {
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = null;
    globalThis.removeEventListener?.('online', this.onOnline);
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
  }

  /** @private @param {any} msg */
  handle(msg) {
    if (!msg || typeof msg.type !== 'string') return;
    switch (msg.type) {
      case 'welcome': {
        const previousId = this.id;
        const idChanged = previousId !== msg.id;
        this.id = msg.id;
        this.resumeToken = msg.resume ?? null;
        this.iceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
        this.attempt = 0;
        this.outageSince = null;
        this.reason = null;
        const outbox = this.outbox;
        this.outbox = [];
        this.setState('joined');
        this.dispatchEvent(new CustomEvent('welcome', { detail: { ...msg, idChanged, previousId } }));
        // Messages queued during the outage only make sense for the same session.
        if (!idChanged) for (const m of outbox) this.send(m);
        break;
      }
      case 'hello':
      case 'offer':
      case 'answer':
      case 'candidate':
      case 'bye':
      case 'topology':
      case 'speaker':
      case 'recording':
      case 'data':
        this.dispatchEvent(new CustomEvent(msg.type, { detail: msg }));
        break;
      case 'error':
        if (msg.ref === 'join' && FATAL_JOIN_CODES.has(msg.code)) {
          this.fail(msg.code, msg.message ?? msg.code);
        } else if (RETRY_JOIN_CODES.has(msg.code) && (msg.ref === 'join' || msg.code === 'server-shutdown')) {
          // Try again later: drop this connection (the server closes it too on shutdown) and back off.
          this.reason = msg.code;
          const ws = this.ws;
          if (ws) {
            ws.onclose = null;
            this.ws = null;
            try {
              ws.close(1000);
            } catch {
              /* already closed */
            }
          }
          if (this.state !== 'closed' && this.state !== 'failed') this.scheduleRetry();
        } else {
          if (msg.code !== 'unknown-peer') console.warn('signaling error', msg);
          this.dispatchEvent(new CustomEvent('error', { detail: msg }));
        }
        break;
      default:
        console.debug('signaling: ignoring message type', msg.type);
    }
  }

  /**
   * Sends a message; while reconnecting it is kept (bounded) and sent after a resumed welcome.
   * @param {object} msg
   */
  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.state === 'joined') {
      this.ws.send(JSON.stringify(msg));
    } else if (this.state === 'reconnecting' || this.state === 'connecting') {
      if (this.outbox.length < 200) this.outbox.push(msg);
    }
  }

  /** Leaves the room (`bye`) and closes the connection; no reconnect. */
  leave() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.state === 'joined') {
      this.ws.send(JSON.stringify({ type: 'bye' }));
    }
    this.teardown();
    this.id = null;
    this.resumeToken = null;
    this.setState('closed');
  }
}

/** The signaling URL of the server that served this page. */
export function defaultSignalingUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}/ws`;
}
