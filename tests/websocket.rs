//! `GET /ws/{uid}` over a real WebSocket: the same queue, resume, reset and token
//! semantics as SSE, close codes that say why, and a bound on inbound frames.

mod common;

use std::time::Duration;

use common::{Server, WAIT, uid, within};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(server: &Server, uid: &str, query: &str) -> Socket {
    let url = format!("ws://{}/ws/{uid}{query}", server.addr());
    let (socket, _) = within(
        "the websocket handshake",
        WAIT,
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("handshake");
    socket
}

/// The next JSON text frame (pings and pongs skipped).
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let frame = within("a websocket frame", WAIT, socket.next())
            .await
            .expect("socket open")
            .expect("frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame; returns its code and reason.
async fn close_of(socket: &mut Socket) -> (u16, String) {
    loop {
        match within("the close frame", WAIT, socket.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before close: {e}"),
        }
    }
}

fn ids(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["id"].as_str().expect("id").parse().expect("numeric id"))
        .collect()
}

#[tokio::test]
async fn websocket_delivers_the_queue_then_live_messages_in_order() {
    let server = Server::start().await;
    let uid = uid("ws-queue");
    server.connect(&uid, ":data").await;
    let queued: Vec<u64> = futures_util::future::join_all(
        (0..3).map(|i| server.publish(":data", json!(format!("queued {i}")))),
    )
    .await;
    let mut socket = open(&server, &uid, "").await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(next_json(&mut socket).await);
    }
    let mut expected = queued.clone();
    expected.sort_unstable();
    assert_eq!(ids(&frames), expected);
    assert_eq!(frames[0]["track"], ":data");
    let live = server.publish(":data", json!({"live": true})).await;
    let frame = next_json(&mut socket).await;
    assert_eq!(ids(std::slice::from_ref(&frame)), vec![live]);
    assert_eq!(frame["message"], json!({"live": true}));
}

#[tokio::test]
async fn websocket_resumes_after_the_given_id_with_no_gap_and_no_duplicate() {
    let server = Server::start().await;
    let uid = uid("ws-resume");
    server.connect(&uid, ":data").await;
    let mut all = Vec::new();
    for i in 0..10 {
        all.push(server.publish(":data", json!(i)).await);
    }
    let mut socket = open(&server, &uid, &format!("?last_event_id={}", all[3])).await;
    let mut got = Vec::new();
    for _ in 4..10 {
        got.push(next_json(&mut socket).await);
    }
    assert_eq!(ids(&got), all[4..].to_vec());
}

#[tokio::test]
async fn websocket_sends_a_reset_frame_for_a_cursor_older_than_what_is_kept() {
    let server = Server::start_args(&["--max-stored-messages", "3"]).await;
    let uid = uid("ws-reset");
    server.connect(&uid, ":data").await;
    let mut last = 0;
    for i in 0..10 {
        last = server.publish(":data", json!(i)).await;
    }
    let mut socket = open(&server, &uid, "?last_event_id=0").await;
    let reset = next_json(&mut socket).await;
    assert_eq!(reset["reset"], true);
    assert_eq!(reset["id"], last.to_string());
    let live = server.publish(":data", json!("after")).await;
    assert_eq!(ids(&[next_json(&mut socket).await]), vec![live]);
}

#[tokio::test]
async fn websocket_closes_with_a_code_that_says_why_it_could_not_open() {
    let server = Server::start().await;
    let mut socket = open(&server, &uid("ws-unknown"), "").await;
    assert_eq!(
        close_of(&mut socket).await,
        (4404, "unknown_listener".into())
    );

    let secured = Server::start_args(&["--token-secret", "s3cret"]).await;
    let uid = uid("ws-token");
    secured.connect(&uid, ":data").await;
    let mut socket = open(&secured, &uid, "").await;
    assert_eq!(close_of(&mut socket).await, (4401, "token_required".into()));
    let mut socket = open(&secured, &uid, "?token=garbage").await;
    assert_eq!(close_of(&mut socket).await, (4401, "bad_token".into()));
    let (_, answer) = secured
        .api("tokens", json!({"uid": uid, "ttl_seconds": 60}))
        .await;
    let token = answer["token"].as_str().expect("token");
    let mut socket = open(&secured, &uid, &format!("?token={token}")).await;
    let id = secured.publish(":data", json!("with token")).await;
    assert_eq!(ids(&[next_json(&mut socket).await]), vec![id]);
}

