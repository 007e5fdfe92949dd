//! What travels through Valkey: the pub/sub payload (encode, decode) and the
//! stored stream entries of messages.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    engine::{Change, StoredMessage, StoredUpdate},
    error::{EngineError, EngineResult},
    hub::{Event, EventKind},
    node::message_frame,
    protocol::{self, MessageFrame, ServerFrame, Text},
    telemetry,
};

/// The pub/sub payload:
/// `kind \t exclude \t stored_us \t conversation \t traceparent \t extra \n frame`,
/// where `extra` is the seq of a message or the member flag of a membership
/// change, and `traceparent` (W3C, may be empty) joins the receiving node's
/// fan-out span to the sender's trace.
pub(super) fn encode(event: &Event) -> String {
    let (kind, conv, extra) = match &event.kind {
        EventKind::Message => ("m", "", String::new()),
        EventKind::Update => ("u", "", String::new()),
        EventKind::Receipt if event.batch => ("R", "", String::new()),
        EventKind::Receipt => ("r", "", String::new()),
        EventKind::Typing if event.batch => ("T", "", String::new()),
        EventKind::Typing => ("t", "", String::new()),
        EventKind::Presence if event.batch => ("P", "", String::new()),
        EventKind::Presence => ("p", "", String::new()),
        EventKind::Membership { conversation, member } => {
            ("c", &**conversation, (if *member { "1" } else { "0" }).into())
        }
        EventKind::Disconnect => ("d", "", String::new()),
    };
    format!(
        "{kind}\t{}\t{}\t{conv}\t{}\t{extra}\n{}",
        event.exclude_user.as_deref().unwrap_or(""),
        event.stored_at_us.map(|u| u.to_string()).unwrap_or_default(),
        telemetry::traceparent().unwrap_or_default(),
        event.frame.as_str()
    )
}

/// A message's conversation, epoch and seq, as carried in its payload header.
pub(super) type MessageSeq = (Arc<str>, Arc<str>, u64);

/// A decoded payload.
pub(super) struct Decoded<'a> {
    pub(super) event: Event,
    /// For messages and updates: conversation, epoch and seq.
    pub(super) seq: Option<MessageSeq>,
    pub(super) traceparent: Option<&'a str>,
}

pub(super) fn decode(payload: &str) -> Option<Decoded<'_>> {
    let (head, frame) = payload.split_once('\n')?;
    let mut p = head.split('\t');
    let (kind, exclude, us, conv, tp, extra) = (p.next()?, p.next()?, p.next()?, p.next()?, p.next()?, p.next()?);
    let (kind, batch) = match kind {
        "m" => (EventKind::Message, false),
        "u" => (EventKind::Update, false),
        "r" => (EventKind::Receipt, false),
        "R" => (EventKind::Receipt, true),
        "t" => (EventKind::Typing, false),
        "T" => (EventKind::Typing, true),
        "p" => (EventKind::Presence, false),
        "P" => (EventKind::Presence, true),
        "c" => (EventKind::Membership { conversation: conv.into(), member: extra == "1" }, false),
        "d" => (EventKind::Disconnect, false),
        _ => return None,
    };
    let seq = match kind {
        // `<seq>:<epoch>`: messages and updates share the seq order.
        EventKind::Message | EventKind::Update => {
            let (seq, epoch) = extra.split_once(':')?;
            Some((Arc::<str>::from(conv), Arc::<str>::from(epoch), seq.parse().ok()?))
        }
        _ => None,
    };
    let event = Event {
        kind,
        exclude_user: (!exclude.is_empty()).then(|| exclude.into()),
        frame: Text::from(frame.to_string()),
        stored_at_us: us.parse().ok(),
        batch,
    };
    Some(Decoded { event, seq, traceparent: (!tp.is_empty()).then_some(tp) })
}

/// A `message` frame split around its seq, for the append script to join
/// with the seq it assigns (`head .. seq .. tail`).
///
/// Both halves come from the protocol's own rendering of the frame
/// ([`protocol::render`] of [`message_frame`]), so a live frame from Valkey is
/// byte for byte what history pages and the other engine send, whatever
/// fields the frame gains. `m.seq` is ignored.
///
/// How: the frame is rendered with two seqs that differ only in their last
/// digit (`u64::MAX` and `u64::MAX - 1`). Nothing else differs between the
/// two texts, so the first byte where they differ is the seq's last digit,
/// and the seq's digits end there, whatever the body, names or ids contain
/// (even the same digits).
///
/// # Errors
/// [`EngineError::Internal`] if the two renderings differ anywhere else (the
/// frame would carry something derived from the seq twice): a bug, caught by
/// the unit test below.
pub(super) fn message_template(conversation: &str, m: &StoredMessage) -> EngineResult<(String, String)> {
    template(|seq| {
        protocol::render(&ServerFrame::Message(MessageFrame { seq, ..message_frame(conversation, m) })).to_string()
    })
}

