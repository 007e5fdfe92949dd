//! Messages people can change (v1.2): `edit`, `delete` and `react` frames,
//! the service API's moderation, `reply_to`, and what each refusal answers.
//! The rules that depend on a message's current state are decided by the
//! engine in the same atomic step as the write
//! ([`crate::engine::changes`]); what depends on the frame alone is checked
//! here first, so bad input never reaches storage.

use super::*;
use crate::engine::{Change, NewUpdate, Refusal, StoredUpdate, UpdateOutcome};

/// The longest emoji accepted, in Unicode scalar values (PROTOCOL v1.2).
pub const MAX_EMOJI_CHARS: usize = 16;

/// Who a moderation change is made by when the API names nobody.
pub const SYSTEM_USER: &str = "system";

/// A stored (or repeated) change, for the API's answer.
pub struct Changed {
    pub appended: Appended,
    pub update: StoredUpdate,
}

impl Node {
    /// Checks an emoji: 1 to 16 characters, no white space or control
    /// characters.
    pub fn validate_emoji(emoji: &str) -> Result<(), ChatError> {
        let n = emoji.chars().count();
        if n == 0 || n > MAX_EMOJI_CHARS {
            return Err(ChatError::bad_request(format!("emoji must be 1-{MAX_EMOJI_CHARS} characters")));
        }
        if emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ChatError::bad_request("emoji must not hold white space or control characters"));
        }
        Ok(())
    }

    /// The change an `edit`, `delete` or `react` frame asks for, checked
    /// for what the frame alone decides (body, emoji).
    pub fn change_of(&self, cmd: &protocol::Command) -> Result<Change, ChatError> {
        match cmd {
            protocol::Command::Edit { body, .. } => {
                self.validate_body(body)?;
                Ok(Change::Edit(body.as_str().into()))
            }
            protocol::Command::React { emoji, on, .. } => {
                Self::validate_emoji(emoji)?;
                Ok(Change::Reaction { emoji: emoji.as_str().into(), on: *on })
            }
            _ => Ok(Change::Delete),
        }
    }

    /// Checks the body of a send or an edit.
    pub fn validate_body(&self, body: &str) -> Result<(), ChatError> {
        self.validate_message("-", body)
    }

    /// `reply_to` of a send: a message (not an update) of the conversation.
    pub(super) async fn check_reply_to(&self, conversation: &str, reply_to: Option<i64>) -> Result<(), ChatError> {
        let Some(seq) = reply_to else { return Ok(()) };
        if seq < 1 || !self.engine.is_message(conversation, seq as u64).await? {
            return Err(ChatError::bad_request(format!("reply_to {seq} is not a message of '{conversation}'")));
        }
        Ok(())
    }

    /// An `edit`, `delete` or `react` frame of a member: stored and
    /// broadcast as an `update`, or a repeat (`duplicate`).
    pub async fn change(
        &self,
        user: &UserRef,
        conversation: &str,
        seq: i64,
        change: Change,
    ) -> Result<Appended, ChatError> {
        match &change {
            Change::Edit(body) => self.validate_body(body)?,
            Change::Reaction { emoji, .. } => Self::validate_emoji(emoji)?,
            Change::Delete => {}
        }
        let kind = self.classify(conversation)?;
        if let Kind::Direct(a, b) = kind
            && user.id != a
            && user.id != b
        {
            return Err(ChatError::forbidden(format!("not a member of '{conversation}'")));
        }
        let edit_window_ms = (self.cfg.limits.edit_window_s as i64).saturating_mul(1000);
        let u = self.new_update(user.clone(), conversation, seq, change, kind == Kind::Group, false, edit_window_ms);
        let target = u.target;
        match self.store_update(u, kind).await? {
            Ok(changed) => Ok(changed.appended),
            Err(r) => Err(refusal(r, conversation, target)),
        }
    }

    /// The service API's moderation (PATCH / DELETE of one message): no
    /// sender rule and no edit window. `None`: no such conversation or message.
    pub async fn moderate(
        &self,
        conversation: &str,
        seq: u64,
        change: Change,
        sender: Option<String>,
    ) -> Result<Option<Changed>, ChatError> {
        if let Change::Edit(body) = &change {
            self.validate_body(body)?;
        }
        let kind = self.classify(conversation)?;
        if kind == Kind::Group && self.engine.group(conversation).await?.is_none() {
            return Ok(None);
        }
        let id = sender.unwrap_or_else(|| SYSTEM_USER.to_string());
        if !crate::ids::valid_user_id(&id) {
            return Err(ChatError::bad_request("sender must be a valid user id"));
        }
        let user = UserRef { name: id.clone(), id };
        let seq = seq.min(i64::MAX as u64) as i64;
        let u = self.new_update(user, conversation, seq, change, false, true, 0);
        match self.store_update(u, kind).await? {
            Ok(changed) => Ok(Some(changed)),
            Err(Refusal::NoTarget | Refusal::NotMember) => Ok(None),
            Err(r) => Err(refusal(r, conversation, seq as u64)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_update(
        &self,
        user: UserRef,
        conversation: &str,
        seq: i64,
        change: Change,
        require_member: bool,
        moderation: bool,
        edit_window_ms: i64,
    ) -> NewUpdate {
        NewUpdate {
            conversation: conversation.to_string(),
            user,
            target: seq.max(0) as u64,
            change,
            ts_ms: protocol::now_ms(),
            require_member,
            moderation,
            edit_window_ms,
            max_reactions: self.cfg.limits.reactions_per_message,
        }
    }

    async fn store_update(&self, u: NewUpdate, kind: Kind<'_>) -> Result<Result<Changed, Refusal>, ChatError> {
        let conversation = u.conversation.clone();
        let route = kind.route(&conversation);
        let span = tracing::debug_span!("store", conversation, seq = tracing::field::Empty);
        let outcome = self.engine.update(u.clone(), &route).instrument(span.clone()).await?;
        let appended = match outcome {
            UpdateOutcome::Applied(a) => a,
            UpdateOutcome::Refused(r) => return Ok(Err(r)),
        };
        span.record("seq", appended.seq);
        let mut update = crate::engine::changes::stored_update(&u, appended.seq);
        update.ts_ms = appended.ts_ms;
        if !appended.duplicate {
            metrics::message_stored();
            self.on_updated(&update_frame(&conversation, &update));
        }
        tracing::debug!(user = %u.user.id, conversation, seq = appended.seq, target = u.target,
            kind = u.change.kind(), duplicate = appended.duplicate, "change stored");
        Ok(Ok(Changed { appended, update }))
    }
}

/// The protocol's answer to a refused change.
fn refusal(r: Refusal, conversation: &str, target: u64) -> ChatError {
    match r {
        Refusal::NotMember => ChatError::forbidden(format!("not a member of '{conversation}'")),
        Refusal::NoTarget => ChatError::bad_request(format!("seq {target} is not a message of '{conversation}'")),
        Refusal::NotSender => ChatError::forbidden("only its sender may edit or delete a message"),
        Refusal::WindowClosed => ChatError::forbidden("the message is too old to edit (limits.edit_window_s)"),
        Refusal::Deleted => ChatError::bad_request("a deleted message cannot be edited"),
        Refusal::TooManyReactions => {
            ChatError::bad_request("the message has the most distinct emoji allowed (limits.reactions_per_message)")
        }
    }
}

/// The `update` frame of a stored change (v1.2).
pub fn update_frame<'a>(conversation: &'a str, u: &'a crate::engine::StoredUpdate) -> protocol::UpdateFrame<'a> {
    use crate::engine::Change;
    let (body, emoji, on) = match &u.change {
        Change::Edit(b) => (Some(&**b), None, None),
        Change::Delete => (None, None, None),
        Change::Reaction { emoji, on } => (None, Some(&**emoji), Some(*on)),
    };
    protocol::UpdateFrame {
        conversation,
        seq: u.seq,
        ts: u.ts_ms,
        target: u.target,
        kind: u.change.kind(),
        user: SenderRef { id: &u.user_id, name: &u.user_name },
        body,
        emoji,
        on,
    }
}