#[tokio::test]
async fn websocket_ignores_small_frames_and_closes_1009_on_an_oversized_one() {
    let server = Server::start().await;
    let uid = uid("ws-frames");
    server.connect(&uid, ":data").await;
    let mut socket = open(&server, &uid, "").await;
    socket
        .send(Message::text("hello?"))
        .await
        .expect("send text");
    socket
        .send(Message::binary(vec![0xff, 0x00, 0x13]))
        .await
        .expect("send binary");
    socket
        .send(Message::Ping(vec![1, 2].into()))
        .await
        .expect("ping");
    let id = server.publish(":data", json!("still here")).await;
    assert_eq!(ids(&[next_json(&mut socket).await]), vec![id]);

    socket
        .send(Message::binary(vec![7u8; 70 * 1024]))
        .await
        .expect("send big frame");
    let (code, _) = close_of(&mut socket).await;
    assert_eq!(code, u16::from(CloseCode::Size));
    // The server carries on.
    assert!(server.healthy().await);
}

#[tokio::test]
async fn websocket_from_a_foreign_origin_is_refused_unless_allowed() {
    let server = Server::start_args(&["--cors-origins", "http://allowed.test"]).await;
    let uid = uid("ws-origin");
    server.connect(&uid, ":data").await;
    let url = format!("ws://{}/ws/{uid}", server.addr());
    let from = |origin: &str| {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("request");
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header"));
        request
    };
    match within(
        "the refusal",
        WAIT,
        tokio_tungstenite::connect_async(from("http://evil.test")),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403, "{response:?}");
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("a JSON error ({e}): {response:?}"));
            assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
        }
        Err(other) => panic!("refused with 403, not {other:?}"),
        Ok(_) => panic!("a foreign origin must not get a socket"),
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(from("http://allowed.test"))
        .await
        .expect("allowed");
    let id = server.publish(":data", json!(1)).await;
    assert_eq!(ids(&[next_json(&mut socket).await]), vec![id]);
}

#[tokio::test]
async fn websocket_is_closed_1001_on_shutdown() {
    let mut server = Server::spawn().await;
    let uid = uid("ws-shutdown");
    server.connect(&uid, ":data").await;
    let mut socket = open(&server, &uid, "").await;
    let id = server.publish(":data", json!(1)).await;
    assert_eq!(ids(&[next_json(&mut socket).await]), vec![id]);
    let (status, (code, _)) = tokio::join!(server.terminate(), close_of(&mut socket));
    assert!(status.success(), "{status:?}");
    assert_eq!(code, 1001);
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_endpoint_gets_a_json_error() {
    let server = Server::start().await;
    let (status, body) = server.get(&format!("/ws/{}", uid("ws-plain"))).await;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert_eq!(body["error"]["code"], "not_websocket");
}

/// A raw socket that has done the WebSocket handshake for `uid`, for frames no client
/// library would send.
async fn raw_socket(server: &Server, uid: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let request = format!(
        "GET /ws/{uid} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr()
    );
    tcp.write_all(request.as_bytes()).await.expect("send head");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        within("the 101 answer", WAIT, tcp.read_exact(&mut byte))
            .await
            .expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455's sample accept key: {head}"
    );
    tcp
}

