// crm-chat demo page. Uses only the public API of /static/chat.js.
// Every piece of server data reaches the DOM through textContent or
// attributes, never innerHTML.

import { ChatClient, dmId, parseDm } from './chat.js';

const USER_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
const BLANK_RE = /^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;
// Until the server's welcome says (ChatClient#maxBodyChars).
const DEFAULT_MAX_BODY_CHARS = 4000;
const DELETED_TEXT = 'message deleted';
/** The reactions offered (v1.2). */
const REACTIONS = ['\u{1F44D}', '\u2764\uFE0F', '\u{1F602}', '\u{1F62E}', '\u{1F622}', '\u{1F64F}'];
/** limits.edit_window_s by default: Edit is offered this long (the server decides). */
const EDIT_WINDOW_MS = 86_400_000;
const TYPING_SHOW_MS = 5000;
const LOGIN_KEY = 'crm-chat.dev-login';
const DEFAULT_CONVERSATION = 'general';
const NEAR_BOTTOM_PX = 80;
const NEAR_TOP_PX = 120;

const $ = (id) => document.getElementById(id);
const els = {
  account: $('account'),
  meDot: $('me-dot'),
  whoami: $('whoami'),
  logout: $('logout'),
  conn: $('conn-state'),
  connText: $('conn-text'),
  connRetry: $('conn-retry'),
  connSignin: $('conn-signin'),
  loginView: $('login-view'),
  loginForm: $('login-form'),
  loginUser: $('login-user'),
  loginName: $('login-name'),
  loginSubmit: $('login-submit'),
  loginError: $('login-error'),
  nodevView: $('nodev-view'),
  cookieConnect: $('cookie-connect'),
  tokenForm: $('token-form'),
  tokenInput: $('token-input'),
  tokenError: $('token-error'),
  chatView: $('chat-view'),
  dmForm: $('dm-form'),
  dmUser: $('dm-user'),
  dmError: $('dm-error'),
  conversations: $('conversations'),
  pane: $('pane'),
  back: $('back'),
  convDot: $('conv-dot'),
  convTitle: $('conv-title'),
  convSub: $('conv-sub'),
  scroller: $('scroller'),
  historyStatus: $('history-status'),
  messages: $('messages'),
  jump: $('jump-latest'),
  typing: $('typing'),
  composerForm: $('composer-form'),
  composer: $('composer'),
  send: $('send'),
  composerError: $('composer-error'),
  composeContext: $('compose-context'),
  composeContextText: $('compose-context-text'),
  composeCancel: $('compose-cancel'),
};

const ui = {
  client: null,
  mode: null, // 'dev' | 'cookie' | 'token'
  login: null, // {user, name} in dev mode
  me: null, // {id, name}
  current: null, // open conversation id
  convs: new Map(), // id -> list item parts
  names: new Map(), // user id -> display name
  bySeq: new Map(), // seq -> <li> (current conversation)
  byCmid: new Map(), // client_msg_id -> <li> (current conversation)
  failed: new Map(), // client_msg_id -> {conversation, body, reason}
  typing: new Map(), // conversation -> Map(user id -> timer)
  convOnline: new Map(), // conversation -> Set(user id)
  drafts: new Map(),
  historyNote: null,
  renderQueue: [],
  renderScheduled: false,
  loadingOlder: false,
  unsubscribe: [],
  insertCounter: 0,
  composerEnabled: false,
  compose: null, // {kind: 'reply'|'edit', conversation, seq} while replying or editing
  ticksScheduled: false,
  presenceScheduled: false,
};

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dayTimeFmt = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });

// ------------------------------------------------------------------ helpers

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

/** Set text isolated for bidi (<bdi>), aligned like the surrounding page. */
function setBidiText(node, text) {
  let bdi = node.firstElementChild;
  if (!bdi || bdi.tagName !== 'BDI' || node.childNodes.length !== 1) {
    bdi = document.createElement('bdi');
    node.replaceChildren(bdi);
  }
  if (bdi.textContent !== text) bdi.textContent = text;
}

function showError(node, text) {
  node.textContent = text || '';
  node.hidden = !text;
}

function displayName(userId) {
  return ui.names.get(userId) || userId;
}

function rememberName(user) {
  if (!user || !user.id) return;
  const name = typeof user.name === 'string' && user.name.trim() ? user.name : null;
  if (!name || ui.names.get(user.id) === name) return;
  ui.names.set(user.id, name);
  for (const [id, item] of ui.convs) {
    const dm = parseDm(id);
    if (dm && dm.includes(user.id)) refreshItemTitle(id, item);
  }
  if (ui.current && parseDm(ui.current)?.includes(user.id)) renderHeader();
}

function otherInDm(id) {
  const dm = parseDm(id);
  if (!dm) return null;
  const me = ui.me && ui.me.id;
  return dm[0] === me ? dm[1] : dm[1] === me ? dm[0] : dm[1];
}

function conversationTitle(id) {
  const other = otherInDm(id);
  if (other) return displayName(other);
  const summary = ui.client && ui.client.conversation(id);
  if (summary && summary.title) return summary.title;
  if (id === DEFAULT_CONVERSATION) return 'General';
  return id;
}

function formatTime(ts) {
  const t = Date.parse(ts);
  if (!Number.isFinite(t)) return { short: '', full: '' };
  const d = new Date(t);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  return { short: (sameDay ? timeFmt : dayTimeFmt).format(d), full: fullFmt.format(d) };
}

function firstGrapheme(text) {
  const s = String(text || '?').trim();
  if (typeof Intl.Segmenter === 'function') {
    for (const { segment } of new Intl.Segmenter().segment(s)) return segment.toLocaleUpperCase();
  }
  return ([...s][0] || '?').toLocaleUpperCase();
}

function isNearBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight <= NEAR_BOTTOM_PX;
}

function scrollToBottom() {
  els.scroller.scrollTop = els.scroller.scrollHeight;
  els.jump.hidden = true;
}

