/**
 * crm-chat browser client: one ES module, no dependencies, no build step.
 * Speaks the crm-chat wire protocol v1.1 (PROTOCOL.md) over `/ws/chat`.
 *
 * Embedding it in a CRM page (CSP allows only same-origin scripts, so put the
 * glue code in its own module file):
 *
 *     <!-- crm-page.html -->
 *     <script type="module" src="/static/crm-chat-glue.js"></script>
 *
 *     // crm-chat-glue.js
 *     import { ChatClient } from '/static/chat.js';
 *
 *     const chat = new ChatClient({
 *       // Called before every (re)connection, before the token expires (to
 *       // `refresh` the open connection) and after close 4001. Must resolve to
 *       // a JWT the CRM backend signed for the logged-in user. A plain string
 *       // (`token: '...'`) works too, but then nothing is refreshed and an
 *       // expired token ends in the `auth_required` state until setToken().
 *       getToken: async ({ reason }) => { // 'connect'|'reconnect'|'token_expired'|'refresh'
 *         const r = await fetch('/crm/api/chat-token', { credentials: 'same-origin' });
 *         if (!r.ok) throw new Error('chat token: HTTP ' + r.status);
 *         return (await r.json()).token;
 *       },
 *       // url: 'wss://chat.example.com/ws/chat', // default: same origin /ws/chat
 *     });
 *
 *     chat.on('state', ({ state }) => showBanner(state));     // connecting|connected|reconnecting|auth_required|closed
 *     chat.on('message', ({ message, own }) => render(message)); // deduped by (conversation, seq)
 *     chat.on('receipt', ({ conversation }) => refreshTicks(conversation));
 *     chat.connect();
 *
 *     await chat.load('general');                 // newest page; then chat.loadOlder('general')
 *     const { client_msg_id, promise } = chat.send('general', 'Hello');
 *     promise.then((ack) => console.log('stored as seq', ack.seq));
 *     chat.markRead('general');                   // when the conversation is on screen
 *
 * Without a `token` or `getToken` option the client sends no `hello` and
 * relies on the server authenticating the upgrade by cookie (`chat_token`).
 * Tokens never go into URLs.
 *
 * What the client does by itself:
 * - `hello` as first frame; reconnect with exponential backoff and full jitter
 *   (500 ms base, 30 s cap, reset after 10 s of stable connection). Close 4001:
 *   asks the token callback for a fresh token (never retries the rejected one);
 *   1012/1013/1006/...: backoff; 4008: longer backoff; close() (1000): stop.
 * - Token refresh: with a token function and a `welcome` that carries `exp`,
 *   sends `refresh` with a new token at 80% of the remaining lifetime or 60 s
 *   before `exp`, whichever is earlier (never before half of it), so the
 *   server does not close the session at expiry. A server without `refresh`
 *   (or a failing token function) falls back to close 4001 + a new token.
 * - Epochs: keeps each conversation's `epoch` (welcome, history replies) and
 *   sends it with `sync`. A different epoch (the server lost that history and
 *   numbers from 1 again) drops the local copy of that conversation (messages,
 *   receipts, read/delivered marks; never the outbox) and reloads it.
 * - `max_body_chars` comes from `welcome` (the `maxBodyChars` option is only
 *   the value used before the first welcome); bodies count Unicode scalar
 *   values, like the server.
 * - After every `welcome`: re-sends the outbox (same client_msg_id), then
 *   catches up every conversation it holds with `sync` (paging while
 *   `has_more`) and prefetches the newest page of each conversation listed in
 *   `welcome`. A live message whose seq leaves a gap triggers a `sync`.
 * - Outbox: `send` keeps the message until its `ack`; `unavailable`,
 *   `rate_limited` (after `retry_after_ms`), `internal` (3 tries) and timeouts
 *   are retried with the same client_msg_id; `forbidden`, `bad_request`,
 *   `too_large`, `not_found` reject the promise.
 * - Sends `delivered` (batched) when messages of other users arrive; `read`
 *   only via markRead(). Never a receipt above the highest seq known.
 * - Application-level `ping` when nothing was received for `heartbeat_s`, so a
 *   dead network is noticed.
 *
 * Events (`client.on(type, fn)` calls fn(detail) and returns an unsubscribe
 * function; the client is also an EventTarget, `addEventListener(type, e => e.detail)`):
 * - `state`        {state, previous, reason?, code?, delay?}
 * - `welcome`      {user:{id,name}, conversations:[...], heartbeat_s, max_body_chars,
 *                   exp (unix seconds or null), reconnect:boolean}
 * - `message`      {conversation, message:{conversation,seq,ts,sender:{id,name},body,client_msg_id?,
 *                   deleted?}, own:boolean, source:'live'|'sync'|'history'|'ack'}
 *                  (`deleted: true`, body '': erased by the CRM; keeps seq, ts and ticks)
 * - `ack`          {conversation, client_msg_id, seq, ts, duplicate}
 * - `receipt`      {conversation, user, delivered_seq, read_seq} (one event per user, also
 *                   for the batched `receipts:[...]` frames of large conversations)
 * - `typing`       {conversation, user:{id,name}}
 * - `presence`     {conversation, user, online:boolean}  (push; one event per change, also
 *                   for the batched `changes:[...]` frames of large conversations)
 *                  {conversation, online:string[], query:true} (reply to presence())
 * - `conversation` {id, conversation:{id,title,members,last_seq}, member:boolean}
 * - `unread`       {conversation, unread}
 * - `reset`        {conversation, reason:'epoch'|'data_lost'|'gap'} (local copy dropped:
 *                   the server's history was replaced, or the gap was too large to sync)
 * - `token_expired` {code:4001, attempt} (the client asks the token function again;
 *                   a static token ends in state `auth_required`)
 * - `token_refreshed` {exp} (the open connection now runs on a newer token)
 * - `error`        {code, message, conversation?, client_msg_id?, retry_after_ms?}
 *
 * @module chat
 */

const DEFAULTS = Object.freeze({
  requestTimeoutMs: 15000,
  helloTimeoutMs: 15000,
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  stableMs: 10000,
  syncLimit: 100,
  prefetch: true,
  prefetchLimit: 50,
  prefetchConcurrency: 4,
  maxSyncGap: 1000,
  typingIntervalMs: 3000,
  maxBodyChars: 4000, // until a welcome says otherwise
  refreshFraction: 0.8,
  refreshLeadMs: 60000,
  refreshRetryMs: 30000,
  maxFrameBytes: 65536,
  autoDelivered: true,
});

const CONV_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
const USER_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
// Unicode White_Space (not JS \s, which differs on U+0085 and U+FEFF).
const BLANK_RE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;
const PERMANENT_SEND_ERRORS = new Set(['forbidden', 'bad_request', 'too_large', 'not_found']);
const OPEN = 1;

/** An error answered by the server (`code` from PROTOCOL.md) or raised locally
 * (`timeout`, `disconnected`, `closed`, `auth_required`). */
export class ChatError extends Error {
  constructor(code, message, extra) {
    super(message || code);
    this.name = 'ChatError';
    this.code = code;
    if (extra) Object.assign(this, extra);
  }
}

