//! The load tool (`crm-chat-load`) at tiny sizes against real servers: every
//! scenario on the embedded engine and on two Valkey nodes. Correctness only
//! (nothing lost, duplicated or reordered, no errors), never timing.
//!
//! The servers are the `crm-chat` binary of the same build (see
//! `common::server_binary`).

mod common;

use common::{API_KEY, JWT_SECRET, LOAD_BIN, Server};
use serde_json::Value;

/// Runs the load tool and returns its one JSON line.
async fn load(servers: &[Server], args: &[&str]) -> Value {
    let urls: Vec<String> = servers.iter().map(|s| s.url("")).collect();
    let pids: Vec<String> = servers.iter().map(|s| s.pid().to_string()).collect();
    let out = tokio::process::Command::new(LOAD_BIN)
        .args(["--url", &urls.join(","), "--server-pid", &pids.join(","), "--api-key", API_KEY])
        .args(args)
        .output()
        .await
        .expect("run crm-chat-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {stdout}\nstderr:\n{stderr}");
    let v: Value = serde_json::from_str(lines[0]).expect("stdout is JSON");
    assert!(out.status.success(), "exit {:?}: {v}\nstderr:\n{stderr}", out.status);
    assert!(v.get("error").is_none(), "{v}");
    eprintln!("{v}");
    v
}

/// [`load`] with `--transport <transport>` first; checks the report names it.
async fn load_over(servers: &[Server], transport: &str, args: &[&str]) -> Value {
    let mut all = vec!["--transport", transport];
    all.extend_from_slice(args);
    let v = load(servers, &all).await;
    assert_eq!(v["transport"], transport, "{v}");
    v
}

fn assert_clean(v: &Value) {
    for k in ["lost", "duplicated", "out_of_order"] {
        assert_eq!(v[k], 0, "{k}: {v}");
    }
    assert_eq!(v["errors"], serde_json::json!({}), "errors: {v}");
}

async fn every_scenario(servers: &[Server]) {
    every_scenario_over(servers, "ws").await;
}

