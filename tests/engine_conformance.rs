//! The engine contracts (`src/engine/mod.rs`: `MessageStore`, `Groups`,
//! `Broker`, `Presence`), run in process on every engine (memory, durable on a
//! temporary directory, Valkey): every contract is
//! an `async fn(Arc<dyn Engine>, Arc<Hub>)`, and [`conformance!`] makes one
//! test of it per engine. No WebSocket and no server process: the engine is
//! built as the app builds it ([`app::engine`]) and observed through a
//! [`Hub`] with registered connections, as sessions are.
//!
//! The Valkey tests start their own `valkey-server` (or `redis-server`, see
//! `tests/common/valkey.rs`) each, and give each engine its own key prefix
//! too, so two engines never share keys even on a shared server.

#[allow(dead_code)]
#[path = "common/valkey.rs"]
mod valkey_server;

/// v1.2: messages people can change.
#[path = "conformance/changes.rs"]
mod changes;
use changes::*;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crm_chat::{
    app,
    config::{Config, Secret},
    engine::{Engine, Group, GroupHead, MembershipChange, NewMessage, Page, ReceiptOutcome, ReceiptRow, Route},
    hub::{Conn, Event, EventKind, Hub, Receiver, Topic},
    ids,
    node::message_frame,
    protocol::{self, ConversationObject, Text, UserRef},
};
use serde_json::{Value, json};

/// How long a published event may take to arrive (Valkey pub/sub).
const ARRIVAL: Duration = Duration::from_secs(5);

// ---- harness ----

fn config() -> Config {
    let mut cfg = Config::default();
    // Contracts append in bursts; the send bucket is not under test here.
    cfg.limits.send_per_s = 1000.0;
    cfg.limits.send_burst = 1000;
    cfg.server.node_id = Some("conformance".into());
    cfg
}

/// Runs a contract on the embedded engine.
async fn on_memory<F, Fut>(contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    on_memory_with(config(), contract).await
}

async fn on_memory_with<F, Fut>(cfg: Config, contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    let hub = Hub::new();
    let engine = app::engine(&cfg, hub.clone()).await.expect("embedded engine");
    assert_eq!(engine.name(), "memory");
    contract(engine, hub).await;
}

/// Runs a contract on the durable embedded engine, on a fresh directory.
async fn on_durable<F, Fut>(contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    on_durable_with(config(), contract).await
}

