//! `reactions`: a reaction storm (v1.2). M members of one group; one message;
//! every member toggles a reaction on it within `--window-ms` (each at its
//! own instant of the window), with `--emoji` kinds taken in turn. Every
//! member applies every `update` it receives to its own copy of the
//! message's reactions; at the end every copy must equal every other and the
//! server's (the service API's list, current state). Figures: acks, ack
//! latency, update deliveries and their latency, the storm's duration, the
//! nodes' RSS.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::{
    Ctx, Fatal, fatal,
    stats::{Counts, SharedHist, bump, merge, now_us, round2},
    sys, target,
    ws::{self, Message},
};

const EMOJI: [&str; 6] = ["👍", "❤️", "😂", "😮", "😢", "🙏"];

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Members of the group; each toggles one reaction.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// The storm's length: member i reacts at i x window / members.
    #[arg(long, default_value_t = 1000)]
    pub window_ms: u64,
    /// How many different emoji (1-6) the members take in turn.
    #[arg(long, default_value_t = 1)]
    pub emoji: usize,
    /// Seconds without a new update after which a member stops waiting
    /// (it stops at once when it saw every reaction and its own ack).
    #[arg(long, default_value_t = 30)]
    pub drain_s: u64,
}

/// One member's copy of the message's reactions: emoji -> users.
type Reactions = BTreeMap<String, BTreeSet<String>>;

struct Member {
    state: Reactions,
    updates: u64,
    ack_ok: bool,
    errors: Counts,
}

