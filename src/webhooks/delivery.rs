//! The delivery task: takes events from the outbox, POSTs them signed, and
//! settles each attempt (done, retry later, or dropped when too old).

use std::{sync::Arc, time::Duration};

use tokio::task::JoinSet;
use tracing::Instrument;

use super::{Claimed, Webhooks, sign};
use crate::{metrics, protocol};

/// How often an idle node looks for events other nodes queued (its own wake
/// it at once).
const POLL: Duration = Duration::from_millis(500);
/// Failed attempts in a row after which the receiver counts as down: the node
/// then sends one event at a time (a probe), waiting between probes, instead
/// of attempting every queued event (a flood of failing connections would
/// cost the chat CPU while helping nobody).
const DOWN_AFTER: u32 = 16;
/// Longest wait between two probes of a receiver that is down.
const PROBE_MAX: Duration = Duration::from_secs(30);

/// The wait before attempt `attempt + 1` after `attempt` failures: 1 s,
/// doubling, at most `max`, with +-20 % jitter so a receiver that comes back
/// is not hit by every event at once.
pub(super) fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max);
    base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

impl Webhooks {
    /// Milliseconds after which an event taken by a node that has not
    /// finished it is handed to another: longer than any attempt lasts.
    fn claim_idle_ms(&self) -> u64 {
        self.cfg.timeout_ms.saturating_mul(2).saturating_add(10_000)
    }

    /// Keeps up to `webhooks.concurrency` attempts in flight (one, a probe,
    /// while the receiver is down), taking more from the outbox whenever half
    /// the slots are free. (It used to take a batch and wait for all of it:
    /// every batch waited for its slowest attempt, and a backlog drained at
    /// a fraction of what the receiver could take.)
    pub(super) async fn deliver_loop(self: Arc<Self>) {
        let mut attempts = JoinSet::new();
        // Failed attempts in a row, and the wait before the next probe.
        let mut failures = 0u32;
        let probe_max = PROBE_MAX.min(Duration::from_secs(self.cfg.max_backoff_s));
        let mut probe_wait = Duration::from_secs(1).min(probe_max);
        loop {
            let down = failures >= DOWN_AFTER;
            let slots = if down { 1 } else { self.cfg.concurrency.max(1) };
            if attempts.len() <= slots / 2 {
                match self.outbox.take(slots - attempts.len(), self.claim_idle_ms()).await {
                    // Every attempt ends within webhooks.timeout_ms: long
                    // before another node may claim its event.
                    Ok(batch) => {
                        for event in batch {
                            attempts.spawn(self.clone().attempt(event));
                        }
                    }
                    Err(e) if attempts.is_empty() => {
                        tracing::warn!(error = %e, "webhook outbox unavailable");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "webhook outbox unavailable"),
                }
            }
            if attempts.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
                continue;
            }
            let Some(r) = attempts.join_next().await else { continue };
            match r {
                Ok(Some(true)) => {
                    if failures >= DOWN_AFTER {
                        tracing::info!("webhook receiver answers again");
                    }
                    failures = 0;
                    probe_wait = Duration::from_secs(1).min(probe_max);
                }
                Ok(None) => {}
                _ => {
                    failures = failures.saturating_add(1);
                    if failures == DOWN_AFTER {
                        tracing::warn!(failures, "webhook receiver looks down: probing with one event at a time");
                    }
                    // Down: wait before the next probe, once the attempts
                    // started before it noticed have ended.
                    if failures >= DOWN_AFTER && attempts.is_empty() {
                        tokio::time::sleep(probe_wait).await;
                        probe_wait = (probe_wait * 2).min(probe_max);
                    }
                }
            }
        }
    }

    /// One attempt: `Some(true)` delivered, `Some(false)` failed, `None`
    /// dropped as too old without an attempt.
    async fn attempt(self: Arc<Self>, mut event: Claimed) -> Option<bool> {
        let e = &event.envelope;
        let now = protocol::now_ms();
        let max_age_ms = (self.cfg.max_age_s as i64).saturating_mul(1000);
        if now.saturating_sub(e.created_ms) > max_age_ms {
            metrics::webhook_dropped("expired", 1);
            tracing::warn!(
                webhook_id = %e.id,
                attempts = e.attempt,
                max_age_s = self.cfg.max_age_s,
                "webhook event dropped: not delivered within webhooks.max_age_s"
            );
            self.settle(&event, None).await;
            return None;
        }
        let span = tracing::info_span!("webhook.deliver", webhook_id = %e.id, attempt = e.attempt + 1, status = tracing::field::Empty);
        if let Some(tp) = &e.trace {
            crate::telemetry::link_remote(&span, tp);
        }
        let ts = now / 1000;
        let mut req = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &e.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sign(&self.key, &e.id, ts, &e.body))
            .body(e.body.clone());
        if let Some(tp) = crate::telemetry::traceparent_of(&span) {
            req = req.header("traceparent", tp);
        }
        let outcome = req.send().instrument(span.clone()).await;
        let failure = match outcome {
            Ok(r) if r.status().is_success() => {
                span.record("status", r.status().as_u16());
                metrics::webhook_delivered(now.saturating_sub(e.created_ms).max(0) as f64 / 1000.0);
                self.settle(&event, None).await;
                return Some(true);
            }
            Ok(r) => {
                span.record("status", r.status().as_u16());
                format!("HTTP {}", r.status().as_u16())
            }
            Err(err) if err.is_timeout() => format!("no answer within {} ms", self.cfg.timeout_ms),
            Err(err) => format!("{err}"),
        };
        event.envelope.attempt += 1;
        let wait = backoff(event.envelope.attempt, Duration::from_secs(self.cfg.max_backoff_s));
        metrics::webhook_retried();
        tracing::debug!(webhook_id = %event.envelope.id, attempt = event.envelope.attempt, failure, retry_in_ms = wait.as_millis() as u64, "webhook attempt failed");
        self.settle(&event, Some(protocol::now_ms().saturating_add(wait.as_millis() as i64))).await;
        Some(false)
    }

    /// Records an attempt's end: `retry_at` `None` forgets the event.
    /// Outbox errors are retried a few times; an event left unsettled is
    /// handed out again after `claim_idle` (Valkey) — at least once.
    async fn settle(&self, event: &Claimed, retry_at: Option<i64>) {
        for i in 0..3 {
            let r = match retry_at {
                None => self.outbox.done(event).await,
                Some(at) => self.outbox.retry(event, at).await,
            };
            match r {
                Ok(()) => return,
                Err(e) if i == 2 => {
                    tracing::warn!(error = %e, webhook_id = %event.envelope.id, "cannot settle a webhook attempt")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_the_cap_with_jitter() {
        let cap = Duration::from_secs(600);
        for (attempt, base) in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 512.0), (11, 600.0), (40, 600.0)] {
            let w = backoff(attempt, cap).as_secs_f64();
            assert!(w >= base * 0.8 - 1e-9 && w <= base * 1.2 + 1e-9, "attempt {attempt}: {w} s, around {base}");
        }
    }
}
