//! `limits.*`: what one connection, user or request may cost (PROTOCOL
//! v1.1's bounds), each field with its documented default.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest inbound frame (and reassembled message) in bytes. Default 65536.
    pub max_frame_bytes: usize,
    /// Longest message body in Unicode scalar values. Default 4000.
    pub max_body_chars: usize,
    /// Bad frames a connection may send before it is closed with 4008. Default 10.
    pub max_bad_frames: u32,
    /// Open connections per user on one node. Default 20.
    pub connections_per_user: usize,
    /// Sustained sends per second per user (token bucket refill). Default 50.
    pub send_per_s: f64,
    /// Token bucket size per user. Default 100.
    pub send_burst: u32,
    /// Sustained bytes of message bodies per second per user, counted as
    /// stored (JSON-escaped), across the cluster on Valkey; over it a send
    /// answers `rate_limited` with `retry_after_ms`. Sized so that chat never
    /// meets it while a flood of the largest bodies is cut from ~1.2 MB/s to
    /// this. Default 16384.
    pub send_bytes_per_s: u64,
    /// Byte bucket size per user: at least the largest body
    /// (`max_body_chars` x 6, every character escaped). Default 262144.
    pub send_bytes_burst: u64,
    /// Outbound frames queued per connection before it counts as a slow
    /// consumer and is closed with 1013. Default 1024.
    pub outbound_queue: usize,
    /// Presence changes are pushed only in conversations with at most this many
    /// members. Default 1000.
    pub presence_max_members: usize,
    /// Largest service API request body in bytes. Default 1 MiB.
    pub api_body_bytes: usize,
    /// `history`, `sync` and `presence` requests per second per connection
    /// (token bucket refill). Default 20.
    pub requests_per_s: f64,
    /// Request bucket size per connection. Default 40.
    pub requests_burst: u32,
    /// Largest `history`/`sync` reply in bytes of JSON; a page is cut short
    /// to fit. Default 1 MiB.
    pub max_reply_bytes: usize,
    /// Bytes waiting to be written to one connection before it counts as a
    /// slow consumer (close 1013). Default 4 MiB.
    pub outbound_bytes: usize,
    /// Seconds a socket write may make no progress before the connection is
    /// ended. Default 10.
    pub write_timeout_s: u64,
    /// Kernel send buffer of each accepted connection (`SO_SNDBUF`; Linux
    /// doubles it): what a client that stops reading can pin in kernel memory
    /// beyond `outbound_bytes`, and what it must drain before a close frame
    /// reaches it. 0: the OS's autotuning (up to `net.ipv4.tcp_wmem`, 4 MiB).
    /// Default 262144.
    pub socket_send_buffer: usize,
    /// WebSocket connections (authenticated or not) open on this node;
    /// further upgrades get HTTP 503. Default 16000.
    pub max_connections: usize,
    /// Plain HTTP connections (not upgraded: page loads, API calls, upgrade
    /// requests not yet answered) open per listener, counted apart from
    /// WebSockets. One more arriving closes the oldest plain connection, so
    /// slow or idle requests never crowd out an upgrade. Default 1024.
    pub max_http_connections: usize,
    /// Sustained WebSocket connects per second per user (token bucket
    /// refill; across the cluster on Valkey). Over it the upgrade gets HTTP
    /// 429 `rate_limited` with `retry_after_ms` (a `hello` gets the error
    /// frame and close 4008). Default 2.
    pub connects_per_s: f64,
    /// Connect bucket size per user. Default 30.
    pub connects_burst: u32,
    /// Conversations with more members than this get presence, receipt and
    /// typing pushes batched. Default 50.
    pub batch_members: usize,
    /// Milliseconds between batched presence/receipt/typing pushes. Default 1000.
    pub batch_interval_ms: u64,
    /// Members of one group conversation (service API PUT and members
    /// route; more is `400 bad_request`). Each `conversation` event lists
    /// every member, so this also bounds that frame (~10 bytes a member).
    /// Default 100000.
    pub max_group_members: usize,
    /// Seconds after its `ts` a message may still be edited by its sender
    /// (v1.2); 0: no limit. The service API's moderation is exempt. Default 86400.
    pub edit_window_s: u64,
    /// Distinct emoji one message may hold (v1.2). Default 20.
    pub reactions_per_message: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65_536,
            max_body_chars: 4000,
            max_bad_frames: 10,
            connections_per_user: 20,
            send_per_s: 50.0,
            send_burst: 100,
            send_bytes_per_s: 16_384,
            send_bytes_burst: 256 << 10,
            outbound_queue: 1024,
            presence_max_members: 1000,
            api_body_bytes: 1 << 20,
            requests_per_s: 20.0,
            requests_burst: 40,
            max_reply_bytes: 1 << 20,
            outbound_bytes: 4 << 20,
            write_timeout_s: 10,
            socket_send_buffer: 256 << 10,
            max_connections: 16_000,
            max_http_connections: 1024,
            connects_per_s: 2.0,
            connects_burst: 30,
            batch_members: 50,
            batch_interval_ms: 1000,
            max_group_members: 100_000,
            edit_window_s: 86_400,
            reactions_per_message: 20,
        }
    }
}
