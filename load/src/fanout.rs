//! `fanout`: one group of M members, S of them send K messages in total at R
//! messages/s; delivery, loss, duplicates, order and latency at every member.
//!
//! Phases: the group and tokens, the ramp (every member connected; senders hand
//! their writing half to a sending task), the settle pause, the sends, the
//! drain (until every member saw every stored message, or nothing new came
//! for `--drain-s`), then the figures of every member.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Ctx, Fatal, MAX_MESSAGES, fatal,
    stats::{Counts, Recorder, SeqTrack, SharedHist, bump, merge, now_us, round2},
    sys::CpuMark,
    target,
    ws::{self, Frame, Message, WsRx, WsTx},
};

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Members of the group (all connected; the first S send).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members that send.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages in total.
    #[arg(long, default_value_t = 1000)]
    pub messages: usize,
    /// Messages per second in total (spread over the senders).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Pad bodies to about this many bytes (0: just the timestamp).
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Milliseconds to wait after the ramp (presence storms settle) before sending.
    #[arg(long, default_value_t = 1000)]
    pub settle_ms: u64,
    /// Seconds without a new delivery after which missing deliveries count as lost.
    #[arg(long, default_value_t = 5)]
    pub drain_s: u64,
}

impl Opts {
    /// Refuses options out of bounds; caps the waits.
    fn checked(&self) -> Result<Opts, Fatal> {
        if self.messages == 0 || self.messages > MAX_MESSAGES {
            return Err(fatal(format!("--messages must be 1..={MAX_MESSAGES}")));
        }
        if self.body_bytes > 3900 {
            return Err(fatal("--body-bytes must be at most 3900 (limits.max_body_chars is 4000 by default)"));
        }
        if self.senders == 0 || self.senders > self.members {
            return Err(fatal("--senders must be between 1 and --members"));
        }
        if !(self.rate > 0.0 && self.rate <= 1e6) {
            return Err(fatal("--rate must be in (0, 1000000]"));
        }
        Ok(Opts { settle_ms: self.settle_ms.min(60_000), drain_s: self.drain_s.min(600), ..self.clone() })
    }

    /// The messages sender `s` sends: s, s + S, s + 2S, ...
    fn messages_of(&self, sender: usize) -> usize {
        self.messages.saturating_sub(sender).div_ceil(self.senders)
    }
}

const PENDING: u8 = 0;
const ACKED: u8 = 1;
const FAILED: u8 = 2;

/// What every member's tasks share.
struct FanShared {
    group_quoted: String,
    /// Per message: last send time (µs) and state.
    send_us: Vec<AtomicU64>,
    state: Vec<AtomicU8>,
    /// Distinct deliveries over all receivers.
    delivered: AtomicU64,
    last_delivery_us: AtomicU64,
    max_acked_seq: AtomicU64,
    /// Send to delivery, at every member.
    latency: SharedHist,
    /// Send to ack, at the senders.
    ack_latency: SharedHist,
}

impl FanShared {
    fn count(&self, state: u8) -> u64 {
        self.state.iter().filter(|s| s.load(Ordering::Relaxed) == state).count() as u64
    }
}

/// What a sender's own connection reports to its sending task.
enum SenderNote {
    RateLimited {
        k: usize,
        retry_after_ms: u64,
    },
    /// Acked or failed for good.
    Answered(usize),
}

/// A sender's connection, as its receiving side hands it to the sending task:
/// sender index, writing half, notes, messages not answered yet.
type SenderSide = (usize, WsTx, mpsc::UnboundedReceiver<SenderNote>, Arc<AtomicUsize>);

