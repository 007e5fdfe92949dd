//! `reactions`: the reaction storm of PROTOCOL v1.2. One group of M members
//! and one message in it; every member toggles a reaction on that message
//! (`react` with `on:true`, then with `--toggles 2` `on:false`, ...), the
//! members' first toggles spread over `--spread-ms`. Every member follows
//! the `update` frames; at the end every member's view of the message's
//! reactions must be the same, and the same as the stored one (the service
//! API's message list). Reports react -> ack and react -> update latency,
//! and the server's RSS.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::{
    Ctx, Fatal, fatal,
    stats::{Counts, Recorder, SharedHist, bump, now_us, round2},
    sys::{self, CpuMark},
    target,
    ws::{self, Message, WsRx, WsTx},
};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Members of the group; each one reacts.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// The members' first reactions are spread over this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub spread_ms: u64,
    /// Toggles per member: on, off, on, ... (odd: every member ends reacted).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub toggles: u32,
    /// The emoji.
    #[arg(long, default_value = "👍")]
    pub emoji: String,
    /// Seconds without a new update after which the drain ends.
    #[arg(long, default_value_t = 10)]
    pub drain_s: u64,
}

/// The fields of the frames this scenario reads.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    target: Option<u64>,
    #[serde(default)]
    user: Option<UserField>,
    #[serde(default)]
    emoji: Option<String>,
    #[serde(default)]
    on: Option<bool>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    duplicate: Option<bool>,
}

#[derive(Deserialize)]
struct UserField {
    id: String,
}

/// What every member's task shares.
struct Shared {
    target_seq: u64,
    emoji: String,
    /// Per member and toggle: when it was sent (µs, tool clock).
    sent_us: Vec<AtomicU64>,
    toggles: usize,
    updates_seen: AtomicU64,
    last_update_us: AtomicU64,
    ack_latency: SharedHist,
    update_latency: SharedHist,
}

/// One member's end state.
struct View {
    /// User -> reacted, from the updates in seq order.
    state: BTreeMap<String, bool>,
    acks: u64,
    duplicate_acks: u64,
    errors: Counts,
}

