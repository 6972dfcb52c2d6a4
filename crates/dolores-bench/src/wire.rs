//! The load generator's wire: a minimal HTTP/1.1 client over a tokio `TcpStream`
//! (write a request, read the head, then the body as chunks, a length or to the end),
//! a Server-Sent Events line parser, and the payload the publishers send.
//!
//! This is the hot path of `dolores bench`: one of these per listener, thousands at
//! once, so it keeps one read buffer and one body buffer per connection, and parses
//! each event's JSON once, borrowing its strings.

use std::borrow::Cow;
use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Largest response head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Bytes reserved before each read.
const READ_RESERVE: usize = 4096;

/// What the publishers send as each message, and the listeners read back.
///
/// `s` is the send time (ns since the run's common start), `p` the publisher, `g` the
/// publisher's own sequence over all tracks, `t` the track's index and `i` the
/// publisher's sequence on that track. Unknown fields (the padding `x`) are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(super) struct Payload {
    /// Send time, ns since the common start.
    pub(super) s: u64,
    /// Publisher index.
    pub(super) p: u32,
    /// The publisher's sequence over all its messages.
    pub(super) g: u64,
    /// Track index.
    pub(super) t: u32,
    /// The publisher's sequence on track `t`.
    pub(super) i: u64,
}

impl Payload {
    /// The payload as compact JSON, with `pad` (already JSON-safe) as an `x` field.
    pub(super) fn to_json(self, pad: &str) -> String {
        let Payload { s, p, g, t, i } = self;
        if pad.is_empty() {
            format!(r#"{{"s":{s},"p":{p},"g":{g},"t":{t},"i":{i}}}"#)
        } else {
            format!(r#"{{"s":{s},"p":{p},"g":{g},"t":{t},"i":{i},"x":"{pad}"}}"#)
        }
    }
}

/// One delivered event as any transport carries it: Dolores' envelope
/// (`{"track", "message"}`, plus `id` on WebSocket and long-poll) or, from a foreign
/// server, the bare payload.
#[derive(Debug, Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    track: Option<Cow<'a, str>>,
    #[serde(default)]
    message: Option<Payload>,
    #[serde(default)]
    reset: bool,
    s: Option<u64>,
    p: Option<u32>,
    g: Option<u64>,
    t: Option<u32>,
    i: Option<u64>,
}

/// What one event turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed<'a> {
    /// A benchmark message; `track` is the track name when the envelope named one.
    Message {
        /// The track named by the envelope.
        track: Option<Cow<'a, str>>,
        /// The payload.
        payload: Payload,
    },
    /// A reset: the server could not replay from the cursor.
    Reset,
    /// Not a benchmark message at all.
    Garbled,
}

fn from_wire(wire: Wire<'_>) -> Parsed<'_> {
    if wire.reset {
        return Parsed::Reset;
    }
    let payload = match (wire.message, wire.s, wire.p, wire.g, wire.t, wire.i) {
        (Some(payload), ..) => payload,
        (None, Some(s), Some(p), Some(g), Some(t), Some(i)) => Payload { s, p, g, t, i },
        _ => return Parsed::Garbled,
    };
    Parsed::Message {
        track: wire.track,
        payload,
    }
}

/// Parses one event's data (an SSE `data:` payload or a WebSocket text frame).
pub(super) fn parse_event(data: &[u8]) -> Parsed<'_> {
    match serde_json::from_slice::<Wire<'_>>(data) {
        Ok(wire) => from_wire(wire),
        Err(_) => Parsed::Garbled,
    }
}

/// A long-poll answer: `{"events": […], "last_event_id", "reset"?}`.
#[derive(Debug, Deserialize)]
struct PollAnswer<'a> {
    #[serde(borrow)]
    events: Vec<Wire<'a>>,
    #[serde(borrow, default)]
    last_event_id: Option<Cow<'a, str>>,
    #[serde(default)]
    reset: bool,
}

