//! `pairs`: P direct conversations `dm:<a>:<b>` ping-ponging (a sends, b
//! replies on receipt, and so on); round trips/s and latency.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::{
    Ctx, Fatal, fatal,
    stats::{Counts, Recorder, SeqTrack, SharedHist, bump, merge, now_us, round2},
    sys::CpuMark,
    ws::{self, Frame, Message, Ws, WsRx, WsTx},
};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Number of pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Seconds allowed for tokens and connections before the ping-pong starts.
    #[arg(long, default_value_t = 60)]
    pub setup_timeout_s: u64,
    /// Seconds a round trip may take before it counts as timed out (and the next starts).
    #[arg(long, default_value_t = 5)]
    pub rt_timeout_s: u64,
    /// Shape of each send's `client_msg_id`: `uuid`, random-looking v4 UUIDs
    /// as `chat.js` sends (the durable store's idempotency index then takes
    /// them at random places, as in production); `counter`, `<prefix>-p<i><side><n>`
    /// (this tool's ids before issue 20: nearly in order, so cheaper to index).
    #[arg(long, value_enum, default_value_t = CmidShape::Uuid)]
    pub cmid: CmidShape,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmidShape {
    Uuid,
    Counter,
}

pub async fn run(ctx: &Ctx, opts: &Opts, duration: Duration) -> Result<Value, Fatal> {
    let pairs = opts.pairs;
    let setup_timeout = Duration::from_secs(opts.setup_timeout_s.clamp(1, 600));
    let rt_timeout = Duration::from_secs(opts.rt_timeout_s.clamp(1, 60));
    let setup_deadline = Instant::now() + setup_timeout;
    // a < b byte-wise: same prefix, then 'a' < 'b'.
    let users: Vec<String> =
        (0..pairs).flat_map(|i| [format!("{}-a{i}", ctx.prefix), format!("{}-b{i}", ctx.prefix)]).collect();
    let tokens = timeout(setup_timeout, ctx.tokens(&users, duration.as_secs() + 3600))
        .await
        .map_err(|_| fatal("setup timeout while getting tokens"))??;
    let (conns, connect_failures, connected) = connect(ctx, &users, &tokens, setup_deadline).await;
    eprintln!("{connected} of {} clients connected; ping-pong for {} s", users.len(), duration.as_secs());

    let start = Instant::now();
    let cpu = CpuMark::now(&ctx.server_pids);
    let rtt = SharedHist::default();
    let one_way = SharedHist::default();
    let mut tasks = Vec::new();
    let mut pairs_up = 0;
    let mut it = conns.into_iter();
    for i in 0..pairs {
        let (Some(Some(a)), Some(Some(b))) = (it.next(), it.next()) else { continue };
        pairs_up += 1;
        let pair = Pair {
            i,
            prefix: ctx.prefix.clone(),
            conv: format!("dm:{}:{}", users[2 * i], users[2 * i + 1]),
            until: start + duration,
            rt_timeout,
            cmid: opts.cmid,
        };
        tasks.push(tokio::spawn(pair.run(a, b, rtt.recorder(), one_way.recorder())));
    }
    let (mut rts, mut timeouts, mut rate_limited, mut lost, mut dup, mut ooo, mut stored) = (0, 0, 0, 0, 0, 0, 0);
    let mut errors = Counts::new();
    for (k, v) in connect_failures {
        errors.insert(format!("connect_{k}"), v);
    }
    for t in tasks {
        match timeout(duration + rt_timeout + Duration::from_secs(10), t).await {
            Ok(Ok(s)) => {
                rts += s.round_trips;
                timeouts += s.timeouts;
                rate_limited += s.rate_limited;
                stored += s.stored;
                for tr in [&s.a, &s.b] {
                    lost += s.stored.saturating_sub(tr.distinct);
                    dup += tr.dup;
                    ooo += tr.out_of_order;
                }
                merge(&mut errors, s.errors);
            }
            _ => bump(&mut errors, "pair_task"),
        }
    }
    let run_cpu = cpu.since(&ctx.server_pids);
    let elapsed = start.elapsed().as_secs_f64().min(duration.as_secs_f64() + rt_timeout.as_secs_f64());
    let ping_pong_s = duration.as_secs_f64().min(elapsed);
    let mut limited_by = Vec::<String>::new();
    if rate_limited > 0 {
        limited_by.push(format!(
            "server per-user send limit: {rate_limited} sends answered rate_limited (limits.send_per_s / send_burst, \
             default 50/s burst 100 per user per node)"
        ));
    }
    Ok(json!({
        "pairs": pairs,
        "pairs_connected": pairs_up,
        "duration_s": duration.as_secs(),
        "round_trips": rts,
        "round_trips_per_s": round2(rts as f64 / ping_pong_s.max(1e-6)),
        "rtt": rtt.summary(),
        "cpu": run_cpu,
        "one_way": one_way.summary(),
        "messages_stored": stored,
        "timeouts": timeouts,
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "rate_limited": rate_limited,
        "limited_by": limited_by,
        "errors": errors,
    }))
}