async fn on_durable_with<F, Fut>(mut cfg: Config, contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "crm-chat-conformance-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    cfg.chat.data_dir = Some(dir.display().to_string());
    let hub = Hub::new();
    let engine = app::engine(&cfg, hub.clone()).await.expect("durable engine");
    assert_eq!(engine.name(), "durable");
    assert!(engine.ready().await, "durable engine ready");
    contract(engine.clone(), hub).await;
    engine.shutdown().await;
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a contract on the Valkey engine, against a server of its own.
async fn on_valkey<F, Fut>(contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    on_valkey_with(config(), contract).await
}

async fn on_valkey_with<F, Fut>(mut cfg: Config, contract: F)
where
    F: FnOnce(Arc<dyn Engine>, Arc<Hub>) -> Fut,
    Fut: Future<Output = ()>,
{
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let server = valkey_server::Valkey::start().await;
    cfg.valkey.url = Some(Secret::new(server.url()));
    cfg.valkey.pool_size = 2;
    cfg.valkey.key_prefix = format!("conf{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let hub = Hub::new();
    let engine = app::engine(&cfg, hub.clone()).await.expect("valkey engine");
    assert_eq!(engine.name(), "valkey");
    assert!(engine.ready().await, "valkey engine ready");
    // What the app does at start: the node's presence lease.
    engine.maintain().await.expect("first maintenance");
    contract(engine.clone(), hub).await;
    engine.shutdown().await;
    drop(server);
}

/// One test per contract and engine: `memory::<contract>`, `durable::<contract>`
/// and `valkey::<contract>`.
macro_rules! conformance {
    ($($contract:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $contract() {
                    super::on_memory(super::$contract).await
                }
            )*
        }
        mod durable {
            $(
                #[tokio::test]
                async fn $contract() {
                    super::on_durable(super::$contract).await
                }
            )*
        }
        mod valkey {
            $(
                #[tokio::test]
                async fn $contract() {
                    super::on_valkey(super::$contract).await
                }
            )*
        }
    };
}

conformance!(
    append_assigns_gap_free_seqs,
    repeat_returns_first_seq_and_publishes_nothing,
    published_message_is_the_stored_frame,
    require_member_refuses_non_members,
    history_pages_before_and_after,
    epoch_is_present_and_stable,
    receipts_are_range_checked_and_monotonic,
    counters_count_unread_messages_of_others,
    user_conversations_lists_groups_and_direct_with_messages,
    put_and_update_group_report_changes,
    groups_answer_in_order,
    open_conversations_count_known_members,
    publish_reaches_subscribed_local_connections,
    presence_counts_connections,
    erase_sender_erases_bodies_everywhere,
    erase_sender_in_a_long_history_while_others_send,
    delete_group_removes_history_and_starts_a_new_epoch,
    updates_share_the_seq_counter_and_are_published,
    changes_are_idempotent_by_state,
    change_rules_refuse_and_store_nothing,
    reactions_keep_order_and_history_costs_messages,
    unread_counts_messages_only,
    erase_sender_empties_edit_bodies,
    delete_group_deletes_updates,
    published_update_is_the_stored_frame,
);

// ---- retention on a timer (issue 22, finding 6) ----

/// `max_age` 3 s on every engine's own setting.
fn retention_config() -> Config {
    let mut cfg = config();
    cfg.chat.history_max_age_s = 3;
    cfg.valkey.retention_max_age_s = 3;
    cfg
}

mod retention {
    #[tokio::test]
    async fn memory() {
        super::on_memory_with(super::retention_config(), super::old_messages_go_on_a_timer).await
    }
    #[tokio::test]
    async fn durable() {
        super::on_durable_with(super::retention_config(), super::old_messages_go_on_a_timer).await
    }
    #[tokio::test]
    async fn valkey() {
        super::on_valkey_with(super::retention_config(), super::old_messages_go_on_a_timer).await
    }
}

/// Messages older than `max_age` leave history while the conversation stays
/// idle (no later write): the engine's own timer removes them (the app runs
/// `maintain` every `maintenance_interval`; the durable writer has its own
/// tick). `last_seq` and the epoch stay: the next message gets the next seq.
async fn old_messages_go_on_a_timer(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    let conv = "retained";
    let route = vec![Topic::Conv(conv.into())];
    for i in 1..=3 {
        e.append(new_message(conv, "alice", &format!("r{i}"), "soon gone"), &route).await.expect("append");
    }
    let before = e.history(conv, Page::Before(None, 10)).await.expect("history");
    assert_eq!(before.messages.len(), 3);
    // What the app does: maintain on the engine's interval (none: the engine
    // keeps its own timer).
    let every = e.maintenance_interval();
    let started = std::time::Instant::now();
    let left = loop {
        if let Some(every) = every {
            tokio::time::sleep(every).await;
            e.maintain().await.expect("maintain");
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let page = e.history(conv, Page::Before(None, 10)).await.expect("history");
        if page.messages.is_empty() || started.elapsed() > Duration::from_secs(15) {
            break page;
        }
    };
    assert!(left.messages.is_empty(), "after 15 s idle with max_age 3 s, history holds {:?}", left.messages);
    assert!(started.elapsed() >= Duration::from_secs(2), "not before they are old");
    assert_eq!(e.last_seq(conv).await.expect("last_seq"), 3, "trimming keeps last_seq");
    assert_eq!(left.epoch, before.epoch, "trimming keeps the epoch");
    let next = e.append(new_message(conv, "alice", "r4", "after"), &route).await.expect("append").expect("stored");
    assert_eq!(next.seq, 4, "seqs are never reused");
    // The repeat of a dropped message's id is no longer known (its record
    // went with it), but it never takes an old seq.
    let again = e.append(new_message(conv, "alice", "r1", "again"), &route).await.expect("append").expect("stored");
    assert_eq!(again.seq, 5);
}

/// A local connection as a session would hold it.
struct Client {
    conn: Arc<Conn>,
    rx: Receiver,
}

static NEXT_CONN: AtomicUsize = AtomicUsize::new(1);

impl Client {
    /// Registers a connection of `user` and subscribes it to `convs`, on the
    /// hub and then on the engine (what `Node::open_session` does).
    async fn join(e: &Arc<dyn Engine>, hub: &Hub, user: &str, convs: &[&str]) -> Client {
        let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed) as u64;
        let (conn, rx) = Conn::new(id, user.into(), 1024, 1 << 24);
        hub.register(&conn);
        hub.subscribe(&conn, convs.iter().map(|c| Arc::from(*c)));
        let mut topics = vec![Topic::User(user.into())];
        topics.extend(convs.iter().map(|c| Topic::Conv((*c).into())));
        e.subscribe(&topics).await.expect("subscribe");
        Client { conn, rx }
    }

    /// The next frame, as text.
    async fn next_text(&mut self) -> String {
        let t = tokio::time::timeout(ARRIVAL, self.rx.recv()).await.expect("a frame within the arrival time");
        t.to_text().to_string()
    }

    async fn next(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).expect("frames are JSON")
    }

    /// Nothing is queued right now.
    fn idle(&mut self) -> bool {
        self.rx.try_recv().is_none()
    }
}

fn conv_route(conv: &str) -> Route {
    vec![Topic::Conv(conv.into())]
}

fn new_message(conv: &str, sender: &str, client_msg_id: &str, body: &str) -> NewMessage {
    NewMessage {
        conversation: conv.into(),
        sender: UserRef { id: sender.into(), name: format!("{sender} (name)") },
        body: body.into(),
        client_msg_id: client_msg_id.into(),
        ts_ms: protocol::now_ms(),
        participants: None,
        require_member: false,
        send_budget: false,
        reply_to: None,
    }
}

/// Appends to an open-style conversation and returns the seq.
async fn send(e: &Arc<dyn Engine>, conv: &str, sender: &str, client_msg_id: &str) -> u64 {
    let a = e
        .append(new_message(conv, sender, client_msg_id, &format!("body of {client_msg_id}")), &conv_route(conv))
        .await
        .expect("append")
        .expect("stored");
    assert!(!a.duplicate);
    a.seq
}

