//! `storm`: a reconnect storm. M members of one group connect and hold what
//! they received; all drop at once; `--missed` messages are posted (service
//! API) while every member is away; then all reconnect at once and `sync`
//! from the last seq they held, paging until `has_more` is false.
//! Figures: the time from the first reconnect to the last member synced,
//! each member's time to synced, handshakes/s of the storm, and any member
//! that missed, repeated or reordered a message. Presence is the server's:
//! a group of at most `limits.presence_max_members` (1,000) has it.

use std::{borrow::Cow, collections::BTreeSet, time::Duration};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};

use crate::{
    Ctx, Fatal, fatal,
    stats::{Counts, SharedHist, bump, merge, now_us, round2},
    sys::{self, CpuMark},
    target,
    ws::{self, Message},
};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Members of the group; every one drops and reconnects.
    #[arg(long, default_value_t = 15_000)]
    pub members: usize,
    /// Messages posted while every member is away (1-10,000).
    #[arg(long, default_value_t = 50)]
    pub missed: u64,
    /// Seconds a member may take from its reconnect to synced.
    #[arg(long, default_value_t = 60)]
    pub sync_timeout_s: u64,
}

/// The fields of a `history` reply (or an `error`) the storm reads.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    messages: Vec<Seq>,
    #[serde(default)]
    has_more: bool,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

/// What one member saw after its reconnect.
#[derive(Default)]
struct Resync {
    /// µs from the storm's start to synced (every missed seq held).
    synced_us: Option<u64>,
    connect_us: Option<u64>,
    /// Seqs got more than once, or below one already got.
    repeated: u64,
    out_of_order: u64,
    missing: u64,
    pages: u64,
    errors: Counts,
}

