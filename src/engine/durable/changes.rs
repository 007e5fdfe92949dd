//! Messages people can change (v1.2) on disk: a change is a row of
//! `updates` under the conversation's next seq, written in the same
//! transaction as its target's new current state (the row of `messages`), so
//! a history page reads `messages` only.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::{
    State,
    ops::{Batch, conv},
};
use crate::{
    engine::{
        Appended, Change, NewUpdate, Page, Reaction, Refusal, Route, StoredMessage, StoredUpdate, UpdateOutcome,
        changes::{self},
        membership,
    },
    hub::{Event, EventKind},
    node::update_frame,
    protocol::{ServerFrame, render},
};

/// The columns [`message`] reads, in order.
pub(super) const MESSAGE_COLUMNS: &str = "SELECT seq, ts_ms, sender_id, sender_name, body, client_msg_id, deleted, \
                                          reply_to, edited_at, reactions, last_update FROM messages";

/// The columns [`update`] reads, in order.
pub(super) const UPDATE_COLUMNS: &str =
    "SELECT seq, ts_ms, target, kind, user_id, user_name, body, emoji, on_ FROM updates";

pub(super) fn message(r: &Row) -> rusqlite::Result<StoredMessage> {
    let reactions: String = r.get(9)?;
    Ok(StoredMessage {
        seq: r.get::<_, i64>(0)? as u64,
        ts_ms: r.get(1)?,
        sender_id: r.get::<_, String>(2)?.into(),
        sender_name: r.get::<_, String>(3)?.into(),
        body: r.get::<_, String>(4)?.into(),
        client_msg_id: r.get::<_, String>(5)?.into(),
        deleted: r.get::<_, i64>(6)? != 0,
        reply_to: r.get::<_, Option<i64>>(7)?.map(|s| s as u64),
        edited_at: r.get(8)?,
        reactions: if reactions.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str::<Vec<Reaction>>(&reactions)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(9, rusqlite::types::Type::Text, e.into()))?
        },
        last_update: r.get::<_, i64>(10)? as u64,
    })
}

pub(super) fn update(r: &Row) -> rusqlite::Result<StoredUpdate> {
    let kind: String = r.get(3)?;
    let change = match kind.as_str() {
        "edit" => Change::Edit(r.get::<_, String>(6)?.into()),
        "delete" => Change::Delete,
        _ => Change::Reaction { emoji: r.get::<_, String>(7)?.into(), on: r.get::<_, i64>(8)? != 0 },
    };
    Ok(StoredUpdate {
        seq: r.get::<_, i64>(0)? as u64,
        ts_ms: r.get(1)?,
        target: r.get::<_, i64>(2)? as u64,
        user_id: r.get::<_, String>(4)?.into(),
        user_name: r.get::<_, String>(5)?.into(),
        change,
    })
}

