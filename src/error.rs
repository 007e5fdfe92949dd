//! Errors of the chat domain, with the protocol's codes.
//!
//! [`ChatError`] is what a frame handler or a service API route answers with: a
//! code from PROTOCOL.md and a message safe to show to the client. Storage
//! failures arrive as [`EngineError`] and map to `unavailable` (retry later,
//! nothing stored) or `internal` (a bug, logged, never detailed to the client).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// HTTP status of the service API for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ChatError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, m)
    }
    /// The same error with another message.
    pub fn with_message(mut self, m: impl Into<String>) -> Self {
        self.message = m.into();
        self
    }
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self {
            code: ErrorCode::RateLimited,
            message: "sending too fast; retry later".into(),
            retry_after_ms: Some(retry_after_ms.max(1)),
        }
    }

    /// Over `limits.send_bytes_per_s`: `rate_limited`, saying which budget.
    pub fn bytes_limited(retry_after_ms: u64) -> Self {
        Self::rate_limited(retry_after_ms).with_message("too many bytes sent (limits.send_bytes_per_s)")
    }
}

/// A storage or fan-out failure inside an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The storage cannot be reached or did not answer in time. Nothing was
    /// stored; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The write is stored but replicas did not confirm it in time
    /// (`valkey.ack_replicas`); a retry with the same `client_msg_id` finds
    /// it.
    #[error("stored, but not confirmed: {0}")]
    Unconfirmed(String),
    /// Storage answered something that cannot be (a bug or corrupt data).
    #[error("storage error: {0}")]
    Internal(String),
    /// The sender's cluster-wide send bucket is empty; retry after this many ms.
    #[error("rate limited")]
    RateLimited(u64),
    /// The sender's cluster-wide send byte bucket is short of the body;
    /// retry after this many ms.
    #[error("byte budget exceeded")]
    BytesLimited(u64),
}

impl EngineError {
    /// The storage refused a write because it is full (Valkey `OOM` under
    /// `maxmemory` with `noeviction`): reads still work.
    pub fn is_full(&self) -> bool {
        matches!(self, EngineError::Unavailable(d) if d.contains("OOM"))
    }
}

impl From<EngineError> for ChatError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "storage unavailable");
                crate::metrics::storage_error();
                ChatError::new(ErrorCode::Unavailable, "storage unavailable; nothing was stored, retry later")
            }
            EngineError::Unconfirmed(detail) => {
                tracing::warn!(error = %detail, "write not confirmed by replicas");
                crate::metrics::storage_error();
                ChatError::new(
                    ErrorCode::Unavailable,
                    "stored, but not confirmed by replicas in time; retry with the same client_msg_id",
                )
            }
            EngineError::RateLimited(ms) => ChatError::rate_limited(ms),
            EngineError::BytesLimited(ms) => ChatError::bytes_limited(ms),
            EngineError::Internal(detail) => {
                tracing::error!(error = %detail, "storage internal error");
                crate::metrics::storage_error();
                ChatError::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;