pub async fn run(ctx: &Ctx, opts: &Opts, duration: Duration) -> Result<Value, Fatal> {
    let o = opts.checked()?;
    let deadline = Instant::now() + duration;
    let group = format!("{}-fanout", ctx.prefix);
    let users: Vec<String> = (0..o.members).map(|i| format!("{}-m{i}", ctx.prefix)).collect();
    target::put_group(&ctx.http, &ctx.targets[0], &ctx.api_key, &group, "load fanout", &users).await?;
    let tokens = ctx.tokens(&users, duration.as_secs() + 3600).await?;
    let shared = Arc::new(FanShared {
        group_quoted: format!("\"{group}\""),
        send_us: (0..o.messages).map(|_| AtomicU64::new(0)).collect(),
        state: (0..o.messages).map(|_| AtomicU8::new(PENDING)).collect(),
        delivered: AtomicU64::new(0),
        last_delivery_us: AtomicU64::new(0),
        max_acked_seq: AtomicU64::new(0),
        latency: SharedHist::default(),
        ack_latency: SharedHist::default(),
    });
    let stop = CancellationToken::new();
    let members = connect_members(ctx, &o, &tokens, &shared, &stop, deadline).await;
    let up = members.up;
    sleep(Duration::from_millis(o.settle_ms).min(deadline.saturating_duration_since(Instant::now()))).await;

    // Send.
    let t0 = Instant::now();
    let first_send_us = now_us();
    let cpu = CpuMark::now(&ctx.server_pids);
    let delivered_progress = delivered_progress(shared.clone(), stop.clone());
    let sent = send_all(ctx, &o, &group, members.sides, &shared, t0, deadline).await;
    let send_s = (sent.stats.last_send_us.saturating_sub(first_send_us)) as f64 / 1e6;
    // Wait for the deliveries: every member should see every stored message.
    let stored = shared.max_acked_seq.load(Ordering::Relaxed);
    drain(&shared, stored * up as u64, Duration::from_secs(o.drain_s), deadline).await;
    let run_cpu = cpu.since(&ctx.server_pids);
    stop.cancel();
    delivered_progress.abort();

    let mut r = collect(members.handles, stored).await;
    merge(&mut r.errors, sent.errors);
    let failed_msgs = shared.count(FAILED);
    let unacked = shared.count(PENDING);
    let unconnected_senders_msgs = sent.unconnected_senders_msgs.min(unacked);
    let last_delivery = shared.last_delivery_us.load(Ordering::Relaxed);
    let delivery_s = last_delivery.saturating_sub(first_send_us) as f64 / 1e6;
    let mut limited_by = Vec::<String>::new();
    if r.rate_limited > 0 {
        limited_by.push(format!(
            "server per-user send limit: {} sends answered rate_limited (limits.send_per_s / send_burst, \
             default 50/s burst 100 per user per node; each sender was asked for {:.1}/s)",
            r.rate_limited,
            o.rate / o.senders as f64
        ));
    }
    let sent = sent.stats;
    if send_s > 0.0 && (sent.sent as f64 / send_s) < o.rate * 0.9 && o.messages as f64 / o.rate > 1.0 {
        limited_by.push(format!(
            "sending fell behind the schedule: {:.0}/s achieved of {}/s asked",
            sent.sent as f64 / send_s,
            o.rate
        ));
    }
    if r.ended.contains_key("close_1013") {
        limited_by.push("slow consumers: the server closed connections 1013 (outbound queue full)".into());
    }
    Ok(json!({
        "members": o.members,
        "members_connected": up,
        "senders": o.senders,
        "messages": o.messages,
        "rate_asked": o.rate,
        "ramp_s": round2(members.ramp_s),
        "sent_frames": sent.sent,
        "retries": sent.retries,
        "unsent": sent.unsent,
        "unsent_no_sender_connection": unconnected_senders_msgs,
        "acked": r.acks - r.dup_acks,
        "duplicate_acks": r.dup_acks,
        "failed": failed_msgs,
        "unacked": unacked,
        "stored_last_seq": stored,
        "send_s": round2(send_s),
        "send_rate_achieved": round2(if send_s > 0.0 { sent.sent as f64 / send_s } else { 0.0 }),
        "expected_deliveries": (o.messages * o.members) as u64,
        "expected_deliveries_of_stored": stored * r.receivers,
        "delivered": r.delivered,
        "lost": r.lost,
        "duplicated": r.dup,
        "out_of_order": r.ooo,
        "deliveries_per_s": round2(if delivery_s > 0.0 { r.delivered as f64 / delivery_s } else { 0.0 }),
        "delivery_window_s": round2(delivery_s),
        "cpu": run_cpu,
        "latency": shared.latency.summary(),
        "ack_latency": shared.ack_latency.summary(),
        "rate_limited": r.rate_limited,
        "limited_by": limited_by,
        "errors": r.errors,
        "other_frames": r.other,
        "body_bytes": o.body_bytes,
    }))
}

