//! `GET /listen/{uid}`: the listener's deliveries as Server-Sent Events.
//!
//! The body starts with a `retry:` line, then every delivery as `id:` + `data:`, a
//! `reset` event when the cursor was too old, and a comment every heartbeat so proxies
//! and browsers see the connection alive. Everything ready at once is written as one
//! chunk. The stream ends on shutdown (with a last comment telling the client to come
//! back), when the listener is forgotten, or when the client goes away.

use std::io::IoSlice;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Deliveries, Delivery, End, ListenRequest};
use crate::connection::Head;
use crate::error::ApiError;
use crate::metrics::Transport;
use crate::server::AppState;

/// How long a browser waits before reconnecting after the stream drops, in ms. Short,
/// because a reconnect costs little and resumes exactly.
const RETRY_MS: u32 = 2000;
/// Most bytes written as one chunk: coalescing stops here so one write stays small.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// The handler.
pub async fn listen(
    State(state): State<AppState>,
    request: ListenRequest,
) -> Result<Response, ApiError> {
    super::check_origin(&state, &request, "an SSE stream")?;
    let deliveries = super::open(&state, &request).await?;
    let stream = SseStream::new(state, deliveries);
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut s| async move {
        s.next_chunk()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), s))
    }));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The state of one open SSE response.
struct SseStream {
    state: AppState,
    deliveries: Deliveries,
    heartbeat: tokio::time::Interval,
    _open: crate::metrics::OpenStream,
    started: bool,
    done: bool,
}

impl SseStream {
    fn new(state: AppState, deliveries: Deliveries) -> Self {
        let every = state.settings.heartbeat.max(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let open = state.metrics.open_stream(Transport::Sse);
        Self {
            state,
            deliveries,
            heartbeat,
            _open: open,
            started: false,
            done: false,
        }
    }

    /// The first bytes of the body: the reconnect delay and a comment.
    fn welcome(&mut self) -> Bytes {
        self.started = true;
        Bytes::from(format!("retry: {RETRY_MS}\n: welcome\n\n"))
    }

    /// The next bytes to write, or `None` to end the response.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if !self.started {
            return Some(self.welcome());
        }
        let shutdown = self.state.shutdown.clone();
        let delivery = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                self.done = true;
                return Some(Bytes::from_static(b": server shutting down, reconnect\n\n"));
            }
            d = self.deliveries.next() => d,
            _ = self.heartbeat.tick() => {
                self.deliveries.ack();
                return Some(Bytes::from_static(b": heartbeat\n\n"));
            }
        };
        match delivery {
            Ok(Delivery::Message(first)) => {
                let first = first.sse_frame();
                // The common case, one message ready: its shared frame as it is, no copy.
                let Some(second) = self.deliveries.take_ready() else {
                    self.deliveries.ack();
                    self.state.metrics.delivered(1);
                    return Some(first);
                };
                let mut chunk = BytesMut::with_capacity(first.len() * 4);
                chunk.put(first);
                chunk.put(second.sse_frame());
                let mut count = 2;
                while chunk.len() < MAX_CHUNK_BYTES {
                    let Some(next) = self.deliveries.take_ready() else {
                        break;
                    };
                    chunk.put(next.sse_frame());
                    count += 1;
                }
                self.deliveries.ack();
                self.state.metrics.delivered(count);
                Some(chunk.freeze())
            }
            Ok(Delivery::Reset { head }) => {
                self.deliveries.ack();
                Some(Bytes::from(format!(
                    "id: {head}\nevent: reset\ndata: {{\"reset\":true}}\n\n"
                )))
            }
            Err(End::Forgotten) => {
                self.done = true;
                Some(Bytes::from_static(b": listener forgotten\n\n"))
            }
            Err(End::Store) => None,
        }
    }
}

