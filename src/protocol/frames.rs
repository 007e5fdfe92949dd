//! Server frames: one tagged enum, rendered once per event and shared by
//! every recipient.

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::{Text, format_ts};
use crate::error::{ChatError, ErrorCode};

/// The `type` of every server frame, spelled once (metrics label frames with
/// these too).
pub mod kind {
    pub const WELCOME: &str = "welcome";
    pub const REFRESHED: &str = "refreshed";
    pub const MESSAGE: &str = "message";
    pub const UPDATE: &str = "update";
    pub const ACK: &str = "ack";
    pub const RECEIPT: &str = "receipt";
    pub const TYPING: &str = "typing";
    pub const HISTORY: &str = "history";
    pub const PRESENCE: &str = "presence";
    pub const CONVERSATION: &str = "conversation";
    pub const PONG: &str = "pong";
    pub const ERROR: &str = "error";
}

/// Every frame the server sends, tagged with its `type`. The serde names
/// below and [`kind`] agree (a unit test renders every variant).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome(Welcome<'a>),
    Refreshed(Refreshed<'a>),
    Message(MessageFrame<'a>),
    Update(UpdateFrame<'a>),
    Ack(Ack<'a>),
    Receipt(Receipt<'a>),
    /// A batched receipt push (large conversations, v1.1).
    #[serde(rename = "receipt")]
    ReceiptBatch(ReceiptBatch<'a>),
    Typing(Typing<'a>),
    /// A batched typing push (large conversations, issue 22).
    #[serde(rename = "typing")]
    TypingBatch(TypingBatch<'a>),
    History(HistoryPage<'a>),
    /// The reply to a `presence` request.
    #[serde(rename = "presence")]
    PresenceReply(PresenceReply<'a>),
    /// One user's change, pushed.
    #[serde(rename = "presence")]
    PresenceChange(PresenceChange<'a>),
    /// A batched presence push (large conversations, v1.1).
    #[serde(rename = "presence")]
    PresenceBatch(PresenceBatch<'a>),
    Conversation(ConversationEvent<'a>),
    Pong(Pong<'a>),
    Error(ErrorFrame<'a>),
}

impl ServerFrame<'_> {
    /// The frame's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Welcome(_) => kind::WELCOME,
            ServerFrame::Refreshed(_) => kind::REFRESHED,
            ServerFrame::Message(_) => kind::MESSAGE,
            ServerFrame::Update(_) => kind::UPDATE,
            ServerFrame::Ack(_) => kind::ACK,
            ServerFrame::Receipt(_) | ServerFrame::ReceiptBatch(_) => kind::RECEIPT,
            ServerFrame::Typing(_) | ServerFrame::TypingBatch(_) => kind::TYPING,
            ServerFrame::History(_) => kind::HISTORY,
            ServerFrame::PresenceReply(_) | ServerFrame::PresenceChange(_) | ServerFrame::PresenceBatch(_) => {
                kind::PRESENCE
            }
            ServerFrame::Conversation(_) => kind::CONVERSATION,
            ServerFrame::Pong(_) => kind::PONG,
            ServerFrame::Error(_) => kind::ERROR,
        }
    }
}

/// Serialises a server frame once; the result is shared by every recipient.
pub fn render(frame: &ServerFrame) -> Text {
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

fn ser_ts<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ts(*ms))
}

fn ser_opt_ts<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_ts(*ms)),
        None => s.serialize_none(),
    }
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct UserRef {
    pub id: String,
    pub name: String,
}

/// A stored message as it goes on the wire (`message` frames and history pages).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct MessageFrame<'a> {
    pub conversation: &'a str,
    pub seq: u64,
    #[serde(serialize_with = "ser_ts")]
    pub ts: i64,
    pub sender: SenderRef<'a>,
    /// Only on an erased message (its body is then empty).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    pub body: &'a str,
    pub client_msg_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// Once edited (v1.2).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_ts")]
    pub edited_at: Option<i64>,
    /// Users in the order they reacted (v1.2); absent when none.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub reactions: &'a [crate::engine::Reaction],
}

/// A change of a message (v1.2): an event with its own `seq`. `body` on an
/// edit only, `emoji` and `on` on a reaction only.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct UpdateFrame<'a> {
    pub conversation: &'a str,
    pub seq: u64,
    #[serde(serialize_with = "ser_ts")]
    pub ts: i64,
    pub target: u64,
    pub kind: &'static str,
    pub user: SenderRef<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emoji: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on: Option<bool>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub user: &'a UserRef,
    pub heartbeat_s: u64,
    /// The longest `body` accepted, in Unicode scalar values.
    pub max_body_chars: usize,
    /// When the session's token expires (seconds since the epoch): refresh before.
    pub exp: u64,
    /// HTTP streaming: the session id, the capability for sending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    pub conversations: &'a [ConversationEntry],
}

#[derive(Serialize)]
pub struct Refreshed<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub exp: u64,
}

/// A batched presence push (large conversations, v1.1).
#[derive(Serialize)]
pub struct PresenceBatch<'a> {
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
    pub conversation: &'a str,
    pub receipts: Vec<ReceiptState<'a>>,
}

#[derive(Serialize)]
pub struct Ack<'a> {
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
    pub conversation: &'a str,
    pub user: &'a str,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

#[derive(Serialize)]
pub struct Typing<'a> {
    pub conversation: &'a str,
    pub user: SenderRef<'a>,
}

/// A batched typing push (large conversations): who typed since the last
/// one. The list is the last field (cut per recipient, see [`render_cuttable`]).
#[derive(Serialize)]
pub struct TypingBatch<'a> {
    pub conversation: &'a str,
    pub users: Vec<SenderRef<'a>>,
}

#[derive(Serialize)]
pub struct HistoryPage<'a> {
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub conversation: &'a str,
    pub online: &'a [String],
}

#[derive(Serialize)]
pub struct PresenceChange<'a> {
    pub conversation: &'a str,
    pub user: &'a str,
    pub online: bool,
}

