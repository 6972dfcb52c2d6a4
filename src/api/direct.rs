//! `POST /api/v1/update` (and `POST /api/v1/connect`, a listener's set-up) served
//! straight on the socket, like the streams: a busy
//! backend publishes over a few kept-alive connections, and on this path each publish
//! costs the HTTP framework more than everything else (request and header maps,
//! routing, boxed futures, body channels: about half of a publish's instructions under
//! callgrind). Here a request is parsed with `httparse` into borrowed slices, handled
//! by the same functions as the framework's handler (`read_updates`, the engine,
//! `ids_answer`), and answered with one write.
//!
//! Only the plain case comes this way: HTTP/1.1, a `Content-Length` body within the
//! limit, no `Transfer-Encoding` or `Expect`, the exact path. Anything else — another
//! request on the same connection included — is handed back with the bytes read so far
//! and goes to hyper and the router, which answer it as they always did; so every
//! error a client can cause outside the body keeps its framework answer, and the body's
//! errors are the handler's own.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{
    body_limit, check_json_type, ids_answer, listener_tracks_json, read_connect, read_updates,
};
use crate::auth;
use crate::engine::IdempotencyKey;
use crate::error::{ApiError, ErrorCode};
use crate::node::Node;

/// Most headers in a request taken here; one with more goes to hyper.
const MAX_HEADERS: usize = 32;
/// Longest head read here; a longer one goes to hyper (which has its own limit).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The calls served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `POST /api/v1/update`.
    Update,
    /// `POST /api/v1/connect`.
    Connect,
}

/// A request's head, as far as this path needs it.
struct Publish {
    /// Which call.
    call: Call,
    /// Bytes of the head, up to and including its empty line.
    head_len: usize,
    /// Bytes of the body.
    body_len: usize,
    /// Whether the client asked to close after the answer.
    close: bool,
    /// The api key check's refusal, if any.
    refused: Option<ApiError>,
    /// The `Idempotency-Key` values: none, one, or (`Err`) several.
    key: Result<Option<Vec<u8>>, ()>,
    /// The `Content-Type` check's refusal, if any.
    not_json: Option<ApiError>,
}

/// Whether `buffer` starts with a whole request head of a call this path serves.
pub(crate) fn serves(buffer: &[u8], node: &Node) -> bool {
    matches!(parse(buffer, node), Some(Ok(_)))
}

/// Serves publishes on `stream` (whose first bytes are in `buffer`) until the client
/// closes, or a request comes that this path does not serve: then the stream and the
/// bytes read of it are handed back for hyper.
pub(crate) async fn serve(
    mut stream: TcpStream,
    mut buffer: Vec<u8>,
    peer: SocketAddr,
    node: Node,
) -> Option<(TcpStream, Vec<u8>)> {
    let limit = body_limit(&node);
    // Every head within `head_timeout` of when it is awaited, as hyper's
    // `header_read_timeout` (an idle kept-alive connection is closed after it too).
    let mut head_deadline = tokio::time::Instant::now() + node.settings.head_timeout;
    loop {
        let publish = match parse(&buffer, &node) {
            Some(Ok(publish)) if publish.body_len <= limit => publish,
            // Not ours, or a body over the limit: hyper answers it as always.
            Some(Ok(_)) | Some(Err(())) => return Some((stream, buffer)),
            None => {
                // Part of a head: read on, within the head's time, as hyper would.
                match next_bytes(&mut stream, &mut buffer, &node, head_deadline).await {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(()) if buffer.len() < MAX_HEAD_BYTES => return None,
                    Err(()) => return Some((stream, buffer)),
                }
            }
        };
        let end = publish.head_len + publish.body_len;
        while buffer.len() < end {
            buffer.reserve(end - buffer.len());
            match stream.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        let answer = answer(&node, peer, &buffer[..end], &publish).await;
        buffer.drain(..end);
        let close = publish.close || answer.1;
        if stream.write_all(&answer.0).await.is_err() {
            return None;
        }
        if close {
            let _ = stream.shutdown().await;
            return None;
        }
        if buffer.is_empty() && node.shutdown.is_cancelled() {
            return None;
        }
        head_deadline = tokio::time::Instant::now() + node.settings.head_timeout;
    }
}

/// Reads more of the next request: `Ok(false)` when the client closed, `Err` when the
/// head did not come within the time (or will not fit) or the server is shutting down.
async fn next_bytes(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    node: &Node,
    deadline: tokio::time::Instant,
) -> Result<bool, ()> {
    if buffer.len() >= MAX_HEAD_BYTES {
        return Err(());
    }
    buffer.reserve(1024);
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, stream.read_buf(buffer)) => read,
        () = node.shutdown.cancelled() => return Err(()),
    };
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
        Ok(Ok(_)) => Ok(true),
        Err(_) => Err(()),
    }
}