async fn send_direct(e: &Arc<dyn Engine>, a: &str, b: &str, sender: &str, client_msg_id: &str) -> u64 {
    let conv = ids::dm_id(a, b);
    let mut m = new_message(&conv, sender, client_msg_id, "direct");
    m.participants = Some([a.to_string(), b.to_string()]);
    let route = vec![Topic::User(a.into()), Topic::User(b.into())];
    e.append(m, &route).await.expect("append").expect("stored").seq
}

fn users(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn seqs(page: &crm_chat::engine::MessagePage) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn typing(n: u32) -> Event {
    Event::new(EventKind::Typing, Text::from(json!({"type": "typing", "n": n}).to_string()))
}

// ---- MessageStore ----

fn member_message(conv: &str, sender: &str, client_msg_id: &str, body: &str) -> NewMessage {
    let mut m = new_message(conv, sender, client_msg_id, body);
    m.require_member = true;
    m
}

async fn append_assigns_gap_free_seqs(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert_eq!(e.last_seq("general").await.unwrap(), 0, "a conversation never written");
    for expected in 1..=5 {
        assert_eq!(send(&e, "general", "alice", &format!("m{expected}")).await, expected);
    }
    assert_eq!(e.last_seq("general").await.unwrap(), 5);
    // Seqs are per conversation.
    assert_eq!(send(&e, "other", "alice", "m1").await, 1);
    assert_eq!(e.last_seq("other").await.unwrap(), 1);
    assert_eq!(e.last_seq("general").await.unwrap(), 5);
}

async fn repeat_returns_first_seq_and_publishes_nothing(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["general"]).await;
    let first = e.append(new_message("general", "alice", "same", "first"), &conv_route("general")).await;
    let first = first.unwrap().unwrap();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!(bob.next().await["seq"], 1);

    // Same sender and client_msg_id, another body: the first seq, not stored again.
    let again = e.append(new_message("general", "alice", "same", "second"), &conv_route("general")).await;
    let again = again.unwrap().unwrap();
    assert_eq!((again.seq, again.ts_ms, again.duplicate), (1, first.ts_ms, true));
    assert_eq!(e.last_seq("general").await.unwrap(), 1);
    let page = e.history("general", Page::After(0, 10)).await.unwrap();
    assert_eq!(&*page.messages[0].body, "first");

    // Another sender may use the same client_msg_id.
    assert_eq!(send(&e, "general", "carol", "same").await, 2);
    // The repeat published nothing: the next frame is seq 2 (pub/sub keeps
    // a channel's order, so a published repeat would have come first).
    assert_eq!(bob.next().await["seq"], 2);
    assert!(bob.idle());
}

async fn published_message_is_the_stored_frame(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["deal"]).await;
    let bodies = ["plain", "quotes \" and \\ backslash", "ctl \u{0}\u{1f}\t\n", "émoji 🎉👩‍👩‍👧 日本語"];
    for (i, body) in bodies.iter().enumerate() {
        let mut m = new_message("deal", "zoë", &format!("id-\"{i}\"-🎉"), body);
        m.sender.name = "Zoë \"Z\" \\ 🎉".into();
        e.append(m, &conv_route("deal")).await.unwrap().unwrap();
    }
    let page = e.history("deal", Page::After(0, 10)).await.unwrap();
    assert_eq!(seqs(&page), vec![1, 2, 3, 4]);
    for (stored, body) in page.messages.iter().zip(bodies) {
        assert_eq!(&*stored.body, body);
        assert_eq!(&*stored.sender_name, "Zoë \"Z\" \\ 🎉");
        // Live frames are, byte for byte, the protocol's rendering of what
        // history returns, in seq order.
        let live = bob.next_text().await;
        assert_eq!(live, protocol::render(&protocol::ServerFrame::Message(message_frame("deal", stored))).as_str());
    }
}

async fn require_member_refuses_non_members(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut alice = Client::join(&e, &hub, "alice", &["team"]).await;
    let member_send = |sender: &str, cmid: &str| {
        let mut m = new_message("team", sender, cmid, "hi");
        m.require_member = true;
        m
    };
    // No such group: nothing is created.
    assert!(e.append(member_send("alice", "a0"), &conv_route("team")).await.unwrap().is_none());
    assert_eq!(e.last_seq("team").await.unwrap(), 0);

    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    assert!(e.append(member_send("carol", "c1"), &conv_route("team")).await.unwrap().is_none());
    assert_eq!(e.last_seq("team").await.unwrap(), 0, "a refused send stores nothing");
    let a = e.append(member_send("alice", "a1"), &conv_route("team")).await.unwrap().unwrap();
    assert_eq!(a.seq, 1);
    // The refused send published nothing either.
    let f = alice.next().await;
    assert_eq!((f["seq"].as_u64(), f["sender"]["id"].as_str()), (Some(1), Some("alice")));

    // Removed: refused from then on.
    e.update_group("team", vec![], users(&["alice"])).await.unwrap().unwrap();
    assert!(e.append(member_send("alice", "a2"), &conv_route("team")).await.unwrap().is_none());
    assert_eq!(e.last_seq("team").await.unwrap(), 1);
}