pub async fn run(ctx: &Ctx, o: &Opts, duration: Duration) -> Result<Value, Fatal> {
    if o.members == 0 || !(1..=EMOJI.len()).contains(&o.emoji) || o.window_ms > 60_000 {
        return Err(fatal("--members at least 1, --emoji 1..=6, --window-ms at most 60000"));
    }
    let deadline = Instant::now() + duration;
    let group = format!("{}-reactions", ctx.prefix);
    let users: Vec<String> = (0..o.members).map(|i| format!("{}-r{i}", ctx.prefix)).collect();
    target::put_group(&ctx.http, &ctx.targets[0], &ctx.api_key, &group, "load reactions", &users).await?;
    let post = json!({"sender": users[0], "body": "react to me", "client_msg_id": "storm-target"});
    let path = format!("/api/v1/conversations/{group}/messages");
    let (status, v) = ctx.http.request(Method::POST, &ctx.targets[0], &path, Some(&ctx.api_key), Some(&post)).await?;
    let Some(target_seq) = v["seq"].as_u64().filter(|_| status < 300) else {
        return Err(fatal(format!("posting the target message: {status} {v}")));
    };
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;

    let latency = SharedHist::default();
    let ack_latency = SharedHist::default();
    let last_update_us = Arc::new(AtomicU64::new(0));
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..o.members).map(|_| AtomicU64::new(0)).collect());
    let rss_before = sys::servers_rss_kib(&ctx.server_pids);
    // Every member connected first; then the storm starts for all at t0.
    let (go_tx, go_rx) = tokio::sync::watch::channel::<Option<Instant>>(None);
    let handles = crate::ramp(o.members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, group) = (ctx.target(i).clone(), tokens[i].clone(), group.clone());
        let (mut go, emoji) = (go_rx.clone(), EMOJI[i % o.emoji].to_string());
        let (latency, ack_latency, last, sent_at) =
            (latency.recorder(), ack_latency.recorder(), last_update_us.clone(), sent_at.clone());
        let (offset, members, drain) = (
            Duration::from_micros(o.window_ms * 1000 * i as u64 / o.members as u64),
            o.members as u64,
            Duration::from_secs(o.drain_s.clamp(1, 600)),
        );
        async move {
            let ws = ws::open(&target, &token, 64 * 1024).await?;
            drop(permit);
            let (mut tx, mut rx) = ws.split();
            let t0 = loop {
                if let Some(t0) = *go.borrow() {
                    break t0;
                }
                if go.changed().await.is_err() {
                    return Err("no start".to_string());
                }
            };
            let mut m = Member { state: Reactions::new(), updates: 0, ack_ok: false, errors: Counts::new() };
            let (mut latency, mut ack_latency) = (latency, ack_latency);
            let send_at = t0 + offset;
            let mut sent = false;
            let mut quiet_since = Instant::now();
            loop {
                let wake = if sent { quiet_since + drain } else { send_at };
                let frame = tokio::select! {
                    f = rx.next() => f,
                    _ = sleep_until(wake) => {
                        if sent {
                            break;
                        }
                        let react = json!({"type":"react","id":1,"conversation":group,"seq":target_seq,"emoji":emoji,"on":true});
                        sent_at[i].store(now_us(), Ordering::Relaxed);
                        if tx.send(Message::text(react.to_string())).await.is_err() {
                            bump(&mut m.errors, "send");
                            break;
                        }
                        sent = true;
                        quiet_since = Instant::now();
                        continue;
                    }
                };
                let Some(Ok(Message::Text(t))) = frame else {
                    bump(&mut m.errors, "closed");
                    break;
                };
                let Ok(f) = serde_json::from_str::<Value>(&t) else { continue };
                let now = now_us();
                match f["type"].as_str() {
                    Some("update") if f["conversation"] == group.as_str() => {
                        m.updates += 1;
                        quiet_since = Instant::now();
                        last.fetch_max(now, Ordering::Relaxed);
                        let (e, u) = (f["emoji"].as_str().unwrap_or(""), f["user"]["id"].as_str().unwrap_or(""));
                        if f["on"] == true {
                            m.state.entry(e.to_string()).or_default().insert(u.to_string());
                        } else if let Some(s) = m.state.get_mut(e) {
                            s.remove(u);
                        }
                        m.state.retain(|_, s| !s.is_empty());
                        // The reacting member's index is in its user id (`...-r<i>`).
                        let sender = u.rsplit_once("-r").and_then(|(_, i)| i.parse::<usize>().ok());
                        if let Some(t) = sender.and_then(|i| sent_at.get(i)).map(|a| a.load(Ordering::Relaxed)) {
                            latency.record_us(now.saturating_sub(t));
                        }
                        // Done: every reaction seen and our own answered (the
                        // order of an ack and the updates is not fixed).
                        if m.updates >= members && m.ack_ok {
                            break;
                        }
                    }
                    Some("ack") if f["id"] == 1 => {
                        m.ack_ok = true;
                        ack_latency.record_us(now.saturating_sub(sent_at[i].load(Ordering::Relaxed)));
                        if m.updates >= members {
                            break;
                        }
                    }
                    Some("error") => bump(&mut m.errors, f["code"].as_str().unwrap_or("unknown")),
                    _ => {}
                }
            }
            Ok::<_, String>(m)
        }
    })
    .await;
    sleep(Duration::from_millis(500)).await;
    let first_us = now_us();
    let _ = go_tx.send(Some(Instant::now()));
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (pids, peak) = (ctx.server_pids.clone(), rss_peak.clone());
        tokio::spawn(async move {
            loop {
                if let Some(k) = sys::servers_rss_kib(&pids) {
                    peak.fetch_max(k, Ordering::Relaxed);
                }
                sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let (mut connected, mut acked, mut updates) = (0usize, 0usize, 0u64);
    let mut errors = Counts::new();
    let mut first_state = None;
    for h in handles {
        match timeout(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(10), h).await {
            Ok(Ok(Ok(m))) => {
                connected += 1;
                acked += m.ack_ok as usize;
                updates += m.updates;
                merge(&mut errors, m.errors);
                let key = serde_json::to_string(&m.state).unwrap_or_default();
                first_state.get_or_insert_with(|| m.state.clone());
                *states.entry(key).or_default() += 1;
            }
            Ok(Ok(Err(e))) => bump(&mut errors, format!("connect_{e}")),
            _ => bump(&mut errors, "member_task"),
        }
    }
    sampler.abort();
    let storm_s = last_update_us.load(Ordering::Relaxed).saturating_sub(first_us) as f64 / 1e6;
    // The server's view: the message in its current state.
    let list = format!("/api/v1/conversations/{group}/messages?after={}&limit=1", target_seq - 1);
    let (_, v) = ctx.http.request(Method::GET, &ctx.targets[0], &list, Some(&ctx.api_key), None).await?;
    let mut server = Reactions::new();
    for r in v["messages"][0]["reactions"].as_array().into_iter().flatten() {
        let users = r["users"].as_array().into_iter().flatten().filter_map(|u| u.as_str().map(String::from));
        server.insert(r["emoji"].as_str().unwrap_or("").to_string(), users.collect());
    }
    let reacted: usize = server.values().map(BTreeSet::len).sum();
    Ok(json!({
        "members": o.members,
        "members_connected": connected,
        "window_ms": o.window_ms,
        "emoji": o.emoji,
        "acked": acked,
        "server_reacted_users": reacted,
        "update_deliveries": updates,
        "expected_update_deliveries": (acked as u64) * connected as u64,
        "distinct_final_states": states.len(),
        "members_agree_with_server": first_state.as_ref() == Some(&server) && states.len() == 1,
        "storm_s": round2(storm_s),
        "ack_latency": ack_latency.summary(),
        "update_latency": latency.summary(),
        "rss_kib_before": rss_before,
        "rss_kib_peak": rss_peak.load(Ordering::Relaxed),
        "errors": errors,
    }))
}