function isPaneVisible() {
  return !els.chatView.hidden && els.pane.getClientRects().length > 0;
}

// -------------------------------------------------------------- dev tokens

class DevTokensDisabled extends Error {}

async function fetchDevToken(user, name) {
  const res = await fetch('/api/v1/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json', accept: 'application/json' },
    body: JSON.stringify({ user, name }),
    credentials: 'same-origin',
    cache: 'no-store',
  });
  if (res.status === 404) throw new DevTokensDisabled('development tokens are disabled');
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      const j = await res.json();
      if (j && j.error && j.error.message) message = j.error.message;
    } catch { /* not JSON */ }
    throw new Error(message);
  }
  const json = await res.json();
  if (!json || typeof json.token !== 'string' || !json.token) throw new Error('no token in the answer');
  return json.token;
}

/**
 * true: dev tokens work, false: the route answers 404, null: unknown.
 * Asks for a real (discarded) token so that an enabled server answers 200 and
 * the browser console stays clean; tokens are stateless, nothing is created.
 */
async function probeDevTokens() {
  try {
    await fetchDevToken('dev-token-probe', 'probe');
    return true;
  } catch (err) {
    return err instanceof DevTokensDisabled ? false : null;
  }
}

function readSavedLogin() {
  try {
    const v = JSON.parse(sessionStorage.getItem(LOGIN_KEY) || 'null');
    return v && USER_RE.test(v.user) ? { user: v.user, name: String(v.name || v.user) } : null;
  } catch {
    return null;
  }
}

function saveLogin(login) {
  try {
    if (login) sessionStorage.setItem(LOGIN_KEY, JSON.stringify(login));
    else sessionStorage.removeItem(LOGIN_KEY);
  } catch { /* storage disabled */ }
}

// ------------------------------------------------------------------- views

function showView(name) {
  els.loginView.hidden = name !== 'login';
  els.nodevView.hidden = name !== 'nodev';
  els.chatView.hidden = name !== 'chat';
  els.account.hidden = name !== 'chat';
  document.body.classList.toggle('chat-active', name === 'chat');
  if (name !== 'chat') {
    els.conn.hidden = true;
    els.conn.dataset.state = 'closed';
  }
  if (name === 'login') {
    if (ui.login) {
      els.loginUser.value = ui.login.user;
      els.loginName.value = ui.login.name;
    }
    els.loginUser.focus();
  } else if (name === 'nodev') {
    els.cookieConnect.focus();
  }
}

async function onLoginSubmit(event) {
  event.preventDefault();
  const user = els.loginUser.value.trim();
  const name = els.loginName.value.trim() || user;
  if (!USER_RE.test(user)) {
    showError(els.loginError, 'The user id must be 1 to 128 letters, digits or _ . @ -');
    els.loginUser.setAttribute('aria-invalid', 'true');
    els.loginUser.focus();
    return;
  }
  els.loginUser.removeAttribute('aria-invalid');
  showError(els.loginError, '');
  els.loginSubmit.disabled = true;
  try {
    const token = await fetchDevToken(user, name);
    startDev({ user, name }, token);
  } catch (err) {
    if (err instanceof DevTokensDisabled) showView('nodev');
    else showError(els.loginError, `Sign-in failed: ${err.message}`);
  } finally {
    els.loginSubmit.disabled = false;
  }
}

function startDev(login, firstToken) {
  ui.login = login;
  saveLogin(login);
  // The sign-in's token for the first connection; then a fresh dev token for
  // every reconnection, every refresh before expiry and after a 4001.
  const getToken = async () => fetchDevToken(login.user, login.name);
  ui.names.set(login.user, login.name);
  startChat('dev', firstToken ? { token: firstToken, getToken } : { getToken });
}

// -------------------------------------------------------------- the client

/** options: {getToken} (dev sign-in), {token} (pasted) or {} (cookie). */
function startChat(mode, options) {
  stopChat();
  ui.mode = mode;
  const client = new ChatClient(options);
  ui.client = client;
  const on = (type, fn) => ui.unsubscribe.push(client.on(type, fn));
  on('state', onState);
  on('welcome', onWelcome);
  on('message', onMessage);
  on('update', ({ update }) => rememberName(update.user));
  on('ack', onAck);
  on('receipt', onReceipt);
  on('typing', onTyping);
  on('presence', onPresence);
  on('conversation', onConversationEvent);
  on('unread', ({ conversation, unread }) => setUnread(conversation, unread));
  on('reset', onReset);
  showView('chat');
  ensureItem(DEFAULT_CONVERSATION);
  setBidiText(els.whoami, ui.login ? `${ui.login.name} (${ui.login.user})` : 'Connecting…');
  client.connect();
  // Open the default conversation at once: the composer works offline (outbox)
  // and the newest page loads as soon as the connection is up.
  openConversation(DEFAULT_CONVERSATION, { focus: false, show: false });
}

function stopChat() {
  for (const off of ui.unsubscribe.splice(0)) off();
  if (ui.client) ui.client.close();
  ui.client = null;
  ui.me = null;
  ui.current = null;
  for (const m of ui.typing.values()) for (const t of m.values()) clearTimeout(t);
  ui.typing.clear();
  ui.convs.clear();
  ui.bySeq.clear();
  ui.byCmid.clear();
  ui.failed.clear();
  ui.convOnline.clear();
  ui.drafts.clear();
  ui.renderQueue.length = 0;
  els.conversations.replaceChildren();
  els.messages.replaceChildren();
  els.typing.textContent = '';
  ui.historyNote = null;
  els.historyStatus.textContent = '';
  els.convTitle.textContent = 'Select a conversation';
  els.convSub.textContent = '';
  els.convDot.hidden = true;
  setComposerEnabled(false);
  updateDocumentTitle();
}

