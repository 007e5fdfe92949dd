//! `conns`: N authenticated idle connections; handshakes/s, server RSS per
//! connection, connections dropped while idle.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::{
    Ctx, Fatal, MAX_DURATION_S,
    stats::{Counts, Hist, bump, now_us, round2},
    sys::{CpuMark, rss_kib, servers_rss_kib},
    ws::{self, Message},
};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    /// Seconds to hold them open once the ramp is over.
    #[arg(long, default_value_t = 10)]
    pub hold_s: u64,
}

/// What one connection went through.
#[derive(Default)]
struct HoldResult {
    /// Handshake time in µs, or why it failed.
    connect: Option<Result<u64, String>>,
    /// Why it ended during the hold.
    dropped: Option<String>,
    frames: u64,
}

pub async fn run(ctx: &Ctx, opts: &Opts, duration: Duration) -> Result<Value, Fatal> {
    let n = opts.n;
    let hold_s = opts.hold_s.min(MAX_DURATION_S);
    let deadline = Instant::now() + duration;
    let users: Vec<String> = (0..n).map(|i| format!("{}-c{i}", ctx.prefix)).collect();
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let rss_before = servers_rss_kib(&ctx.server_pids);
    let stop = CancellationToken::new();
    let established = Arc::new(AtomicUsize::new(0));
    crate::progress("connected", established.clone(), n, stop.clone());
    let ramp_start = Instant::now();
    let cpu = CpuMark::now(&ctx.server_pids);
    let handles = crate::ramp(n, ctx.concurrency, deadline, |i, permit| {
        let (target, token, stop, established) =
            (ctx.target(i).clone(), tokens[i].clone(), stop.clone(), established.clone());
        async move {
            let mut r = HoldResult::default();
            let t0 = now_us();
            let ws = ws::open(&target, &token, 4096).await;
            // Counted before the permit goes: the ramp is over when every permit is back.
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    r.connect = Some(Err(e));
                    return r;
                }
            };
            r.connect = Some(Ok(now_us() - t0));
            established.fetch_add(1, Ordering::Relaxed);
            drop(permit);
            // Hold: keep reading (tungstenite answers the server's pings).
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Close(f))) => { r.dropped = Some(ws::close_key(f)); break }
                        Some(Ok(_)) => r.frames += 1,
                        Some(Err(e)) => { r.dropped = Some(ws::classify(e)); break }
                        None => { r.dropped = Some("eof".into()); break }
                    }
                }
            }
            if r.dropped.is_none() {
                let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
            }
            r
        }
    })
    .await;
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let ramp_cpu = cpu.since(&ctx.server_pids);
    let up = established.load(Ordering::Relaxed);
    eprintln!("ramp: {up}/{n} connected in {ramp_s:.1} s; holding {hold_s} s");
    let hold_until = (Instant::now() + Duration::from_secs(hold_s)).min(deadline.max(Instant::now()));
    sleep(Duration::from_secs(1).min(hold_until.saturating_duration_since(Instant::now()))).await;
    let rss_after_ramp = servers_rss_kib(&ctx.server_pids);
    sleep_until(hold_until).await;
    let rss_after_hold = servers_rss_kib(&ctx.server_pids);
    let client_rss = rss_kib("self");
    stop.cancel();

    let mut hs = Hist::default();
    let mut failures = Counts::new();
    let mut dropped = Counts::new();
    let mut frames = 0;
    let started = handles.len();
    for h in handles {
        let Ok(Ok(r)) = timeout(Duration::from_secs(10), h).await else { continue };
        match r.connect {
            Some(Ok(us)) => hs.record_us(us),
            Some(Err(e)) => bump(&mut failures, e),
            None => {}
        }
        if let Some(d) = r.dropped {
            bump(&mut dropped, d);
        }
        frames += r.frames;
    }
    let ok = hs.count() as usize;
    let per_conn = match (rss_before, rss_after_hold) {
        (Some(b), Some(a)) if ok > 0 => json!(round2((a as f64 - b as f64) / ok as f64)),
        _ => Value::Null,
    };
    let dropped_n: u64 = dropped.values().sum();
    Ok(json!({
        "requested": n,
        "attempted": started,
        "established": ok,
        "failed": started - ok,
        "not_attempted": n - started,
        "failures": failures,
        "ramp_s": round2(ramp_s),
        "ramp_cpu": ramp_cpu,
        "handshakes_per_s": round2(ok as f64 / ramp_s.max(1e-6)),
        "handshake_ms": hs.summary(),
        "hold_s": hold_s,
        "dropped_during_hold": dropped,
        "open_at_end": ok as u64 - dropped_n,
        "frames_received_while_idle": frames,
        "server_rss_kib": {"before": rss_before, "after_ramp": rss_after_ramp, "after_hold": rss_after_hold},
        "server_rss_per_conn_kib": per_conn,
        "client_rss_kib": client_rss,
        "concurrency": ctx.concurrency,
    }))
}
