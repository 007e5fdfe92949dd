//! Finding 7's figures: a bystander's send -> ack latency while one user in
//! 300 groups connects and closes in a loop (the probe's attack), on the
//! embedded engine. Measures, asserts nothing; run it on a quiet machine:
//!
//!     cargo test --release --test hardening connect_churn_cost -- --ignored --nocapture
//!
//! Twice: with the connect rate raised out of the way (what one connect
//! costs), and with the defaults (what the rate bounds it to).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::common::{
    Server,
    extra::{Raw, sign_token},
};

const GROUPS: usize = 300;
/// Online users in every group with the churner (they hear its presence).
const WATCHERS: usize = 10;
const CHURNERS: usize = 4;

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// send -> ack latencies (ms) of a bystander for `d`, ~50 sends a second.
async fn bystander(s: &Server, d: Duration) -> Vec<f64> {
    let mut a = s.client("by_alice").await;
    let mut out = Vec::new();
    let end = Instant::now() + d;
    while Instant::now() < end {
        let t = Instant::now();
        let ack = a.say("dm:by_alice:by_bob", "hi").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        a.discard(|_| true);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

async fn run(label: &str, env: &[(&str, &str)]) {
    let mut e = vec![("CHAT_LIMITS__CONNECTIONS_PER_USER", "100"), ("CHAT_LOG__LEVEL", "warn")];
    e.extend_from_slice(env);
    let s = Server::start(&e).await;
    let watchers: Vec<String> = (0..WATCHERS).map(|i| format!("w{i}")).collect();
    for g in 0..GROUPS {
        let mut members = vec!["churner".to_string()];
        members.extend(watchers.iter().cloned());
        let m: Vec<&str> = members.iter().map(String::as_str).collect();
        s.put_group(&format!("g{g}"), &m).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let heard = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in &watchers {
        let mut r = Raw::open(s.addr, Some(&sign_token(w))).await;
        let (stop, heard) = (stop.clone(), heard.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if r.next_json(Duration::from_millis(200)).await.is_ok() {
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let base = bystander(&s, Duration::from_secs(5)).await;
    let (connects, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut churn = Vec::new();
    for _ in 0..CHURNERS {
        let (stop, connects, refused, addr) = (stop.clone(), connects.clone(), refused.clone(), s.addr);
        churn.push(tokio::spawn(async move {
            let token = sign_token("churner");
            while !stop.load(Ordering::Relaxed) {
                match Raw::connect(addr, Some(&token), None).await {
                    Ok(mut r) => {
                        let _ = r.next_json(Duration::from_secs(5)).await;
                        connects.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, t0, c0, h0) =
        (cpu_s(s.pid()), Instant::now(), connects.load(Ordering::Relaxed), heard.load(Ordering::Relaxed));
    let under = bystander(&s, Duration::from_secs(10)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_s(s.pid()) - cpu0) / secs * 100.0;
    let n = connects.load(Ordering::Relaxed) - c0;
    let frames = heard.load(Ordering::Relaxed) - h0;
    stop.store(true, Ordering::Relaxed);
    for t in churn.into_iter().chain(tasks) {
        let _ = t.await;
    }
    let (mut base, mut under) = (base, under);
    println!(
        "churn [{label}]: {:.0} connects/s ({} refused), node CPU {cpu:.0}% ({:.2} ms CPU per connect), \
         watchers heard {:.0} frames/s; bystander ack p50/p99: alone {:.2}/{:.2} ms, under churn {:.2}/{:.2} ms",
        n as f64 / secs,
        refused.load(Ordering::Relaxed),
        if n > 0 { cpu / 100.0 * secs * 1000.0 / n as f64 } else { f64::NAN },
        frames as f64 / secs,
        pct(&mut base, 0.5),
        pct(&mut base, 0.99),
        pct(&mut under, 0.5),
        pct(&mut under, 0.99),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures; run with --ignored --nocapture"]
async fn connect_churn_cost() {
    run("rate raised", &[("CHAT_LIMITS__CONNECTS_PER_S", "1000000"), ("CHAT_LIMITS__CONNECTS_BURST", "1000000")]).await;
    run("defaults", &[]).await;
}