function logout() {
  stopChat();
  saveLogin(null);
  if (ui.mode === 'dev' || !ui.mode) showView('login');
  else showView('nodev');
}

const STATE_TEXT = {
  connecting: 'Connecting…',
  reconnecting: 'Connection lost. Reconnecting…',
  auth_required: 'Your chat session has expired. Please sign in again.',
};

function onState({ state, reason }) {
  els.conn.dataset.state = state;
  let text = STATE_TEXT[state] || '';
  if (state === 'auth_required' && reason === 'no_token') text = 'Not signed in to chat.';
  els.connText.textContent = text;
  els.conn.hidden = state === 'connected' || state === 'closed';
  els.connRetry.hidden = state !== 'reconnecting';
  els.connSignin.hidden = state !== 'auth_required';
  els.meDot.dataset.online = String(state === 'connected');
  if (state === 'connected') maybeMarkRead();
}

/** The client dropped its copy of a conversation (e.g. the server lost its data). */
function onReset({ conversation }) {
  const item = ui.convs.get(conversation);
  if (item) {
    // The preview may show a message that no longer exists; the next one replaces it.
    item.previewSeq = 0;
    setBidiText(item.preview, '');
  }
  if (conversation === ui.current) openConversation(conversation, { force: true });
}

function onWelcome({ user, conversations }) {
  ui.me = user;
  checkComposerLength(); // the server's max_body_chars may differ from the default
  rememberName(user);
  setBidiText(els.whoami, user.name && user.name !== user.id ? `${user.name} (${user.id})` : user.id);
  for (const c of conversations) {
    const item = ensureItem(c.id);
    refreshItemTitle(c.id, item);
    setUnread(c.id, c.unread);
  }
  for (const [id, item] of ui.convs) refreshItemTitle(id, item); // dm titles depend on who we are
  if (!ui.current) {
    openConversation(DEFAULT_CONVERSATION, { focus: false, show: false });
  } else {
    renderHeader();
    refreshPresence(ui.current);
    refreshAllTicks();
    const s = ui.client.conversation(ui.current);
    if (!s || !s.loaded) loadCurrent(ui.current); // the first load failed while offline
  }
  // Presence dots for direct conversations (small: the server pushes changes).
  let n = 0;
  for (const id of ui.convs.keys()) {
    if (parseDm(id) && id !== ui.current && n++ < 25) refreshPresence(id);
  }
}

// ---------------------------------------------------------- conversation list

function ensureItem(id) {
  let item = ui.convs.get(id);
  if (item) return item;
  const li = el('li');
  li.dataset.conversation = id;
  const button = el('button', 'conv');
  button.type = 'button';
  const avatar = el('span', 'conv-avatar');
  avatar.setAttribute('aria-hidden', 'true');
  const initial = el('span', 'initial');
  avatar.append(initial);
  let dot = null;
  if (parseDm(id)) {
    dot = el('span', 'presence-dot');
    dot.dataset.online = 'unknown';
    avatar.append(dot);
  }
  const text = el('span', 'conv-text');
  const title = el('span', 'conv-title');
  const preview = el('span', 'preview');
  text.append(title, preview);
  // The badge is only in the DOM while there is something unread.
  const unread = el('span', 'unread');
  unread.setAttribute('aria-hidden', 'true');
  button.append(avatar, text);
  li.append(button);
  button.addEventListener('click', () => openConversation(id, { focus: true }));
  button.addEventListener('keydown', onListKeydown);
  item = {
    id, li, button, initial, dot, title, preview, unread,
    unreadCount: 0, lastActivity: 0, previewSeq: 0, order: ui.insertCounter++, removed: false,
  };
  ui.convs.set(id, item);
  refreshItemTitle(id, item);
  if (ui.client) setUnread(id, ui.client.unread(id));
  sortList();
  return item;
}

function refreshItemTitle(id, item) {
  const title = conversationTitle(id);
  setBidiText(item.title, title);
  item.initial.textContent = id === DEFAULT_CONVERSATION ? '#' : firstGrapheme(title);
  updateItemLabel(item);
}

function updateItemLabel(item) {
  const parts = [item.title.textContent];
  if (item.dot && item.dot.dataset.online !== 'unknown') parts.push(item.dot.dataset.online === 'true' ? 'online' : 'offline');
  if (item.unreadCount > 0) parts.push(`${item.unreadCount} unread`);
  if (item.removed) parts.push('no longer a member');
  item.button.setAttribute('aria-label', parts.join(', '));
}

function setUnread(id, count) {
  const item = ui.convs.get(id) || ensureItem(id);
  const n = Math.max(0, Number(count) || 0);
  item.unreadCount = n;
  if (n > 0) {
    item.unread.textContent = n > 99 ? '99+' : String(n);
    if (!item.unread.isConnected) item.button.append(item.unread);
  } else {
    item.unread.remove();
  }
  updateItemLabel(item);
  updateDocumentTitle();
}

function updateDocumentTitle() {
  let total = 0;
  for (const item of ui.convs.values()) total += item.unreadCount;
  document.title = total ? `(${total}) CRM Chat` : 'CRM Chat';
}

function sortList() {
  const items = [...ui.convs.values()].sort((a, b) => {
    if (a.id === DEFAULT_CONVERSATION) return -1;
    if (b.id === DEFAULT_CONVERSATION) return 1;
    return b.lastActivity - a.lastActivity || a.order - b.order;
  });
  const current = [...els.conversations.children];
  if (items.length === current.length && items.every((it, i) => it.li === current[i])) return;
  const focused = document.activeElement;
  els.conversations.replaceChildren(...items.map((it) => it.li));
  if (focused && els.conversations.contains(focused) && document.activeElement !== focused) focused.focus();
}

