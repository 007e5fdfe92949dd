//! Figures: the tool's clock, counters by key, latency histograms and the seqs
//! a connection saw.
//!
//! Latencies go into HdrHistograms (3 significant digits, 1 µs to ~71 min):
//! fixed memory whatever the number of samples. Many tasks record into one
//! [`SharedHist`] through their own [`Recorder`], which takes the lock once per
//! batch.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

// ---------------------------------------------------------------- clock

static START: OnceLock<std::time::Instant> = OnceLock::new();

/// Starts the clock of [`now_us`] (the first call does).
pub fn start_clock() {
    START.get_or_init(std::time::Instant::now);
}

/// Microseconds since the tool started (monotonic; every client is in this process).
pub fn now_us() -> u64 {
    START.get_or_init(std::time::Instant::now).elapsed().as_micros() as u64
}

// ---------------------------------------------------------------- counters, numbers

/// Occurrences by key (error codes, close codes, frame types).
pub type Counts = BTreeMap<String, u64>;

pub fn bump(c: &mut Counts, key: impl Into<String>) {
    *c.entry(key.into()).or_default() += 1;
}

pub fn merge(into: &mut Counts, from: Counts) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Microseconds as milliseconds (3 decimals).
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

// ---------------------------------------------------------------- latency

/// Significant digits the histograms keep: a value is known within 0.1%.
const SIGFIG: u8 = 3;
/// Latencies above this (µs, ~71 min) count as this.
const MAX_US: u64 = u32::MAX as u64;
/// Samples a [`Recorder`] keeps before it takes the lock.
const BATCH: usize = 64;

/// Latencies in microseconds.
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("valid histogram bounds"))
    }
}

impl Hist {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// `{"count", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms"}`, or
    /// `{"count": 0}` without samples.
    pub fn summary(&self) -> Value {
        let h = &self.0;
        if h.is_empty() {
            return json!({"count": 0});
        }
        json!({
            "count": h.len(),
            "p50_ms": ms(h.value_at_quantile(0.50)),
            "p90_ms": ms(h.value_at_quantile(0.90)),
            "p99_ms": ms(h.value_at_quantile(0.99)),
            "max_ms": ms(h.max()),
            "mean_ms": ms(h.mean() as u64),
        })
    }
}

/// One histogram many tasks record into (each through its own [`Recorder`]).
#[derive(Clone, Default)]
pub struct SharedHist(Arc<Mutex<Hist>>);

impl SharedHist {
    pub fn recorder(&self) -> Recorder {
        Recorder { into: self.clone(), batch: Vec::new() }
    }

    pub fn summary(&self) -> Value {
        self.0.lock().unwrap().summary()
    }
}

/// A task's handle on a [`SharedHist`]: samples go in by batches, the last
/// one when the recorder is dropped.
pub struct Recorder {
    into: SharedHist,
    batch: Vec<u64>,
}

impl Recorder {
    pub fn record_us(&mut self, us: u64) {
        if self.batch.capacity() == 0 {
            self.batch.reserve_exact(BATCH);
        }
        self.batch.push(us);
        if self.batch.len() >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut h = self.into.0.lock().unwrap();
        for us in self.batch.drain(..) {
            h.record_us(us);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

// ---------------------------------------------------------------- seqs

/// Which seqs a connection saw in one conversation.
#[derive(Default)]
pub struct SeqTrack {
    bits: Vec<u64>,
    max: u64,
    pub distinct: u64,
    pub dup: u64,
    pub out_of_order: u64,
}

impl SeqTrack {
    /// Records a seq; true when it is new.
    pub fn see(&mut self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.dup += 1;
            return false;
        }
        self.bits[w] |= 1 << b;
        self.distinct += 1;
        if seq < self.max {
            self.out_of_order += 1;
        }
        self.max = self.max.max(seq);
        true
    }

    /// Whether this seq was seen.
    pub fn saw(&self, seq: u64) -> bool {
        self.bits.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_sorted_samples_within_precision() {
        let mut h = Hist::default();
        // 1..=1000 µs: exact below 2048 at 3 significant digits.
        for us in 1..=1000 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s["count"], 1000);
        assert_eq!(s["p50_ms"], 0.5);
        assert_eq!(s["p90_ms"], 0.9);
        assert_eq!(s["p99_ms"], 0.99);
        assert_eq!(s["max_ms"], 1.0);
        assert_eq!(s["mean_ms"], 0.5);
        assert_eq!(Hist::default().summary(), json!({"count": 0}));
        // Large values: within 0.1%.
        let mut h = Hist::default();
        h.record_us(1_234_567);
        let max = h.summary()["max_ms"].as_f64().unwrap();
        assert!((max - 1234.567).abs() / 1234.567 < 1e-3, "{max}");
        // Beyond the range: counted at the top.
        h.record_us(u64::MAX);
        assert_eq!(h.count(), 2);
    }

    #[test]
    fn recorders_flush_into_the_shared_histogram() {
        let shared = SharedHist::default();
        let mut a = shared.recorder();
        let mut b = shared.recorder();
        for us in 0..100 {
            a.record_us(us);
            b.record_us(us);
        }
        drop((a, b));
        assert_eq!(shared.summary()["count"], 200);
    }

    #[test]
    fn seq_track_counts_duplicates_and_reordering() {
        let mut t = SeqTrack::default();
        assert!(t.see(1));
        assert!(t.see(3));
        assert!(t.see(2));
        assert!(!t.see(3));
        assert_eq!((t.distinct, t.dup, t.out_of_order), (3, 1, 1));
        assert!(t.saw(2) && !t.saw(4) && !t.saw(1000));
    }
}
