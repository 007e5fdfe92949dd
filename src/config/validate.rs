//! Validation: every value the code accepts, and nothing that could panic
//! later (a property test in `tests.rs` walks the space).

use super::*;

/// `valkey.ack_replicas` at most (Valkey has no fixed limit; more replicas
/// than this per primary is not a deployment anyone runs).
const ACK_REPLICAS_MAX: i64 = 100;
/// `valkey.ack_timeout_ms` at most: an answer is never held longer.
const ACK_TIMEOUT_MS_MAX: i64 = 60_000;

impl Config {
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        let prod = self.profile == Profile::Production;
        let dev = self.auth.dev_tokens.unwrap_or(!prod);
        if prod && dev {
            return Err(err("auth.dev_tokens", "dev tokens are refused in the production profile"));
        }
        self.auth.dev_tokens = Some(dev);
        for (key, v, public) in [
            ("auth.jwt_secret", &self.auth.jwt_secret, LOCAL_DEV_JWT_SECRET),
            ("auth.api_key", &self.auth.api_key, LOCAL_DEV_API_KEY),
        ] {
            let env = key.replace('.', "__").to_uppercase();
            let how = format!(
                "set CHAT_{env} (or CHAT_{env}_FILE, a file holding it) to a random string of at least 32 bytes, \
                 e.g. the output of `openssl rand -hex 32`; or run with CHAT_PROFILE=local for development only"
            );
            match v {
                None if prod => return Err(err(key, format!("required in the production profile: {how}"))),
                Some(s) if prod && s.0 == public => {
                    return Err(err(key, format!("the public development value is refused in production: {how}")));
                }
                Some(s) if prod && s.0.len() < 32 => {
                    return Err(err(key, format!("must be at least 32 bytes in the production profile: {how}")));
                }
                Some(s) if s.0.is_empty() => return Err(err(key, "must not be empty")),
                _ => {}
            }
        }
        let s = &self.server;
        if s.heartbeat_s == 0 || s.heartbeat_s > 3600 {
            return Err(err("server.heartbeat_s", "must be between 1 and 3600"));
        }
        if s.drain_s > 3600 {
            return Err(err("server.drain_s", "must be at most 3600"));
        }
        for o in &s.allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return Err(err(
                    "server.allowed_origins",
                    format!("'{o}' is not an origin like https://crm.example.com"),
                ));
            }
        }
        if let Some(addr) = &s.internal_listen {
            let parsed: SocketAddr =
                addr.parse().map_err(|_| err("server.internal_listen", format!("'{addr}' is not host:port")))?;
            if parsed.port() != 0 && Some(parsed) == s.listen.parse().ok() {
                return Err(err("server.internal_listen", "must differ from server.listen"));
            }
        }
        if !(1..=3600).contains(&s.header_timeout_s) {
            return Err(err("server.header_timeout_s", "must be between 1 and 3600"));
        }
        if !(1..=3600).contains(&s.body_timeout_s) {
            return Err(err("server.body_timeout_s", "must be between 1 and 3600"));
        }
        if s.shutdown_delay_s > 3600 {
            return Err(err("server.shutdown_delay_s", "must be at most 3600"));
        }
        if let Some(n) = &s.node_id
            && (n.is_empty() || n.len() > 128 || n.contains(char::is_whitespace))
        {
            return Err(err("server.node_id", "1-128 characters without white space"));
        }
        let a = &self.auth;
        if a.hello_timeout_s == 0 {
            return Err(err("auth.hello_timeout_s", "must be at least 1"));
        }
        if a.cookie_name.is_empty()
            || !a.cookie_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err("auth.cookie_name", "letters, digits, '_' and '-' only"));
        }
        if !(60..=366 * 86_400).contains(&a.max_token_ttl_s) {
            return Err(err("auth.max_token_ttl_s", "must be between 60 and 31622400"));
        }
        if a.dev_token_ttl_s == 0 || a.dev_token_ttl_s > a.max_token_ttl_s {
            return Err(err("auth.dev_token_ttl_s", "must be between 1 and auth.max_token_ttl_s"));
        }
        let l = &self.limits;
        if !(256..=16 << 20).contains(&l.max_frame_bytes) {
            return Err(err("limits.max_frame_bytes", "must be between 256 and 16777216"));
        }
        if l.max_body_chars == 0 {
            return Err(err("limits.max_body_chars", "must be at least 1"));
        }
        if l.connections_per_user == 0 {
            return Err(err("limits.connections_per_user", "must be at least 1"));
        }
        for (key, rate, burst) in [
            ("limits.send_per_s", l.send_per_s, ("limits.send_burst", l.send_burst)),
            ("limits.requests_per_s", l.requests_per_s, ("limits.requests_burst", l.requests_burst)),
            ("limits.connects_per_s", l.connects_per_s, ("limits.connects_burst", l.connects_burst)),
        ] {
            // The bounds the token buckets are built for: at most one token
            // per 1000 s, at most a million per second.
            if !(RATE_MIN..=RATE_MAX).contains(&rate) {
                return Err(err(key, "must be between 0.001 and 1000000"));
            }
            if !(1..=1_000_000).contains(&burst.1) {
                return Err(err(burst.0, "must be between 1 and 1000000"));
            }
        }
        if l.edit_window_s > 10 * 366 * 86_400 {
            return Err(err("limits.edit_window_s", "must be at most 316224000 (ten years; 0 means no limit)"));
        }
        if !(1..=1000).contains(&l.reactions_per_message) {
            return Err(err("limits.reactions_per_message", "must be between 1 and 1000"));
        }
        if !(64..=1 << 30).contains(&l.send_bytes_per_s) {
            return Err(err("limits.send_bytes_per_s", "must be between 64 and 1073741824"));
        }
        // The largest body (every character escaped) must fit in the bucket.
        let largest = (l.max_body_chars as u64).saturating_mul(6).saturating_add(2);
        if l.send_bytes_burst < largest || l.send_bytes_burst > u64::from(u32::MAX) {
            return Err(err(
                "limits.send_bytes_burst",
                format!("must be between {largest} (max_body_chars x 6 + 2: the largest body) and 4294967295"),
            ));
        }
        if !(8..=1 << 20).contains(&l.outbound_queue) {
            return Err(err("limits.outbound_queue", "must be between 8 and 1048576"));
        }
        if !(1024..=64 << 20).contains(&l.api_body_bytes) {
            return Err(err("limits.api_body_bytes", "must be between 1024 and 67108864"));
        }
        if l.max_body_chars > 1_000_000 {
            return Err(err("limits.max_body_chars", "must be at most 1000000"));
        }
        // One message always fits in a reply (escaped JSON: at most 6 bytes a
        // character), so paging always makes progress.
        let one_message = l.max_body_chars * 6 + 4096;
        if l.max_reply_bytes < one_message || l.max_reply_bytes > 256 << 20 {
            return Err(err(
                "limits.max_reply_bytes",
                format!("must be between {one_message} (one message of max_body_chars) and 268435456"),
            ));
        }
        if l.outbound_bytes < l.max_reply_bytes + 65_536 || l.outbound_bytes > 1 << 30 {
            return Err(err("limits.outbound_bytes", "must be at least limits.max_reply_bytes + 65536, at most 1 GiB"));
        }
        if l.socket_send_buffer != 0 && !(4096..=64 << 20).contains(&l.socket_send_buffer) {
            return Err(err("limits.socket_send_buffer", "0 (the OS decides) or 4096 to 67108864 bytes"));
        }
        if !(1..=3600).contains(&l.write_timeout_s) {
            return Err(err("limits.write_timeout_s", "must be between 1 and 3600"));
        }
        if !(1..=10_000_000).contains(&l.max_connections) {
            return Err(err("limits.max_connections", "must be between 1 and 10000000"));
        }
        if !(1..=1_000_000).contains(&l.max_http_connections) {
            return Err(err("limits.max_http_connections", "must be between 1 and 1000000"));
        }
        if !(10..=60_000).contains(&l.batch_interval_ms) {
            return Err(err("limits.batch_interval_ms", "must be between 10 and 60000"));
        }
        if !(2..=1_000_000).contains(&l.max_group_members) {
            return Err(err("limits.max_group_members", "must be between 2 and 1000000"));
        }
        for c in &self.chat.open_conversations {
            if !ids::valid_conversation_id(c) || c.starts_with("dm:") {
                return Err(err(
                    "chat.open_conversations",
                    format!("'{c}' is not a conversation id (1-128 of [A-Za-z0-9_.:@-], not dm:...)"),
                ));
            }
        }
        if self.chat.history_max_messages == 0 {
            return Err(err("chat.history_max_messages", "must be at least 1"));
        }
        match self.chat.data_dir.as_deref() {
            // Local runs keep their history next to them; production says where.
            None if !prod => self.chat.data_dir = Some("./data".into()),
            Some("") => return Err(err("chat.data_dir", "a directory, or `memory` for history in memory only")),
            _ => {}
        }
        let v = &self.valkey;
        if let Some(url) = &v.url
            && !(url.0.starts_with("redis://")
                || url.0.starts_with("rediss://")
                || url.0.starts_with("valkey://")
                || url.0.starts_with("valkeys://"))
        {
            return Err(err("valkey.url", "must start with redis://, rediss://, valkey:// or valkeys://"));
        }
        if !v.sentinels.is_empty() && v.service_name.is_none() {
            return Err(err("valkey.service_name", "required with valkey.sentinels"));
        }
        if v.cluster && !v.sentinels.is_empty() {
            return Err(err("valkey.cluster", "cluster and sentinel modes exclude each other"));
        }
        if (v.cluster) && v.url.is_none() {
            return Err(err("valkey.url", "cluster mode needs a seed node url"));
        }
        if v.pool_size == 0 || v.pool_size > 64 {
            return Err(err("valkey.pool_size", "must be between 1 and 64"));
        }
        if v.retention_max_messages == 0 {
            return Err(err("valkey.retention_max_messages", "must be at least 1"));
        }
        if v.node_lease_s < 3 {
            return Err(err("valkey.node_lease_s", "must be at least 3"));
        }
        if v.key_prefix.is_empty() || v.key_prefix.contains(['{', '}', ' ']) {
            return Err(err("valkey.key_prefix", "non-empty, without braces or spaces"));
        }
        if !(0..=ACK_REPLICAS_MAX).contains(&v.ack_replicas) {
            return Err(err("valkey.ack_replicas", format!("must be between 0 and {ACK_REPLICAS_MAX}")));
        }
        if !(1..=ACK_TIMEOUT_MS_MAX).contains(&v.ack_timeout_ms) {
            return Err(err("valkey.ack_timeout_ms", format!("must be between 1 and {ACK_TIMEOUT_MS_MAX}")));
        }
        self.validate_webhooks()?;
        if !(0.0..=1.0).contains(&self.otel.sample_ratio) {
            return Err(err("otel.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if let Some(lvl) = &self.log.level
            && tracing_subscriber::EnvFilter::try_new(lvl).is_err()
        {
            return Err(err("log.level", format!("'{lvl}' is not a tracing filter")));
        }
        Ok(())
    }

    fn validate_webhooks(&mut self) -> Result<(), ConfigError> {
        use crate::webhooks::EventType;
        let w = &mut self.webhooks;
        if w.events.is_empty() {
            w.events = EventType::ALL.iter().filter(|t| !t.is_presence()).map(|t| t.as_str().to_string()).collect();
        }
        for e in &w.events {
            if EventType::parse(e).is_none() {
                let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                return Err(err("webhooks.events", format!("unknown event '{e}' (known: {})", known.join(", "))));
            }
        }
        let Some(url) = &w.url else { return Ok(()) };
        let parsed = reqwest::Url::parse(url.expose()).map_err(|e| err("webhooks.url", format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(err("webhooks.url", "must be an http:// or https:// URL with a host"));
        }
        match &w.secret {
            None => return Err(err("webhooks.secret", "required with webhooks.url (at least 32 bytes)")),
            Some(s) => match crate::webhooks::signing_key(s.expose()) {
                Ok(k) if k.len() >= 32 => {}
                Ok(_) => return Err(err("webhooks.secret", "must be at least 32 bytes (e.g. `openssl rand -hex 32`)")),
                Err(why) => return Err(err("webhooks.secret", why)),
            },
        }
        if w.timeout_ms == 0 || w.timeout_ms > 60_000 {
            return Err(err("webhooks.timeout_ms", "must be between 1 and 60000"));
        }
        if w.max_age_s == 0 {
            return Err(err("webhooks.max_age_s", "must be at least 1"));
        }
        if w.unread_after_s == 0 {
            return Err(err("webhooks.unread_after_s", "must be at least 1"));
        }
        if w.max_backoff_s == 0 {
            return Err(err("webhooks.max_backoff_s", "must be at least 1"));
        }
        if w.outbox_max == 0 {
            return Err(err("webhooks.outbox_max", "must be at least 1"));
        }
        // Room for the largest event (a body of max_body_chars escaped).
        if w.outbox_max_bytes < 1 << 20 {
            return Err(err("webhooks.outbox_max_bytes", "must be at least 1048576"));
        }
        if w.concurrency == 0 || w.concurrency > 1024 {
            return Err(err("webhooks.concurrency", "must be between 1 and 1024"));
        }
        Ok(())
    }
}
