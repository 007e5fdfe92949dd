//! Messages people can change (PROTOCOL v1.2): the change a client asks for
//! ([`NewUpdate`]), the stored event ([`StoredUpdate`]) and the rules that
//! decide whether a change applies to a message's current state, written once
//! here and used by every engine inside its atomic step ([`check`], [`apply`]).
//!
//! A change is stored as an event under the conversation's next `seq` (one
//! counter for messages and updates) together with the target's new current
//! state, so a history page reads messages only and never replays updates.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::StoredMessage;
use crate::protocol::UserRef;

/// One emoji's reactions on a message: who reacted, in the order they did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub emoji: Arc<str>,
    pub users: Vec<Arc<str>>,
}

/// What a change does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The new body (empty once the editor's bodies were erased).
    Edit(Arc<str>),
    Delete,
    /// `on`: add the user's reaction, else remove it.
    Reaction {
        emoji: Arc<str>,
        on: bool,
    },
}

impl Change {
    /// The `kind` of the `update` frame.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Edit(_) => "edit",
            Change::Delete => "delete",
            Change::Reaction { .. } => "reaction",
        }
    }
}

/// A change asked for by a member (or by the CRM through the service API).
#[derive(Debug, Clone)]
pub struct NewUpdate {
    pub conversation: String,
    /// Who changes it (for the API: the moderating `sender`, default `system`).
    pub user: UserRef,
    /// The seq of the message to change.
    pub target: u64,
    pub change: Change,
    /// Server time at arrival, milliseconds since the epoch.
    pub ts_ms: i64,
    /// Group conversations: only a member may change (checked in the same
    /// atomic step as the write).
    pub require_member: bool,
    /// The service API's moderation: no sender rule, no edit window.
    pub moderation: bool,
    /// `limits.edit_window_s` in ms; 0: no limit.
    pub edit_window_ms: i64,
    /// `limits.reactions_per_message`: distinct emoji per message.
    pub max_reactions: usize,
}

/// A stored change: an event of its conversation with its own `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredUpdate {
    pub seq: u64,
    pub ts_ms: i64,
    pub target: u64,
    pub user_id: Arc<str>,
    pub user_name: Arc<str>,
    pub change: Change,
}

/// Why a change was refused; nothing was stored or published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user may not write to this group (or it does not exist).
    NotMember,
    /// No retained message has the target seq (an update's seq, out of range,
    /// or dropped by retention): `bad_request`.
    NoTarget,
    /// Edit or delete of someone else's message: `forbidden`.
    NotSender,
    /// Edit after `limits.edit_window_s`: `forbidden`.
    WindowClosed,
    /// Edit of a deleted message: `bad_request`.
    Deleted,
    /// One more distinct emoji than `limits.reactions_per_message`: `bad_request`.
    TooManyReactions,
}

/// What became of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Stored and published (`duplicate: false`), or nothing to change
    /// (`duplicate: true`, with the seq of the last update of the target, or
    /// the target's own seq when it never changed).
    Applied(super::Appended),
    Refused(Refusal),
}

/// Whether `u` may change `m` (its current state), and whether it changes
/// anything. `now_ms` is `u.ts_ms`.
pub fn check(m: &StoredMessage, u: &NewUpdate) -> Result<bool, Refusal> {
    let own = *m.sender_id == *u.user.id;
    match &u.change {
        Change::Edit(body) => {
            if !u.moderation && !own {
                return Err(Refusal::NotSender);
            }
            if m.deleted {
                return Err(Refusal::Deleted);
            }
            if !u.moderation && u.edit_window_ms > 0 && u.ts_ms.saturating_sub(m.ts_ms) > u.edit_window_ms {
                return Err(Refusal::WindowClosed);
            }
            Ok(**body != *m.body)
        }
        Change::Delete => {
            if !u.moderation && !own {
                return Err(Refusal::NotSender);
            }
            Ok(!m.deleted)
        }
        Change::Reaction { emoji, on } => {
            let existing = m.reactions.iter().find(|r| r.emoji == *emoji);
            let has = existing.is_some_and(|r| r.users.iter().any(|x| **x == *u.user.id));
            if *on && !has && existing.is_none() && m.reactions.len() >= u.max_reactions {
                return Err(Refusal::TooManyReactions);
            }
            Ok(*on != has)
        }
    }
}

