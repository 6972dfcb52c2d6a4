//! `GET /listen/{uid}` as the first request of a connection, served directly on the
//! socket (`connection` sends only those here): the same stream as the framework's,
//! without its per-connection buffers, for the hours a stream stays open. Chunked, and
//! the connection closes after it. In steps: [`open`] the listener's stream,
//! [`first_write`] the head with the body's first chunk, then [`pump`] chunks until the
//! stream ends or the client goes.

use std::io::IoSlice;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SseStream;
use crate::error::ApiError;
use crate::node::Node;
use crate::transport::{self, Deliveries, Head};

/// Serves the stream; see the module docs.
pub(crate) async fn serve_direct(mut socket: TcpStream, head: Head, state: Node) {
    let cors = crate::cors::header_lines(&state.origins, &head.headers);
    // HTTP/1.0 knows no chunked bodies: its response ends when the connection closes.
    let chunked = head.http11;
    let deliveries = match open(head, &state).await {
        Ok(deliveries) => deliveries,
        Err(e) => {
            transport::direct::write_error(&mut socket, &e, &cors).await;
            return;
        }
    };
    let mut stream = SseStream::new(state, deliveries);
    let first = first_write(&mut stream, chunked, &cors);
    // Not kept for the stream's life (they would be, to the end of the scope).
    drop(cors);
    if socket.write_all(&first).await.is_err() {
        return;
    }
    drop(first);
    pump(socket, stream, chunked).await;
}

/// Checks the request and opens the listener's stream. Boxed, so the request and the
/// opening's state live on the heap only while the stream opens: a task keeps room for
/// the largest state it may be in, and an open stream is otherwise far smaller (with
/// the boxed HTTP path in `connection`, an idle stream went from ~4.5 to ~4.1 KB of
/// server memory, measured with 19,000).
async fn open(head: Head, state: &Node) -> Result<Deliveries, ApiError> {
    Box::pin(async {
        let request = transport::direct::listen_request(
            head,
            &state.settings.base_path,
            dolores_protocol::Transport::Sse.prefix(),
        )?;
        request.check_origin(state, "an SSE stream")?;
        transport::open(state, &request).await
    })
    .await
}

/// The response head and the body's first chunk, to go out in one write: one system
/// call less for every stream that opens.
fn first_write(stream: &mut SseStream, chunked: bool, cors: &str) -> Vec<u8> {
    let framing = if chunked {
        "transfer-encoding: chunked\r\n"
    } else {
        ""
    };
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
}

/// Writes the stream's chunks until it ends (then the last chunk), the client goes,
/// or the client stops reading for `slow_reader_timeout`.
async fn pump(mut socket: TcpStream, mut stream: SseStream, chunked: bool) {
    // A reader that takes nothing for this long is stuck, not slow: the stream ends and
    // the client resumes from its last id when it can (as WebSocket's 4008).
    let slow_reader_timeout = stream.state.settings.slow_reader_timeout;
    let (mut reader, mut writer) = socket.split();
    // A listener sends nothing after its request; reading tells when it goes away. One
    // byte: it is part of every open stream's task (and anything sent ends the stream).
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            // The stream first: when it has a chunk, the probe is not polled (a poll of
            // it registers with the socket again, each wake-up); a client that went
            // away is still found by the next write, or the next wait.
            biased;
            chunk = stream.next_chunk() => match chunk {
                Some(chunk) => {
                    // Straight into the socket's buffer when there is room (nearly
                    // always): a timer started around each such write was a clock read
                    // and a timer poll per delivery for nothing.
                    let (rest, framed) = match try_write_chunk(writer.as_ref(), &chunk, chunked) {
                        Ok(None) => continue,
                        Ok(Some(rest)) => rest,
                        Err(_) => return,
                    };
                    let write = write_chunk(&mut writer, &rest, chunked && !framed);
                    match tokio::time::timeout(slow_reader_timeout, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return,
                    }
                }
                None => break,
            },
            // Anything a listener does send (data up a stream, a pipelined request that
            // can never be answered) ends it, rather than being read and thrown away for
            // as long as it keeps coming.
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

/// Writes one chunk if the socket takes it now. `None` when all of it went; else what
/// is left to write, and whether it is already framed: the chunk itself when nothing
/// went (the socket's buffer is full), or, rarely, the unwritten end of the framed
/// chunk (written as it is).
fn try_write_chunk(
    socket: &TcpStream,
    chunk: &Bytes,
    chunked: bool,
) -> std::io::Result<Option<(Bytes, bool)>> {
    let mut size = [0u8; 18];
    let size = chunk_size_line(chunk.len(), &mut size);
    let framed = [
        IoSlice::new(size),
        IoSlice::new(chunk),
        IoSlice::new(b"\r\n"),
    ];
    let parts = if chunked { &framed[..] } else { &framed[1..2] };
    let total: usize = parts.iter().map(|part| part.len()).sum();
    let written = match socket.try_write_vectored(parts) {
        Ok(written) => written,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written >= total {
        return Ok(None);
    }
    if written == 0 {
        return Ok(Some((chunk.clone(), false)));
    }
    let whole: Vec<u8> = parts.iter().flat_map(|part| part.iter().copied()).collect();
    Ok(Some((Bytes::from(whole).slice(written..), true)))
}

/// Writes one chunk, framed when `chunked` (so a client can tell a clean end from a
/// crash).
async fn write_chunk(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    chunk: &Bytes,
    chunked: bool,
) -> std::io::Result<()> {
    if !chunked {
        return writer.write_all(chunk).await;
    }
    let mut size = [0u8; 18];
    let size = chunk_size_line(chunk.len(), &mut size);
    let mut parts = [
        IoSlice::new(size),
        IoSlice::new(chunk),
        IoSlice::new(b"\r\n"),
    ];
    write_all_vectored(writer, &mut parts).await
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