function onListKeydown(event) {
  if (!['ArrowDown', 'ArrowUp', 'Home', 'End'].includes(event.key)) return;
  const buttons = [...els.conversations.querySelectorAll('button.conv')];
  const i = buttons.indexOf(event.currentTarget);
  let next = i;
  if (event.key === 'ArrowDown') next = Math.min(buttons.length - 1, i + 1);
  else if (event.key === 'ArrowUp') next = Math.max(0, i - 1);
  else if (event.key === 'Home') next = 0;
  else next = buttons.length - 1;
  event.preventDefault();
  buttons[next].focus();
}

function updatePreview(item, message, own) {
  if (message.seq < item.previewSeq) return;
  item.previewSeq = message.seq;
  const firstLine = message.deleted ? DELETED_TEXT : String(message.body || '').split('\n', 1)[0];
  const chars = [...firstLine];
  const text = chars.length > 90 ? `${chars.slice(0, 90).join('')}…` : firstLine;
  let who = '';
  if (own) who = 'You: ';
  else if (!parseDm(item.id) && message.sender) who = `${displayName(message.sender.id)}: `;
  setBidiText(item.preview, who + text);
}

// ------------------------------------------------------------- opening

function openConversation(id, { focus = false, show = true, force = false } = {}) {
  if (!ui.client) return;
  const item = ensureItem(id);
  if (ui.current === id && !force) {
    if (show) els.chatView.dataset.view = 'pane';
    autosize();
    if (focus && !els.composer.disabled) els.composer.focus();
    maybeMarkRead();
    return;
  }
  cancelCompose();
  if (ui.current) ui.drafts.set(ui.current, els.composer.value);
  ui.current = id;
  for (const it of ui.convs.values()) {
    if (it === item) it.button.setAttribute('aria-current', 'true');
    else it.button.removeAttribute('aria-current');
  }
  ui.bySeq.clear();
  ui.byCmid.clear();
  ui.renderQueue.length = 0;
  els.messages.replaceChildren();
  ui.historyNote = null;
  els.historyStatus.textContent = '';
  els.jump.hidden = true;
  showError(els.composerError, '');
  els.composer.value = ui.drafts.get(id) || '';
  autosize();
  renderHeader();
  renderTyping();

  for (const m of ui.client.messages(id)) placeMessage(m);
  for (const p of ui.client.pending(id)) {
    if (!ui.byCmid.has(p.client_msg_id)) appendPending(p.client_msg_id, id, p.body);
  }
  for (const [cmid, f] of ui.failed) {
    if (f.conversation === id && !ui.byCmid.has(cmid)) {
      appendPending(cmid, id, f.body);
      markFailed(cmid, f.reason);
    }
  }
  scrollToBottom();
  setComposerEnabled(!item.removed);
  if (show) els.chatView.dataset.view = 'pane';
  autosize();
  if (focus && !els.composer.disabled) els.composer.focus();

  setHistoryNote(ui.client.messages(id).length ? null : 'loading');
  loadCurrent(id);
  refreshPresence(id);
  maybeMarkRead();
}

/** Fetch the newest page of the open conversation (if not held yet). */
function loadCurrent(id) {
  ui.client.load(id).then(() => {
    if (ui.current !== id) return;
    const s = ui.client.conversation(id);
    setHistoryNote(s && !s.has_more_before ? 'start' : null);
    fillViewport();
    maybeMarkRead();
  }).catch((err) => {
    if (ui.current !== id) return;
    setHistoryNote(err && err.code === 'forbidden' ? 'forbidden' : 'error');
  });
}

const HISTORY_NOTES = {
  loading: 'Loading…',
  older: 'Loading older messages…',
  error: 'Could not load messages; retrying when reconnected.',
  older_error: 'Could not load older messages.',
  forbidden: 'You are not a member of this conversation.',
  removed: 'You are no longer a member of this conversation.',
};

/** The line above the messages: loading, start of conversation, errors. */
function setHistoryNote(note) {
  ui.historyNote = note;
  renderHistoryNote();
}

function renderHistoryNote() {
  const note = ui.historyNote;
  let text = '';
  if (note === 'start') text = els.messages.children.length ? 'Beginning of the conversation' : 'No messages yet. Say hello!';
  else if (note) text = HISTORY_NOTES[note] || '';
  if (els.historyStatus.textContent !== text) els.historyStatus.textContent = text;
}

function renderHeader() {
  const id = ui.current;
  if (!id) return;
  setBidiText(els.convTitle, conversationTitle(id));
  const other = otherInDm(id);
  if (other) {
    const online = ui.client && ui.client.isOnline(other);
    els.convDot.hidden = false;
    els.convDot.dataset.online = online === undefined ? 'unknown' : String(online);
    els.convSub.textContent = online === undefined ? other : `${other} · ${online ? 'online' : 'offline'}`;
  } else {
    els.convDot.hidden = true;
    const s = ui.client && ui.client.conversation(id);
    const parts = [];
    if (s && s.members) parts.push(`${s.members.length} members`);
    const set = ui.convOnline.get(id);
    if (set) parts.push(`${set.size} online`);
    els.convSub.textContent = parts.join(' · ');
  }
}

function setComposerEnabled(enabled) {
  ui.composerEnabled = enabled;
  els.composer.disabled = !enabled;
  checkComposerLength();
}

// -------------------------------------------------------------- messages

function onMessage({ conversation, message, own, source }) {
  rememberName(message.sender);
  const item = ensureItem(conversation);
  updatePreview(item, message, own);
  if (source !== 'history') {
    const t = Date.parse(message.ts);
    if (Number.isFinite(t) && t > item.lastActivity) {
      item.lastActivity = t;
      sortList();
    }
  }
  if (!own && message.sender) clearTyping(conversation, message.sender.id);
  if (conversation === ui.current) enqueueRender(message);
}

function enqueueRender(message) {
  ui.renderQueue.push(message);
  if (ui.renderScheduled) return;
  ui.renderScheduled = true;
  queueMicrotask(flushRender);
}