async fn history_pages_before_and_after(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    let empty = e.history("general", Page::Before(None, 10)).await.unwrap();
    assert!(empty.messages.is_empty() && !empty.has_more);
    for i in 1..=5 {
        send(&e, "general", if i % 2 == 0 { "bob" } else { "alice" }, &format!("m{i}")).await;
    }
    let page = |p| {
        let e = e.clone();
        async move {
            let got = e.history("general", p).await.unwrap();
            (seqs(&got), got.has_more)
        }
    };
    // Newest first pages (ascending within a page).
    assert_eq!(page(Page::Before(None, 2)).await, (vec![4, 5], true));
    assert_eq!(page(Page::Before(Some(4), 2)).await, (vec![2, 3], true));
    assert_eq!(page(Page::Before(Some(2), 2)).await, (vec![1], false));
    assert_eq!(page(Page::Before(Some(1), 2)).await, (vec![], false));
    assert_eq!(page(Page::Before(None, 5)).await, (vec![1, 2, 3, 4, 5], false));
    assert_eq!(page(Page::Before(Some(99), 10)).await, (vec![1, 2, 3, 4, 5], false));
    // Forward pages.
    assert_eq!(page(Page::After(0, 2)).await, (vec![1, 2], true));
    assert_eq!(page(Page::After(2, 2)).await, (vec![3, 4], true));
    assert_eq!(page(Page::After(3, 2)).await, (vec![4, 5], false));
    assert_eq!(page(Page::After(5, 2)).await, (vec![], false));
    assert_eq!(page(Page::After(0, 10)).await, (vec![1, 2, 3, 4, 5], false));

    let all = e.history("general", Page::After(0, 10)).await.unwrap();
    let m = &all.messages[1];
    assert_eq!(
        (&*m.sender_id, &*m.sender_name, &*m.body, &*m.client_msg_id),
        ("bob", "bob (name)", "body of m2", "m2")
    );
    assert!(m.ts_ms > 0);
}

async fn epoch_is_present_and_stable(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    send(&e, "general", "alice", "m1").await;
    let first = e.history("general", Page::After(0, 10)).await.unwrap().epoch;
    assert_eq!(first.len(), 16, "16 hex digits: {first:?}");
    assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
    send(&e, "general", "bob", "m2").await;
    for page in [Page::Before(None, 1), Page::After(1, 1), Page::After(0, 10)] {
        assert_eq!(e.history("general", page).await.unwrap().epoch, first);
    }
    let counters = e.counters("alice", &["general".to_string()]).await.unwrap();
    assert_eq!(counters[0].epoch, first, "welcome and history agree");
}

async fn receipts_are_range_checked_and_monotonic(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert_eq!(e.set_receipt("general", "bob", 1, false).await.unwrap(), ReceiptOutcome::OutOfRange { last_seq: 0 });
    assert!(e.receipts("general").await.unwrap().is_empty());
    for i in 1..=3 {
        send(&e, "general", "alice", &format!("m{i}")).await;
    }
    let row = |user: &str, d, r| ReceiptRow { user: user.into(), delivered_seq: d, read_seq: r };
    let set = |user: &'static str, seq: i64, read: bool| {
        let e = e.clone();
        async move { e.set_receipt("general", user, seq, read).await.unwrap() }
    };
    assert_eq!(set("bob", 0, false).await, ReceiptOutcome::OutOfRange { last_seq: 3 });
    assert_eq!(set("bob", -1, true).await, ReceiptOutcome::OutOfRange { last_seq: 3 });
    assert_eq!(set("bob", 4, true).await, ReceiptOutcome::OutOfRange { last_seq: 3 });
    assert_eq!(set("bob", 2, false).await, ReceiptOutcome::Changed(row("bob", 2, 0)));
    assert_eq!(set("bob", 2, false).await, ReceiptOutcome::Unchanged);
    assert_eq!(set("bob", 1, false).await, ReceiptOutcome::Unchanged, "marks only rise");
    assert_eq!(set("bob", 1, true).await, ReceiptOutcome::Changed(row("bob", 2, 1)));
    assert_eq!(set("bob", 3, true).await, ReceiptOutcome::Changed(row("bob", 3, 3)), "read implies delivered");
    assert_eq!(set("bob", 2, true).await, ReceiptOutcome::Unchanged);
    assert_eq!(set("carol", 1, false).await, ReceiptOutcome::Changed(row("carol", 1, 0)));
    assert_eq!(set("abe", 3, true).await, ReceiptOutcome::Changed(row("abe", 3, 3)));
    assert_eq!(e.receipts("general").await.unwrap(), vec![row("abe", 3, 3), row("bob", 3, 3), row("carol", 1, 0)]);
}

async fn counters_count_unread_messages_of_others(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    for (i, sender) in ["alice", "bob", "bob", "alice", "bob"].iter().enumerate() {
        send(&e, "general", sender, &format!("m{i}")).await;
    }
    let ids = ["general".to_string(), "nothing-here".to_string()];
    let c = e.counters("alice", &ids).await.unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!((c[0].last_seq, c[0].read_seq, c[0].unread), (5, 0, 3), "bob's 2, 3 and 5");
    assert_eq!((c[1].last_seq, c[1].read_seq, c[1].unread), (0, 0, 0));
    e.set_receipt("general", "alice", 3, true).await.unwrap();
    let c = e.counters("alice", &ids[..1]).await.unwrap();
    assert_eq!((c[0].last_seq, c[0].read_seq, c[0].unread), (5, 3, 1), "bob's 5");
    // Delivered is not read.
    e.set_receipt("general", "bob", 5, false).await.unwrap();
    let c = e.counters("bob", &ids[..1]).await.unwrap();
    assert_eq!((c[0].read_seq, c[0].unread), (0, 2), "alice's 1 and 4");
    assert!(e.counters("alice", &[]).await.unwrap().is_empty());
}

