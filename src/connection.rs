//! Accepting connections. The first request of a connection is read here: when it
//! opens a Server-Sent Events stream (`GET /listen/…`), the stream is served directly
//! on the socket by `transport::sse`, holding none of an HTTP framework's per-connection
//! buffers for the hours a stream may stay open — idle streams are most of a push
//! server's connections, so their size is the server's size. A publish
//! (`POST /api/v1/update`) is served directly too, and so are the publishes after it on
//! the same connection (`api::direct`), until another request comes. Every other
//! request goes to hyper and the axum router.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use dolores_protocol::Transport;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tower_http::add_extension::AddExtension;

use crate::api;
use crate::error::{ApiError, ErrorCode};
use crate::node::Node;
use crate::proxy::{header_map, strip_base};
use crate::transport::{Head, sse, ws};

/// Longest request head read here; anything longer is hyper's to refuse.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most requests open at once on one HTTP/2 connection: far more tabs than a browser
/// keeps, each an open stream (~1 KB of server memory each, `docs/deploy.md`).
const MAX_HTTP2_STREAMS: u32 = 1000;
/// Most headers parsed from a first request.
const MAX_HEADERS: usize = 64;

/// Serves one accepted connection from `peer` until it closes.
pub(crate) async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Node,
    router: Router,
    watcher: Watcher,
) {
    let head_timeout = state.settings.head_timeout;
    let mut buffer = Vec::with_capacity(1024);
    let head = tokio::select! {
        head = tokio::time::timeout(head_timeout, read_head(&mut stream, &mut buffer)) => head,
        () = state.shutdown.cancelled() => return,
    };
    let base = state.settings.base_path.as_str();
    if let Ok(Some((endpoint, mut head))) = head.as_ref().map(|_| parse_direct(&buffer, base)) {
        head.peer = Some(peer);
        drop(buffer);
        match endpoint {
            Direct::Sse => sse::serve_direct(stream, head, state).await,
            Direct::Ws => ws::serve_direct(stream, head, state).await,
        }
        return;
    }
    match head {
        Ok(Ok(())) => {}
        _ if buffer.is_empty() => return, // closed or silent before sending anything
        Ok(Err(_)) => return,
        Err(_) => {
            // Part of a head, and no more within the time: a slow client holding a
            // connection (and a file descriptor) for free. Say so and hang up.
            let error = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::HeadTimeout,
                format!("the request head did not arrive within {head_timeout:?}"),
            );
            crate::transport::direct::write_error(&mut stream, &error, "").await;
            return;
        }
    }
    // Publishes (a backend's kept-alive connections) are served here too, until a
    // request comes that the framework must answer (`api::direct`).
    if api::direct::serves(&buffer, &state) {
        match api::direct::serve(stream, buffer, peer, state).await {
            Some((rest, read)) => (stream, buffer) = (rest, read),
            None => return,
        }
    }
    let io = Prefixed {
        prefix: buffer,
        read: 0,
        inner: stream,
    };
    serve_http(io, peer, head_timeout, router, watcher).await;
}

/// Serves one accepted connection of an HTTPS listener: the TLS handshake, then HTTP/2
/// or HTTP/1.1 (whichever ALPN chose) through hyper and the axum router. Plain HTTP sent
/// to this port gets a 400 that says so, and the connection is closed.
pub(crate) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Node,
    router: Router,
    watcher: Watcher,
) {
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        peeked = tokio::time::timeout(state.settings.head_timeout, stream.peek(&mut first)) => peeked,
        () = state.shutdown.cancelled() => return,
    };
    match peeked {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD => {
            refuse_plain_http(stream).await;
            return;
        }
        Ok(Ok(1)) => {}
        _ => return, // closed, failed or silent before sending anything
    }
    let head_timeout = state.settings.head_timeout;
    let tls = match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    serve_http(tls, peer, head_timeout, router, watcher).await;
}

/// The first byte of every TLS connection (a handshake record); a plain HTTP request
/// starts with a letter.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Answers a plain HTTP request sent to the HTTPS port, and closes.
async fn refuse_plain_http(mut stream: TcpStream) {
    // Take what the client sent, so closing does not reset the connection under the
    // answer before the client reads it.
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut head)).await;
    let body =
        r#"{"error":{"code":"https_required","message":"this port serves HTTPS: use https://"}}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Serves HTTP/1.1 or HTTP/2 (hyper tells them apart by the preface) on `io` until it
