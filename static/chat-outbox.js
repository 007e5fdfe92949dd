/**
 * crm-chat browser client: the outbox. Keeps every sent message until its
 * `ack` (across reconnects, with the same client_msg_id), retries what the
 * server may accept later, and rejects what it never will.
 *
 * Internal to chat.js: `link` is the client's side of the contract:
 * emit(type, detail), request(frame, opts), nextId(), and the getters ready,
 * options, maxBodyChars (the server's, from welcome).
 * @module chat-outbox
 */

import { BLANK_RE, CONV_RE, ChatError, uuid } from './chat-util.js';

const PERMANENT_SEND_ERRORS = new Set(['forbidden', 'bad_request', 'too_large', 'not_found']);

export class Outbox {
  constructor(link) {
    this.link = link;
    this.entries = new Map(); // client_msg_id -> entry (insertion order = send order)
    this.sendIds = new Map(); // frame id -> client_msg_id (current socket)
  }

  /**
   * Queue a message and send it when connected. Returns
   * {client_msg_id, promise, entry}; entry is null when the message was
   * refused locally (the promise is then rejected).
   */
  add(conversation, body, replyTo) {
    const client_msg_id = uuid();
    let resolve;
    let reject;
    const promise = new Promise((a, b) => { resolve = a; reject = b; });
    promise.catch(() => {}); // failures are also emitted as `error`
    const entry = {
      client_msg_id, conversation, body, resolve, reject, attempts: 0, state: 'queued', timer: null, createdAt: Date.now(),
      reply_to: Number.isInteger(replyTo) && replyTo > 0 ? replyTo : undefined,
    };
    const err = this.validateSend(conversation, body, client_msg_id);
    if (err) {
      entry.reject(err);
      return { client_msg_id, promise, entry: null };
    }
    this.entries.set(client_msg_id, entry);
    this.transmit(entry);
    return { client_msg_id, promise, entry };
  }

  /** After a welcome: send again, in order, what waits (same client_msg_id). */
  resend() {
    for (const entry of this.entries.values()) {
      if (entry.state === 'queued' && !entry.timer) this.transmit(entry);
    }
  }

  /** The socket is gone: its frame ids mean nothing any more. */
  socketClosed() { this.sendIds.clear(); }

  /** The entry an `ack` (by frame id) settles, taken out of the outbox; or null. */
  takeAcked(frameId) {
    const cmid = this.sendIds.get(frameId);
    this.sendIds.delete(frameId);
    const entry = cmid ? this.entries.get(cmid) : null;
    if (!entry) return null;
    this.entries.delete(cmid);
    clearTimeout(entry.timer);
    entry.timer = null;
    entry.state = 'acked';
    return entry;
  }

  transmit(entry) {
    if (!this.link.ready) { entry.state = 'queued'; return; }
    const id = this.link.nextId();
    entry.state = 'sending';
    entry.attempts++;
    this.sendIds.set(id, entry.client_msg_id);
    const frame = {
      type: 'send', id, conversation: entry.conversation, client_msg_id: entry.client_msg_id, body: entry.body,
    };
    if (entry.reply_to) frame.reply_to = entry.reply_to;
    this.link.request(frame, { wait: false }).catch((err) => this.onSendError(entry, err));
  }

  retryLater(entry, delay) {
    entry.state = 'queued';
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      entry.timer = null;
      if (this.entries.has(entry.client_msg_id)) this.transmit(entry);
    }, delay);
  }

  onSendError(entry, err) {
    if (!this.entries.has(entry.client_msg_id)) return;
    const code = err && err.code;
    if (PERMANENT_SEND_ERRORS.has(code)) return this.fail(entry, err);
    const { backoffBaseMs: base, backoffCapMs: cap } = this.link.options;
    const backoff = () => Math.floor(Math.random() * Math.min(cap, base * 2 ** Math.min(entry.attempts, 20)));
    if (code === 'disconnected' || code === 'unauthorized' || code === 'auth_required' || code === 'closed') {
      entry.state = 'queued'; // re-sent after the next welcome
      return;
    }
    if (code === 'rate_limited') {
      const ms = Number(err.retry_after_ms);
      return this.retryLater(entry, Number.isFinite(ms) && ms >= 0 ? ms + Math.floor(Math.random() * 250) : base + backoff());
    }
    if (code === 'timeout' || code === 'unavailable' || (code === 'internal' && entry.attempts < 3)) {
      return this.retryLater(entry, base + backoff());
    }
    this.fail(entry, err);
  }

  fail(entry, err) {
    this.entries.delete(entry.client_msg_id);
    clearTimeout(entry.timer);
    entry.state = 'failed';
    entry.reject(err);
    this.link.emit('error', {
      code: err.code, message: err.message, conversation: entry.conversation, client_msg_id: entry.client_msg_id,
    });
  }

  validateSend(conversation, body, client_msg_id) {
    if (!CONV_RE.test(conversation)) return new ChatError('bad_request', 'invalid conversation id');
    if (typeof body !== 'string' || !body.length || BLANK_RE.test(body)) {
      return new ChatError('bad_request', 'message is empty');
    }
    const { maxFrameBytes } = this.link.options;
    const { maxBodyChars } = this.link; // the server's, from welcome
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
    for (const e of this.entries.values()) {
      if (conversation == null || e.conversation === conversation) {
        out.push({
          client_msg_id: e.client_msg_id, conversation: e.conversation, body: e.body, createdAt: e.createdAt, state: e.state,
        });
      }
    }
    return out;
  }
}
