//! A session's place in the cluster: open (subscribe, read membership,
//! verify), close, presence announcements and forced disconnects.

use std::{collections::HashSet, sync::Arc};

use super::*;

impl Node {
    /// Takes one connect token of `user` (`limits.connects_per_s` and
    /// `connects_burst`): this node's bucket, then the engine's across the
    /// cluster. The error (`rate_limited`) says when to retry.
    pub async fn check_connect_rate(&self, user: &str) -> Result<(), ChatError> {
        let limited = |ms: u64| {
            ChatError::rate_limited(ms).with_message(format!(
                "too many connects for this user (limits.connects_per_s {}, burst {}); retry in {ms} ms",
                self.cfg.limits.connects_per_s, self.cfg.limits.connects_burst
            ))
        };
        self.connects.check_key(&Arc::from(user)).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            limited((wait.as_millis() as u64).max(1))
        })?;
        let l = &self.cfg.limits;
        match self.engine.connect_gate(user, l.connects_per_s, l.connects_burst).await {
            Ok(()) => Ok(()),
            Err(crate::error::EngineError::RateLimited(ms)) => Err(limited(ms)),
            // Fails open: a store that refuses writes (full, say) must not
            // refuse connects too; this node's bucket still holds.
            Err(e) => {
                tracing::debug!(error = %e, "connect bucket unavailable; node-local bucket only");
                Ok(())
            }
        }
    }

    /// Opens a session. The connect-time ordering rule, which makes
    /// membership exact under races and faults, lives here and nowhere else:
    ///
    /// 1. **Subscribe the user topic**: the connection is registered and the
    ///    user's topic subscribed, so membership events (added, removed)
    ///    reach it from now on. Open conversations are joined (fresh member
    ///    counts).
    /// 2. **Read membership**: the user's conversations are read from the
    ///    per-user index, and the candidate groups (and open conversations)
    ///    are **subscribed** before anything is verified, so a message sent
    ///    from here on arrives live.
    /// 3. **Verify against the group's member set**: each group's own member
    ///    set decides (the per-user index alone grants nothing); counters for
    ///    `welcome` are read in the same pass.
    /// 4. **Unsubscribe stale**: groups the user is not in are unsubscribed.
    /// 5. Presence is counted up here, but **announced after `welcome`** by
    ///    the caller ([`OpenSession::came_online`]): `welcome` is the
    ///    session's first frame, and the others hear the user came online
    ///    only once it is written.
    ///
    /// A removal after (3) arrives as an event on the user's topic (1); one
    /// before it is seen by (3). An addition whose event lands between (3)
    /// and (4) would be undone by (4): [`Conn::joins`] tells, and the group's
    /// member set decides again (see `drop_stale`).
    pub async fn open_session(&self, conn: &Arc<Conn>, user: &UserRef) -> Result<OpenSession, ChatError> {
        self.hub.register(conn);
        let user_topic = Topic::User(conn.user.clone());
        self.engine.subscribe(std::slice::from_ref(&user_topic)).await?;
        for c in &self.cfg.chat.open_conversations {
            // The exact count, fresh: whether this user's presence goes out
            // (and batched or not) is decided from it.
            let n = match self.engine.join_open(c, &user.id).await {
                Ok(n) => n,
                // Storage full: connecting still works (reads do), the user
                // is just not counted as a known member yet.
                Err(e) if e.is_full() => {
                    tracing::warn!(error = %e, conversation = %c, "storage full: open conversation not joined");
                    self.engine.member_count(c, true).await?
                }
                Err(e) => return Err(e.into()),
            };
            self.remember_member_count(c, n);
        }
        let joins = conn.joins();
        let ids = self.conversation_ids(&user.id).await?;
        let convs: Vec<Arc<str>> = ids
            .iter()
            .filter(|id| matches!(self.classify(id), Ok(Kind::Open | Kind::Group)))
            .map(|id| Arc::from(id.as_str()))
            .collect();
        self.hub.subscribe(conn, convs.iter().cloned());
        let topics: Vec<Topic> = convs.into_iter().map(Topic::Conv).collect();
        self.engine.subscribe(&topics).await?;
        let entries = self.entries(&user.id, &ids).await?;
        let listed: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let stale: Vec<Arc<str>> = topics
            .iter()
            .filter_map(|t| match t {
                Topic::Conv(c) if !listed.contains(&**c) && !self.open.contains(&**c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        if !stale.is_empty() {
            self.drop_stale(conn, stale, joins).await?;
        }
        let dm_partners = entries
            .iter()
            .filter_map(|e| match self.classify(&e.id) {
                Ok(Kind::Direct(a, b)) => Some(if a == user.id { b } else { a }.to_string()),
                _ => None,
            })
            .collect();
        // Storage full: the session opens uncounted (no presence, nothing to
        // count down at close); reads work and sends answer `unavailable`.
        let (came_online, counted) = match self.engine.presence_up(&user.id).await {
            Ok(up) => (up, true),
            Err(e) if e.is_full() => {
                tracing::warn!(error = %e, "storage full: connection not counted for presence");
                (false, false)
            }
            Err(e) => return Err(e.into()),
        };
        if came_online {
            self.on_presence(&user.id, true);
        }
        Ok(OpenSession { entries, came_online, dm_partners, counted })
    }

    /// Undoes [`Node::open_session`]: unregisters the connection and, when
    /// `counted` and it was the user's last connection anywhere, announces
    /// the user offline.
    pub async fn close_session(&self, conn: &Conn, counted: bool, dm_partners: &[String]) {
        let convs = self.hub.subscriptions(conn);
        self.hub.unregister(conn);
        self.engine.topics_changed();
        if !counted {
            return;
        }
        match self.engine.presence_down(&conn.user).await {
            Ok(true) => {
                self.on_presence(&conn.user, false);
                if let Err(e) = self.announce_presence(&conn.user, false, &convs, dm_partners).await {
                    tracing::debug!(error = %e, "presence announcement failed");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "presence update failed"),
        }
    }

    /// Pushes a user's presence change to the other members of `convs` (open
    /// and group conversations) and to `dm_partners`, in one engine round
    /// trip where the engine can, whatever their number. Conversations with
    /// more than `limits.presence_max_members` members get nothing; those with
    /// more than `limits.batch_members` get it batched.
    pub async fn announce_presence(
        &self,
        user: &str,
        online: bool,
        convs: &[Arc<str>],
        dm_partners: &[String],
    ) -> Result<(), ChatError> {
        let limit = self.cfg.limits.presence_max_members;
        let mut events = Vec::with_capacity(convs.len() + dm_partners.len());
        for conv in convs {
            let open = self.open.contains(&**conv);
            let n = self.member_count(conv, open).await?;
            if n > limit {
                continue;
            }
            let frame =
                protocol::render(&ServerFrame::PresenceChange(PresenceChange { conversation: conv, user, online }));
            let event =
                Event::new(EventKind::Presence, frame).excluding(user).batched(n > self.cfg.limits.batch_members);
            events.push((vec![Topic::Conv(conv.clone())], event));
        }
        for other in dm_partners {
            let id = ids::dm_id(user, other);
            let frame =
                protocol::render(&ServerFrame::PresenceChange(PresenceChange { conversation: &id, user, online }));
            events.push((vec![Topic::User(other.as_str().into())], Event::new(EventKind::Presence, frame)));
        }
        self.engine.publish_all(events).await?;
        Ok(())
    }

    /// A user whose node stopped answering went offline: tell their
    /// conversations (read from storage, as no session of theirs is here).
    pub async fn announce_offline(&self, user: &str) -> Result<(), ChatError> {
        self.on_presence(user, false);
        let entries = self.conversations_for(user).await?;
        let mut convs = Vec::new();
        let mut partners = Vec::new();
        for e in &entries {
            match self.classify(&e.id)? {
                Kind::Direct(a, b) => partners.push(if a == user { b } else { a }.to_string()),
                _ => convs.push(Arc::from(e.id.as_str())),
            }
        }
        self.announce_presence(user, false, &convs, &partners).await
    }

    /// Closes every connection of `user` on every node with 4001 (the service
    /// API's `disconnect`). Returns how many were open across the cluster
    /// just before (as the engine counts them).
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, ChatError> {
        let n = self.engine.connection_count(user).await?;
        let frame = protocol::error_code(None, crate::error::ErrorCode::Unauthorized, "signed out by the platform");
        self.engine.publish(&vec![Topic::User(user.into())], Event::new(EventKind::Disconnect, frame)).await?;
        Ok(n)
    }

    /// Step 4 of [`Node::open_session`]: unsubscribes `stale` groups, unless
    /// a membership event added the user to one since `joins` was read, in
    /// which case that group's member set decides (bounded re-checks; the
    /// event itself re-subscribes when it lands after the last one).
    async fn drop_stale(&self, conn: &Arc<Conn>, mut stale: Vec<Arc<str>>, mut joins: u32) -> Result<(), ChatError> {
        for _ in 0..3 {
            if conn.joins() == joins || stale.is_empty() {
                break;
            }
            joins = conn.joins();
            stale = self.split_members(&conn.user, stale).await?.1;
        }
        if stale.is_empty() {
            return Ok(());
        }
        self.hub.unsubscribe(conn, &stale);
        self.engine.topics_changed();
        if conn.joins() != joins {
            // An addition landed between the last check and the unsubscribe.
            let (back, _) = self.split_members(&conn.user, stale).await?;
            if !back.is_empty() {
                self.hub.subscribe(conn, back.iter().cloned());
                let topics: Vec<Topic> = back.into_iter().map(Topic::Conv).collect();
                self.engine.subscribe(&topics).await?;
            }
        }
        Ok(())
    }

    /// `groups` split into those `user` is a member of and the rest, by the
    /// groups' own member sets (one engine round trip).
    async fn split_members(
        &self,
        user: &str,
        groups: Vec<Arc<str>>,
    ) -> Result<(Vec<Arc<str>>, Vec<Arc<str>>), ChatError> {
        let ids: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let found = self.engine.group_heads(&ids, user, 0).await?;
        let (members, rest): (Vec<_>, Vec<_>) =
            groups.into_iter().zip(found).partition(|(_, g)| g.as_ref().is_some_and(|g| g.member));
        Ok((members.into_iter().map(|(g, _)| g).collect(), rest.into_iter().map(|(g, _)| g).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, engine::memory::MemoryEngine};

    /// A node with group `race` (bob only) and alice's connection subscribed
    /// to it, as a candidate read from the per-user index would be.
    async fn setup() -> (Arc<Node>, Arc<Conn>, crate::hub::Receiver) {
        let hub = Hub::new();
        let node = Node::new(Arc::new(Config::default()), Arc::new(MemoryEngine::new(hub.clone(), 100)), hub);
        node.put_group("race", "Race", vec!["bob".into()]).await.unwrap();
        let (conn, rx) = Conn::new(1, "alice".into(), 64, 1 << 20);
        node.hub.register(&conn);
        node.hub.subscribe(&conn, [Arc::from("race")]);
        (node, conn, rx)
    }

    #[tokio::test]
    async fn a_group_the_user_is_not_in_is_dropped() {
        let (node, conn, _rx) = setup().await;
        node.drop_stale(&conn, vec!["race".into()], conn.joins()).await.unwrap();
        assert!(node.hub.subscriptions(&conn).is_empty());
    }

    #[tokio::test]
    async fn an_addition_that_lands_after_the_membership_read_is_kept() {
        let (node, conn, _rx) = setup().await;
        let joins = conn.joins();
        // The membership read said "not a member"; then the service API adds
        // alice and its event reaches the connection before step 4.
        let change = node.update_group("race", vec!["alice".into()], vec![]).await.unwrap().unwrap();
        node.announce_membership(&change).await.unwrap();
        assert_ne!(conn.joins(), joins);
        node.drop_stale(&conn, vec!["race".into()], joins).await.unwrap();
        assert_eq!(node.hub.subscriptions(&conn), vec![Arc::<str>::from("race")]);
    }
}
