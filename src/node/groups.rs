//! The service API's operations on groups, and the engine door: the only
//! way outside the node reaches the engine.

use std::{sync::Arc, time::Duration};

use super::*;

impl Node {
    /// Checks an id for the group routes: valid, and neither direct nor open.
    pub fn group_id<'a>(&self, conversation: &'a str) -> Result<&'a str, ChatError> {
        match self.classify(conversation)? {
            Kind::Group => Ok(conversation),
            Kind::Direct(..) => {
                Err(ChatError::bad_request("direct conversations exist implicitly; they have no managed members"))
            }
            Kind::Open => Err(ChatError::bad_request(format!(
                "'{conversation}' is open to every user (chat.open_conversations); it has no managed members"
            ))),
        }
    }

    pub fn validate_members<'a>(&self, users: impl IntoIterator<Item = &'a String>) -> Result<(), ChatError> {
        for u in users {
            if !ids::valid_user_id(u) {
                let shown: String = u.chars().take(40).collect();
                return Err(ChatError::bad_request(format!(
                    "'{shown}' is not a user id (1-128 chars of [A-Za-z0-9_.@-])"
                )));
            }
        }
        Ok(())
    }

    /// Refuses a group of more than `limits.max_group_members` members.
    pub fn check_group_size(&self, members: usize) -> Result<(), ChatError> {
        let max = self.cfg.limits.max_group_members;
        if members > max {
            return Err(ChatError::bad_request(format!(
                "a group has at most {max} members (limits.max_group_members); this would have {members}"
            )));
        }
        Ok(())
    }

    /// Sends `conversation` events to members added and removed.
    pub async fn announce_membership(&self, change: &MembershipChange) -> Result<(), ChatError> {
        let conv: Arc<str> = change.conversation.id.as_str().into();
        for (users, member) in [(&change.added, true), (&change.removed, false)] {
            if users.is_empty() {
                continue;
            }
            let frame = protocol::render(&ServerFrame::Conversation(ConversationEvent {
                conversation: &change.conversation,
                member,
            }));
            // One publish for all of them: the frame lists every member, so
            // one publish per user would cost members² bytes.
            let event = Event::new(EventKind::Membership { conversation: conv.clone(), member }, frame);
            self.engine.publish_users(users, event).await?;
        }
        Ok(())
    }

    /// The conversation object of any kind of conversation, `None` when a
    /// group does not exist.
    pub async fn conversation_object(&self, conversation: &str) -> Result<Option<ConversationObject>, ChatError> {
        let kind = self.classify(conversation)?;
        let (title, members) = match kind {
            Kind::Direct(a, b) => (String::new(), vec![a.to_string(), b.to_string()]),
            Kind::Open => (title_case(conversation), self.engine.open_members(conversation).await?),
            Kind::Group => match self.engine.group(conversation).await? {
                Some(g) => {
                    let g = std::sync::Arc::unwrap_or_clone(g);
                    (g.title, g.members)
                }
                None => return Ok(None),
            },
        };
        let last_seq = self.engine.last_seq(conversation).await?;
        Ok(Some(ConversationObject { id: conversation.to_string(), title, members, last_seq }))
    }
}

/// The engine door: everything outside the node (service API, health, the
/// app's upkeep and shutdown) reaches the engine through these methods, so
/// the transport never sees an [`Engine`]. Engine failures map to
/// [`ChatError`] as everywhere else in the node (`From<EngineError>`), except
/// for upkeep, whose caller only logs.
impl Node {
    /// The engine's name (`memory` or `valkey`), for logs and `/readyz`.
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Whether storage answers (for `/readyz`; draining is checked apart).
    pub async fn engine_ready(&self) -> bool {
        self.engine.ready().await
    }

    /// Creates or replaces a group (title and the whole member list).
    pub async fn put_group(
        &self,
        conversation: &str,
        title: &str,
        members: Vec<String>,
    ) -> Result<MembershipChange, ChatError> {
        let change = self.engine.put_group(conversation, title, members).await?;
        self.on_conversation(&change.conversation);
        Ok(change)
    }

    /// Adds and removes members of a group; `None` when it does not exist.
    pub async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<Option<MembershipChange>, ChatError> {
        if !add.is_empty() {
            // The size the group would have. Not atomic with the change: two
            // concurrent additions may overshoot by at most one request's
            // additions (each also bounded by limits.max_group_members).
            let Some(group) = self.engine.group(conversation).await? else { return Ok(None) };
            let removed: std::collections::HashSet<&str> = remove.iter().map(String::as_str).collect();
            let mut after: std::collections::HashSet<&str> =
                group.members.iter().map(String::as_str).filter(|m| !removed.contains(m)).collect();
            // Named in both lists: still a member (removals apply first).
            after.extend(add.iter().map(String::as_str));
            self.check_group_size(after.len())?;
        }
        let change = self.engine.update_group(conversation, add, remove).await?;
        if let Some(c) = &change {
            self.on_conversation(&c.conversation);
        }
        Ok(change)
    }

    /// Deletes a group and its history; `None` when no group has this id.
    /// The caller announces the change ([`Node::announce_membership`]).
    pub async fn delete_group(&self, conversation: &str) -> Result<Option<MembershipChange>, ChatError> {
        let change = self.engine.delete_group(conversation).await?;
        if let Some(c) = &change {
            metrics::conversation_deleted();
            // Every member removed: a members change (the object has none left).
            self.on_conversation(&c.conversation);
        }
        Ok(change)
    }

    /// Erases the body of every message `user` sent, in every conversation;
    /// returns how many this call erased (0 on a repeat).
    pub async fn erase_user_messages(&self, user: &str) -> Result<u64, ChatError> {
        let n = self.engine.erase_sender(user).await?;
        metrics::messages_erased(n);
        // Every message erased above arrived before now: its webhook event,
        // if not delivered yet, loses its body too.
        if let Some(w) = &self.webhooks {
            w.erase(user, protocol::now_ms()).await?;
        }
        Ok(n)
    }

    /// Whether a group conversation exists.
    pub async fn group_exists(&self, conversation: &str) -> Result<bool, ChatError> {
        Ok(self.engine.group(conversation).await?.is_some())
    }

    /// One page of stored history, without authorization or reply budget
    /// (the service API's message list; sessions use [`Node::history`]).
    pub async fn history_page(&self, conversation: &str, page: Page) -> Result<MessagePage, ChatError> {
        Ok(self.engine.history(conversation, page).await?)
    }

    /// How often [`Node::maintain`] must run; `None`: never.
    pub fn maintenance_interval(&self) -> Option<Duration> {
        self.engine.maintenance_interval()
    }

    /// The engine's periodic upkeep. Returns users who went offline
    /// everywhere because their node stopped answering (announce them with
    /// [`Node::announce_offline`]).
    pub async fn maintain(&self) -> EngineResult<Vec<String>> {
        self.engine.maintain().await
    }

    /// Stops the engine's background work before exit.
    pub async fn shutdown_engine(&self) {
        self.engine.shutdown().await
    }
}
