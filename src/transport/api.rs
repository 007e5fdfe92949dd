//! The service API for the CRM backend (bearer `auth.api_key`), and dev tokens.
//!
//! Errors are `{"error":{"code","message"}}` with the matching HTTP status.
//! Unknown group conversations answer 404 here (the backend may know what
//! exists), unlike WebSocket frames, which answer `forbidden` either way.

use std::sync::Arc;

use axum::{
    Json,
    extract::{FromRequest, Path, Query, Request, State, rejection::QueryRejection},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::api_error;
use crate::{
    engine::{Change, Page},
    error::ChatError,
    ids,
    node::{Kind, Node, message_frame, update_frame},
    protocol::{self, MAX_PAGE, ServerFrame, UserRef},
};

/// `Json` whose rejections use the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(api_error(&if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ChatError::too_large("request body too large")
            } else {
                ChatError::bad_request(rej.body_text())
            })),
        }
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ChatError> {
    q.map(|Query(v)| v).map_err(|e| ChatError::bad_request(e.body_text()))
}

/// Route layer of the service API: `Authorization: Bearer <auth.api_key>`,
/// compared in constant time.
pub async fn require_api_key(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let ok = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(node.cfg.api_key().as_bytes())));
    if !ok {
        let mut r = api_error(&ChatError::unauthorized("missing or wrong API key (Authorization: Bearer ...)"));
        r.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("static"));
        return r;
    }
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    user: String,
    name: Option<String>,
}