/** Insert queued messages in one go, keeping the scroll position stable. */
function flushRender() {
  ui.renderScheduled = false;
  const batch = ui.renderQueue.splice(0);
  if (!batch.length) return;
  const wasNearBottom = isNearBottom();
  const anchor = wasNearBottom ? null : firstVisibleMessage();
  const anchorTop = anchor ? anchor.getBoundingClientRect().top : 0;
  let appendedOther = false;
  let appendedOwn = false;
  for (const m of batch) {
    const r = placeMessage(m);
    if (r && r.appended && r.live) {
      if (r.own) appendedOwn = true;
      else appendedOther = true;
    }
  }
  if (wasNearBottom || appendedOwn) {
    scrollToBottom();
  } else if (anchor && anchor.isConnected) {
    els.scroller.scrollTop += anchor.getBoundingClientRect().top - anchorTop;
    if (appendedOther) els.jump.hidden = false;
  }
  renderHistoryNote();
  maybeMarkRead();
}

function firstVisibleMessage() {
  const top = els.scroller.getBoundingClientRect().top;
  for (const li of els.messages.children) {
    if (li.getBoundingClientRect().bottom > top) return li;
  }
  return null;
}

function isOwnSender(senderId) {
  return !!(ui.me && senderId === ui.me.id) || (!ui.me && ui.login && senderId === ui.login.user);
}

/** Put one stored message into the list (once per seq); a changed one (v1.2) is redrawn in place. */
function placeMessage(m) {
  if (m.conversation !== ui.current || !Number.isInteger(m.seq)) return null;
  const shown = ui.bySeq.get(m.seq);
  if (shown) {
    refreshMessage(shown, m);
    return null;
  }
  const own = isOwnSender(m.sender && m.sender.id);
  const pending = m.client_msg_id ? ui.byCmid.get(m.client_msg_id) : null;
  const li = buildMessage(m, own);
  if (pending && !pending.dataset.seq) pending.replaceWith(li);
  if (m.client_msg_id) ui.byCmid.set(m.client_msg_id, li);
  li.dataset.seq = String(m.seq);
  insertSorted(li, m.seq);
  ui.bySeq.set(m.seq, li);
  if (own) updateTicks(li);
  refreshQuotes(m);
  const next = li.nextElementSibling;
  return { appended: !next || !next.dataset.seq, own, live: true };
}

/** Redraws a shown message in its new state, keeping keyboard focus on the same action. */
function refreshMessage(shown, m) {
  const own = isOwnSender(m.sender && m.sender.id);
  const li = buildMessage(m, own);
  li.dataset.seq = String(m.seq);
  const active = document.activeElement;
  const focused = active && shown.contains(active) ? active.dataset.action : null;
  shown.replaceWith(li);
  ui.bySeq.set(m.seq, li);
  if (m.client_msg_id) ui.byCmid.set(m.client_msg_id, li);
  if (own) updateTicks(li);
  refreshQuotes(m);
  if (focused) {
    const again = li.querySelector(`[data-action="${CSS.escape(focused)}"]`) || li.querySelector('.actions button');
    if (again) again.focus();
  }
}

/** The quotes of the replies to `m`, drawn again from its current state. */
function refreshQuotes(m) {
  for (const q of els.messages.querySelectorAll(`.quote[data-target="${m.seq}"]`)) fillQuote(q, m);
}

function insertSorted(li, seq) {
  li.remove();
  let node = els.messages.lastElementChild;
  while (node && (!node.dataset.seq || Number(node.dataset.seq) > seq)) node = node.previousElementSibling;
  if (node) node.after(li);
  else els.messages.prepend(li);
}

function buildMessage(m, own) {
  const li = el('li', own ? 'msg own' : 'msg');
  li.dataset.conversation = m.conversation;
  li.dataset.sender = (m.sender && m.sender.id) || '';
  if (m.client_msg_id) li.dataset.clientMsgId = m.client_msg_id;
  const bubble = el('div', 'bubble');
  const senderName = own ? 'You' : displayName(m.sender && m.sender.id);
  if (!own && !parseDm(m.conversation)) {
    const s = el('span', 'sender');
    setBidiText(s, senderName);
    bubble.append(s);
  } else {
    bubble.append(el('span', 'visually-hidden', `${senderName}: `));
  }
  if (Number.isInteger(m.reply_to)) bubble.append(buildQuote(m));
  // An erased or deleted message keeps its place (seq), time and ticks; its text is gone.
  const body = el('div', 'body', m.deleted ? DELETED_TEXT : m.body);
  body.dir = 'auto';
  if (m.deleted) li.classList.add('deleted');
  bubble.append(body);
  if (Array.isArray(m.reactions) && m.reactions.length) bubble.append(buildReactions(m));
  const meta = el('div', 'meta');
  if (m.edited_at && !m.deleted) meta.append(el('span', 'edited', 'edited'));
  const time = el('time');
  meta.append(time);
  if (own) {
    const ticks = el('span', 'ticks');
    ticks.setAttribute('role', 'img');
    meta.append(ticks);
  }
  bubble.append(meta);
  li.append(bubble);
  if (Number.isInteger(m.seq) && !m.deleted) li.append(buildActions(m, own));
  setTime(li, m.ts);
  return li;
}

// ------------------------------------------------ replies, edits, reactions

function buildQuote(m) {
  const q = el('blockquote', 'quote');
  q.dataset.target = String(m.reply_to);
  fillQuote(q, ui.client && ui.client.message(m.conversation, m.reply_to));
  return q;
}

function fillQuote(q, target) {
  q.textContent = '';
  const who = el('span', 'quote-sender', target ? displayName(target.sender && target.sender.id) : 'Reply to');
  let text = 'an earlier message';
  if (target) text = target.deleted ? DELETED_TEXT : target.body;
  const body = el('span', 'quote-body', text.length > 140 ? `${text.slice(0, 140)}\u2026` : text);
  body.dir = 'auto';
  q.append(who, body);
}

