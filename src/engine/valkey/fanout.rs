//! Fan-out: publishing, this node's subscriptions, the receive loop that
//! hands pub/sub messages to the hub in seq order per topic and conversation
//! (gap fill, no repeats), and the re-send of missed messages after the
//! subscriber reconnects or lags (see "Missed traffic" in [`super`]).

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_trait::async_trait;
use fred::prelude::*;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::Instrument;

use super::{
    Inner, ValkeyEngine, broadcast,
    errors::err,
    payload::{Decoded, StreamEntry, decode, encode, entry_event},
};
use crate::{
    engine::{Broker, Route},
    error::EngineResult,
    hub::{Event, EventKind, Topic, Wakes},
    ids, telemetry,
};

/// The last message delivered of a (topic, conversation): its epoch and seq.
pub(super) type Mark = (Arc<str>, u64);

/// At most this many pub/sub messages are queued to the local connections
/// before their writers are woken (see [`Wakes`]).
const RUN: usize = 32;

/// Delivers pub/sub messages to the hub, in arrival order.
///
/// Messages already received are delivered as a run of at most [`RUN`]
/// before the writers they reached are woken, so a writer sends the run in
/// one write. A run ends as soon as no message is waiting: a lone message
/// is not held back.
pub(super) async fn receive(inner: Arc<Inner>) {
    let mut rx = inner.sub.message_rx();
    let control = inner.control_channel();
    let mut wakes = Wakes::default();
    let mut run = 0usize;
    loop {
        let next = match (run > 0 && run < RUN).then(|| rx.try_recv()) {
            Some(Err(TryRecvError::Empty)) | None => {
                wakes.flush();
                run = 0;
                rx.recv().await
            }
            Some(Ok(msg)) => Ok(msg),
            Some(Err(TryRecvError::Lagged(n))) => Err(RecvError::Lagged(n)),
            Some(Err(TryRecvError::Closed)) => Err(RecvError::Closed),
        };
        match next {
            Ok(msg) => {
                // Every message counts toward the run, so the loop goes back
                // to `recv` (and yields to the scheduler) at least every RUN.
                run += 1;
                let Some(payload) = msg.value.as_str() else { continue };
                if *msg.channel == *control {
                    inner.on_control(&payload);
                    continue;
                }
                if msg.channel == inner.keys.broadcast() {
                    wakes.flush();
                    broadcast::deliver(&inner, &payload).await;
                    continue;
                }
                let Some(topic) = inner.keys.topic(&msg.channel) else { continue };
                let Some(Decoded { event, seq, traceparent }) = decode(&payload) else {
                    tracing::warn!(channel = %msg.channel, "undecodable pub/sub payload");
                    continue;
                };
                // The fan-out on this node joins the sender's trace.
                let span =
                    tracing::debug_span!("fanout", kind = event.kind.frame_type(), recipients = tracing::field::Empty);
                if let Some(tp) = traceparent {
                    telemetry::join_remote(&span, tp);
                }
                if let Some((conv, epoch, seq)) = seq {
                    // Messages go through the in-order path (gap fill, no repeats).
                    let n = deliver_message(&inner, &topic, &conv, &epoch, seq, &event, &mut wakes)
                        .instrument(span.clone())
                        .await;
                    span.record("recipients", n);
                    continue;
                }
                wakes.flush();
                let n = dispatch_users(&inner, std::slice::from_ref(&topic), &event, &span).await;
                span.record("recipients", n);
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "pub/sub receiver lagged; re-sending from storage");
                let inner = inner.clone();
                tokio::spawn(async move { recover(&inner).await });
            }
            Err(RecvError::Closed) => return,
        }
    }
}

/// Dispatches a non-message event to local `topics`. A membership change
/// of a local user subscribes this node to the group before the user hears
/// of it, so nothing sent after the event can be missed.
pub(super) async fn dispatch_users(inner: &Arc<Inner>, topics: &[Topic], event: &Event, span: &tracing::Span) -> usize {
    let joined = match &event.kind {
        EventKind::Membership { conversation, member } if topics.iter().any(|t| inner.hub.wants(t)) => {
            Some((conversation.clone(), *member))
        }
        _ => None,
    };
    if let Some((conv, true)) = &joined {
        subscribe_joined(inner, conv).await;
    }
    let n = span.in_scope(|| topics.iter().map(|t| inner.hub.dispatch(t, event)).sum());
    match joined {
        // Again now that the hub wants it: an unsubscribe that decided
        // before the dispatch (a connection closing, a connect dropping a
        // stale group) may have run meanwhile.
        Some((conv, true)) => subscribe_joined(inner, &conv).await,
        Some((_, false)) => inner.clone().reconcile(),
        None => {}
    }
    n
}