/// One change inside the batch's transaction: decided against the target's
/// row as this transaction sees it (earlier changes of the batch included).
pub(super) fn apply_update(
    tx: &Transaction,
    state: &State,
    b: &mut Batch,
    u: &NewUpdate,
    route: Route,
) -> rusqlite::Result<UpdateOutcome> {
    let refused = |r| Ok(UpdateOutcome::Refused(r));
    let Some(d) = conv(tx, state, b, &u.conversation, false)? else {
        return refused(if u.require_member { Refusal::NotMember } else { Refusal::NoTarget });
    };
    if u.require_member && !d.group.as_ref().is_some_and(|g| membership::contains(&g.members, &u.user.id)) {
        return refused(Refusal::NotMember);
    }
    let id = d.id;
    let target = u.target.min(i64::MAX as u64) as i64;
    let found = tx
        .prepare_cached(&format!("{MESSAGE_COLUMNS} WHERE conv = ?1 AND seq = ?2"))?
        .query_row(params![id, target], message)
        .optional()?;
    let Some(mut m) = found else {
        return refused(Refusal::NoTarget);
    };
    match changes::check(&m, u) {
        Err(r) => refused(r),
        Ok(false) => {
            let seq = changes::duplicate_seq(&m);
            let ts_ms = if seq == m.seq {
                m.ts_ms
            } else {
                tx.prepare_cached("SELECT ts_ms FROM updates WHERE conv = ?1 AND seq = ?2")?
                    .query_row(params![id, seq as i64], |r| r.get(0))
                    .optional()?
                    .unwrap_or(m.ts_ms)
            };
            Ok(UpdateOutcome::Applied(Appended { seq, ts_ms, duplicate: true }))
        }
        Ok(true) => {
            let seq = d.last_seq + 1;
            d.last_seq = seq;
            d.seq_dirty = true;
            changes::apply(&mut m, u, seq);
            let reactions = if m.reactions.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&m.reactions).expect("reactions serialise")
            };
            tx.prepare_cached(
                "UPDATE messages SET body = ?3, deleted = ?4, edited_at = ?5, reactions = ?6, last_update = ?7 \
                 WHERE conv = ?1 AND seq = ?2",
            )?
            .execute(params![
                id,
                target,
                &*m.body,
                m.deleted as i64,
                m.edited_at,
                reactions,
                seq as i64
            ])?;
            let up = changes::stored_update(u, seq);
            let (body, emoji, on) = match &up.change {
                Change::Edit(b) => (Some(Arc::clone(b)), None, None),
                Change::Delete => (None, None, None),
                Change::Reaction { emoji, on } => (None, Some(Arc::clone(emoji)), Some(*on as i64)),
            };
            tx.prepare_cached(
                "INSERT INTO updates (conv, seq, ts_ms, target, kind, user_id, user_name, body, emoji, on_) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                id,
                seq as i64,
                up.ts_ms,
                target,
                up.change.kind(),
                &*up.user_id,
                &*up.user_name,
                body.as_deref(),
                emoji.as_deref(),
                on
            ])?;
            let frame = render(&ServerFrame::Update(update_frame(&u.conversation, &up)));
            b.events.push((route, Event::new(EventKind::Update, frame)));
            Ok(UpdateOutcome::Applied(Appended { seq, ts_ms: up.ts_ms, duplicate: false }))
        }
    }
}

/// One page: messages only (history), or messages and updates merged by seq
/// (sync: each table read up to `limit + 1` rows, then the oldest `limit`).
pub(super) fn page_of(
    c: &Connection,
    id: i64,
    page: Page,
) -> rusqlite::Result<(Vec<StoredMessage>, Vec<crate::engine::StoredUpdate>, bool)> {
    let (sql, bound, limit, newest_first) = match page {
        Page::Before(before, limit) => (
            "WHERE conv = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64),
            limit,
            true,
        ),
        Page::After(after, limit) | Page::Sync(after, limit) => {
            ("WHERE conv = ?1 AND seq > ?2 ORDER BY seq ASC LIMIT ?3", after.min(i64::MAX as u64) as i64, limit, false)
        }
    };
    let n = limit.saturating_add(1).min(i64::MAX as usize) as i64;
    let mut v = c
        .prepare_cached(&format!("{MESSAGE_COLUMNS} {sql}"))?
        .query_map(params![id, bound, n], message)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if let Page::Sync(..) = page {
        let mut u = c
            .prepare_cached(&format!("{UPDATE_COLUMNS} {sql}"))?
            .query_map(params![id, bound, n], update)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let more = v.len() + u.len() > limit;
        // The oldest `limit` of both: the seq below which everything is kept.
        let mut seqs: Vec<u64> = v.iter().map(|m| m.seq).chain(u.iter().map(|u| u.seq)).collect();
        seqs.sort_unstable();
        if let Some(&cut) = seqs.get(limit) {
            v.retain(|m| m.seq < cut);
            u.retain(|x| x.seq < cut);
        }
        return Ok((v, u, more));
    }
    let more = v.len() > limit;
    v.truncate(limit);
    if newest_first {
        v.reverse();
    }
    Ok((v, Vec::new(), more))
}
