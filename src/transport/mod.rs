//! The listener side: opening a listener's stream and the one delivery path behind
//! every transport.
//!
//! [`open`] checks the uid and token, registers with the hub, finds the listener and
//! its cursor. [`Deliveries`] then yields the listener's queue — replayed from the
//! store after the cursor, then live from the hub — with no gap and no duplicate: the
//! stream registers with the hub *before* it reads the store, and never delivers a
//! position at or below its cursor. A transport (`sse`, later `ws` and `poll`) only
//! turns deliveries into its wire format.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query};
use axum::http::HeaderMap;
use axum::middleware;
use axum::routing::get;
use serde::Deserialize;

use crate::cors::preflight;
use crate::engine::{Message, Position};
use crate::error::{ApiError, ErrorCode};
use crate::hub::{Received, Subscription};
use crate::metrics::Transport;
use crate::names;
use crate::node::Node;
use crate::proxy::Client;

pub(crate) mod direct;
pub(crate) mod poll;
pub(crate) mod sse;
pub(crate) mod ws;

pub(crate) use direct::Head;

/// The listener endpoints, with CORS for the pages allowed to use them.
pub(crate) fn router(node: &Node) -> Router<Node> {
    Router::new()
        .route(Transport::Sse.route(), get(sse::listen).options(preflight))
        .route(Transport::Ws.route(), get(ws::listen).options(preflight))
        .route(
            Transport::Poll.route(),
            get(poll::listen).options(preflight),
        )
        .layer(middleware::from_fn_with_state(
            node.origins.clone(),
            crate::cors::layer,
        ))
}

/// Messages read from the store per page of replay: bounds the memory a stream
/// catching up holds at once.
const REPLAY_PAGE: usize = 512;

/// The query string every listener endpoint accepts.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListenQuery {
    /// The listener token, when the server requires one.
    pub token: Option<String>,
    /// Resume after this event id (the `Last-Event-ID` header wins over it).
    pub last_event_id: Option<String>,
    /// Long-poll only: seconds to wait for an event.
    pub timeout: Option<String>,
}

/// What every listener endpoint reads from a request: the uid from the path, the
/// query, and the headers. Its rejections are JSON errors like everything else.
#[derive(Debug)]
pub(crate) struct ListenRequest {
    /// The `{uid}` path segment (not yet checked).
    pub uid: String,
    /// The query string.
    pub query: ListenQuery,
    /// The request headers (`Last-Event-ID`, `Origin`, `Host`).
    pub headers: HeaderMap,
    /// The TCP peer, when known (a proxy's address, behind one).
    pub peer: Option<SocketAddr>,
}

impl ListenRequest {
    /// Who sent the request: the peer, or what a trusted proxy says.
    pub(crate) fn client(&self, state: &Node) -> Client {
        state
            .settings
            .trusted_proxies
            .client(self.peer, &self.headers)
    }

    /// Refuses a browser page at a foreign origin (`cors`): the same rule on every
    /// listener endpoint. `what` names the request in the log.
    pub(crate) fn check_origin(&self, state: &Node, what: &str) -> Result<(), ApiError> {
        crate::cors::check_origin(&state.origins, &self.headers, what, self.client(state))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ListenRequest {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let Path(uid) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::from_uid_path)?;
        let Query(query) = Query::<ListenQuery>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::from_query)?;
        Ok(Self {
            uid,
            query,
            headers: parts.headers.clone(),
            peer: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        })
    }
}

/// What a transport sends next.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// A message of the listener's tracks.
    Message(Arc<Message>),
    /// The cursor was older than what is kept (or unknown to this store): the client
    /// must reload its state; only messages after `head` follow.
    Reset {
        /// The position the stream continues from (an id the client may resume with).
        head: Position,
    },
}

/// Why a stream ends by itself.
#[derive(Debug)]
pub(crate) enum End {
    /// The listener was forgotten while the stream was open.
    Forgotten,
    /// The store failed; the client should retry later.
    Store,
    /// The server is shutting down; the client should come back (elsewhere, or later).
    Shutdown,
}

/// A listener's stream of deliveries. See the module docs.
#[derive(Debug)]
pub(crate) struct Deliveries {
    state: Node,
    uid: Arc<str>,
    subscription: Subscription,
    cursor: Position,
    pending: VecDeque<Arc<Message>>,
    replaying: bool,
}

