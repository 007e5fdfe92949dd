//! crm-chat: a real-time chat server for a CRM platform.
//!
//! The wire contract is PROTOCOL.md (see `docs/protocol.md` for the project's
//! own account of it).
//!
//! # Layout
//! Each behaviour of PROTOCOL.md has one home; `docs/protocol.md` says where.
//! - [`config`]: figment layering (defaults, TOML, `CHAT_*`), secrets
//!   (`mod.rs`: the tree and loading; the settings table in sections:
//!   `limits.rs`, `engines.rs` for `chat.*` and `valkey.*`, `webhooks.rs`);
//!   `validate.rs`: every value the code accepts, nothing that could panic
//!   later (a property test walks the space).
//! - [`protocol`]: the wire format, spelled once. `inbound.rs`: client frames
//!   parsed and validated for shape; `frames.rs`: every server frame as one
//!   tagged [`protocol::ServerFrame`] (its `kind()` labels metrics);
//!   `mod.rs`: the byte types frames travel in ([`protocol::Text`],
//!   [`protocol::Outgoing`]), close codes, timestamps.
//! - [`auth`]: HS256 tokens with the algorithm pinned.
//! - [`node`]: the transport-agnostic core and the only holder of the engine
//!   (the transport reaches storage through [`node::Node`]'s methods).
//!   `mod.rs`: membership rules, send, receipts, typing; `changes.rs`: edit,
//!   delete, react, `reply_to` and the API's moderation (v1.2); `sessions.rs`: the
//!   connect-time ordering rule, presence announcements, disconnects;
//!   `reads.rs`: history/sync pages bounded in bytes, presence queries, the
//!   conversation list; `groups.rs`: the service API's group operations and
//!   the engine door; `webhooks.rs`: which action makes which webhook event,
//!   and the `message.unread` check.
//! - [`hub`]: local fan-out with bounded per-connection queues (frames and
//!   bytes); `batch.rs`: batching of presence, receipts and typing in large
//!   conversations.
//! - [`session`]: one WebSocket session from the upgraded socket to the closed
//!   TCP connection, generic over the byte stream and unit-tested under a
//!   paused clock. `mod.rs`: phases and the run loop (timers, queue);
//!   `hello.rs`: authentication; `budget.rs`: strikes and the request bucket;
//!   `writer.rs`: frames written from their shared bytes; `closing.rs`: RFC
//!   6455 closing.
//! - [`engine`]: the storage and fan-out boundary, four narrow traits with
//!   their contracts ([`engine::MessageStore`], [`engine::Groups`],
//!   [`engine::Broker`], [`engine::Presence`]) summed up by [`engine::Engine`];
//!   `changes.rs`: the rules of a change of a message (v1.2), written once;
//!   `local.rs`: broker and presence of a single-node engine. Implemented by
//!   [`engine::memory`] (`mod.rs`; `log.rs`: a conversation's events),
//!   [`engine::durable`] (SQLite: `mod.rs`, `store.rs` schema and start,
//!   `writer.rs` the group-commit thread, `ops.rs` each operation in the
//!   batch's transaction, `changes.rs` changes and pages) and
//!   `engine::valkey`, one file per concern (`keys`, `payload`, `errors`,
//!   `store`, `changes`, `groups`, `fanout`, `broadcast` (events for many
//!   users at once), `forward` (HTTP streaming POSTs to the holding node),
//!   `acks` (`WAIT` group commits), `lost` (a history that went back),
//!   `retention`, `presence`, `outbox`, `scripts` + `lua/`). `tests/engine_conformance.rs` runs every contract on all three.
//! - [`transport`]: the public and internal routers, the accept loop
//!   (header timeout, connection caps), the WebSocket upgrade, service API,
//!   health.
//! - [`webhooks`]: signed webhooks to the CRM backend: the hand-off queue,
//!   the [`webhooks::Outbox`] contract (in process here, a Valkey stream with
//!   a consumer group in `engine/valkey/outbox.rs`), delivery with backoff,
//!   Standard Webhooks signatures.
//! - [`app`]: wiring, listener, drain on SIGTERM.
//! - [`error`]: the domain errors with the protocol's codes ([`error::ChatError`]).
//! - [`ids`]: identifier rules (user and conversation ids, `dm:<a>:<b>`).
//! - [`metrics`]: Prometheus metrics; [`telemetry`]: logs, OpenTelemetry
//!   traces and OTLP metrics.
//!
//! Files over ~450 lines (each a little, by one concern that keeps them
//! whole): `node/mod.rs`, `engine/mod.rs` (the four traits and their
//! contracts), `protocol/frames.rs`, `webhooks/outbox.rs`, `session/mod.rs`.

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
pub mod webhooks;