// ---------------------------------------------------------------- ramp

/// The members' connections after the ramp.
struct Members {
    /// One receiving task per member started (its figures, or why it did not connect).
    handles: Vec<JoinHandle<Result<RecvStats, String>>>,
    /// The connected senders' writing halves.
    sides: Vec<SenderSide>,
    up: usize,
    ramp_s: f64,
}

/// Connects every member; each connection's reading half goes to a receiving
/// task, a sender's writing half comes back in [`Members::sides`].
async fn connect_members(
    ctx: &Ctx,
    o: &Opts,
    tokens: &[String],
    shared: &Arc<FanShared>,
    stop: &CancellationToken,
    deadline: Instant,
) -> Members {
    let progress_stop = CancellationToken::new();
    let connected = Arc::new(AtomicUsize::new(0));
    crate::progress("connected", connected.clone(), o.members, progress_stop.clone());
    // Sender connections hand their writing half (and note channel) to the sending tasks.
    let (side_tx, mut side_rx) = mpsc::unbounded_channel::<SenderSide>();
    let ramp_start = Instant::now();
    let handles = crate::ramp(o.members, ctx.concurrency, deadline, |i, permit| {
        let (target, token, shared, stop, connected, side_tx) = (
            ctx.target(i).clone(),
            tokens[i].clone(),
            shared.clone(),
            stop.clone(),
            connected.clone(),
            side_tx.clone(),
        );
        let own = (i < o.senders).then(|| o.messages_of(i));
        async move {
            let ws = ws::open(&target, &token, 64 * 1024).await?;
            connected.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = ws.split();
            let (notes, pending) = if let Some(own) = own {
                let (ntx, nrx) = mpsc::unbounded_channel();
                let pending = Arc::new(AtomicUsize::new(own));
                let _ = side_tx.send((i, tx, nrx, pending.clone()));
                (Some(ntx), Some(pending))
            } else {
                drop(tx);
                (None, None)
            };
            drop(side_tx);
            // Counted (and a sender's side handed over) before the permit goes.
            drop(permit);
            Ok::<_, String>(receive(rx, shared, notes, pending, stop).await)
        }
    })
    .await;
    drop(side_tx);
    progress_stop.cancel();
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let up = connected.load(Ordering::Relaxed);
    let mut sides = Vec::new();
    while let Ok(s) = side_rx.try_recv() {
        sides.push(s);
    }
    eprintln!("ramp: {up}/{} members connected in {ramp_s:.1} s ({} senders)", o.members, sides.len());
    Members { handles, sides, up, ramp_s }
}

// ---------------------------------------------------------------- receiving

/// One member's figures.
struct RecvStats {
    track: SeqTrack,
    latency: Recorder,
    ack_latency: Recorder,
    acks: u64,
    duplicate_acks: u64,
    rate_limited: u64,
    errors: Counts,
    other_frames: Counts,
    ended: Option<String>,
}

