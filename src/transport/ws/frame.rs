//! The WebSocket wire format (RFC 6455) as a push server needs it: the frames a
//! listener sends, read and checked; the control frames the server sends. The server's
//! text frames are built once per message and shared (`engine::Message::ws_frame`).
//!
//! Why by hand, not through tungstenite: a server frame is a few bytes of header before
//! bytes that every socket shares, so a delivery can be one write of shared bytes, as an
//! SSE delivery is. tungstenite copies each frame into a buffer of its own per socket
//! and costs ~1.7× SSE's CPU per delivery (measured, `docs/benchmarks.md`). Reading is
//! small: listeners send pongs, pings and a close, and every rule RFC 6455 sets for them
//! is checked here, so a broken client gets the close code it has earned (1002, 1007,
//! 1009) instead of a dropped connection. The handshake's accept key still comes from
//! tungstenite.

use super::CloseCode;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest control frame payload (RFC 6455 §5.5).
pub(super) const MAX_CONTROL_PAYLOAD: usize = 125;
/// Bytes read from the socket at a time while nothing larger is expected: listeners
/// send frames of a few bytes, and the buffer belongs to every open socket that has
/// sent anything.
const READ_CHUNK: usize = 256;

/// A frame opcode.
mod opcode {
    pub(super) const CONTINUATION: u8 = 0x0;
    pub(super) const TEXT: u8 = 0x1;
    pub(super) const BINARY: u8 = 0x2;
    pub(super) const CLOSE: u8 = 0x8;
    pub(super) const PING: u8 = 0x9;
    pub(super) const PONG: u8 = 0xA;
}

/// What a listener sent, once a whole frame has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Inbound {
    /// A ping: answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong (to the server's heartbeat ping), or a data frame: nothing to do.
    Ignored,
    /// A close, with the code the client gave, if any.
    Close(Option<u16>),
}

/// A frame that breaks the protocol, and the close code it earns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Violation {
    /// 1002: a frame RFC 6455 does not allow.
    Protocol(&'static str),
    /// 1007: text that is not UTF-8.
    NotUtf8,
    /// 1009: a message larger than the server takes.
    TooBig,
}

impl Violation {
    /// The close code and reason to send.
    pub(super) fn close(&self) -> (CloseCode, &'static str) {
        match self {
            Violation::Protocol(why) => (CloseCode::ProtocolError, why),
            Violation::NotUtf8 => (CloseCode::NotUtf8, "invalid UTF-8"),
            Violation::TooBig => (CloseCode::TooBig, "frame too big"),
        }
    }
}

/// Why reading stopped.
#[derive(Debug)]
pub(super) enum ReadError {
    /// The connection closed or failed.
    Gone,
    /// The client broke the protocol.
    Violation(Violation),
}

impl From<Violation> for ReadError {
    fn from(v: Violation) -> Self {
        ReadError::Violation(v)
    }
}

/// Reads a listener's frames. Holds no buffer until the client sends something.
#[derive(Debug)]
pub(super) struct Reader {
    buffer: Vec<u8>,
    /// Largest message accepted, in bytes.
    max_message: usize,
    /// A fragmented message still coming: whether it is text, and its bytes so far
    /// (kept only for text, to check its UTF-8 once whole).
    fragment: Option<(bool, Vec<u8>, usize)>,
}