pub async fn run(ctx: &Ctx, o: &Opts, duration: Duration) -> Result<Value, Fatal> {
    if o.members == 0 || o.members > crate::MAX_CONNS {
        return Err(fatal(format!("--members must be 1..={}", crate::MAX_CONNS)));
    }
    let deadline = Instant::now() + duration;
    let group = format!("{}-react", ctx.prefix);
    let users: Vec<String> = (0..o.members).map(|i| format!("{}-r{i}", ctx.prefix)).collect();
    target::put_group(&ctx.http, &ctx.targets[0], &ctx.api_key, &group, "reaction storm", &users).await?;
    let post = json!({"sender": users[0], "body": "react to me", "client_msg_id": format!("{}-m", ctx.prefix)});
    let path = format!("/api/v1/conversations/{group}/messages");
    let (status, v) = ctx.http.request(Method::POST, &ctx.targets[0], &path, Some(&ctx.api_key), Some(&post)).await?;
    let target_seq =
        v["seq"].as_u64().filter(|_| status == 201).ok_or_else(|| fatal(format!("POST {path}: {status} {v}")))?;
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let toggles = o.toggles as usize;
    let shared = Arc::new(Shared {
        target_seq,
        emoji: o.emoji.clone(),
        sent_us: (0..o.members * toggles).map(|_| AtomicU64::new(0)).collect(),
        toggles,
        updates_seen: AtomicU64::new(0),
        last_update_us: AtomicU64::new(0),
        ack_latency: SharedHist::default(),
        update_latency: SharedHist::default(),
    });
    let index: Arc<BTreeMap<String, usize>> =
        Arc::new(users.iter().cloned().enumerate().map(|(i, u)| (u, i)).collect());

    // Connect everyone; the writing halves come back for the storm.
    let stop = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    let (side_tx, mut side_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, WsTx)>();
    let ramp_start = Instant::now();
    let handles = crate::ramp(o.members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, shared, index, stop, connected, side_tx) = (
            ctx.target(i).clone(),
            tokens[i].clone(),
            shared.clone(),
            index.clone(),
            stop.clone(),
            connected.clone(),
            side_tx.clone(),
        );
        async move {
            let ws = ws::open(&target, &token, 64 * 1024).await?;
            connected.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = ws.split();
            let _ = side_tx.send((i, tx));
            drop(permit);
            Ok::<_, String>(follow(rx, i, shared, index, stop).await)
        }
    })
    .await;
    drop(side_tx);
    let up = connected.load(Ordering::Relaxed);
    eprintln!("ramp: {up}/{} members connected in {:.1} s", o.members, ramp_start.elapsed().as_secs_f64());
    sleep(Duration::from_millis(500)).await;

    // The storm: member i's toggle t at t0 + i * spread / M + t * spread.
    let rss_before = sys::servers_rss_kib(&ctx.server_pids);
    let cpu = CpuMark::now(&ctx.server_pids);
    let t0 = Instant::now();
    let spread = Duration::from_millis(o.spread_ms);
    let mut senders = Vec::new();
    while let Ok((i, mut tx)) = side_rx.try_recv() {
        let (shared, group) = (shared.clone(), group.clone());
        let n = o.members as u32;
        senders.push(tokio::spawn(async move {
            for t in 0..shared.toggles {
                sleep_until(t0 + spread * i as u32 / n + spread * t as u32).await;
                let k = i * shared.toggles + t;
                shared.sent_us[k].store(now_us(), Ordering::Relaxed);
                let frame = json!({"type": "react", "id": k, "conversation": group, "seq": shared.target_seq,
                                   "emoji": shared.emoji, "on": t % 2 == 0});
                if tx.send(Message::text(frame.to_string())).await.is_err() {
                    return tx;
                }
            }
            tx
        }));
    }
    let mut writers = Vec::new();
    for s in senders {
        if let Ok(tx) = s.await {
            writers.push(tx);
        }
    }
    // Drain: until every member saw every update, or nothing new came for drain_s.
    let want = (o.members * toggles * up) as u64;
    let quiet = Duration::from_secs(o.drain_s);
    loop {
        let seen = shared.updates_seen.load(Ordering::Relaxed);
        let last = shared.last_update_us.load(Ordering::Relaxed);
        if seen >= want
            || Instant::now() >= deadline
            || (now_us().saturating_sub(last) > quiet.as_micros() as u64 && last > 0)
        {
            break;
        }
        sleep(Duration::from_millis(100)).await;
    }
    let storm_s = (shared.last_update_us.load(Ordering::Relaxed) as f64 / 1e6)
        - (shared.sent_us[0].load(Ordering::Relaxed) as f64 / 1e6);
    let run_cpu = cpu.since(&ctx.server_pids);
    let rss_after = sys::servers_rss_kib(&ctx.server_pids);
    stop.cancel();
    drop(writers);

    // What is stored: the service API's page (history's form).
    let (status, page) = ctx
        .http
        .request(
            Method::GET,
            &ctx.targets[0],
            &format!("{path}?after={}&limit=1", target_seq - 1),
            Some(&ctx.api_key),
            None,
        )
        .await?;
    let stored: BTreeMap<String, bool> = page["messages"][0]["reactions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["emoji"] == o.emoji.as_str())
        .flat_map(|r| r["users"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(|u| (u.to_string(), true)))
        .collect();
    let mut agree = 0usize;
    let (mut acks, mut dup_acks, mut errors) = (0u64, 0u64, Counts::new());
    let mut views = 0usize;
    for h in handles {
        if let Ok(Ok(v)) = h.await {
            views += 1;
            let reacted: BTreeMap<String, bool> = v.state.into_iter().filter(|(_, on)| *on).collect();
            agree += usize::from(reacted == stored);
            acks += v.acks;
            dup_acks += v.duplicate_acks;
            for (k, n) in v.errors {
                *errors.entry(k).or_default() += n;
            }
        }
    }
    let expected_reacted = if toggles % 2 == 1 { o.members } else { 0 };
    Ok(json!({
        "members": o.members,
        "members_connected": up,
        "toggles_per_member": toggles,
        "spread_ms": o.spread_ms,
        "stored_status": status,
        "stored_reacted": stored.len(),
        "expected_reacted": expected_reacted,
        "members_agreeing_with_stored": agree,
        "members_reporting": views,
        "all_agree": agree == views && stored.len() == expected_reacted,
        "acks": acks,
        "duplicate_acks": dup_acks,
        "updates_delivered": shared.updates_seen.load(Ordering::Relaxed),
        "updates_expected": want,
        "storm_s": round2(storm_s),
        "cpu": run_cpu,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "ack_latency": shared.ack_latency.summary(),
        "update_latency": shared.update_latency.summary(),
        "errors": errors,
    }))
}

/// Reads one member's connection until `stop`: its acks, and every reaction
/// update of the target message (state per user, in seq order).
async fn follow(
    mut rx: WsRx,
    me: usize,
    shared: Arc<Shared>,
    index: Arc<BTreeMap<String, usize>>,
    stop: CancellationToken,
) -> View {
    let mut v = View { state: BTreeMap::new(), acks: 0, duplicate_acks: 0, errors: Counts::new() };
    let (mut ack_rec, mut upd_rec): (Recorder, Recorder) =
        (shared.ack_latency.recorder(), shared.update_latency.recorder());
    let mut last_seq = 0u64;
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            m = timeout(Duration::from_secs(3600), rx.next()) => m,
        };
        let text = match m {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            _ => break,
        };
        let now = now_us();
        let Ok(f) = serde_json::from_str::<Frame>(&text) else { continue };
        match f.ty.as_str() {
            "update" if f.kind.as_deref() == Some("reaction") && f.target == Some(shared.target_seq) => {
                if f.emoji.as_deref() != Some(shared.emoji.as_str()) {
                    continue;
                }
                let seq = f.seq.unwrap_or(0);
                if seq <= last_seq {
                    bump(&mut v.errors, "update_out_of_order_or_repeated");
                    continue;
                }
                last_seq = seq;
                let (Some(user), Some(on)) = (f.user, f.on) else { continue };
                if let Some(&i) = index.get(&user.id) {
                    // The latest toggle of that member sent before now.
                    let k = (0..shared.toggles)
                        .rev()
                        .map(|t| i * shared.toggles + t)
                        .find(|k| shared.sent_us[*k].load(Ordering::Relaxed) != 0);
                    if let Some(k) = k {
                        upd_rec.record_us(now.saturating_sub(shared.sent_us[k].load(Ordering::Relaxed)));
                    }
                }
                v.state.insert(user.id, on);
                shared.updates_seen.fetch_add(1, Ordering::Relaxed);
                shared.last_update_us.fetch_max(now, Ordering::Relaxed);
            }
            "ack" => {
                let Some(k) = f.id.map(|k| k as usize).filter(|k| *k / shared.toggles == me) else { continue };
                v.acks += 1;
                ack_rec.record_us(now.saturating_sub(shared.sent_us[k].load(Ordering::Relaxed)));
                v.duplicate_acks += u64::from(f.duplicate == Some(true));
            }
            "error" => bump(&mut v.errors, f.code.unwrap_or_else(|| "unknown".into())),
            _ => {}
        }
    }
    v
}
