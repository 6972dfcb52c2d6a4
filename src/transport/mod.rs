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

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use serde::Deserialize;

use crate::connection::Head;
use crate::engine::{Message, Position};
use crate::error::ApiError;
use crate::hub::{Received, Subscription};
use crate::names;
use crate::proxy::Client;
use crate::server::AppState;

pub mod poll;
pub mod sse;
pub mod ws;

/// Messages read from the store per page of replay: bounds the memory a stream
/// catching up holds at once.
const REPLAY_PAGE: usize = 512;

/// The query string every listener endpoint accepts.
#[derive(Debug, Default, Deserialize)]
pub struct ListenQuery {
    /// The listener token, when the server requires one.
    pub token: Option<String>,
    /// Resume after this event id (the `Last-Event-ID` header wins over it).
    pub last_event_id: Option<String>,
    /// Long-poll only: seconds to wait for an event.
    pub timeout: Option<String>,
}

/// Whether a browser page at the request's `Origin` may use the listener endpoints:
/// no `Origin` (not a browser), the same origin as the server as the client reached it
/// (behind a trusted proxy: the forwarded host and scheme), or one of `cors_origins`
/// (`*` allows any).
pub fn origin_allowed(state: &AppState, request: &ListenRequest) -> bool {
    let Some(origin) = request.headers.get("origin").and_then(|o| o.to_str().ok()) else {
        return true;
    };
    request.client(state).same_origin(origin) || origin_listed(state, origin)
}

/// Refuses a page at a foreign origin with 403 `origin_not_allowed`, the same on every
/// listener endpoint: what a foreign page cannot read it must not be able to cause
/// either (a poll from it would move the listener's cursor, a stream would keep the
/// listener alive). `what` names the request in the log, which says why: behind a
/// proxy that does not forward the host, every same-origin page lands here, and the
/// operator needs to see it.
pub fn check_origin(state: &AppState, request: &ListenRequest, what: &str) -> Result<(), ApiError> {
    if origin_allowed(state, request) {
        return Ok(());
    }
    let client = request.client(state);
    let origin = request
        .headers
        .get("origin")
        .map(|o| o.to_str().unwrap_or("?"));
    tracing::warn!(
        "refused {what} from {client} at origin {:?}: neither this server ({:?}) nor in cors_origins",
        origin.unwrap_or_default(),
        client.host.as_deref().unwrap_or_default(),
    );
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "this page's origin is not in cors_origins",
    ))
}

/// Whether `origin` is one of `cors_origins` (`*` lists every origin).
pub fn origin_listed(state: &AppState, origin: &str) -> bool {
    state
        .settings
        .cors_origins
        .iter()
        .any(|allowed| allowed == "*" || allowed.trim_end_matches('/') == origin)
}

/// What every listener endpoint reads from a request: the uid from the path, the
/// query, and the headers. Its rejections are JSON errors like everything else.
#[derive(Debug)]
pub struct ListenRequest {
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
    pub fn client(&self, state: &AppState) -> Client {
        state
            .settings
            .trusted_proxies
            .client(self.peer, &self.headers)
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
pub enum Delivery {
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
pub enum End {
    /// The listener was forgotten while the stream was open.
    Forgotten,
    /// The store failed; the client should retry later.
    Store,
}

/// A listener's stream of deliveries. See the module docs.
#[derive(Debug)]
pub struct Deliveries {
    state: AppState,
    uid: Arc<str>,
    subscription: Subscription,
    cursor: Position,
    pending: VecDeque<Arc<Message>>,
    replaying: bool,
}

/// Opens the stream of `uid`: checks it and its token, connects the token's tracks,
/// and finds where to start. Errors are ready to answer (400, 401, 404, 503).
pub async fn open(state: &AppState, request: &ListenRequest) -> Result<Deliveries, ApiError> {
    let (uid, query, headers) = (request.uid.as_str(), &request.query, &request.headers);
    names::check_uid(uid).map_err(|e| ApiError::bad_field("bad_uid", e.0))?;
    if let Some(auth) = state.tokens() {
        let token = query
            .token
            .as_deref()
            .ok_or_else(ApiError::token_required)?;
        let claims = auth.verify(token, uid)?;
        if let Some(tracks) = claims.tracks.filter(|t| !t.is_empty()) {
            for track in &tracks {
                names::check_track(track).map_err(|e| {
                    ApiError::unauthorized("bad_token", format!("token track: {}", e.0))
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
            "bad_event_id",
            format!("{id:?} is not an event id this server gave out"),
        )
    })
}

impl Deliveries {
    /// The listener's uid.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// The last position delivered.
    pub fn cursor(&self) -> Position {
        self.cursor
    }

    /// The next delivery, waiting for one if need be. Cancel-safe.
    pub async fn next(&mut self) -> Result<Delivery, End> {
        loop {
            if let Some(delivery) = self.ready().await? {
                return Ok(delivery);
            }
            match self.subscription.recv().await {
                Received::Messages(messages) => self.pending.extend(messages),
                Received::Lagged => self.replaying = true,
                Received::Forgotten => return Err(End::Forgotten),
            }
        }
    }

    /// The next delivery that needs no waiting for live messages: one already queued,
    /// or one read from the store while the stream still replays. `None` when the
    /// stream is caught up. Cancel-safe.
    pub async fn ready(&mut self) -> Result<Option<Delivery>, End> {
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
                self.cursor = page.head;
                self.replaying = false;
                return Ok(Some(Delivery::Reset { head: page.head }));
            }
            if page.messages.len() < REPLAY_PAGE {
                self.replaying = false;
            }
            self.pending.extend(page.messages);
        }
    }

    /// A delivery that is ready now without waiting, if any: lets a transport write
    /// everything queued in one go.
    pub fn take_ready(&mut self) -> Option<Arc<Message>> {
        while let Some(message) = self.pending.pop_front() {
            if message.pos > self.cursor {
                self.cursor = message.pos;
                return Some(message);
            }
        }
        None
    }

    /// Records how far this stream has delivered (and that the listener is alive).
    pub fn ack(&self) {
        self.state.engine.ack(&self.uid, self.cursor);
    }
}

/// The listener request of a stream served directly on its socket: uid from the path
/// (`{base}{endpoint}{uid}`, with `endpoint` like `/listen/`), the query, the headers.
pub(crate) fn direct_request(
    head: Head,
    base: &str,
    endpoint: &str,
) -> Result<ListenRequest, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    let uri: axum::http::Uri = head.target.parse().map_err(|_| not_found())?;
    let raw = crate::proxy::strip_base(base, uri.path())
        .and_then(|path| path.strip_prefix(endpoint))
        .ok_or_else(not_found)?;
    if raw.is_empty() || raw.contains('/') {
        return Err(not_found());
    }
    let uid = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_field("bad_uid", "the uid is not valid UTF-8"))?
        .into_owned();
    let Query(query) = Query::<ListenQuery>::try_from_uri(&uri).map_err(ApiError::from_query)?;
    Ok(ListenRequest {
        uid,
        query,
        headers: head.headers,
        peer: head.peer,
    })
}

/// Answers a direct stream's request with `error` as JSON (plus `extra` header lines,
/// each ending in CRLF), and closes the connection.
pub(crate) async fn write_error<W>(socket: &mut W, error: &ApiError, extra: &str)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let body = error.body().to_string();
    let answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{body}",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    let _ = socket.write_all(answer.as_bytes()).await;
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::{ListenQuery, resume_cursor};
    use axum::http::{HeaderMap, HeaderValue};

    proptest::proptest! {
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
