//! The wire format of PROTOCOL.md v1: parsing client frames and rendering
//! server frames.
//!
//! Parsing is tolerant of unknown fields (forward compatibility) but strict on
//! the ones it knows: a wrong type or a missing field is a `bad_request` whose
//! message names the field, and the reply still echoes the frame's `id` when the
//! `id` itself was valid.

use serde::{Deserialize, Serialize, Serializer};

/// A serialised text frame: cheap to clone (reference-counted), shared by
/// every recipient of a fan-out and written to the socket as is.
pub type Text = tungstenite::Utf8Bytes;
use serde_json::Value;

/// A text frame as queued for one connection.
///
/// Usually one shared frame. A batched frame that must leave out the
/// recipient's own change (PROTOCOL: a user's own presence goes to other
/// users only) is the shared frame with that entry cut out, as two slices of
/// the same shared bytes: nothing is copied or rendered per recipient, so a
/// batch of a thousand changes costs the same whether or not its users are
/// online.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Whole(Text),
    /// The bytes before and after the cut (boxed: keeps the queue's slots
    /// as small as a [`Text`]).
    Cut(Box<[bytes::Bytes; 2]>),
}

impl Outgoing {
    /// `frame` without the bytes in `cut`, which must cover whole JSON
    /// elements and the comma that separates them from their neighbour.
    pub fn cut(frame: &Text, cut: std::ops::Range<usize>) -> Outgoing {
        let b: &bytes::Bytes = frame.as_ref();
        Outgoing::Cut(Box::new([b.slice(..cut.start), b.slice(cut.end..)]))
    }

    /// Payload bytes.
    pub fn len(&self) -> usize {
        match self {
            Outgoing::Whole(t) => t.len(),
            Outgoing::Cut(p) => p[0].len() + p[1].len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload as written: one or two slices (the second may be empty).
    pub fn parts(&self) -> [&[u8]; 2] {
        match self {
            Outgoing::Whole(t) => [t.as_bytes(), &[]],
            Outgoing::Cut(p) => [&p[0], &p[1]],
        }
    }

    /// The payload as one string (tests and logs; allocates for a cut frame).
    pub fn to_text(&self) -> Text {
        match self {
            Outgoing::Whole(t) => t.clone(),
            Outgoing::Cut(p) => {
                Text::try_from([&p[0][..], &p[1][..]].concat()).expect("cut at JSON element boundaries")
            }
        }
    }
}

impl From<Text> for Outgoing {
    fn from(t: Text) -> Self {
        Outgoing::Whole(t)
    }
}

use crate::error::{ChatError, ErrorCode};

/// WebSocket close codes of PROTOCOL.md (and RFC 6455).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const IDLE: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_LATER: u16 = 1013;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const POLICY: u16 = 4008;

    /// The reason text sent with a code.
    pub fn reason(code: u16) -> &'static str {
        match code {
            IDLE => "idle timeout",
            PROTOCOL_ERROR => "protocol error",
            INVALID_DATA => "invalid UTF-8",
            TOO_BIG => "frame too big",
            INTERNAL => "internal error",
            RESTART => "service restart",
            TRY_LATER => "try again later",
            UNAUTHORIZED => "unauthorized",
            POLICY => "policy violation",
            _ => "",
        }
    }
}

/// Page size bounds of `history`/`sync` (`limit` is clamped into them).
pub const MAX_PAGE: usize = 200;
pub const DEFAULT_PAGE: usize = 50;

/// A client frame, validated for shape (not yet for permissions).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Hello {
        token: String,
    },
    Send {
        conversation: String,
        client_msg_id: String,
        body: String,
    },
    Delivered {
        conversation: String,
        seq: i64,
    },
    Read {
        conversation: String,
        seq: i64,
    },
    Typing {
        conversation: String,
    },
    History {
        conversation: String,
        before: Option<u64>,
        limit: usize,
    },
    /// `epoch`: the epoch the client holds, when it sent one.
    Sync {
        conversation: String,
        after: u64,
        limit: usize,
        epoch: Option<String>,
    },
    Presence {
        conversation: String,
    },
    Ping,
    /// A newer token for the same user (v1.1).
    Refresh {
        token: String,
    },
}

impl Command {
    /// The `type` of this command, as counted in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Hello { .. } => "hello",
            Command::Send { .. } => "send",
            Command::Delivered { .. } => "delivered",
            Command::Read { .. } => "read",
            Command::Typing { .. } => "typing",
            Command::History { .. } => "history",
            Command::Sync { .. } => "sync",
            Command::Presence { .. } => "presence",
            Command::Ping => "ping",
            Command::Refresh { .. } => "refresh",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// The client's `id`, echoed on the reply: a string (<= 64 chars) or an integer.
    pub id: Option<Value>,
    pub cmd: Command,
}

