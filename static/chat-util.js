/**
 * crm-chat browser client: helpers shared by chat.js, chat-store.js and
 * chat-outbox.js (ids, errors, validation). Part of the client; the public
 * entry point is chat.js, which re-exports what an embedding page needs.
 * @module chat-util
 */

export const CONV_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
export const USER_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
// Unicode White_Space (not JS \s, which differs on U+0085 and U+FEFF).
export const BLANK_RE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

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
export function sameMessage(a, b) {
  const sa = a.sender && a.sender.id;
  const sb = b.sender && b.sender.id;
  if (sa && sb && sa !== sb) return false;
  if (a.client_msg_id && b.client_msg_id) return a.client_msg_id === b.client_msg_id;
  if (a.ts && b.ts) return a.ts === b.ts;
  return true;
}
