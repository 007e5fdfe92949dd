/**
 * crm-chat browser client: the per-conversation store. Holds what the client
 * knows of each conversation (messages by seq, the epoch they belong to,
 * receipts, read and delivered marks, unread counts), takes in frames and
 * replies, and keeps each conversation caught up (`history`, `sync`). Drops a
 * conversation's copy when the server's epoch says it replaced that history.
 *
 * Internal to chat.js (which owns the connection): `link` is the client's
 * side of the contract: emit(type, detail), request(frame, opts),
 * raw(frame), waitReady(ms), and the getters ready, user, options.
 * @module chat-store
 */

import { CONV_RE, parseDm, sameMessage } from './chat-util.js';

/** A message's changeable state, comparable as a string (v1.2). */
function stateOf(m) {
  return JSON.stringify([m.body, !!m.deleted, m.edited_at || null, m.reactions || []]);
}

/** A message with one change applied (v1.2); the change is idempotent. */
export function applyChange(m, u) {
  const out = { ...m };
  if (u.kind === 'edit') {
    out.body = typeof u.body === 'string' ? u.body : out.body;
    out.edited_at = u.ts;
  } else if (u.kind === 'delete') {
    out.deleted = true;
    out.body = '';
  } else if (u.kind === 'reaction' && typeof u.emoji === 'string') {
    const who = u.user && u.user.id;
    const list = (out.reactions || []).map((r) => ({ emoji: r.emoji, users: [...r.users] }));
    let r = list.find((x) => x.emoji === u.emoji);
    if (u.on && who) {
      if (!r) list.push((r = { emoji: u.emoji, users: [] }));
      if (!r.users.includes(who)) r.users.push(who);
    } else if (r) {
      r.users = r.users.filter((x) => x !== who);
    }
    out.reactions = list.filter((x) => x.users.length);
  }
  return out;
}