/// A frame that could not be understood.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// The frame's `id`, when it could be read and was valid.
    pub id: Option<Value>,
    pub message: String,
    /// The frame was a JSON object (as opposed to garbage or another JSON value).
    pub is_object: bool,
    /// The frame's type expects a reply (`delivered`, `read` and `typing` do
    /// not: their errors carry no `id`).
    pub replies: bool,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type")]
    ty: Option<Value>,
    id: Option<Value>,
    token: Option<Value>,
    conversation: Option<Value>,
    client_msg_id: Option<Value>,
    body: Option<Value>,
    seq: Option<Value>,
    before: Option<Value>,
    after: Option<Value>,
    limit: Option<Value>,
    epoch: Option<Value>,
}

fn valid_id(v: &Value) -> bool {
    match v {
        Value::String(s) => s.chars().count() <= 64,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        _ => false,
    }
}

fn take_str(v: Option<Value>, field: &str) -> Result<String, String> {
    match v {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(format!("missing field '{field}'")),
        Some(_) => Err(format!("'{field}' must be a string")),
    }
}

fn take_int(v: Option<Value>, field: &str) -> Result<Option<i64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some(i)),
            // Integers beyond i64 are out of every range the protocol accepts.
            None if n.is_u64() => Ok(Some(i64::MAX)),
            None => Err(format!("'{field}' must be an integer")),
        },
        Some(_) => Err(format!("'{field}' must be an integer")),
    }
}

fn take_cursor(v: Option<Value>, field: &str) -> Result<Option<u64>, String> {
    match take_int(v, field)? {
        Some(i) if i < 0 => Err(format!("'{field}' must not be negative")),
        other => Ok(other.map(|i| i as u64)),
    }
}

fn take_limit(v: Option<Value>) -> Result<usize, String> {
    Ok(take_int(v, "limit")?.map_or(DEFAULT_PAGE, |l| l.clamp(1, MAX_PAGE as i64) as usize))
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<Inbound, ParseError> {
    // serde would read a JSON array positionally into `Raw`: refuse non-objects first.
    if !text.trim_start().starts_with('{') {
        return Err(ParseError {
            id: None,
            message: "a frame is one JSON object".into(),
            is_object: false,
            replies: true,
        });
    }
    let raw: Raw = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            // Recover the id if the frame is an object at all, so the error
            // still correlates.
            let id = serde_json::from_str::<serde_json::Map<String, Value>>(text)
                .ok()
                .and_then(|mut m| m.remove("id"))
                .filter(valid_id);
            let message = if e.is_data() { format!("invalid frame: {e}") } else { "invalid JSON".to_string() };
            return Err(ParseError { id, message, is_object: e.is_data(), replies: true });
        }
    };
    let id = match raw.id {
        None | Some(Value::Null) => None,
        Some(v) if valid_id(&v) => Some(v),
        Some(_) => {
            return Err(ParseError {
                id: None,
                message: "'id' must be a string of at most 64 characters or an integer".into(),
                is_object: true,
                replies: true,
            });
        }
    };
    let replies = !matches!(&raw.ty, Some(Value::String(t)) if matches!(t.as_str(), "delivered" | "read" | "typing"));
    let fail = |message: String| ParseError { id: id.clone(), message, is_object: true, replies };
    let ty = match raw.ty {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(fail("missing field 'type'".into())),
        Some(_) => return Err(fail("'type' must be a string".into())),
    };
    let conv = |v| take_str(v, "conversation");
    let cmd = (|| -> Result<Command, String> {
        Ok(match ty.as_str() {
            "hello" => Command::Hello { token: take_str(raw.token, "token")? },
            "send" => Command::Send {
                conversation: conv(raw.conversation)?,
                client_msg_id: take_str(raw.client_msg_id, "client_msg_id")?,
                body: take_str(raw.body, "body")?,
            },
            "delivered" | "read" => {
                let conversation = conv(raw.conversation)?;
                let seq = take_int(raw.seq, "seq")?.ok_or("missing field 'seq'")?;
                if ty == "read" {
                    Command::Read { conversation, seq }
                } else {
                    Command::Delivered { conversation, seq }
                }
            }
            "typing" => Command::Typing { conversation: conv(raw.conversation)? },
            "history" => Command::History {
                conversation: conv(raw.conversation)?,
                before: take_cursor(raw.before, "before")?,
                limit: take_limit(raw.limit)?,
            },
            "sync" => Command::Sync {
                conversation: conv(raw.conversation)?,
                after: take_cursor(raw.after, "after")?.unwrap_or(0),
                limit: take_limit(raw.limit)?,
                epoch: match raw.epoch {
                    None | Some(Value::Null) => None,
                    Some(Value::String(e)) if e.chars().count() <= 64 => Some(e),
                    Some(_) => return Err("'epoch' must be a string of at most 64 characters".into()),
                },
            },
            "refresh" => Command::Refresh { token: take_str(raw.token, "token")? },
            "presence" => Command::Presence { conversation: conv(raw.conversation)? },
            "ping" => Command::Ping,
            other => {
                let shown: String = other.chars().take(32).collect();
                return Err(format!("unknown frame type '{shown}'"));
            }
        })
    })()
    .map_err(fail)?;
    Ok(Inbound { id, cmd })
}