/// Subscribes this node to a group a local user joined (logged on failure:
/// the user's clients see the gap by seq and sync).
async fn subscribe_joined(inner: &Inner, conv: &Arc<str>) {
    if let Err(e) = inner.subscribe(&[Topic::Conv(conv.clone())]).await {
        tracing::warn!(error = %e, conversation = %conv, "subscribe after join failed");
    }
}

enum Order {
    /// Delivered to this many local connections.
    Delivered(usize),
    /// Already delivered (or older): dropped.
    Repeat,
    /// Messages after this seq are missing before this one.
    GapAfter(u64),
}

/// Delivers one message of `conv` on `topic` if it is the next in seq order
/// of its epoch (or the first this node sees), under the lock that keeps the
/// mark and the delivery in step.
fn deliver_next(
    inner: &Inner,
    topic: &Topic,
    conv: &Arc<str>,
    epoch: &Arc<str>,
    seq: u64,
    event: &Event,
    wakes: &mut Wakes,
) -> Order {
    let mut marks = inner.delivered.lock();
    let key = (topic.clone(), conv.clone());
    // Another epoch: the history was lost and seqs start again. What was
    // delivered before says nothing about the new epoch.
    let mark = match marks.get(&key) {
        Some((e, m)) if e == epoch => Some(*m),
        Some(_) => Some(0),
        None => None,
    };
    match mark {
        Some(mark) if seq <= mark => Order::Repeat,
        Some(mark) if seq > mark + 1 => Order::GapAfter(mark),
        _ => {
            let n = inner.hub.dispatch_deferred(topic, event, wakes);
            marks.insert(key, (epoch.clone(), seq));
            Order::Delivered(n)
        }
    }
}

/// A live message: fills a gap before it from storage, drops a repeat.
/// Returns the connections it was delivered to.
async fn deliver_message(
    inner: &Inner,
    topic: &Topic,
    conv: &Arc<str>,
    epoch: &Arc<str>,
    seq: u64,
    event: &Event,
    wakes: &mut Wakes,
) -> usize {
    let mark = match deliver_next(inner, topic, conv, epoch, seq, event, wakes) {
        Order::Delivered(n) => return n,
        Order::Repeat => return 0,
        Order::GapAfter(mark) => mark,
    };
    // What is queued goes out while storage is asked.
    wakes.flush();
    let key = inner.keys.conv(conv, "msgs");
    let missing: Result<Vec<StreamEntry>, _> =
        inner.pool.next().xrange(&key, format!("{}-0", mark + 1), format!("{}-0", seq - 1), None).await;
    match missing {
        Ok(entries) => {
            for e in &entries {
                if let Some((seq, event)) = entry_event(e) {
                    deliver_next(inner, topic, conv, epoch, seq, &event, wakes);
                }
            }
            crate::metrics::pubsub_resent(entries.len() as u64);
        }
        Err(e) => tracing::warn!(error = %e, conversation = %conv, "cannot fill a pub/sub gap; clients will sync"),
    }
    // Delivered after the fill (or, if storage failed, anyway: clients see
    // the gap by seq and sync).
    match deliver_next(inner, topic, conv, epoch, seq, event, wakes) {
        Order::Delivered(n) => n,
        Order::Repeat => 0,
        Order::GapAfter(_) => {
            inner.delivered.lock().insert((topic.clone(), conv.clone()), (epoch.clone(), seq - 1));
            match deliver_next(inner, topic, conv, epoch, seq, event, wakes) {
                Order::Delivered(n) => n,
                _ => 0,
            }
        }
    }
}

