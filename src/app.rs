//! Wiring: engine + hub + node + router, the listener, and graceful drain.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    engine::{Engine, memory::MemoryEngine},
    hub::Hub,
    metrics,
    node::Node,
    transport,
};

/// Binds `addr` with a listen backlog sized for reconnect storms (tokio's
/// default of 128 overflows when thousands of clients return after a drain).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Builds the engine the configuration asks for.
pub async fn engine(cfg: &Config, hub: Arc<Hub>) -> anyhow::Result<Arc<dyn Engine>> {
    if cfg.valkey.url.is_some() || !cfg.valkey.sentinels.is_empty() {
        let e = crate::engine::valkey::ValkeyEngine::connect(cfg, hub).await.context("connecting to Valkey")?;
        return Ok(Arc::new(e));
    }
    tracing::warn!(
        history_max_messages = cfg.chat.history_max_messages,
        "embedded engine: single node only, history kept in memory (bounded per conversation) and lost on restart; \
         set CHAT_VALKEY__URL for durable history and several nodes"
    );
    Ok(Arc::new(MemoryEngine::new(hub, cfg.chat.history_max_messages)))
}

pub async fn build(cfg: Config) -> anyhow::Result<Arc<Node>> {
    let cfg = Arc::new(cfg);
    let hub = Hub::new();
    let engine = engine(&cfg, hub.clone()).await?;
    Ok(Node::new(cfg, engine, hub))
}

/// Serves until `shutdown` resolves, then drains: `/readyz` turns 503, new
/// upgrades get 503, open connections get close 1012 spread over
/// `server.drain_s`, and the function returns once they are gone.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    metrics::install(&node.node_id);
    let router = transport::router(node.clone());
    let stop_http = CancellationToken::new();
    // No Nagle: a chat frame must leave now, not wait for the peer's delayed
    // ACK (that alone cost ~22 ms per hop in the pairs benchmark).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stop_http.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    let pruner = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                node.prune_rate_limits();
            }
        })
    };
    let maintenance = node.engine.maintenance_interval().map(|every| {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match node.engine.maintain().await {
                    Ok(gone) => {
                        for user in gone {
                            if let Err(e) = node.announce_presence(&user, false).await {
                                tracing::debug!(error = %e, user, "presence announcement failed");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "engine maintenance failed"),
                }
            }
        })
    });

    shutdown.await;
    drain(&node).await;
    pruner.abort();
    if let Some(m) = maintenance {
        m.abort();
    }
    node.engine.shutdown().await;
    stop_http.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e).context("http server"),
        Ok(Err(e)) => return Err(e).context("http server task"),
        Err(_) => tracing::warn!("http requests still open after drain; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Closes every connection with 1012, spread evenly over `server.drain_s`.
pub async fn drain(node: &Node) {
    node.start_draining();
    let conns = node.hub.connections();
    let window = Duration::from_secs(node.cfg.server.drain_s);
    tracing::info!(connections = conns.len(), drain_s = window.as_secs(), "draining");
    if !conns.is_empty() {
        let step = window / conns.len() as u32;
        for (i, c) in conns.iter().enumerate() {
            if i > 0 && !step.is_zero() {
                tokio::time::sleep(step).await;
            }
            c.closer.close(crate::transport::ws::CLOSE_RESTART);
        }
    }
    // Sessions that registered after the snapshot; sessions still
    // authenticating see `is_draining` and close themselves.
    for c in node.hub.connections() {
        c.closer.close(crate::transport::ws::CLOSE_RESTART);
    }
    node.sessions.close();
    if tokio::time::timeout(Duration::from_secs(5), node.sessions.wait()).await.is_err() {
        tracing::warn!(left = node.sessions.len(), "sessions still open after drain");
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("interrupt: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