/// Any text split around the one place `render(seq)` puts its seq (see
/// [`message_template`] for how); used for `update` frames and the current
/// state a change leaves (v1.2).
pub(super) fn template(render: impl Fn(u64) -> String) -> EngineResult<(String, String)> {
    const A: u64 = u64::MAX;
    const B: u64 = u64::MAX - 1;
    let digits = A.to_string();
    let (a, b) = (render(A), render(B));
    let split = a.bytes().zip(b.bytes()).position(|(x, y)| x != y).and_then(|last| {
        let start = (last + 1).checked_sub(digits.len())?;
        let one_seq = a.len() == b.len()
            && a.get(start..=last) == Some(digits.as_str())
            && a.get(last + 1..) == b.get(last + 1..);
        one_seq.then(|| (a[..start].to_string(), a[last + 1..].to_string()))
    });
    split.ok_or_else(|| EngineError::Internal("the text does not hold its seq exactly once".into()))
}

/// The current state of a changed message (v1.2), kept beside its stream
/// entry (which holds the message as sent): hash `st`, field = seq.
#[derive(Serialize, Deserialize, Default)]
pub(super) struct State {
    pub(super) b: String,
    #[serde(default)]
    pub(super) d: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) e: Option<i64>,
    /// Left out when empty (a Lua table round trip would turn `[]` into `{}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) r: Vec<crate::engine::Reaction>,
    /// The ts of the last update.
    #[serde(default)]
    pub(super) lt: i64,
    /// The seq of the last update: last, so the caller can split around it.
    #[serde(default)]
    pub(super) l: u64,
}

impl State {
    pub(super) fn of(m: &StoredMessage, lt: i64) -> Self {
        State { b: m.body.to_string(), d: m.deleted, e: m.edited_at, r: m.reactions.clone(), lt, l: m.last_update }
    }

    /// Applies a stored state to the message as sent (`""`: unchanged).
    /// Returns the ts of its last update.
    pub(super) fn apply(m: &mut StoredMessage, state: &str) -> EngineResult<i64> {
        if state.is_empty() {
            return Ok(m.ts_ms);
        }
        let s: State =
            serde_json::from_str(state).map_err(|e| EngineError::Internal(format!("state of {}: {e}", m.seq)))?;
        m.deleted |= s.d;
        m.body = if m.deleted { "".into() } else { s.b.into() };
        m.edited_at = s.e;
        m.reactions = s.r;
        m.last_update = s.l;
        Ok(s.lt)
    }
}

#[derive(Deserialize)]
struct UpdateFields {
    seq: u64,
    target: u64,
    kind: String,
    user: SenderFields,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    emoji: Option<String>,
    #[serde(default)]
    on: Option<bool>,
}

/// A stored `update` frame read back (sync pages).
pub(super) fn update_of(frame: &str, ts_ms: i64) -> EngineResult<StoredUpdate> {
    let f: UpdateFields =
        serde_json::from_str(frame).map_err(|e| EngineError::Internal(format!("update entry: {e}")))?;
    let change = match f.kind.as_str() {
        "edit" => Change::Edit(f.body.unwrap_or_default().into()),
        "delete" => Change::Delete,
        _ => Change::Reaction { emoji: f.emoji.unwrap_or_default().into(), on: f.on.unwrap_or(false) },
    };
    Ok(StoredUpdate {
        seq: f.seq,
        ts_ms,
        target: f.target,
        user_id: f.user.id.into(),
        user_name: f.user.name.into(),
        change,
    })
}

/// The fields of a stored frame needed to rebuild a [`StoredMessage`].
#[derive(Deserialize)]
struct FrameFields {
    seq: u64,
    sender: SenderFields,
    body: String,
    client_msg_id: String,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    reply_to: Option<u64>,
}

#[derive(Deserialize)]
struct SenderFields {
    id: String,
    name: String,
}

pub(super) type StreamEntry = (String, HashMap<String, String>);

pub(super) fn stored(entry: &StreamEntry) -> EngineResult<(StoredMessage, String)> {
    let frame = entry.1.get("f").ok_or_else(|| EngineError::Internal(format!("entry {} has no frame", entry.0)))?;
    let ts_ms = entry.1.get("t").and_then(|t| t.parse().ok()).unwrap_or(0);
    Ok((message_of(frame, ts_ms)?, frame.clone()))
}