impl Reader {
    /// A reader taking messages of at most `max_message` bytes.
    pub(super) fn new(max_message: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_message,
            fragment: None,
        }
    }

    /// The next frame that needs an answer, reading as needed. Cancel-safe: bytes
    /// read stay in the reader until a whole frame is there.
    pub(super) async fn next<R: AsyncRead + Unpin>(
        &mut self,
        socket: &mut R,
    ) -> Result<Inbound, ReadError> {
        loop {
            if let Some(inbound) = self.parse()? {
                if self.buffer.is_empty() && self.buffer.capacity() > READ_CHUNK {
                    self.buffer = Vec::new(); // a large frame's room is not kept
                }
                return Ok(inbound);
            }
            self.buffer.reserve(READ_CHUNK);
            match socket.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return Err(ReadError::Gone),
                Ok(_) => {}
            }
        }
    }

    /// Takes one whole frame from the buffer, if one is there.
    fn parse(&mut self) -> Result<Option<Inbound>, Violation> {
        let Some(&[b0, b1]) = self.buffer.get(..2) else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let op = b0 & 0x0F;
        if b0 & 0x70 != 0 {
            return Err(Violation::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(Violation::Protocol("client frames must be masked"));
        }
        let (len, start) = match b1 & 0x7F {
            126 => match self.buffer.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
                None => return Ok(None),
            },
            127 => match self
                .buffer
                .get(2..10)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
            {
                Some(bytes) => (u64::from_be_bytes(bytes), 10),
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        let control = op & 0x08 != 0;
        match op {
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !fin {
                    return Err(Violation::Protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol("control frame over 125 bytes"));
                }
            }
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
            _ => return Err(Violation::Protocol("unknown opcode")),
        }
        let so_far = self.fragment.as_ref().map_or(0, |(_, _, n)| *n);
        if len
            > (self
                .max_message
                .saturating_sub(if control { 0 } else { so_far })) as u64
        {
            return Err(Violation::TooBig);
        }
        // Fits in usize: at most max_message.
        let len = len as usize;
        let end = start + 4 + len;
        if self.buffer.len() < end {
            self.buffer.reserve(end - self.buffer.len());
            return Ok(None);
        }
        let mask = [
            self.buffer[start],
            self.buffer[start + 1],
            self.buffer[start + 2],
            self.buffer[start + 3],
        ];
        let payload = &mut self.buffer[start + 4..end];
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let inbound = match op {
            opcode::PING => Inbound::Ping(payload.to_vec()),
            opcode::PONG => Inbound::Ignored,
            opcode::CLOSE => close_code(payload)?,
            _ => self.data(op, fin, len, start + 4, end)?,
        };
        self.buffer.drain(..end);
        Ok(Some(inbound))
    }

    /// A data frame: listeners have nothing to say, but what they send must still be
    /// well-formed (whole messages, UTF-8 text, within the size limit).
    fn data(
        &mut self,
        op: u8,
        fin: bool,
        len: usize,
        from: usize,
        to: usize,
    ) -> Result<Inbound, Violation> {
        let payload = &self.buffer[from..to];
        match (op, self.fragment.take()) {
            (opcode::CONTINUATION, None) => {
                Err(Violation::Protocol("continuation frame without a message"))
            }
            (_, Some(_)) if op != opcode::CONTINUATION => {
                Err(Violation::Protocol("new message before the last one ended"))
            }
            (_, Some((text, mut bytes, size))) => {
                if text {
                    bytes.extend_from_slice(payload);
                }
                if fin {
                    if text && std::str::from_utf8(&bytes).is_err() {
                        return Err(Violation::NotUtf8);
                    }
                } else {
                    self.fragment = Some((text, bytes, size + len));
                }
                Ok(Inbound::Ignored)
            }
            (op, None) => {
                let text = op == opcode::TEXT;
                if fin {
                    if text && std::str::from_utf8(payload).is_err() {
                        return Err(Violation::NotUtf8);
                    }
                } else {
                    let bytes = if text { payload.to_vec() } else { Vec::new() };
                    self.fragment = Some((text, bytes, len));
                }
                Ok(Inbound::Ignored)
            }
        }
    }
}

