//! The per-user send byte budget (`limits.send_bytes_per_s`, issue 22):
//! on this node, then across the cluster through the engine.

use super::*;

impl Node {
    /// Takes a body's bytes (as stored: JSON-escaped) from `user`'s send
    /// byte budget, on this node and then across the cluster; the error says
    /// when to retry (`rate_limited`, as for the message budget).
    pub async fn check_send_bytes(&self, user: &Arc<str>, body: &str) -> Result<(), ChatError> {
        let l = &self.cfg.limits;
        let bytes = protocol::json_len(body);
        let n = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match self.bytes_limiter.check_key_n(user, n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                return Err(bytes_limited(wait.as_millis() as u64));
            }
            // Larger than the burst: validation keeps the burst above the
            // largest body, so this is a misconfiguration; refuse.
            Err(_) => return Err(bytes_limited(1000)),
        }
        match self.engine.send_bytes_gate(user, bytes as u64, l.send_bytes_per_s as f64, l.send_bytes_burst).await? {
            None => Ok(()),
            Some(ms) => Err(bytes_limited(ms)),
        }
    }
}

fn bytes_limited(retry_after_ms: u64) -> ChatError {
    ChatError::rate_limited(retry_after_ms.max(1)).with_message("too many bytes sent (limits.send_bytes_per_s)")
}