function myReaction(m, emoji) {
  const me = ui.me && ui.me.id;
  return !!(me && (m.reactions || []).some((r) => r.emoji === emoji && r.users.includes(me)));
}

function buildReactions(m) {
  const wrap = el('div', 'reactions');
  for (const r of m.reactions) {
    const mine = myReaction(m, r.emoji);
    const names = r.users.map((u) => displayName(u)).join(', ');
    const b = el('button', 'reaction', `${r.emoji} ${r.users.length}`);
    b.type = 'button';
    b.dataset.action = `reaction:${r.emoji}`;
    b.title = names;
    b.setAttribute('aria-pressed', mine ? 'true' : 'false');
    b.setAttribute('aria-label', `${r.emoji} ${r.users.length}: ${names}`);
    b.addEventListener('click', () => react(m, r.emoji, !mine));
    wrap.append(b);
  }
  return wrap;
}

function buildActions(m, own) {
  const bar = el('div', 'actions');
  bar.setAttribute('role', 'group');
  bar.setAttribute('aria-label', 'Message actions');
  const add = (action, label, onClick) => {
    const b = el('button', 'action', label);
    b.type = 'button';
    b.dataset.action = action;
    b.addEventListener('click', onClick);
    bar.append(b);
    return b;
  };
  add('reply', 'Reply', () => startCompose('reply', m));
  const picker = el('span', 'picker');
  picker.hidden = true;
  const open = add('react', 'React', () => {
    picker.hidden = !picker.hidden;
    open.setAttribute('aria-expanded', String(!picker.hidden));
    if (!picker.hidden) picker.querySelector('button').focus();
  });
  open.setAttribute('aria-expanded', 'false');
  for (const emoji of REACTIONS) {
    const b = el('button', 'emoji', emoji);
    b.type = 'button';
    b.dataset.action = `pick:${emoji}`;
    b.setAttribute('aria-label', `React with ${emoji}`);
    b.addEventListener('click', () => {
      picker.hidden = true;
      open.setAttribute('aria-expanded', 'false');
      open.focus();
      react(m, emoji, !myReaction(m, emoji));
    });
    picker.append(b);
  }
  picker.addEventListener('keydown', (event) => {
    if (event.key !== 'Escape') return;
    picker.hidden = true;
    open.setAttribute('aria-expanded', 'false');
    open.focus();
  });
  bar.append(picker);
  if (own && Date.now() - Date.parse(m.ts) < EDIT_WINDOW_MS) add('edit', 'Edit', () => startCompose('edit', m));
  if (own) add('delete', 'Delete', () => changeFailed(ui.client.deleteMessage(m.conversation, m.seq)));
  return bar;
}

function react(m, emoji, on) {
  changeFailed(ui.client.react(m.conversation, m.seq, emoji, on));
}

function changeFailed(promise) {
  showError(els.composerError, '');
  promise.catch((err) => showError(els.composerError, `Not changed: ${failureReason(err)}`));
}

/** Reply to or edit `m` from the composer (Escape or Cancel leaves it). */
function startCompose(kind, m) {
  ui.compose = { kind, conversation: m.conversation, seq: m.seq };
  const who = displayName(m.sender && m.sender.id);
  els.composeContextText.textContent =
    kind === 'edit' ? 'Editing your message' : `Replying to ${who}: ${m.body.length > 80 ? `${m.body.slice(0, 80)}\u2026` : m.body}`;
  els.composeContext.hidden = false;
  if (kind === 'edit') els.composer.value = m.body;
  autosize();
  checkComposerLength();
  if (!els.composer.disabled) els.composer.focus();
}

function cancelCompose() {
  if (!ui.compose) return;
  if (ui.compose.kind === 'edit') els.composer.value = '';
  ui.compose = null;
  els.composeContext.hidden = true;
  autosize();
  checkComposerLength();
}

function setTime(li, ts) {
  const time = li.querySelector('time');
  if (!time) return;
  const f = formatTime(ts);
  time.textContent = f.short;
  if (ts) time.dateTime = ts;
  if (f.full) time.title = f.full;
}

function appendPending(clientMsgId, conversation, body, replyTo) {
  const who = ui.me || (ui.login ? { id: ui.login.user, name: ui.login.name } : { id: '' });
  const li = buildMessage({ conversation, sender: who, body, client_msg_id: clientMsgId, reply_to: replyTo }, true);
  li.classList.add('pending');
  els.messages.append(li);
  ui.byCmid.set(clientMsgId, li);
  updateTicks(li);
  renderHistoryNote();
  return li;
}

const TICKS = {
  pending: { text: '\u25F7', label: 'Sending' },
  sent: { text: '\u2713', label: 'Sent' },
  delivered: { text: '\u2713\u2713', label: 'Delivered' },
  read: { text: '\u2713\u2713', label: 'Read' },
  failed: { text: '!', label: 'Not sent' },
};

function updateTicks(li) {
  const ticks = li.querySelector('.ticks');
  if (!ticks) return;
  let state;
  if (li.classList.contains('failed')) state = 'failed';
  else if (!li.dataset.seq) state = 'pending';
  else state = ui.client ? ui.client.tickState(li.dataset.conversation, Number(li.dataset.seq)) : 'sent';
  if (ticks.dataset.ticks === state) return;
  ticks.dataset.ticks = state;
  ticks.textContent = TICKS[state].text;
  ticks.setAttribute('aria-label', TICKS[state].label);
  ticks.title = TICKS[state].label;
}

function refreshAllTicks() {
  for (const li of els.messages.querySelectorAll('li.msg.own')) updateTicks(li);
}

function onAck({ conversation, client_msg_id: cmid, seq, ts }) {
  if (conversation !== ui.current) return;
  const li = ui.byCmid.get(cmid);
  if (!li || li.dataset.seq || ui.bySeq.has(seq)) return;
  li.classList.remove('pending');
  li.dataset.seq = String(seq);
  setTime(li, ts);
  insertSorted(li, seq);
  ui.bySeq.set(seq, li);
  updateTicks(li);
}