/// The code of a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn close_code(payload: &[u8]) -> Result<Inbound, Violation> {
    match payload {
        [] => Ok(Inbound::Close(None)),
        [_] => Err(Violation::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !allowed {
                return Err(Violation::Protocol("close code not allowed"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(Violation::NotUtf8);
            }
            Ok(Inbound::Close(Some(code)))
        }
    }
}

/// A short frame the server sends (a close, ping or pong, or a small text like a
/// reset): unmasked, final, at most 125 bytes of payload, which is cut there.
pub(super) fn short(op: Opcode, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut frame = Vec::with_capacity(2 + payload.len());
    frame.push(0x80 | op as u8);
    frame.push(payload.len() as u8);
    frame.extend_from_slice(payload);
    frame
}

/// A close frame with `code` and `reason`.
pub(super) fn close(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    short(Opcode::Close, &payload)
}

/// Where the server frame that holds byte `at` of `frames` (whole unmasked frames, one
/// after the other) ends: a write cut off at `at` is back on a frame boundary once the
/// bytes up to there are written. `at` itself when it is already on a boundary.
pub(super) fn frame_end(frames: &[u8], at: usize) -> usize {
    let mut end = 0;
    while end < at {
        let Some(&len7) = frames.get(end + 1) else {
            return frames.len();
        };
        let (header, payload) = match len7 & 0x7F {
            126 => (
                4,
                frames
                    .get(end + 2..end + 4)
                    .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]]))),
            ),
            127 => (
                10,
                frames.get(end + 2..end + 10).map_or(0, |b| {
                    let mut length = [0u8; 8];
                    length.copy_from_slice(b);
                    usize::try_from(u64::from_be_bytes(length)).unwrap_or(usize::MAX)
                }),
            ),
            short => (2, usize::from(short)),
        };
        end = end.saturating_add(header).saturating_add(payload);
    }
    end.min(frames.len())
}

