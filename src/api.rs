//! The backend's HTTP API under `/api/v1`: thin handlers that check every field, call
//! the engine, and answer JSON. The api key is checked before any of them runs. Beside
//! it, what an operator's tools read without a key: `/healthz` and `/metrics`.
//!
//! Bodies are parsed by hand from a JSON value rather than derived, so each mistake
//! gets its own precise error: a missing field, a wrong type, an unknown key.

use std::net::SocketAddr;

use axum::body::{Body, to_bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value, json};

use crate::auth::{self, DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS};
use crate::engine::{IdempotencyKey, Update};
use crate::error::{ApiError, ErrorCode};
use crate::names;
use crate::node::Node;

/// Most updates in one batch: keeps one request's commit (and its memory) bounded.
pub const MAX_BATCH: usize = 1000;
/// Smallest request body limit; raised to fit one message of `max_message_bytes`.
/// 8 MiB fits a full batch of ordinary messages without letting one request eat memory.
const MIN_BODY_LIMIT: usize = 8 * 1024 * 1024;

type ApiResult = Result<Json<Value>, ApiError>;

/// The backend's calls, each behind the api key, and `/healthz` and `/metrics`.
pub fn router(node: &Node) -> Router<Node> {
    let backend = Router::new()
        .route("/api/v1/update", post(update))
        .route("/api/v1/connect", post(connect))
        .route("/api/v1/disconnect", post(disconnect))
        .route("/api/v1/listeners/{uid}", get(listener))
        .route("/api/v1/tokens", post(tokens))
        .route("/api/v1/stats", get(stats))
        .route_layer(middleware::from_fn_with_state(
            node.clone(),
            require_api_key,
        ));
    backend
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// Lets a backend call through only with the api key; a refusal is logged with the
/// client and the path as sent.
async fn require_api_key(State(node): State<Node>, request: Request, next: Next) -> Response {
    match auth::check_api_key(&node.api_key, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0);
            let client = node
                .settings
                .trusted_proxies
                .client(peer, request.headers());
            // The path as sent, base path included (nesting strips it from the URI).
            let uri = request
                .extensions()
                .get::<OriginalUri>()
                .map_or(request.uri(), |o| &o.0);
            tracing::warn!(
                "refused {} {} from {client}: {}",
                request.method(),
                uri.path(),
                e.code
            );
            e.into_response()
        }
    }
}

/// `GET /healthz`: 200 while the node can serve and store, 503 saying why otherwise.
async fn healthz(State(node): State<Node>) -> Response {
    if node.shutdown.is_cancelled() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "shutting down",
        )
        .into_response();
    }
    if !node.engine.healthy() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StoreUnavailable,
            format!(
                "the {} store is failing (a write or a read did not go through; the log says why)",
                node.engine.kind()
            ),
        )
        .into_response();
    }
    Json(json!({"status": "ok", "engine": node.engine.kind()})).into_response()
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(node): State<Node>) -> Result<Response, ApiError> {
    let counts = node.engine.counts().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics.render(counts),
    )
        .into_response())
}

