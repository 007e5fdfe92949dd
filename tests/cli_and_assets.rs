//! The binary's command line (healthcheck, --print-config, config errors) and
//! the static assets (content types, ETag revalidation, CSP).

mod common;

use std::process::Command;

use common::Server;

fn crm_chat(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crm-chat"));
    cmd.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run crm-chat")
}

#[tokio::test]
async fn healthcheck_answers_for_a_live_server_only() {
    let s = Server::start(&[]).await;
    let addr = s.addr.to_string();
    let ok = crm_chat(&["healthcheck", "--addr", &addr], &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Through server.listen, as the container HEALTHCHECK does.
    let ok = crm_chat(&["healthcheck"], &[("CHAT_SERVER__LISTEN", &addr)]);
    assert!(ok.status.success());
    let dead = format!("127.0.0.1:{}", common::valkey::free_port());
    let down = crm_chat(&["healthcheck", "--addr", &dead], &[]);
    assert_eq!(down.status.code(), Some(1));
}

#[test]
fn print_config_redacts_and_bad_config_names_the_key() {
    let out = crm_chat(
        &["--print-config"],
        &[("CHAT_AUTH__JWT_SECRET", "very-secret-jwt-value"), ("CHAT_VALKEY__URL", "redis://:hunter2@valkey:6379")],
    );
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("[server]") && shown.contains("heartbeat_s = 25"), "{shown}");
    assert!(!shown.contains("very-secret-jwt-value") && !shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("[redacted]"));
    let bad = crm_chat(&["--print-config"], &[("CHAT_LIMITS__OUTBOUND_QUEUE", "lots")]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("limits.outbound_queue"));
    let prod = crm_chat(&["--print-config"], &[("CHAT_PROFILE", "production")]);
    assert_eq!(prod.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&prod.stderr).contains("auth.jwt_secret"));
    // The token subcommand signs with the configured secret.
    let t = crm_chat(&["token", "alice", "--name", "Alice"], &[("CHAT_AUTH__JWT_SECRET", common::JWT_SECRET)]);
    assert!(t.status.success());
    assert_eq!(String::from_utf8_lossy(&t.stdout).trim().split('.').count(), 3);
}

#[tokio::test]
async fn assets_have_types_etags_and_a_csp() {
    let s = Server::start(&[]).await;
    let page = s.http.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("object-src 'none'"), "{csp}");
    assert!(csp.contains(&format!("ws://{}", s.addr)), "the page's own WebSocket origin: {csp}");
    assert!(page.text().await.unwrap().contains("chat.js"));
    let js = s.http.get(s.url("/static/chat.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"].to_str().unwrap().contains("javascript"));
    assert_eq!(js.headers()["x-content-type-options"], "nosniff");
    let etag = js.headers()["etag"].clone();
    let again = s.http.get(s.url("/static/chat.js")).header("if-none-match", etag.clone()).send().await.unwrap();
    assert_eq!(again.status(), 304);
    let css = s.http.get(s.url("/static/app.css")).send().await.unwrap();
    assert!(css.headers()["content-type"].to_str().unwrap().starts_with("text/css"));
    let missing = s.http.get(s.url("/static/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let traversal = s.http.get(s.url("/static/..%2FCargo.toml")).send().await.unwrap();
    assert_eq!(traversal.status(), 404);
}