/// Serialises a server frame once; the result is shared by every recipient.
pub fn render<T: Serialize>(frame: &T) -> Text {
    // Serialising our own frame types cannot fail (string keys, no maps with
    // non-string keys, no fallible Serialize impls).
    let s = serde_json::to_string(frame).expect("server frames serialise");
    Text::from(s)
}

/// Renders a frame whose last field is a list, and the span to cut out of
/// the rendering to leave out each element (the element and one separating
/// comma; see [`Outgoing::cut`]). `empty` is the frame rendered with an empty
/// list. Equal byte for byte to [`render`] of the frame with `items`.
pub fn render_cuttable<T: Serialize>(empty: Text, items: &[T]) -> (Text, Vec<std::ops::Range<usize>>) {
    let head = empty.as_str().strip_suffix("[]}").expect("the list is the frame's last field");
    let mut s = String::with_capacity(head.len() + 32 * items.len() + 2);
    s.push_str(head);
    s.push('[');
    let mut spans = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let start = s.len();
        s.push_str(&serde_json::to_string(item).expect("server frames serialise"));
        spans.push(start..s.len());
    }
    s.push_str("]}");
    let n = spans.len();
    let cuts = (0..n)
        .map(|i| match i {
            _ if n == 1 => spans[0].clone(),
            _ if i + 1 < n => spans[i].start..spans[i + 1].start,
            _ => spans[i - 1].end..spans[i].end,
        })
        .collect();
    (Text::from(s), cuts)
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_ts(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ser_ts<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ts(*ms))
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub id: String,
    pub name: String,
}

/// A stored message as it goes on the wire (`message` frames and history pages).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct MessageFrame<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub seq: u64,
    #[serde(serialize_with = "ser_ts")]
    pub ts: i64,
    pub sender: SenderRef<'a>,
    pub body: &'a str,
    pub client_msg_id: &'a str,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct SenderRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptState<'a> {
    pub user: &'a str,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

/// One entry of `welcome.conversations` and of the users route.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationEntry {
    pub id: String,
    pub title: String,
    /// `open`, `direct` or `group`.
    pub kind: &'static str,
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    /// The stored history's epoch (v1.1): changes only when history was lost.
    pub epoch: String,
    /// Members, except for open conversations (everyone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
}

/// The conversation object of the service API and `conversation` events.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationObject {
    pub id: String,
    pub title: String,
    pub members: Vec<String>,
    pub last_seq: u64,
}

#[derive(Serialize)]
pub struct Welcome<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub user: &'a UserRef,
    pub heartbeat_s: u64,
    /// The longest `body` accepted, in Unicode scalar values.
    pub max_body_chars: usize,
    /// When the session's token expires (seconds since the epoch): refresh before.
    pub exp: u64,
    pub conversations: &'a [ConversationEntry],
}

#[derive(Serialize)]
pub struct Refreshed<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub exp: u64,
}

/// A batched presence push (large conversations, v1.1).
#[derive(Serialize)]
pub struct PresenceBatch<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub changes: Vec<PresenceState<'a>>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceState<'a> {
    pub user: &'a str,
    pub online: bool,
}

/// A batched receipt push (large conversations, v1.1).
#[derive(Serialize)]
pub struct ReceiptBatch<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub receipts: Vec<ReceiptState<'a>>,
}

#[derive(Serialize)]
pub struct Ack<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub conversation: &'a str,
    pub seq: u64,
    #[serde(serialize_with = "ser_ts")]
    pub ts: i64,
    pub duplicate: bool,
}

#[derive(Serialize)]
pub struct Receipt<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub user: &'a str,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

#[derive(Serialize)]
pub struct Typing<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub user: SenderRef<'a>,
}

#[derive(Serialize)]
pub struct HistoryPage<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub conversation: &'a str,
    pub epoch: &'a str,
    /// The client's `epoch` differed: this page starts again from seq 1.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    pub messages: Vec<&'a serde_json::value::RawValue>,
    pub receipts: Vec<ReceiptState<'a>>,
    pub has_more: bool,
}

#[derive(Serialize)]
pub struct PresenceReply<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub conversation: &'a str,
    pub online: &'a [String],
}