/// Opens the stream of `uid`: checks it and its token, connects the token's tracks,
/// and finds where to start. Errors are ready to answer (400, 401, 404, 503).
pub(crate) async fn open(state: &Node, request: &ListenRequest) -> Result<Deliveries, ApiError> {
    let (uid, query, headers) = (request.uid.as_str(), &request.query, &request.headers);
    names::check_uid(uid).map_err(|e| ApiError::bad_field(ErrorCode::BadUid, e.0))?;
    if let Some(auth) = state.tokens() {
        let token = query
            .token
            .as_deref()
            .ok_or_else(ApiError::token_required)?;
        let claims = auth.verify(token, uid)?;
        // Before the token's tracks may re-create a listener the app has forgotten.
        crate::auth::check_revocation(&claims, state.engine.revoked_at(uid).await?)?;
        if let Some(tracks) = claims.tracks.filter(|t| !t.is_empty()) {
            for track in &tracks {
                names::check_track(track).map_err(|e| {
                    ApiError::unauthorized(ErrorCode::BadToken, format!("token track: {}", e.0))
                })?;
            }
            state.engine.connect(uid, tracks).await?;
        }
    }
    let cursor = resume_cursor(query, headers)?;
    // Register first: whatever commits from here on reaches the queue.
    let subscription = state.hub.subscribe(uid);
    let listener = state
        .engine
        .listener(uid)
        .await?
        .ok_or_else(ApiError::unknown_listener)?;
    subscription.add_tracks(listener.tracks.iter().map(|s| s.track.as_str()));
    let cursor = cursor.unwrap_or(listener.cursor);
    state.engine.ack(uid, 0);
    Ok(Deliveries {
        state: state.clone(),
        uid: uid.into(),
        subscription,
        cursor,
        pending: VecDeque::new(),
        replaying: true,
    })
}

/// The client's own cursor: `Last-Event-ID` if sent, else `last_event_id`.
fn resume_cursor(query: &ListenQuery, headers: &HeaderMap) -> Result<Option<Position>, ApiError> {
    let header = headers
        .get(dolores_protocol::LAST_EVENT_ID_HEADER)
        .map(|v| v.to_str().unwrap_or("?").trim().to_owned());
    let Some(id) = header.or_else(|| query.last_event_id.clone()) else {
        return Ok(None);
    };
    if id.is_empty() {
        return Ok(None);
    }
    id.parse().map(Some).map_err(|_| {
        ApiError::bad_field(
            ErrorCode::BadEventId,
            format!("{id:?} is not an event id this server gave out"),
        )
    })
}

impl Deliveries {
    /// The listener's uid.
    pub(crate) fn uid(&self) -> &str {
        &self.uid
    }

    /// The last position delivered.
    pub(crate) fn cursor(&self) -> Position {
        self.cursor
    }

    /// The next delivery, waiting for one if need be. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Delivery, End> {
        loop {
            if let Some(delivery) = self.ready().await? {
                return Ok(delivery);
            }
            match self.subscription.recv(&mut self.pending).await {
                Received::Messages => {}
                Received::Lagged => self.replaying = true,
                Received::Forgotten => return Err(End::Forgotten),
                Received::Closed => return Err(End::Shutdown),
            }
        }
    }

    /// The next delivery that needs no waiting for live messages: one already queued,
    /// or one read from the store while the stream still replays. `None` when the
    /// stream is caught up. Cancel-safe.
    pub(crate) async fn ready(&mut self) -> Result<Option<Delivery>, End> {
        // Shutdown wins over what is ready, as it does over waiting.
        if self.subscription.closed() {
            return Err(End::Shutdown);
        }
        loop {
            if let Some(message) = self.take_ready() {
                return Ok(Some(Delivery::Message(message)));
            }
            if !self.replaying {
                return Ok(None);
            }
            let page = self
                .state
                .engine
                .replay(&self.uid, self.cursor, REPLAY_PAGE)
                .await
                .map_err(|e| {
                    tracing::warn!("replay for {} failed: {e}", self.uid);
                    End::Store
                })?
                .ok_or(End::Forgotten)?;
            // Checked on every page, not only the first: a stream that lagged (or
            // replays a long queue) while retention or max_stored_messages trimmed
            // past its cursor has lost messages, and must say so.
            if page.is_reset(self.cursor) {
                // After an epoch change, what the new epoch keeps is still to replay.
                self.cursor = page.resume_after_reset(self.cursor);
                self.replaying = self.cursor < page.head;
                return Ok(Some(Delivery::Reset { head: self.cursor }));
            }
            if page.messages.len() < REPLAY_PAGE {
                self.replaying = false;
            }
            self.pending.extend(page.messages);
        }
    }

    /// A delivery that is ready now without waiting, if any: lets a transport write
    /// everything queued in one go.
    pub(crate) fn take_ready(&mut self) -> Option<Arc<Message>> {
        while let Some(message) = self.pending.pop_front() {
            if message.pos > self.cursor {
                self.cursor = message.pos;
                return Some(message);
            }
        }
        None
    }

    /// Records how far this stream has delivered (and that the listener is alive).
    pub(crate) fn ack(&self) {
        self.state.engine.ack(&self.uid, self.cursor);
    }
}

#[cfg(test)]
mod tests {
    use super::{Head, ListenQuery, ListenRequest, direct, resume_cursor};
    use crate::error::{ApiError, ErrorCode};
    use axum::Json;
    use axum::body::Body;
    use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
    use serde_json::{Value, json};

    /// What a listener endpoint made of a request: its uid and query, or its refusal
    /// (status, and code when the answer is one of ours, not hyper's bare 400).
    #[derive(Debug, PartialEq)]
    enum Outcome {
        Taken(Value),
        Refused(u16, Option<String>),
    }