/// A parsed long-poll answer.
#[derive(Debug)]
pub(super) struct Polled<'a> {
    /// The events, in order.
    pub(super) events: Vec<Parsed<'a>>,
    /// The cursor to send with the next request.
    pub(super) last_event_id: Option<Cow<'a, str>>,
    /// Whether the answer carried a reset.
    pub(super) reset: bool,
}

/// Parses a long-poll answer; `None` when it is not one.
pub(super) fn parse_poll(body: &[u8]) -> Option<Polled<'_>> {
    let answer: PollAnswer<'_> = serde_json::from_slice(body).ok()?;
    Some(Polled {
        events: answer.events.into_iter().map(from_wire).collect(),
        last_event_id: answer.last_event_id,
        reset: answer.reset,
    })
}

/// Opens a TCP connection to `addr`, first binding to `source` (port chosen at
/// connect time where the OS can) when given.
pub(super) async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Asks Linux to pick the source port at `connect` time rather than at `bind`, so a
/// port is only unique per (source, destination) and not per source address.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this function borrows, with a pointer to a live
    // c_int and its exact size; a failure only leaves the default behaviour.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_socket: &TcpSocket) {}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length`.
    Length(u64),
    /// Until the connection closes.
    Close,
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// The status code.
    pub(super) status: u16,
    /// The body's framing.
    pub(super) framing: Framing,
}

/// Parses a response head (without the final blank line).
pub(super) fn parse_head(head: &[u8]) -> Result<Head, String> {
    let text = std::str::from_utf8(head).map_err(|_| "a response head that is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| format!("not an HTTP/1.1 response: {status_line:?}"))?;
    let mut framing = Framing::Close;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let length = value
                .parse()
                .map_err(|_| format!("a bad content-length: {value:?}"))?;
            framing = Framing::Length(length);
        }
    }
    Ok(Head { status, framing })
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