async fn user_conversations_lists_groups_and_direct_with_messages(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert!(e.user_conversations("alice").await.unwrap().is_empty());
    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    e.put_group("board", "Board", users(&["alice"])).await.unwrap();
    send_direct(&e, "alice", "carol", "carol", "d1").await;
    // Open conversations are not listed (the node lists them from config).
    e.join_open("general", "alice").await.unwrap();
    send(&e, "general", "alice", "g1").await;
    let dm = ids::dm_id("alice", "carol");
    let mut want = vec!["board".to_string(), "team".to_string(), dm.clone()];
    want.sort();
    assert_eq!(e.user_conversations("alice").await.unwrap(), want);
    assert_eq!(e.user_conversations("carol").await.unwrap(), vec![dm.clone()]);
    assert_eq!(e.user_conversations("bob").await.unwrap(), vec!["team".to_string()]);
    // Removal unlists the group.
    e.update_group("team", vec![], users(&["alice"])).await.unwrap();
    let mut want = vec!["board".to_string(), dm];
    want.sort();
    assert_eq!(e.user_conversations("alice").await.unwrap(), want);
}

async fn put_and_update_group_report_changes(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert!(!e.is_member("team", "alice").await.unwrap(), "no group, no members");
    assert_eq!(e.update_group("team", users(&["alice"]), vec![]).await.unwrap(), None, "update needs a group");
    assert!(e.group("team").await.unwrap().is_none(), "a refused update creates nothing");

    let object = |members: &[&str], last_seq| ConversationObject {
        id: "team".into(),
        title: "Team".into(),
        members: users(members),
        last_seq,
    };
    let change = |members: &[&str], last_seq, added: &[&str], removed: &[&str]| MembershipChange {
        conversation: object(members, last_seq),
        added: users(added),
        removed: users(removed),
    };
    // Duplicates and order do not matter: members are sorted and unique.
    let c = e.put_group("team", "Team", users(&["bob", "alice", "bob"])).await.unwrap();
    assert_eq!(c, change(&["alice", "bob"], 0, &["alice", "bob"], &[]));
    assert!(e.is_member("team", "alice").await.unwrap());
    assert!(!e.is_member("team", "carol").await.unwrap());

    let mut m = new_message("team", "alice", "t1", "hi");
    m.require_member = true;
    e.append(m, &conv_route("team")).await.unwrap().unwrap();

    // Replace: against the members just before.
    let c = e.put_group("team", "Team", users(&["carol", "bob"])).await.unwrap();
    assert_eq!(c, change(&["bob", "carol"], 1, &["carol"], &["alice"]));
    assert!(!e.is_member("team", "alice").await.unwrap());

    // Update: only real changes are reported; a removal of a non-member
    // and an addition of a member are none, nor is a remove-and-add.
    let c = e.update_group("team", users(&["dave", "bob", "carol"]), users(&["carol", "erin"])).await.unwrap();
    assert_eq!(c, Some(change(&["bob", "carol", "dave"], 1, &["dave"], &[])));
    let c = e.update_group("team", users(&["zed"]), users(&["bob", "dave"])).await.unwrap();
    assert_eq!(c, Some(change(&["carol", "zed"], 1, &["zed"], &["bob", "dave"])));
    assert_eq!(
        e.group("team").await.unwrap().as_deref(),
        Some(&Group { title: "Team".into(), members: users(&["carol", "zed"]) })
    );
    assert_eq!(e.member_count("team", false).await.unwrap(), 2);

    // A new title, and an empty group still exists.
    let c = e.put_group("team", "Renamed", vec![]).await.unwrap();
    assert_eq!((c.conversation.title.as_str(), c.removed, c.added), ("Renamed", users(&["carol", "zed"]), vec![]));
    assert_eq!(e.group("team").await.unwrap().as_deref(), Some(&Group { title: "Renamed".into(), members: vec![] }));
    assert!(e.update_group("team", vec![], vec![]).await.unwrap().is_some());
}

