//! The per-user send byte budget (`limits.send_bytes_per_s`, issue 22):
//! on this node here; across the cluster (Valkey) the same bytes are taken
//! in the step that stores the message or the edit (the append and update
//! scripts), so a send costs no extra round trip ([`EngineError::BytesLimited`]).

use super::*;

impl Node {
    /// Takes a body's bytes (as stored: JSON-escaped) from `user`'s send
    /// byte budget on this node; the error says when to retry
    /// (`rate_limited`, as for the message budget).
    pub fn check_send_bytes(&self, user: &Arc<str>, body: &str) -> Result<(), ChatError> {
        let bytes = protocol::json_len(body);
        let n = NonZeroU32::new(u32::try_from(bytes).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match self.bytes_limiter.check_key_n(user, n) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                return Err(ChatError::bytes_limited(wait.as_millis() as u64));
            }
            // Larger than the burst: validation keeps the burst above the
            // largest body, so this is a misconfiguration; refuse.
            Err(_) => return Err(ChatError::bytes_limited(1000)),
        }
        Ok(())
    }
}
