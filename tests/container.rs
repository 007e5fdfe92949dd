//! End-to-end test of the compose stack (compose.yaml): nginx in front of two
//! crm-chat replicas sharing Valkey, all in containers, driven from outside
//! through nginx only: its public side (`CHAT_E2E_URL`: WebSocket, demo page,
//! dev tokens) and its internal side (`CHAT_E2E_INTERNAL_URL`: service API,
//! `/readyz`, `/metrics` of the replicas' internal listeners).
//! `scripts/container-e2e.sh` builds the image, starts the stack, runs this test
//! with both set and tears the stack down:
//!
//!   bash scripts/container-e2e.sh
//!
//! Against a stack that is already up (compose project `crm-chat-e2e`, or set
//! `CHAT_E2E_COMPOSE_PROJECT`):
//!
//!   CHAT_E2E_URL=http://127.0.0.1:8080 CHAT_E2E_INTERNAL_URL=http://127.0.0.1:8081 \
//!     cargo test --test container -- --ignored --nocapture
//!
//! The test stops and starts one chat container with the `docker` CLI. It finds
//! the containers by their compose labels and matches them to the `x-chat-node`
//! response header: in compose the node id is the container's host name, and
//! the public listener says its opaque tag (`public_node_tag`).
//!
//! Self-contained on purpose: the harness in `tests/common` starts local
//! processes, and its `Client` does not expose the upgrade response (which
//! carries the node id).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

mod common;

use common::{Client as Ws, Ended};

/// Wait for one frame or reply.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The local profile's service API key when `CHAT_AUTH__API_KEY` is unset.
const LOCAL_DEV_API_KEY: &str = "crm-chat-local-development-api-key";
/// bob's connections on the replica that is stopped (the drain spreads their
/// closes over `server.drain_s`, so later ones reconnect while it drains).
const DEVICES: usize = 3;
/// Pause between the messages alice sends while bob's replica goes away.
const SEND_EVERY: Duration = Duration::from_millis(150);

fn base_url() -> String {
    let url = std::env::var("CHAT_E2E_URL").unwrap_or_default();
    assert!(
        !url.is_empty(),
        "CHAT_E2E_URL is not set: this test needs the compose stack behind nginx, e.g. \
         CHAT_E2E_URL=http://127.0.0.1:8080 (scripts/container-e2e.sh sets it up and runs the test)"
    );
    url.trim_end_matches('/').to_string()
}

/// nginx's internal side (compose publishes it on 127.0.0.1:8081).
fn internal_url() -> String {
    let url = std::env::var("CHAT_E2E_INTERNAL_URL").unwrap_or_default();
    assert!(
        !url.is_empty(),
        "CHAT_E2E_INTERNAL_URL is not set: the service API and /readyz are on nginx's internal side, e.g. \
         CHAT_E2E_INTERNAL_URL=http://127.0.0.1:8081 (scripts/container-e2e.sh sets it)"
    );
    url.trim_end_matches('/').to_string()
}

fn compose_project() -> String {
    std::env::var("CHAT_E2E_COMPOSE_PROJECT").unwrap_or_else(|_| "crm-chat-e2e".into())
}

fn api_key() -> String {
    std::env::var("CHAT_AUTH__API_KEY").ok().filter(|k| !k.is_empty()).unwrap_or_else(|| LOCAL_DEV_API_KEY.into())
}

/// Seconds since `t0`, for the progress log.
fn at(t0: Instant) -> String {
    format!("{:6.1}s", t0.elapsed().as_secs_f64())
}

// --- docker ------------------------------------------------------------------