async fn groups_answer_in_order(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    e.put_group("a", "A", users(&["u2", "u1"])).await.unwrap();
    e.put_group("c", "C", users(&["u3"])).await.unwrap();
    // A conversation with messages but no group is no group.
    send(&e, "b", "u1", "m1").await;
    let ask = users(&["c", "b", "a", "missing", "a"]);
    let got: Vec<Option<Group>> = e.groups(&ask).await.unwrap().into_iter().map(|g| g.as_deref().cloned()).collect();
    let a = Group { title: "A".into(), members: users(&["u1", "u2"]) };
    let c = Group { title: "C".into(), members: users(&["u3"]) };
    assert_eq!(got, vec![Some(c), None, Some(a.clone()), None, Some(a.clone())]);
    assert_eq!(e.group("a").await.unwrap().as_deref(), Some(&a));
    assert!(e.groups(&[]).await.unwrap().is_empty());

    // What welcome reads: members listed only to a member, and only up to the limit.
    let head = |title: &str, member: bool, members: Option<&[&str]>| {
        Some(GroupHead { title: title.into(), member, members: members.map(users) })
    };
    let ask = users(&["c", "b", "a", "missing"]);
    assert_eq!(
        e.group_heads(&ask, "u1", 2).await.unwrap(),
        vec![head("C", false, None), None, head("A", true, Some(&["u1", "u2"])), None]
    );
    assert_eq!(e.group_heads(&ask, "u1", 1).await.unwrap()[2], head("A", true, None), "over the limit");
    assert_eq!(e.group_heads(&ask, "u3", 1).await.unwrap()[0], head("C", true, Some(&["u3"])));
    assert!(e.group_heads(&[], "u1", 10).await.unwrap().is_empty());
    // Which readers are members (a sync's receipts).
    assert_eq!(e.are_members("a", &["u2", "x", "u1"]).await.unwrap(), [true, false, true]);
    assert_eq!(e.are_members("missing", &["u1"]).await.unwrap(), [false]);
    assert_eq!(e.are_members("b", &["u1"]).await.unwrap(), [false], "not a group");
    assert!(e.are_members("a", &[]).await.unwrap().is_empty());
}

async fn open_conversations_count_known_members(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert!(e.open_members("general").await.unwrap().is_empty());
    assert_eq!(e.member_count("general", true).await.unwrap(), 0);
    assert_eq!(e.join_open("general", "bob").await.unwrap(), 1);
    assert_eq!(e.join_open("general", "bob").await.unwrap(), 1, "joining again changes nothing");
    assert_eq!(e.join_open("general", "alice").await.unwrap(), 2);
    assert_eq!(e.join_open("random", "alice").await.unwrap(), 1);
    assert_eq!(e.open_members("general").await.unwrap(), users(&["alice", "bob"]));
    assert_eq!(e.member_count("general", true).await.unwrap(), 2);
    assert_eq!(e.member_count("random", true).await.unwrap(), 1);
    // Open members are not group members.
    assert_eq!(e.member_count("general", false).await.unwrap(), 0);
    assert!(!e.is_member("general", "bob").await.unwrap());
    assert_eq!(e.member_count("nowhere", false).await.unwrap(), 0);
}

// ---- Broker ----

async fn publish_reaches_subscribed_local_connections(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut alice = Client::join(&e, &hub, "alice", &["general"]).await;
    let mut bob = Client::join(&e, &hub, "bob", &["general"]).await;
    let mut carol = Client::join(&e, &hub, "carol", &[]).await;

    e.publish(&conv_route("general"), typing(1)).await.unwrap();
    assert_eq!(alice.next().await["n"], 1);
    assert_eq!(bob.next().await["n"], 1);

    // A user topic reaches that user's connections only.
    e.publish(&vec![Topic::User("carol".into())], typing(2)).await.unwrap();
    assert_eq!(carol.next().await["n"], 2);

    // An excluded user hears nothing; events of one topic keep their order.
    e.publish(&conv_route("general"), typing(3).excluding("alice")).await.unwrap();
    e.publish(&conv_route("general"), typing(4)).await.unwrap();
    assert_eq!(bob.next().await["n"], 3);
    assert_eq!(bob.next().await["n"], 4);
    assert_eq!(alice.next().await["n"], 4);

    // Several events, several routes, in order per topic.
    let events = vec![
        (conv_route("general"), typing(5)),
        (vec![Topic::User("carol".into()), Topic::User("alice".into())], typing(6)),
        (conv_route("general"), typing(7)),
    ];
    e.publish_all(events).await.unwrap();
    assert_eq!(bob.next().await["n"], 5);
    assert_eq!(bob.next().await["n"], 7);
    assert_eq!(carol.next().await["n"], 6);
    // alice follows both topics: all three, 5 before 7 (one topic's order).
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(alice.next().await["n"].as_u64().unwrap());
    }
    let at = |n| got.iter().position(|g| *g == n).expect("delivered");
    assert!(at(5) < at(7) && at(6) < 3, "{got:?}");
    e.publish_all(vec![]).await.unwrap();

    // A topic nobody here follows reaches nobody here.
    e.publish(&conv_route("elsewhere"), typing(8)).await.unwrap();
    e.publish(&conv_route("general"), typing(9)).await.unwrap();
    assert_eq!(bob.next().await["n"], 9);
    assert_eq!(alice.next().await["n"], 9);
    assert!(bob.idle() && carol.idle() && alice.idle());

    // After unsubscribing locally, the engine may drop the channel, and the
    // connection that left hears nothing more.
    hub.unsubscribe(&bob.conn, &[Arc::from("general")]);
    e.topics_changed();
    e.publish(&conv_route("general"), typing(10)).await.unwrap();
    e.publish(&vec![Topic::User("bob".into())], typing(11)).await.unwrap();
    // Once alice has 10, its dispatch is over: bob was not among its recipients.
    assert_eq!(alice.next().await["n"], 10);
    assert_eq!(bob.next().await["n"], 11);
    assert!(bob.idle());

    // Typing gate: the first event of a user in a conversation may go out.
    assert!(e.typing_gate("alice", "general", Duration::from_secs(1)).await.unwrap());
}

