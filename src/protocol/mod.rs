//! The wire format of PROTOCOL.md: the one place it is spelled.
//!
//! - [`inbound`]: client frames, parsed and validated for shape;
//! - [`frames`]: server frames, one tagged [`ServerFrame`] enum whose
//!   [`ServerFrame::kind`] labels metrics;
//! - here: the byte types frames travel in ([`Text`], [`Outgoing`]), close
//!   codes and timestamps.

mod frames;
mod inbound;

pub use frames::*;
pub use inbound::*;

/// A serialised text frame: cheap to clone (reference-counted), shared by
/// every recipient of a fan-out and written to the socket as is.
pub type Text = tungstenite::Utf8Bytes;

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
    Cut(Box<[tungstenite::Bytes; 2]>),
}

impl Outgoing {
    /// `frame` without the bytes in `cut`, which must cover whole JSON
    /// elements and the comma that separates them from their neighbour.
    pub fn cut(frame: &Text, cut: std::ops::Range<usize>) -> Outgoing {
        let b: &tungstenite::Bytes = frame.as_ref();
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

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
/// (Every message frame and webhook carries one: chrono's `format` parsed
/// its pattern on every call, 2-3% of the server's CPU under load.)
pub fn format_ts(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A body's length as a JSON string (what is stored and sent out): `"` and
/// `\` take 2 bytes, control characters 2 or 6 (`\u0001`), the quotes 2.
pub fn json_len(body: &str) -> usize {
    2 + body
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn format_ts_is_the_protocol_s_form_at_every_instant() {
        let pattern = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
        };
        for ms in [0, 1, 999, 1_000, 951_782_400_000, 1_780_000_000_123, 4_102_444_799_999, 253_402_300_799_999] {
            assert_eq!(format_ts(ms), pattern(ms), "{ms}");
        }
        assert_eq!(format_ts(1_780_000_000_123), "2026-05-28T20:26:40.123Z");
        let mut ms = 1_700_000_000_000i64;
        for _ in 0..10_000 {
            ms += rand::random::<u32>() as i64;
            assert_eq!(format_ts(ms), pattern(ms), "{ms}");
        }
    }

    use super::*;

    #[test]
    fn json_len_is_the_escaped_length() {
        for s in ["", "plain", "quote \" and \\", "\u{1}\u{1f}\n\t\r\u{8}\u{c}\u{7f}", "é中😀"] {
            assert_eq!(json_len(s), serde_json::to_string(s).unwrap().len(), "{s:?}");
        }
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        assert_eq!(format_ts(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ts(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }
}