/// Connects every user by `setup_deadline`: one slot per user (`None`: not
/// connected), why connections failed, and how many succeeded.
async fn connect(
    ctx: &Ctx,
    users: &[String],
    tokens: &[String],
    setup_deadline: Instant,
) -> (Vec<Option<Ws>>, Counts, usize) {
    let connected = Arc::new(AtomicUsize::new(0));
    let progress_stop = CancellationToken::new();
    crate::progress("connected", connected.clone(), users.len(), progress_stop.clone());
    let handles = crate::ramp(users.len(), ctx.concurrency, setup_deadline, |i, permit| {
        let (target, token, connected) = (ctx.target(i).clone(), tokens[i].clone(), connected.clone());
        async move {
            let r = ws::open(&target, &token, 16 * 1024).await;
            if r.is_ok() {
                connected.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            r
        }
    })
    .await;
    progress_stop.cancel();
    let mut conns = Vec::new();
    let mut failures = Counts::new();
    for h in handles {
        match h.await {
            Ok(Ok(ws)) => conns.push(Some(ws)),
            Ok(Err(e)) => {
                bump(&mut failures, e);
                conns.push(None);
            }
            Err(e) => {
                bump(&mut failures, e.to_string());
                conns.push(None);
            }
        }
    }
    conns.resize_with(users.len(), || None);
    (conns, failures, connected.load(Ordering::Relaxed))
}

/// One pair's figures.
struct PairStats {
    rtt: Recorder,
    one_way: Recorder,
    round_trips: u64,
    timeouts: u64,
    rate_limited: u64,
    errors: Counts,
    a: SeqTrack,
    b: SeqTrack,
    stored: u64,
}

struct PairSide {
    tx: WsTx,
    rx: WsRx,
}

/// What became of the next ping.
enum Next {
    /// The run's time is up: drain instead.
    Drain,
    /// Sent at (µs since the epoch, and on the monotonic clock).
    Sent(u64, Instant),
    Failed,
}

/// One pair's conversation and schedule.
struct Pair {
    i: usize,
    prefix: String,
    conv: String,
    /// Ping-pong until then.
    until: Instant,
    rt_timeout: Duration,
    cmid: CmidShape,
}

/// A v4-UUID-shaped id that looks random but is a function of `key`, so a
/// side can recognise the other's message by recomputing it.
fn uuid_like(key: &impl std::hash::Hash) -> String {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let build = BuildHasherDefault::<DefaultHasher>::default();
    let hi = build.hash_one(key);
    let lo = build.hash_one((hi, key));
    let bytes = ((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes();
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

impl Pair {
    fn cmid(&self, side: char, n: u64) -> String {
        match self.cmid {
            CmidShape::Counter => format!("{}-p{}{side}{n}", self.prefix, self.i),
            CmidShape::Uuid => uuid_like(&(&self.prefix, self.i, side, n)),
        }
    }

    fn frame(&self, side: char, n: u64) -> String {
        format!(
            r#"{{"type":"send","id":{n},"conversation":"{}","client_msg_id":"{}","body":"t={};n={n}"}}"#,
            self.conv,
            self.cmid(side, n),
            now_us()
        )
    }

    /// Sends ping `n + 1` from side a, unless the run's time is up.
    async fn next_ping(&self, a: &mut PairSide, n: &mut u64, st: &mut PairStats) -> Next {
        if Instant::now() >= self.until {
            return Next::Drain;
        }
        *n += 1;
        let at = (now_us(), Instant::now());
        if a.tx.send(Message::text(self.frame('a', *n))).await.is_err() {
            bump(&mut st.errors, "send_failed");
            return Next::Failed;
        }
        Next::Sent(at.0, at.1)
    }

    /// Ping-pong until `until`, then a short drain so every message reached
    /// both sides.
    async fn run(self, a: Ws, b: Ws, rtt: Recorder, one_way: Recorder) -> PairStats {
        let mut st = PairStats {
            rtt,
            one_way,
            round_trips: 0,
            timeouts: 0,
            rate_limited: 0,
            errors: Counts::new(),
            a: SeqTrack::default(),
            b: SeqTrack::default(),
            stored: 0,
        };
        let quoted = format!("\"{}\"", self.conv);
        let (atx, arx) = a.split();
        let (btx, brx) = b.split();
        let mut a = PairSide { tx: atx, rx: arx };
        let mut b = PairSide { tx: btx, rx: brx };
        let mut n: u64 = 0;
        let mut ping_at = now_us();
        // Waiting for: b to see ping n ('a'), or a to see reply n ('b'); None: done.
        let mut waiting: Option<char> = Some('a');
        let mut since = Instant::now();
        if a.tx.send(Message::text(self.frame('a', n))).await.is_err() {
            bump(&mut st.errors, "send_failed");
            return st;
        }
        let mut drain_until: Option<Instant> = None;
        loop {
            if let Some(d) = drain_until
                && (Instant::now() >= d || (st.a.distinct >= st.stored && st.b.distinct >= st.stored))
            {
                break;
            }
            let wake = drain_until.unwrap_or(since + self.rt_timeout);
            let (side, m) = tokio::select! {
                m = a.rx.next() => ('a', m),
                m = b.rx.next() => ('b', m),
                _ = sleep_until(wake) => {
                    if drain_until.is_some() {
                        break;
                    }
                    st.timeouts += 1;
                    match self.next_ping(&mut a, &mut n, &mut st).await {
                        Next::Drain => drain_until = Some(Instant::now() + Duration::from_secs(2)),
                        Next::Sent(at, mono) => (ping_at, waiting, since) = (at, Some('a'), mono),
                        Next::Failed => break,
                    }
                    continue;
                }
            };
            let text = match m {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => {
                    bump(&mut st.errors, ws::close_key(f));
                    break;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    bump(&mut st.errors, ws::classify(e));
                    break;
                }
                None => {
                    bump(&mut st.errors, "eof");
                    break;
                }
            };
            let now = now_us();
            let Ok(f) = serde_json::from_str::<Frame>(&text) else { continue };
            match &*f.ty {
                "message" if f.in_conv(&quoted) => {
                    let Some(seq) = f.seq else { continue };
                    let track = if side == 'a' { &mut st.a } else { &mut st.b };
                    track.see(seq);
                    let from = f.client_msg_id.as_deref().unwrap_or("");
                    let from_other = (side == 'b' && waiting == Some('a') && from == self.cmid('a', n))
                        || (side == 'a' && waiting == Some('b') && from == self.cmid('b', n));
                    if !from_other {
                        continue;
                    }
                    if let Some(t) = f.sent_us() {
                        st.one_way.record_us(now.saturating_sub(t));
                    }
                    if side == 'b' {
                        // b got the ping: reply.
                        waiting = Some('b');
                        if b.tx.send(Message::text(self.frame('b', n))).await.is_err() {
                            bump(&mut st.errors, "send_failed");
                            break;
                        }
                    } else {
                        // a got the reply: one round trip.
                        st.rtt.record_us(now.saturating_sub(ping_at));
                        st.round_trips += 1;
                        match self.next_ping(&mut a, &mut n, &mut st).await {
                            Next::Drain => {
                                waiting = None;
                                drain_until = Some(Instant::now() + Duration::from_secs(2));
                            }
                            Next::Sent(at, mono) => (ping_at, waiting, since) = (at, Some('a'), mono),
                            Next::Failed => break,
                        }
                    }
                }
                "ack" if f.in_conv(&quoted) => st.stored = st.stored.max(f.seq.unwrap_or(0)),
                "error" => {
                    let code = f.code.as_deref().unwrap_or("unknown");
                    if code == "rate_limited" {
                        st.rate_limited += 1;
                        sleep(Duration::from_millis(f.retry_after_ms.unwrap_or(100) + 1)).await;
                        // Retry the same message (same client_msg_id).
                        let s = if side == 'a' { &mut a } else { &mut b };
                        let retry_n = f.id.unwrap_or(n);
                        if s.tx.send(Message::text(self.frame(side, retry_n))).await.is_err() {
                            bump(&mut st.errors, "send_failed");
                            break;
                        }
                        since = Instant::now();
                    } else {
                        bump(&mut st.errors, code);
                    }
                }
                _ => {}
            }
        }
        let _ = timeout(Duration::from_secs(1), a.tx.close()).await;
        let _ = timeout(Duration::from_secs(1), b.tx.close()).await;
        st
    }
}

#[cfg(test)]
mod tests {
    use super::uuid_like;

    #[test]
    fn uuid_like_ids_are_v4_shaped_repeatable_and_distinct() {
        let a = uuid_like(&("run", 3usize, 'a', 7u64));
        assert_eq!(a, uuid_like(&("run", 3usize, 'a', 7u64)), "the other side recomputes it");
        assert_ne!(a, uuid_like(&("run", 3usize, 'b', 7u64)));
        assert_ne!(a, uuid_like(&("run", 3usize, 'a', 8u64)));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{a}");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{a}");
        assert!(parts[2].starts_with('4'), "version 4: {a}");
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'), "RFC 4122 variant: {a}");
        // Spread over the whole id space, not counting up.
        let firsts: std::collections::HashSet<char> =
            (0..64u64).map(|n| uuid_like(&("run", 0usize, 'a', n)).chars().next().unwrap()).collect();
        assert!(firsts.len() > 8, "{firsts:?}");
    }
}