/// closes.
async fn serve_http<I>(
    io: I,
    peer: SocketAddr,
    head_timeout: Duration,
    router: Router,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    // Handlers find the peer as axum's `ConnectInfo`, as with `into_make_service_with_connect_info`.
    let service = TowerToHyperService::new(AddExtension::new(router, ConnectInfo(peer)));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Over HTTP/2 every tab of a browser shares one connection, each holding a stream
    // open; hyper's default of 200 at once would make the 201st tab's requests wait.
    builder.http2().max_concurrent_streams(MAX_HTTP2_STREAMS);
    // Every request head within the time, and hyper starts that clock when it waits for
    // the next request too: an idle kept-alive connection is closed after it as well.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    let connection = builder
        .serve_connection_with_upgrades(io, service)
        .into_owned();
    // Boxed: an HTTP connection's state is larger than a stream's, and a task holds
    // room for the larger of the paths it may take; every idle stream would pay for it.
    if let Err(e) = Box::pin(watcher.watch(connection)).await {
        tracing::debug!("connection from {peer} ended: {e}");
    }
}

/// Reads until the end of the first request head (or the limit, or EOF).
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<()> {
    while buffer.len() < MAX_HEAD_BYTES {
        // Straight into the buffer's spare room, not through a chunk on the task's stack.
        buffer.reserve(1024.min(MAX_HEAD_BYTES - buffer.len()));
        let n = stream.read_buf(buffer).await?;
        if n == 0 {
            break;
        }
        // A head ends with an empty line; bare LF line ends (which HTTP parsers accept)
        // end it too, so such a request is answered at once, not at the timeout.
        if buffer.windows(4).any(|w| w == b"\r\n\r\n") || buffer.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(())
}

/// A stream served directly on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    /// `GET /listen/…`: Server-Sent Events.
    Sse,
    /// `GET /ws/…` asking for a WebSocket upgrade.
    Ws,
}

/// The endpoint and head, when the buffer holds exactly one complete request for a
/// stream that is served directly: `GET /listen/…`, or a WebSocket upgrade of
/// `GET /ws/…` with nothing sent after its head. Anything else goes to hyper.
fn parse_direct(buffer: &[u8], base: &str) -> Option<(Direct, Head)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = request.parse(buffer).ok()? else {
        return None;
    };
    let path = request.path?;
    let route = strip_base(base, path)?;
    if request.method != Some("GET") {
        return None;
    }
    let endpoint = if route.starts_with(Transport::Sse.prefix()) {
        Direct::Sse
    } else if route.starts_with(Transport::Ws.prefix())
        && length == buffer.len()
        && request.version == Some(1)
    {
        Direct::Ws
    } else {
        return None;
    };
    let map = header_map(request.headers);
    if endpoint == Direct::Ws && ws::accept_key(&map).is_none() {
        return None;
    }
    Some((
        endpoint,
        Head {
            target: path.to_owned(),
            headers: map,
            http11: request.version == Some(1),
            peer: None,
        },
    ))
}

/// A stream that first yields bytes already read from it.
struct Prefixed {
    prefix: Vec<u8>,
    read: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read < self.prefix.len() {
            let rest = &self.prefix[self.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.read += n;
            if self.read == self.prefix.len() {
                self.prefix = Vec::new();
                self.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::{Direct, parse_direct};

    proptest::proptest! {
        /// Whatever a client sends first: no panic.
        #[test]
        fn any_bytes_are_parsed_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_direct(&bytes, "");
            let _ = parse_direct(&bytes, "/dolores");
        }

        /// Only a complete GET of a stream endpoint under the base path is taken here;
        /// everything else goes to hyper, which answers (or refuses) it.
        #[test]
        fn only_complete_stream_requests_go_direct(
            method in "GET|POST|get|HEAD",
            path in "/(listen|ws|poll|api/v1/update|dolores/listen|dolores/ws)/[a-zA-Z0-9%._\\\\-]{0,20}(\\\\?[a-z_=&0-9]{0,20})?",
            base in "|/dolores",
            upgrade in proptest::bool::ANY,
            complete in proptest::bool::ANY,
        ) {
            let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
            if upgrade {
                head.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
            }
            if complete {
                head.push_str("\r\n");
            }
            match parse_direct(head.as_bytes(), &base) {
                None => {}
                Some((endpoint, parsed)) => {
                    proptest::prop_assert!(complete);
                    proptest::prop_assert_eq!(method.as_str(), "GET");
                    let route = parsed.target.strip_prefix(base.as_str()).unwrap_or("");
                    match endpoint {
                        Direct::Sse => proptest::prop_assert!(route.starts_with("/listen/")),
                        Direct::Ws => {
                            proptest::prop_assert!(upgrade);
                            proptest::prop_assert!(route.starts_with("/ws/"));
                        }
                    }
                }
            }
        }
    }
}