/// Takes a response body out of the bytes read, whatever its framing.
#[derive(Debug)]
pub(super) struct BodyDecoder {
    framing: Framing,
    chunk: ChunkState,
    /// Bytes of a `Length` body still to come.
    left: u64,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`.
    pub(super) fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            chunk: ChunkState::Size,
            left,
        }
    }

    /// Whether the body is complete (never, for a body read to the close).
    pub(super) fn done(&self) -> bool {
        match self.framing {
            Framing::Chunked => self.chunk == ChunkState::Done,
            Framing::Length(_) => self.left == 0,
            Framing::Close => false,
        }
    }

    /// Moves body bytes from `raw` to `out`; leaves in `raw` what follows the body
    /// (or an incomplete chunk header).
    pub(super) fn decode(&mut self, raw: &mut BytesMut, out: &mut BytesMut) -> Result<(), String> {
        match self.framing {
            Framing::Close => {
                out.extend_from_slice(raw);
                raw.clear();
                Ok(())
            }
            Framing::Length(_) => {
                let take = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(raw.len());
                out.extend_from_slice(&raw[..take]);
                raw.advance(take);
                self.left -= take as u64;
                Ok(())
            }
            Framing::Chunked => self.decode_chunked(raw, out),
        }
    }

    fn decode_chunked(&mut self, raw: &mut BytesMut, out: &mut BytesMut) -> Result<(), String> {
        loop {
            match self.chunk {
                ChunkState::Done => return Ok(()),
                ChunkState::Size => {
                    let Some(end) = find_crlf(raw) else {
                        return if raw.len() > 1024 {
                            Err("a chunk header longer than 1 KiB".into())
                        } else {
                            Ok(())
                        };
                    };
                    let line = std::str::from_utf8(&raw[..end]).unwrap_or("");
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| format!("a bad chunk size: {line:?}"))?;
                    raw.advance(end + 2);
                    self.chunk = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if raw.is_empty() {
                        return Ok(());
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(raw.len());
                    out.extend_from_slice(&raw[..take]);
                    raw.advance(take);
                    let left = left - take as u64;
                    self.chunk = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd => {
                    if raw.len() < 2 {
                        return Ok(());
                    }
                    if &raw[..2] != b"\r\n" {
                        return Err("a chunk not followed by CRLF".into());
                    }
                    raw.advance(2);
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailer => {
                    let Some(end) = find_crlf(raw) else {
                        return Ok(());
                    };
                    raw.advance(end + 2);
                    if end == 0 {
                        self.chunk = ChunkState::Done;
                    }
                }
            }
        }
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

/// One HTTP/1.1 connection, kept alive across requests.
#[derive(Debug)]
pub(super) struct HttpConn {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    raw: BytesMut,
}

impl HttpConn {
    /// Wraps a connected stream.
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            raw: BytesMut::with_capacity(READ_RESERVE),
        }
    }

    /// Writes a `GET` request for `target` (path and query) to `host`.
    pub(super) async fn get(&mut self, host: &str, target: &str, accept: &str) -> io::Result<()> {
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\n\
             Cache-Control: no-cache\r\nUser-Agent: dolores-bench\r\n\r\n"
        );
        self.stream.write_all(request.as_bytes()).await
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the end of the stream. Cancel-safe.
    pub(super) async fn read_more(&mut self) -> io::Result<usize> {
        self.raw.reserve(READ_RESERVE);
        self.stream.read_buf(&mut self.raw).await
    }

    /// Reads a response head.
    pub(super) async fn read_head(&mut self) -> Result<Head, String> {
        loop {
            if let Some(end) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_head(&self.raw[..end]);
                self.raw.advance(end + 4);
                return head;
            }
            if self.raw.len() > MAX_HEAD_BYTES {
                return Err("a response head over 16 KiB".into());
            }
            match self.read_more().await {
                Ok(0) => return Err("the server closed the connection before answering".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the response: {e}")),
            }
        }
    }

    /// Moves what is buffered of the body through `decoder` into `out`.
    pub(super) fn take_body(
        &mut self,
        decoder: &mut BodyDecoder,
        out: &mut BytesMut,
    ) -> Result<(), String> {
        decoder.decode(&mut self.raw, out)
    }

    /// Reads a whole body (at most `limit` bytes) framed as `framing`.
    pub(super) async fn read_body(
        &mut self,
        framing: Framing,
        limit: usize,
    ) -> Result<BytesMut, String> {
        let mut decoder = BodyDecoder::new(framing);
        let mut body = BytesMut::new();
        loop {
            self.take_body(&mut decoder, &mut body)?;
            if decoder.done() {
                return Ok(body);
            }
            if body.len() > limit {
                return Err(format!("a response body over {limit} bytes"));
            }
            match self.read_more().await {
                Ok(0) if framing == Framing::Close => return Ok(body),
                Ok(0) => return Err("the server closed the connection inside a body".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the body: {e}")),
            }
        }
    }

    /// The stream, for a WebSocket handshake.
    pub(super) fn into_stream(self) -> TcpStream {
        self.stream
    }
}

/// Parses Server-Sent Events line by line out of a body buffer.
#[derive(Debug, Default)]
pub(super) struct SseParser {
    data: Vec<u8>,
    has_data: bool,
    reset: bool,
}

/// One complete Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SseEvent<'a> {
    /// An event with data (named `message` or anything but `reset`).
    Data(&'a [u8]),
    /// `event: reset`.
    Reset,
}

impl SseParser {
    /// Consumes every complete line of `body`, calling `on_event` for each complete
    /// event; an incomplete last line stays in `body`.
    pub(super) fn feed(&mut self, body: &mut BytesMut, mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut start = 0;
        while let Some(offset) = body[start..].iter().position(|&b| b == b'\n') {
            let end = start + offset;
            let mut line = &body[start..end];
            if let Some(stripped) = line.strip_suffix(b"\r") {
                line = stripped;
            }
            start = end + 1;
            if line.is_empty() {
                if self.has_data {
                    if self.reset {
                        on_event(SseEvent::Reset);
                    } else {
                        on_event(SseEvent::Data(&self.data));
                    }
                }
                self.data.clear();
                self.has_data = false;
                self.reset = false;
                continue;
            }
            if line[0] == b':' {
                continue;
            }
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"data" => {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                    self.has_data = true;
                }
                b"event" => self.reset = value == b"reset",
                _ => {}
            }
        }
        body.advance(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_say_how_the_body_is_framed() {
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked",
        )
        .expect("a head");
        assert_eq!(
            head,
            Head {
                status: 200,
                framing: Framing::Chunked
            }
        );
        let head = parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 12").expect("a head");
        assert_eq!(
            head,
            Head {
                status: 404,
                framing: Framing::Length(12)
            }
        );
        let head = parse_head(b"HTTP/1.0 200 OK").expect("a head");
        assert_eq!(head.framing, Framing::Close);
        assert!(parse_head(b"SSH-2.0 hello").is_err());
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\nNEXT";
        for split in 0..wire.len() {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            let mut raw = BytesMut::new();
            let mut out = BytesMut::new();
            raw.extend_from_slice(&wire[..split]);
            decoder.decode(&mut raw, &mut out).expect("valid");
            raw.extend_from_slice(&wire[split..]);
            decoder.decode(&mut raw, &mut out).expect("valid");
            assert_eq!(&out[..], b"hello, world", "split at {split}");
            assert!(decoder.done());
            assert_eq!(&raw[..], b"NEXT");
        }
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut raw = BytesMut::from(&b"zz\r\n"[..]);
        assert!(decoder.decode(&mut raw, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let mut decoder = BodyDecoder::new(Framing::Length(3));
        let mut raw = BytesMut::from(&b"abcdef"[..]);
        let mut out = BytesMut::new();
        decoder.decode(&mut raw, &mut out).expect("valid");
        assert!(decoder.done());
        assert_eq!((&out[..], &raw[..]), (&b"abc"[..], &b"def"[..]));
    }

    #[test]
    fn sse_events_come_out_whole() {
        let mut parser = SseParser::default();
        let mut body = BytesMut::from(&b"retry: 2000\n: welcome\n\nid: 1\ndata: {\"a\"\r\n"[..]);
        let mut seen: Vec<String> = Vec::new();
        let mut record = |e: SseEvent<'_>| match e {
            SseEvent::Data(d) => seen.push(String::from_utf8_lossy(d).into_owned()),
            SseEvent::Reset => seen.push("RESET".into()),
        };
        parser.feed(&mut body, &mut record);
        body.extend_from_slice(
            b"data: :1}\n\nid: 2\nevent: reset\ndata: {\"reset\":true}\n\nid: 3\ndata: x",
        );
        parser.feed(&mut body, &mut record);
        assert_eq!(seen, vec!["{\"a\"\n:1}".to_owned(), "RESET".to_owned()]);
        assert_eq!(&body[..], b"data: x");
    }

    #[test]
    fn payloads_parse_from_every_envelope() {
        let payload = Payload {
            s: 5,
            p: 1,
            g: 7,
            t: 0,
            i: 3,
        };
        let json = payload.to_json("");
        let sse = format!(r#"{{"track":"bench-1-0","message":{json}}}"#);
        assert_eq!(
            parse_event(sse.as_bytes()),
            Parsed::Message {
                track: Some("bench-1-0".into()),
                payload
            }
        );
        let ws = format!(
            r#"{{"id":"9","track":"bench-1-0","message":{}}}"#,
            payload.to_json("xx")
        );
        assert!(
            matches!(parse_event(ws.as_bytes()), Parsed::Message { payload: p, .. } if p == payload)
        );
        assert_eq!(
            parse_event(json.as_bytes()),
            Parsed::Message {
                track: None,
                payload
            }
        );
        assert_eq!(parse_event(br#"{"reset":true}"#), Parsed::Reset);
        assert_eq!(
            parse_event(br#"{"track":"x","message":"hello"}"#),
            Parsed::Garbled
        );
        assert_eq!(parse_event(b"not json"), Parsed::Garbled);
        let poll = format!(r#"{{"events":[{ws}],"last_event_id":"9"}}"#);
        let polled = parse_poll(poll.as_bytes()).expect("a poll answer");
        assert_eq!(polled.events.len(), 1);
        assert_eq!(polled.last_event_id.as_deref(), Some("9"));
        assert!(!polled.reset);
    }
}