/// A masked client frame.
fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [1u8, 2, 3, 4];
    assert!(payload.len() < 126);
    let mut frame = vec![b0, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// Reads server frames until a close; returns its code (server frames are unmasked).
async fn raw_close_code(tcp: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt;
    loop {
        let mut header = [0u8; 2];
        within("a frame header", WAIT, tcp.read_exact(&mut header))
            .await
            .expect("frame header");
        let len = usize::from(header[1] & 0x7F);
        assert!(len < 126, "short frames only here");
        let mut payload = vec![0u8; len];
        within("a frame payload", WAIT, tcp.read_exact(&mut payload))
            .await
            .expect("frame payload");
        if header[0] & 0x0F == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn websocket_answers_a_ping_with_a_pong_carrying_its_payload() {
    let server = Server::start().await;
    let uid = uid("wsping");
    server.connect(&uid, ":p").await;
    let mut socket = open(&server, &uid, "").await;
    socket
        .send(Message::Ping(bytes::Bytes::from_static(b"are you there")))
        .await
        .expect("ping");
    loop {
        let frame = within("the pong", WAIT, socket.next())
            .await
            .expect("open")
            .expect("frame");
        if let Message::Pong(payload) = frame {
            assert_eq!(&payload[..], b"are you there");
            break;
        }
    }
}

#[tokio::test]
async fn websocket_protocol_errors_close_with_1002_or_1007() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start().await;
    let uid = uid("wsproto");
    server.connect(&uid, ":p").await;
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("an unmasked frame", vec![0x89, 0x00], 1002),
        ("reserved bits", client_frame(0xC9, b""), 1002),
        ("an unknown opcode", client_frame(0x83, b"x"), 1002),
        ("a fragmented ping", client_frame(0x09, b""), 1002),
        (
            "text that is not UTF-8",
            client_frame(0x81, &[0xC3, 0x28]),
            1007,
        ),
    ];
    for (what, frame, code) in cases {
        let mut tcp = raw_socket(&server, &uid).await;
        tcp.write_all(&frame).await.expect("send frame");
        assert_eq!(raw_close_code(&mut tcp).await, code, "{what}");
    }
    // The server carried on.
    assert!(server.healthy().await);
}

#[tokio::test]
async fn websocket_ping_flood_from_a_client_that_never_reads_is_held_back() {
    use tokio::io::AsyncWriteExt;
    let server = Server::config().memory().spawn().await;
    let uid = uid("wsflood");
    server.connect(&uid, ":p").await;
    let before = server.rss_kib();
    let mut tcp = raw_socket(&server, &uid).await;
    // 125-byte pings, never reading a pong: the server answers each before it reads the
    // next, so once the socket buffers are full it stops reading and our writes stall.
    let ping = client_frame(0x89, &[b'x'; 125]);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 8192)
        .collect();
    let mut sent = 0usize;
    let flood = async {
        while sent < 256 * 1024 * 1024 {
            tcp.write_all(&burst).await.expect("write pings");
            sent += burst.len();
        }
    };
    let stalled = tokio::time::timeout(std::time::Duration::from_secs(3), flood)
        .await
        .is_err();
    assert!(
        stalled,
        "256 MB of pings went through without being held back"
    );
    let grown_kib = server.rss_kib().saturating_sub(before);
    assert!(
        grown_kib < 32 * 1024,
        "the server grew by {grown_kib} KiB after {} MB of pings",
        sent / (1024 * 1024)
    );
    assert!(server.healthy().await);
}

#[tokio::test]
async fn websocket_pings_every_heartbeat() {
    let server = Server::start_args(&["--heartbeat", "200ms"]).await;
    let uid = uid("wsheartbeat");
    server.connect(&uid, ":p").await;
    let mut socket = open(&server, &uid, "").await;
    let window = Duration::from_millis(2100);
    let mut pings = 0;
    // Ends only if the socket closes.
    let read = async {
        while let Some(frame) = socket.next().await {
            match frame.expect("frame") {
                Message::Ping(payload) => {
                    assert!(payload.is_empty(), "{payload:?}");
                    pings += 1;
                }
                other => panic!("only pings on an idle socket, got {other:?}"),
            }
        }
    };
    let closed = tokio::time::timeout(window, read).await;
    assert!(closed.is_err(), "the socket closed within {window:?}");
    // Ten heartbeats fit in 2.1 s; a busy machine may delay a few, never add one.
    assert!((7..=10).contains(&pings), "{pings} pings in {window:?}");
}

