//! An echo over the session's own WebSocket code: the reader (tungstenite
//! with the session's [`websocket_config`](crate::transport::ws::websocket_config)),
//! the [`Writer`] that writes every frame, and [`finish`] (close handshake,
//! lingering close, violations). Not used by the chat: it exists so a
//! conformance suite can exercise that code with every message shape
//! (`examples/autobahn_echo.rs` runs the Autobahn cases against it;
//! docs/autobahn.md).

use super::*;

/// Echoes every text and binary message until the peer closes, the
/// connection fails, or the peer breaks the protocol (closed as a session
/// would: 1002, 1007, 1009).
pub async fn echo<S>(mut ws: WebSocketStream<S>, write_timeout: Duration)
where
    S: Transport,
{
    let mut out = Writer::default();
    let end = loop {
        match ws.next().await {
            None => break End::Gone,
            Some(Err(e)) => break read_error(&e),
            Some(Ok(Message::Text(t))) => out.push(t),
            Some(Ok(Message::Binary(b))) => out.push_binary(b),
            Some(Ok(Message::Close(_))) => break End::Gone,
            // Pings are answered by the WebSocket layer (the flush below).
            Some(Ok(_)) => {}
        }
        // As a session writes: a control frame the WebSocket layer holds
        // goes first, then the queued frames.
        let written = async {
            stalled(write_timeout, ws.flush()).await?;
            out.write_to(ws.get_mut(), write_timeout).await
        };
        match written.await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break End::Stalled,
            Err(_) => break End::Gone,
        }
    };
    // The session's closing code, through the same wire a session uses.
    finish(&mut WsWire::new(ws), end, None, write_timeout).await;
}
