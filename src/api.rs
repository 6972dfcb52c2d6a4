//! The backend's HTTP API under `/api/v1`: thin handlers that check every field, call
//! the engine, and answer JSON. The api key is checked before any of them runs. Beside
//! it, what an operator's tools read without a key: `/healthz` and `/metrics`.
//!
//! `tracks` holds the track calls (counts, listeners and who is online, history).
//!
//! Bodies are parsed by hand from a JSON value rather than derived, so each mistake
//! gets its own precise error: a missing field, a wrong type, an unknown key.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::net::SocketAddr;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, to_bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, OriginalUri, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::Either;
use serde_json::{Map, Value, json};

use dolores_protocol::api as paths;

use crate::auth::{self, DEFAULT_TOKEN_TTL_SECONDS, MAX_TOKEN_TTL_SECONDS};
use crate::engine::{IdempotencyKey, Position, Update};
use crate::error::{ApiError, ErrorCode};
use crate::names;
use crate::node::Node;

mod body;
pub(crate) mod direct;
pub(crate) mod tracks;

// Most updates in one batch; the bench keeps to the same limit.
pub(crate) use dolores_protocol::api::MAX_BATCH;
/// Smallest request body limit; raised to fit one message of `max_message_bytes`.
/// 8 MiB fits a full batch of ordinary messages without letting one request eat memory.
const MIN_BODY_LIMIT: usize = 8 * 1024 * 1024;

type ApiResult = Result<Json<Value>, ApiError>;

/// The backend's calls, each behind the api key, and `/healthz` and `/metrics`.
pub(crate) fn router(node: &Node) -> Router<Node> {
    let backend = Router::new()
        .route(paths::UPDATE, post(update))
        .route(paths::CONNECT, post(connect))
        .route(paths::DISCONNECT, post(disconnect))
        .route(paths::LISTENER, get(listener))
        .route(paths::TOKENS, post(tokens))
        .route(paths::STATS, get(stats))
        .route(paths::TRACK, get(tracks::track))
        .route(paths::TRACK_LISTENERS, get(tracks::listeners))
        .route(paths::TRACK_MESSAGES, get(tracks::messages))
        .route_layer(RequireApiKey(node.clone()));
    backend
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// Lets a backend call through only with the api key. A layer of its own rather than
/// `middleware::from_fn`, which boxed every request's future and handed it on through
/// `Next` (~4,500 instructions of a ~40,000-instruction publish, callgrind): this is a
/// check, then the route's own call.
#[derive(Debug, Clone)]
struct RequireApiKey(Node);

impl<S> tower_layer::Layer<S> for RequireApiKey {
    type Service = ApiKeyChecked<S>;

    fn layer(&self, inner: S) -> ApiKeyChecked<S> {
        ApiKeyChecked {
            inner,
            node: self.0.clone(),
        }
    }
}

/// A route behind [`RequireApiKey`].
#[derive(Debug, Clone)]
struct ApiKeyChecked<S> {
    inner: S,
    node: Node,
}

impl<S> tower_service::Service<Request> for ApiKeyChecked<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match auth::check_api_key(&self.node.api_key, request.headers()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(e) => Either::Left(ready(Ok(refuse(&self.node, &request, e)))),
        }
    }
}