/// Reads server frames (unmasked; any length) until a close; returns the text frames
/// before it and the close's code and reason. Panics if the stream ends first or a
/// frame is cut.
async fn frames_until_close(tcp: &mut tokio::net::TcpStream) -> (Vec<Value>, u16, String) {
    use tokio::io::AsyncReadExt;
    let mut texts = Vec::new();
    loop {
        let mut header = [0u8; 2];
        within("a frame header", WAIT, tcp.read_exact(&mut header))
            .await
            .unwrap_or_else(|e| panic!("a frame header after {} frames: {e}", texts.len()));
        let len = match header[1] & 0x7F {
            126 => {
                let mut len = [0u8; 2];
                tcp.read_exact(&mut len).await.expect("16-bit length");
                usize::from(u16::from_be_bytes(len))
            }
            127 => {
                let mut len = [0u8; 8];
                tcp.read_exact(&mut len).await.expect("64-bit length");
                usize::try_from(u64::from_be_bytes(len)).expect("length fits")
            }
            short => usize::from(short),
        };
        let mut payload = vec![0u8; len];
        within("a frame payload", WAIT, tcp.read_exact(&mut payload))
            .await
            .unwrap_or_else(|e| panic!("frame {} was cut: {e}", texts.len()));
        match header[0] {
            0x81 => texts.push(
                serde_json::from_slice(&payload)
                    .unwrap_or_else(|e| panic!("text frame {} is JSON: {e}", texts.len())),
            ),
            0x88 => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                return (texts, code, reason);
            }
            0x89 => {}
            other => panic!(
                "unexpected frame type {other:#x} after {} frames",
                texts.len()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_closes_4008_a_reader_that_takes_nothing_for_the_slow_reader_timeout() {
    use tokio::io::AsyncWriteExt;
    // From the environment (the flag is `--slow-reader-timeout`, the file key
    // `slow_reader_timeout`).
    let server = Server::config()
        .memory()
        .env("DOLORES_SLOW_READER_TIMEOUT", "500ms")
        .spawn()
        .await;
    let uid = uid("wsslow");
    server.connect(&uid, ":p").await;
    // A socket with a small receive buffer that reads nothing after the handshake.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small buffer");
    let mut tcp = socket
        .connect(server.addr().parse().expect("addr"))
        .await
        .expect("connect");
    let request = format!(
        "GET /ws/{uid} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr()
    );
    tcp.write_all(request.as_bytes()).await.expect("send head");
    common::eventually("the socket open", WAIT, || async {
        (server.stats().await["streams"]["ws"] == 1).then_some(())
    })
    .await;
    // Large messages until the server's writes stall for longer than the timeout.
    let padding = "w".repeat(16 * 1024);
    let said = format!("closing the WebSocket of {uid} with 4008");
    let mut published = 0;
    while !server.stderr_text().contains(&said) {
        assert!(
            published < 2000,
            "{published} messages and no 4008; log:\n{}",
            server.stderr_text()
        );
        let updates: Vec<(&str, Value)> = (0..16).map(|_| (":p", json!(padding))).collect();
        server.publish_batch(&updates).await;
        published += 16;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read it all now: whole frames in order (the one the timeout cut is finished), then
    // the close frame with the reason.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut byte)
            .await
            .expect("the 101 answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let (texts, code, reason) = frames_until_close(&mut tcp).await;
    assert_eq!((code, reason.as_str()), (4008, "slow reader"));
    assert!(!texts.is_empty(), "some frames came before the timeout");
    let ids = ids(&texts);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {ids:?}"
    );
    assert!(
        texts.iter().all(|t| t["message"] == json!(padding)),
        "whole messages"
    );
    common::eventually("the socket counted closed", WAIT, || async {
        (server.stats().await["streams"]["ws"] == 0).then_some(())
    })
    .await;
}