/// Reads one member's connection until `stop`.
async fn receive(
    mut rx: WsRx,
    shared: Arc<FanShared>,
    notes: Option<mpsc::UnboundedSender<SenderNote>>,
    pending: Option<Arc<AtomicUsize>>,
    stop: CancellationToken,
) -> RecvStats {
    let mut s = RecvStats {
        track: SeqTrack::default(),
        latency: shared.latency.recorder(),
        ack_latency: shared.ack_latency.recorder(),
        acks: 0,
        duplicate_acks: 0,
        rate_limited: 0,
        errors: Counts::new(),
        other_frames: Counts::new(),
        ended: None,
    };
    loop {
        let m = tokio::select! {
            biased;
            m = rx.next() => m,
            _ = stop.cancelled() => break,
        };
        let text = match m {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                s.ended = Some(ws::close_key(f));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                s.ended = Some(ws::classify(e));
                break;
            }
            None => {
                s.ended = Some("eof".into());
                break;
            }
        };
        let now = now_us();
        let Ok(f) = serde_json::from_str::<Frame>(&text) else {
            bump(&mut s.other_frames, "unparseable");
            continue;
        };
        match &*f.ty {
            "message" if f.in_conv(&shared.group_quoted) => {
                let Some(seq) = f.seq else { continue };
                if s.track.see(seq) {
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
                    shared.last_delivery_us.fetch_max(now, Ordering::Relaxed);
                    if let Some(t) = f.sent_us() {
                        s.latency.record_us(now.saturating_sub(t));
                    }
                }
            }
            "ack" if f.in_conv(&shared.group_quoted) => {
                let Some(k) = f.id.map(|k| k as usize).filter(|k| *k < shared.state.len()) else { continue };
                s.acks += 1;
                if f.duplicate == Some(true) {
                    s.duplicate_acks += 1;
                }
                s.ack_latency.record_us(now.saturating_sub(shared.send_us[k].load(Ordering::Relaxed)));
                if let Some(n) = &notes {
                    let _ = n.send(SenderNote::Answered(k));
                }
                shared.max_acked_seq.fetch_max(f.seq.unwrap_or(0), Ordering::Relaxed);
                if shared.state[k].swap(ACKED, Ordering::AcqRel) == PENDING
                    && let Some(p) = &pending
                {
                    p.fetch_sub(1, Ordering::AcqRel);
                }
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("unknown").to_string();
                let k = f.id.map(|k| k as usize).filter(|k| *k < shared.state.len());
                match (code.as_str(), k, &notes) {
                    ("rate_limited", Some(k), Some(notes)) => {
                        s.rate_limited += 1;
                        let _ =
                            notes.send(SenderNote::RateLimited { k, retry_after_ms: f.retry_after_ms.unwrap_or(100) });
                    }
                    _ => {
                        bump(&mut s.errors, code);
                        if let (Some(k), Some(n)) = (k, &notes) {
                            let _ = n.send(SenderNote::Answered(k));
                        }
                        if let Some(k) = k
                            && shared.state[k]
                                .compare_exchange(PENDING, FAILED, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            && let Some(p) = &pending
                        {
                            p.fetch_sub(1, Ordering::AcqRel);
                        }
                    }
                }
            }
            other => bump(&mut s.other_frames, other),
        }
    }
    s
}

/// Prints the deliveries so far to stderr every second until `stop`.
fn delivered_progress(shared: Arc<FanShared>, stop: CancellationToken) -> JoinHandle<()> {
    crate::every_second(stop, move || {
        format!(
            "delivered {} (acked seq {})",
            shared.delivered.load(Ordering::Relaxed),
            shared.max_acked_seq.load(Ordering::Relaxed)
        )
    })
}

