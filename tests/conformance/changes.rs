//! The contracts of messages people can change (PROTOCOL v1.2), run on every
//! engine by `tests/engine_conformance.rs` (this file is its module).

use super::*;
use crm_chat::engine::{Change, NewUpdate, Refusal, UpdateOutcome};

fn change(conv: &str, user: &str, target: u64, change: Change) -> NewUpdate {
    NewUpdate {
        conversation: conv.into(),
        user: UserRef { id: user.into(), name: format!("{user} (name)") },
        target,
        change,
        ts_ms: protocol::now_ms(),
        require_member: false,
        moderation: false,
        edit_window_ms: 86_400_000,
        max_reactions: 20,
    }
}

fn edit(conv: &str, user: &str, target: u64, body: &str) -> NewUpdate {
    change(conv, user, target, Change::Edit(body.into()))
}

fn react(conv: &str, user: &str, target: u64, emoji: &str, on: bool) -> NewUpdate {
    change(conv, user, target, Change::Reaction { emoji: emoji.into(), on })
}

/// Stores a change that must change something; returns its seq.
async fn apply(e: &Arc<dyn Engine>, u: NewUpdate) -> u64 {
    let conv = u.conversation.clone();
    match e.update(u, &conv_route(&conv)).await.expect("update") {
        UpdateOutcome::Applied(a) if !a.duplicate => a.seq,
        other => panic!("expected a stored change, got {other:?}"),
    }
}

async fn outcome(e: &Arc<dyn Engine>, u: NewUpdate) -> UpdateOutcome {
    let conv = u.conversation.clone();
    e.update(u, &conv_route(&conv)).await.expect("update")
}

fn refused(r: Refusal) -> UpdateOutcome {
    UpdateOutcome::Refused(r)
}

pub(super) async fn updates_share_the_seq_counter_and_are_published(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["general"]).await;
    let m1 = send(&e, "general", "alice", "c1").await;
    let m2 = send(&e, "general", "alice", "c2").await;
    bob.next().await;
    bob.next().await;
    let u = apply(&e, edit("general", "alice", m1, "hi all")).await;
    assert_eq!(u, 3, "the next seq of the conversation");
    let f = bob.next().await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64(), f["target"].as_u64(), f["kind"].as_str(), f["body"].as_str()),
        (Some("update"), Some(3), Some(m1), Some("edit"), Some("hi all"))
    );
    assert_eq!(f["user"], json!({"id": "alice", "name": "alice (name)"}));
    assert_eq!(e.last_seq("general").await.unwrap(), 3);
    let r = apply(&e, react("general", "bob", m2, "👍", true)).await;
    assert_eq!(r, 4);
    let f = bob.next().await;
    assert_eq!(
        (f["kind"].as_str(), f["emoji"].as_str(), f["on"].as_bool()),
        (Some("reaction"), Some("👍"), Some(true))
    );
    assert_eq!(send(&e, "general", "bob", "c3").await, 5, "messages go on after updates");
    let d = apply(&e, change("general", "alice", m2, Change::Delete)).await;
    assert_eq!(d, 6);
    bob.next().await;
    let f = bob.next().await;
    assert_eq!((f["kind"].as_str(), f.get("body")), (Some("delete"), None));

    // History: messages only, each in its current state.
    let page = e.history("general", Page::Before(None, 50)).await.unwrap();
    assert_eq!(seqs(&page), vec![1, 2, 5]);
    assert!(page.updates.is_empty());
    let (a, b) = (&page.messages[0], &page.messages[1]);
    assert_eq!((&*a.body, a.edited_at.is_some(), a.deleted), ("hi all", true, false));
    assert_eq!((&*b.body, b.deleted), ("", true));
    assert_eq!(b.reactions.len(), 1, "reactions stay on a deleted message");
    let after = e.history("general", Page::After(1, 50)).await.unwrap();
    assert_eq!(seqs(&after), vec![2, 5]);
    // Sync: messages and updates in seq order.
    let sync = e.history("general", Page::Sync(0, 50)).await.unwrap();
    assert_eq!(seqs(&sync), vec![1, 2, 5]);
    let ups: Vec<(u64, u64, &str)> = sync.updates.iter().map(|u| (u.seq, u.target, u.change.kind())).collect();
    assert_eq!(ups, vec![(3, 1, "edit"), (4, 2, "reaction"), (6, 2, "delete")]);
    assert!(!sync.has_more);
    // `limit` counts both.
    let part = e.history("general", Page::Sync(1, 3)).await.unwrap();
    assert_eq!((seqs(&part), part.updates.iter().map(|u| u.seq).collect::<Vec<_>>()), (vec![2], vec![3, 4]));
    assert!(part.has_more);
    let rest = e.history("general", Page::Sync(4, 3)).await.unwrap();
    assert_eq!((seqs(&rest), rest.updates.len(), rest.has_more), (vec![5], 1, false));
    // What reply_to may name: a message, never an update.
    assert!(e.is_message("general", 1).await.unwrap());
    assert!(!e.is_message("general", 3).await.unwrap(), "an update");
    assert!(!e.is_message("general", 0).await.unwrap());
    assert!(!e.is_message("general", 7).await.unwrap());
    assert!(!e.is_message("nowhere", 1).await.unwrap());
}

