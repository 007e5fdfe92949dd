//! Key and channel names (the key layout is in the module docs of
//! [`super`]): every key of a conversation carries the hash tag `{c:<id>}`,
//! every key of a user `{u:<user>}`.

use crate::hub::Topic;

/// Key and channel names.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

impl Keys {
    pub(super) fn conv(&self, id: &str, part: &str) -> String {
        format!("{}:{{c:{id}}}:{part}", self.prefix)
    }
    pub(super) fn user_convs(&self, user: &str) -> String {
        format!("{}:{{u:{user}}}:convs", self.prefix)
    }
    pub(super) fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Conv(c) => format!("{}:{{c:{c}}}:ev", self.prefix),
            Topic::User(u) => format!("{}:{{u:{u}}}:ev", self.prefix),
        }
    }
    pub(super) fn topic(&self, channel: &str) -> Option<Topic> {
        let rest = channel.strip_prefix(self.prefix.as_str())?.strip_prefix(":{")?.strip_suffix("}:ev")?;
        if let Some(c) = rest.strip_prefix("c:") {
            Some(Topic::Conv(c.into()))
        } else {
            rest.strip_prefix("u:").map(|u| Topic::User(u.into()))
        }
    }
    /// The channel every node subscribes to for events addressed to many
    /// users at once ([`crate::engine::Broker::publish_users`]); not a topic
    /// of the hub, never unsubscribed.
    pub(super) fn broadcast(&self) -> String {
        format!("{}:{{all}}:ev", self.prefix)
    }
    /// A node's control channel (forwarded POSTs and their answers).
    pub(super) fn node_channel(&self, node: &str) -> String {
        format!("{}:{{n:{node}}}:ctl", self.prefix)
    }
    pub(super) fn nodes(&self) -> String {
        format!("{}:{{presence}}:nodes", self.prefix)
    }
    pub(super) fn node_prefix(&self) -> String {
        format!("{}:{{presence}}:n:", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_map_back_to_topics() {
        let k = Keys { prefix: "chat".into() };
        for t in [Topic::Conv("deal:42@x".into()), Topic::User("alice".into())] {
            assert_eq!(k.topic(&k.channel(&t)), Some(t.clone()));
        }
        assert_eq!(k.conv("general", "meta"), "chat:{c:general}:meta");
        assert_eq!(k.topic("other:{c:x}:ev"), None);
    }
}