    fn taken(request: &ListenRequest) -> Value {
        json!({
            "uid": request.uid,
            "token": request.query.token,
            "last_event_id": request.query.last_event_id,
            "timeout": request.query.timeout,
        })
    }

    /// The direct path (`connection` → `direct::listen_request`), as for `GET {target}`.
    fn direct(target: &str) -> Outcome {
        let head = Head {
            target: target.to_owned(),
            headers: HeaderMap::new(),
            http11: true,
            peer: None,
        };
        match direct::listen_request(head, "", "/listen/") {
            Ok(request) => Outcome::Taken(taken(&request)),
            Err(e) => Outcome::Refused(e.status.as_u16(), Some(e.code.as_str().to_owned())),
        }
    }

    /// The framework path: hyper's parse of the target, then axum's routing and the
    /// `ListenRequest` extractor (the same route and fallback as the server's).
    async fn framework(target: &str) -> Outcome {
        let Ok(request) = Request::builder().uri(target).body(Body::empty()) else {
            // hyper answers a target it cannot parse with a bare 400.
            return Outcome::Refused(400, None);
        };
        let router = axum::Router::new()
            .route(
                "/listen/{uid}",
                axum::routing::get(|r: ListenRequest| async move { Json(taken(&r)) }),
            )
            .fallback(|| async {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    ErrorCode::NotFound,
                    "no such endpoint",
                )
            });
        let service = hyper_util::service::TowerToHyperService::new(router);
        let Ok(response) = hyper::service::Service::call(&service, request).await;
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
            .unwrap_or(Value::Null);
        if status == 200 {
            Outcome::Taken(body)
        } else {
            Outcome::Refused(status, body["error"]["code"].as_str().map(str::to_owned))
        }
    }

    /// A query parameter's name: the three the endpoints read, near misses, anything.
    fn query_key() -> impl proptest::strategy::Strategy<Value = String> {
        "token|last_event_id|timeout|last%5Fevent%5Fid|Token|t%6Fken|x|\\PC{0,3}"
    }

    fn query_value() -> impl proptest::strategy::Strategy<Value = String> {
        "[0-9]{0,6}|[%0-9A-Fa-f+ .=#?/]{0,8}|\\PC{0,5}|[\\s\\S]{0,3}"
    }

    /// A `/listen/{uid}?query` target with every kind of uid segment and query.
    fn target() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        let segment = "[A-Za-z0-9._~-]{0,10}|[A-Za-z0-9%/]{0,12}|\\PC{0,4}";
        let param = (query_key(), "=|", query_value()).prop_map(|(k, eq, v)| format!("{k}{eq}{v}"));
        let query = proptest::collection::vec(param, 0..4);
        (segment, "[?]?", query, "[&;]").prop_map(|(segment, mark, params, glue)| {
            format!("/listen/{segment}{mark}{}", params.join(&glue))
        })
    }

    proptest::proptest! {
        /// The direct SSE/WebSocket path parses its own request target; whatever it
        /// makes of a target, the framework path (poll, and streams after the first
        /// request of a connection) makes the same: the same uid and query, or the
        /// same refusal. What they then mean (`resume_cursor`, `poll::parse_timeout`,
        /// the token check) is one function for both.
        #[test]
        fn direct_and_framework_paths_read_targets_alike(target in target()) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().map_err(|e| {
                proptest::test_runner::TestCaseError::fail(e.to_string())
            })?;
            let framework = runtime.block_on(framework(&target));
            let direct = direct(&target);
            match (&direct, &framework) {
                // hyper's own refusal has no code to compare.
                (Outcome::Refused(a, _), Outcome::Refused(b, None)) => proptest::prop_assert_eq!(a, b, "{:?}", target),
                _ => proptest::prop_assert_eq!(&direct, &framework, "{:?}", target),
            }
        }

        /// Any `Last-Event-ID` or `last_event_id`: no panic; a cursor exactly when it is
        /// an id this server gives out (a decimal position), else a 400.
        #[test]
        fn event_ids_are_positions_or_refused(id in "\\PC{0,24}|[0-9]{1,22}", in_header in proptest::bool::ANY) {
            let mut headers = HeaderMap::new();
            let mut query = ListenQuery::default();
            if in_header {
                match HeaderValue::from_str(&id) {
                    Ok(value) => { headers.insert("last-event-id", value); }
                    Err(_) => return Ok(()),
                }
            } else {
                query.last_event_id = Some(id.clone());
            }
            let cursor = resume_cursor(&query, &headers);
            let sent = if in_header { id.trim().to_owned() } else { id.clone() };
            match cursor {
                Ok(None) => proptest::prop_assert!(sent.is_empty()),
                Ok(Some(pos)) => proptest::prop_assert_eq!(Ok(pos), sent.parse::<u64>()),
                Err(e) => {
                    proptest::prop_assert_eq!(e.code, "bad_event_id");
                    proptest::prop_assert!(sent.parse::<u64>().is_err());
                }
            }
        }
    }
}