/// A backend call without the right key: logged with the client and the path as sent.
fn refuse(node: &Node, request: &Request, e: ApiError) -> Response {
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

/// `GET /healthz`: 200 while the node can serve and store, 503 saying why otherwise.
async fn healthz(State(node): State<Node>) -> Response {
    let failing = if node.shutdown.is_cancelled() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "shutting down",
        )
    } else if let Some(why) = node.engine.failing() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StoreUnavailable,
            why,
        )
    } else {
        return Json(json!({"status": "ok", "engine": node.engine.kind()})).into_response();
    };
    // The contract's shape: a `status` a probe can show, beside the usual error.
    let mut body = failing.body();
    body["status"] = json!(failing.code.as_str());
    (failing.status, Json(body)).into_response()
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
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The answer header on an update that repeated an earlier one: nothing new was stored.
pub(crate) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /api/v1/update`: one message or a batch, stored before the answer; once per
/// `Idempotency-Key`.
pub(crate) async fn update(
    State(state): State<Node>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let mut values = parts.headers.get_all(&IDEMPOTENCY_KEY).iter();
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
    let bytes = read_body(&state, &parts.headers, body).await?;
    let (updates, batch) = read_updates(&bytes, state.settings.max_message_bytes)?;
    drop(bytes);
    let key = key
        .map(|key| IdempotencyKey::new(key, &updates))
        .transpose()
        .map_err(|e| ApiError::bad_field(ErrorCode::BadIdempotencyKey, e.0))?;
    let appended = state.engine.append_with_key(updates, key).await?;
    let mut response = json_answer(ids_answer(&appended.positions, batch));
    if appended.repeated {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The updates of an update body and whether it was a batch: read without a tree
/// (`body`), or — when that reading cannot vouch for the body — the tree-based way,
/// which names the problem precisely.
fn read_updates(bytes: &[u8], max_message_bytes: usize) -> Result<(Vec<Update>, bool), ApiError> {
    match body::updates(bytes, max_message_bytes) {
        Ok(parsed) => parsed,
        Err(body::Fallback) => parse_updates(parse_object(bytes)?, max_message_bytes),
    }
}

/// An update's answer, written straight out: `{"id": ID}`, or `{"ids": [ID, …]}` for a
/// batch (ids are decimal numbers, so nothing needs escaping).
fn ids_answer(positions: &[Position], batch: bool) -> String {
    use std::fmt::Write as _;
    let mut answer = String::with_capacity(10 + 23 * positions.len());
    if batch {
        answer.push_str("{\"ids\":[");
        for (i, position) in positions.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(answer, "{comma}\"{position}\"");
        }
        answer.push_str("]}");
    } else {
        match positions.first() {
            Some(position) => {
                let _ = write!(answer, "{{\"id\":\"{position}\"}}");
            }
            None => answer.push_str("{\"id\":\"\"}"),
        }
    }
    answer
}

/// A 200 with a JSON body already written.
fn json_answer(body: impl Into<Body>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.into(),
    )
        .into_response()
}

/// The updates of an update request's body, and whether it was a batch
/// (`{"updates": […]}`). Pure, like every `parse_*` here: the property tests below throw
/// any JSON at them.
fn parse_updates(
    mut fields: Fields,
    max_message_bytes: usize,
) -> Result<(Vec<Update>, bool), ApiError> {
    if let Some(batch) = fields.0.remove("updates") {
        fields.allow(&[])?;
        let Value::Array(items) = batch else {
            return Err(bad_request(
                "\"updates\" must be an array of {\"track\", \"message\"}",
            ));
        };
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(bad_batch_size(items.len()));
        }
        let mut updates = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let Value::Object(item) = item else {
                return Err(bad_request(format!("updates[{i}] must be an object")));
            };
            let update = parse_update(Fields(item), max_message_bytes).map_err(|e| ApiError {
                message: format!("updates[{i}]: {}", e.message),
                ..e
            })?;
            updates.push(update);
        }
        return Ok((updates, true));
    }
    Ok((vec![parse_update(fields, max_message_bytes)?], false))
}

fn parse_update(mut fields: Fields, max_message_bytes: usize) -> Result<Update, ApiError> {
    let track = fields.track()?;
    let message = fields
        .0
        .remove("message")
        .ok_or_else(|| bad_request("\"message\" is missing (any JSON value)"))?;
    fields.allow(&[])?;
    let json = message.to_string();
    let limit = max_message_bytes;
    if json.len() > limit {
        return Err(ApiError::too_large(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {} bytes as JSON; the limit is {limit}",
                json.len()
            ),
        ));
    }
    Ok(Update {
        track: track.into(),
        json: json.into(),
    })
}

/// `POST /api/v1/connect`: subscribes a listener (created if new) to a track.
pub(crate) async fn connect(
    State(state): State<Node>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(&state, &parts.headers, body).await?;
    let (uid, track) = read_connect(&bytes)?;
    drop(bytes);
    let tracks = state.engine.connect(&uid, vec![track]).await?;
    Ok(listener_tracks_answer(&uid, &tracks))
}

/// A connect body's uid and track: read without a tree when it can be, else the
/// tree-based way.
fn read_connect(bytes: &[u8]) -> Result<(String, String), ApiError> {
    match body::connect(bytes) {
        Ok(parsed) => parsed,
        Err(body::Fallback) => parse_connect(parse_object(bytes)?),
    }
}

/// A connect or disconnect answer, `{"uid", "tracks"}`, serialized without a tree.
fn listener_tracks_answer(uid: &str, tracks: &[String]) -> Response {
    match listener_tracks_json(uid, tracks) {
        Ok(body) => json_answer(body),
        Err(e) => e.into_response(),
    }
}

/// The JSON of a connect or disconnect answer.
fn listener_tracks_json(uid: &str, tracks: &[String]) -> Result<String, ApiError> {
    /// The answer's fields, in the order a tree (sorted by key) wrote them.
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        tracks: &'a [String],
        uid: &'a str,
    }
    // Strings and a list of them always serialize; the error is for the type checker.
    serde_json::to_string(&Answer { tracks, uid }).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        )
    })
}

/// A connect body: `{"uid", "track"}`.
fn parse_connect(mut fields: Fields) -> Result<(String, String), ApiError> {
    let uid = fields.uid()?;
    let track = fields.track()?;
    fields.allow(&[])?;
    Ok((uid, track))
}

/// `POST /api/v1/disconnect`: one track, or (without `track`) the whole listener — which
/// also revokes its listener tokens issued until now (see `Engine::disconnect`).
pub(crate) async fn disconnect(
    State(state): State<Node>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = read_body(&state, &parts.headers, body).await?;
    let (uid, track) = match body::disconnect(&bytes) {
        Ok(parsed) => parsed?,
        Err(body::Fallback) => parse_disconnect(parse_object(&bytes)?)?,
    };
    drop(bytes);
    let tracks = state
        .engine
        .disconnect(&uid, track)
        .await?
        .ok_or_else(ApiError::unknown_listener)?;
    Ok(listener_tracks_answer(&uid, &tracks))
}

/// A disconnect body: `{"uid"}` (the whole listener) or `{"uid", "track"}`.
fn parse_disconnect(mut fields: Fields) -> Result<(String, Option<String>), ApiError> {
    let uid = fields.uid()?;
    let track = if fields.0.contains_key("track") {
        Some(fields.track()?)
    } else {
        None
    };
    fields.allow(&[])?;
    Ok((uid, track))
}

/// `GET /api/v1/listeners/{uid}`.
pub(crate) async fn listener(
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
pub(crate) async fn tokens(State(state): State<Node>, headers: HeaderMap, body: Body) -> ApiResult {
    let request = parse_token_request(read_object(&state, &headers, body).await?)?;
    let Some(tokens) = state.tokens() else {
        return Err(ApiError::bad_field(
            ErrorCode::NoTokenSecret,
            "this server has no token secret: start it with --token-secret to use listener tokens",
        ));
    };
    let token = tokens
        .mint(&request.uid, request.tracks, request.ttl_seconds)
        .map_err(|e| {
            tracing::error!("cannot sign a token: {e}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "cannot sign a token",
            )
        })?;
    Ok(Json(json!({ "token": token })))
}

/// A token request's fields.
#[derive(Debug, PartialEq, Eq)]
struct TokenRequest {
    uid: String,
    /// The `tracks` claim, if any.
    tracks: Option<Vec<String>>,
    ttl_seconds: u64,
}

/// A token request body: `{"uid", "tracks"?, "ttl_seconds"?}`.
fn parse_token_request(mut fields: Fields) -> Result<TokenRequest, ApiError> {
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
    Ok(TokenRequest {
        uid,
        tracks,
        ttl_seconds: ttl,
    })
}

/// This API's OpenAPI document, `docs/openapi.json`: written once, served as it is.
pub(crate) const OPENAPI: &str = include_str!("../docs/openapi.json");

/// `GET /api/v1/openapi.json`. It needs no api key: it describes the API and holds
/// nothing of the node's data, and tools (code generators, fuzzers) read it before they
/// have a key.
pub(crate) async fn openapi() -> impl axum::response::IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// `GET /api/v1/stats`.
pub(crate) async fn stats(State(state): State<Node>) -> ApiResult {
    Ok(Json(state.stats().await?))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::bad_field(ErrorCode::BadRequest, message)
}

/// A batch of `len` updates, empty or past [`MAX_BATCH`].
fn bad_batch_size(len: usize) -> ApiError {
    ApiError::bad_field(
        ErrorCode::BadBatch,
        format!("a batch has 1 to {MAX_BATCH} updates, this one has {len}"),
    )
}

/// Reads a JSON object body: 415 if it says it is not JSON, 413 past the limit, 400
/// when it does not parse or is not an object.
async fn read_object(state: &Node, headers: &HeaderMap, body: Body) -> Result<Fields, ApiError> {
    parse_object(&read_body(state, headers, body).await?)
}

/// Reads a body that says it is JSON (or says nothing): 415 if it says it is not JSON,
/// 413 past the limit.
async fn read_body(state: &Node, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    check_json_type(headers.get(header::CONTENT_TYPE))?;
    let limit = body_limit(state);
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
    Ok(bytes)
}

/// The largest request body taken: one message of `max_message_bytes` always fits.
fn body_limit(state: &Node) -> usize {
    MIN_BODY_LIMIT.max(state.settings.max_message_bytes + 4096)
}

/// 415 for a `Content-Type` that is not JSON; none at all is fine.
fn check_json_type(kind: Option<&HeaderValue>) -> Result<(), ApiError> {
    if let Some(kind) = kind
        // What nearly every client sends, taken without a copy.
        && !kind.as_bytes().eq_ignore_ascii_case(b"application/json")
    {
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
    Ok(())
}

/// A body's bytes as a JSON object: 400 when they do not parse or are not an object.
fn parse_object(bytes: &[u8]) -> Result<Fields, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A small message limit, so that the limit is met by generated messages too.
    const LIMIT: usize = 64;

    /// Names: valid uids and tracks, and everything near them.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9._-]{6,10}",
            ":[a-z/;]{0,8}",
            "\\PC{0,6}",
            "[\\s\\S]{0,4}",
            Just("x".repeat(257)),
        ]
    }

    /// Any JSON value, names among the strings.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (0u64..700_000).prop_map(Value::from),
            name().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The keys the bodies use, and others.
    fn key() -> impl Strategy<Value = String> {
        "uid|track|message|updates|tracks|ttl_seconds|\\PC{0,3}"
    }

    /// A request body: an object of the keys the API knows (and others), their values
    /// of every type — including arrays of update-like objects for `updates` and
    /// arrays of names for `tracks`.
    fn body() -> impl Strategy<Value = Map<String, Value>> {
        let update = proptest::collection::btree_map("track|message|\\PC{0,2}", json(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()));
        let value = prop_oneof![
            json(),
            name().prop_map(Value::from),
            proptest::collection::vec(update, 0..4).prop_map(Value::Array),
            proptest::collection::vec(name().prop_map(Value::from), 0..3).prop_map(Value::Array),
        ];
        proptest::collection::btree_map(key(), value, 0..4).prop_map(|m| m.into_iter().collect())
    }

    fn is_track(value: &Value) -> bool {
        value
            .as_str()
            .is_some_and(|t| names::check_track(t).is_ok())
    }

    fn is_uid(value: &Value) -> bool {
        value.as_str().is_some_and(|u| names::check_uid(u).is_ok())
    }

    fn only(body: &Map<String, Value>, allowed: &[&str]) -> bool {
        body.keys().all(|k| allowed.contains(&k.as_str()))
    }

    /// An update as the contract writes it: `{"track", "message"}`, the message at most
    /// the limit as JSON.
    fn is_update(value: &Value) -> bool {
        let Value::Object(item) = value else {
            return false;
        };
        only(item, &["track", "message"])
            && item.get("track").is_some_and(is_track)
            && item
                .get("message")
                .is_some_and(|m| m.to_string().len() <= LIMIT)
    }

    /// A refusal is a 4xx the contract lists, with a snake_case code and a message.
    fn refused_well(e: &ApiError, codes: &[&str]) -> Result<(), TestCaseError> {
        prop_assert!(
            matches!(e.status.as_u16(), 400 | 413),
            "status {} for {}",
            e.status,
            e.code
        );
        prop_assert!(codes.contains(&e.code.as_str()), "code {}", e.code);
        prop_assert!(!e.message.is_empty());
        Ok(())
    }

    /// Both readings of one update body agree: the same error, or the same updates with
    /// each message as `sent` wrote it (a float may come back another way from the tree,
    /// so the tree's messages are compared as values; and near the limit its different
    /// length may decide otherwise — only `message_too_large` may differ).
    fn same_updates(
        fast: Result<(Vec<Update>, bool), ApiError>,
        tree: Result<(Vec<Update>, bool), ApiError>,
        sent: &Value,
    ) -> Result<(), TestCaseError> {
        match (fast, tree) {
            (Err(a), Err(b)) if a.code == ErrorCode::MessageTooLarge => {
                prop_assert_eq!(b.code, ErrorCode::MessageTooLarge);
            }
            (Err(a), Err(b)) => {
                prop_assert_eq!((a.status, a.code, a.message), (b.status, b.code, b.message));
            }
            (Ok((fast, batch)), Ok((tree, tree_batch))) => {
                prop_assert_eq!(batch, tree_batch);
                let sent: Vec<Value> = if batch {
                    sent["updates"].as_array().cloned().unwrap_or_default()
                } else {
                    vec![sent.clone()]
                };
                prop_assert_eq!(fast.len(), tree.len());
                prop_assert_eq!(fast.len(), sent.len());
                for ((fast, tree), sent) in fast.iter().zip(&tree).zip(&sent) {
                    prop_assert_eq!(&fast.track, &tree.track);
                    prop_assert_eq!(&*fast.json, &sent["message"].to_string());
                    prop_assert!(!fast.json.contains('\n'));
                }
            }
            (Err(e), Ok(_)) | (Ok(_), Err(e)) => {
                prop_assert_eq!(e.code, ErrorCode::MessageTooLarge, "{}", e.message);
            }
        }
        Ok(())
    }

    const FIELD_CODES: &[&str] = &["bad_request", "bad_uid", "bad_track"];

    proptest! {
        /// Any bytes as a body: no panic; an object exactly when they are JSON of one.
        #[test]
        fn any_bytes_are_an_object_or_a_400(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let parsed = serde_json::from_slice::<Value>(&bytes);
            match parse_object(&bytes) {
                Ok(fields) => prop_assert_eq!(Ok(Value::Object(fields.0)), parsed.map_err(|_| ())),
                Err(e) => {
                    prop_assert!(!matches!(parsed, Ok(Value::Object(_))));
                    refused_well(&e, &["bad_json", "bad_request"])?;
                }
            }
        }

        /// Any JSON text: no panic, whatever its nesting.
        #[test]
        fn any_json_text_is_an_object_or_a_400(value in json()) {
            let text = value.to_string();
            // Compared with the text parsed again: a float may not survive the trip
            // exactly (serde_json without `float_roundtrip`), and that is not the point.
            let reparsed = serde_json::from_str::<Value>(&text).ok();
            match parse_object(text.as_bytes()) {
                Ok(fields) => prop_assert_eq!(Some(Value::Object(fields.0)), reparsed),
                Err(e) => {
                    prop_assert!(!value.is_object());
                    refused_well(&e, &["bad_request"])?;
                }
            }
        }

        /// An update body is taken exactly when it is one update or a batch of 1 to
        /// 1000 as the contract writes them; anything else is a precise 4xx.
        #[test]
        fn update_bodies_follow_the_contract(body in body()) {
            let one = is_update(&Value::Object(body.clone()));
            let batch = only(&body, &["updates"])
                && body.get("updates").and_then(Value::as_array).is_some_and(|items| {
                    (1..=MAX_BATCH).contains(&items.len()) && items.iter().all(is_update)
                });
            match parse_updates(Fields(body.clone()), LIMIT) {
                Ok((updates, is_batch)) => {
                    prop_assert!(one || batch, "accepted {:?}", body);
                    prop_assert_eq!(is_batch, batch);
                    let sent: Vec<Value> = if batch {
                        body["updates"].as_array().cloned().unwrap_or_default()
                    } else {
                        vec![Value::Object(body.clone())]
                    };
                    prop_assert_eq!(updates.len(), sent.len());
                    for (update, sent) in updates.iter().zip(&sent) {
                        prop_assert_eq!(Some(&*update.track), sent["track"].as_str());
                        prop_assert_eq!(&*update.json, &sent["message"].to_string());
                    }
                }
                Err(e) => {
                    prop_assert!(!one && !batch, "refused {:?}: {}", body, e.message);
                    refused_well(&e, &["bad_request", "bad_track", "bad_batch", "message_too_large"])?;
                }
            }
        }

        /// The reading without a tree answers what the tree-based one answers — the
        /// same updates, or the same error word for word — for any body, compact or
        /// spread over lines; the messages are kept as sent, without the whitespace.
        #[test]
        fn update_bodies_read_without_a_tree_answer_the_same(body in body(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&body)
            } else {
                serde_json::to_string(&body)
            };
            let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fast = read_updates(text.as_bytes(), LIMIT);
            let tree = parse_object(text.as_bytes()).and_then(|f| parse_updates(f, LIMIT));
            same_updates(fast, tree, &Value::Object(body))?;
        }

        /// Bodies a byte away from valid ones (broken, truncated, other types, other
        /// keys): the same answers too.
        #[test]
        fn damaged_update_bodies_are_answered_the_same(
            body in body(),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![Just(b'"'), Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b','), Just(b':'), Just(b' '), Just(b'\\'), Just(b'1'), Just(b'e'), any::<u8>()],
            how in 0..3u8,
        ) {
            let mut text = serde_json::to_vec(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let i = at.index(text.len() + 1);
            match how {
                0 => text.insert(i, byte),
                1 if i < text.len() => text[i] = byte,
                _ => text.truncate(i),
            }
            let fast = read_updates(&text, LIMIT);
            let tree = parse_object(&text).and_then(|f| parse_updates(f, LIMIT));
            match (fast, tree) {
                (Err(a), Err(b)) => prop_assert_eq!((a.status, a.code, a.message), (b.status, b.code, b.message)),
                (Ok((a, batch_a)), Ok((b, batch_b))) => {
                    prop_assert_eq!(batch_a, batch_b);
                    prop_assert_eq!(a.len(), b.len());
                    for (a, b) in a.iter().zip(&b) {
                        prop_assert_eq!(&a.track, &b.track);
                        // Written out the tree's way, the kept text is the tree's text.
                        let a: Value = serde_json::from_str(&a.json).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(&a.to_string(), &*b.json);
                    }
                }
                // Near the limit the two forms' lengths may decide otherwise.
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => {
                    prop_assert_eq!(e.code, ErrorCode::MessageTooLarge, "{} for {:?}", e.message, String::from_utf8_lossy(&text));
                }
            }
        }

        #[test]
        fn connect_and_disconnect_bodies_read_without_a_tree_answer_the_same(body in body(), pretty in any::<bool>()) {
            let text = if pretty {
                serde_json::to_string_pretty(&body)
            } else {
                serde_json::to_string(&body)
            };
            let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
            let bytes = text.as_bytes();
            let fast = body::connect(bytes).unwrap_or_else(|_| parse_object(bytes).and_then(parse_connect));
            let tree = parse_object(bytes).and_then(parse_connect);
            match (fast, tree) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!((a.status, a.code, a.message), (b.status, b.code, b.message)),
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a.map(drop).map_err(|e| e.message), b.map(drop).map_err(|e| e.message)),
            }
            let fast = body::disconnect(bytes).unwrap_or_else(|_| parse_object(bytes).and_then(parse_disconnect));
            let tree = parse_object(bytes).and_then(parse_disconnect);
            match (fast, tree) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(a), Err(b)) => prop_assert_eq!((a.status, a.code, a.message), (b.status, b.code, b.message)),
                (a, b) => prop_assert!(false, "{:?} vs {:?}", a.map(drop).map_err(|e| e.message), b.map(drop).map_err(|e| e.message)),
            }
        }

        #[test]
        fn connect_bodies_follow_the_contract(body in body()) {
            let valid = only(&body, &["uid", "track"])
                && body.get("uid").is_some_and(is_uid)
                && body.get("track").is_some_and(is_track);
            match parse_connect(Fields(body.clone())) {
                Ok((uid, track)) => {
                    prop_assert!(valid, "accepted {:?}", body);
                    prop_assert_eq!(Some(uid.as_str()), body["uid"].as_str());
                    prop_assert_eq!(Some(track.as_str()), body["track"].as_str());
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {:?}: {}", body, e.message);
                    refused_well(&e, FIELD_CODES)?;
                }
            }
        }

        #[test]
        fn disconnect_bodies_follow_the_contract(body in body()) {
            let valid = only(&body, &["uid", "track"])
                && body.get("uid").is_some_and(is_uid)
                && body.get("track").is_none_or(is_track);
            match parse_disconnect(Fields(body.clone())) {
                Ok((uid, track)) => {
                    prop_assert!(valid, "accepted {:?}", body);
                    prop_assert_eq!(Some(uid.as_str()), body["uid"].as_str());
                    prop_assert_eq!(track.as_deref(), body.get("track").and_then(Value::as_str));
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {:?}: {}", body, e.message);
                    refused_well(&e, FIELD_CODES)?;
                }
            }
        }

        #[test]
        fn token_bodies_follow_the_contract(body in body()) {
            let tracks_ok = match body.get("tracks") {
                None | Some(Value::Null) => true,
                Some(Value::Array(items)) => items.iter().all(is_track),
                Some(_) => false,
            };
            let ttl_ok = match body.get("ttl_seconds") {
                None | Some(Value::Null) => true,
                Some(n) => n.as_u64().is_some_and(|t| (1..=MAX_TOKEN_TTL_SECONDS).contains(&t)),
            };
            let valid = only(&body, &["uid", "tracks", "ttl_seconds"])
                && body.get("uid").is_some_and(is_uid)
                && tracks_ok
                && ttl_ok;
            match parse_token_request(Fields(body.clone())) {
                Ok(request) => {
                    prop_assert!(valid, "accepted {:?}", body);
                    prop_assert_eq!(Some(request.uid.as_str()), body["uid"].as_str());
                    let ttl = body.get("ttl_seconds").and_then(Value::as_u64);
                    prop_assert_eq!(request.ttl_seconds, ttl.unwrap_or(DEFAULT_TOKEN_TTL_SECONDS));
                }
                Err(e) => {
                    prop_assert!(!valid, "refused {:?}: {}", body, e.message);
                    refused_well(&e, &["bad_request", "bad_uid", "bad_track", "bad_ttl"])?;
                }
            }
        }
    }
}