#[derive(Serialize)]
pub struct PresenceChange<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a str,
    pub user: &'a str,
    pub online: bool,
}

#[derive(Serialize)]
pub struct ConversationEvent<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub conversation: &'a ConversationObject,
    pub member: bool,
}

#[derive(Serialize)]
struct Pong<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

pub fn pong(id: Option<&Value>) -> Text {
    render(&Pong { ty: "pong", id })
}

pub fn error(id: Option<&Value>, e: &ChatError) -> Text {
    render(&ErrorFrame { ty: "error", id, code: e.code, message: &e.message, retry_after_ms: e.retry_after_ms })
}

pub fn error_code(id: Option<&Value>, code: ErrorCode, message: &str) -> Text {
    error(id, &ChatError::new(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd(v: Value) -> Result<Inbound, ParseError> {
        parse(&v.to_string())
    }

    #[test]
    fn parses_every_frame() {
        let i = cmd(json!({"type":"send","id":2,"conversation":"general","client_msg_id":"c1","body":"hi"})).unwrap();
        assert_eq!(i.id, Some(json!(2)));
        assert_eq!(
            i.cmd,
            Command::Send { conversation: "general".into(), client_msg_id: "c1".into(), body: "hi".into() }
        );
        let i = cmd(json!({"type":"history","id":"h","conversation":"g","before":43,"limit":500})).unwrap();
        assert_eq!(i.cmd, Command::History { conversation: "g".into(), before: Some(43), limit: 200 });
        let i = cmd(json!({"type":"sync","conversation":"g","limit":0})).unwrap();
        assert_eq!(i.cmd, Command::Sync { conversation: "g".into(), after: 0, limit: 1, epoch: None });
        assert_eq!(cmd(json!({"type":"ping","extra":true})).unwrap().cmd, Command::Ping);
        assert_eq!(
            cmd(json!({"type":"read","conversation":"g","seq":0})).unwrap().cmd,
            Command::Read { conversation: "g".into(), seq: 0 }
        );
    }

    #[test]
    fn errors_keep_a_valid_id_and_name_the_field() {
        let e = cmd(json!({"type":"send","id":"x","conversation":"g","body":"hi"})).unwrap_err();
        assert_eq!(e.id, Some(json!("x")));
        assert!(e.message.contains("client_msg_id"));
        let e = cmd(json!({"type":"read","id":1,"conversation":"g","seq":"4"})).unwrap_err();
        assert!(e.message.contains("seq"));
        let e = cmd(json!({"type":"nope","id":1})).unwrap_err();
        assert!(e.message.contains("unknown frame type"));
        let e = cmd(json!({"type":"ping","id":{"a":1}})).unwrap_err();
        assert_eq!(e.id, None);
        let e = cmd(json!({"type":"ping","id":"x".repeat(65)})).unwrap_err();
        assert_eq!(e.id, None);
        let e = cmd(json!({"type":"ping","id":1.5})).unwrap_err();
        assert_eq!(e.id, None);
        let e = parse("[1,2]").unwrap_err();
        assert_eq!(e.message, "a frame is one JSON object");
        let e = parse("{\"type\":").unwrap_err();
        assert_eq!(e.message, "invalid JSON");
        let e = parse("{\"type\":5,\"id\":9}").unwrap_err();
        assert_eq!(e.id, Some(json!(9)));
        let e = cmd(json!({"type":"history","conversation":"g","before":-1})).unwrap_err();
        assert!(e.message.contains("before"));
    }

    #[test]
    fn a_cut_frame_equals_the_frame_rendered_without_that_element() {
        let users = ["a", "b\"q", "é😀", "d"];
        for n in 1..=users.len() {
            let changes: Vec<PresenceState> =
                users[..n].iter().enumerate().map(|(i, u)| PresenceState { user: u, online: i % 2 == 0 }).collect();
            fn batch<'a>(changes: Vec<PresenceState<'a>>) -> PresenceBatch<'a> {
                PresenceBatch { ty: "presence", conversation: "g\n", changes }
            }
            let (all, cuts) = render_cuttable(render(&batch(Vec::new())), &changes);
            assert_eq!(all, render(&batch(changes.clone())));
            for (i, cut) in cuts.iter().enumerate() {
                let mut rest = changes.clone();
                rest.remove(i);
                let got = Outgoing::cut(&all, cut.clone());
                assert_eq!(got.to_text(), render(&batch(rest)), "without element {i} of {n}");
                assert_eq!(got.len(), got.to_text().len());
            }
        }
    }

    #[test]
    fn an_outgoing_frame_is_as_small_as_a_text() {
        assert_eq!(std::mem::size_of::<Outgoing>(), std::mem::size_of::<Text>());
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }
}