/// Applies a change [`check`] accepted as a change, stored under `seq`.
pub fn apply(m: &mut StoredMessage, u: &NewUpdate, seq: u64) {
    match &u.change {
        Change::Edit(body) => {
            m.body = body.clone();
            m.edited_at = Some(u.ts_ms);
        }
        Change::Delete => {
            m.body = Arc::from("");
            m.deleted = true;
        }
        Change::Reaction { emoji, on: true } => match m.reactions.iter_mut().find(|r| r.emoji == *emoji) {
            Some(r) => r.users.push(u.user.id.as_str().into()),
            None => m.reactions.push(Reaction { emoji: emoji.clone(), users: vec![u.user.id.as_str().into()] }),
        },
        Change::Reaction { emoji, on: false } => {
            if let Some(r) = m.reactions.iter_mut().find(|r| r.emoji == *emoji) {
                r.users.retain(|x| **x != *u.user.id);
            }
            m.reactions.retain(|r| !r.users.is_empty());
        }
    }
    m.last_update = seq;
}

/// The seq a no-op change answers with: the target's last update, else the
/// target itself.
pub fn duplicate_seq(m: &StoredMessage) -> u64 {
    if m.last_update > 0 { m.last_update } else { m.seq }
}

/// The update event stored for an accepted change.
pub fn stored_update(u: &NewUpdate, seq: u64) -> StoredUpdate {
    StoredUpdate {
        seq,
        ts_ms: u.ts_ms,
        target: u.target,
        user_id: u.user.id.as_str().into(),
        user_name: u.user.name.as_str().into(),
        change: u.change.clone(),
    }
}

/// Applies an already stored update to a message again (engines that keep
/// the current state elsewhere rebuild nothing with it; tests compare).
pub fn replay(m: &mut StoredMessage, up: &StoredUpdate) {
    let u = NewUpdate {
        conversation: String::new(),
        user: UserRef { id: up.user_id.to_string(), name: up.user_name.to_string() },
        target: up.target,
        change: up.change.clone(),
        ts_ms: up.ts_ms,
        require_member: false,
        moderation: true,
        edit_window_ms: 0,
        max_reactions: usize::MAX,
    };
    if check(m, &u) == Ok(true) {
        apply(m, &u, up.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> StoredMessage {
        StoredMessage {
            seq: 3,
            ts_ms: 1_000,
            sender_id: "alice".into(),
            sender_name: "Alice".into(),
            body: "hi".into(),
            client_msg_id: "c".into(),
            ..StoredMessage::default()
        }
    }

    fn up(user: &str, change: Change, ts_ms: i64) -> NewUpdate {
        NewUpdate {
            conversation: "g".into(),
            user: UserRef { id: user.into(), name: user.into() },
            target: 3,
            change,
            ts_ms,
            require_member: false,
            moderation: false,
            edit_window_ms: 10_000,
            max_reactions: 2,
        }
    }

    #[test]
    fn rules() {
        let mut m = msg();
        let edit = |b: &str| Change::Edit(b.into());
        assert_eq!(check(&m, &up("bob", edit("x"), 2_000)), Err(Refusal::NotSender));
        assert_eq!(check(&m, &up("alice", edit("x"), 11_001)), Err(Refusal::WindowClosed));
        assert_eq!(check(&m, &up("alice", edit("hi"), 2_000)), Ok(false));
        let e = up("alice", edit("x"), 2_000);
        assert_eq!(check(&m, &e), Ok(true));
        apply(&mut m, &e, 4);
        assert_eq!((&*m.body, m.edited_at, duplicate_seq(&m)), ("x", Some(2_000), 4));
        let react = |u: &str, e: &str, on| up(u, Change::Reaction { emoji: e.into(), on }, 2_000);
        for (i, (u, e)) in [("bob", "a"), ("carol", "a"), ("bob", "b")].into_iter().enumerate() {
            let r = react(u, e, true);
            assert_eq!(check(&m, &r), Ok(true));
            apply(&mut m, &r, 5 + i as u64);
        }
        assert_eq!(check(&m, &react("bob", "a", true)), Ok(false));
        assert_eq!(check(&m, &react("bob", "c", true)), Err(Refusal::TooManyReactions));
        assert_eq!(check(&m, &react("dave", "c", false)), Ok(false));
        assert_eq!(m.reactions[0].users, vec![Arc::from("bob"), Arc::from("carol")]);
        apply(&mut m, &react("bob", "b", false), 8);
        assert_eq!(m.reactions.len(), 1);
        assert_eq!(check(&m, &up("bob", Change::Delete, 2_000)), Err(Refusal::NotSender));
        let mut moderated = up("sup", Change::Delete, 99_000);
        moderated.moderation = true;
        assert_eq!(check(&m, &moderated), Ok(true));
        apply(&mut m, &moderated, 9);
        assert!(m.deleted && m.body.is_empty());
        assert_eq!(check(&m, &up("alice", Change::Delete, 2_000)), Ok(false));
        assert_eq!(check(&m, &up("alice", edit("y"), 2_000)), Err(Refusal::Deleted));
    }
}
