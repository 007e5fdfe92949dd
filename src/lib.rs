//! crm-chat: a real-time chat server for a CRM platform.
//!
//! The wire contract is PROTOCOL.md (see `docs/protocol.md` for the project's
//! own account of it).
//!
//! # Layout
//! - [`config`]: figment layering (defaults, TOML, `CHAT_*`), validation, secrets.
//! - [`protocol`]: client frames in, server frames out.
//! - [`auth`]: HS256 tokens with the algorithm pinned.
//! - [`node`]: the transport-agnostic core (membership, send, receipts,
//!   presence), and the only holder of the engine: the transport reaches
//!   storage through [`node::Node`]'s methods.
//! - [`hub`]: local fan-out with bounded per-connection queues (frames and
//!   bytes), batching of presence and receipts in large conversations.
//! - [`session`]: one WebSocket session from the upgraded socket to the closed
//!   TCP connection (authentication, timers, budgets, RFC 6455 closing).
//! - [`engine`]: the storage and fan-out boundary, four narrow traits with
//!   their contracts ([`engine::MessageStore`], [`engine::Groups`],
//!   [`engine::Broker`], [`engine::Presence`]) summed up by [`engine::Engine`];
//!   implemented by [`engine::memory`] (one file) and `engine::valkey`, one
//!   file per concern (`keys`, `payload`, `errors`, `store`, `groups`,
//!   `fanout`, `presence`, `scripts` + `lua/`). `tests/engine_conformance.rs`
//!   runs every contract on both.
//! - [`transport`]: the public and internal routers, the accept loop
//!   (header timeout, connection caps), the WebSocket upgrade, service API,
//!   health.
//! - [`app`]: wiring, listener, drain on SIGTERM.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and logs.

pub mod app;
pub mod auth;
pub mod config;
pub mod engine;
pub mod error;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod session;
pub mod telemetry;
pub mod transport;
