//! Accepting connections. The first request of a connection is read here: when it
//! opens a Server-Sent Events stream (`GET /listen/…`), the stream is served directly
//! on the socket by `transport::sse`, holding none of an HTTP framework's per-connection
//! buffers for the hours a stream may stay open — idle streams are most of a push
//! server's connections, so their size is the server's size. Every other request (and
//! every later request of a kept-alive connection) goes to hyper and the axum router.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_http::add_extension::AddExtension;

use crate::proxy::strip_base;
use crate::server::AppState;
use crate::transport::sse;

/// Longest request head read here; anything longer is hyper's to refuse.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a new connection may take to send its first request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Most headers parsed from a first request.
const MAX_HEADERS: usize = 64;

/// The parts of a first request that the direct SSE path needs.
#[derive(Debug)]
pub struct Head {
    /// The path and query, as sent.
    pub target: String,
    /// The headers.
    pub headers: HeaderMap,
    /// Whether the client speaks HTTP/1.1 (and so understands chunked bodies).
    pub http11: bool,
    /// The TCP peer (a proxy's address, behind one).
    pub peer: Option<SocketAddr>,
}

/// Serves one accepted connection from `peer` until it closes.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: AppState,
    router: Router,
    watcher: Watcher,
) {
    let mut buffer = Vec::with_capacity(1024);
    let head = tokio::select! {
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buffer)) => head,
        () = state.shutdown.cancelled() => return,
    };
    let base = state.settings.base_path.as_str();
    if let Ok(Some(mut head)) = head.as_ref().map(|_| parse_listen(&buffer, base)) {
        head.peer = Some(peer);
        drop(buffer);
        sse::serve_direct(stream, head, state).await;
        return;
    }
    if !matches!(head, Ok(Ok(()))) && buffer.is_empty() {
        return; // closed or silent before sending anything
    }
    let io = TokioIo::new(Prefixed {
        prefix: buffer,
        read: 0,
        inner: stream,
    });
    // Handlers find the peer as axum's `ConnectInfo`, as with `into_make_service_with_connect_info`.
    let service = TowerToHyperService::new(AddExtension::new(router, ConnectInfo(peer)));
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
        if buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(())
}

/// The head, when the buffer holds a complete `GET {base}/listen/…` request.
fn parse_listen(buffer: &[u8], base: &str) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = request.parse(buffer).ok()? else {
        return None;
    };
    if request.method != Some("GET") || !strip_base(base, request.path?)?.starts_with("/listen/") {
        return None;
    }
    let mut map = HeaderMap::new();
    for header in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) {
            map.append(name, value);
        }
    }
    Some(Head {
        target: request.path?.to_owned(),
        headers: map,
        http11: request.version == Some(1),
        peer: None,
    })
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
