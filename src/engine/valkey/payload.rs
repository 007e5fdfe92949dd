//! What travels through Valkey: the pub/sub payload (encode, decode) and the
//! stored stream entries of messages.

use std::{collections::HashMap, sync::Arc};

use serde::Deserialize;

use crate::{
    engine::StoredMessage,
    error::{EngineError, EngineResult},
    hub::{Event, EventKind},
    protocol::Text,
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

pub(super) fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("strings and user refs serialise")
}

/// The fields of a stored frame needed to rebuild a [`StoredMessage`].
#[derive(Deserialize)]
struct FrameFields {
    seq: u64,
    sender: SenderFields,
    body: String,
    client_msg_id: String,
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
    };
    Ok((m, frame.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