#[derive(Serialize)]
pub struct ConversationEvent<'a> {
    pub conversation: &'a ConversationObject,
    pub member: bool,
}

#[derive(Serialize)]
pub struct Pong<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
}

#[derive(Serialize)]
pub struct ErrorFrame<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
    pub code: ErrorCode,
    pub message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

pub fn pong(id: Option<&Value>) -> Text {
    render(&ServerFrame::Pong(Pong { id }))
}

pub fn error(id: Option<&Value>, e: &ChatError) -> Text {
    render(&ServerFrame::Error(ErrorFrame { id, code: e.code, message: &e.message, retry_after_ms: e.retry_after_ms }))
}

pub fn error_code(id: Option<&Value>, code: ErrorCode, message: &str) -> Text {
    error(id, &ChatError::new(code, message))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::protocol::{ConversationObject, Outgoing, UserRef};

    #[test]
    fn a_cut_frame_equals_the_frame_rendered_without_that_element() {
        let users = ["a", "b\"q", "é😀", "d"];
        for n in 1..=users.len() {
            let changes: Vec<PresenceState> =
                users[..n].iter().enumerate().map(|(i, u)| PresenceState { user: u, online: i % 2 == 0 }).collect();
            fn batch<'a>(changes: Vec<PresenceState<'a>>) -> ServerFrame<'a> {
                ServerFrame::PresenceBatch(PresenceBatch { conversation: "g\n", changes })
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
    fn every_frame_starts_with_its_kind() {
        let id = json!(7);
        let user = UserRef { id: "u".into(), name: "U".into() };
        let sender = SenderRef { id: "u", name: "U" };
        let conv = ConversationObject { id: "g".into(), title: "G".into(), members: vec![], last_seq: 0 };
        let m = MessageFrame {
            conversation: "g",
            seq: 1,
            ts: 0,
            sender: sender.clone(),
            deleted: false,
            body: "b",
            client_msg_id: "c",
            reply_to: None,
            edited_at: None,
            reactions: &[],
        };
        let u = UpdateFrame {
            conversation: "g",
            seq: 2,
            ts: 0,
            target: 1,
            kind: "delete",
            user: sender.clone(),
            body: None,
            emoji: None,
            on: None,
        };
        let frames = [
            ServerFrame::Update(u),
            ServerFrame::Welcome(Welcome {
                id: None,
                user: &user,
                heartbeat_s: 25,
                max_body_chars: 4000,
                exp: 0,
                session: None,
                conversations: &[],
            }),
            ServerFrame::Refreshed(Refreshed { id: Some(&id), exp: 1 }),
            ServerFrame::Message(m),
            ServerFrame::Ack(Ack { id: Some(&id), conversation: "g", seq: 1, ts: 0, duplicate: false }),
            ServerFrame::Receipt(Receipt { conversation: "g", user: "u", delivered_seq: 1, read_seq: 1 }),
            ServerFrame::ReceiptBatch(ReceiptBatch { conversation: "g", receipts: vec![] }),
            ServerFrame::Typing(Typing { conversation: "g", user: sender }),
            ServerFrame::TypingBatch(TypingBatch { conversation: "g", users: vec![] }),
            ServerFrame::History(HistoryPage {
                id: None,
                conversation: "g",
                epoch: "e",
                reset: false,
                messages: vec![],
                receipts: vec![],
                has_more: false,
            }),
            ServerFrame::PresenceReply(PresenceReply { id: None, conversation: "g", online: &[] }),
            ServerFrame::PresenceChange(PresenceChange { conversation: "g", user: "u", online: true }),
            ServerFrame::PresenceBatch(PresenceBatch { conversation: "g", changes: vec![] }),
            ServerFrame::Conversation(ConversationEvent { conversation: &conv, member: true }),
            ServerFrame::Pong(Pong { id: None }),
            ServerFrame::Error(ErrorFrame {
                id: None,
                code: ErrorCode::BadRequest,
                message: "m",
                retry_after_ms: None,
            }),
        ];
        for f in &frames {
            let text = render(f);
            let want = format!("{{\"type\":\"{}\"", f.kind());
            assert!(text.starts_with(&want), "{text} should start with {want}");
        }
    }
}
