/**
 * crm-chat browser client: ES modules, no dependencies, no build step.
 * This file is the public client (connection, reconnect, token refresh,
 * frames in and out); `chat-store.js` holds the per-conversation state and
 * catch-up, `chat-outbox.js` the unacked sends, `chat-util.js` shared helpers.
 * Serve the four files side by side; pages import only this one.
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
 *     // v1.2: replies, edits, deletes and reactions (promises of the ack)
 *     chat.send('general', 'Agreed', { replyTo: 42 });
 *     await chat.edit('general', 43, 'Agreed!');
 *     await chat.react('general', 42, '\u{1F44D}', true);
 *     await chat.deleteMessage('general', 43);
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
 *                   deleted?, reply_to?, edited_at?, reactions?:[{emoji,users}]}, own:boolean,
 *                   source:'live'|'sync'|'history'|'ack', replaced?:true}
 *                  (`deleted: true`, body '': erased by the CRM or deleted by its sender;
 *                  keeps seq, ts and ticks. `replaced: true`: a message already emitted,
 *                  now in a new state (edited, deleted, reacted to, erased); show it in place)
 * - `update`       {conversation, update:{seq,ts,target,kind:'edit'|'delete'|'reaction',
 *                   user:{id,name},body?,emoji?,on?}, message (the target's new state, or
 *                   null when it is not held), source} (v1.2; emitted once per seq, before
 *                   the `message` with `replaced: true`)
 * - `ack`          {conversation, client_msg_id, seq, ts, duplicate}
 * - `receipt`      {conversation, user, delivered_seq, read_seq} (one event per user, also
 *                   for the batched `receipts:[...]` frames of large conversations)
 * - `typing`       {conversation, user:{id,name}} (one event per user, also for the
 *                   batched `users:[...]` frames of large conversations)
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

import { ChatError, CONV_RE, dmId, parseDm, uuid } from './chat-util.js';
import { ConversationStore } from './chat-store.js';
import { Outbox } from './chat-outbox.js';
import { HttpStreamSocket, streamUrl } from './chat-http.js';

export { ChatError, dmId, parseDm, uuid };

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

const OPEN = 1;

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
 * @param {'auto'|'http'|'websocket'} [options.transport] `auto` (default):
 *   the WebSocket, and HTTP streaming (`/stream/chat`) after two upgrades in a
 *   row fail without opening (a proxy that drops `Upgrade`; four right after
 *   the server closed with 1012 or 1001, when a draining node refuses
 *   upgrades with 503); a later reconnect tries the WebSocket once again.
 *   `http`: HTTP streaming only.
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
    this._transportMode = options.transport || 'auto';
    this.transport = null; // 'websocket' | 'http' once a connection opens
    this._wsFailures = 0; // WebSocket attempts in a row that never opened

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
    this._online = new Map(); // user -> boolean
    this._readyWaiters = [];
    this._timers = { reconnect: null, hello: null, stable: null, idle: null, refresh: null };
    this._listenerMap = new Map();
    this._onOnline = () => { if (this._timers.reconnect) this.reconnectNow(); };
    // What the store and the outbox may use of the client, and nothing else.
    const client = this;
    const link = {
      emit: (type, detail) => this._emit(type, detail),
      request: (frame, opts) => this._request(frame, opts),
      raw: (frame) => this._raw(frame),
      waitReady: (ms) => this._waitReady(ms),
      nextId: () => this._nextId(),
      options: this.options,
      get ready() { return client._ready; },
      get user() { return client.user; },
      get maxBodyChars() { return client.maxBodyChars; },
    };
    this._store = new ConversationStore(link);
    this._outbox = new Outbox(link);
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
    const http = this._transportMode === 'http' || (this._transportMode === 'auto' && this._wsFailures >= 2);
    try {
      const url = resolveUrl(this._url);
      ws = http ? new HttpStreamSocket(streamUrl(url)) : new this._WS(url);
    } catch (err) {
      this._logger.warn('crm-chat: cannot open WebSocket:', err);
      this._scheduleReconnect({ code: 0, reason: 'open_failed' });
      return;
    }
    this._ws = ws;
    this._token = token;
    this._ready = false;
    this._wsOpened = false;
    this._wsHttp = http;
    ws.onopen = () => {
      if (ws === this._ws) this._wsOpened = true;
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
    this._outbox.socketClosed();
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  _onClosed(code, reason) {
    if (this._wsHttp) {
      // After HTTP streaming, the next reconnect tries the WebSocket once
      // more; when the server did not even answer over HTTP, the WebSocket
      // is not what failed: it gets its two tries again.
      this._wsFailures = this._ws && this._ws.unreachable ? 0 : 1;
    } else if (!this._wsOpened) {
      this._wsFailures++;
    } else {
      // After a restart or drain (1012, 1001) the closing node answers the
      // next upgrades with 503 for a while, which says nothing about the
      // path: two more failed upgrades are allowed before HTTP streaming.
      this._wsFailures = code === 1012 || code === 1001 ? -2 : 0;
    }
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
      case 'message': return this._store.onMessage(f);
      case 'update': return this._store.onUpdate(f);
      case 'receipt': return this._store.onReceipt(f);
      case 'typing': return this._onTyping(f);
      case 'presence': return this._onPresence(f);
      case 'conversation': return this._store.onConversationEvent(f);
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
    this.transport = this._wsHttp ? 'http' : 'websocket';
    if (this._wsHttp) this._logger.info('%cChat connected over HTTP streaming', 'color: green; font-weight: bold');
    else this._logger.info('%cChat WebSocket Connected', 'color: green; font-weight: bold');
    this._armIdle();
    const ws = this._ws;
    this._timers.stable = setTimeout(() => { if (ws === this._ws) this._attempt = 0; }, this.options.stableMs);

    const store = this._store;
    const listed = store.applyWelcome(Array.isArray(f.conversations) ? f.conversations : []);
    this._setState('connected');
    this._emit('welcome', {
      user: this.user,
      heartbeat_s: this.heartbeatS,
      max_body_chars: this.maxBodyChars,
      exp: this.tokenExp,
      reconnect,
      conversations: listed.map((c) => store.summary(c)),
    });
    for (const c of listed) this._emit('unread', { conversation: c.id, unread: store.unreadOf(c) });

    // 1. re-send the outbox in order, same client_msg_id
    this._outbox.resend();
    // 2. own read marks made while offline
    store.sendPendingReads();
    for (const w of this._readyWaiters.splice(0)) w.resolve();
    store.flushDelivered();
    // 3. catch up: sync what we hold, prefetch what welcome lists
    const work = store.toCatchUp(listed);
    this._runPool(work, (c) => store.catchUp(c).catch(() => {}), this.options.prefetchConcurrency);
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
    const entry = this._outbox.takeAcked(f.id);
    if (!entry) return;
    const { conversation, seq } = this._store.onAck(entry, f);
    const ack = { conversation, client_msg_id: entry.client_msg_id, seq, ts: f.ts, duplicate: !!f.duplicate };
    entry.resolve(ack);
    this._emit('ack', ack);
  }

  /**
   * A typing push: one user (`user`), or `users:[...]` (batched, large
   * conversations: who typed since the last push), emitted as one `typing`
   * event per user either way.
   */
  _onTyping(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const list = Array.isArray(f.users) ? f.users : [f.user];
    for (const u of list) {
      const user = u && typeof u === 'object' ? u : { id: u };
      if (typeof user.id !== 'string' || !user.id) continue;
      if (this.user && user.id === this.user.id) continue;
      this._emit('typing', { conversation: f.conversation, user });
    }
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

  // ---------------------------------------------------------- public API

  /**
   * Send a message. Returns at once; the promise resolves with the ack
   * `{conversation, client_msg_id, seq, ts, duplicate}` (possibly after
   * reconnects) or rejects with a ChatError for a permanent failure.
   * @returns {{client_msg_id:string, promise:Promise<object>}}
   */
  send(conversation, body, { replyTo } = {}) {
    const { client_msg_id, promise, entry } = this._outbox.add(conversation, body, replyTo);
    if (entry) this._store.conv(conversation).lastTypingSent = 0;
    return { client_msg_id, promise };
  }

  /** Messages still waiting for their ack: [{client_msg_id, conversation, body, createdAt, state}]. */
  pending(conversation) { return this._outbox.pending(conversation); }

  /**
   * v1.2: change one's own message's body (within the server's edit window).
   * Resolves with the ack `{seq, ts, duplicate}` (the change's own seq); a
   * retry of the same edit is a duplicate. Rejects with a ChatError
   * (`forbidden`: not yours or too old; `bad_request`: deleted or unknown).
   */
  edit(conversation, seq, body) { return this._change({ type: 'edit', conversation, seq, body }); }

  /** v1.2: take one's own message back ("message deleted" for everyone). */
  deleteMessage(conversation, seq) { return this._change({ type: 'delete', conversation, seq }); }

  /** v1.2: add (`on`, default true) or remove one's reaction with `emoji`. */
  react(conversation, seq, emoji, on = true) {
    return this._change({ type: 'react', conversation, seq, emoji, on: !!on });
  }

  /** The message with this seq as held (current state), or undefined. */
  message(conversation, seq) {
    const c = this._store.get(conversation);
    return c ? c.messages.get(seq) : undefined;
  }

  async _change(frame) {
    if (!CONV_RE.test(frame.conversation) || !Number.isInteger(frame.seq)) {
      throw new ChatError('bad_request', 'a conversation and the seq of a message');
    }
    return this._request(frame);
  }

  /**
   * Mark messages up to `seq` (default: the newest held) as read. Clamped to
   * the highest seq known; sent after reconnect if offline. Returns true when
   * the read mark moved.
   */
  markRead(conversation, seq) { return this._store.markRead(conversation, seq); }

  /** Mark messages up to `seq` (default: newest held) delivered. Usually automatic. */
  markDelivered(conversation, seq) { return this._store.markDelivered(conversation, seq); }

  /** Tell the others we are typing; throttled to one frame per typingIntervalMs. */
  typing(conversation) {
    if (!this._ready || !CONV_RE.test(conversation)) return false;
    const c = this._store.conv(conversation);
    const now = Date.now();
    if (now - c.lastTypingSent < this.options.typingIntervalMs) return false;
    if (!this._raw({ type: 'typing', conversation })) return false;
    c.lastTypingSent = now;
    return true;
  }

  /** Raw `history` request (messages with seq < before; newest page without before). */
  history(conversation, before, limit = 50) { return this._store.history(conversation, before, limit); }

  /** Raw `sync` request (messages with seq > after), one page; sends the epoch held. */
  sync(conversation, after = 0, limit = this.options.syncLimit) { return this._store.sync(conversation, after, limit); }

  /** Sync one conversation up to the newest message (paging). */
  async catchUp(conversation) {
    await this._waitReady(this.options.requestTimeoutMs);
    await this._store.catchUp(this._store.conv(conversation));
  }

  /** Make sure the newest page of a conversation is held; resolves to its messages. */
  load(conversation) { return this._store.load(conversation); }

  /** Fetch the page before the oldest held message. Resolves to {messages, has_more}. */
  loadOlder(conversation, limit = 50) { return this._store.loadOlder(conversation, limit); }

  /** Ask who is online in a conversation; resolves to the reply `{conversation, online:[...]}`. */
  async presence(conversation) {
    const r = await this._request({ type: 'presence', conversation });
    const online = Array.isArray(r.online) ? r.online : [];
    const set = new Set(online);
    for (const u of online) this._online.set(u, true);
    for (const u of this._store.otherMembers(conversation)) if (!set.has(u)) this._online.set(u, false);
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
  messages(conversation) { return this._store.messages(conversation); }

  /** Summary of a conversation, or null when unknown. */
  conversation(id) { return this._store.conversation(id); }

  /** Summaries of every conversation the client knows. */
  conversations() { return this._store.conversations(); }

  unread(conversation) { return this._store.unread(conversation); }

  /** Highest seq known for a conversation (held or announced by the server). */
  lastSeq(conversation) { return this._store.lastSeq(conversation); }

  /** {user: {delivered_seq, read_seq}} from receipt frames and history replies. */
  receipts(conversation) { return this._store.receipts(conversation); }

  /**
   * The members other than us, as far as known: both ids of a dm, else the
   * members from a `conversation` event, else the users that sent receipts.
   */
  otherMembers(conversation) { return this._store.otherMembers(conversation); }

  /**
   * Tick state of one of our messages: 'pending' (no seq yet), 'sent'
   * (stored), 'delivered' (every other member delivered it), 'read' (every
   * other member read it).
   */
  tickState(conversation, seq) { return this._store.tickState(conversation, seq); }
}

ChatClient.dmId = dmId;
ChatClient.parseDm = parseDm;

export default ChatClient;