/// The short frames the server sends.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub(super) enum Opcode {
    /// Text (a reset notice; messages are `engine::Message::ws_frame`).
    Text = opcode::TEXT,
    /// Close.
    Close = opcode::CLOSE,
    /// Ping (the heartbeat).
    Ping = opcode::PING,
    /// Pong (the answer to a listener's ping).
    Pong = opcode::PONG,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_write_ends_at_the_end_of_the_frame_it_cut() {
        let long = vec![b'x'; 300];
        let mut frames = short(Opcode::Ping, b"");
        let second = frames.len();
        // A 300-byte text frame: a 16-bit length.
        frames.extend_from_slice(&[0x81, 126, 0x01, 0x2C]);
        frames.extend_from_slice(&long);
        let third = frames.len();
        frames.extend(short(Opcode::Text, b"tail"));
        assert_eq!(frame_end(&frames, 0), 0);
        assert_eq!(frame_end(&frames, 1), second);
        assert_eq!(frame_end(&frames, second), second);
        assert_eq!(frame_end(&frames, second + 1), third);
        assert_eq!(frame_end(&frames, third - 1), third);
        assert_eq!(frame_end(&frames, third + 2), frames.len());
        assert_eq!(frame_end(&frames, frames.len()), frames.len());
    }

    /// A client frame: masked with a fixed key.
    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x12, 0x34, 0x56, 0x78];
        let mut frame = vec![b0];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    fn read_all(bytes: &[u8]) -> Vec<Result<Inbound, Violation>> {
        let mut reader = Reader::new(64 * 1024);
        reader.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            match reader.parse() {
                Ok(Some(inbound)) => out.push(Ok(inbound)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn pings_pongs_and_closes_are_read() {
        let mut bytes = masked(0x89, b"hi");
        bytes.extend(masked(0x8A, b""));
        bytes.extend(masked(0x88, &[0x03, 0xE8, b'o', b'k']));
        assert_eq!(
            read_all(&bytes),
            [
                Ok(Inbound::Ping(b"hi".to_vec())),
                Ok(Inbound::Ignored),
                Ok(Inbound::Close(Some(1000)))
            ]
        );
    }

    #[test]
    fn a_frame_split_anywhere_is_read_once_whole() {
        let frame = masked(0x89, b"split");
        for cut in 0..frame.len() {
            let mut reader = Reader::new(1024);
            reader.buffer.extend_from_slice(&frame[..cut]);
            assert_eq!(reader.parse(), Ok(None), "cut at {cut}");
            reader.buffer.extend_from_slice(&frame[cut..]);
            assert_eq!(reader.parse(), Ok(Some(Inbound::Ping(b"split".to_vec()))));
        }
    }

    #[test]
    fn protocol_errors_get_their_close_codes() {
        let unmasked = vec![0x89, 0x00];
        assert_eq!(
            read_all(&unmasked),
            [Err(Violation::Protocol("client frames must be masked"))]
        );
        assert_eq!(
            read_all(&masked(0xC1, b"x")),
            [Err(Violation::Protocol("reserved bits set"))]
        );
        assert_eq!(
            read_all(&masked(0x83, b"x")),
            [Err(Violation::Protocol("unknown opcode"))]
        );
        assert_eq!(
            read_all(&masked(0x09, b"x")),
            [Err(Violation::Protocol("fragmented control frame"))]
        );
        assert_eq!(
            read_all(&masked(0x89, &[0u8; 126])),
            [Err(Violation::Protocol("control frame over 125 bytes"))]
        );
        assert_eq!(
            read_all(&masked(0x81, &[0xFF, 0xFE])),
            [Err(Violation::NotUtf8)]
        );
        assert_eq!(
            read_all(&masked(0x82, &vec![0u8; 64 * 1024 + 1])),
            [Err(Violation::TooBig)]
        );
        assert_eq!(
            read_all(&masked(0x80, b"x")),
            [Err(Violation::Protocol(
                "continuation frame without a message"
            ))]
        );
        assert_eq!(
            read_all(&masked(0x88, &[0x03, 0xED])),
            [Err(Violation::Protocol("close code not allowed"))]
        );
        assert_eq!(Violation::NotUtf8.close().0.code(), 1007);
        assert_eq!(Violation::TooBig.close().0.code(), 1009);
        assert_eq!(Violation::Protocol("x").close().0.code(), 1002);
    }

    #[test]
    fn fragmented_text_is_checked_whole() {
        // "é" is two bytes, split over two fragments: valid once whole.
        let mut bytes = masked(0x01, &[0xC3]);
        bytes.extend(masked(0x80, &[0xA9]));
        assert_eq!(
            read_all(&bytes),
            [Ok(Inbound::Ignored), Ok(Inbound::Ignored)]
        );
        let mut bytes = masked(0x01, &[0xC3]);
        bytes.extend(masked(0x80, &[0x41]));
        assert_eq!(
            read_all(&bytes),
            [Ok(Inbound::Ignored), Err(Violation::NotUtf8)]
        );
        // Fragments that add up past the limit.
        let mut reader = Reader::new(10);
        reader.buffer.extend(masked(0x02, &[0; 6]));
        reader.buffer.extend(masked(0x80, &[0; 6]));
        assert_eq!(reader.parse(), Ok(Some(Inbound::Ignored)));
        assert_eq!(reader.parse(), Err(Violation::TooBig));
    }

    #[test]
    fn server_control_frames_are_unmasked_and_short() {
        assert_eq!(close(1001, "bye"), [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
        assert_eq!(short(Opcode::Ping, b""), [0x89, 0]);
        assert_eq!(short(Opcode::Pong, &[7; 200]).len(), 2 + 125);
        assert_eq!(short(Opcode::Text, b"{}"), [0x81, 2, b'{', b'}']);
    }

    proptest::proptest! {
        /// Whatever a client sends: no panic, and the reader never holds more than one
        /// frame's worth beyond the limit.
        #[test]
        fn any_bytes_are_read_or_refused_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut reader = Reader::new(1024);
            reader.buffer.extend_from_slice(&bytes);
            for _ in 0..64 {
                match reader.parse() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// A well-formed client frame is read the same however it is split.
        #[test]
        fn frames_split_anywhere_read_the_same(
            op in proptest::sample::select(vec![0x89u8, 0x8A, 0x82, 0x88]),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..125),
            cut in 0usize..200,
        ) {
            let payload = if op == 0x88 { vec![0x03, 0xE8] } else { payload };
            let frame = masked(op, &payload);
            let whole = read_all(&frame);
            let cut = cut.min(frame.len());
            let mut reader = Reader::new(64 * 1024);
            reader.buffer.extend_from_slice(&frame[..cut]);
            let early = reader.parse();
            if cut < frame.len() {
                proptest::prop_assert_eq!(early, Ok(None));
            }
            reader.buffer.extend_from_slice(&frame[cut..]);
            let late = if cut < frame.len() { reader.parse() } else { Ok(None) };
            let got = match (cut < frame.len(), late) {
                (true, Ok(Some(inbound))) => vec![Ok(inbound)],
                (true, other) => vec![other.map(|_| Inbound::Ignored)],
                (false, _) => whole.clone(),
            };
            proptest::prop_assert_eq!(got, whole);
        }
    }
}
