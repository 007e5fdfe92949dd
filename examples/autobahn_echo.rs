//! A WebSocket echo server on the session's own code, for the Autobahn
//! conformance cases (`scripts/autobahn.sh`, docs/autobahn.md):
//!
//! ```text
//! cargo run --release --example autobahn_echo -- 127.0.0.1:9001
//! ```
//!
//! Every path upgrades (the same handshake checks and 101 answer as
//! `GET /ws/chat`), then [`crm_chat::session::echo`] echoes every text and
//! binary message through the session's reader, writer and closing code.
//! Messages may be up to 16 MiB here (the Autobahn cases send that much);
//! the chat itself allows `limits.max_frame_bytes`.

use std::time::Duration;

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use crm_chat::transport::ws::{handshake_key, switching_protocols, websocket_config};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::Role;

const MAX_MESSAGE: usize = 16 << 20;
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

async fn upgrade(mut req: Request) -> Response {
    let key = match handshake_key(req.headers()) {
        Ok(k) => k.clone(),
        Err(why) => {
            let mut r = (StatusCode::UPGRADE_REQUIRED, why).into_response();
            r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            return r;
        }
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return (StatusCode::BAD_REQUEST, "this connection cannot be upgraded").into_response();
    };
    tokio::spawn(async move {
        let Ok(io) = on_upgrade.await else { return };
        let mut config = websocket_config(MAX_MESSAGE);
        config.read_buffer_size = 128 * 1024;
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, Some(config)).await;
        crm_chat::session::echo(ws, WRITE_TIMEOUT).await;
    });
    switching_protocols(&key)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9001".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("autobahn echo on ws://{}", listener.local_addr()?);
    axum::serve(listener, Router::new().fallback(upgrade)).await?;
    Ok(())
}
