//! What a client reads: history and sync pages (bounded in bytes),
//! presence queries, the conversation list of `welcome`.

use super::*;

impl Node {
    /// A `history` reply (for both `history` and `sync`), at most
    /// `limits.max_reply_bytes` of JSON: a page that would be larger is cut
    /// short (fewer messages, `has_more: true`), keeping the messages nearest
    /// the cursor. `client_epoch`: the epoch a `sync` carried; when it
    /// differs from the stored one the reply pages from seq 1 with `reset`.
    pub async fn history(
        &self,
        user: &str,
        id: Option<&Value>,
        conversation: &str,
        page: Page,
        client_epoch: Option<&str>,
    ) -> Result<Text, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let mut got = self.engine.history(conversation, page).await?;
        let reset = client_epoch.is_some_and(|e| *e != *got.epoch);
        if reset
            && let Page::After(after, limit) | Page::Sync(after, limit) = page
            && after > 0
        {
            let from_start = if matches!(page, Page::Sync(..)) { Page::Sync(0, limit) } else { Page::After(0, limit) };
            got = self.engine.history(conversation, from_start).await?;
        }
        let mut receipts = self.engine.receipts(conversation).await?;
        if kind == Kind::Group {
            // Receipts of members only (a removed member's marks stay stored).
            // Asked of the readers only: the member set of a big group is not
            // read for every sync.
            let users: Vec<&str> = receipts.iter().map(|r| r.user.as_str()).collect();
            let keep = self.engine.are_members(conversation, &users).await?;
            let mut keep = keep.into_iter();
            receipts.retain(|_| keep.next().unwrap_or(false));
        }
        let budget = self.cfg.limits.max_reply_bytes;
        // Receipts take at most half the reply; beyond that the most advanced
        // marks are kept (a conversation with tens of thousands of readers).
        let receipt_bytes = |r: &crate::engine::ReceiptRow| r.user.len() + 60;
        if receipts.iter().map(receipt_bytes).sum::<usize>() > budget / 2 {
            receipts.sort_by(|a, b| b.read_seq.cmp(&a.read_seq).then(b.delivered_seq.cmp(&a.delivered_seq)));
            let mut used = 0;
            receipts.retain(|r| {
                used += receipt_bytes(r);
                used <= budget / 2
            });
            receipts.sort_by(|a, b| a.user.cmp(&b.user));
        }
        let receipts: Vec<ReceiptState> = receipts
            .iter()
            .map(|r| ReceiptState { user: &r.user, delivered_seq: r.delivered_seq, read_seq: r.read_seq })
            .collect();
        // Messages (in their current state) and, for sync, updates: by seq.
        let mut rendered: Vec<(u64, String)> =
            got.messages
                .iter()
                .map(|m| (m.seq, protocol::render(&ServerFrame::Message(message_frame(conversation, m))).to_string()))
                .chain(got.updates.iter().map(|u| {
                    (u.seq, protocol::render(&ServerFrame::Update(update_frame(conversation, u))).to_string())
                }))
                .collect();
        rendered.sort_by_key(|r| r.0);
        let rendered: Vec<String> = rendered.into_iter().map(|r| r.1).collect();
        let head = protocol::render(&ServerFrame::History(HistoryPage {
            id,
            conversation,
            epoch: &got.epoch,
            reset,
            messages: Vec::new(),
            receipts: receipts.clone(),
            has_more: true,
        }));
        // What the messages may take: the budget less the rest of the reply
        // and a comma per message. The newest page keeps its newest messages,
        // a forward page its oldest; one message always fits (validated).
        let room = budget.saturating_sub(head.len());
        let mut keep = 0;
        let mut used = 0;
        let order: Box<dyn Iterator<Item = &String>> = match page {
            Page::Before(..) => Box::new(rendered.iter().rev()),
            Page::After(..) | Page::Sync(..) => Box::new(rendered.iter()),
        };
        for m in order {
            if keep > 0 && used + m.len() + 1 > room {
                break;
            }
            used += m.len() + 1;
            keep += 1;
        }
        let cut = keep < rendered.len();
        let kept: &[String] = match page {
            Page::Before(..) => &rendered[rendered.len() - keep..],
            Page::After(..) | Page::Sync(..) => &rendered[..keep],
        };
        let messages = kept
            .iter()
            .map(|m| serde_json::value::RawValue::from_string(m.clone()).expect("rendered JSON is valid"))
            .collect::<Vec<_>>();
        Ok(protocol::render(&ServerFrame::History(HistoryPage {
            id,
            conversation,
            epoch: &got.epoch,
            reset,
            messages: messages.iter().map(|m| &**m).collect(),
            receipts,
            has_more: got.has_more || cut,
        })))
    }

    pub async fn presence(&self, user: &str, id: Option<&Value>, conversation: &str) -> Result<Text, ChatError> {
        let kind = self.authorize(user, conversation).await?;
        let online = match kind {
            Kind::Direct(a, b) => self.engine.online(Some(&[a.to_string(), b.to_string()])).await?,
            Kind::Open => self.engine.online(None).await?,
            Kind::Group => {
                let group = self.engine.group(conversation).await?;
                self.engine.online(Some(group.as_ref().map_or(&[][..], |g| g.members.as_slice()))).await?
            }
        };
        Ok(protocol::render(&ServerFrame::PresenceReply(PresenceReply { id, conversation, online: &online })))
    }

    /// Conversation ids of a user: open ones first, then groups and direct
    /// conversations holding a message.
    pub async fn conversation_ids(&self, user: &str) -> Result<Vec<String>, ChatError> {
        let mut ids: Vec<String> = self.cfg.chat.open_conversations.clone();
        ids.extend(self.engine.user_conversations(user).await?);
        Ok(ids)
    }

    /// The entries `welcome` lists for these conversation ids.
    pub async fn entries(&self, user: &str, ids: &[String]) -> Result<Vec<ConversationEntry>, ChatError> {
        let counters = self.engine.counters(user, ids).await?;
        let groups: Vec<String> =
            ids.iter().filter(|id| matches!(self.classify(id), Ok(Kind::Group))).cloned().collect();
        let limit = self.cfg.limits.presence_max_members;
        let group_info = self.engine.group_heads(&groups, user, limit).await?;
        let mut group_info = groups.iter().zip(group_info);
        let mut out = Vec::with_capacity(ids.len());
        for (id, c) in ids.iter().zip(counters) {
            let c = &c;
            let (title, kind, members) = match self.classify(id)? {
                Kind::Open => (title_case(id), "open", None),
                // Listed once it holds a message (an index entry left by a
                // failed first send does not count).
                Kind::Direct(..) if c.last_seq == 0 => continue,
                Kind::Direct(a, b) => {
                    (if a == user { b } else { a }.to_string(), "direct", Some(vec![a.to_string(), b.to_string()]))
                }
                Kind::Group => match group_info.next() {
                    // Membership is read from the group's own member set: an
                    // index entry left by a failed write grants nothing.
                    Some((_, Some(g))) if g.member => (g.title, "group", g.members),
                    // Removed between the two reads, or never a member: not listed.
                    _ => continue,
                },
            };
            out.push(ConversationEntry {
                id: id.clone(),
                title,
                kind,
                last_seq: c.last_seq,
                read_seq: c.read_seq,
                unread: c.unread,
                epoch: c.epoch.to_string(),
                members,
            });
        }
        Ok(out)
    }

    pub async fn conversations_for(&self, user: &str) -> Result<Vec<ConversationEntry>, ChatError> {
        let ids = self.conversation_ids(user).await?;
        self.entries(user, &ids).await
    }
}
