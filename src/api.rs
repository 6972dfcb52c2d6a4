//! The backend's HTTP API under `/api/v1`: thin handlers that check every field, call
//! the engine, and answer JSON. The api key is checked before any of them runs (see
//! `server`).
//!
//! Bodies are parsed by hand from a JSON value rather than derived, so each mistake
//! gets its own precise error: a missing field, a wrong type, an unknown key.

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::auth::{DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS};
use crate::engine::{Update, now_ms};
use crate::error::ApiError;
use crate::metrics::Transport;
use crate::names;
use crate::server::AppState;

// Most updates in one batch; the bench keeps to the same limit.
pub use dolores_protocol::api::MAX_BATCH;
/// Smallest request body limit; raised to fit one message of `max_message_bytes`.
/// 8 MiB fits a full batch of ordinary messages without letting one request eat memory.
const MIN_BODY_LIMIT: usize = 8 * 1024 * 1024;

type ApiResult = Result<Json<Value>, ApiError>;

/// `POST /api/v1/update`: one message or a batch, stored before the answer.
pub async fn update(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut fields = read_object(&state, &headers, body).await?;
    if let Some(batch) = fields.0.remove("updates") {
        fields.allow(&[])?;
        let Value::Array(items) = batch else {
            return Err(bad_request(
                "\"updates\" must be an array of {\"track\", \"message\"}",
            ));
        };
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(ApiError::bad_field(
                "bad_batch",
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
            let update = parse_update(&state, Fields(item)).map_err(|e| ApiError {
                message: format!("updates[{i}]: {}", e.message),
                ..e
            })?;
            updates.push(update);
        }
        let ids = state.engine.append(updates).await?;
        let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
        return Ok(Json(json!({ "ids": ids })));
    }
    let update = parse_update(&state, fields)?;
    let ids = state.engine.append(vec![update]).await?;
    let id = ids.first().map(u64::to_string).unwrap_or_default();
    Ok(Json(json!({ "id": id })))
}

fn parse_update(state: &AppState, mut fields: Fields) -> Result<Update, ApiError> {
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
            "message_too_large",
            format!(
                "the message is {} bytes as JSON; the limit is {limit}",
                json.len()
            ),
        ));
    }
    Ok(Update { track, json })
}

/// `POST /api/v1/connect`: subscribes a listener (created if new) to a track.
pub async fn connect(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let mut fields = read_object(&state, &headers, body).await?;
    let uid = fields.uid()?;
    let track = fields.track()?;
    fields.allow(&[])?;
    let tracks = state.engine.connect(&uid, vec![track]).await?;
    Ok(Json(json!({ "uid": uid, "tracks": tracks })))
}

/// `POST /api/v1/disconnect`: one track, or (without `track`) the whole listener.
pub async fn disconnect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
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
    State(state): State<AppState>,
    uid: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(uid) = uid.map_err(ApiError::from_uid_path)?;
    names::check_uid(&uid).map_err(|e| ApiError::bad_field("bad_uid", e.0))?;
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
pub async fn tokens(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
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
                names::check_track(&track).map_err(|e| ApiError::bad_field("bad_track", e.0))?;
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
                    "bad_ttl",
                    format!("\"ttl_seconds\" is a whole number from 1 to {MAX_TOKEN_TTL_SECONDS}"),
                )
            })?,
        Some(_) => {
            return Err(ApiError::bad_field(
                "bad_ttl",
                "\"ttl_seconds\" must be a number",
            ));
        }
    };
    fields.allow(&[])?;
    let Some(tokens) = state.tokens() else {
        return Err(ApiError::bad_field(
            "no_token_secret",
            "this server has no token secret: start it with --token-secret to use listener tokens",
        ));
    };
    let token = tokens.mint(&uid, tracks, ttl).map_err(|e| {
        tracing::error!("cannot sign a token: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "cannot sign a token",
        )
    })?;
    Ok(Json(json!({ "token": token })))
}

/// `GET /api/v1/stats`.
pub async fn stats(State(state): State<AppState>) -> ApiResult {
    Ok(Json(stats_json(&state).await?))
}

/// The node's counts, for `/api/v1/stats` and the status page.
pub async fn stats_json(state: &AppState) -> Result<Value, ApiError> {
    let counts = state.engine.counts().await?;
    let m = &state.metrics;
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "engine": state.engine.kind(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "listeners": counts.listeners,
        "tracks": counts.tracks,
        "messages_stored": counts.messages,
        "messages_published": m.published_total(),
        "messages_delivered": m.delivered_total(),
        "streams": {
            "sse": m.open_streams(Transport::Sse),
            "ws": m.open_streams(Transport::Ws),
            "poll": m.open_streams(Transport::Poll),
        },
        "time_ms": now_ms(),
    }))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::bad_field("bad_request", message)
}

/// Reads a JSON object body: 415 if it says it is not JSON, 413 past the limit, 400
/// when it does not parse or is not an object.
async fn read_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Fields, ApiError> {
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        let kind = kind.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = kind.split(';').next().unwrap_or("").trim();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not_json",
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
                "body_too_large",
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
            "bad_json",
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
        names::check_uid(&uid).map_err(|e| ApiError::bad_field("bad_uid", e.0))?;
        Ok(uid)
    }

    fn track(&mut self) -> Result<String, ApiError> {
        let track = self.string("track")?;
        names::check_track(&track).map_err(|e| ApiError::bad_field("bad_track", e.0))?;
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