/// After the subscriber reconnects: resubscribe, then re-send what was missed.
pub(super) async fn watch_reconnects(inner: Arc<Inner>) {
    // Created after the initial connection: every event here is a reconnect.
    let mut rx = inner.sub.reconnect_rx();
    while let Ok(server) = rx.recv().await {
        tracing::warn!(%server, "pub/sub reconnected; resubscribing and re-sending missed messages");
        crate::metrics::pubsub_reconnect();
        // Subscriptions first (a Valkey still loading its AOF refuses them for
        // a while), then the catch-up from storage: whatever is published after
        // the subscriptions are active arrives live, whatever before is read.
        for attempt in 0..240 {
            match inner.sub.resubscribe_all().await {
                Ok(()) => break,
                Err(e) => {
                    if attempt % 20 == 0 {
                        tracing::warn!(error = %e, "resubscribe failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        broadcast::subscribe_broadcast(&inner).await;
        inner.presence_lost.store(true, Ordering::Release);
        recover(&inner).await;
    }
}

/// Re-sends messages local clients may have missed while pub/sub was down.
/// Storage may come back later than pub/sub: reads are retried (bounded)
/// until every followed conversation has been checked.
async fn recover(inner: &Inner) {
    let since = inner.healthy_at_ms.load(Ordering::Acquire) - 5_000;
    let mut resent = 0usize;
    let mut pending: Option<Vec<(Topic, String)>> = None;
    for attempt in 0..120 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let convs = match pending.take() {
            Some(c) => c,
            None => match followed(inner).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "recovery: storage not back yet");
                    continue;
                }
            },
        };
        let mut failed = Vec::new();
        for (topic, conv) in convs {
            match resend(inner, &topic, &conv, since).await {
                Ok(n) => resent += n,
                Err(_) => failed.push((topic, conv)),
            }
        }
        if failed.is_empty() {
            inner.healthy_at_ms.store(crate::protocol::now_ms(), Ordering::Release);
            crate::metrics::pubsub_resent(resent as u64);
            tracing::info!(resent, "missed-traffic recovery done");
            return;
        }
        pending = Some(failed);
    }
    tracing::error!(resent, "missed-traffic recovery gave up: storage did not answer for 30 s; clients must sync");
}

/// Every (topic, conversation) local clients follow: subscribed
/// conversations, and the direct conversations of local users.
async fn followed(inner: &Inner) -> EngineResult<Vec<(Topic, String)>> {
    let mut out = Vec::new();
    for topic in inner.hub.topics() {
        match &topic {
            Topic::Conv(c) => {
                let c = c.to_string();
                out.push((topic, c));
            }
            Topic::User(u) => {
                let mine: Vec<String> = inner.pool.next().smembers(inner.keys.user_convs(u)).await.map_err(err)?;
                for c in mine {
                    if matches!(ids::parse_dm(&c), ids::Dm::Pair(..)) {
                        out.push((topic.clone(), c));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Re-sends, in order, the messages of one conversation this node has not
/// delivered on `topic` (all of the current epoch's when the epoch changed).
async fn resend(inner: &Inner, topic: &Topic, conv: &str, since_ms: i64) -> EngineResult<usize> {
    let conv: Arc<str> = conv.into();
    let client = inner.pool.next();
    // The mark first: what this node delivered was stored before it was
    // delivered, so a `last` read after the mark is never below it unless
    // the history really went back (read the other way round, a live
    // delivery between the two reads looks like a regression).
    let mark = inner.delivered.lock().get(&(topic.clone(), conv.clone())).cloned();
    let (epoch, last, prev): (Option<String>, Option<u64>, Option<String>) =
        client.hmget(inner.keys.conv(&conv, "meta"), vec!["epoch", "last", "prev"]).await.map_err(err)?;
    let Some(epoch) = epoch.map(Arc::<str>::from) else {
        // Nothing stored (or it was lost and nothing new came yet).
        return Ok(0);
    };
    let meta = super::lost::Meta { epoch: epoch.clone(), last: last.unwrap_or(0), prev };
    if super::lost::regressed(inner, topic, &conv, &meta, mark.as_ref()).await? {
        return Ok(0);
    }
    let from = match inner.delivered.lock().get(&(topic.clone(), conv.clone())) {
        Some((e, seq)) if *e == epoch => Some(*seq),
        Some(_) => Some(0),
        None => None,
    };
    let key = inner.keys.conv(&conv, "msgs");
    let entries: Vec<StreamEntry> = match from {
        Some(seq) => client.xrange(&key, format!("{}-0", seq + 1), "+", Some(1000)).await.map_err(err)?,
        None => {
            let mut v: Vec<StreamEntry> = client.xrevrange(&key, "+", "-", Some(1000)).await.map_err(err)?;
            v.retain(|e| e.1.get("t").and_then(|t| t.parse::<i64>().ok()).is_some_and(|t| t >= since_ms));
            v.reverse();
            v
        }
    };
    let mut n = 0;
    // The whole page is queued before a writer is woken (dropping wakes them).
    let mut wakes = Wakes::default();
    for e in &entries {
        let (seq, event) =
            entry_event(e).ok_or_else(|| crate::error::EngineError::Internal(format!("stream entry {}", e.0)))?;
        if matches!(deliver_next(inner, topic, &conv, &epoch, seq, &event, &mut wakes), Order::Delivered(_)) {
            n += 1;
        }
    }
    Ok(n)
}

impl Inner {
    /// Subscribes to the channels of `topics` not yet subscribed; returns once
    /// they are active.
    pub(super) async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()> {
        let mut active = self.active.lock().await;
        let missing: Vec<String> =
            topics.iter().map(|t| self.keys.channel(t)).filter(|c| !active.contains(c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.cluster {
            // Shard channels of different slots cannot share one command.
            let each = missing.iter().map(|c| self.sub.ssubscribe(c.as_str()));
            futures_util::future::try_join_all(each).await.map_err(err)?;
        } else {
            self.sub.subscribe(missing.clone()).await.map_err(err)?;
        }
        active.extend(missing);
        Ok(())
    }

    /// Unsubscribes, in the background, from channels no local connection needs.
    pub(super) fn reconcile(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut active = self.active.lock().await;
            let wanted: HashSet<String> = self.hub.topics().iter().map(|t| self.keys.channel(t)).collect();
            let stale: Vec<String> = active.difference(&wanted).cloned().collect();
            if stale.is_empty() {
                return;
            }
            let r = if self.cluster {
                let each = stale.iter().map(|c| self.sub.sunsubscribe(c.as_str()));
                futures_util::future::try_join_all(each).await.map(|_| ())
            } else {
                self.sub.unsubscribe(stale.clone()).await
            };
            match r {
                Ok(()) => {
                    for c in &stale {
                        active.remove(c);
                    }
                    let wanted: HashSet<Topic> = self.hub.topics().into_iter().collect();
                    self.delivered.lock().retain(|(topic, _), _| wanted.contains(topic));
                }
                Err(e) => tracing::debug!(error = %e, "unsubscribe failed; retried on the next change"),
            }
        });
    }

    /// The append and update scripts' byte-bucket arguments: a body of
    /// `bytes` (0: nothing to take, e.g. the service API), bytes per second
    /// (0: no bucket), burst.
    pub(super) fn byte_budget(&self, bytes: usize) -> [String; 3] {
        let per_s = if bytes == 0 { 0 } else { self.send_bytes_per_s };
        [bytes.to_string(), per_s.to_string(), self.send_bytes_burst.to_string()]
    }

    pub(super) fn publish_cmd(&self) -> &'static str {
        if self.cluster { "s" } else { "p" }
    }

    pub(super) async fn publish_payload(&self, route: &Route, payload: String) -> EngineResult<()> {
        let client = self.pool.next();
        for topic in route {
            let ch = self.keys.channel(topic);
            if self.cluster {
                client.spublish::<(), _, _>(ch, payload.as_str()).await.map_err(err)?;
            } else {
                client.publish::<(), _, _>(ch, payload.as_str()).await.map_err(err)?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for ValkeyEngine {
    async fn publish(&self, route: &Route, event: Event) -> EngineResult<()> {
        self.inner.publish_payload(route, encode(&event)).await
    }

    async fn publish_all(&self, events: Vec<(Route, Event)>) -> EngineResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let i = &self.inner;
        let pipe = i.pool.next().pipeline();
        for (route, event) in &events {
            let payload = encode(event);
            for topic in route {
                let ch = i.keys.channel(topic);
                if i.cluster {
                    let _: () = pipe.spublish(ch, payload.as_str()).await.map_err(err)?;
                } else {
                    let _: () = pipe.publish(ch, payload.as_str()).await.map_err(err)?;
                }
            }
        }
        let _: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        Ok(())
    }

    async fn publish_users(&self, users: &[String], event: Event) -> EngineResult<()> {
        broadcast::publish(&self.inner, users, &event).await
    }

    async fn typing_gate(&self, user: &str, conversation: &str, every: Duration) -> EngineResult<bool> {
        let key = format!("{}:{{u:{user}}}:typing:{conversation}", self.inner.keys.prefix);
        let set: Option<String> = self
            .inner
            .pool
            .next()
            .set(key, "1", Some(Expiration::PX(every.as_millis() as i64)), Some(SetOptions::NX), false)
            .await
            .map_err(err)?;
        Ok(set.is_some())
    }

    async fn subscribe(&self, topics: &[Topic]) -> EngineResult<()> {
        self.inner.subscribe(topics).await
    }

    async fn forward(
        &self,
        node: &str,
        session: &str,
        frames: Vec<crate::protocol::Text>,
    ) -> EngineResult<crate::hub::streams::Offer> {
        self.forward_frames(node, session, frames).await
    }

    fn topics_changed(&self) {
        self.inner.clone().reconcile();
    }
}
