//! Events for many users at once ([`crate::engine::Broker::publish_users`],
//! e.g. a membership change to every member added): published once on the
//! `<prefix>:{all}:ev` channel every node subscribes to, naming the
//! recipients, so a group of n members costs n, not n², bytes in Valkey.

use std::{sync::Arc, time::Duration};

use fred::prelude::*;

use super::{
    Inner,
    errors::err,
    fanout,
    payload::{self, Decoded},
};
use crate::{
    error::EngineResult,
    hub::{Event, Topic},
    telemetry,
};

/// An event for many users at once, from the broadcast channel
/// ([`encode`]): delivered to those of them with a local connection.
pub(super) async fn deliver(inner: &Arc<Inner>, payload: &str) {
    let Some((users, rest)) = payload.split_once('\n') else { return };
    let Some(Decoded { event, traceparent, .. }) = payload::decode(rest) else {
        tracing::warn!("undecodable broadcast payload");
        return;
    };
    let local: Vec<Topic> = users.split(' ').map(|u| Topic::User(u.into())).filter(|t| inner.hub.wants(t)).collect();
    if local.is_empty() {
        return;
    }
    let span = tracing::debug_span!("fanout", kind = event.kind.frame_type(), recipients = tracing::field::Empty);
    if let Some(tp) = traceparent {
        telemetry::join_remote(&span, tp);
    }
    let n = fanout::dispatch_users(inner, &local, &event, &span).await;
    span.record("recipients", n);
}

/// The broadcast payload of [`crate::engine::Broker::publish_users`]: the users separated
/// by spaces (user ids hold none), a newline, then the event as [`encode`]
/// writes it. The frame travels once, whatever the number of users.
fn encode(users: &[String], event: &Event) -> String {
    let event = payload::encode(event);
    let mut out = String::with_capacity(users.iter().map(|u| u.len() + 1).sum::<usize>() + event.len());
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(u);
    }
    out.push('\n');
    out.push_str(&event);
    out
}

/// Subscribes to the broadcast channel (at start, and again after every
/// reconnect: a subscription that failed while Valkey was down is not one
/// the client restores). Retries until it holds.
pub(super) async fn subscribe_broadcast(inner: &Inner) {
    let ch = inner.keys.broadcast();
    for attempt in 0u32.. {
        let r = if inner.cluster {
            inner.sub.ssubscribe(ch.as_str()).await
        } else {
            inner.sub.subscribe(ch.as_str()).await
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                if attempt % 20 == 0 {
                    tracing::warn!(error = %e, "subscribing to the broadcast channel failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Publishes `event` once for all of `users` on the broadcast channel.
pub(super) async fn publish(inner: &Inner, users: &[String], event: &Event) -> EngineResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    let payload = encode(users, event);
    let client = inner.pool.next();
    if inner.cluster {
        client.spublish::<(), _, _>(inner.keys.broadcast(), payload).await.map_err(err)
    } else {
        client.publish::<(), _, _>(inner.keys.broadcast(), payload).await.map_err(err)
    }
}