pub(super) async fn changes_are_idempotent_by_state(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["general"]).await;
    let m = send(&e, "general", "alice", "c1").await;
    bob.next().await;
    let dup = |seq| move |o: UpdateOutcome| matches!(o, UpdateOutcome::Applied(a) if a.duplicate && a.seq == seq);
    // Nothing changed yet: the target's own seq.
    assert!(dup(m)(outcome(&e, edit("general", "alice", m, "body of c1")).await));
    assert!(dup(m)(outcome(&e, react("general", "bob", m, "👍", false)).await));
    let u = apply(&e, edit("general", "alice", m, "fixed")).await;
    bob.next().await;
    assert!(dup(u)(outcome(&e, edit("general", "alice", m, "fixed")).await), "a retried edit");
    let r = apply(&e, react("general", "bob", m, "👍", true)).await;
    bob.next().await;
    assert!(dup(r)(outcome(&e, react("general", "bob", m, "👍", true)).await), "a retried reaction");
    let d = apply(&e, change("general", "alice", m, Change::Delete)).await;
    bob.next().await;
    assert!(dup(d)(outcome(&e, change("general", "alice", m, Change::Delete)).await), "a retried delete");
    assert_eq!(e.last_seq("general").await.unwrap(), d, "repeats store nothing");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(bob.idle(), "repeats publish nothing");
}

pub(super) async fn change_rules_refuse_and_store_nothing(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["general", "team"]).await;
    let m = send(&e, "general", "alice", "c1").await;
    let other = send(&e, "general", "bob", "c2").await;
    let u = apply(&e, react("general", "bob", m, "a", true)).await;
    for _ in 0..3 {
        bob.next().await;
    }
    let last = e.last_seq("general").await.unwrap();
    assert_eq!(outcome(&e, edit("general", "alice", 99, "x")).await, refused(Refusal::NoTarget));
    assert_eq!(outcome(&e, edit("general", "alice", 0, "x")).await, refused(Refusal::NoTarget));
    assert_eq!(outcome(&e, react("general", "bob", u, "b", true)).await, refused(Refusal::NoTarget), "an update");
    assert_eq!(outcome(&e, edit("nowhere", "alice", 1, "x")).await, refused(Refusal::NoTarget));
    assert_eq!(outcome(&e, edit("general", "bob", m, "x")).await, refused(Refusal::NotSender));
    assert_eq!(outcome(&e, change("general", "alice", other, Change::Delete)).await, refused(Refusal::NotSender));
    let mut late = edit("general", "alice", m, "x");
    late.ts_ms += 86_400_001;
    assert_eq!(outcome(&e, late.clone()).await, refused(Refusal::WindowClosed));
    late.edit_window_ms = 0;
    assert!(matches!(outcome(&e, late).await, UpdateOutcome::Applied(_)), "0: no window");
    bob.next().await;
    let mut few = react("general", "carol", m, "b", true);
    few.max_reactions = 1;
    assert_eq!(outcome(&e, few.clone()).await, refused(Refusal::TooManyReactions));
    few.change = Change::Reaction { emoji: "a".into(), on: true };
    assert!(matches!(outcome(&e, few).await, UpdateOutcome::Applied(_)), "an emoji already there");
    bob.next().await;
    // Moderation: neither the sender rule nor the window.
    let mut moderated = edit("general", "supervisor", m, "moderated");
    moderated.moderation = true;
    moderated.ts_ms += 10 * 86_400_000;
    apply(&e, moderated).await;
    bob.next().await;
    apply(&e, change("general", "alice", m, Change::Delete)).await;
    bob.next().await;
    assert_eq!(outcome(&e, edit("general", "alice", m, "back")).await, refused(Refusal::Deleted));
    // Groups: members only, checked with the write.
    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    let t = e.append(member_message("team", "alice", "t1", "hi"), &conv_route("team")).await.unwrap().unwrap();
    bob.next().await;
    let mut outsider = react("team", "mallory", t.seq, "a", true);
    outsider.require_member = true;
    assert_eq!(outcome(&e, outsider).await, refused(Refusal::NotMember));
    let mut absent = react("ghost", "mallory", 1, "a", true);
    absent.require_member = true;
    assert_eq!(outcome(&e, absent).await, refused(Refusal::NotMember));
    assert_eq!(e.last_seq("team").await.unwrap(), 1);
    assert_eq!(e.last_seq("general").await.unwrap(), last + 4, "only the four accepted changes");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(bob.idle(), "a refused change publishes nothing");
}

