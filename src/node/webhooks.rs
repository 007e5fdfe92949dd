//! The node's side of webhooks (the machinery is in [`crate::webhooks`]):
//! which action makes which event, and the `message.unread` check.

use serde::Serialize;

use super::*;
use crate::webhooks::{EventType, Webhooks};

#[derive(Serialize)]
struct Read<'a> {
    conversation: &'a str,
    user: &'a str,
    read_seq: u64,
}

#[derive(Serialize)]
struct Unread<'a> {
    conversation: &'a str,
    user: &'a str,
    /// The newest message of another member this one has not delivered for
    /// `webhooks.unread_after_s`.
    seq: u64,
    sender: SenderRef<'a>,
    last_seq: u64,
}

#[derive(Serialize)]
struct PresenceData<'a> {
    user: &'a str,
}

/// Newest messages read per `message.unread` check.
const UNREAD_PAGE: usize = 100;

impl Node {
    /// The webhook sender, when `webhooks.url` is set and `ty` is sent.
    fn hook(&self, ty: EventType) -> Option<&Webhooks> {
        self.webhooks.as_deref().filter(|w| w.wants(ty))
    }

    /// Whether `message.created` is sent (the caller keeps the body for it).
    pub(super) fn wants_created(&self) -> bool {
        self.hook(EventType::MessageCreated).is_some()
    }

    /// A message was stored (not a repeat): `message.created`, and the
    /// conversation's unread check.
    pub(super) fn on_stored(&self, frame: &MessageFrame<'_>, kind: Kind<'_>) {
        let Some(w) = self.webhooks.as_deref() else { return };
        let author = crate::webhooks::Erasable { sender: frame.sender.id.to_string(), ts_ms: frame.ts };
        w.emit_erasable(EventType::MessageCreated, frame, Some(author));
        // Open conversations (everyone's lobby) send no unread notices.
        if kind != Kind::Open {
            w.schedule_unread(frame.conversation, frame.ts);
        }
    }

    /// A change of a message was stored (not a repeat): `message.updated`
    /// with the update frame's fields.
    pub(super) fn on_updated(&self, frame: &protocol::UpdateFrame<'_>) {
        if let Some(w) = self.hook(EventType::MessageUpdated) {
            w.emit(EventType::MessageUpdated, frame);
        }
    }

    pub(super) fn on_read(&self, conversation: &str, user: &str, read_seq: u64) {
        if let Some(w) = self.hook(EventType::MessageRead) {
            w.emit(EventType::MessageRead, &Read { conversation, user, read_seq });
        }
    }

    pub(super) fn on_conversation(&self, conversation: &ConversationObject) {
        if let Some(w) = self.hook(EventType::ConversationUpdated) {
            w.emit(EventType::ConversationUpdated, conversation);
        }
    }

    /// A user came online or went offline everywhere.
    pub(super) fn on_presence(&self, user: &str, online: bool) {
        let ty = if online { EventType::UserOnline } else { EventType::UserOffline };
        if let Some(w) = self.hook(ty) {
            w.emit(ty, &PresenceData { user });
        }
    }

    /// Starts the webhook tasks (emitter, delivery, unread checks); none
    /// without `webhooks.url`.
    pub fn spawn_webhooks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(w) = self.webhooks.clone() else { return Vec::new() };
        let mut tasks = w.spawn();
        if w.wants(EventType::MessageUnread) {
            let node = self.clone();
            tasks.push(tokio::spawn(async move {
                let every = Duration::from_millis((w.unread_after_ms() as u64 / 4).clamp(250, 1000));
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let due = match w.outbox().due_unread(protocol::now_ms(), 100).await {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::debug!(error = %e, "unread schedule unavailable");
                            continue;
                        }
                    };
                    for conversation in due {
                        if let Err(e) = node.check_unread(&conversation).await {
                            tracing::warn!(error = %e, conversation, "unread check failed");
                        }
                    }
                }
            }));
        }
        tasks
    }

    /// The `message.unread` check of one conversation, when its time came:
    /// each member who has not delivered a message of another member stored
    /// at least `webhooks.unread_after_s` ago gets one event (at most one per
    /// member and conversation per window, and never twice for the same
    /// messages); members whose message is younger, or who were notified
    /// within the window, are checked again when their time comes.
    pub async fn check_unread(&self, conversation: &str) -> Result<(), ChatError> {
        let Some(w) = self.webhooks.as_deref() else { return Ok(()) };
        let members: Vec<String> = match self.classify(conversation)? {
            Kind::Direct(a, b) => vec![a.to_string(), b.to_string()],
            Kind::Open => return Ok(()),
            Kind::Group => match self.engine.group(conversation).await? {
                Some(g) => std::sync::Arc::unwrap_or_clone(g).members,
                None => return Ok(()),
            },
        };
        let page = self.engine.history(conversation, Page::Before(None, UNREAD_PAGE)).await?;
        let Some(last) = page.messages.last() else { return Ok(()) };
        let last_seq = last.seq;
        let delivered: HashMap<String, u64> =
            self.engine.receipts(conversation).await?.into_iter().map(|r| (r.user, r.delivered_seq)).collect();
        let notified = w.outbox().unread_notified(conversation).await?;
        let now = protocol::now_ms();
        let window = w.unread_after_ms();
        let mut next_due: Option<i64> = None;
        let mut later = |due: i64| next_due = Some(next_due.map_or(due, |d: i64| d.min(due)));
        for member in &members {
            let seen = delivered.get(member).copied().unwrap_or(0);
            let (told_seq, told_at) = notified.get(member).copied().unwrap_or((0, 0));
            let from = seen.max(told_seq);
            if from >= last_seq {
                continue;
            }
            if told_at > 0 && now - told_at < window {
                later(told_at + window);
                continue;
            }
            let missed = page.messages.iter().filter(|m| m.seq > from && *m.sender_id != **member);
            // The newest of them old enough; else the oldest decides when to look again.
            let Some(due) = missed.clone().rfind(|m| now - m.ts_ms >= window) else {
                if let Some(first) = missed.clone().next() {
                    later(first.ts_ms + window);
                }
                continue;
            };
            w.emit(
                EventType::MessageUnread,
                &Unread {
                    conversation,
                    user: member,
                    seq: due.seq,
                    sender: SenderRef { id: &due.sender_id, name: &due.sender_name },
                    last_seq,
                },
            );
            w.outbox().set_unread_notified(conversation, member, last_seq, now).await?;
        }
        if let Some(due) = next_due {
            w.outbox().schedule_unread(conversation, due).await?;
        }
        Ok(())
    }
}
