//! What travels through Valkey: the pub/sub payload (encode, decode) and the
//! stored stream entries of messages.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;

use crate::{
    engine::StoredMessage,
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
    /// For messages: conversation and seq.
    pub(super) seq: Option<MessageSeq>,
    pub(super) traceparent: Option<&'a str>,
}

pub(super) fn decode(payload: &str) -> Option<Decoded<'_>> {
    let (head, frame) = payload.split_once('\n')?;
    let mut p = head.split('\t');
    let (kind, exclude, us, conv, tp, extra) = (p.next()?, p.next()?, p.next()?, p.next()?, p.next()?, p.next()?);
    let (kind, batch) = match kind {
        "m" => (EventKind::Message, false),
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
        // `<seq>:<epoch>`
        EventKind::Message => {
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
    const A: u64 = u64::MAX;
    const B: u64 = u64::MAX - 1;
    let digits = A.to_string();
    let a = protocol::render(&ServerFrame::Message(MessageFrame { seq: A, ..message_frame(conversation, m) }));
    let b = protocol::render(&ServerFrame::Message(MessageFrame { seq: B, ..message_frame(conversation, m) }));
    let (a, b) = (a.as_str(), b.as_str());
    let split = a.bytes().zip(b.bytes()).position(|(x, y)| x != y).and_then(|last| {
        let start = (last + 1).checked_sub(digits.len())?;
        let one_seq = a.len() == b.len()
            && a.get(start..=last) == Some(digits.as_str())
            && a.get(last + 1..) == b.get(last + 1..);
        one_seq.then(|| (a[..start].to_string(), a[last + 1..].to_string()))
    });
    split.ok_or_else(|| EngineError::Internal("the message frame does not hold its seq exactly once".into()))
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
}

#[derive(Deserialize)]
struct SenderFields {
    id: String,
    name: String,
}

pub(super) type StreamEntry = (String, HashMap<String, String>);

pub(super) fn stored(entry: &StreamEntry) -> EngineResult<(StoredMessage, String)> {
    let frame = entry.1.get("f").ok_or_else(|| EngineError::Internal(format!("entry {} has no frame", entry.0)))?;
    let f: FrameFields =
        serde_json::from_str(frame).map_err(|e| EngineError::Internal(format!("entry {}: {e}", entry.0)))?;
    let ts_ms = entry.1.get("t").and_then(|t| t.parse().ok()).unwrap_or(0);
    let m = StoredMessage {
        seq: f.seq,
        ts_ms,
        sender_id: f.sender.id.into(),
        sender_name: f.sender.name.into(),
        body: f.body.into(),
        client_msg_id: f.client_msg_id.into(),
        deleted: f.deleted,
    };
    Ok((m, frame.clone()))
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
            deleted: false,
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