/// The head at the start of `buffer`: `None` while incomplete, `Err` when it is not
/// one this path serves.
fn parse(buffer: &[u8], node: &Node) -> Option<Result<Publish, ()>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD_BYTES => return None,
        _ => return Some(Err(())),
    };
    let route = request
        .path
        .and_then(|path| crate::proxy::strip_base(&node.settings.base_path, path));
    let call = match route {
        Some(dolores_protocol::api::UPDATE) => Call::Update,
        Some(dolores_protocol::api::CONNECT) => Call::Connect,
        _ => return Some(Err(())),
    };
    if request.method != Some("POST") || request.version != Some(1) {
        return Some(Err(()));
    }
    let mut body_len = None;
    let mut close = false;
    let mut authorization = None;
    let mut content_type = None;
    let mut key: Result<Option<Vec<u8>>, ()> = Ok(None);
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only (`parse` would also take a sign, which hyper refuses).
            let digits = header.value.trim_ascii();
            let length = std::str::from_utf8(digits)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok());
            match (body_len, length) {
                (None, Some(length)) => body_len = Some(length),
                // Unreadable or repeated: hyper's to judge.
                _ => return Some(Err(())),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Some(Err(()));
        } else if name.eq_ignore_ascii_case("connection") {
            close |= header
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case("authorization") {
            if authorization.is_some() {
                return Some(Err(()));
            }
            authorization = Some(header.value);
        } else if name.eq_ignore_ascii_case("content-type") {
            if content_type.is_some() {
                return Some(Err(()));
            }
            content_type = Some(header.value);
        } else if name.eq_ignore_ascii_case(super::IDEMPOTENCY_KEY.as_str()) {
            key = match key {
                Ok(None) => Ok(Some(header.value.to_vec())),
                _ => Err(()),
            };
        }
    }
    let Some(body_len) = body_len else {
        return Some(Err(()));
    };
    let value = |bytes: Option<&[u8]>| bytes.and_then(|b| HeaderValue::from_bytes(b).ok());
    let refused = auth::check_api_key_value(&node.api_key, value(authorization).as_ref()).err();
    let not_json = check_json_type(value(content_type).as_ref()).err();
    Some(Ok(Publish {
        call,
        head_len,
        body_len,
        close,
        refused,
        key,
        not_json,
    }))
}

/// The answer to one publish (`request` is its head and body), and whether the
/// connection must close after it.
async fn answer(
    node: &Node,
    peer: SocketAddr,
    request: &[u8],
    publish: &Publish,
) -> (Vec<u8>, bool) {
    let body = &request[publish.head_len..];
    let result: Result<_, ApiError> = async {
        if let Some(refused) = &publish.refused {
            log_refusal(node, peer, &request[..publish.head_len], refused);
            return Err(refused.clone());
        }
        if publish.call == Call::Connect {
            // As the framework's `connect`: the body, then the engine.
            if let Some(not_json) = &publish.not_json {
                return Err(not_json.clone());
            }
            let (uid, track) = read_connect(body)?;
            let tracks = node.engine.connect(&uid, vec![track]).await?;
            return Ok((listener_tracks_json(&uid, &tracks)?, false));
        }
        let key = match &publish.key {
            Ok(key) => key.as_deref(),
            Err(()) => {
                return Err(ApiError::bad_field(
                    ErrorCode::BadIdempotencyKey,
                    "send one Idempotency-Key, not several",
                ));
            }
        };
        if let Some(not_json) = &publish.not_json {
            return Err(not_json.clone());
        }
        let (updates, batch) = read_updates(body, node.settings.max_message_bytes)?;
        let key = key
            .map(|key| IdempotencyKey::new(key, &updates))
            .transpose()
            .map_err(|e| ApiError::bad_field(ErrorCode::BadIdempotencyKey, e.0))?;
        let appended = node.engine.append_with_key(updates, key).await?;
        Ok((ids_answer(&appended.positions, batch), appended.repeated))
    }
    .await;
    match result {
        Ok((json, repeated)) => {
            let extra = if repeated {
                "idempotent-replayed: true\r\n"
            } else {
                ""
            };
            (response(StatusCode::OK, extra, &json), false)
        }
        Err(e) => {
            // As `ApiError::into_response`: after a 413 the connection closes.
            let close = e.status == StatusCode::PAYLOAD_TOO_LARGE;
            let extra = if close { "connection: close\r\n" } else { "" };
            (response(e.status, extra, &e.body().to_string()), close)
        }
    }
}

/// A whole response: status line, headers (`extra` lines end in CRLF), JSON body.
fn response(status: StatusCode, extra: &str, json: &str) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut head = String::with_capacity(160 + json.len());
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}date: ",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        json.len(),
    );
    DATE.with_borrow_mut(|date| head.push_str(date.now()));
    head.push_str("\r\n\r\n");
    head.push_str(json);
    head.into_bytes()
}

/// Logs a refused call as the api key layer does: method, path as sent, client.
fn log_refusal(node: &Node, peer: SocketAddr, head: &[u8], refused: &ApiError) {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if request.parse(head).is_err() {
        return;
    }
    let map = crate::proxy::header_map(request.headers);
    let client = node.settings.trusted_proxies.client(Some(peer), &map);
    tracing::warn!(
        "refused POST {} from {client}: {}",
        request.path.unwrap_or(""),
        refused.code
    );
}

/// The `date` header's value, formatted once a second per thread (as hyper does).
#[derive(Default)]
struct CachedDate {
    second: u64,
    text: String,
}

impl CachedDate {
    fn now(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = RefCell::new(CachedDate::default());
}