/// Serves `GET /listen/{uid}` as the first request of a connection, directly on the
/// socket (see `connection`): the same stream as [`listen`], without an HTTP
/// framework's buffers; chunked, and the connection closes after it.
pub async fn serve_direct(mut socket: TcpStream, head: Head, state: AppState) {
    let cors = cors_header(&state, &head.headers);
    // HTTP/1.0 knows no chunked bodies: its response ends when the connection closes.
    let chunked = head.http11;
    // Boxed, so the request and the opening's state live on the heap only while the
    // stream opens: a task keeps room for the largest state it may be in, and an open
    // stream is otherwise far smaller (with the boxed HTTP path in `connection`, an idle
    // stream went from ~4.5 to ~4.1 KB of server memory, measured with 19,000).
    let opened = Box::pin(async {
        let request =
            super::direct_request(head, &state.settings.base_path, Transport::Sse.prefix())?;
        super::check_origin(&state, &request, "an SSE stream")?;
        super::open(&state, &request).await
    })
    .await;
    let deliveries = match opened {
        Ok(deliveries) => deliveries,
        Err(e) => {
            super::write_error(&mut socket, &e, &cors).await;
            return;
        }
    };
    let framing = if chunked {
        "transfer-encoding: chunked\r\n"
    } else {
        ""
    };
    // A reader that takes nothing for this long is stuck, as for WebSocket (4008).
    let slow_reader_timeout = state.settings.slow_reader_timeout;
    let mut stream = SseStream::new(state, deliveries);
    // The response head and the body's first chunk in one write: one system call less
    // for every stream that opens.
    let first = {
        let welcome = stream.welcome();
        let mut first = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\n{framing}connection: close\r\n{cors}\r\n"
        )
        .into_bytes();
        if chunked {
            let mut size = [0u8; 18];
            first.extend_from_slice(chunk_size_line(welcome.len(), &mut size));
            first.extend_from_slice(&welcome);
            first.extend_from_slice(b"\r\n");
        } else {
            first.extend_from_slice(&welcome);
        }
        first
    };
    if socket.write_all(&first).await.is_err() {
        return;
    }
    // Not kept for the stream's life (they would be, to the end of the scope).
    drop(first);
    drop(cors);
    let (mut reader, mut writer) = socket.split();
    // A listener sends nothing after its request; reading tells when it goes away. Small:
    // it is part of every open stream's task.
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            chunk = stream.next_chunk() => match chunk {
                Some(chunk) => {
                    // Chunked framing, so a client can tell a clean end from a crash.
                    let write = async {
                    if chunked {
                        let mut size = [0u8; 18];
                        let size = chunk_size_line(chunk.len(), &mut size);
                        let mut parts = [
                            IoSlice::new(size),
                            IoSlice::new(&chunk),
                            IoSlice::new(b"\r\n"),
                        ];
                        write_all_vectored(&mut writer, &mut parts).await
                    } else {
                        writer.write_all(&chunk).await
                    }
                    };
                    // A reader that takes nothing for this long is stuck, not slow: the
                    // stream ends and the client resumes from its last id when it can.
                    match tokio::time::timeout(slow_reader_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return,
                    }
                }
                None => break,
            },
            // A listener sends nothing after its request: anything it does send (data
            // up a stream, a pipelined request that can never be answered) ends it,
            // rather than being read and thrown away for as long as it keeps coming.
            read = reader.read(&mut probe) => match read {
                Ok(_) | Err(_) => return,
            },
        }
    }
    if chunked {
        let _ = writer.write_all(b"0\r\n\r\n").await;
    }
    let _ = writer.shutdown().await;
}

/// `{len:x}\r\n` in `buffer`, without allocating.
fn chunk_size_line(len: usize, buffer: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 16;
    let mut rest = len;
    loop {
        start -= 1;
        buffer[start] = HEX[rest % 16];
        rest /= 16;
        if rest == 0 {
            break;
        }
    }
    buffer[16] = b'\r';
    buffer[17] = b'\n';
    &buffer[start..]
}

/// Writes every part in as few system calls as the socket allows (one, usually): the
/// chunk framing goes out with the frames, without copying them.
async fn write_all_vectored(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    parts: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    let mut parts = parts;
    while !parts.is_empty() {
        let written = writer.write_vectored(parts).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut parts, written);
    }
    Ok(())
}

/// The CORS header lines for a page at the request's `Origin`, if it is allowed.
fn cors_header(state: &AppState, headers: &axum::http::HeaderMap) -> String {
    let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok()) else {
        return String::new();
    };
    if super::origin_listed(state, origin) && !origin.contains(['\r', '\n']) {
        format!("access-control-allow-origin: {origin}\r\nvary: origin\r\n")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_size_line;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut buffer = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut buffer), b"0\r\n");
        assert_eq!(chunk_size_line(26, &mut buffer), b"1a\r\n");
        assert_eq!(chunk_size_line(65536, &mut buffer), b"10000\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut buffer),
            format!("{:x}\r\n", usize::MAX).as_bytes()
        );
    }
}
