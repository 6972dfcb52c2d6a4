//! What the streams served directly on the socket share (SSE in `sse::direct`,
//! WebSocket in `ws`): the parsed head of the connection's first request, the listener
//! request made from it, and a JSON error answer written by hand. `connection` decides
//! which requests come this way; nothing here knows it.

use std::net::SocketAddr;

use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};

use super::{ListenQuery, ListenRequest};
use crate::error::{ApiError, ErrorCode};

/// The parts of a connection's first request that a direct stream needs.
#[derive(Debug)]
pub(crate) struct Head {
    /// The path and query, as sent.
    pub target: String,
    /// The headers.
    pub headers: HeaderMap,
    /// Whether the client speaks HTTP/1.1 (and so understands chunked bodies).
    pub http11: bool,
    /// The TCP peer (a proxy's address, behind one).
    pub peer: Option<SocketAddr>,
}

/// The listener request of a stream served directly on its socket: uid from the path
/// (`{base}{endpoint}{uid}`, with `endpoint` like `/listen/`), the query, the headers.
pub(crate) fn listen_request(
    head: Head,
    base: &str,
    endpoint: &str,
) -> Result<ListenRequest, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such endpoint",
        )
    };
    // A 400, as hyper answers the same target on the framework path.
    let uri: axum::http::Uri = head.target.parse().map_err(|_| {
        ApiError::bad_field(
            ErrorCode::BadRequest,
            "the request target is not a valid URI",
        )
    })?;
    let raw = crate::proxy::strip_base(base, uri.path())
        .and_then(|path| path.strip_prefix(endpoint))
        .ok_or_else(not_found)?;
    if raw.is_empty() || raw.contains('/') {
        return Err(not_found());
    }
    let uid = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::bad_field(ErrorCode::BadUid, "the uid is not valid UTF-8"))?
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