/// Every scenario with `--transport <transport>`.
async fn every_scenario_over(servers: &[Server], transport: &str) {
    let engine = if servers.len() == 1 { "memory" } else { "valkey" };
    // conns, with dev tokens from the server.
    let v = load_over(servers, transport, &["conns", "--n", "50", "--hold-s", "1", "--duration-s", "60"]).await;
    assert_eq!(v["nodes"][0]["engine"], engine, "{v}");
    assert_eq!(v["tokens"], "dev");
    assert_eq!(v["established"], 50, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["dropped_during_hold"], serde_json::json!({}), "{v}");
    assert!(v["server_rss_per_conn_kib"].is_number(), "{v}");

    // fanout: 20 members x 20 messages, with signed tokens.
    let v = load_over(
        servers,
        transport,
        &[
            "--jwt-secret",
            JWT_SECRET,
            "fanout",
            "--members",
            "20",
            "--senders",
            "2",
            "--messages",
            "20",
            "--rate",
            "40",
            "--settle-ms",
            "200",
            "--duration-s",
            "60",
        ],
    )
    .await;
    assert_clean(&v);
    assert_eq!(v["members_connected"], 20, "{v}");
    assert_eq!(v["acked"], 20, "{v}");
    assert_eq!(v["delivered"], 400, "{v}");
    assert_eq!(v["expected_deliveries"], 400, "{v}");

    // pairs: 5 direct conversations for 2 s.
    let v = load_over(servers, transport, &["--jwt-secret", JWT_SECRET, "pairs", "--pairs", "5", "--duration-s", "2"])
        .await;
    assert_clean(&v);
    assert_eq!(v["pairs_connected"], 5, "{v}");
    assert!(v["round_trips"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["timeouts"], 0, "{v}");

    // reactions (v1.2): 30 members react within 300 ms, two emoji.
    let args = ["--jwt-secret", JWT_SECRET, "reactions", "--members", "30", "--window-ms", "300", "--emoji", "2"];
    let v = load(servers, &[&args[..], &["--drain-s", "2", "--duration-s", "60"]].concat()).await;
    assert_eq!(v["errors"], serde_json::json!({}), "errors: {v}");
    assert_eq!((v["members_connected"].as_u64(), v["acked"].as_u64()), (Some(30), Some(30)), "{v}");
    assert_eq!(v["server_reacted_users"], 30, "{v}");
    assert_eq!(v["update_deliveries"], 900, "every member saw every reaction: {v}");
    assert_eq!(v["distinct_final_states"], 1, "{v}");
    assert_eq!(v["members_agree_with_server"], true, "{v}");

    // storm: 40 members drop, miss 230 messages (two sync pages), reconnect.
    let args = ["--jwt-secret", JWT_SECRET, "storm", "--members", "40", "--missed", "230", "--duration-s", "60"];
    let v = load_over(servers, transport, &args).await;
    assert_eq!(v["errors"], serde_json::json!({}), "errors: {v}");
    assert_eq!((v["connected_before"].as_u64(), v["saw_live_before"].as_u64()), (Some(40), Some(40)), "{v}");
    assert_eq!((v["reconnected"].as_u64(), v["synced"].as_u64()), (Some(40), Some(40)), "{v}");
    assert_eq!(
        (v["missing"].as_u64(), v["repeated"].as_u64(), v["out_of_order"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
    assert!(v["sync_pages"].as_u64().unwrap() >= 80, "230 messages take two pages of 200: {v}");
    assert!(v["all_synced_s"].is_number(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_tool_on_the_embedded_engine() {
    let server = Server::start(&[]).await;
    every_scenario(std::slice::from_ref(&server)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_tool_over_http_streaming() {
    let server = Server::start(&[]).await;
    every_scenario_over(std::slice::from_ref(&server), "http").await;
    let valkey = common::valkey::Valkey::start().await;
    let nodes = common::start_nodes(2, &valkey.url(), &[]).await;
    every_scenario_over(&nodes, "http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_tool_on_two_valkey_nodes() {
    let valkey = common::valkey::Valkey::start().await;
    let nodes = common::start_nodes(2, &valkey.url(), &[]).await;
    every_scenario(&nodes).await;
}

#[tokio::test]
async fn refuses_remote_targets_and_reports_one_json_line() {
    let out = tokio::process::Command::new(LOAD_BIN)
        .args(["--url", "http://192.0.2.1:8000", "conns", "--n", "1"])
        .output()
        .await
        .expect("run crm-chat-load");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert!(v["error"].as_str().unwrap().contains("--allow-remote"), "{v}");
}

/// The floor server (issue 20) serves the `fanout` scenario: every message
/// to every member, nothing lost, duplicated or reordered, in both write modes.
#[tokio::test]
async fn fanout_against_the_floor_server() {
    for writev in ["false", "true"] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let mut floor = tokio::process::Command::new(LOAD_BIN)
            .args(["floor-server", "--listen", &listen, "--writev", writev, "--duration-s", "60"])
            .kill_on_drop(true)
            .spawn()
            .expect("start the floor server");
        let url = format!("http://{listen}");
        let mut up = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&listen).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(up, "floor server listening on {listen}");
        let out = tokio::process::Command::new(LOAD_BIN)
            .args(["--url", &url, "--jwt-secret", "x", "fanout", "--members", "20", "--senders", "2"])
            .args(["--messages", "20", "--rate", "50", "--settle-ms", "100", "--drain-s", "2"])
            .output()
            .await
            .expect("run crm-chat-load");
        let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("one JSON line");
        assert!(v.get("error").is_none(), "{v}");
        assert_clean(&v);
        assert_eq!((v["acked"].as_u64(), v["delivered"].as_u64()), (Some(20), Some(400)), "writev {writev}: {v}");
        floor.kill().await.ok();
    }
}