// ---- Presence ----

async fn presence_counts_connections(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    assert!(e.online(None).await.unwrap().is_empty());
    assert_eq!(e.connection_count("alice").await.unwrap(), 0);

    assert!(e.presence_up("alice").await.unwrap(), "offline -> online");
    assert!(!e.presence_up("alice").await.unwrap(), "a second connection");
    assert!(e.presence_up("bob").await.unwrap());
    assert_eq!(e.connection_count("alice").await.unwrap(), 2);
    assert_eq!(e.connection_count("bob").await.unwrap(), 1);
    assert_eq!(e.online(None).await.unwrap(), users(&["alice", "bob"]));
    assert_eq!(e.online(Some(&users(&["carol", "bob"]))).await.unwrap(), users(&["bob"]));
    assert!(e.online(Some(&[])).await.unwrap().is_empty());

    assert!(!e.presence_down("alice").await.unwrap(), "one connection left");
    assert_eq!(e.connection_count("alice").await.unwrap(), 1);
    assert_eq!(e.online(Some(&users(&["alice"]))).await.unwrap(), users(&["alice"]));
    assert!(e.presence_down("alice").await.unwrap(), "the last one closed");
    assert_eq!(e.connection_count("alice").await.unwrap(), 0);
    assert_eq!(e.online(None).await.unwrap(), users(&["bob"]));

    // Online again after going offline.
    assert!(e.presence_up("alice").await.unwrap());
    assert!(e.presence_down("bob").await.unwrap());
    assert_eq!(e.online(None).await.unwrap(), users(&["alice"]));
}

async fn erase_sender_erases_bodies_everywhere(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    assert_eq!(e.erase_sender("alice").await.unwrap(), 0, "nothing sent yet");
    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    let mut bob = Client::join(&e, &hub, "bob", &["general", "team"]).await;
    // Alice in an open conversation, a group and a direct one; bob in between.
    let g1 = send(&e, "general", "alice", "g1").await;
    send(&e, "general", "bob", "g2").await;
    let g3 = send(&e, "general", "alice", "g3").await;
    let team = e.append(member_message("team", "alice", "t1", "secret plan"), &conv_route("team")).await;
    let t1 = team.unwrap().unwrap();
    e.append(member_message("team", "bob", "t2", "bob's reply"), &conv_route("team")).await.unwrap().unwrap();
    send_direct(&e, "alice", "bob", "alice", "d1").await;
    send_direct(&e, "alice", "bob", "bob", "d2").await;
    send(&e, "other", "carol", "o1").await;
    // Bob's 7: general and team, and the direct ones on his user topic.
    for _ in 0..7 {
        bob.next().await;
    }
    let before = e.history("general", Page::After(0, 10)).await.unwrap();

    assert_eq!(e.erase_sender("alice").await.unwrap(), 4);
    assert!(bob.idle(), "an erasure publishes nothing");
    let general = e.history("general", Page::After(0, 10)).await.unwrap();
    assert_eq!(seqs(&general), vec![1, 2, 3]);
    assert_eq!(general.epoch, before.epoch, "an erasure loses no history: same epoch");
    for (m, old) in general.messages.iter().zip(&before.messages) {
        let erased = m.seq == g1 || m.seq == g3;
        assert_eq!(m.deleted, erased, "seq {}", m.seq);
        assert_eq!(&*m.body, if erased { "" } else { &*old.body });
        // Everything but the body stays.
        assert_eq!(
            (m.seq, m.ts_ms, &*m.sender_id, &*m.sender_name, &*m.client_msg_id),
            (old.seq, old.ts_ms, &*old.sender_id, &*old.sender_name, &*old.client_msg_id)
        );
    }
    let team = e.history("team", Page::Before(None, 10)).await.unwrap();
    let shown: Vec<(u64, bool, &str)> = team.messages.iter().map(|m| (m.seq, m.deleted, &*m.body)).collect();
    assert_eq!(shown, vec![(1, true, ""), (2, false, "bob's reply")]);
    let dm = e.history(&ids::dm_id("alice", "bob"), Page::Before(Some(3), 1)).await.unwrap();
    assert_eq!((seqs(&dm), dm.has_more, dm.messages[0].deleted), (vec![2], true, false));
    let dm = e.history(&ids::dm_id("alice", "bob"), Page::Before(Some(2), 1)).await.unwrap();
    assert_eq!((&*dm.messages[0].body, dm.messages[0].deleted, &*dm.messages[0].client_msg_id), ("", true, "d1"));
    let other = e.history("other", Page::After(0, 10)).await.unwrap();
    assert!(!other.messages[0].deleted, "other users untouched");

    // Idempotent: nothing left to erase.
    assert_eq!(e.erase_sender("alice").await.unwrap(), 0);
    // The idempotency record stays: a retry is a duplicate of the erased message.
    let retry = e.append(member_message("team", "alice", "t1", "secret plan"), &conv_route("team")).await;
    let retry = retry.unwrap().unwrap();
    assert_eq!((retry.seq, retry.ts_ms, retry.duplicate), (t1.seq, t1.ts_ms, true));
    assert_eq!(e.last_seq("team").await.unwrap(), 2);
    assert!(bob.idle(), "the duplicate published nothing");
    // What alice sends afterwards is kept, and delivered live as ever.
    let g4 = send(&e, "general", "alice", "g4").await;
    assert_eq!(g4, 4);
    assert_eq!(bob.next().await["seq"], 4);
    let last = e.history("general", Page::After(3, 10)).await.unwrap();
    assert_eq!((&*last.messages[0].body, last.messages[0].deleted), ("body of g4", false));
    // Unread counts still count erased messages as messages.
    let c = e.counters("bob", &["general".to_string()]).await.unwrap();
    assert_eq!((c[0].last_seq, c[0].unread), (4, 3));
}