async fn docker(args: &[&str]) -> String {
    let out = tokio::process::Command::new("docker").args(args).output().await.expect("run the docker CLI");
    assert!(
        out.status.success(),
        "docker {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The public `x-chat-node` of a node: an opaque tag keyed with the JWT secret.
fn public_tag(node_id: &str) -> String {
    let secret = std::env::var("CHAT_AUTH__JWT_SECRET")
        .ok()
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| crm_chat::config::LOCAL_DEV_JWT_SECRET.into());
    crm_chat::transport::public_node_tag(node_id, &secret)
}

/// The project's chat containers (running or not): public tag of the host
/// name (= node id, see [`public_tag`]) -> container id.
async fn chat_containers() -> BTreeMap<String, String> {
    let project = compose_project();
    let ids = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={project}"),
        "--filter",
        "label=com.docker.compose.service=chat",
    ])
    .await;
    let mut out = BTreeMap::new();
    for id in ids.split_whitespace() {
        out.insert(public_tag(&docker(&["inspect", "-f", "{{.Config.Hostname}}", id]).await), id.to_string());
    }
    out
}

async fn inspect(id: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, id]).await
}

// --- HTTP --------------------------------------------------------------------

/// `GET /readyz` through nginx's internal side: (status, x-chat-node) or the transport error.
async fn readyz(http: &reqwest::Client, base: &str) -> Result<(u16, String), String> {
    let r = http.get(format!("{base}/readyz")).timeout(TIMEOUT).send().await.map_err(|e| e.to_string())?;
    let node = r.headers().get("x-chat-node").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    Ok((r.status().as_u16(), node))
}

async fn dev_token(http: &reqwest::Client, base: &str, user: &str) -> String {
    let r = http
        .post(format!("{base}/api/v1/dev/token"))
        .json(&json!({"user": user}))
        .timeout(TIMEOUT)
        .send()
        .await
        .expect("POST /api/v1/dev/token");
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "dev token for {user} (are dev tokens on in compose?): {body}");
    body["token"].as_str().expect("token").to_string()
}

/// Every stored message of `conv`, through the service API (nginx's internal side).
async fn stored_messages(http: &reqwest::Client, base: &str, conv: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().map_or(0, |m| m["seq"].as_u64().unwrap());
        let r = http
            .get(format!("{base}/api/v1/conversations/{conv}/messages?after={after}&limit=200"))
            .bearer_auth(api_key())
            .timeout(TIMEOUT)
            .send()
            .await
            .expect("GET messages");
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            status, 200,
            "service API GET messages (API key from CHAT_AUTH__API_KEY or the local default): {body}"
        );
        out.extend(body["messages"].as_array().unwrap().iter().cloned());
        if body["has_more"] != true {
            return out;
        }
    }
}

// --- WebSocket ---------------------------------------------------------------

/// A WebSocket client through nginx that knows which replica it landed on and
/// keeps frames it was not waiting for.
/// Upgrades with `Authorization: Bearer` and reads the unprompted `welcome`.
async fn connect(base: &str, user: &str, token: &str) -> Result<Ws, String> {
    let url = format!("{}/ws/chat", base.replacen("http", "ws", 1));
    let auth = vec![("authorization", format!("Bearer {token}"))];
    let mut c = match tokio::time::timeout(TIMEOUT, Ws::connect(&url, Some(auth))).await {
        Err(_) => return Err("upgrade timed out".into()),
        Ok(Err(tungstenite::Error::Http(r))) => {
            let node = r.headers().get("x-chat-node").and_then(|v| v.to_str().ok()).unwrap_or("nginx");
            return Err(format!("HTTP {} (from {node})", r.status()));
        }
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(c)) => c,
    };
    assert!(!c.node.is_empty(), "the 101 response names the node (x-chat-node)");
    let w = c.expect("welcome", |v| v["type"] == "welcome").await;
    assert_eq!(w["user"]["id"], user, "{w}");
    c.welcome = w;
    c.user = user.into();
    Ok(c)
}

