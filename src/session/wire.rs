//! The seam between the one session state machine and its transports: a
//! [`Wire`] reads client frames and writes server frames. Two implement it:
//! [`WsWire`] (a WebSocket over the upgraded TCP stream) and
//! [`SseWire`](super::sse::SseWire) (an HTTP streaming response, with client
//! frames arriving by `POST /stream/chat/<session>`).
//!
//! Everything else (authentication, the `Node` door, budgets, strikes, the
//! outbound queue's bounds, the write deadline, idle close, token expiry) is
//! the session's, whatever the wire.

use super::*;

/// What one read from the client gave.
#[derive(Debug)]
pub enum Read {
    /// A text frame.
    Text(Text),
    /// A binary frame (refused).
    Binary,
    /// A frame that only shows the client is alive (a Pong or a Ping).
    Alive,
    /// A text frame that is not UTF-8.
    NotUtf8,
    /// The read side ended: the client closed, broke the protocol, or is gone.
    Ended(End),
}

/// One transport under a session. Every method's future is `Send`; `recv` is
/// cancel-safe (it runs inside `select!`).
pub trait Wire: Send {
    /// `ws` or `http`: the `transport` label of metrics and traces.
    const TRANSPORT: &'static str;

    /// How server frames are framed on this wire.
    const FRAMING: Framing;

    /// The capability that sends to this session from elsewhere (HTTP
    /// streaming: the `session` of `welcome`).
    fn session_id(&self) -> Option<&str> {
        None
    }

    /// The next client frame, or why none comes. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Read> + Send;

    /// Writes every frame of `out`; a step that makes no progress within
    /// `stall` fails with [`io::ErrorKind::TimedOut`].
    fn write(&mut self, out: &mut Writer, stall: Duration) -> impl Future<Output = io::Result<()>> + Send;

    /// The heartbeat (WebSocket Ping; SSE `: ping` comment).
    fn ping(&mut self, stall: Duration) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes the close (a close frame; the last `close` event) within `stall`.
    fn send_close(&mut self, code: u16, stall: Duration) -> impl Future<Output = io::Result<()>> + Send;

    /// After the close was sent: waits (discarding) for the client's own
    /// close until `deadline`.
    fn linger(&mut self, deadline: Instant) -> impl Future<Output = ()> + Send;

    /// The client broke the transport's framing (1002, 1007, 1009): the
    /// close goes out and the rest of what it sends is discarded raw.
    fn violation(&mut self, code: u16) -> impl Future<Output = ()> + Send;

    /// The client closed: makes sure what answers it has left.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;

    /// Makes the end abortive (RST): for a peer that stopped reading, so no
    /// unsent data keeps the connection alive after the session.
    fn reset(&mut self);

    /// Ends the connection (or the response) in order.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// A WebSocket session's wire.
pub struct WsWire<S> {
    ws: WebSocketStream<S>,
}

impl<S: Transport> WsWire<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsWire { ws }
    }
}

impl<S: Transport> Wire for WsWire<S> {
    const TRANSPORT: &'static str = "ws";
    const FRAMING: Framing = Framing::WebSocket;

    async fn recv(&mut self) -> Read {
        match self.ws.next().await {
            None => Read::Ended(End::Gone),
            Some(Err(tungstenite::Error::Utf8(_))) => Read::NotUtf8,
            Some(Err(e)) => Read::Ended(read_error(&e)),
            Some(Ok(Message::Text(t))) => Read::Text(t),
            Some(Ok(Message::Binary(_))) => Read::Binary,
            Some(Ok(Message::Close(_))) => Read::Ended(End::Gone),
            // Pings are answered by the WebSocket layer.
            Some(Ok(_)) => Read::Alive,
        }
    }

    async fn write(&mut self, out: &mut Writer, stall: Duration) -> io::Result<()> {
        // A control frame the WebSocket layer holds (a pong) goes first, whole.
        stalled(stall, self.ws.flush()).await?;
        out.write_to(self.ws.get_mut(), stall).await
    }

    async fn ping(&mut self, stall: Duration) -> io::Result<()> {
        stalled(stall, self.ws.send(Message::Ping(Default::default()))).await
    }

    async fn send_close(&mut self, code: u16, stall: Duration) -> io::Result<()> {
        stalled(stall, self.ws.send(close_message(code))).await
    }

    async fn linger(&mut self, deadline: Instant) {
        // Read (and drop) until the client's close frame.
        loop {
            match timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) => break,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_))) => {
                    drain_raw(self.ws.get_mut(), deadline).await;
                    break;
                }
            }
        }
    }

    async fn violation(&mut self, code: u16) {
        let deadline = Instant::now() + LINGER;
        let _ = timeout(LINGER, self.ws.send(close_message(code))).await;
        drain_raw(self.ws.get_mut(), deadline).await;
    }

    async fn gone(&mut self) {
        // The client's close frame was answered by the WebSocket layer; make
        // sure the answer left.
        let _ = timeout(Duration::from_secs(1), self.ws.flush()).await;
    }

    fn reset(&mut self) {
        self.ws.get_ref().reset();
    }

    async fn shutdown(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.ws.get_mut().shutdown()).await;
    }
}