pub(super) async fn reactions_keep_order_and_history_costs_messages(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    let m1 = send(&e, "general", "alice", "c1").await;
    for (user, emoji, on) in
        [("bob", "👍", true), ("carol", "❤️", true), ("dave", "👍", true), ("bob", "👍", false), ("bob", "👍", true)]
    {
        apply(&e, react("general", user, m1, emoji, on)).await;
    }
    // Many updates between two messages: a page of messages skips them.
    for i in 0..30 {
        apply(&e, react("general", "erin", m1, "😂", i % 2 == 0)).await;
    }
    let m2 = send(&e, "general", "bob", "c2").await;
    let page = e.history("general", Page::Before(None, 2)).await.unwrap();
    assert_eq!((seqs(&page), page.has_more), (vec![m1, m2], false));
    let page = e.history("general", Page::Before(None, 1)).await.unwrap();
    assert_eq!((seqs(&page), page.has_more), (vec![m2], true));
    let page = e.history("general", Page::Before(Some(m2), 1)).await.unwrap();
    assert_eq!((seqs(&page), page.has_more), (vec![m1], false));
    let r: Vec<(String, Vec<String>)> = page.messages[0]
        .reactions
        .iter()
        .map(|r| (r.emoji.to_string(), r.users.iter().map(|u| u.to_string()).collect()))
        .collect();
    assert_eq!(
        r,
        vec![("👍".into(), users(&["dave", "bob"])), ("❤️".into(), users(&["carol"]))],
        "users in the order they reacted; an emoji nobody holds goes"
    );
    assert!(page.messages[0].edited_at.is_none());
}

pub(super) async fn unread_counts_messages_only(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    let m = send(&e, "general", "alice", "c1").await;
    apply(&e, edit("general", "alice", m, "x")).await;
    apply(&e, react("general", "alice", m, "a", true)).await;
    send(&e, "general", "alice", "c2").await;
    apply(&e, react("general", "bob", m, "a", true)).await;
    let c = e.counters("bob", &["general".to_string()]).await.unwrap();
    assert_eq!((c[0].last_seq, c[0].unread), (5, 2), "two messages, three updates");
    // A receipt may name an update's seq.
    assert!(matches!(e.set_receipt("general", "bob", 3, true).await.unwrap(), ReceiptOutcome::Changed(_)));
    let c = e.counters("bob", &["general".to_string()]).await.unwrap();
    assert_eq!(c[0].unread, 1);
}

pub(super) async fn erase_sender_empties_edit_bodies(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    let m = send(&e, "general", "alice", "c1").await;
    send(&e, "general", "bob", "c2").await;
    apply(&e, edit("general", "alice", m, "secret v2")).await;
    apply(&e, react("general", "alice", 2, "a", true)).await;
    assert_eq!(e.erase_sender("alice").await.unwrap(), 1, "edits are not counted");
    let sync = e.history("general", Page::Sync(0, 50)).await.unwrap();
    assert_eq!((&*sync.messages[0].body, sync.messages[0].deleted), ("", true));
    assert_eq!(&*sync.messages[1].body, "body of c2");
    assert_eq!(sync.updates[0].change, Change::Edit("".into()), "the edit's body is gone");
    assert_eq!(sync.updates[1].change.kind(), "reaction");
    let page = e.history("general", Page::Before(None, 50)).await.unwrap();
    assert_eq!((&*page.messages[0].body, page.messages[0].deleted), ("", true));
}

pub(super) async fn delete_group_deletes_updates(e: Arc<dyn Engine>, _hub: Arc<Hub>) {
    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    let t = e.append(member_message("team", "alice", "t1", "hi"), &conv_route("team")).await.unwrap().unwrap();
    apply(&e, edit("team", "alice", t.seq, "hello")).await;
    e.delete_group("team").await.unwrap().expect("deleted");
    let sync = e.history("team", Page::Sync(0, 50)).await.unwrap();
    assert!(sync.messages.is_empty() && sync.updates.is_empty());
    e.put_group("team", "Team", users(&["alice", "bob"])).await.unwrap();
    let t = e.append(member_message("team", "alice", "t1", "again"), &conv_route("team")).await.unwrap().unwrap();
    assert_eq!(t.seq, 1);
    assert_eq!(outcome(&e, edit("team", "alice", 2, "x")).await, refused(Refusal::NoTarget));
    let page = e.history("team", Page::Before(None, 50)).await.unwrap();
    assert_eq!((&*page.messages[0].body, page.messages[0].edited_at), ("again", None));
}

pub(super) async fn published_update_is_the_stored_frame(e: Arc<dyn Engine>, hub: Arc<Hub>) {
    let mut bob = Client::join(&e, &hub, "bob", &["general"]).await;
    let m = send(&e, "general", "alice", "c1").await;
    bob.next().await;
    apply(&e, edit("general", "alice", m, "say \"hi\" ✓")).await;
    let live = bob.next_text().await;
    let sync = e.history("general", Page::Sync(m, 10)).await.unwrap();
    let stored =
        protocol::render(&protocol::ServerFrame::Update(crm_chat::node::update_frame("general", &sync.updates[0])));
    assert_eq!(live, stored.as_str(), "sync replays the frame that went out");
}
