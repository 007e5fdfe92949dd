//! Wiring: engine + hub + node + router, the listener, and graceful drain.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    engine::{Engine, memory::MemoryEngine},
    hub::Hub,
    metrics,
    node::Node,
    protocol::close,
    transport::{self, listener},
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
    if let Some(dir) = cfg.data_dir() {
        let cfg = cfg.clone();
        let e = tokio::task::spawn_blocking(move || crate::engine::durable::DurableEngine::open(&cfg, dir, hub))
            .await
            .context("opening the durable store")??;
        return Ok(Arc::new(e));
    }
    tracing::warn!(
        history_max_messages = cfg.chat.history_max_messages,
        "embedded engine: single node only, history kept in memory (bounded per conversation) and lost on restart \
         (chat.data_dir = memory); set CHAT_CHAT__DATA_DIR for durable history on this node, or CHAT_VALKEY__URL \
         for durable history and several nodes"
    );
    Ok(Arc::new(MemoryEngine::new(hub, cfg.chat.history_max_messages).with_max_age(cfg.chat.history_max_age_s)))
}

pub async fn build(cfg: Config) -> anyhow::Result<Arc<Node>> {
    let cfg = Arc::new(cfg);
    let hub = Hub::new();
    let engine = engine(&cfg, hub.clone()).await?;
    let webhooks = crate::webhooks::Webhooks::new(&cfg.webhooks, engine.outbox())?;
    Ok(Node::with_webhooks(cfg, engine, hub, webhooks))
}

/// The listeners of a node: public (`server.listen`) and, when
/// `server.internal_listen` is set, internal.
pub struct Listeners {
    pub public: TcpListener,
    pub internal: Option<TcpListener>,
}

impl Listeners {
    /// Binds what the configuration names.
    pub fn bind(cfg: &Config) -> anyhow::Result<Listeners> {
        let addr = cfg.listen_addr()?;
        let public = bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let internal = match cfg.internal_listen_addr()? {
            Some(addr) => Some(bind(addr).map_err(|e| anyhow::anyhow!("cannot listen on {addr} (internal): {e}"))?),
            None => None,
        };
        Ok(Listeners { public, internal })
    }
}

/// Serves until `shutdown` resolves, then: `/readyz` turns 503 and new
/// upgrades get 503 at once; after `server.shutdown_delay_s` (load balancers
/// stop routing here) open connections get close 1012 spread over
/// `server.drain_s`, and the function returns once they are gone.
pub async fn serve(node: Arc<Node>, listeners: Listeners, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    metrics::install(&node.node_id);
    let (public, internal) = transport::routers(node.clone());
    let stop_http = CancellationToken::new();
    let limits = listener::Limits::of(&node.cfg);
    let mut servers = vec![listener::spawn(listeners.public, public, limits, stop_http.clone())];
    if let (Some(l), Some(router)) = (listeners.internal, internal) {
        servers.push(listener::spawn(l, router, limits, stop_http.clone()));
    }

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
    let batches = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(node.cfg.limits.batch_interval_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                node.hub.flush_batches();
            }
        })
    };
    let webhooks = node.spawn_webhooks();
    let maintenance = node.maintenance_interval().map(|every| {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match node.maintain().await {
                    Ok(gone) => {
                        for user in gone {
                            if let Err(e) = node.announce_offline(&user).await {
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
    node.start_draining();
    let delay = Duration::from_secs(node.cfg.server.shutdown_delay_s);
    if !delay.is_zero() {
        tracing::info!(shutdown_delay_s = delay.as_secs(), "readyz answers 503; draining after the delay");
        tokio::time::sleep(delay).await;
    }
    drain(&node).await;
    pruner.abort();
    batches.abort();
    if let Some(m) = maintenance {
        m.abort();
    }
    // Unfinished deliveries: on Valkey another node (or this one, restarted)
    // claims them; in process they are lost, as documented.
    for t in webhooks {
        t.abort();
    }
    node.shutdown_engine().await;
    stop_http.cancel();
    for s in servers {
        if tokio::time::timeout(Duration::from_secs(6), s).await.is_err() {
            tracing::warn!("http requests still open after drain; exiting anyway");
        }
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
            c.closer.close(close::RESTART);
        }
    }
    // Sessions that registered after the snapshot; sessions still
    // authenticating see `is_draining` and close themselves.
    for c in node.hub.connections() {
        c.closer.close(close::RESTART);
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