function newConversation(id) {
  return {
    id,
    title: null,
    members: null, // string[] when the server told us (conversation event)
    member: true,
    messages: new Map(), // seq -> message (in its current state, v1.2)
    updateSeqs: new Set(), // seqs of the changes (edit, delete, reaction) held
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

export class ConversationStore {
  constructor(link) {
    this.link = link;
    this.convs = new Map(); // id -> conversation (newConversation)
    this.deliveredQueue = new Set(); // conversation ids with a `delivered` to send
    this.deliveredTimer = null;
  }

  /** The conversation, or undefined. */
  get(id) { return this.convs.get(id); }

  all() { return this.convs.values(); }

  conv(id) {
    let c = this.convs.get(id);
    if (!c) this.convs.set(id, (c = newConversation(id)));
    return c;
  }

  /** Whether the event with this seq (a message or a change) is held. */
  holds(c, seq) { return c.messages.has(seq) || c.updateSeqs.has(seq); }

  isOwn(m) { return !!(this.link.user && m.sender && m.sender.id === this.link.user.id); }

  maxKnown(c) { return Math.max(c.maxSeq, c.serverLastSeq); }

  /** Store one message; emits `message` once per (conversation, seq). */
  ingest(c, m, source) {
    const seq = m && m.seq;
    if (!Number.isInteger(seq) || seq < 1) return false;
    const held = c.messages.get(seq);
    if (held) {
      // Erased by the CRM since we took it in: a history or sync page that
      // covers it brings the erased form (same seq, sender and
      // client_msg_id, `deleted: true`, body ''), which replaces our copy.
      // A page also brings the current state of a message changed since
      // (v1.2: edited, deleted, reacted to).
      if (sameMessage(held, m) && stateOf(m) !== stateOf(held)) {
        const msg = { ...m, conversation: c.id };
        c.messages.set(seq, msg);
        this.link.emit('message', { conversation: c.id, message: msg, own: this.isOwn(msg), source, replaced: true });
      }
      return false;
    }
    const msg = { ...m, conversation: c.id };
    c.messages.set(seq, msg);
    if (seq > c.maxSeq) c.maxSeq = seq;
    if (seq > c.serverLastSeq) c.serverLastSeq = seq;
    if (!c.oldestSeq || seq < c.oldestSeq) c.oldestSeq = seq;
    if (seq === 1) c.hasMoreBefore = false;
    if (c.loaded) while (this.holds(c, c.lastSeq + 1)) c.lastSeq++;
    const own = this.isOwn(msg);
    this.link.emit('message', { conversation: c.id, message: msg, own, source });
    if (!own) {
      if (seq > c.readSeq && seq > c.unreadBaseTo) this.link.emit('unread', { conversation: c.id, unread: this.unreadOf(c) });
      this.queueDelivered(c);
    }
    return true;
  }

  /**
   * Take in a `history` reply (to `history` or `sync`). Returns the messages
   * taken in, or null when the reply showed that our copy belongs to another
   * epoch and was a page relative to that copy: then the copy was dropped
   * and the caller loads the newest page instead.
   */
  applyReply(c, r, source, { newest = false, before = null, sync = false } = {}) {
    if (typeof r.epoch === 'string') {
      // `reset: true` answers a sync whose epoch is not the server's; such a
      // reply pages from seq 1 of the server's history.
      const reset = sync && r.reset === true;
      if (reset || this.epochChanged(c, r.epoch) === true) {
        this.restart(c, 'epoch');
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
      for (const rc of r.receipts) if (rc && typeof rc.user === 'string') this.applyReceipt(c, rc, false);
    }
    const msgs = (Array.isArray(r.messages) ? r.messages : [])
      .filter((m) => m && Number.isInteger(m.seq) && m.seq > 0)
      .sort((a, b) => a.seq - b.seq);
    // sync replays changes (type `update`) between the messages, in seq order.
    const isUpdate = (m) => m.type === 'update';
    if (newest && !c.loaded) {
      c.loaded = true;
      c.lastSeq = msgs.length ? msgs[0].seq - 1 : 0;
    }
    const oldestBefore = c.oldestSeq;
    for (const m of msgs) {
      if (isUpdate(m)) this.applyUpdate(c, m, source);
      else this.ingest(c, m, source);
    }
    if (c.loaded) while (this.holds(c, c.lastSeq + 1)) c.lastSeq++;
    if (newest || before != null) {
      const reachedOldest = !oldestBefore || !msgs.length || msgs[0].seq <= oldestBefore;
      // (history pages hold messages only: their seqs may skip changes)
      if (reachedOldest) c.hasMoreBefore = msgs.length ? !!r.has_more && msgs[0].seq > 1 : false;
    }
    return msgs;
  }

  /** Bring one conversation up to date (single flight). */
  catchUp(c) {
    if (c.syncing) return c.syncing;
    // Cleared in a .finally() (always asynchronous): the work may finish
    // without awaiting, and must not leave a settled promise behind.
    const p = this.catchUpWork(c).finally(() => { if (c.syncing === p) c.syncing = null; });
    c.syncing = p;
    return p;
  }

  async catchUpWork(c) {
    const { syncLimit, prefetchLimit, maxSyncGap } = this.link.options;
    try {
      // Too far behind: drop the local copy and start again from the newest page.
      if (c.loaded && this.maxKnown(c) - c.lastSeq > maxSyncGap) this.reset(c, 'gap');
      let force = c.forceSync;
      c.forceSync = false;
      let more = false;
      for (let guard = 0; guard < 10000; guard++) {
        // The copy may be dropped while a request is out (another epoch seen
        // elsewhere): then its reply is stale and the loop loads again.
        const gen = c.gen;
        if (!c.loaded) {
          const r = await this.link.request({ type: 'history', conversation: c.id, limit: prefetchLimit }, { wait: false });
          if (c.gen === gen) this.applyReply(c, r, 'sync', { newest: true });
          continue;
        }
        if (!force && !more && c.lastSeq >= this.maxKnown(c)) break;
        force = false;
        const after = c.lastSeq;
        const frame = { type: 'sync', conversation: c.id, after, limit: syncLimit };
        if (c.epoch) frame.epoch = c.epoch; // a different epoch answers reset: true
        const r = await this.link.request(frame, { wait: false });
        if (c.gen !== gen) {
          more = false;
          continue;
        }
        const msgs = this.applyReply(c, r, 'sync', { sync: true });
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
        this.link.emit('conversation', { id: c.id, conversation: { id: c.id }, member: false });
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
  restart(c, reason = 'data_lost') {
    c.epoch = null;
    c.serverLastSeq = c.readSeq = c.deliveredSeq = c.pendingRead = 0;
    c.baseUnread = c.unreadBaseTo = 0;
    c.receipts.clear();
    this.reset(c, reason);
  }

  reset(c, reason = 'gap') {
    c.gen++;
    c.messages.clear();
    c.updateSeqs.clear();
    c.loaded = false;
    c.lastSeq = c.maxSeq = c.oldestSeq = 0;
    c.hasMoreBefore = true;
    this.link.emit('reset', { conversation: c.id, reason });
  }

  /**
   * Whether the server's `epoch` for a conversation means our copy belongs to
   * a history the server no longer has: true or false, or null when it cannot
   * tell (we hold messages but never learnt their epoch).
   */
  epochChanged(c, epoch) {
    if (!c.loaded && !c.messages.size) return false; // nothing held
    if (c.epoch) return epoch !== c.epoch;
    if (epoch === '') return c.messages.size > 0; // the server holds no history at all
    return null;
  }

  unreadOf(c) {
    let n = c.baseUnread;
    const from = Math.max(c.readSeq, c.unreadBaseTo);
    for (const [seq, m] of c.messages) if (seq > from && !this.isOwn(m)) n++;
    return n;
  }

  setReadSeq(c, seq) {
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
        if (!this.isOwn(m)) n++;
      }
      c.baseUnread = complete ? n : Math.min(c.baseUnread, c.unreadBaseTo - seq);
    }
    return true;
  }

  queueDelivered(c) {
    if (!this.link.options.autoDelivered) return;
    this.deliveredQueue.add(c.id);
    if (!this.deliveredTimer) {
      this.deliveredTimer = setTimeout(() => {
        this.deliveredTimer = null;
        this.flushDelivered();
      }, 50);
    }
  }

  flushDelivered() {
    if (!this.link.ready) return; // kept queued until the next welcome
    for (const id of this.deliveredQueue) {
      const c = this.convs.get(id);
      if (!c || !c.member) continue;
      const target = Math.min(c.loaded ? c.lastSeq : c.maxSeq, this.maxKnown(c));
      const from = Math.max(c.deliveredSeq, c.readSeq);
      if (target <= from) continue;
      let others = false;
      for (const [seq, m] of c.messages) {
        if (seq > from && seq <= target && !this.isOwn(m)) { others = true; break; }
      }
      if (!others) continue;
      if (this.link.raw({ type: 'delivered', conversation: id, seq: target })) c.deliveredSeq = target;
    }
    this.deliveredQueue.clear();
  }

  applyReceipt(c, r, fromFrame) {
    const user = r.user;
    const prev = c.receipts.get(user) || { delivered_seq: 0, read_seq: 0 };
    const read = Math.max(prev.read_seq, Number(r.read_seq) || 0);
    const delivered = Math.max(prev.delivered_seq, Number(r.delivered_seq) || 0, read);
    const changed = read !== prev.read_seq || delivered !== prev.delivered_seq || !c.receipts.has(user);
    c.receipts.set(user, { delivered_seq: delivered, read_seq: read });
    if (this.link.user && user === this.link.user.id) { // another tab/device of ours
      if (delivered > c.deliveredSeq) c.deliveredSeq = delivered;
      if (this.setReadSeq(c, read)) this.link.emit('unread', { conversation: c.id, unread: this.unreadOf(c) });
    }
    if (changed || fromFrame) {
      this.link.emit('receipt', { conversation: c.id, user, delivered_seq: delivered, read_seq: read });
    }
  }

  /**
   * We now hold messages of a conversation whose history was empty when we
   * last heard its epoch (''), so we do not know which epoch they belong to.
   * Ask with a `sync` from our last seq (its reply carries the epoch), so a
   * later welcome can tell whether this copy is still the server's.
   */
  learnEpoch(c) {
    if (c.epoch !== '' || !c.messages.size) return;
    c.epoch = null;
    if (!c.loaded || !this.link.ready) return; // the next load or sync learns it
    c.forceSync = true;
    const run = () => { if (this.link.ready) this.catchUp(c).catch(() => {}); };
    if (c.syncing) c.syncing.then(run, run);
    else run();
  }

  summary(c) {
    return {
      id: c.id,
      title: c.title,
      members: c.members ? c.members.slice() : null,
      member: c.member,
      last_seq: this.maxKnown(c),
      read_seq: c.readSeq,
      unread: this.unreadOf(c),
      loaded: c.loaded,
      has_more_before: c.hasMoreBefore,
      oldest_seq: c.oldestSeq,
    };
  }

  onMessage(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const c = this.conv(f.conversation);
    const held = Number.isInteger(f.seq) ? c.messages.get(f.seq) : undefined;
    // Live frames carry no epoch: a different message under a seq we hold is
    // the only sign, on an open connection, that the server lost this history
    // (e.g. Valkey restarted empty). The reload that follows learns the epoch.
    if (held && !sameMessage(held, f)) this.restart(c, 'data_lost');
    if (this.ingest(c, f, 'live')) this.learnEpoch(c);
    if (!c.loaded || c.maxSeq > c.lastSeq) this.catchUp(c).catch(() => {});
  }

  /**
   * Take in one change (v1.2), live or replayed by sync, once per seq: the
   * held target takes its new state and is emitted again as `message` with
   * `replaced: true`, and `update` is emitted. A target not held arrives
   * later in its current state (history pages hold the current state).
   */
  applyUpdate(c, u, source) {
    const seq = u && u.seq;
    if (!Number.isInteger(seq) || seq < 1 || this.holds(c, seq)) return false;
    c.updateSeqs.add(seq);
    if (seq > c.maxSeq) c.maxSeq = seq;
    if (seq > c.serverLastSeq) c.serverLastSeq = seq;
    if (c.loaded) while (this.holds(c, c.lastSeq + 1)) c.lastSeq++;
    const held = c.messages.get(u.target);
    const message = held ? applyChange(held, u) : null;
    if (message) c.messages.set(u.target, message);
    // `update` first: a page learns the changer's name before it redraws.
    this.link.emit('update', { conversation: c.id, update: { ...u, conversation: c.id }, message, source });
    if (message) this.link.emit('message', { conversation: c.id, message, own: this.isOwn(message), source, replaced: true });
    return true;
  }

  onUpdate(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const c = this.conv(f.conversation);
    this.applyUpdate(c, f, 'live');
    if (!c.loaded || c.maxSeq > c.lastSeq) this.catchUp(c).catch(() => {});
  }

  /** A receipt push: one user's marks (v1), or `receipts:[...]` (batched, large conversations). */
  onReceipt(f) {
    if (!CONV_RE.test(f.conversation)) return;
    const list = Array.isArray(f.receipts) ? f.receipts : [f];
    const c = this.conv(f.conversation);
    for (const r of list) {
      if (r && typeof r.user === 'string') this.applyReceipt(c, r, true);
    }
  }

  onConversationEvent(f) {
    const info = f.conversation && typeof f.conversation === 'object' ? f.conversation : { id: f.conversation };
    if (!CONV_RE.test(info.id)) return;
    const c = this.conv(info.id);
    if (info.title != null) c.title = info.title;
    if (Array.isArray(info.members)) c.members = info.members.slice();
    if (Number(info.last_seq) > c.serverLastSeq) c.serverLastSeq = Number(info.last_seq);
    c.member = f.member !== false;
    this.link.emit('conversation', { id: c.id, conversation: info, member: c.member });
    if (c.member && this.link.ready && (c.loaded || this.link.options.prefetch)) this.catchUp(c).catch(() => {});
  }

  /**
   * Mark messages up to `seq` (default: the newest held) as read. Clamped to
   * the highest seq known; sent after reconnect if offline. Returns true when
   * the read mark moved.
   */
  markRead(conversation, seq) {
    const c = this.convs.get(conversation);
    if (!c) return false;
    let target = seq == null ? (c.loaded ? c.lastSeq : c.maxSeq) : Math.floor(Number(seq));
    target = Math.min(target, this.maxKnown(c));
    if (!(target >= 1) || target <= c.readSeq) return false;
    this.setReadSeq(c, target);
    this.link.emit('unread', { conversation, unread: this.unreadOf(c) });
    if (!this.link.ready || !this.link.raw({ type: 'read', conversation, seq: target })) {
      c.pendingRead = Math.max(c.pendingRead, target);
    }
    return true;
  }

  /** Mark messages up to `seq` (default: newest held) delivered. Usually automatic. */
  markDelivered(conversation, seq) {
    const c = this.convs.get(conversation);
    if (!c) return false;
    let target = seq == null ? (c.loaded ? c.lastSeq : c.maxSeq) : Math.floor(Number(seq));
    target = Math.min(target, this.maxKnown(c));
    if (!(target >= 1) || target <= Math.max(c.deliveredSeq, c.readSeq)) return false;
    if (!this.link.raw({ type: 'delivered', conversation, seq: target })) return false;
    c.deliveredSeq = target;
    return true;
  }

  /** Raw `history` request (messages with seq < before; newest page without before). */
  async history(conversation, before, limit = 50) {
    const frame = { type: 'history', conversation };
    if (before != null) frame.before = before;
    if (limit != null) frame.limit = limit;
    const r = await this.link.request(frame);
    const c = this.conv(conversation);
    if (!this.applyReply(c, r, 'history', { newest: before == null, before })) this.catchUp(c).catch(() => {});
    return r;
  }

  /** Raw `sync` request (messages with seq > after), one page; sends the epoch held. */
  async sync(conversation, after = 0, limit = this.link.options.syncLimit) {
    const c = this.conv(conversation);
    const frame = { type: 'sync', conversation, after, limit };
    if (c.epoch) frame.epoch = c.epoch;
    const r = await this.link.request(frame);
    if (!this.applyReply(c, r, 'sync', { sync: true })) this.catchUp(c).catch(() => {});
    return r;
  }

  /** Make sure the newest page of a conversation is held; resolves to its messages. */
  async load(conversation) {
    const c = this.conv(conversation);
    if (!c.loaded || c.syncing) {
      await this.link.waitReady(this.link.options.requestTimeoutMs);
      await this.catchUp(c);
    }
    return this.messages(conversation);
  }

  /** Fetch the page before the oldest held message. Resolves to {messages, has_more}. */
  async loadOlder(conversation, limit = 50) {
    const c = this.conv(conversation);
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

  /** Held messages of a conversation, ascending by seq. */
  messages(conversation) {
    const c = this.convs.get(conversation);
    if (!c) return [];
    return [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  /** Summary of a conversation, or null when unknown. */
  conversation(id) {
    const c = this.convs.get(id);
    return c ? this.summary(c) : null;
  }

  /** Summaries of every conversation the client knows. */
  conversations() { return [...this.convs.values()].map((c) => this.summary(c)); }

  unread(conversation) {
    const c = this.convs.get(conversation);
    return c ? this.unreadOf(c) : 0;
  }

  /** Highest seq known for a conversation (held or announced by the server). */
  lastSeq(conversation) {
    const c = this.convs.get(conversation);
    return c ? this.maxKnown(c) : 0;
  }

  /** {user: {delivered_seq, read_seq}} from receipt frames and history replies. */
  receipts(conversation) {
    const c = this.convs.get(conversation);
    return c ? Object.fromEntries([...c.receipts].map(([u, r]) => [u, { ...r }])) : {};
  }

  /**
   * The members other than us, as far as known: both ids of a dm, else the
   * members from a `conversation` event, else the users that sent receipts.
   */
  otherMembers(conversation) {
    const me = this.link.user && this.link.user.id;
    const dm = parseDm(conversation);
    if (dm) return dm.filter((u) => u !== me);
    const c = this.convs.get(conversation);
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
    const c = this.convs.get(conversation);
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

  /**
   * The conversations of a `welcome`: titles, members, read marks, and
   * whether each copy still belongs to the server's history. Returns the
   * listed conversations.
   */
  applyWelcome(entries) {
    const listed = [];
    for (const w of entries) {
      if (!w || !CONV_RE.test(w.id)) continue;
      const c = this.conv(w.id);
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
      const changed = epoch === undefined ? null : this.epochChanged(c, epoch);
      if (changed === true) this.restart(c, 'epoch');
      else if (changed === null && c.maxSeq > lastSeq) this.restart(c, 'data_lost');
      if (epoch !== undefined) c.epoch = epoch;
      c.serverLastSeq = Math.max(c.serverLastSeq, lastSeq);
      const ours = c.readSeq;
      c.readSeq = Number(w.read_seq) || 0;
      c.unreadBaseTo = lastSeq;
      c.baseUnread = Number(w.unread) || 0;
      if (ours > c.readSeq) { // our read frame was lost: apply and resend
        this.setReadSeq(c, ours);
        c.pendingRead = Math.max(c.pendingRead, ours);
      }
      if (c.deliveredSeq < c.readSeq) c.deliveredSeq = c.readSeq;
    }
    // A direct conversation is listed once it holds a message, so one we hold
    // messages of that is not listed lost them on the server (storage reset).
    const listedIds = new Set(listed.map((c) => c.id));
    const me = this.link.user && this.link.user.id;
    for (const c of this.convs.values()) {
      const dm = parseDm(c.id);
      if (c.maxSeq > 0 && !listedIds.has(c.id) && dm && dm.includes(me)) this.restart(c, 'data_lost');
    }
    return listed;
  }

  /** After a welcome: send the read marks made while offline. */
  sendPendingReads() {
    for (const c of this.convs.values()) {
      if (c.pendingRead > 0) {
        const seq = Math.min(c.pendingRead, this.maxKnown(c));
        c.pendingRead = 0;
        if (seq >= 1) this.link.raw({ type: 'read', conversation: c.id, seq });
      }
    }
  }

  /** After a welcome: what to catch up (sync what we hold, prefetch what welcome lists). */
  toCatchUp(listed) {
    const listedIds = new Set(listed.map((c) => c.id));
    const work = [];
    for (const c of this.convs.values()) {
      if (c.loaded) {
        c.forceSync = true;
        work.push(c);
      } else if (listedIds.has(c.id)) {
        if (c.serverLastSeq === 0 && c.messages.size === 0) {
          c.loaded = true; // empty conversation: nothing to fetch
          c.hasMoreBefore = false;
        } else if (this.link.options.prefetch) {
          work.push(c);
        }
      } else if (c.messages.size) {
        work.push(c);
      }
    }
    return work;
  }

  /**
   * Our message is stored (`ack` for an outbox entry). Returns
   * {conversation, seq}.
   */
  onAck(entry, f) {
    const cmid = entry.client_msg_id;
    const conversation = f.conversation || entry.conversation;
    const c = this.conv(conversation);
    const seq = Number(f.seq);
    const user = this.link.user;
    if (seq > c.serverLastSeq) c.serverLastSeq = seq;
    // Our message stored under a seq we hold for another one: the server
    // lost its data and numbers from 1 again. An ack carries no epoch, so on
    // an open connection this clash is the only sign; the reload that follows
    // learns the new epoch.
    const held = Number.isInteger(seq) ? c.messages.get(seq) : undefined;
    let restarted = false;
    if (held && user && !sameMessage(held, { sender: user, client_msg_id: cmid, ts: f.ts })) {
      this.restart(c, 'data_lost');
      restarted = true;
    }
    // The server stores the body verbatim, so the acked message is known
    // exactly; holding it now makes the order of ack and message irrelevant.
    if (Number.isInteger(seq) && seq > 0 && !c.messages.has(seq) && user) {
      this.ingest(c, {
        conversation, seq, ts: f.ts, sender: { ...user }, body: entry.body, client_msg_id: cmid,
      }, 'ack');
      this.learnEpoch(c);
      if (c.loaded ? c.maxSeq > c.lastSeq : restarted) this.catchUp(c).catch(() => {});
    }
    return { conversation, seq };
  }
}