/** One event per user and change (a batched frame gives many): refresh ticks once per task. */
function onReceipt({ conversation }) {
  if (conversation !== ui.current || ui.ticksScheduled) return;
  ui.ticksScheduled = true;
  queueMicrotask(() => {
    ui.ticksScheduled = false;
    refreshAllTicks();
  });
}

function markFailed(cmid, reason) {
  const li = ui.byCmid.get(cmid);
  if (!li || li.dataset.seq) return;
  li.classList.remove('pending');
  li.classList.add('failed');
  updateTicks(li);
  if (!li.querySelector('.failure')) {
    const box = el('div', 'failure');
    box.append(el('span', null, `Not sent: ${reason}`));
    const dismiss = el('button', 'btn btn-small btn-quiet', 'Dismiss');
    dismiss.type = 'button';
    dismiss.addEventListener('click', () => {
      ui.failed.delete(cmid);
      ui.byCmid.delete(cmid);
      li.remove();
      els.composer.focus();
    });
    box.append(dismiss);
    li.append(box);
  }
}

function failureReason(err) {
  switch (err && err.code) {
    case 'forbidden': return 'you are not a member of this conversation.';
    case 'too_large': return 'the message is too long.';
    case 'bad_request': return err.message || 'the server refused the message.';
    case 'not_found': return 'the conversation does not exist.';
    default: return (err && err.message) || 'unknown error.';
  }
}

// ------------------------------------------------------------- composer

function autosize() {
  const c = els.composer;
  c.style.height = '';
  if (!c.value || !c.getClientRects().length) return; // empty or hidden: natural height
  c.style.height = `${Math.min(c.scrollHeight + 2, Math.round(window.innerHeight * 0.4))}px`;
}

function sendCurrent() {
  const id = ui.current;
  if (!ui.client || !id || els.composer.disabled) return;
  const body = els.composer.value;
  if (!body || BLANK_RE.test(body)) return;
  if (!checkComposerLength()) return;
  const compose = ui.compose && ui.compose.conversation === id ? ui.compose : null;
  if (compose) {
    ui.compose = null;
    els.composeContext.hidden = true;
  }
  if (compose && compose.kind === 'edit') {
    changeFailed(ui.client.edit(id, compose.seq, body));
    els.composer.value = '';
    ui.drafts.delete(id);
    checkComposerLength();
    autosize();
    return;
  }
  const replyTo = compose ? compose.seq : undefined;
  const { client_msg_id: cmid, promise } = ui.client.send(id, body, { replyTo });
  if (!ui.byCmid.has(cmid)) appendPending(cmid, id, body, replyTo);
  els.composer.value = '';
  ui.drafts.delete(id);
  checkComposerLength();
  autosize();
  scrollToBottom();
  promise.catch((err) => {
    const reason = failureReason(err);
    ui.failed.set(cmid, { conversation: id, body, reason });
    if (ui.current === id) markFailed(cmid, reason);
  });
}

function onComposerKeydown(event) {
  if (event.key === 'Escape' && ui.compose) {
    event.preventDefault();
    cancelCompose();
    return;
  }
  if (event.key !== 'Enter' || event.isComposing || event.keyCode === 229) return;
  if (event.shiftKey || event.altKey) return; // newline
  event.preventDefault();
  sendCurrent();
}

function maxBodyChars() {
  return (ui.client && ui.client.maxBodyChars) || DEFAULT_MAX_BODY_CHARS;
}

/**
 * The server's limit counts Unicode scalar values (so no `maxlength`, which
 * counts UTF-16 units): past it the composer says so and Send is off.
 * Returns whether the draft fits.
 */
function checkComposerLength() {
  const max = maxBodyChars();
  const length = [...els.composer.value].length;
  const over = length > max;
  if (over) els.composer.setAttribute('aria-invalid', 'true');
  else els.composer.removeAttribute('aria-invalid');
  showError(els.composerError, over ? `The message is too long (${length} of at most ${max} characters).` : '');
  els.send.disabled = !ui.composerEnabled || over;
  return !over;
}

function onComposerInput() {
  autosize();
  checkComposerLength();
  if (!ui.current || !ui.client) return;
  ui.drafts.set(ui.current, els.composer.value);
  if (els.composer.value && !BLANK_RE.test(els.composer.value)) ui.client.typing(ui.current);
}

// ------------------------------------------------------- typing indicator

function onTyping({ conversation, user }) {
  if (!user || !user.id || (ui.me && user.id === ui.me.id)) return;
  rememberName(user);
  let m = ui.typing.get(conversation);
  if (!m) ui.typing.set(conversation, (m = new Map()));
  clearTimeout(m.get(user.id));
  m.set(user.id, setTimeout(() => clearTyping(conversation, user.id), TYPING_SHOW_MS));
  if (conversation === ui.current) renderTyping();
}

function clearTyping(conversation, userId) {
  const m = ui.typing.get(conversation);
  if (!m || !m.has(userId)) return;
  clearTimeout(m.get(userId));
  m.delete(userId);
  if (conversation === ui.current) renderTyping();
}

