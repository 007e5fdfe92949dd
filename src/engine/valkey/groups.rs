//! Group membership (`group.lua`, atomic per group), the per-user
//! conversation index, and known members of open conversations.

use std::sync::Arc;

use async_trait::async_trait;
use fred::prelude::*;

use super::{ValkeyEngine, errors::err};
use crate::{
    engine::{Group, GroupHead, Groups, MembershipChange},
    error::{EngineError, EngineResult},
    protocol::ConversationObject,
};

/// A pipelined reply, taken out of the list without copying it.
fn take(v: &mut fred::types::Value) -> fred::types::Value {
    std::mem::replace(v, fred::types::Value::Null)
}

/// The title of a group from `HMGET meta group title`, `None` when the
/// conversation is not a group.
fn group_title(meta: fred::types::Value) -> EngineResult<Option<String>> {
    let meta: Vec<Option<String>> = meta.convert().map_err(err)?;
    let mut meta = meta.into_iter();
    Ok(match (meta.next().flatten().as_deref(), meta.next()) {
        (Some("1"), title) => Some(title.flatten().unwrap_or_default()),
        _ => None,
    })
}

#[async_trait]
impl Groups for ValkeyEngine {
    async fn group(&self, conversation: &str) -> EngineResult<Option<Arc<Group>>> {
        Ok(self.groups(&[conversation.to_string()]).await?.pop().flatten())
    }

    async fn groups(&self, conversations: &[String]) -> EngineResult<Vec<Option<Arc<Group>>>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let pipe = self.inner.pool.next().pipeline();
        for c in conversations {
            let _: () = pipe.hmget(k.conv(c, "meta"), vec!["group", "title"]).await.map_err(err)?;
            let _: () = pipe.smembers(k.conv(c, "mem")).await.map_err(err)?;
        }
        let mut replies: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        let mut out = Vec::with_capacity(conversations.len());
        for pair in replies.chunks_mut(2) {
            let Some(title) = group_title(take(&mut pair[0]))? else {
                out.push(None);
                continue;
            };
            let mut members: Vec<String> = take(&mut pair[1]).convert().map_err(err)?;
            members.sort();
            out.push(Some(Arc::new(Group { title, members })));
        }
        Ok(out)
    }

    async fn group_heads(
        &self,
        conversations: &[String],
        user: &str,
        members_up_to: usize,
    ) -> EngineResult<Vec<Option<GroupHead>>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        // The title, the user's membership and the size; then the member
        // sets of the small groups the user is in (two round trips, never
        // the member set of a big group).
        let k = &self.inner.keys;
        let pipe = self.inner.pool.next().pipeline();
        for c in conversations {
            let _: () = pipe.hmget(k.conv(c, "meta"), vec!["group", "title"]).await.map_err(err)?;
            let _: () = pipe.sismember(k.conv(c, "mem"), user).await.map_err(err)?;
            let _: () = pipe.scard(k.conv(c, "mem")).await.map_err(err)?;
        }
        let mut replies: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        let mut out = Vec::with_capacity(conversations.len());
        let mut listed = Vec::new();
        for (i, r) in replies.chunks_mut(3).enumerate() {
            let Some(title) = group_title(take(&mut r[0]))? else {
                out.push(None);
                continue;
            };
            let member: bool = take(&mut r[1]).convert().map_err(err)?;
            let count: usize = take(&mut r[2]).convert().map_err(err)?;
            if member && count <= members_up_to {
                listed.push(i);
            }
            out.push(Some(GroupHead { title, member, members: None }));
        }
        if !listed.is_empty() {
            let pipe = self.inner.pool.next().pipeline();
            for &i in &listed {
                let _: () = pipe.smembers(k.conv(&conversations[i], "mem")).await.map_err(err)?;
            }
            let sets: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
            for (&i, set) in listed.iter().zip(sets) {
                let mut members: Vec<String> = set.convert().map_err(err)?;
                members.sort();
                if let Some(h) = out[i].as_mut() {
                    h.members = Some(members);
                }
            }
        }
        Ok(out)
    }

    async fn is_member(&self, conversation: &str, user: &str) -> EngineResult<bool> {
        self.inner.pool.next().sismember(self.inner.keys.conv(conversation, "mem"), user).await.map_err(err)
    }

    async fn are_members(&self, conversation: &str, users: &[&str]) -> EngineResult<Vec<bool>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.inner.keys.conv(conversation, "mem");
        let client = self.inner.pool.next();
        let mut out = Vec::with_capacity(users.len());
        // Bounded commands: a receipt list of 100,000 users is asked in parts.
        for part in users.chunks(1000) {
            let part: Vec<&str> = part.to_vec();
            let got: Vec<bool> = client.smismember(key.clone(), part).await.map_err(err)?;
            out.extend(got);
        }
        Ok(out)
    }

    async fn put_group(&self, conversation: &str, title: &str, members: Vec<String>) -> EngineResult<MembershipChange> {
        // Members are indexed before they join and unindexed after they
        // leave, so a crash in between leaves an index entry that welcome
        // filters out, never a membership without its index entry.
        self.index(conversation, &members, true).await?;
        let mut args = vec!["put".to_string(), title.to_string()];
        args.extend(members);
        let change = self.run_group(conversation, args).await?.expect("put always returns a group");
        self.index(conversation, &change.removed, false).await?;
        Ok(change)
    }

    async fn update_group(
        &self,
        conversation: &str,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> EngineResult<Option<MembershipChange>> {
        self.index(conversation, &add, true).await?;
        let mut args = vec!["update".to_string(), add.len().to_string()];
        args.extend(add.iter().cloned());
        args.extend(remove);
        let Some(change) = self.run_group(conversation, args).await? else {
            // No such group: undo the optimistic index entries.
            self.index(conversation, &add, false).await?;
            return Ok(None);
        };
        self.index(conversation, &change.removed, false).await?;
        Ok(Some(change))
    }

    async fn delete_group(&self, conversation: &str) -> EngineResult<Option<MembershipChange>> {
        let i = &self.inner;
        let k = &i.keys;
        let keys = vec![
            k.conv(conversation, "meta"),
            k.conv(conversation, "mem"),
            k.conv(conversation, "msgs"),
            k.conv(conversation, "idem"),
            k.conv(conversation, "rcpt"),
            k.conv(conversation, "msgs-erasing"),
            k.conv(conversation, "erasing"),
            k.conv(conversation, "mseq"),
            k.conv(conversation, "st"),
        ];
        let r = i.scripts.delete.run(&i.pool, keys, vec![k.conv(conversation, "own:")]).await?;
        let parts: Vec<fred::types::Value> = r.convert().map_err(err)?;
        if parts.is_empty() {
            return Ok(None);
        }
        let [title, members]: [fred::types::Value; 2] =
            parts.try_into().map_err(|_| EngineError::Internal("delete script returned a wrong shape".into()))?;
        let mut removed: Vec<String> = members.convert().map_err(err)?;
        removed.sort();
        // Unindexed after the delete, as for a removal (a crash in between
        // leaves an entry welcome filters out).
        self.index(conversation, &removed, false).await?;
        Ok(Some(MembershipChange {
            conversation: ConversationObject {
                id: conversation.to_string(),
                title: title.convert().map_err(err)?,
                members: Vec::new(),
                last_seq: 0,
            },
            added: Vec::new(),
            removed,
        }))
    }

    async fn join_open(&self, conversation: &str, user: &str) -> EngineResult<usize> {
        let key = self.inner.keys.conv(conversation, "open");
        let pipe = self.inner.pool.next().pipeline();
        let _: () = pipe.sadd(&key, user).await.map_err(err)?;
        let _: () = pipe.scard(&key).await.map_err(err)?;
        let r: (i64, usize) = pipe.all().await.map_err(err)?;
        Ok(r.1)
    }

    async fn open_members(&self, conversation: &str) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> =
            self.inner.pool.next().smembers(self.inner.keys.conv(conversation, "open")).await.map_err(err)?;
        v.sort();
        Ok(v)
    }

    async fn member_count(&self, conversation: &str, open: bool) -> EngineResult<usize> {
        let key = self.inner.keys.conv(conversation, if open { "open" } else { "mem" });
        self.inner.pool.next().scard(key).await.map_err(err)
    }
}

