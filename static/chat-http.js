/*
 * crm-chat HTTP streaming transport (PROTOCOL v1.2, "the same chat over
 * plain HTTP"), shaped like a WebSocket so `chat.js` runs the same client
 * over it: the first frame sent (the `hello`) opens `POST /stream/chat`,
 * whose response is read as Server-Sent Events; later frames go to
 * `POST /stream/chat/<session>` (frames sent in the same tick travel as one
 * JSON array). A `close` event becomes the close event's code; a `: ping`
 * comment is answered with a `ping` frame (as a WebSocket answers a Ping),
 * so the server's idle close sees the client alive.
 */

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;
const MAX_BATCH = 100;

/** The HTTP streaming base URL (`/stream/chat`) for a WebSocket URL. */
export function streamUrl(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.pathname = u.pathname.replace(/\/ws\/chat\/?$/, '/stream/chat');
  return u.href.replace(/\/$/, '');
}

export class HttpStreamSocket {
  constructor(url) {
    this.url = url;
    this.readyState = CONNECTING;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._abort = new AbortController();
    this._session = null;
    this._queue = []; // frames waiting for the session or the next POST
    this._posting = false;
    this._opened = false;
    this.unreachable = false;
    // Opens on the next tick, as a WebSocket would: `chat.js` sends its
    // hello from onopen, and that hello opens the stream.
    setTimeout(() => {
      if (this.readyState !== CONNECTING) return;
      this.readyState = OPEN;
      if (this.onopen) this.onopen({});
    }, 0);
  }

  send(text) {
    if (this.readyState !== OPEN) throw new Error('not open');
    if (!this._opened) {
      this._opened = true;
      this._stream(text);
      return;
    }
    this._queue.push(text);
    if (this._session && !this._posting) queueMicrotask(() => this._flush());
  }

  close(code = 1000, reason = '') {
    this._end(code, reason, false);
  }

  _end(code, reason, notify = true) {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this._abort.abort();
    if (notify && this.onclose) this.onclose({ code, reason, wasClean: code === 1000 });
  }

  async _stream(hello) {
    let resp;
    try {
      resp = await fetch(this.url, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: hello,
        credentials: 'same-origin',
        cache: 'no-store',
        signal: this._abort.signal,
      });
    } catch {
      // Not even an HTTP answer: the server is unreachable, not the upgrade
      // refused (chat.js then goes back to the WebSocket first).
      this.unreachable = true;
      return this._end(1006, 'stream failed');
    }
    if (resp.status !== 200) {
      // 401: a bad token (as close 4001); 503: draining or full; else a failure.
      const code = resp.status === 401 ? 4001 : resp.status === 503 ? 1013 : 1006;
      return this._end(code, `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let text = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
        let at;
        while ((at = text.indexOf('\n\n')) >= 0) {
          const event = text.slice(0, at);
          text = text.slice(at + 2);
          if (this._event(event)) return;
        }
      }
    } catch {
      /* aborted, or the connection broke */
    }
    this._end(1006, 'stream ended');
  }

  /** One SSE event; true once the stream is closed. */
  _event(event) {
    if (this.readyState !== OPEN) return true;
    for (const line of event.split('\n')) {
      if (line.startsWith(':')) {
        this._queue.push('{"type":"ping"}');
        this._flush();
        continue;
      }
      if (!line.startsWith('data: ')) continue;
      const data = line.slice(6);
      let f = null;
      try { f = JSON.parse(data); } catch { /* handed on as is */ }
      if (f && f.type === 'close') {
        this._end(Number(f.code) || 1006, f.reason || '');
        return true;
      }
      if (f && f.type === 'welcome' && typeof f.session === 'string') {
        this._session = f.session;
        queueMicrotask(() => this._flush());
      }
      if (this.onmessage) this.onmessage({ data });
    }
    return false;
  }

  async _flush() {
    if (this._posting || !this._session || this.readyState !== OPEN) return;
    this._posting = true;
    try {
      while (this._queue.length && this.readyState === OPEN) {
        const batch = this._queue.splice(0, MAX_BATCH);
        const body = batch.length === 1 ? batch[0] : `[${batch.join(',')}]`;
        let resp;
        try {
          resp = await fetch(`${this.url}/${encodeURIComponent(this._session)}`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body,
            cache: 'no-store',
            signal: this._abort.signal,
          });
        } catch {
          return this._end(1006, 'send failed');
        }
        if (resp.status === 202) continue;
        if (resp.status === 404) return this._end(1006, 'session gone');
        if (resp.status === 429 || resp.status === 503) {
          let wait = 1000;
          try { wait = (await resp.json()).error.retry_after_ms || wait; } catch { /* default */ }
          this._queue.unshift(...batch);
          await new Promise((r) => setTimeout(r, Math.min(wait, 5000)));
          continue;
        }
        // 400/413: these frames are refused; the session goes on.
      }
    } finally {
      this._posting = false;
    }
  }
}