/// The request header that makes an update safe to retry (SPEC, "Retrying safely").
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The answer header on an update that repeated an earlier one: nothing new was stored.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /api/v1/update`: one message or a batch, stored before the answer; once per
/// `Idempotency-Key`.
pub async fn update(
    State(state): State<Node>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let key = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(key), None) => Some(key.as_bytes()),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_field(
                ErrorCode::BadIdempotencyKey,
                "send one Idempotency-Key, not several",
            ));
        }
    };
    let (updates, batch) = read_updates(&state, &headers, body).await?;
    let key = key
        .map(|key| IdempotencyKey::new(key, &updates))
        .transpose()
        .map_err(|e| ApiError::bad_field(ErrorCode::BadIdempotencyKey, e.0))?;
    let appended = state.engine.append_with_key(updates, key).await?;
    let ids: Vec<String> = appended.positions.iter().map(u64::to_string).collect();
    let answer = if batch {
        json!({ "ids": ids })
    } else {
        json!({ "id": ids.first().cloned().unwrap_or_default() })
    };
    let mut response = Json(answer).into_response();
    if appended.repeated {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The updates of an update request, and whether it was a batch (`{"updates": […]}`).
async fn read_updates(
    state: &Node,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<Update>, bool), ApiError> {
    let mut fields = read_object(state, headers, body).await?;
    if let Some(batch) = fields.0.remove("updates") {
        fields.allow(&[])?;
        let Value::Array(items) = batch else {
            return Err(bad_request(
                "\"updates\" must be an array of {\"track\", \"message\"}",
            ));
        };
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ApiError::bad_field(
                ErrorCode::BadBatch,
                format!(
                    "a batch has 1 to {MAX_BATCH} updates, this one has {}",
                    items.len()
                ),
            ));
        }
        let mut updates = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let Value::Object(item) = item else {
                return Err(bad_request(format!("updates[{i}] must be an object")));
            };
            let update = parse_update(state, Fields(item)).map_err(|e| ApiError {
                message: format!("updates[{i}]: {}", e.message),
                ..e
            })?;
            updates.push(update);
        }
        return Ok((updates, true));
    }
    Ok((vec![parse_update(state, fields)?], false))
}

fn parse_update(state: &Node, mut fields: Fields) -> Result<Update, ApiError> {
    let track = fields.track()?;
    let message = fields
        .0
        .remove("message")
        .ok_or_else(|| bad_request("\"message\" is missing (any JSON value)"))?;
    fields.allow(&[])?;
    let json = message.to_string();
    let limit = state.settings.max_message_bytes;
    if json.len() > limit {
        return Err(ApiError::too_large(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {} bytes as JSON; the limit is {limit}",
                json.len()
            ),
        ));
    }
    Ok(Update { track, json })
}

/// `POST /api/v1/connect`: subscribes a listener (created if new) to a track.
pub async fn connect(State(state): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut fields = read_object(&state, &headers, body).await?;
    let uid = fields.uid()?;
    let track = fields.track()?;
    fields.allow(&[])?;
    let tracks = state.engine.connect(&uid, vec![track]).await?;
    Ok(Json(json!({ "uid": uid, "tracks": tracks })))
}

/// `POST /api/v1/disconnect`: one track, or (without `track`) the whole listener.
pub async fn disconnect(State(state): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut fields = read_object(&state, &headers, body).await?;
    let uid = fields.uid()?;
    let track = if fields.0.contains_key("track") {
        Some(fields.track()?)
    } else {
        None
    };
    fields.allow(&[])?;
    let tracks = state
        .engine
        .disconnect(&uid, track)
        .await?
        .ok_or_else(ApiError::unknown_listener)?;
    Ok(Json(json!({ "uid": uid, "tracks": tracks })))
}

/// `GET /api/v1/listeners/{uid}`.
pub async fn listener(
    State(state): State<Node>,
    uid: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(uid) = uid.map_err(ApiError::from_uid_path)?;
    names::check_uid(&uid).map_err(|e| ApiError::bad_field(ErrorCode::BadUid, e.0))?;
    let listener = state
        .engine
        .listener(&uid)
        .await?
        .ok_or_else(ApiError::unknown_listener)?;
    let last_seen = std::time::UNIX_EPOCH + std::time::Duration::from_millis(listener.last_seen_ms);
    Ok(Json(json!({
        "uid": listener.uid,
        "tracks": listener.track_names(),
        "online": state.hub.online(&uid),
        "last_seen": humantime::format_rfc3339_seconds(last_seen).to_string(),
        "last_event_id": listener.cursor.to_string(),
    })))
}

/// `POST /api/v1/tokens`: a listener token signed with the server's secret.
pub async fn tokens(State(state): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut fields = read_object(&state, &headers, body).await?;
    let uid = fields.uid()?;
    let tracks = match fields.0.remove("tracks") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut tracks = Vec::with_capacity(items.len());
            for item in items {
                let Value::String(track) = item else {
                    return Err(bad_request("\"tracks\" must be an array of strings"));
                };
                names::check_track(&track)
                    .map_err(|e| ApiError::bad_field(ErrorCode::BadTrack, e.0))?;
                tracks.push(track);
            }
            Some(tracks)
        }
        Some(_) => return Err(bad_request("\"tracks\" must be an array of strings")),
    };
    let ttl = match fields.0.remove("ttl_seconds") {
        None | Some(Value::Null) => DEFAULT_TOKEN_TTL_SECONDS,
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|t| (1..=MAX_TOKEN_TTL_SECONDS).contains(t))
            .ok_or_else(|| {
                ApiError::bad_field(
                    ErrorCode::BadTtl,
                    format!("\"ttl_seconds\" is a whole number from 1 to {MAX_TOKEN_TTL_SECONDS}"),
                )
            })?,
        Some(_) => {
            return Err(ApiError::bad_field(
                ErrorCode::BadTtl,
                "\"ttl_seconds\" must be a number",
            ));
        }
    };
    fields.allow(&[])?;
    let Some(tokens) = state.tokens() else {
        return Err(ApiError::bad_field(
            ErrorCode::NoTokenSecret,
            "this server has no token secret: start it with --token-secret to use listener tokens",
        ));
    };
    let token = tokens.mint(&uid, tracks, ttl).map_err(|e| {
        tracing::error!("cannot sign a token: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "cannot sign a token",
        )
    })?;
    Ok(Json(json!({ "token": token })))
}

/// `GET /api/v1/stats`.
pub async fn stats(State(state): State<Node>) -> ApiResult {
    Ok(Json(state.stats().await?))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::bad_field(ErrorCode::BadRequest, message)
}

/// Reads a JSON object body: 415 if it says it is not JSON, 413 past the limit, 400
/// when it does not parse or is not an object.
async fn read_object(state: &Node, headers: &HeaderMap, body: Body) -> Result<Fields, ApiError> {
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        let kind = kind.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = kind.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::NotJson,
                format!("send JSON with Content-Type: application/json (got {essence:?})"),
            ));
        }
    }
    let limit = MIN_BODY_LIMIT.max(state.settings.max_message_bytes + 4096);
    let bytes = to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(
                ErrorCode::BodyTooLarge,
                format!("the request body is over {limit} bytes"),
            )
        } else {
            bad_request(format!("the request body could not be read: {e}"))
        }
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(Fields(map)),
        Ok(_) => Err(bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_field(
            ErrorCode::BadJson,
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// A request's fields, taken out one by one; what is left at the end is unknown.
struct Fields(Map<String, Value>);

impl Fields {
    fn string(&mut self, key: &str) -> Result<String, ApiError> {
        match self.0.remove(key) {
            Some(Value::String(s)) => Ok(s),
            None => Err(bad_request(format!("\"{key}\" is missing"))),
            Some(_) => Err(bad_request(format!("\"{key}\" must be a string"))),
        }
    }

    fn uid(&mut self) -> Result<String, ApiError> {
        let uid = self.string("uid")?;
        names::check_uid(&uid).map_err(|e| ApiError::bad_field(ErrorCode::BadUid, e.0))?;
        Ok(uid)
    }

    fn track(&mut self) -> Result<String, ApiError> {
        let track = self.string("track")?;
        names::check_track(&track).map_err(|e| ApiError::bad_field(ErrorCode::BadTrack, e.0))?;
        Ok(track)
    }

    /// Fails on any key left besides `allowed`: a typo should not pass silently.
    fn allow(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(key) => Err(bad_request(format!("unknown field \"{key}\""))),
            None => Ok(()),
        }
    }
}