function compareBytes(a, b) {
  const enc = new TextEncoder();
  const x = enc.encode(a);
  const y = enc.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/** `dm:<a>:<b>` for two user ids, ordered by bytes (a < b). Throws on bad ids. */
export function dmId(a, b) {
  if (!USER_RE.test(a) || !USER_RE.test(b)) throw new TypeError('invalid user id');
  const c = compareBytes(a, b);
  if (c === 0) throw new TypeError('a direct conversation needs two different users');
  return c < 0 ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

/** The two user ids of a `dm:<a>:<b>` conversation id, or null. */
export function parseDm(id) {
  if (typeof id !== 'string' || !id.startsWith('dm:')) return null;
  const parts = id.slice(3).split(':');
  if (parts.length !== 2 || !USER_RE.test(parts[0]) || !USER_RE.test(parts[1])) return null;
  return parts;
}

/** Random v4 UUID; crypto.randomUUID only exists in secure contexts. */
export function uuid() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') {
    try { return c.randomUUID(); } catch { /* insecure context: fall through */ }
  }
  const b = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Whether two copies of a message with the same seq are the same message. */
function sameMessage(a, b) {
  const sa = a.sender && a.sender.id;
  const sb = b.sender && b.sender.id;
  if (sa && sb && sa !== sb) return false;
  if (a.client_msg_id && b.client_msg_id) return a.client_msg_id === b.client_msg_id;
  if (a.ts && b.ts) return a.ts === b.ts;
  return true;
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new TypeError('ChatClient: `url` is required outside a browser page');
  return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws/chat`;
}

function resolveUrl(url) {
  if (!url) return defaultUrl();
  const loc = globalThis.location;
  const u = new URL(url, loc ? loc.href : undefined);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  return u.href;
}

function newConversation(id) {
  return {
    id,
    title: null,
    members: null, // string[] when the server told us (conversation event)
    member: true,
    messages: new Map(), // seq -> message
    loaded: false, // a baseline exists: lastSeq is meaningful
    lastSeq: 0, // every seq in (baseline, lastSeq] is held
    maxSeq: 0, // highest seq held
    oldestSeq: 0, // lowest seq held (0: none)
    hasMoreBefore: true,
    serverLastSeq: 0, // highest seq the server told us about
    readSeq: 0, // own read mark
    deliveredSeq: 0, // own delivered mark (sent or confirmed)
    pendingRead: 0, // read mark not yet sent (offline)
    baseUnread: 0, // unread among seqs in (readSeq, unreadBaseTo], from welcome
    unreadBaseTo: 0,
    receipts: new Map(), // user -> {delivered_seq, read_seq}
    epoch: null, // the server's epoch of the history we hold ('' : it has none; null: unknown)
    gen: 0, // bumped whenever the local copy is dropped
    syncing: null,
    forceSync: false,
    olderLoading: null,
    lastTypingSent: 0,
  };
}

/**
 * WebSocket chat client with reconnect, outbox, sync and receipts.
 *
 * @param {object} [options]
 * @param {string} [options.url] WebSocket URL; default same origin `/ws/chat`.
 * @param {string|((ctx:{reason:string})=>string|Promise<string>)} [options.token]
 *   JWT or a function returning one (called on each connection attempt).
 * @param {(ctx:{reason:string})=>string|Promise<string>} [options.getToken]
 *   Function returning a fresh JWT: on each connection attempt, before expiry
 *   (refresh) and after close 4001. With both, `token` (a string) is used for
 *   the first connection only.
 * @param {{info:Function,warn:Function}} [options.logger] Default: console.
 * @param {Function} [options.WebSocket] WebSocket constructor (tests).
 * Other tunables: see DEFAULTS (requestTimeoutMs, backoffBaseMs, backoffCapMs,
 * stableMs, syncLimit, prefetch, prefetchLimit, maxSyncGap, typingIntervalMs,
 * maxBodyChars, maxFrameBytes, autoDelivered, refreshFraction, refreshLeadMs,
 * refreshRetryMs).
 */
export class ChatClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this._url = options.url;
    this._tokenSource = options.getToken ?? options.token ?? null;
    // `token` (a string) next to `getToken`: the first connection's token.
    this._firstToken = options.getToken && typeof options.token === 'string' ? options.token : null;
    this._logger = options.logger || console;
    this._WS = options.WebSocket || globalThis.WebSocket;

    this.user = null; // {id, name} after welcome
    this.heartbeatS = 25;
    this.maxBodyChars = this.options.maxBodyChars; // from welcome once connected
    this.tokenExp = null; // exp (unix seconds) of the current connection's token
    this._refreshFailures = 0;
    this._refreshUnsupported = false;
    this._state = 'closed';
    this._stopped = true;
    this._ws = null;
    this._gen = 0;
    this._ready = false; // welcome received on the current socket
    this._everConnected = false;
    this._attempt = 0;
    this._authFailures = 0;
    this._tokenFailingSince = 0; // 0: fine, >0: failing since, -1: warned
    this._rejectedToken = null;
    this._token = null;
    this._helloId = null;
    this._nextFrameId = 1;
    this._pending = new Map(); // frame id -> {resolve, reject, timer}
    this._sendIds = new Map(); // frame id -> client_msg_id (current socket)
    this._outbox = new Map(); // client_msg_id -> entry (insertion order = send order)
    this._convs = new Map();
    this._online = new Map(); // user -> boolean
    this._deliveredQueue = new Set();
    this._readyWaiters = [];
    this._timers = { reconnect: null, hello: null, stable: null, idle: null, delivered: null, refresh: null };
    this._listenerMap = new Map();
    this._onOnline = () => { if (this._timers.reconnect) this.reconnectNow(); };
  }

  // ---------------------------------------------------------------- events

  /** Subscribe; `fn(detail)`. Returns a function that unsubscribes. */
  on(type, fn) {
    const wrapped = (e) => fn(e.detail, e);
    let byType = this._listenerMap.get(fn);
    if (!byType) this._listenerMap.set(fn, (byType = new Map()));
    if (byType.has(type)) return () => this.off(type, fn);
    byType.set(type, wrapped);
    this.addEventListener(type, wrapped);
    return () => this.off(type, fn);
  }

  /** Unsubscribe a function given to on(). */
  off(type, fn) {
    const byType = this._listenerMap.get(fn);
    const wrapped = byType && byType.get(type);
    if (!wrapped) return;
    this.removeEventListener(type, wrapped);
    byType.delete(type);
    if (!byType.size) this._listenerMap.delete(fn);
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // ------------------------------------------------------------ lifecycle

  /** connecting | connected | reconnecting | auth_required | closed */
  get state() { return this._state; }

  /** True while a welcomed socket is open. */
  get connected() { return this._ready; }

  /** Start (or restart after close()/auth_required) the connection. */
  connect() {
    if (!this._stopped && this._state !== 'auth_required') return;
    this._stopped = false;
    this._authFailures = 0;
    this._rejectedToken = null;
    if (typeof window !== 'undefined' && window.addEventListener) {
      window.addEventListener('online', this._onOnline);
    }
    this._setState(this._everConnected ? 'reconnecting' : 'connecting');
    this._open();
  }

  /** Close with 1000 and stop reconnecting. The outbox is kept for a later connect(). */
  close() {
    this._stopped = true;
    this._gen++;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    if (typeof window !== 'undefined' && window.removeEventListener) {
      window.removeEventListener('online', this._onOnline);
    }
    const ws = this._ws;
    if (ws) {
      this._detach(ws);
      try { ws.close(1000, 'client closing'); } catch { /* already closed */ }
    }
    this._teardown(new ChatError('closed', 'client closed'));
    for (const w of this._readyWaiters.splice(0)) w.reject(new ChatError('closed', 'client closed'));
    this._setState('closed', { reason: 'closed' });
  }

  /** Replace the token (string or function) and reconnect if waiting for one. */
  setToken(token) {
    this._tokenSource = token;
    this._firstToken = null;
    this._authFailures = 0;
    this._rejectedToken = null;
    if (this._state === 'auth_required') this.connect();
  }

  /** Skip the backoff wait and try to connect now. */
  reconnectNow() {
    if (this._stopped || this._ws) return;
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    this._attempt = 0;
    this._open();
  }

  _setState(state, extra = {}) {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this._emit('state', { state, previous, ...extra });
  }

  async _resolveToken(reason) {
    if (this._firstToken && reason === 'connect') {
      const t = this._firstToken;
      this._firstToken = null;
      return t;
    }
    const src = this._tokenSource;
    if (typeof src === 'function') return await src({ reason });
    return src;
  }

  async _open() {
    this._timers.reconnect = null;
    const gen = ++this._gen;
    let token = null;
    if (this._tokenSource != null) {
      const reason = this._authFailures ? 'token_expired' : (this._everConnected ? 'reconnect' : 'connect');
      try {
        token = await this._resolveToken(reason);
        this._tokenFailingSince = 0;
      } catch (err) {
        if (gen !== this._gen || this._stopped) return;
        // A server restart makes a token endpoint fail for a while: stay
        // quiet unless it keeps failing for 30 s (then warn once).
        const now = Date.now();
        if (!this._tokenFailingSince) this._tokenFailingSince = now;
        else if (this._tokenFailingSince > 0 && now - this._tokenFailingSince >= 30000) {
          this._tokenFailingSince = -1;
          this._logger.warn('crm-chat: the token callback keeps failing:', err);
        }
        this._scheduleReconnect({ code: 0, reason: 'token_error' });
        return;
      }
      if (gen !== this._gen || this._stopped) return;
      if (!token) return this._authRequired('no_token');
      if (this._authFailures && token === this._rejectedToken) return this._authRequired('token_expired');
    }
    let ws;
    try {
      ws = new this._WS(resolveUrl(this._url));
    } catch (err) {
      this._logger.warn('crm-chat: cannot open WebSocket:', err);
      this._scheduleReconnect({ code: 0, reason: 'open_failed' });
      return;
    }
    this._ws = ws;
    this._token = token;
    this._ready = false;
    ws.onopen = () => {
      if (ws !== this._ws || !token) return;
      this._helloId = this._nextId();
      this._raw({ type: 'hello', id: this._helloId, token });
    };
    ws.onmessage = (ev) => this._onData(ws, ev.data);
    ws.onclose = (ev) => { if (ws === this._ws) this._onClosed(ev.code, ev.reason); };
    ws.onerror = () => { /* a close event follows */ };
    this._timers.hello = setTimeout(() => this._drop(ws, 'welcome timeout'), this.options.helloTimeoutMs);
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  /** Abandon a socket that looks dead (no welcome, no pong) and reconnect. */
  _drop(ws, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    try { ws.close(4000, reason); } catch { /* ignore */ }
    this._onClosed(4000, reason);
  }

  _teardown(err) {
    this._ws = null;
    this._ready = false;
    for (const k of ['hello', 'stable', 'idle', 'refresh']) {
      clearTimeout(this._timers[k]);
      this._timers[k] = null;
    }
    this._sendIds.clear();
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  _onClosed(code, reason) {
    this._teardown(new ChatError('disconnected', `connection closed (${code})`));
    if (this._stopped) {
      this._setState('closed', { code });
      return;
    }
    if (code === 4001) {
      this._authFailures++;
      this._rejectedToken = this._token;
      this._emit('token_expired', { code, attempt: this._authFailures });
      if (typeof this._tokenSource !== 'function') return this._authRequired('token_expired', code);
      if (this._authFailures >= 3) return this._authRequired('token_rejected', code);
      return this._scheduleReconnect({ code, reason: 'token_expired', minDelay: this.options.backoffBaseMs });
    }
    if (code === 1011) this._logger.warn('crm-chat: server internal error (close 1011)', reason || '');
    if (code === 4008) {
      this._attempt += 2;
      return this._scheduleReconnect({ code, reason: 'policy', minDelay: 5000 });
    }
    this._scheduleReconnect({ code, reason: reason || 'closed' });
  }

  _scheduleReconnect({ code, reason, minDelay = 0 }) {
    const { backoffBaseMs: base, backoffCapMs: cap } = this.options;
    const ceiling = Math.min(cap, base * 2 ** Math.min(this._attempt, 30));
    const delay = Math.min(cap, Math.max(minDelay, Math.floor(Math.random() * ceiling)));
    this._attempt++;
    this.nextRetryAt = Date.now() + delay;
    this._setState('reconnecting', { code, reason, delay });
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  _authRequired(reason, code) {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    if (this._ws) { this._detach(this._ws); try { this._ws.close(1000); } catch { /* ignore */ } }
    this._teardown(new ChatError('auth_required', reason));
    for (const w of this._readyWaiters.splice(0)) w.reject(new ChatError('auth_required', reason));
    if (reason !== 'no_token' || this._authFailures) {
      this._logger.warn(`crm-chat: authentication required (${reason}); call setToken() or connect()`);
    }
    this._setState('auth_required', { reason, code });
  }

  // ------------------------------------------------------- token refresh

  /**
   * Plan the next `refresh` for a token expiring at `exp` (unix seconds): at
   * `refreshFraction` (80%) of the remaining lifetime or `refreshLeadMs` (60 s)
   * before expiry, whichever is earlier, but not before half of it (a
   * short-lived token is not refreshed back to back). Only with a token
   * function; without one (or without `exp`) the session ends at expiry with
   * close 4001 as before.
   */
  _scheduleRefresh(exp) {
    clearTimeout(this._timers.refresh);
    this._timers.refresh = null;
    this.tokenExp = Number.isFinite(exp) && exp > 0 ? exp : null;
    if (!this.tokenExp || typeof this._tokenSource !== 'function' || this._refreshUnsupported) return;
    const { refreshFraction, refreshLeadMs, refreshRetryMs } = this.options;
    const remaining = this.tokenExp * 1000 - Date.now();
    // A token that looks expired already means the clocks disagree: try
    // later rather than in a loop (a 4001 and a new token are the fallback).
    const delay = remaining <= 0
      ? refreshRetryMs
      : Math.max(remaining / 2, Math.min(remaining * refreshFraction, remaining - refreshLeadMs));
    const ws = this._ws;
    this._timers.refresh = setTimeout(() => this._refresh(ws), Math.min(Math.max(delay, 1000), 2 ** 31 - 1));
  }

  /** Retry a failed refresh with backoff while the token is still valid. */
  _retryRefresh(ws) {
    if (ws !== this._ws || !this._ready || !this.tokenExp) return;
    this._refreshFailures++;
    const remaining = this.tokenExp * 1000 - Date.now();
    const backoff = Math.min(this.options.refreshRetryMs, 1000 * 2 ** Math.min(this._refreshFailures, 10));
    const delay = remaining > 2000 ? Math.min(backoff, remaining / 2) : this.options.refreshRetryMs;
    clearTimeout(this._timers.refresh);
    this._timers.refresh = setTimeout(() => this._refresh(ws), Math.max(delay, 1000));
  }

  async _refresh(ws) {
    this._timers.refresh = null;
    if (ws !== this._ws || !this._ready) return;
    let token;
    try {
      token = await this._resolveToken('refresh');
    } catch (err) {
      if (ws === this._ws) this._logger.info('crm-chat: token refresh: the token function failed:', err);
      return this._retryRefresh(ws);
    }
    if (ws !== this._ws || !this._ready) return;
    if (typeof token !== 'string' || !token || token === this._token) return this._retryRefresh(ws);
    try {
      const r = await this._request({ type: 'refresh', token }, { wait: false });
      if (ws !== this._ws) return;
      this._token = token;
      this._refreshFailures = 0;
      const exp = Number(r.exp);
      this._emit('token_refreshed', { exp: Number.isFinite(exp) ? exp : null });
      this._scheduleRefresh(exp);
    } catch (err) {
      if (ws !== this._ws) return;
      const code = err && err.code;
      if (code === 'unauthorized') return; // close 4001 follows; the reconnect asks for a new token
      if (code === 'bad_request') {
        // A server without `refresh`: this session ends at expiry (4001),
        // then the client reconnects with a new token.
        this._refreshUnsupported = true;
        return;
      }
      this._retryRefresh(ws);
    }
  }

  // ----------------------------------------------------------- transport

  _nextId() { return this._nextFrameId++; }

  _raw(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _waitReady(timeoutMs) {
    if (this._ready) return Promise.resolve();
    if (this._stopped || this._state === 'auth_required') {
      return Promise.reject(new ChatError('disconnected', 'not connected'));
    }
    return new Promise((resolve, reject) => {
      const w = {
        resolve: () => { clearTimeout(w.timer); resolve(); },
        reject: (e) => { clearTimeout(w.timer); reject(e); },
        timer: setTimeout(() => {
          const i = this._readyWaiters.indexOf(w);
          if (i >= 0) this._readyWaiters.splice(i, 1);
          reject(new ChatError('timeout', 'not connected'));
        }, timeoutMs),
      };
      this._readyWaiters.push(w);
    });
  }

  /** Send a frame that expects a reply; waits for a connection if needed. */
  async _request(frame, { timeoutMs = this.options.requestTimeoutMs, wait = true } = {}) {
    if (!this._ready) {
      if (!wait) throw new ChatError('disconnected', 'not connected');
      await this._waitReady(timeoutMs);
    }
    return new Promise((resolve, reject) => {
      const id = frame.id ?? this._nextId();
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new ChatError('timeout', `no reply to ${frame.type}`));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer });
      if (!this._raw({ ...frame, id })) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new ChatError('disconnected', 'not connected'));
      }
    });
  }

  _armIdle() {
    clearTimeout(this._timers.idle);
    const ws = this._ws;
    this._timers.idle = setTimeout(() => {
      if (ws !== this._ws || !this._ready) return;
      this._request({ type: 'ping' }, { wait: false, timeoutMs: 10000 }).catch((err) => {
        if (err.code === 'timeout') this._drop(ws, 'ping timeout');
      });
    }, Math.max(5, this.heartbeatS) * 1000);
  }

  _onData(ws, data) {
    if (ws !== this._ws) return;
    if (typeof data !== 'string') return;
    let f;
    try { f = JSON.parse(data); } catch {
      this._logger.warn('crm-chat: unparsable frame from server');
      return;
    }
    if (!f || typeof f.type !== 'string') return;
    if (this._ready) this._armIdle();
    const pend = f.id != null ? this._pending.get(f.id) : undefined;
    if (pend) {
      this._pending.delete(f.id);
      clearTimeout(pend.timer);
    }
    try {
      this._dispatch(f, pend);
    } finally {
      if (pend) {
        if (f.type === 'error') {
          pend.reject(new ChatError(f.code || 'internal', f.message, { retry_after_ms: f.retry_after_ms }));
        } else {
          pend.resolve(f);
        }
      }
    }
  }

  _dispatch(f, pend) {
    switch (f.type) {
      case 'welcome': return this._onWelcome(f);
      case 'ack': return this._onAck(f);
      case 'message': return this._onMessage(f);
      case 'receipt': return this._onReceipt(f);
      case 'typing': return this._onTyping(f);
      case 'presence': return this._onPresence(f);
      case 'conversation': return this._onConversationEvent(f);
      case 'error': return this._onError(f, pend);
      default: return undefined; // history / pong: handled by the requester
    }
  }

  // ------------------------------------------------------------- frames

  _onWelcome(f) {
    if (this._ready) return;
    clearTimeout(this._timers.hello);
    this._timers.hello = null;
    this._ready = true;
    this._authFailures = 0;
    this._rejectedToken = null;
    this.user = f.user || this.user;
    if (Number.isFinite(f.heartbeat_s) && f.heartbeat_s > 0) this.heartbeatS = f.heartbeat_s;
    if (Number.isInteger(f.max_body_chars) && f.max_body_chars > 0) this.maxBodyChars = f.max_body_chars;
    this._refreshUnsupported = false;
    this._refreshFailures = 0;
    this._scheduleRefresh(Number(f.exp));
    const reconnect = this._everConnected;
    this._everConnected = true;
    this._logger.info('%cChat WebSocket Connected', 'color: green; font-weight: bold');
    this._armIdle();
    const ws = this._ws;
    this._timers.stable = setTimeout(() => { if (ws === this._ws) this._attempt = 0; }, this.options.stableMs);

    const listed = [];
    for (const w of Array.isArray(f.conversations) ? f.conversations : []) {
      if (!w || !CONV_RE.test(w.id)) continue;
      const c = this._conv(w.id);
      listed.push(c);
      c.member = true;
      if (w.title != null) c.title = w.title;
      if (Array.isArray(w.members)) c.members = w.members.slice();
      const lastSeq = Number(w.last_seq) || 0;
      const epoch = typeof w.epoch === 'string' ? w.epoch : undefined;
      // The epoch says whether our copy still belongs to the server's history.
      // It replaces the older guess "a last_seq lower than ours means data
      // loss", which misses the case that matters most: the new history has
      // already grown past our copy, so seqs overlap and old messages would
      // be shown mixed with new ones under the same numbers. The guess is
      // kept only where no epoch can tell (an older server, or a copy whose
      // epoch we never learnt).
      const changed = epoch === undefined ? null : this._epochChanged(c, epoch);
      if (changed === true) this._restart(c, 'epoch');
      else if (changed === null && c.maxSeq > lastSeq) this._restart(c, 'data_lost');
      if (epoch !== undefined) c.epoch = epoch;
      c.serverLastSeq = Math.max(c.serverLastSeq, lastSeq);
      const ours = c.readSeq;
      c.readSeq = Number(w.read_seq) || 0;
      c.unreadBaseTo = lastSeq;
      c.baseUnread = Number(w.unread) || 0;
      if (ours > c.readSeq) { // our read frame was lost: apply and resend
        this._setReadSeq(c, ours);
        c.pendingRead = Math.max(c.pendingRead, ours);
      }
      if (c.deliveredSeq < c.readSeq) c.deliveredSeq = c.readSeq;
    }
    // A direct conversation is listed once it holds a message, so one we hold
    // messages of that is not listed lost them on the server (storage reset).
    const listedIds = new Set(listed.map((c) => c.id));
    const me = this.user && this.user.id;
    for (const c of this._convs.values()) {
      const dm = parseDm(c.id);
      if (c.maxSeq > 0 && !listedIds.has(c.id) && dm && dm.includes(me)) this._restart(c, 'data_lost');
    }
    this._setState('connected');
    this._emit('welcome', {
      user: this.user,
      heartbeat_s: this.heartbeatS,
      max_body_chars: this.maxBodyChars,
      exp: this.tokenExp,
      reconnect,
      conversations: listed.map((c) => this._summary(c)),
    });
    for (const c of listed) this._emit('unread', { conversation: c.id, unread: this._unreadOf(c) });

    // 1. re-send the outbox in order, same client_msg_id
    for (const entry of this._outbox.values()) {
      if (entry.state === 'queued' && !entry.timer) this._transmit(entry);
    }
    // 2. own read marks made while offline
    for (const c of this._convs.values()) {
      if (c.pendingRead > 0) {
        const seq = Math.min(c.pendingRead, this._maxKnown(c));
        c.pendingRead = 0;
        if (seq >= 1) this._raw({ type: 'read', conversation: c.id, seq });
      }
    }
    for (const w of this._readyWaiters.splice(0)) w.resolve();
    this._flushDelivered();
    // 3. catch up: sync what we hold, prefetch what welcome lists
    const work = [];
    for (const c of this._convs.values()) {
      if (c.loaded) {
        c.forceSync = true;
        work.push(c);
      } else if (listedIds.has(c.id)) {
        if (c.serverLastSeq === 0 && c.messages.size === 0) {
          c.loaded = true; // empty conversation: nothing to fetch
          c.hasMoreBefore = false;
        } else if (this.options.prefetch) {
          work.push(c);
        }
      } else if (c.messages.size) {
        work.push(c);
      }
    }
    this._runPool(work, (c) => this._catchUp(c).catch(() => {}), this.options.prefetchConcurrency);
  }

  async _runPool(items, fn, n) {
    const queue = items.slice();
    const gen = this._gen;
    const worker = async () => {
      while (queue.length && gen === this._gen && this._ready) await fn(queue.shift());
    };
    await Promise.all(Array.from({ length: Math.max(1, n) }, worker));
  }

  _onAck(f) {
    const cmid = this._sendIds.get(f.id);
    this._sendIds.delete(f.id);
    const entry = cmid ? this._outbox.get(cmid) : null;
    if (!entry) return;
    this._outbox.delete(cmid);
    clearTimeout(entry.timer);
    entry.timer = null;
    entry.state = 'acked';
    const conversation = f.conversation || entry.conversation;
    const c = this._conv(conversation);
    const seq = Number(f.seq);
    if (seq > c.serverLastSeq) c.serverLastSeq = seq;
    // Our message stored under a seq we hold for another one: the server
    // lost its data and numbers from 1 again. An ack carries no epoch, so on
    // an open connection this clash is the only sign; the reload that follows
    // learns the new epoch.
    const held = Number.isInteger(seq) ? c.messages.get(seq) : undefined;
    let restarted = false;
    if (held && this.user && !sameMessage(held, { sender: this.user, client_msg_id: cmid, ts: f.ts })) {
      this._restart(c, 'data_lost');
      restarted = true;
    }
    // The server stores the body verbatim, so the acked message is known
    // exactly; holding it now makes the order of ack and message irrelevant.
    if (Number.isInteger(seq) && seq > 0 && !c.messages.has(seq) && this.user) {
      this._ingest(c, {
        conversation, seq, ts: f.ts, sender: { ...this.user }, body: entry.body, client_msg_id: cmid,
      }, 'ack');
      this._learnEpoch(c);
      if (c.loaded ? c.maxSeq > c.lastSeq : restarted) this._catchUp(c).catch(() => {});
    }
    const ack = { conversation, client_msg_id: cmid, seq, ts: f.ts, duplicate: !!f.duplicate };
    entry.resolve(ack);
    this._emit('ack', ack);
  }

  _onMessage(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const c = this._conv(f.conversation);
    const held = Number.isInteger(f.seq) ? c.messages.get(f.seq) : undefined;
    // Live frames carry no epoch: a different message under a seq we hold is
    // the only sign, on an open connection, that the server lost this history
    // (e.g. Valkey restarted empty). The reload that follows learns the epoch.
    if (held && !sameMessage(held, f)) this._restart(c, 'data_lost');
    if (this._ingest(c, f, 'live')) this._learnEpoch(c);
    if (!c.loaded || c.maxSeq > c.lastSeq) this._catchUp(c).catch(() => {});
  }

  /**
   * We now hold messages of a conversation whose history was empty when we
   * last heard its epoch (''), so we do not know which epoch they belong to.
   * Ask with a `sync` from our last seq (its reply carries the epoch), so a
   * later welcome can tell whether this copy is still the server's.
   */
  _learnEpoch(c) {
    if (c.epoch !== '' || !c.messages.size) return;
    c.epoch = null;
    if (!c.loaded || !this._ready) return; // the next load or sync learns it
    c.forceSync = true;
    const run = () => { if (this._ready) this._catchUp(c).catch(() => {}); };
    if (c.syncing) c.syncing.then(run, run);
    else run();
  }

  /** A receipt push: one user's marks (v1), or `receipts:[...]` (batched, large conversations). */
  _onReceipt(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const list = Array.isArray(f.receipts) ? f.receipts : [f];
    const c = this._conv(f.conversation);
    for (const r of list) {
      if (r && typeof r.user === 'string') this._applyReceipt(c, r, true);
    }
  }

  _applyReceipt(c, r, fromFrame) {
    const user = r.user;
    const prev = c.receipts.get(user) || { delivered_seq: 0, read_seq: 0 };
    const read = Math.max(prev.read_seq, Number(r.read_seq) || 0);
    const delivered = Math.max(prev.delivered_seq, Number(r.delivered_seq) || 0, read);
    const changed = read !== prev.read_seq || delivered !== prev.delivered_seq || !c.receipts.has(user);
    c.receipts.set(user, { delivered_seq: delivered, read_seq: read });
    if (this.user && user === this.user.id) { // another tab/device of ours
      if (delivered > c.deliveredSeq) c.deliveredSeq = delivered;
      if (this._setReadSeq(c, read)) this._emit('unread', { conversation: c.id, unread: this._unreadOf(c) });
    }
    if (changed || fromFrame) {
      this._emit('receipt', { conversation: c.id, user, delivered_seq: delivered, read_seq: read });
    }
  }

  _onTyping(f) {
    const user = f.user && typeof f.user === 'object' ? f.user : { id: f.user };
    if (!CONV_RE.test(f.conversation) || !user.id) return;
    if (this.user && user.id === this.user.id) return;
    this._emit('typing', { conversation: f.conversation, user });
  }

  /**
   * A presence push: one change (v1), or `changes:[...]` (batched, large
   * conversations), emitted as one `presence` event per change either way.
   * Replies to presence() (with `online:[...]`) are applied there.
   */
  _onPresence(f) {
    const list = Array.isArray(f.changes) ? f.changes : [f];
    for (const p of list) {
      if (!p || typeof p.user !== 'string' || typeof p.online !== 'boolean') continue;
      this._online.set(p.user, p.online);
      this._emit('presence', { conversation: f.conversation, user: p.user, online: p.online });
    }
  }

  _onConversationEvent(f) {
    const info = f.conversation && typeof f.conversation === 'object' ? f.conversation : { id: f.conversation };
    if (!CONV_RE.test(info.id)) return;
    const c = this._conv(info.id);
    if (info.title != null) c.title = info.title;
    if (Array.isArray(info.members)) c.members = info.members.slice();
    if (Number(info.last_seq) > c.serverLastSeq) c.serverLastSeq = Number(info.last_seq);
    c.member = f.member !== false;
    this._emit('conversation', { id: c.id, conversation: info, member: c.member });
    if (c.member && this._ready && (c.loaded || this.options.prefetch)) this._catchUp(c).catch(() => {});
  }

  _onError(f, pend) {
    if (pend) return; // the requester handles it
    if (f.id != null && f.id === this._helloId) {
      // 'bad_request' here means the upgrade was already authenticated (cookie)
      // and our hello was a second one; 'unauthorized' is followed by close 4001.
      return;
    }
    if (f.code === 'internal') this._logger.warn('crm-chat: server error:', f.message || f.code);
    this._emit('error', { code: f.code, message: f.message, retry_after_ms: f.retry_after_ms });
  }

  // ------------------------------------------------------- conversations

  _conv(id) {
    let c = this._convs.get(id);
    if (!c) this._convs.set(id, (c = newConversation(id)));
    return c;
  }

  _isOwn(m) { return !!(this.user && m.sender && m.sender.id === this.user.id); }

  _maxKnown(c) { return Math.max(c.maxSeq, c.serverLastSeq); }

  /** Store one message; emits `message` once per (conversation, seq). */
  _ingest(c, m, source) {
    const seq = m && m.seq;
    if (!Number.isInteger(seq) || seq < 1 || c.messages.has(seq)) return false;
    const msg = { ...m, conversation: c.id };
    c.messages.set(seq, msg);
    if (seq > c.maxSeq) c.maxSeq = seq;
    if (seq > c.serverLastSeq) c.serverLastSeq = seq;
    if (!c.oldestSeq || seq < c.oldestSeq) c.oldestSeq = seq;
    if (seq === 1) c.hasMoreBefore = false;
    if (c.loaded) while (c.messages.has(c.lastSeq + 1)) c.lastSeq++;
    const own = this._isOwn(msg);
    this._emit('message', { conversation: c.id, message: msg, own, source });
    if (!own) {
      if (seq > c.readSeq && seq > c.unreadBaseTo) this._emit('unread', { conversation: c.id, unread: this._unreadOf(c) });
      this._queueDelivered(c);
    }
    return true;
  }

  /**
   * Take in a `history` reply (to `history` or `sync`). Returns the messages
   * taken in, or null when the reply showed that our copy belongs to another
   * epoch and was a page relative to that copy: then the copy was dropped
   * and the caller loads the newest page instead.
   */
  _applyReply(c, r, source, { newest = false, before = null, sync = false } = {}) {
    if (typeof r.epoch === 'string') {
      // `reset: true` answers a sync whose epoch is not the server's; such a
      // reply pages from seq 1 of the server's history.
      const reset = sync && r.reset === true;
      if (reset || this._epochChanged(c, r.epoch) === true) {
        this._restart(c, 'epoch');
        if (reset && !r.has_more) {
          c.loaded = true; // the whole new history is in this reply
          c.lastSeq = 0;
          c.hasMoreBefore = false;
        } else if (!newest) {
          c.epoch = r.epoch;
          return null;
        }
      }
      c.epoch = r.epoch;
    }
    if (Array.isArray(r.receipts)) {
      for (const rc of r.receipts) if (rc && typeof rc.user === 'string') this._applyReceipt(c, rc, false);
    }
    const msgs = (Array.isArray(r.messages) ? r.messages : [])
      .filter((m) => m && Number.isInteger(m.seq) && m.seq > 0)
      .sort((a, b) => a.seq - b.seq);
    if (newest && !c.loaded) {
      c.loaded = true;
      c.lastSeq = msgs.length ? msgs[0].seq - 1 : 0;
    }
    const oldestBefore = c.oldestSeq;
    for (const m of msgs) this._ingest(c, m, source);
    if (c.loaded) while (c.messages.has(c.lastSeq + 1)) c.lastSeq++;
    if (newest || before != null) {
      const reachedOldest = !oldestBefore || !msgs.length || msgs[0].seq <= oldestBefore;
      if (reachedOldest) c.hasMoreBefore = msgs.length ? !!r.has_more && msgs[0].seq > 1 : false;
    }
    return msgs;
  }

  /** Bring one conversation up to date (single flight). */
  _catchUp(c) {
    if (c.syncing) return c.syncing;
    // Cleared in a .finally() (always asynchronous): the work may finish
    // without awaiting, and must not leave a settled promise behind.
    const p = this._catchUpWork(c).finally(() => { if (c.syncing === p) c.syncing = null; });
    c.syncing = p;
    return p;
  }

  async _catchUpWork(c) {
    const { syncLimit, prefetchLimit, maxSyncGap } = this.options;
    try {
      // Too far behind: drop the local copy and start again from the newest page.
      if (c.loaded && this._maxKnown(c) - c.lastSeq > maxSyncGap) this._reset(c, 'gap');
      let force = c.forceSync;
      c.forceSync = false;
      let more = false;
      for (let guard = 0; guard < 10000; guard++) {
        // The copy may be dropped while a request is out (another epoch seen
        // elsewhere): then its reply is stale and the loop loads again.
        const gen = c.gen;
        if (!c.loaded) {
          const r = await this._request({ type: 'history', conversation: c.id, limit: prefetchLimit }, { wait: false });
          if (c.gen === gen) this._applyReply(c, r, 'sync', { newest: true });
          continue;
        }
        if (!force && !more && c.lastSeq >= this._maxKnown(c)) break;
        force = false;
        const after = c.lastSeq;
        const frame = { type: 'sync', conversation: c.id, after, limit: syncLimit };
        if (c.epoch) frame.epoch = c.epoch; // a different epoch answers reset: true
        const r = await this._request(frame, { wait: false });
        if (c.gen !== gen) {
          more = false;
          continue;
        }
        const msgs = this._applyReply(c, r, 'sync', { sync: true });
        if (!msgs) { // another epoch: the copy was dropped, load the newest page
          more = false;
          continue;
        }
        if (!msgs.length) {
          // The server has nothing above lastSeq: what we thought existed does not.
          if (c.maxSeq > c.lastSeq) c.lastSeq = c.maxSeq;
          c.serverLastSeq = Math.min(c.serverLastSeq, Math.max(c.lastSeq, c.maxSeq));
          break;
        }
        // A hole the server cannot fill (cannot happen: seq has no gaps).
        if (c.lastSeq === after) c.lastSeq = msgs[msgs.length - 1].seq;
        more = !!r.has_more;
      }
    } catch (err) {
      if (err && err.code === 'forbidden') {
        c.member = false;
        this._emit('conversation', { id: c.id, conversation: { id: c.id }, member: false });
      }
      throw err;
    }
  }

  /**
   * The server no longer has what we hold (its history was lost and numbers
   * from 1 again): drop everything we know by seq (messages, receipts, our
   * read and delivered marks) and start over. The outbox is not touched:
   * unacked sends go out again with the same client_msg_id.
   */
  _restart(c, reason = 'data_lost') {
    c.epoch = null;
    c.serverLastSeq = c.readSeq = c.deliveredSeq = c.pendingRead = 0;
    c.baseUnread = c.unreadBaseTo = 0;
    c.receipts.clear();
    this._reset(c, reason);
  }

  _reset(c, reason = 'gap') {
    c.gen++;
    c.messages.clear();
    c.loaded = false;
    c.lastSeq = c.maxSeq = c.oldestSeq = 0;
    c.hasMoreBefore = true;
    this._emit('reset', { conversation: c.id, reason });
  }

  /**
   * Whether the server's `epoch` for a conversation means our copy belongs to
   * a history the server no longer has: true or false, or null when it cannot
   * tell (we hold messages but never learnt their epoch).
   */
  _epochChanged(c, epoch) {
    if (!c.loaded && !c.messages.size) return false; // nothing held
    if (c.epoch) return epoch !== c.epoch;
    if (epoch === '') return c.messages.size > 0; // the server holds no history at all
    return null;
  }

  _unreadOf(c) {
    let n = c.baseUnread;
    const from = Math.max(c.readSeq, c.unreadBaseTo);
    for (const [seq, m] of c.messages) if (seq > from && !this._isOwn(m)) n++;
    return n;
  }

  _setReadSeq(c, seq) {
    if (!(seq > c.readSeq)) return false;
    c.readSeq = seq;
    if (seq > c.deliveredSeq) c.deliveredSeq = seq;
    if (seq >= c.unreadBaseTo) {
      c.baseUnread = 0;
    } else {
      let n = 0;
      let complete = true;
      for (let s = seq + 1; s <= c.unreadBaseTo; s++) {
        const m = c.messages.get(s);
        if (!m) { complete = false; break; }
        if (!this._isOwn(m)) n++;
      }
      c.baseUnread = complete ? n : Math.min(c.baseUnread, c.unreadBaseTo - seq);
    }
    return true;
  }

  _queueDelivered(c) {
    if (!this.options.autoDelivered) return;
    this._deliveredQueue.add(c.id);
    if (!this._timers.delivered) {
      this._timers.delivered = setTimeout(() => {
        this._timers.delivered = null;
        this._flushDelivered();
      }, 50);
    }
  }

  _flushDelivered() {
    if (!this._ready) return; // kept queued until the next welcome
    for (const id of this._deliveredQueue) {
      const c = this._convs.get(id);
      if (!c || !c.member) continue;
      const target = Math.min(c.loaded ? c.lastSeq : c.maxSeq, this._maxKnown(c));
      const from = Math.max(c.deliveredSeq, c.readSeq);
      if (target <= from) continue;
      let others = false;
      for (const [seq, m] of c.messages) {
        if (seq > from && seq <= target && !this._isOwn(m)) { others = true; break; }
      }
      if (!others) continue;
      if (this._raw({ type: 'delivered', conversation: id, seq: target })) c.deliveredSeq = target;
    }
    this._deliveredQueue.clear();
  }

  // ------------------------------------------------------------- outbox

  _transmit(entry) {
    if (!this._ready) { entry.state = 'queued'; return; }
    const id = this._nextId();
    entry.state = 'sending';
    entry.attempts++;
    this._sendIds.set(id, entry.client_msg_id);
    const frame = {
      type: 'send', id, conversation: entry.conversation, client_msg_id: entry.client_msg_id, body: entry.body,
    };
    this._request(frame, { wait: false }).catch((err) => this._onSendError(entry, err));
  }

  _retryLater(entry, delay) {
    entry.state = 'queued';
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      entry.timer = null;
      if (this._outbox.has(entry.client_msg_id)) this._transmit(entry);
    }, delay);
  }

  _onSendError(entry, err) {
    if (!this._outbox.has(entry.client_msg_id)) return;
    const code = err && err.code;
    if (PERMANENT_SEND_ERRORS.has(code)) return this._fail(entry, err);
    const { backoffBaseMs: base, backoffCapMs: cap } = this.options;
    const backoff = () => Math.floor(Math.random() * Math.min(cap, base * 2 ** Math.min(entry.attempts, 20)));
    if (code === 'disconnected' || code === 'unauthorized' || code === 'auth_required' || code === 'closed') {
      entry.state = 'queued'; // re-sent after the next welcome
      return;
    }
    if (code === 'rate_limited') {
      const ms = Number(err.retry_after_ms);
      return this._retryLater(entry, Number.isFinite(ms) && ms >= 0 ? ms + Math.floor(Math.random() * 250) : base + backoff());
    }
    if (code === 'timeout' || code === 'unavailable' || (code === 'internal' && entry.attempts < 3)) {
      return this._retryLater(entry, base + backoff());
    }
    this._fail(entry, err);
  }

  _fail(entry, err) {
    this._outbox.delete(entry.client_msg_id);
    clearTimeout(entry.timer);
    entry.state = 'failed';
    entry.reject(err);
    this._emit('error', {
      code: err.code, message: err.message, conversation: entry.conversation, client_msg_id: entry.client_msg_id,
    });
  }

  // ---------------------------------------------------------- public API

  /**
   * Send a message. Returns at once; the promise resolves with the ack
   * `{conversation, client_msg_id, seq, ts, duplicate}` (possibly after
   * reconnects) or rejects with a ChatError for a permanent failure.
   * @returns {{client_msg_id:string, promise:Promise<object>}}
   */
  send(conversation, body) {
    const client_msg_id = uuid();
    let resolve;
    let reject;
    const promise = new Promise((a, b) => { resolve = a; reject = b; });
    promise.catch(() => {}); // failures are also emitted as `error`
    const entry = {
      client_msg_id, conversation, body, resolve, reject, attempts: 0, state: 'queued', timer: null, createdAt: Date.now(),
    };
    const err = this._validateSend(conversation, body, client_msg_id);
    if (err) {
      entry.reject(err);
      return { client_msg_id, promise };
    }
    this._outbox.set(client_msg_id, entry);
    this._conv(conversation).lastTypingSent = 0;
    this._transmit(entry);
    return { client_msg_id, promise };
  }

  _validateSend(conversation, body, client_msg_id) {
    if (!CONV_RE.test(conversation)) return new ChatError('bad_request', 'invalid conversation id');
    if (typeof body !== 'string' || !body.length || BLANK_RE.test(body)) {
      return new ChatError('bad_request', 'message is empty');
    }
    const { maxFrameBytes } = this.options;
    const { maxBodyChars } = this; // the server's, from welcome
    // Unicode scalar values, as the server counts (not UTF-16 code units).
    if (maxBodyChars && [...body].length > maxBodyChars) {
      return new ChatError('too_large', `message longer than ${maxBodyChars} characters`);
    }
    const frame = JSON.stringify({ type: 'send', id: 2 ** 31, conversation, client_msg_id, body });
    if (maxFrameBytes && new TextEncoder().encode(frame).length > maxFrameBytes) {
      return new ChatError('too_large', 'message too large');
    }
    return null;
  }

  /** Messages still waiting for their ack: [{client_msg_id, conversation, body, createdAt, state}]. */
  pending(conversation) {
    const out = [];
    for (const e of this._outbox.values()) {
      if (conversation == null || e.conversation === conversation) {
        out.push({
          client_msg_id: e.client_msg_id, conversation: e.conversation, body: e.body, createdAt: e.createdAt, state: e.state,
        });
      }
    }
    return out;
  }

  /**
   * Mark messages up to `seq` (default: the newest held) as read. Clamped to
   * the highest seq known; sent after reconnect if offline. Returns true when
   * the read mark moved.
   */
  markRead(conversation, seq) {
    const c = this._convs.get(conversation);
    if (!c) return false;
    let target = seq == null ? (c.loaded ? c.lastSeq : c.maxSeq) : Math.floor(Number(seq));
    target = Math.min(target, this._maxKnown(c));
    if (!(target >= 1) || target <= c.readSeq) return false;
    this._setReadSeq(c, target);
    this._emit('unread', { conversation, unread: this._unreadOf(c) });
    if (!this._ready || !this._raw({ type: 'read', conversation, seq: target })) {
      c.pendingRead = Math.max(c.pendingRead, target);
    }
    return true;
  }

  /** Mark messages up to `seq` (default: newest held) delivered. Usually automatic. */
  markDelivered(conversation, seq) {
    const c = this._convs.get(conversation);
    if (!c) return false;
    let target = seq == null ? (c.loaded ? c.lastSeq : c.maxSeq) : Math.floor(Number(seq));
    target = Math.min(target, this._maxKnown(c));
    if (!(target >= 1) || target <= Math.max(c.deliveredSeq, c.readSeq)) return false;
    if (!this._raw({ type: 'delivered', conversation, seq: target })) return false;
    c.deliveredSeq = target;
    return true;
  }

  /** Tell the others we are typing; throttled to one frame per typingIntervalMs. */
  typing(conversation) {
    if (!this._ready || !CONV_RE.test(conversation)) return false;
    const c = this._conv(conversation);
    const now = Date.now();
    if (now - c.lastTypingSent < this.options.typingIntervalMs) return false;
    if (!this._raw({ type: 'typing', conversation })) return false;
    c.lastTypingSent = now;
    return true;
  }

  /** Raw `history` request (messages with seq < before; newest page without before). */
  async history(conversation, before, limit = 50) {
    const frame = { type: 'history', conversation };
    if (before != null) frame.before = before;
    if (limit != null) frame.limit = limit;
    const r = await this._request(frame);
    const c = this._conv(conversation);
    if (!this._applyReply(c, r, 'history', { newest: before == null, before })) this._catchUp(c).catch(() => {});
    return r;
  }

  /** Raw `sync` request (messages with seq > after), one page; sends the epoch held. */
  async sync(conversation, after = 0, limit = this.options.syncLimit) {
    const c = this._conv(conversation);
    const frame = { type: 'sync', conversation, after, limit };
    if (c.epoch) frame.epoch = c.epoch;
    const r = await this._request(frame);
    if (!this._applyReply(c, r, 'sync', { sync: true })) this._catchUp(c).catch(() => {});
    return r;
  }

  /** Sync one conversation up to the newest message (paging). */
  async catchUp(conversation) {
    await this._waitReady(this.options.requestTimeoutMs);
    await this._catchUp(this._conv(conversation));
  }

  /** Make sure the newest page of a conversation is held; resolves to its messages. */
  async load(conversation) {
    const c = this._conv(conversation);
    if (!c.loaded || c.syncing) {
      await this._waitReady(this.options.requestTimeoutMs);
      await this._catchUp(c);
    }
    return this.messages(conversation);
  }

  /** Fetch the page before the oldest held message. Resolves to {messages, has_more}. */
  async loadOlder(conversation, limit = 50) {
    const c = this._conv(conversation);
    if (c.olderLoading) return c.olderLoading;
    const p = (async () => {
      if (!c.loaded) await this.load(conversation);
      if (!c.hasMoreBefore || c.oldestSeq === 1) return { messages: [], has_more: false };
      const before = c.oldestSeq || c.lastSeq + 1;
      const gen = c.gen;
      const r = await this.history(conversation, before, limit);
      if (c.gen !== gen) return { messages: [], has_more: c.hasMoreBefore }; // dropped: reloading
      return { messages: r.messages || [], has_more: c.hasMoreBefore };
    })().finally(() => { if (c.olderLoading === p) c.olderLoading = null; });
    c.olderLoading = p;
    return p;
  }

  /** Ask who is online in a conversation; resolves to the reply `{conversation, online:[...]}`. */
  async presence(conversation) {
    const r = await this._request({ type: 'presence', conversation });
    const online = Array.isArray(r.online) ? r.online : [];
    const set = new Set(online);
    for (const u of online) this._online.set(u, true);
    for (const u of this.otherMembers(conversation)) if (!set.has(u)) this._online.set(u, false);
    this._emit('presence', { conversation, online: online.slice(), query: true });
    return r;
  }

  /** Round trip to the server. */
  ping() { return this._request({ type: 'ping' }); }

  // ----------------------------------------------------------- queries

  /** true / false when known, undefined otherwise. */
  isOnline(user) {
    if (this.user && user === this.user.id) return this._ready;
    return this._online.get(user);
  }

  /** Held messages of a conversation, ascending by seq. */
  messages(conversation) {
    const c = this._convs.get(conversation);
    if (!c) return [];
    return [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  /** Summary of a conversation, or null when unknown. */
  conversation(id) {
    const c = this._convs.get(id);
    return c ? this._summary(c) : null;
  }

  /** Summaries of every conversation the client knows. */
  conversations() { return [...this._convs.values()].map((c) => this._summary(c)); }

  _summary(c) {
    return {
      id: c.id,
      title: c.title,
      members: c.members ? c.members.slice() : null,
      member: c.member,
      last_seq: this._maxKnown(c),
      read_seq: c.readSeq,
      unread: this._unreadOf(c),
      loaded: c.loaded,
      has_more_before: c.hasMoreBefore,
      oldest_seq: c.oldestSeq,
    };
  }

  unread(conversation) {
    const c = this._convs.get(conversation);
    return c ? this._unreadOf(c) : 0;
  }

  /** Highest seq known for a conversation (held or announced by the server). */
  lastSeq(conversation) {
    const c = this._convs.get(conversation);
    return c ? this._maxKnown(c) : 0;
  }

  /** {user: {delivered_seq, read_seq}} from receipt frames and history replies. */
  receipts(conversation) {
    const c = this._convs.get(conversation);
    return c ? Object.fromEntries([...c.receipts].map(([u, r]) => [u, { ...r }])) : {};
  }

  /**
   * The members other than us, as far as known: both ids of a dm, else the
   * members from a `conversation` event, else the users that sent receipts.
   */
  otherMembers(conversation) {
    const me = this.user && this.user.id;
    const dm = parseDm(conversation);
    if (dm) return dm.filter((u) => u !== me);
    const c = this._convs.get(conversation);
    if (!c) return [];
    if (c.members) return c.members.filter((u) => u !== me);
    return [...c.receipts.keys()].filter((u) => u !== me);
  }

  /**
   * Tick state of one of our messages: 'pending' (no seq yet), 'sent'
   * (stored), 'delivered' (every other member delivered it), 'read' (every
   * other member read it).
   */
  tickState(conversation, seq) {
    if (!Number.isInteger(seq) || seq < 1) return 'pending';
    const others = this.otherMembers(conversation);
    if (!others.length) return 'sent';
    const c = this._convs.get(conversation);
    let delivered = true;
    let read = true;
    for (const u of others) {
      const r = c && c.receipts.get(u);
      const rs = r ? r.read_seq : 0;
      const ds = r ? Math.max(r.delivered_seq, rs) : 0;
      if (rs < seq) read = false;
      if (ds < seq) { delivered = false; break; }
    }
    if (read && delivered) return 'read';
    return delivered ? 'delivered' : 'sent';
  }
}

ChatClient.dmId = dmId;
ChatClient.parseDm = parseDm;

export default ChatClient;
