//! What a connection may spend: strikes toward 4008, and the request
//! bucket of `history`, `sync` and `presence`.

use super::*;

/// Counts bad and rate-limited frames; past `limits.max_bad_frames` of
/// either the connection is closed with 4008.
pub(super) struct Strikes {
    pub(super) bad: u32,
    pub(super) rate: u32,
    pub(super) max: u32,
}

impl Strikes {
    /// Records a bad frame; true when the connection must close.
    pub(super) fn bad_frame(&mut self) -> bool {
        self.bad += 1;
        self.bad > self.max
    }
    /// Records a rate-limited frame; true when the connection must close.
    pub(super) fn limited(&mut self) -> bool {
        self.rate += 1;
        self.rate > self.max
    }
}

/// A per-connection token bucket (`history`, `sync` and `presence`).
pub(super) struct Bucket {
    tokens: f64,
    burst: f64,
    per_s: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(per_s: f64, burst: u32) -> Self {
        Bucket { tokens: f64::from(burst), burst: f64::from(burst), per_s, at: Instant::now() }
    }

    /// Takes a token, or says in how many milliseconds one is there.
    pub(super) fn take(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / self.per_s) * 1000.0).ceil().max(1.0) as u64)
        }
    }
}