function renderTyping() {
  const m = ui.current ? ui.typing.get(ui.current) : null;
  const names = m ? [...m.keys()].map(displayName) : [];
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names[0]}, ${names[1]} and ${names.length - 2} more are typing…`;
  if (els.typing.textContent !== text) els.typing.textContent = text;
}

// --------------------------------------------------------------- presence

function refreshPresence(id) {
  if (!ui.client) return;
  ui.client.presence(id).then((r) => {
    ui.convOnline.set(id, new Set(Array.isArray(r.online) ? r.online : []));
    renderPresence();
  }).catch(() => { /* e.g. forbidden; nothing to show */ });
}

/** One event per change (a batched frame gives many): render once per task. */
function onPresence({ conversation, user, online }) {
  if (typeof user === 'string') {
    const set = ui.convOnline.get(conversation);
    if (set) {
      if (online) set.add(user);
      else set.delete(user);
    }
  }
  if (ui.presenceScheduled) return;
  ui.presenceScheduled = true;
  queueMicrotask(() => {
    ui.presenceScheduled = false;
    renderPresence();
  });
}

function renderPresence() {
  for (const item of ui.convs.values()) {
    if (!item.dot) continue;
    const other = otherInDm(item.id);
    const online = ui.client && other ? ui.client.isOnline(other) : undefined;
    const value = online === undefined ? 'unknown' : String(online);
    if (item.dot.dataset.online !== value) {
      item.dot.dataset.online = value;
      updateItemLabel(item);
    }
  }
  renderHeader();
}

function onConversationEvent({ id, member }) {
  const item = ensureItem(id);
  item.removed = !member;
  item.button.classList.toggle('removed', !member);
  refreshItemTitle(id, item);
  if (id === ui.current) {
    renderHeader();
    setComposerEnabled(member);
    if (!member) setHistoryNote('removed');
    refreshAllTicks();
    if (member && !els.messages.children.length) openConversation(id, { force: true, show: false });
  }
}

// ---------------------------------------------------- scrolling and reads

function maybeMarkRead() {
  if (!ui.client || !ui.current) return;
  if (document.visibilityState !== 'visible' || !document.hasFocus()) return;
  if (!isPaneVisible() || !isNearBottom()) return;
  ui.client.markRead(ui.current);
}

async function loadOlder() {
  const id = ui.current;
  if (!ui.client || !id || ui.loadingOlder) return;
  const s = ui.client.conversation(id);
  if (!s || !s.loaded || !s.has_more_before) return;
  ui.loadingOlder = true;
  setHistoryNote('older');
  els.messages.setAttribute('aria-busy', 'true');
  try {
    const r = await ui.client.loadOlder(id, 50);
    if (ui.current === id) setHistoryNote(r.has_more ? null : 'start');
  } catch {
    if (ui.current === id) setHistoryNote('older_error');
  } finally {
    ui.loadingOlder = false;
    els.messages.removeAttribute('aria-busy');
  }
  if (ui.current === id) fillViewport();
}

/** Keep loading history until the pane can scroll (so scroll-up paging works). */
function fillViewport() {
  const s = els.scroller;
  if (s.scrollHeight <= s.clientHeight + NEAR_TOP_PX) loadOlder();
}

function onScroll() {
  if (els.scroller.scrollTop <= NEAR_TOP_PX) loadOlder();
  if (isNearBottom()) {
    els.jump.hidden = true;
    maybeMarkRead();
  }
}

// ------------------------------------------------------------------ wiring

function bind() {
  els.loginForm.addEventListener('submit', onLoginSubmit);
  els.cookieConnect.addEventListener('click', () => {
    ui.login = null;
    startChat('cookie', {});
  });
  els.tokenForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const token = els.tokenInput.value.trim();
    if (!token) {
      showError(els.tokenError, 'Paste a token first.');
      return;
    }
    showError(els.tokenError, '');
    ui.login = null;
    startChat('token', { token });
  });
  els.logout.addEventListener('click', logout);
  els.connRetry.addEventListener('click', () => ui.client && ui.client.reconnectNow());
  els.connSignin.addEventListener('click', logout);

  els.dmForm.addEventListener('submit', (event) => {
    event.preventDefault();
    const other = els.dmUser.value.trim();
    const me = ui.me ? ui.me.id : ui.login && ui.login.user;
    if (!USER_RE.test(other)) {
      showError(els.dmError, 'Enter a user id (letters, digits, _ . @ -).');
      els.dmUser.setAttribute('aria-invalid', 'true');
      return;
    }
    if (!me) {
      showError(els.dmError, 'Not connected yet.');
      return;
    }
    if (other === me) {
      showError(els.dmError, 'That is you. Pick another user.');
      els.dmUser.setAttribute('aria-invalid', 'true');
      return;
    }
    els.dmUser.removeAttribute('aria-invalid');
    showError(els.dmError, '');
    els.dmUser.value = '';
    openConversation(dmId(me, other), { focus: true });
  });

  els.back.addEventListener('click', () => {
    els.chatView.dataset.view = 'list';
    const item = ui.current && ui.convs.get(ui.current);
    if (item) item.button.focus();
  });

  els.composerForm.addEventListener('submit', (event) => {
    event.preventDefault();
    sendCurrent();
    els.composer.focus();
  });
  els.composer.addEventListener('keydown', onComposerKeydown);
  els.composeCancel.addEventListener('click', () => {
    cancelCompose();
    els.composer.focus();
  });
  els.composer.addEventListener('input', onComposerInput);

  els.scroller.addEventListener('scroll', onScroll, { passive: true });
  els.jump.addEventListener('click', () => {
    scrollToBottom();
    maybeMarkRead();
  });

  document.addEventListener('visibilitychange', maybeMarkRead);
  window.addEventListener('focus', maybeMarkRead);
  window.addEventListener('resize', maybeMarkRead);
  window.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && els.chatView.dataset.view === 'pane' && window.matchMedia('(max-width: 720px)').matches) {
      els.back.click();
    }
  });
}

async function init() {
  bind();
  const saved = readSavedLogin();
  if (saved) {
    // Reload of a signed-in tab: the real token request doubles as the probe.
    ui.login = saved;
    els.loginUser.value = saved.user;
    els.loginName.value = saved.name;
    try {
      startDev(saved, await fetchDevToken(saved.user, saved.name));
      return;
    } catch (err) {
      if (err instanceof DevTokensDisabled) {
        showView('nodev');
        return;
      }
      showError(els.loginError, `Sign-in failed: ${err.message}`);
    }
  } else if ((await probeDevTokens()) === false) {
    showView('nodev');
    return;
  }
  showView('login');
}

init();