/// Connects, retrying refusals (a draining replica answers 503, nginx 502/504
/// while its DNS answer still names a stopped replica) for up to `within`.
async fn connect_retrying(base: &str, user: &str, token: &str, within: Duration) -> Ws {
    let deadline = Instant::now() + within;
    let mut errors = Vec::new();
    loop {
        match connect(base, user, token).await {
            Ok(c) => {
                if !errors.is_empty() {
                    println!("      ({user}: connected after refusals: {})", errors.join("; "));
                }
                return c;
            }
            Err(e) if Instant::now() < deadline => {
                errors.push(e);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{user} could not connect within {within:?}: {e} (earlier: {errors:?})"),
        }
    }
}

/// `send` with a given `client_msg_id`; returns the acked seq.
async fn say(c: &mut Ws, conv: &str, cmid: &str, body: &str) -> u64 {
    let ack = c.request(json!({"type":"send","conversation":conv,"client_msg_id":cmid,"body":body})).await;
    assert_eq!(ack["type"], "ack", "{}@{}: {ack}", c.user, c.node);
    assert_eq!(ack["duplicate"], false, "{ack}");
    ack["seq"].as_u64().unwrap()
}

/// The `message` in `conv` with this `client_msg_id`.
async fn expect_message(c: &mut Ws, conv: &str, cmid: &str) -> Value {
    c.expect(&format!("message {cmid}"), |v| {
        v["type"] == "message" && v["conversation"] == conv && v["client_msg_id"] == cmid
    })
    .await
}

/// Connects `user` until it lands on a replica `want` accepts; the misses are
/// closed. Round robin in nginx (and Docker's DNS) spreads upgrades over the replicas.
async fn connect_on(base: &str, user: &str, token: &str, want: impl Fn(&str) -> bool) -> Ws {
    let mut seen = Vec::new();
    for _ in 0..16 {
        let c = connect_retrying(base, user, token, Duration::from_secs(30)).await;
        if want(&c.node) {
            return c;
        }
        seen.push(c.node.clone());
        c.close().await;
    }
    panic!("{user}: 16 upgrades through nginx never reached the wanted replica; landed on {seen:?}");
}

/// The messages of `conv` among `frames`, by seq; a seq seen twice must carry the same message.
fn collect(into: &mut BTreeMap<u64, Value>, conv: &str, frames: impl IntoIterator<Item = Value>) {
    for m in frames.into_iter().filter(|v| v["type"] == "message" && v["conversation"] == conv) {
        let seq = m["seq"].as_u64().expect("seq");
        if let Some(old) = into.get(&seq) {
            assert_eq!(old["client_msg_id"], m["client_msg_id"], "seq {seq} delivered as two different messages");
        }
        into.insert(seq, m);
    }
}

/// The highest seq held without a gap from 1.
fn contiguous(held: &BTreeMap<u64, Value>) -> u64 {
    let mut last = 0;
    for &s in held.keys() {
        if s != last + 1 {
            break;
        }
        last = s;
    }
    last
}

/// One of bob's connections on the replica being stopped.
struct Rider {
    device: usize,
    base: String,
    token: String,
    conv: String,
    /// The replica that stays up.
    survivor: String,
    /// alice's last acked seq.
    last_acked: Arc<AtomicU64>,
    t0: Instant,
    stop_started: Instant,
}

impl Rider {
    /// Waits for the drain to close `b`, lets alice send a few messages, then
    /// reconnects through nginx and syncs from the last seq held (`held`).
    async fn ride_out(self, mut b: Ws, mut held: BTreeMap<u64, Value>) -> (Ws, BTreeMap<u64, Value>) {
        let Rider { device, base, token, conv, survivor, last_acked, t0, stop_started } = self;
        let who = format!("{}#{device}@{}", b.user, b.node);
        let (frames, ended) = b.until_closed(Duration::from_secs(40)).await;
        let closed_after = stop_started.elapsed();
        collect(&mut held, &conv, frames);
        let at_close = last_acked.load(Ordering::Acquire);
        println!(
            "{}     {who}: {ended:?} {:.1}s after SIGTERM, holding seqs 1..={} (alice: {at_close} acked)",
            at(t0),
            closed_after.as_secs_f64(),
            contiguous(&held)
        );
        assert!(
            matches!(ended, Ended::Close(1012) | Ended::Dropped),
            "{who}: a draining replica closes with 1012 (service restart) or drops: {ended:?}"
        );
        if ended == Ended::Dropped {
            println!("      NOTE: {who} dropped without the 1012 close frame of the drain");
        }
        let user = b.user.clone();
        drop(b);

        // Messages go on while this connection is away.
        let deadline = Instant::now() + TIMEOUT;
        while last_acked.load(Ordering::Acquire) < at_close + 3 {
            assert!(Instant::now() < deadline, "alice's sends stalled while bob was away");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let t = Instant::now();
        let mut b = connect_retrying(&base, &user, &token, Duration::from_secs(60)).await;
        let took = t.elapsed();
        assert_eq!(b.node, survivor, "{who}: the reconnect lands on the surviving replica");
        let listed = b.welcome["conversations"].as_array().unwrap().iter().find(|c| c["id"] == conv).cloned();
        let listed = listed.unwrap_or_else(|| panic!("welcome lists {conv}: {}", b.welcome));
        assert!(
            listed["last_seq"].as_u64().unwrap() > contiguous(&held),
            "welcome shows the missed messages: {listed}"
        );

        // sync from the last seq held, page by page: ascending and gap-free.
        let synced_from = contiguous(&held);
        let mut after = synced_from;
        let mut synced = 0;
        loop {
            let r = b.request(json!({"type":"sync","conversation":conv,"after":after,"limit":200})).await;
            assert_eq!(r["type"], "history", "{r}");
            let msgs = r["messages"].as_array().unwrap().clone();
            for m in &msgs {
                assert_eq!(m["seq"].as_u64(), Some(after + 1), "sync is in order and gap-free: {m}");
                after += 1;
            }
            synced += msgs.len();
            collect(&mut held, &conv, msgs);
            if r["has_more"] != true {
                break;
            }
        }
        println!(
            "{}     {who}: reconnected through nginx to {} in {:.1}s; sync after seq {synced_from}: \
             {synced} messages, up to seq {after}",
            at(t0),
            b.node,
            took.as_secs_f64()
        );
        (b, held)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker and the compose stack: run by scripts/container-e2e.sh"]
async fn two_replicas_behind_nginx_survive_a_replica_restart() {
    let t0 = Instant::now();
    let base = base_url();
    let internal = internal_url();
    let http = common::http_client();

    // The stack is up: nginx answers and a replica is ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match readyz(&http, &internal).await {
            Ok((200, _)) => break,
            r if Instant::now() < deadline => {
                println!("waiting for {internal}/readyz: {r:?}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            r => panic!("{internal}/readyz not 200 within 60 s: {r:?}"),
        }
    }
    // The public side serves the WebSocket, the demo page and its files only.
    for path in
        ["/api/v1/conversations/general", "/api/v1/users/alice/conversations", "/metrics", "/readyz", "/healthz"]
    {
        let r = http.get(format!("{base}{path}")).bearer_auth(api_key()).timeout(TIMEOUT).send().await;
        let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
        assert_eq!(status, 404, "public side {base}{path} must not be served");
    }
    for path in ["/", "/static/chat.js"] {
        let r = http.get(format!("{base}{path}")).timeout(TIMEOUT).send().await.expect("public page");
        assert_eq!(r.status(), 200, "public side {base}{path}");
    }
    println!("{} public side: /ws/, / and /static/ only; service API, /metrics and health are 404", at(t0));
    let containers = chat_containers().await;
    assert_eq!(
        containers.len(),
        2,
        "compose project '{}' should have two chat containers (deploy.replicas: 2): {containers:?}",
        compose_project()
    );
    println!("{} chat replicas (public tag of the node id -> container): {containers:?}", at(t0));

    // Fresh users per run, so a re-run against the same stack starts from seq 1.
    let run = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    let (alice, bob) = (format!("alice-{run}"), format!("bob-{run}"));
    let conv = format!("dm:{alice}:{bob}");
    let (ta, tb) = (dev_token(&http, &base, &alice).await, dev_token(&http, &base, &bob).await);

    // (a) alice on one replica, bob (on several devices) on the other.
    let mut a = connect_retrying(&base, &alice, &ta, Duration::from_secs(30)).await;
    let node_a = a.node.clone();
    let mut bs = Vec::new();
    for _ in 0..DEVICES {
        bs.push(connect_on(&base, &bob, &tb, |n| n != node_a).await);
    }
    let node_b = bs[0].node.clone();
    assert!(bs.iter().all(|b| b.node == node_b), "two replicas only");
    println!("{} (a) {alice} on replica {node_a}; {bob} on replica {node_b} ({DEVICES} connections)", at(t0));
    for n in [&node_a, &node_b] {
        assert!(
            containers.contains_key(n),
            "x-chat-node '{n}' is not the public tag of a chat container's host name ({containers:?}): is CHAT_SERVER__NODE_ID set?"
        );
    }
    let id_b = containers[&node_b].clone();

    // (b) Messages cross replicas through Valkey, both ways.
    let mut helds: Vec<BTreeMap<u64, Value>> = vec![BTreeMap::new(); DEVICES];
    let s1 = say(&mut a, &conv, &format!("hi-{run}"), "hi bob, from the other replica").await;
    for (b, held) in bs.iter_mut().zip(&mut helds) {
        let m = expect_message(b, &conv, &format!("hi-{run}")).await;
        assert_eq!((m["seq"].as_u64(), &m["sender"]["id"]), (Some(s1), &json!(alice)), "{m}");
        collect(held, &conv, [m]);
    }
    let s2 = say(&mut bs[0], &conv, &format!("re-{run}"), "hi alice").await;
    let m = expect_message(&mut a, &conv, &format!("re-{run}")).await;
    assert_eq!((m["seq"].as_u64(), &m["sender"]["id"]), (Some(s2), &json!(bob)), "{m}");
    for (b, held) in bs.iter_mut().zip(&mut helds) {
        let m = expect_message(b, &conv, &format!("re-{run}")).await;
        collect(held, &conv, [m]);
    }
    assert_eq!((s1, s2), (1, 2), "seqs of a fresh conversation");
    println!(
        "{} (b) {alice}@{node_a} -> {bob}@{node_b}: seq {s1}; {bob}@{node_b} -> {alice}@{node_a}: seq {s2}",
        at(t0)
    );

    // (c) Stop bob's replica while alice keeps sending from the other one.
    println!("{} (c) docker stop {id_b} (replica {node_b}: SIGTERM, drain)", at(t0));
    let stop_started = Instant::now();
    let stop = tokio::spawn({
        let id = id_b.clone();
        async move {
            let out = tokio::process::Command::new("docker")
                .args(["stop", "-t", "30", &id])
                .output()
                .await
                .expect("docker stop");
            assert!(out.status.success(), "docker stop {id}: {}", String::from_utf8_lossy(&out.stderr));
            stop_started.elapsed()
        }
    });
    let halt = Arc::new(AtomicBool::new(false));
    let last_acked = Arc::new(AtomicU64::new(s2));
    let sender = tokio::spawn({
        let (halt, last_acked, conv) = (halt.clone(), last_acked.clone(), conv.clone());
        async move {
            let mut sent: Vec<(u64, String)> = Vec::new();
            let mut i = 0;
            while !halt.load(Ordering::Acquire) {
                i += 1;
                let cmid = format!("away-{run}-{i}");
                let seq = say(&mut a, &conv, &cmid, &format!("message #{i} while bob's replica restarts")).await;
                sent.push((seq, cmid));
                last_acked.store(seq, Ordering::Release);
                // Her own copies: not what this test looks at.
                a.discard(|v| v["type"] == "message");
                tokio::time::sleep(SEND_EVERY).await;
            }
            (a, sent)
        }
    });

    // Each of bob's connections: closed by the drain, reconnects through nginx
    // (to the surviving replica), syncs from the last seq it held.
    let mut riders = Vec::new();
    for (k, (b, held)) in bs.into_iter().zip(helds).enumerate() {
        let ctx = Rider {
            device: k + 1,
            base: base.clone(),
            token: tb.clone(),
            conv: conv.clone(),
            survivor: node_a.clone(),
            last_acked: last_acked.clone(),
            t0,
            stop_started,
        };
        riders.push(tokio::spawn(ctx.ride_out(b, held)));
    }
    let mut bs = Vec::new();
    let mut helds = Vec::new();
    for r in riders {
        let (b, held) = r.await.expect("bob's connection rode out the restart");
        bs.push(b);
        helds.push(held);
    }
    if sender.is_finished() {
        panic!("alice's sender stopped while bob was away: {:?}", sender.await.err());
    }

    let stop_took = stop.await.expect("docker stop");
    let exit = inspect(&id_b, "{{.State.Status}} exit={{.State.ExitCode}} oom={{.State.OOMKilled}}").await;
    println!("{}     docker stop returned {:.1}s after it began: {exit}", at(t0), stop_took.as_secs_f64());
    assert_eq!(exit, "exited exit=0 oom=false", "SIGTERM drains and exits 0 within the stop timeout");

    // Stop sending; bob's connections (now on alice's replica) get the rest live.
    halt.store(true, Ordering::Release);
    let (a, sent) = sender.await.expect("alice kept sending from the surviving replica");
    let last = sent.last().map_or(s2, |&(s, _)| s);
    let acked: Vec<u64> = sent.iter().map(|&(s, _)| s).collect();
    assert_eq!(acked, (s2 + 1..=last).collect::<Vec<_>>(), "alice's acks are gap-free across the restart");
    for (b, held) in bs.iter_mut().zip(&mut helds) {
        let deadline = Instant::now() + TIMEOUT;
        while contiguous(held) < last {
            assert!(Instant::now() < deadline, "{bob} is missing messages up to seq {last}; holds {:?}", held.keys());
            let frames = b.drain(Duration::from_millis(200)).await;
            collect(held, &conv, frames);
        }
        // Nothing lost, nothing out of order, nothing doubled: exactly seq
        // 1..=last, each the message alice was acked for.
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
        for (seq, cmid) in &sent {
            assert_eq!(held[seq]["client_msg_id"], json!(cmid), "seq {seq}");
        }
    }
    let stored = stored_messages(&http, &internal, &conv).await;
    let stored_seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(stored_seqs, (1..=last).collect::<Vec<_>>(), "service API: stored seqs");
    for m in &stored {
        assert_eq!(helds[0][&m["seq"].as_u64().unwrap()]["client_msg_id"], m["client_msg_id"]);
    }
    println!(
        "{}     {} messages sent during the restart (seq {}..={last}); each of bob's {DEVICES} connections \
         holds 1..={last}; the service API agrees",
        at(t0),
        sent.len(),
        s2 + 1
    );

    // (d) Bring the replica back: ready through nginx, healthy, and crossing again.
    println!("{} (d) docker start {id_b}", at(t0));
    docker(&["start", &id_b]).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    loop {
        let r = readyz(&http, &internal).await;
        // The internal side names the node id; the public side its tag.
        if let Ok((200, n)) = &r
            && public_tag(n) == node_b
        {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz through nginx never answered 200 from {node_b}: {seen:?}");
        seen.push(r);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("{}     /readyz through nginx: 200 from the restarted replica {node_b}", at(t0));
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let h = inspect(&id_b, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}").await;
        if h == "healthy" {
            break;
        }
        assert!(Instant::now() < deadline, "container {id_b} not healthy within 90 s: {h}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{}     container {id_b} healthy", at(t0));

    let mut back = connect_on(&base, &bob, &tb, |n| n == node_b).await;
    let mut a = a;
    let s = say(&mut a, &conv, &format!("back-{run}"), "welcome back").await;
    assert_eq!(s, last + 1);
    let m = expect_message(&mut back, &conv, &format!("back-{run}")).await;
    assert_eq!(m["seq"].as_u64(), Some(s), "{m}");
    for b in &mut bs {
        expect_message(b, &conv, &format!("back-{run}")).await;
    }
    println!("{}     {alice}@{} -> {bob}@{node_b} (restarted) and @{node_a}: seq {s}", at(t0), a.node);
    let (status, _) = readyz(&http, &internal).await.expect("readyz");
    assert_eq!(status, 200);
    a.close().await;
    back.close().await;
    for b in bs {
        b.close().await;
    }
    println!("{} done", at(t0));
}