/// A stored `message` frame read back (as sent; see [`State::apply`]).
pub(super) fn message_of(frame: &str, ts_ms: i64) -> EngineResult<StoredMessage> {
    let f: FrameFields =
        serde_json::from_str(frame).map_err(|e| EngineError::Internal(format!("message entry: {e}")))?;
    Ok(StoredMessage {
        seq: f.seq,
        ts_ms,
        sender_id: f.sender.id.into(),
        sender_name: f.sender.name.into(),
        body: f.body.into(),
        client_msg_id: f.client_msg_id.into(),
        deleted: f.deleted,
        reply_to: f.reply_to,
        ..StoredMessage::default()
    })
}

/// A stream entry's seq and the event it was published as (a message, or an
/// update when it has the kind field `x`), for gap fills and re-sends.
pub(super) fn entry_event(entry: &StreamEntry) -> Option<(u64, Event)> {
    let seq = entry.0.split_once('-')?.0.parse().ok()?;
    let frame = entry.1.get("f")?;
    let kind = if entry.1.contains_key("x") { EventKind::Update } else { EventKind::Message };
    Some((seq, Event::new(kind, Text::from(frame.clone()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, ts_ms: i64, sender: (&str, &str), body: &str, client_msg_id: &str) -> StoredMessage {
        StoredMessage {
            seq,
            ts_ms,
            sender_id: sender.0.into(),
            sender_name: sender.1.into(),
            body: body.into(),
            client_msg_id: client_msg_id.into(),
            ..StoredMessage::default()
        }
    }

    #[test]
    fn message_template_is_the_rendered_frame_around_its_seq() {
        let max = u64::MAX.to_string();
        let cases = [
            ("general", message(1, 1_700_000_000_123, ("alice", "Alice"), "hello", "c-1")),
            ("dm:alice:bob", message(42, 0, ("bob", "Bob \"the\" Builder"), "say \"hi\" \\ back\\", "x\"y\\z")),
            (
                "deal:42@x",
                message(
                    7,
                    1_234,
                    ("zoë", "Zoë Ñandú 日本語"),
                    "emoji 🎉👩‍👩‍👧 and \u{1F600}, tabs\tand\nnewlines\r",
                    "🎉-id",
                ),
            ),
            ("c", message(9, -5, ("u", "ctl \u{0}\u{1f}\u{7f}\u{2028}"), "\u{0}\u{8}\u{c}\u{1b}[0m", "\u{1}")),
            // The sentinel's own digits in every text field, and the largest seq.
            ("n18446744073709551615", message(u64::MAX, 18_446_744, ("18446744073709551614", &max), &max, &max)),
            ("x", message(10, 1, ("a", "a"), "\"seq\":18446744073709551615,", "seq")),
        ];
        for (conv, m) in &cases {
            let (head, tail) = message_template(conv, m).unwrap();
            let joined = format!("{head}{}{tail}", m.seq);
            let rendered = protocol::render(&ServerFrame::Message(message_frame(conv, m)));
            assert_eq!(joined.as_bytes(), rendered.as_str().as_bytes(), "{conv}");
            // The seq is ignored: the same halves for another one.
            let other = StoredMessage { seq: 3, ..m.clone() };
            assert_eq!(message_template(conv, &other).unwrap(), (head, tail));
        }
    }

    #[test]
    fn payload_roundtrip() {
        let mut e = Event::new(EventKind::Typing, Text::from("{\"x\":\"a\\nb\"}".to_string())).excluding("bob");
        e.stored_at_us = Some(42);
        let encoded = encode(&e);
        let d = decode(&encoded).unwrap();
        assert_eq!(d.event.kind, EventKind::Typing);
        assert_eq!(d.event.exclude_user.as_deref(), Some("bob"));
        assert_eq!(d.event.stored_at_us, Some(42));
        assert_eq!(d.event.frame.as_str(), e.frame.as_str());
        assert!(d.seq.is_none());
        assert!(d.traceparent.is_none(), "no trace without OpenTelemetry");
        let m =
            Event::new(EventKind::Membership { conversation: "deal".into(), member: true }, Text::from_static("{}"));
        let encoded = encode(&m);
        let d = decode(&encoded).unwrap();
        assert_eq!(d.event.kind, EventKind::Membership { conversation: "deal".into(), member: true });
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let raw = format!("m\t\t7\tgeneral\t{tp}\t12:e1\n{{\"a\":1}}");
        let d = decode(&raw).unwrap();
        assert_eq!(d.event.kind, EventKind::Message);
        assert_eq!(d.seq, Some(("general".into(), "e1".into(), 12)));
        assert_eq!(d.traceparent, Some(tp));
    }
}