impl ValkeyEngine {
    /// Runs `group.lua` on a conversation; `None` when an update names no group.
    async fn run_group(&self, conversation: &str, args: Vec<String>) -> EngineResult<Option<MembershipChange>> {
        let k = &self.inner.keys;
        let keys = vec![k.conv(conversation, "mem"), k.conv(conversation, "meta")];
        let r = self.inner.scripts.group.run(&self.inner.pool, keys, args).await?;
        membership_change(conversation, r)
    }

    pub(super) async fn index(&self, conversation: &str, users: &[String], add: bool) -> EngineResult<()> {
        if users.is_empty() {
            return Ok(());
        }
        let pipe = self.inner.pool.next().pipeline();
        for u in users {
            let key = self.inner.keys.user_convs(u);
            if add {
                let _: () = pipe.sadd(key, conversation).await.map_err(err)?;
            } else {
                let _: () = pipe.srem(key, conversation).await.map_err(err)?;
            }
        }
        let _: Vec<fred::types::Value> = pipe.all().await.map_err(err)?;
        Ok(())
    }
}

fn membership_change(conversation: &str, r: fred::types::Value) -> EngineResult<Option<MembershipChange>> {
    let parts: Vec<fred::types::Value> = r.convert().map_err(err)?;
    if parts.is_empty() {
        return Ok(None);
    }
    let [title, last, added, removed, members]: [fred::types::Value; 5] =
        parts.try_into().map_err(|_| EngineError::Internal("group script returned a wrong shape".into()))?;
    let mut added: Vec<String> = added.convert().map_err(err)?;
    let mut removed: Vec<String> = removed.convert().map_err(err)?;
    let mut members: Vec<String> = members.convert().map_err(err)?;
    added.sort();
    removed.sort();
    members.sort();
    Ok(Some(MembershipChange {
        conversation: ConversationObject {
            id: conversation.to_string(),
            title: title.convert().map_err(err)?,
            members,
            last_seq: last.convert().map_err(err)?,
        },
        added,
        removed,
    }))
}
