//! The one error type of the HTTP edge: a status, a stable snake_case `code`, and a
//! message for humans, answered as `{"error": {"code", "message"}}`.
//!
//! Internals never leak: a store failure answers 503 `store_unavailable` and is logged.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::engine::EngineError;

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code a program can match on.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// Any error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 for a field that is missing, of the wrong type or out of range.
    pub fn bad_field(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 401: a listener endpoint without `?token=` on a server that requires one.
    pub fn token_required() -> Self {
        Self::unauthorized(
            "token_required",
            "this server requires a listener token: add ?token=…",
        )
    }

    /// 404: the listener was never connected (or was forgotten).
    pub fn unknown_listener() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_listener",
            "no such listener: connect it to a track first",
        )
    }

    /// 400 for a `{uid}` path segment that does not even decode (not UTF-8): axum's own
    /// rejection is plain text, and every error here is JSON.
    pub fn from_uid_path(rejection: PathRejection) -> Self {
        Self::bad_field("bad_uid", rejection.body_text())
    }

    /// 400 for a query string that does not parse (a field given twice, say): axum's
    /// own rejection is plain text, and every error here is JSON.
    pub fn from_query(rejection: QueryRejection) -> Self {
        Self::bad_field("bad_request", rejection.body_text())
    }

    /// 413.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }
}

impl ApiError {
    /// The body every error answers with: `{"error": {"code", "message"}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of a too-large body is never read, so this connection cannot
            // carry another request: say so, and the client will not reuse it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; retry on another node or in a moment",
            ),
            EngineError::Full(detail) => {
                tracing::error!("store failure: the disk is full: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_full",
                    "the store's disk is full: nothing was stored; retry once space is freed",
                )
            }
            EngineError::Corrupt(detail) => {
                tracing::error!("store failure: {detail}");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_corrupt", detail)
            }
            EngineError::KeyReused => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was sent before with other updates: nothing was stored; \
                 send a new key with a new request",
            ),
            EngineError::Storage(detail) => {
                tracing::error!("store failure: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store is unavailable; retry in a moment",
                )
            }
        }
    }
}
