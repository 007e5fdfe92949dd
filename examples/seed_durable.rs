//! Fills a durable store (`chat.data_dir`) with messages through the engine's
//! own `append`, for the restart-time benchmark (BENCHMARKS.md):
//!
//! ```sh
//! cargo run --release --example seed_durable -- /tmp/chat-1m 1000000 1000
//! ```
//!
//! writes 1,000,000 messages spread over 1,000 group conversations (1,000
//! each, under the default `chat.history_max_messages`), 20 members each,
//! with `chat.fsync = everysec`, then stops cleanly.

use std::{sync::Arc, time::Instant};

use crm_chat::{
    app,
    config::Config,
    engine::{Engine, NewMessage},
    hub::{Hub, Topic},
    protocol::{self, UserRef},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: seed_durable DIR [MESSAGES] [CONVERSATIONS]");
    let total: usize = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let convs: usize = args.next().map_or(Ok(1_000), |s| s.parse())?;
    let mut cfg = Config::default();
    cfg.chat.data_dir = Some(dir.clone());
    let engine: Arc<dyn Engine> = app::engine(&cfg, Hub::new()).await?;
    for c in 0..convs {
        let members = (0..20).map(|u| format!("user{}", (c + u) % 500)).collect();
        engine.put_group(&format!("deal-{c}"), &format!("Deal {c}"), members).await?;
    }
    let started = Instant::now();
    let tasks = 256;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let mut i = t;
            while i < total {
                let c = i % convs;
                let sender = format!("user{}", (c + i % 20) % 500);
                let msg = NewMessage {
                    conversation: format!("deal-{c}"),
                    sender: UserRef { id: sender.clone(), name: sender },
                    body: format!("message {i}: a line of chat of a typical length, about eighty characters"),
                    client_msg_id: format!("seed-{i}"),
                    ts_ms: protocol::now_ms(),
                    participants: None,
                    require_member: true,
                    send_budget: false,
                    reply_to: None,
                };
                let route = vec![Topic::Conv(msg.conversation.as_str().into())];
                engine.append(msg, &route).await?.expect("a member");
                i += tasks;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{total} messages in {convs} conversations: {secs:.1} s ({:.0}/s)", total as f64 / secs);
    engine.shutdown().await;
    Ok(())
}
