//! The one error type of the HTTP edge: a status, a stable snake_case `code`, and a
//! message for humans, answered as `{"error": {"code", "message"}}`.
//!
//! Internals never leak: a store failure answers 503 `store_unavailable` and is logged.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::engine::EngineError;

/// Every error code the server answers with: the stable part of an error, which
/// programs match on. The string is the snake_case name in `{"error": {"code"}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A request that does not parse (a query string with a field twice, say).
    BadRequest,
    /// A body that is not JSON, or not an object.
    BadJson,
    /// A body sent without `Content-Type: application/json`.
    NotJson,
    /// A track name outside the rule (`names`).
    BadTrack,
    /// A uid outside the rule (`names`).
    BadUid,
    /// An `updates` list that is empty, too long or not a list.
    BadBatch,
    /// An `Idempotency-Key` that is empty, too long, not printable ASCII, or sent twice.
    BadIdempotencyKey,
    /// An `Idempotency-Key` sent before with other updates.
    IdempotencyKeyReused,
    /// A token lifetime out of range.
    BadTtl,
    /// A long-poll `timeout` that is not a number of seconds in range.
    BadTimeout,
    /// A cursor that is not an event id this server gave out.
    BadEventId,
    /// A page `limit` that is not a whole number in range.
    BadLimit,
    /// A plain request to the WebSocket endpoint.
    NotWebsocket,
    /// A backend call without `Authorization: Bearer`.
    MissingApiKey,
    /// A backend call with another key.
    WrongApiKey,
    /// A listener endpoint without `?token=` on a server that requires one.
    TokenRequired,
    /// A listener token that is not one of this server's.
    BadToken,
    /// A listener token past its `exp`.
    TokenExpired,
    /// A listener token before its `nbf`.
    TokenNotYetValid,
    /// A listener token that would live more than seven days.
    TokenTooLong,
    /// A listener token for another uid.
    TokenWrongListener,
    /// A listener token issued before its listener was disconnected (revoked).
    TokenRevoked,
    /// `POST /api/v1/tokens` on a server without a token secret.
    NoTokenSecret,
    /// A browser page at an origin in neither `public_origins` nor `cors_origins`.
    OriginNotAllowed,
    /// A listener never connected, or forgotten.
    UnknownListener,
    /// No such endpoint.
    NotFound,
    /// An endpoint called with a method it does not take.
    MethodNotAllowed,
    /// A request head that did not arrive within `head_timeout`.
    HeadTimeout,
    /// Plain HTTP sent to a port that serves HTTPS.
    HttpsRequired,
    /// A body over the server's limit.
    BodyTooLarge,
    /// A message over `max_message_bytes`.
    MessageTooLarge,
    /// The server is shutting down.
    ShuttingDown,
    /// The store's disk is full.
    StoreFull,
    /// The store's file is damaged.
    StoreCorrupt,
    /// The store failed (a lost connection, an I/O error).
    StoreUnavailable,
    /// Stored on the Redis primary, but not by as many replicas as
    /// `--redis-min-replicas` asks for.
    StoreNotReplicated,
    /// A fault of the server itself (logged; never for bad input).
    Internal,
}

impl ErrorCode {
    /// The code as answered: `bad_json`, `token_expired`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::BadJson => "bad_json",
            Self::NotJson => "not_json",
            Self::BadTrack => "bad_track",
            Self::BadUid => "bad_uid",
            Self::BadBatch => "bad_batch",
            Self::BadIdempotencyKey => "bad_idempotency_key",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::BadTtl => "bad_ttl",
            Self::BadTimeout => "bad_timeout",
            Self::BadEventId => "bad_event_id",
            Self::BadLimit => "bad_limit",
            Self::NotWebsocket => "not_websocket",
            Self::MissingApiKey => "missing_api_key",
            Self::WrongApiKey => "wrong_api_key",
            Self::TokenRequired => "token_required",
            Self::BadToken => "bad_token",
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::TokenTooLong => "token_too_long",
            Self::TokenWrongListener => "token_wrong_listener",
            Self::TokenRevoked => "token_revoked",
            Self::NoTokenSecret => "no_token_secret",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::UnknownListener => "unknown_listener",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::HeadTimeout => "head_timeout",
            Self::HttpsRequired => "https_required",
            Self::BodyTooLarge => "body_too_large",
            Self::MessageTooLarge => "message_too_large",
            Self::ShuttingDown => "shutting_down",
            Self::StoreFull => "store_full",
            Self::StoreCorrupt => "store_corrupt",
            Self::StoreUnavailable => "store_unavailable",
            Self::StoreNotReplicated => "store_not_replicated",
            Self::Internal => "internal",
        }
    }
}

/// A code equals its name as answered, so a test can say `assert_eq!(e.code, "bad_json")`.
impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered to an HTTP client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code a program can match on.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

impl ApiError {
    /// Any error.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 for a field that is missing, of the wrong type or out of range.
    pub fn bad_field(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401.
    pub fn unauthorized(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 401: a listener endpoint without `?token=` on a server that requires one.
    pub fn token_required() -> Self {
        Self::unauthorized(
            ErrorCode::TokenRequired,
            "this server requires a listener token: add ?token=…",
        )
    }

    /// 404: the listener was never connected (or was forgotten).
    pub fn unknown_listener() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownListener,
            "no such listener: connect it to a track first",
        )
    }

    /// 400 for a `{uid}` path segment that does not even decode (not UTF-8): axum's own
    /// rejection is plain text, and every error here is JSON.
    pub fn from_uid_path(rejection: PathRejection) -> Self {
        Self::bad_field(ErrorCode::BadUid, rejection.body_text())
    }

    /// 400 for a query string that does not parse (a field given twice, say): axum's
    /// own rejection is plain text, and every error here is JSON.
    pub fn from_query(rejection: QueryRejection) -> Self {
        Self::bad_field(ErrorCode::BadRequest, rejection.body_text())
    }

    /// 413.
    pub fn too_large(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
    }
}

impl ApiError {
    /// The body every error answers with: `{"error": {"code", "message"}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}})
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
                ErrorCode::ShuttingDown,
                "the server is shutting down; retry on another node or in a moment",
            ),
            EngineError::Full(detail) => {
                tracing::error!("store failure: the disk is full: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::StoreFull,
                    "the store's disk is full: nothing was stored; retry once space is freed",
                )
            }
            EngineError::Corrupt(detail) => {
                tracing::error!("store failure: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::StoreCorrupt,
                    detail,
                )
            }
            EngineError::KeyReused => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was sent before with other updates: nothing was stored; \
                 send a new key with a new request",
            ),
            EngineError::NotReplicated(detail) => {
                tracing::warn!("store failure: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::StoreNotReplicated,
                    detail,
                )
            }
            EngineError::Storage(detail) => {
                tracing::error!("store failure: {detail}");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::StoreUnavailable,
                    "the store is unavailable; retry in a moment",
                )
            }
        }
    }
}
