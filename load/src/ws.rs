//! WebSocket clients: connect, upgrade with the token, wait for `welcome`;
//! the fields of server frames the scenarios look at; failures as short keys
//! for the counters (`http_503`, `io_ConnectionRefused`, `close_1013`, ...).

use std::{borrow::Cow, time::Duration};

use futures_util::{
    StreamExt,
    stream::{SplitSink, SplitStream},
};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::{net::TcpStream, time::timeout};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig},
};

pub use tokio_tungstenite::tungstenite::Message;

use crate::target::Target;

/// One connect + upgrade + welcome may take this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A client link: a WebSocket, or HTTP streaming (`--transport http`)
/// behind the same `Stream`/`Sink` of messages.
pub enum Ws {
    Ws(Box<WebSocketStream<MaybeTlsStream<TcpStream>>>),
    Http(crate::http::HttpLink),
}

/// `--transport http`: every link is HTTP streaming.
pub static HTTP_TRANSPORT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Ws {
    pub async fn close(&mut self, frame: Option<tungstenite::protocol::CloseFrame>) -> Result<(), tungstenite::Error> {
        match self {
            Ws::Ws(w) => w.close(frame).await,
            Ws::Http(h) => h.close(frame).await,
        }
    }
}

impl futures_util::Stream for Ws {
    type Item = Result<Message, tungstenite::Error>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut() {
            Ws::Ws(w) => std::pin::Pin::new(w.as_mut()).poll_next(cx),
            Ws::Http(h) => std::pin::Pin::new(h).poll_next(cx),
        }
    }
}

impl futures_util::Sink<Message> for Ws {
    type Error = tungstenite::Error;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Ws(w) => std::pin::Pin::new(w.as_mut()).poll_ready(cx),
            Ws::Http(h) => std::pin::Pin::new(h).poll_ready(cx),
        }
    }
    fn start_send(self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        match self.get_mut() {
            Ws::Ws(w) => std::pin::Pin::new(w.as_mut()).start_send(item),
            Ws::Http(h) => std::pin::Pin::new(h).start_send(item),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Ws(w) => std::pin::Pin::new(w.as_mut()).poll_flush(cx),
            Ws::Http(h) => std::pin::Pin::new(h).poll_flush(cx),
        }
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        match self.get_mut() {
            Ws::Ws(w) => std::pin::Pin::new(w.as_mut()).poll_close(cx),
            Ws::Http(h) => std::pin::Pin::new(h).poll_close(cx),
        }
    }
}

pub type WsTx = SplitSink<Ws, Message>;
pub type WsRx = SplitStream<Ws>;

/// A WebSocket error as a counter key.
pub fn classify(e: tungstenite::Error) -> String {
    use tungstenite::Error as E;
    match e {
        E::Http(r) => format!("http_{}", r.status().as_u16()),
        E::Io(e) => format!("io_{:?}", e.kind()),
        E::ConnectionClosed | E::AlreadyClosed => "closed".into(),
        E::Protocol(p) => format!("protocol: {p}"),
        E::Capacity(c) => format!("capacity: {c}"),
        other => other.to_string(),
    }
}

/// A close frame as a counter key: `close_<code>` (1005: none).
pub fn close_key(f: Option<tungstenite::protocol::CloseFrame>) -> String {
    format!("close_{}", f.map_or(1005, |f| u16::from(f.code)))
}

/// Connects with the token at upgrade and waits for `welcome` (or opens an
/// HTTP stream, with `--transport http`).
pub async fn open(target: &Target, token: &str, read_buffer: usize) -> Result<Ws, String> {
    if HTTP_TRANSPORT.load(std::sync::atomic::Ordering::Relaxed) {
        let link = timeout(CONNECT_TIMEOUT, crate::http::open(target, token)).await;
        return link.unwrap_or_else(|_| Err("timeout".into())).map(Ws::Http);
    }
    let fut = async {
        let mut req = target.ws.as_str().into_client_request().map_err(classify)?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        req.headers_mut().insert("authorization", auth);
        let cfg = WebSocketConfig::default().read_buffer_size(read_buffer);
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), true).await.map_err(classify)?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return match serde_json::from_str::<Frame>(&t) {
                        Ok(f) if f.ty == "welcome" => Ok(Ws::Ws(Box::new(ws))),
                        Ok(f) => Err(format!("first frame {} {}", f.ty, f.code.as_deref().unwrap_or(""))),
                        Err(_) => Err("first frame unparseable".into()),
                    };
                }
                Some(Ok(Message::Close(f))) => return Err(close_key(f)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(classify(e)),
                None => return Err("eof before welcome".into()),
            }
        }
    };
    timeout(CONNECT_TIMEOUT, fut).await.unwrap_or_else(|_| Err("timeout".into()))
}

/// The fields of server frames this tool looks at (borrowed: no copies).
#[derive(Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Cow<'a, str>,
    #[serde(default)]
    pub id: Option<u64>,
    /// An id (string) in most frames, an object in `conversation` events.
    #[serde(default, borrow)]
    conversation: Option<&'a RawValue>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default)]
    pub duplicate: Option<bool>,
}

impl Frame<'_> {
    /// Whether this frame names the conversation whose JSON-quoted id is `quoted`.
    pub fn in_conv(&self, quoted: &str) -> bool {
        self.conversation.is_some_and(|c| c.get() == quoted)
    }

    /// The send time (µs, tool clock) embedded in a body `t=<us>;...`.
    pub fn sent_us(&self) -> Option<u64> {
        let b = self.body.as_deref()?.strip_prefix("t=")?;
        b[..b.find(';').unwrap_or(b.len())].parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_name_their_conversation_and_send_time() {
        let f: Frame = serde_json::from_str(
            r#"{"type":"message","conversation":"g1","seq":7,"body":"t=1234;k=5xx","client_msg_id":"p-5"}"#,
        )
        .unwrap();
        assert_eq!((&*f.ty, f.seq, f.sent_us()), ("message", Some(7), Some(1234)));
        assert!(f.in_conv("\"g1\"") && !f.in_conv("\"g2\""));
        let f: Frame = serde_json::from_str(r#"{"type":"conversation","conversation":{"id":"g1"}}"#).unwrap();
        assert!(!f.in_conv("\"g1\""));
        assert_eq!(f.sent_us(), None);
    }
}