/// `POST /api/v1/dev/token` (only with `auth.dev_tokens`).
pub async fn dev_token(State(node): State<Arc<Node>>, req: Request) -> Response {
    // The route does not exist without dev tokens, whatever the body.
    if !node.cfg.dev_tokens() {
        return api_error(&ChatError::not_found("no such route"));
    }
    let req: DevTokenRequest = match ApiJson::from_request(req, &()).await {
        Ok(ApiJson(r)) => r,
        Err(resp) => return resp,
    };
    if !ids::valid_user_id(&req.user) {
        return api_error(&ChatError::bad_request("'user' must be 1-128 chars of [A-Za-z0-9_.@-]"));
    }
    let token = node.auth.sign(&req.user, req.name.as_deref(), None);
    Json(json!({"token": token})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutConversation {
    title: Option<String>,
    members: Vec<String>,
}

fn check_title(title: &str) -> Result<(), ChatError> {
    if title.chars().count() > 200 || title.chars().any(char::is_control) {
        return Err(ChatError::bad_request("'title' must be at most 200 characters, without control characters"));
    }
    Ok(())
}

/// `PUT /api/v1/conversations/{id}`: create or replace a group.
pub async fn put_conversation(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    body: ApiJson<PutConversation>,
) -> Result<Response, ChatError> {
    let id = node.group_id(&id)?.to_string();
    let req = body.0;
    node.validate_members(&req.members)?;
    let unique: std::collections::HashSet<&str> = req.members.iter().map(String::as_str).collect();
    node.check_group_size(unique.len())?;
    let title = req.title.unwrap_or_else(|| id.clone());
    check_title(&title)?;
    let change = detached(&node, |node: Arc<Node>| async move {
        let change = node.put_group(&id, &title, req.members).await?;
        tracing::info!(
            conversation = id,
            added = change.added.len(),
            removed = change.removed.len(),
            "conversation put"
        );
        node.announce_membership(&change).await?;
        Ok(change)
    })
    .await?;
    Ok(Json(change.conversation).into_response())
}

/// Runs a group change and its announcement to the end in a task of its
/// own: a client that gives up (or the route's timeout) must not cut it
/// half way, between the stored change and the events its members wait for.
async fn detached<T, F, Fut>(node: &Arc<Node>, f: F) -> Result<T, ChatError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Node>) -> Fut,
    Fut: Future<Output = Result<T, ChatError>> + Send + 'static,
{
    tokio::spawn(f(node.clone())).await.map_err(|e| {
        tracing::error!(error = %e, "group change task failed");
        ChatError::new(crate::error::ErrorCode::Internal, "internal error")
    })?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersUpdate {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// `POST /api/v1/conversations/{id}/members`.
pub async fn post_members(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    body: ApiJson<MembersUpdate>,
) -> Result<Response, ChatError> {
    let id = node.group_id(&id)?.to_string();
    let req = body.0;
    node.validate_members(req.add.iter().chain(&req.remove))?;
    node.check_group_size(req.add.len().max(req.remove.len()))?;
    let change = detached(&node, |node: Arc<Node>| async move {
        let Some(change) = node.update_group(&id, req.add, req.remove).await? else {
            return Err(ChatError::not_found(format!("no conversation '{id}'")));
        };
        tracing::info!(
            conversation = id,
            added = change.added.len(),
            removed = change.removed.len(),
            "members changed"
        );
        node.announce_membership(&change).await?;
        Ok(change)
    })
    .await?;
    Ok(Json(change.conversation).into_response())
}

/// `DELETE /api/v1/conversations/{id}`: deletes a group conversation and its
/// history -> 200 `{"deleted":true}`, or `{"deleted":false}` when no group
/// has this id (a repeat: idempotent). Its members get `conversation`
/// events with `member:false`. Direct and open conversations: 400.
pub async fn delete_conversation(State(node): State<Arc<Node>>, Path(id): Path<String>) -> Result<Response, ChatError> {
    if node.classify(&id)? != Kind::Group {
        return Err(ChatError::bad_request(format!(
            "only group conversations can be deleted ('{id}' is a direct or open conversation)"
        )));
    }
    let change = node.delete_group(&id).await?;
    if let Some(change) = &change {
        tracing::info!(conversation = %id, removed = change.removed.len(), "conversation deleted");
        node.announce_membership(change).await?;
    }
    Ok(Json(json!({"deleted": change.is_some()})).into_response())
}

/// `GET /api/v1/conversations/{id}`.
pub async fn get_conversation(State(node): State<Arc<Node>>, Path(id): Path<String>) -> Result<Response, ChatError> {
    match node.conversation_object(&id).await? {
        Some(c) => Ok(Json(c).into_response()),
        None => Err(ChatError::not_found(format!("no conversation '{id}'"))),
    }
}

/// 404 for a group that does not exist (direct and open ones always exist).
async fn must_exist(node: &Node, id: &str) -> Result<(), ChatError> {
    if node.classify(id)? == Kind::Group && !node.group_exists(id).await? {
        return Err(ChatError::not_found(format!("no conversation '{id}'")));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostMessage {
    sender: String,
    /// Display name shown with the message; defaults to the sender id.
    sender_name: Option<String>,
    body: String,
    client_msg_id: String,
    /// v1.2: the seq of the message this one replies to.
    reply_to: Option<i64>,
}

/// `POST /api/v1/conversations/{id}/messages`: 201 first time, 200 on a repeat.
pub async fn post_message(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    body: ApiJson<PostMessage>,
) -> Result<Response, ChatError> {
    let req = body.0;
    must_exist(&node, &id).await?;
    if !ids::valid_user_id(&req.sender) {
        return Err(ChatError::bad_request("'sender' must be 1-128 chars of [A-Za-z0-9_.@-]"));
    }
    let name = req
        .sender_name
        .map(|n| n.chars().filter(|c| !c.is_control()).take(128).collect::<String>())
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| req.sender.clone());
    let sender = UserRef { id: req.sender, name };
    let a = node.send(&sender, &id, req.client_msg_id, req.body, req.reply_to).await?;
    let status = if a.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    let body = json!({"seq": a.seq, "ts": protocol::format_ts(a.ts_ms), "duplicate": a.duplicate});
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMessages {
    after: Option<u64>,
    before: Option<u64>,
    limit: Option<i64>,
}

/// `GET /api/v1/conversations/{id}/messages?after=0&limit=100` (or `before=`).
pub async fn get_messages(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    q: Result<Query<ListMessages>, QueryRejection>,
) -> Result<Response, ChatError> {
    let q = query(q)?;
    must_exist(&node, &id).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE as i64) as usize;
    let page = match (q.after, q.before) {
        (Some(_), Some(_)) => return Err(ChatError::bad_request("give 'after' or 'before', not both")),
        (None, Some(b)) => Page::Before(Some(b), limit),
        (after, None) => Page::After(after.unwrap_or(0), limit),
    };
    let page = node.history_page(&id, page).await?;
    let messages: Vec<_> = page.messages.iter().map(|m| ServerFrame::Message(message_frame(&id, m))).collect();
    Ok(Json(json!({"messages": messages, "has_more": page.has_more})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchMessage {
    body: String,
    /// Who moderates (the update's `user`); default `system`.
    sender: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeleteMessage {
    sender: Option<String>,
}

/// `PATCH /api/v1/conversations/{id}/messages/{seq}` `{"body","sender"}`:
/// the CRM's moderation edit (no sender rule, no edit window) -> 200 with
/// the update; 404 for an unknown conversation or message.
pub async fn patch_message(
    State(node): State<Arc<Node>>,
    Path((id, seq)): Path<(String, u64)>,
    body: ApiJson<PatchMessage>,
) -> Result<Response, ChatError> {
    let req = body.0;
    moderated(&node, &id, seq, Change::Edit(req.body.into()), req.sender).await
}

/// `DELETE /api/v1/conversations/{id}/messages/{seq}` (optional body
/// `{"sender"}`): the CRM's moderation delete -> 200 with the update.
pub async fn delete_message(
    State(node): State<Arc<Node>>,
    Path((id, seq)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> Result<Response, ChatError> {
    let req: DeleteMessage = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteMessage::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ChatError::bad_request(e.to_string()))?
    };
    moderated(&node, &id, seq, Change::Delete, req.sender).await
}

async fn moderated(
    node: &Node,
    id: &str,
    seq: u64,
    change: Change,
    sender: Option<String>,
) -> Result<Response, ChatError> {
    must_exist(node, id).await?;
    let Some(c) = node.moderate(id, seq, change, sender).await? else {
        return Err(ChatError::not_found(format!("no message {seq} in '{id}'")));
    };
    let mut update = serde_json::to_value(ServerFrame::Update(update_frame(id, &c.update)))
        .map_err(|e| ChatError::new(crate::error::ErrorCode::Internal, e.to_string()))?;
    update["duplicate"] = c.appended.duplicate.into();
    Ok(Json(update).into_response())
}

/// `GET /api/v1/users/{id}/conversations`: what `welcome` would list.
pub async fn get_user_conversations(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> Result<Response, ChatError> {
    if !ids::valid_user_id(&user) {
        return Err(ChatError::bad_request("user id must be 1-128 chars of [A-Za-z0-9_.@-]"));
    }
    let conversations = node.conversations_for(&user).await?;
    Ok(Json(json!({"conversations": conversations})).into_response())
}

/// `DELETE /api/v1/users/{id}/messages`: erases the body of every message the
/// user sent, in every conversation -> 200 `{"erased":N}` (N erased by this
/// call: a repeat answers 0). Nothing is pushed: clients see erased messages
/// (`"deleted":true,"body":""`) in their next history or sync.
pub async fn delete_user_messages(
    State(node): State<Arc<Node>>,
    Path(user): Path<String>,
) -> Result<Response, ChatError> {
    if !ids::valid_user_id(&user) {
        return Err(ChatError::bad_request("user id must be 1-128 chars of [A-Za-z0-9_.@-]"));
    }
    let erased = node.erase_user_messages(&user).await?;
    tracing::info!(user = %user, erased, "user's messages erased");
    Ok(Json(json!({"erased": erased})).into_response())
}

/// `POST /api/v1/users/{id}/disconnect`: closes every connection of the user
/// on every node with 4001 -> `{"closed":N}`, N counted across the cluster
/// just before (the CRM signed the user out or deactivated them).
pub async fn post_disconnect(State(node): State<Arc<Node>>, Path(user): Path<String>) -> Result<Response, ChatError> {
    if !ids::valid_user_id(&user) {
        return Err(ChatError::bad_request("user id must be 1-128 chars of [A-Za-z0-9_.@-]"));
    }
    let closed = node.disconnect_user(&user).await?;
    Ok(Json(json!({"closed": closed})).into_response())
}
