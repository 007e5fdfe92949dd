//! Client frames: parsed tolerantly of unknown fields (forward
//! compatibility) but strictly on the ones it knows: a wrong type or a missing
//! field is a `bad_request` whose message names the field, and the reply still
//! echoes the frame's `id` when the `id` itself was valid.

use serde::Deserialize;
use serde_json::Value;

use super::{DEFAULT_PAGE, MAX_PAGE};

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
        /// v1.2: the seq of the message this one replies to.
        reply_to: Option<i64>,
    },
    /// v1.2: a new body for one's own message.
    Edit {
        conversation: String,
        seq: i64,
        body: String,
    },
    /// v1.2: takes one's own message back.
    Delete {
        conversation: String,
        seq: i64,
    },
    /// v1.2: adds (`on`) or removes the user's reaction.
    React {
        conversation: String,
        seq: i64,
        emoji: String,
        on: bool,
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
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
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
    reply_to: Option<Value>,
    emoji: Option<Value>,
    on: Option<Value>,
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
                reply_to: take_int(raw.reply_to, "reply_to")?,
            },
            "edit" => Command::Edit {
                conversation: conv(raw.conversation)?,
                seq: take_int(raw.seq, "seq")?.ok_or("missing field 'seq'")?,
                body: take_str(raw.body, "body")?,
            },
            "delete" => Command::Delete {
                conversation: conv(raw.conversation)?,
                seq: take_int(raw.seq, "seq")?.ok_or("missing field 'seq'")?,
            },
            "react" => Command::React {
                conversation: conv(raw.conversation)?,
                seq: take_int(raw.seq, "seq")?.ok_or("missing field 'seq'")?,
                emoji: take_str(raw.emoji, "emoji")?,
                on: match raw.on {
                    Some(Value::Bool(b)) => b,
                    None | Some(Value::Null) => return Err("missing field 'on'".into()),
                    Some(_) => return Err("'on' must be true or false".into()),
                },
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cmd(v: Value) -> Result<Inbound, ParseError> {
        parse(&v.to_string())
    }

    #[test]
    fn parses_every_frame() {
        let i = cmd(json!({"type":"send","id":2,"conversation":"general","client_msg_id":"c1","body":"hi"})).unwrap();
        assert_eq!(i.id, Some(json!(2)));
        assert_eq!(
            i.cmd,
            Command::Send {
                conversation: "general".into(),
                client_msg_id: "c1".into(),
                body: "hi".into(),
                reply_to: None
            }
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
}
