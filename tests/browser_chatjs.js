// The body of a WebDriver async script (tests/browser.rs runs it in a page of
// the real server; `node tests/browser_chatjs_node.mjs` runs it in node too).
// arguments[0]: the URL of chat.js; the last argument: WebDriver's callback.
//
// A scripted server behind a fake WebSocket drives the real chat.js through
// the v1.1 frames the real server may not send on demand: batched presence and
// receipts, an epoch change seen in `welcome`, `reset: true` on a sync (with
// and without more pages), `max_body_chars`, token refresh, close 4001 and
// erased messages. Resolves to [{name, ok, detail}].
const moduleUrl = arguments[0];
const done = arguments[arguments.length - 1];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, fn, ms = 5000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timeout waiting for ${what}`);
    await sleep(10);
  }
}
function check(cond, what) {
  if (!cond) throw new Error(what);
}
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** One scripted server; every FakeWS the client opens talks to it. */
class Script {
  constructor() {
    this.sockets = [];
    this.frames = []; // every client frame, in order
    this.down = false; // refuse new connections (close 1006)
    this.conv = 'general';
    this.epoch = 'e1';
    this.welcomeEpoch = null; // announce another epoch in welcome than the store has
    this.messages = [];
    this.maxBody = 4000;
    this.exp = null; // unix seconds for welcome
    this.refreshExp = null; // unix seconds for refreshed
    this.refreshError = null; // error code answered to refresh
    this.rejectHello = false; // error unauthorized + close 4001
    this.tokens = []; // tokens seen in hello
    this.refreshTokens = [];
    const script = this;
    this.WebSocket = class FakeWS {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        script.sockets.push(this);
        setTimeout(() => {
          if (script.down) return this._end(1006);
          this.readyState = 1;
          if (this.onopen) this.onopen({});
        }, 0);
      }
      send(data) {
        if (this.readyState !== 1) throw new Error('not open');
        const f = JSON.parse(data);
        script.frames.push(f);
        setTimeout(() => script.handle(this, f), 0);
      }
      close(code = 1005) { this._end(code); }
      _end(code) {
        if (this.readyState === 3) return;
        this.readyState = 3;
        setTimeout(() => { if (this.onclose) this.onclose({ code, reason: '' }); }, 0);
      }
      push(frame) {
        setTimeout(() => {
          if (this.readyState === 1 && this.onmessage) this.onmessage({ data: JSON.stringify(frame) });
        }, 0);
      }
    };
  }

  get ws() { return this.sockets[this.sockets.length - 1]; }

  lastSeq() { return this.messages.length ? this.messages[this.messages.length - 1].seq : 0; }

  fill(epoch, bodies) {
    this.epoch = epoch;
    this.messages = bodies.map((body, i) => ({
      conversation: this.conv, seq: i + 1, ts: `2026-01-01T00:00:${String(i % 60).padStart(2, '0')}.000Z`,
      sender: { id: 'bob', name: 'Bob' }, body, client_msg_id: `${epoch}-${i + 1}`,
    }));
  }

  page(msgs, limit) {
    return { messages: msgs.slice(0, limit), has_more: msgs.length > limit };
  }

  handle(ws, f) {
    if (ws.readyState !== 1) return;
    const reply = (x) => ws.push({ ...x, id: f.id });
    switch (f.type) {
      case 'hello':
        this.tokens.push(f.token);
        if (this.rejectHello) {
          reply({ type: 'error', code: 'unauthorized', message: 'token expired' });
          setTimeout(() => ws._end(4001), 5);
          return;
        }
        reply({
          type: 'welcome', user: { id: 'alice', name: 'Alice' }, heartbeat_s: 25, max_body_chars: this.maxBody,
          exp: this.exp,
          conversations: [{
            id: this.conv, title: 'General', last_seq: this.lastSeq(), read_seq: 0, unread: 0,
            epoch: this.welcomeEpoch ?? this.epoch,
          }],
        });
        return;
      case 'history': {
        const lim = f.limit || 50;
        const below = this.messages.filter((m) => f.before == null || m.seq < f.before);
        const pageMsgs = below.slice(-lim);
        reply({ type: 'history', conversation: f.conversation, messages: pageMsgs, receipts: [],
          has_more: below.length > lim, epoch: this.epoch });
        return;
      }
      case 'sync': {
        const reset = typeof f.epoch === 'string' && f.epoch !== this.epoch;
        const from = reset ? 0 : f.after;
        const p = this.page(this.messages.filter((m) => m.seq > from), f.limit || 50);
        reply({ type: 'history', conversation: f.conversation, ...p, receipts: [], epoch: this.epoch,
          ...(reset ? { reset: true } : {}) });
        return;
      }
      case 'send': {
        const dup = this.messages.find((m) => m.client_msg_id === f.client_msg_id);
        if (dup) {
          reply({ type: 'ack', conversation: f.conversation, seq: dup.seq, ts: dup.ts, duplicate: true });
          return;
        }
        const m = {
          conversation: f.conversation, seq: this.lastSeq() + 1, ts: '2026-01-01T00:01:00.000Z',
          sender: { id: 'alice', name: 'Alice' }, body: f.body, client_msg_id: f.client_msg_id,
        };
        this.messages.push(m);
        reply({ type: 'ack', conversation: f.conversation, seq: m.seq, ts: m.ts, duplicate: false });
        ws.push({ type: 'message', ...m });
        return;
      }
      case 'refresh':
        this.refreshTokens.push(f.token);
        if (this.refreshError) reply({ type: 'error', code: this.refreshError, message: 'no' });
        else reply({ type: 'refreshed', exp: this.refreshExp });
        return;
      case 'ping': reply({ type: 'pong' }); return;
      case 'presence': reply({ type: 'presence', conversation: f.conversation, online: [] }); return;
      default:
    }
  }
}

async function newClient(script, extra = {}) {
  const { ChatClient } = await import(moduleUrl);
  const quiet = { info() {}, warn() {} };
  const client = new ChatClient({
    url: 'ws://scripted.invalid/ws/chat', WebSocket: script.WebSocket, logger: quiet, token: 'tok-1',
    backoffBaseMs: 20, backoffCapMs: 200, prefetch: true, ...extra,
  });
  const events = [];
  for (const t of ['reset', 'presence', 'receipt', 'typing', 'message', 'token_refreshed', 'token_expired', 'state', 'error']) {
    client.on(t, (d) => events.push([t, d]));
  }
  client.connect();
  await until('connected', () => client.state === 'connected');
  return { client, events };
}

const bodiesOf = (client, conv = 'general') => client.messages(conv).map((m) => [m.seq, m.body]);

const checks = {
  async max_body_chars_from_welcome() {
    const s = new Script();
    s.maxBody = 5;
    const { client } = await newClient(s);
    check(client.maxBodyChars === 5, `maxBodyChars ${client.maxBodyChars}`);
    const long = client.send('general', 'abcdef');
    const err = await long.promise.then(() => null, (e) => e);
    check(err && err.code === 'too_large', `6 chars: ${err && err.code}`);
    // 5 scalar values, 10 UTF-16 code units: the server counts scalars.
    const emoji = client.send('general', '\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}');
    const ack = await emoji.promise;
    check(ack.seq === 1, `emoji ack ${JSON.stringify(ack)}`);
    client.close();
    return 'too_large above 5 chars; 5 emoji accepted';
  },

  async batched_presence_and_receipts() {
    const s = new Script();
    s.fill('e1', ['a', 'b', 'c']);
    const { client, events } = await newClient(s);
    await client.load('general');
    s.ws.push({ type: 'presence', conversation: 'general',
      changes: [{ user: 'bob', online: false }, { user: 'carol', online: true }] });
    s.ws.push({ type: 'presence', conversation: 'general', user: 'dave', online: true });
    await until('3 presence events', () => events.filter(([t]) => t === 'presence').length >= 3);
    const pres = events.filter(([t]) => t === 'presence').map(([, d]) => [d.user, d.online]);
    check(same(pres, [['bob', false], ['carol', true], ['dave', true]]), `presence events ${JSON.stringify(pres)}`);
    check(client.isOnline('bob') === false && client.isOnline('carol') === true, 'isOnline');
    const mine = client.send('general', 'mine');
    const { seq } = await mine.promise;
    s.ws.push({ type: 'receipt', conversation: 'general', receipts: [
      { user: 'bob', delivered_seq: seq, read_seq: 2 }, { user: 'carol', delivered_seq: seq, read_seq: seq }] });
    await until('2 receipt events', () => events.filter(([t]) => t === 'receipt').length >= 2);
    check(client.tickState('general', seq) === 'delivered', `ticks ${client.tickState('general', seq)}`);
    s.ws.push({ type: 'receipt', conversation: 'general', user: 'bob', delivered_seq: seq, read_seq: seq });
    await until('read ticks', () => client.tickState('general', seq) === 'read');
    const rc = events.filter(([t]) => t === 'receipt').map(([, d]) => [d.user, d.read_seq]);
    check(same(rc, [['bob', 2], ['carol', seq], ['bob', seq]]), `receipt events ${JSON.stringify(rc)}`);
    client.close();
    return 'one event per change, batched and single';
  },

  async batched_typing() {
    const s = new Script();
    s.fill('e1', ['a']);
    const { client, events } = await newClient(s);
    await client.load('general');
    s.ws.push({ type: 'typing', conversation: 'general',
      users: [{ id: 'bob', name: 'Bob' }, { id: 'carol', name: 'Carol' }] });
    s.ws.push({ type: 'typing', conversation: 'general', user: { id: 'dave', name: 'Dave' } });
    await until('3 typing events', () => events.filter(([t]) => t === 'typing').length >= 3);
    const typ = events.filter(([t]) => t === 'typing').map(([, d]) => [d.user.id, d.user.name]);
    check(same(typ, [['bob', 'Bob'], ['carol', 'Carol'], ['dave', 'Dave']]), `typing events ${JSON.stringify(typ)}`);
    client.close();
    return 'one event per user, batched and single';
  },

  async epoch_change_in_welcome() {
    const s = new Script();
    s.fill('e1', ['old 1', 'old 2', 'old 3']);
    const { client, events } = await newClient(s);
    await client.load('general');
    check(same(bodiesOf(client), [[1, 'old 1'], [2, 'old 2'], [3, 'old 3']]), 'loaded e1');
    // The server goes away and comes back with a new, longer history (so a
    // lower last_seq cannot give it away); meanwhile a message waits in the outbox.
    s.down = true;
    s.ws._end(1012);
    await until('reconnecting', () => client.state === 'reconnecting');
    const queued = client.send('general', 'written offline');
    s.fill('e2', ['new 1', 'new 2', 'new 3', 'new 4']);
    s.down = false;
    const ack = await queued.promise;
    await until('connected', () => client.state === 'connected');
    await until('the new history', () => client.messages('general').length === 5);
    const resets = events.filter(([t]) => t === 'reset').map(([, d]) => d.reason);
    check(same(resets, ['epoch']), `reset events ${JSON.stringify(resets)}`);
    check(same(bodiesOf(client), [[1, 'new 1'], [2, 'new 2'], [3, 'new 3'], [4, 'new 4'], [5, 'written offline']]),
      `after the epoch change: ${JSON.stringify(bodiesOf(client))}`);
    const sends = s.frames.filter((f) => f.type === 'send');
    check(sends.length >= 1 && sends.every((f) => f.client_msg_id === queued.client_msg_id), 'outbox re-sent as is');
    check(ack.seq === 5, `ack ${ack.seq}`);
    client.close();
    return 'dropped e1, loaded e2, outbox kept';
  },

  async sync_reset_true() {
    for (const n of [2, 130]) {
      const s = new Script();
      s.fill('e1', ['old 1', 'old 2', 'old 3']);
      const { client, events } = await newClient(s, { syncLimit: 100, prefetchLimit: 50 });
      await client.load('general');
      // A welcome that does not show the change (e.g. from a node that has not
      // noticed yet): the sync carries our epoch and the server answers reset.
      s.down = true;
      s.ws._end(1012);
      await until('reconnecting', () => client.state === 'reconnecting');
      s.fill('e3', Array.from({ length: n }, (_, i) => `e3 ${i + 1}`));
      s.welcomeEpoch = 'e1';
      s.down = false;
      await until('connected', () => client.state === 'connected');
      const want = n <= 100 ? n : 50; // more than a page: the newest page only
      await until(`the e3 history (${n})`, () => client.messages('general').length === want
        && client.messages('general').every((m) => m.body.startsWith('e3 ')));
      const sync = s.frames.find((f) => f.type === 'sync');
      check(sync && sync.epoch === 'e1', `sync frame ${JSON.stringify(sync)}`);
      const got = bodiesOf(client);
      check(got[got.length - 1][0] === n && got[got.length - 1][1] === `e3 ${n}`, `newest ${JSON.stringify(got.at(-1))}`);
      check(events.some(([t, d]) => t === 'reset' && d.reason === 'epoch'), 'reset event');
      client.close();
    }
    return 'reset:true replaces the copy (whole history, or the newest page when longer)';
  },

  async token_refresh() {
    const s = new Script();
    const reasons = [];
    let n = 1;
    const getToken = async ({ reason }) => { reasons.push(reason); n += 1; return `tok-${n}`; };
    s.exp = Math.floor(Date.now() / 1000) + 3;
    s.refreshExp = s.exp + 3;
    const { client, events } = await newClient(s, { token: undefined, getToken });
    const t0 = Date.now();
    await until('a refresh', () => s.refreshTokens.length >= 1, 4000);
    const first = Date.now() - t0;
    check(first >= 900 && first < 2900, `first refresh after ${first} ms (token lives ~3 s)`);
    await until('token_refreshed', () => events.some(([t]) => t === 'token_refreshed'));
    s.refreshExp += 3;
    await until('a second refresh', () => s.refreshTokens.length >= 2, 4000);
    check(s.sockets.length === 1, `${s.sockets.length} sockets: the session was not reopened`);
    check(new Set(s.refreshTokens).size === s.refreshTokens.length && !s.refreshTokens.includes(s.tokens[0]),
      `refresh tokens ${JSON.stringify(s.refreshTokens)}`);
    // Close 4001: a new token before reconnecting, never the rejected one.
    s.ws._end(4001);
    await until('reconnected', () => s.sockets.length === 2 && client.state === 'connected');
    const last = s.refreshTokens[s.refreshTokens.length - 1];
    check(s.tokens[1] && s.tokens[1] !== last && s.tokens[1] !== s.tokens[0], `hello tokens ${JSON.stringify(s.tokens)}`);
    check(reasons.includes('token_expired'), `token reasons ${JSON.stringify(reasons)}`);
    // A server that keeps refusing: bounded attempts with backoff, then auth_required.
    s.rejectHello = true;
    const before = s.tokens.length;
    s.ws._end(4001);
    await until('auth_required', () => client.state === 'auth_required', 5000);
    const tries = s.tokens.length - before;
    check(tries >= 1 && tries <= 3, `${tries} hello attempts after repeated 4001`);
    client.close();
    // A server without `refresh` (bad_request): no further refresh frames.
    const s2 = new Script();
    s2.exp = Math.floor(Date.now() / 1000) + 2;
    s2.refreshError = 'bad_request';
    const c2 = await newClient(s2, { token: undefined, getToken: async () => `x-${Math.random()}` });
    await until('one refresh', () => s2.refreshTokens.length === 1, 3000);
    await sleep(1500);
    check(s2.refreshTokens.length === 1, `${s2.refreshTokens.length} refreshes against a server without refresh`);
    c2.client.close();
    return `refresh at ${first} ms of ~3000; 4001 -> new token; ${tries} tries then auth_required`;
  },

  async erased_messages() {
    const s = new Script();
    s.fill('e1', ['a', 'b', 'c']);
    s.messages[1] = { ...s.messages[1], body: '', deleted: true };
    const { client, events } = await newClient(s);
    await client.load('general');
    const m = client.messages('general')[1];
    check(m.seq === 2 && m.deleted === true && m.body === '', `erased ${JSON.stringify(m)}`);
    // Erased after the client took it in: a page covering it replaces the copy.
    s.messages[0] = { ...s.messages[0], body: '', deleted: true };
    await client.history('general');
    const first = client.messages('general')[0];
    check(first.seq === 1 && first.deleted === true && first.body === '', `replaced ${JSON.stringify(first)}`);
    const replaced = events.filter(([t, d]) => t === 'message' && d.replaced).map(([, d]) => d.message.seq);
    check(same(replaced, [1]), `replaced events ${JSON.stringify(replaced)}`);
    check(same(bodiesOf(client), [[1, ''], [2, ''], [3, 'c']]), `bodies ${JSON.stringify(bodiesOf(client))}`);
    client.close();
    return 'kept with deleted:true and its seq; a held copy replaced by its erased form';
  },
};

(async () => {
  const results = [];
  for (const [name, fn] of Object.entries(checks)) {
    try {
      results.push({ name, ok: true, detail: String(await fn()) });
    } catch (e) {
      results.push({ name, ok: false, detail: String((e && e.stack) || e) });
    }
  }
  return results;
})().then(done, (e) => done([{ name: 'harness', ok: false, detail: String((e && e.stack) || e) }]));