pub async fn run(ctx: &Ctx, o: &Opts, duration: Duration) -> Result<Value, Fatal> {
    if o.members == 0 || !(1..=10_000).contains(&o.missed) {
        return Err(fatal("--members at least 1, --missed 1..=10000"));
    }
    let deadline = Instant::now() + duration;
    let group = format!("{}-storm", ctx.prefix);
    let users: Vec<String> = (0..o.members).map(|i| format!("{}-s{i}", ctx.prefix)).collect();
    target::put_group(&ctx.http, &ctx.targets[0], &ctx.api_key, &group, "load storm", &users).await?;
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let path = format!("/api/v1/conversations/{group}/messages");
    let post = |k: String| {
        let body = json!({"sender": users[0], "body": format!("storm {k}"), "client_msg_id": k});
        let path = path.clone();
        async move {
            let (status, v) =
                ctx.http.request(Method::POST, &ctx.targets[0], &path, Some(&ctx.api_key), Some(&body)).await?;
            v["seq"].as_u64().filter(|_| status < 300).ok_or_else(|| fatal(format!("POST {path}: {status} {v}")))
        }
    };
    // Everybody connects and keeps the highest seq it got live (what a
    // client `sync`s after); one message goes out to all; then all drop.
    let (drop_tx, drop_rx) = tokio::sync::watch::channel(false);
    let t_ramp = Instant::now();
    let first = crate::ramp(o.members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, quoted, mut go) =
            (ctx.target(i).clone(), tokens[i].clone(), json!(group).to_string(), drop_rx.clone());
        async move {
            let mut ws = ws::open(&target, &token, 4096).await?;
            drop(permit);
            let mut top = 0;
            loop {
                tokio::select! {
                    _ = go.wait_for(|d| *d) => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if let Ok(f) = serde_json::from_str::<ws::Frame>(&t)
                                && f.ty == "message"
                                && f.in_conv(&quoted)
                            {
                                top = top.max(f.seq.unwrap_or(0));
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return Err("closed before the drop".to_string()),
                    }
                }
            }
            let _ = timeout(Duration::from_secs(5), ws.close(None)).await;
            Ok::<u64, String>(top)
        }
    })
    .await;
    let ramp_s = t_ramp.elapsed().as_secs_f64();
    let before = post("before".into()).await?;
    // Live delivery of `before` to everyone, then the drop.
    sleep(Duration::from_secs(1)).await;
    let _ = drop_tx.send(true);
    let mut errors = Counts::new();
    let mut held = vec![0u64; o.members];
    let (mut connected_before, mut saw_live_before) = (0usize, 0usize);
    for (i, h) in first.into_iter().enumerate() {
        match timeout(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(10), h).await {
            Ok(Ok(Ok(top))) => {
                connected_before += 1;
                saw_live_before += (top == before) as usize;
                held[i] = top;
            }
            Ok(Ok(Err(e))) => bump(&mut errors, format!("before_{e}")),
            _ => bump(&mut errors, "before_task"),
        }
    }
    // Let the server notice every close before the messages go out.
    sleep(Duration::from_secs(1)).await;
    let mut last = before;
    for k in 0..o.missed {
        last = post(format!("missed-{k}")).await?;
    }
    if last - before != o.missed {
        return Err(fatal(format!("seqs {before}..={last} for {} messages: another writer in the group", o.missed)));
    }

    // The storm: all reconnect at once and sync after `held`.
    let rss_before = sys::servers_rss_kib(&ctx.server_pids);
    let cpu = CpuMark::now(&ctx.server_pids);
    let connect_hist = SharedHist::default();
    let synced_hist = SharedHist::default();
    let sync_timeout = Duration::from_secs(o.sync_timeout_s.clamp(1, 600));
    let t0_us = now_us();
    let t0 = Instant::now();
    let second = crate::ramp(o.members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, group, held) = (ctx.target(i).clone(), tokens[i].clone(), group.clone(), held[i]);
        let (mut connect_hist, mut synced_hist) = (connect_hist.recorder(), synced_hist.recorder());
        async move {
            let mut r = Resync::default();
            let c0 = now_us();
            let ws = match ws::open(&target, &token, 64 * 1024).await {
                Ok(ws) => ws,
                Err(e) => {
                    bump(&mut r.errors, format!("connect_{e}"));
                    return r;
                }
            };
            r.connect_us = Some(now_us() - c0);
            connect_hist.record_us(now_us() - c0);
            drop(permit);
            let (mut tx, mut rx) = ws.split();
            let mut got = BTreeSet::new();
            let mut top = held;
            let mut after = held;
            let until = Instant::now() + sync_timeout;
            let mut id = 0u64;
            'pages: loop {
                id += 1;
                let sync = json!({"type":"sync","id":id,"conversation":group,"after":after,"limit":200});
                if tx.send(Message::text(sync.to_string())).await.is_err() {
                    bump(&mut r.errors, "send");
                    break;
                }
                loop {
                    let frame = match timeout(until.saturating_duration_since(Instant::now()), rx.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => t,
                        Ok(Some(Ok(_))) => continue,
                        Ok(_) => {
                            bump(&mut r.errors, "closed");
                            break 'pages;
                        }
                        Err(_) => {
                            bump(&mut r.errors, "sync_timeout");
                            break 'pages;
                        }
                    };
                    // Only the fields looked at, borrowed: the tool shares the
                    // cores with the server, and 15,000 pages of 50 messages
                    // read as `Value`s cost it more CPU than the server spent.
                    let Ok(f) = serde_json::from_str::<Page>(&frame) else { continue };
                    match &*f.ty {
                        "history" if f.id == Some(id) => {
                            r.pages += 1;
                            for seq in f.messages.iter().map(|m| m.seq) {
                                if !got.insert(seq) {
                                    r.repeated += 1;
                                } else if seq < top {
                                    r.out_of_order += 1;
                                }
                                top = top.max(seq);
                            }
                            after = top;
                            if !f.has_more {
                                break 'pages;
                            }
                            continue 'pages;
                        }
                        "error" => {
                            bump(&mut r.errors, f.code.as_deref().unwrap_or("unknown").to_string());
                            break 'pages;
                        }
                        _ => {}
                    }
                }
            }
            r.missing = ((held + 1)..=last).filter(|s| !got.contains(s)).count() as u64;
            if r.missing == 0 {
                let us = now_us().saturating_sub(t0_us);
                r.synced_us = Some(us);
                synced_hist.record_us(us);
            }
            let _ = timeout(Duration::from_secs(2), tx.close()).await;
            r
        }
    })
    .await;
    let handshakes_done_s = t0.elapsed().as_secs_f64();
    let (mut synced, mut last_synced_us, mut connected) = (0usize, 0u64, 0usize);
    let (mut repeated, mut out_of_order, mut missing, mut pages) = (0u64, 0u64, 0u64, 0u64);
    for h in second {
        match timeout(deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(10), h).await {
            Ok(Ok(r)) => {
                connected += r.connect_us.is_some() as usize;
                if let Some(us) = r.synced_us {
                    synced += 1;
                    last_synced_us = last_synced_us.max(us);
                }
                repeated += r.repeated;
                out_of_order += r.out_of_order;
                missing += r.missing;
                pages += r.pages;
                merge(&mut errors, r.errors);
            }
            _ => bump(&mut errors, "storm_task"),
        }
    }
    let storm_cpu = cpu.since(&ctx.server_pids);
    Ok(json!({
        "members": o.members,
        "missed": o.missed,
        "connected_before": connected_before,
        "saw_live_before": saw_live_before,
        "first_ramp_s": round2(ramp_s),
        "reconnected": connected,
        "synced": synced,
        "all_synced_s": if synced == o.members { json!(round2(last_synced_us as f64 / 1e6)) } else { Value::Null },
        "last_synced_s": round2(last_synced_us as f64 / 1e6),
        "handshakes_per_s": round2(connected as f64 / handshakes_done_s.max(1e-6)),
        "reconnect_ms": connect_hist.summary(),
        "synced_ms": synced_hist.summary(),
        "sync_pages": pages,
        "missing": missing,
        "repeated": repeated,
        "out_of_order": out_of_order,
        "storm_server_cpu": storm_cpu,
        "rss_kib_before_storm": rss_before,
        "rss_kib_after_storm": sys::servers_rss_kib(&ctx.server_pids),
        "errors": errors,
    }))
}