async fn delete_group_removes_history_and_starts_a_new_epoch(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    assert!(e.delete_group("team").await.unwrap().is_none(), "no such group");
    e.put_group("team", "Team", users(&["bob", "alice"])).await.unwrap();
    let mut bob = Client::join(&e, &hub, "bob", &["team"]).await;
    for (i, sender) in ["alice", "alice", "bob"].iter().enumerate() {
        let m = member_message("team", sender, &format!("m{i}"), "hi");
        e.append(m, &conv_route("team")).await.unwrap().unwrap();
        bob.next().await;
    }
    e.set_receipt("team", "bob", 3, true).await.unwrap();
    let old = e.history("team", Page::After(0, 10)).await.unwrap().epoch;

    let change = e.delete_group("team").await.unwrap().expect("deleted");
    assert_eq!(change.removed, users(&["alice", "bob"]));
    assert!(change.added.is_empty());
    assert_eq!(
        change.conversation,
        ConversationObject { id: "team".into(), title: "Team".into(), members: vec![], last_seq: 0 }
    );
    assert!(e.group("team").await.unwrap().is_none());
    assert!(!e.is_member("team", "alice").await.unwrap());
    assert_eq!(e.member_count("team", false).await.unwrap(), 0);
    assert_eq!(e.last_seq("team").await.unwrap(), 0);
    let page = e.history("team", Page::Before(None, 10)).await.unwrap();
    assert!(page.messages.is_empty() && !page.has_more);
    assert!(e.receipts("team").await.unwrap().is_empty());
    assert!(!e.user_conversations("alice").await.unwrap().contains(&"team".to_string()));
    assert!(e.update_group("team", users(&["carol"]), vec![]).await.unwrap().is_none());
    let refused = e.append(member_message("team", "alice", "late", "hi"), &conv_route("team")).await;
    assert!(refused.unwrap().is_none(), "a send after the delete stores nothing");
    assert!(e.delete_group("team").await.unwrap().is_none(), "a repeat deletes nothing");

    // Created again: seq 1, under another epoch; nothing of the old one is left
    // (no idempotency record, no own seqs counted against unread).
    e.put_group("team", "Team again", users(&["alice", "bob"])).await.unwrap();
    assert_ne!(e.history("team", Page::After(0, 10)).await.unwrap().epoch, old);
    let again = e.append(member_message("team", "bob", "m2", "hi"), &conv_route("team")).await.unwrap().unwrap();
    assert_eq!((again.seq, again.duplicate), (1, false));
    let page = e.history("team", Page::After(0, 10)).await.unwrap();
    assert_eq!(seqs(&page), vec![1]);
    assert!(!page.epoch.is_empty());
    assert_ne!(page.epoch, old, "a new epoch: seq 1 is not a repeat of the old seq 1");
    let c = e.counters("alice", &["team".to_string()]).await.unwrap();
    assert_eq!((c[0].last_seq, c[0].read_seq, c[0].unread, &c[0].epoch), (1, 0, 1, &page.epoch));
    // A node that delivered seqs 1..3 of the old epoch delivers the new seq 1.
    let f = bob.next().await;
    assert_eq!((f["seq"].as_u64(), f["sender"]["id"].as_str()), (Some(1), Some("bob")));
}

async fn erase_sender_in_a_long_history_while_others_send(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    // Longer than an erasure step (the Valkey engine copies 1000 seqs per call).
    let senders = ["alice", "bob", "carol", "dave", "erin"];
    for i in 0..2500 {
        send(&e, "general", senders[i % 5], &format!("m{i}")).await;
    }
    // Others keep sending while alice's messages are erased.
    let writer = {
        let e = e.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                send(&e, "general", "frank", &format!("f{i}")).await;
            }
        })
    };
    assert_eq!(e.erase_sender("alice").await.unwrap(), 500);
    writer.await.unwrap();
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = e.history("general", Page::After(after, 200)).await.unwrap();
        after = page.messages.last().map_or(after, |m| m.seq);
        all.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=2700).collect::<Vec<u64>>(), "nothing lost");
    for m in &all {
        let alice = &*m.sender_id == "alice";
        assert_eq!(m.deleted, alice, "seq {}", m.seq);
        if alice {
            assert!(m.body.is_empty());
        } else {
            assert_eq!(&*m.body, format!("body of {}", m.client_msg_id), "seq {}", m.seq);
        }
    }
    assert_eq!(e.erase_sender("alice").await.unwrap(), 0);
}
