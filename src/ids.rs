//! Identifier rules of the wire protocol: user ids, conversation ids, and the
//! implicit direct conversations `dm:<a>:<b>`.

/// User ids: 1-128 chars of `[A-Za-z0-9_.@-]`.
pub fn valid_user_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// Conversation ids: 1-128 chars of `[A-Za-z0-9_.:@-]`.
pub fn valid_conversation_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// What a `dm:` prefixed id turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Dm<'a> {
    /// Not a direct conversation id at all.
    NotDm,
    /// `dm:<a>:<b>` with valid ids and `a < b` in byte order.
    Pair(&'a str, &'a str),
    /// Starts with `dm:` but is not two valid, ordered, distinct user ids.
    Malformed(&'static str),
}

pub fn parse_dm(id: &str) -> Dm<'_> {
    let Some(rest) = id.strip_prefix("dm:") else {
        return Dm::NotDm;
    };
    // User ids cannot contain ':', so the split is unambiguous.
    let Some((a, b)) = rest.split_once(':') else {
        return Dm::Malformed("a direct conversation id is dm:<a>:<b>");
    };
    if !valid_user_id(a) || !valid_user_id(b) {
        return Dm::Malformed("a direct conversation id is dm:<a>:<b> with two valid user ids");
    }
    match a.as_bytes().cmp(b.as_bytes()) {
        std::cmp::Ordering::Less => Dm::Pair(a, b),
        std::cmp::Ordering::Equal => Dm::Malformed("a direct conversation needs two different users"),
        std::cmp::Ordering::Greater => Dm::Malformed("user ids in dm:<a>:<b> must be in byte order (a < b)"),
    }
}

/// The direct conversation id of two users, ids in byte order.
pub fn dm_id(a: &str, b: &str) -> String {
    if a.as_bytes() <= b.as_bytes() { format!("dm:{a}:{b}") } else { format!("dm:{b}:{a}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(valid_user_id("alice"));
        assert!(valid_user_id("a.b-c_d@e"));
        assert!(valid_user_id(&"x".repeat(128)));
        assert!(!valid_user_id(&"x".repeat(129)));
        assert!(!valid_user_id(""));
        assert!(!valid_user_id("a:b"));
        assert!(!valid_user_id("a b"));
        assert!(!valid_user_id("é"));
    }

    #[test]
    fn dms() {
        assert_eq!(parse_dm("general"), Dm::NotDm);
        assert_eq!(parse_dm("dm:alice:bob"), Dm::Pair("alice", "bob"));
        assert!(matches!(parse_dm("dm:bob:alice"), Dm::Malformed(_)));
        assert!(matches!(parse_dm("dm:bob:bob"), Dm::Malformed(_)));
        assert!(matches!(parse_dm("dm:bob"), Dm::Malformed(_)));
        assert!(matches!(parse_dm("dm:a:b:c"), Dm::Malformed(_)));
        // Byte order, not case-insensitive order: 'B' < 'a'.
        assert_eq!(parse_dm("dm:Bob:alice"), Dm::Pair("Bob", "alice"));
        assert_eq!(dm_id("bob", "alice"), "dm:alice:bob");
    }

    #[test]
    fn conversation_ids() {
        assert!(valid_conversation_id("deal:42@crm"));
        assert!(!valid_conversation_id("deal 42"));
        assert!(!valid_conversation_id(""));
        assert!(!valid_conversation_id(&"c".repeat(129)));
    }
}