/// Waits until `expected` deliveries, `deadline`, or `drain` without a new one.
async fn drain(shared: &FanShared, expected: u64, drain: Duration, deadline: Instant) {
    let mut last = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        if d >= expected || Instant::now() >= deadline {
            break;
        }
        if d != last.0 {
            last = (d, Instant::now());
        } else if last.1.elapsed() >= drain {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Every member's figures, summed.
#[derive(Default)]
struct Received {
    receivers: u64,
    delivered: u64,
    dup: u64,
    ooo: u64,
    lost: u64,
    acks: u64,
    dup_acks: u64,
    rate_limited: u64,
    errors: Counts,
    ended: Counts,
    other: Counts,
}

/// Joins the receiving tasks; a member lost the stored seqs (1..=`stored`) it never saw.
async fn collect(handles: Vec<JoinHandle<Result<RecvStats, String>>>, stored: u64) -> Received {
    let mut r = Received::default();
    let mut connect_failures = Counts::new();
    for h in handles {
        match timeout(Duration::from_secs(10), h).await {
            Ok(Ok(Ok(s))) => {
                r.receivers += 1;
                r.delivered += s.track.distinct;
                r.dup += s.track.dup;
                r.ooo += s.track.out_of_order;
                // Seqs at or below the last acked one that this member never saw.
                let seen_le_stored = (1..=stored).filter(|&q| s.track.saw(q)).count() as u64;
                r.lost += stored - seen_le_stored;
                r.acks += s.acks;
                r.dup_acks += s.duplicate_acks;
                r.rate_limited += s.rate_limited;
                merge(&mut r.errors, s.errors);
                merge(&mut r.other, s.other_frames);
                if let Some(e) = s.ended {
                    bump(&mut r.ended, e);
                }
            }
            Ok(Ok(Err(e))) => bump(&mut connect_failures, e),
            _ => bump(&mut r.errors, "receiver_task"),
        }
    }
    // Connections the server closed during the run are errors (1013: slow consumer).
    for (k, v) in &r.ended {
        *r.errors.entry(k.clone()).or_default() += v;
    }
    for (k, v) in &connect_failures {
        *r.errors.entry(format!("connect_{k}")).or_default() += v;
    }
    r
}

// ---------------------------------------------------------------- sending

#[derive(Default)]
struct SendStats {
    sent: u64,
    retries: u64,
    unsent: u64,
    last_send_us: u64,
    error: Option<String>,
}

/// One sender's schedule.
struct SendPlan {
    sender: usize,
    senders: usize,
    messages: usize,
    rate: f64,
    t0: Instant,
    deadline: Instant,
    /// After the last first send: how long to wait for outstanding acks.
    ack_grace: Duration,
    acks_by: Instant,
    pad: String,
    prefix: String,
    group: String,
}

impl SendPlan {
    fn frame(&self, k: usize, shared: &FanShared) -> String {
        let t = now_us();
        shared.send_us[k].store(t, Ordering::Relaxed);
        format!(
            r#"{{"type":"send","id":{k},"conversation":"{}","client_msg_id":"{}-{k}","body":"t={t};k={k}{}"}}"#,
            self.group, self.prefix, self.pad
        )
    }
}

/// What the sending tasks did, summed.
struct Sent {
    stats: SendStats,
    errors: Counts,
    /// Messages of senders that never connected.
    unconnected_senders_msgs: u64,
}

/// Runs one sending task per connected sender to the end; the schedule starts at `t0`.
async fn send_all(
    ctx: &Ctx,
    o: &Opts,
    group: &str,
    sides: Vec<SenderSide>,
    shared: &Arc<FanShared>,
    t0: Instant,
    deadline: Instant,
) -> Sent {
    let pad: String = "x".repeat(o.body_bytes.saturating_sub(24));
    eprintln!("sending {} messages at {}/s from {} senders", o.messages, o.rate, sides.len());
    let unconnected_senders_msgs =
        (0..o.senders).filter(|s| !sides.iter().any(|(i, ..)| i == s)).map(|s| o.messages_of(s) as u64).sum::<u64>();
    let mut send_handles = Vec::new();
    for (i, tx, nrx, pending) in sides {
        let plan = SendPlan {
            sender: i,
            senders: o.senders,
            messages: o.messages,
            rate: o.rate,
            t0,
            deadline,
            ack_grace: Duration::from_secs(o.drain_s.max(1)),
            acks_by: deadline,
            pad: pad.clone(),
            prefix: ctx.prefix.clone(),
            group: group.to_string(),
        };
        send_handles.push(tokio::spawn(send(plan, tx, nrx, pending, shared.clone())));
    }
    let mut stats = SendStats::default();
    let mut errors = Counts::new();
    for h in send_handles {
        if let Ok(s) = h.await {
            stats.sent += s.sent;
            stats.retries += s.retries;
            stats.unsent += s.unsent;
            stats.last_send_us = stats.last_send_us.max(s.last_send_us);
            if let Some(e) = s.error {
                bump(&mut errors, format!("send_{e}"));
            }
        }
    }
    Sent { stats, errors, unconnected_senders_msgs }
}

/// One sender: its messages k = sender, sender + S, ... go at t0 + k/R. A
/// `rate_limited` answer pauses it for `retry_after_ms`, the message is retried,
/// and from then on the sender waits for each answer before the next send
/// (stop-and-wait), so it never collects the consecutive rate-limit strikes
/// that get a connection closed 4008.
async fn send(
    mut plan: SendPlan,
    mut tx: WsTx,
    mut notes: mpsc::UnboundedReceiver<SenderNote>,
    pending: Arc<AtomicUsize>,
    shared: Arc<FanShared>,
) -> SendStats {
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
    let mut st = SendStats::default();
    let mut retry: VecDeque<usize> = Default::default();
    let mut pause_until = Instant::now();
    let mut next = plan.sender;
    let mut grace_started = false;
    let mut careful = false;
    let mut awaiting: Option<(usize, Instant)> = None;
    loop {
        let all_sent = next >= plan.messages;
        if !grace_started && all_sent && retry.is_empty() {
            // Everything sent: wait for the outstanding acks at most this long.
            grace_started = true;
            plan.acks_by = plan.acks_by.min(Instant::now() + plan.ack_grace);
        }
        if all_sent && retry.is_empty() && (pending.load(Ordering::Acquire) == 0 || Instant::now() >= plan.acks_by) {
            break;
        }
        if awaiting.is_some_and(|(_, at)| at.elapsed() >= ANSWER_TIMEOUT) {
            awaiting = None;
        }
        let blocked = awaiting.is_some();
        let due = if let Some((_, at)) = awaiting {
            at + ANSWER_TIMEOUT
        } else if !retry.is_empty() {
            pause_until
        } else if !all_sent {
            (plan.t0 + Duration::from_secs_f64(next as f64 / plan.rate)).max(pause_until)
        } else {
            // Waiting for acks or retry notes.
            Instant::now() + Duration::from_millis(20)
        };
        tokio::select! {
            biased;
            note = notes.recv() => {
                match note {
                    Some(SenderNote::RateLimited { k, retry_after_ms }) => {
                        careful = true;
                        if awaiting.is_some_and(|(a, _)| a == k) {
                            awaiting = None;
                        }
                        pause_until = pause_until.max(Instant::now() + Duration::from_millis(retry_after_ms + 1));
                        retry.push_back(k);
                    }
                    Some(SenderNote::Answered(k)) => {
                        if awaiting.is_some_and(|(a, _)| a == k) {
                            awaiting = None;
                        }
                    }
                    None => break,
                }
                continue;
            }
            _ = sleep_until(plan.deadline) => break,
            _ = sleep_until(due) => {}
        }
        if blocked {
            continue;
        }
        let k = if let Some(k) = retry.pop_front() {
            st.retries += 1;
            k
        } else if !all_sent {
            let k = next;
            next += plan.senders;
            k
        } else {
            continue;
        };
        let frame = plan.frame(k, &shared);
        if let Err(e) = tx.send(Message::text(frame)).await {
            st.error = Some(ws::classify(e));
            break;
        }
        if careful {
            awaiting = Some((k, Instant::now()));
        }
        st.sent += 1;
        st.last_send_us = now_us();
    }
    let mut k = next;
    while k < plan.messages {
        st.unsent += 1;
        k += plan.senders;
    }
    st.unsent += retry.len() as u64;
    // Dropping the writing half keeps the connection: its reader still counts deliveries.
    drop(tx);
    st
}
