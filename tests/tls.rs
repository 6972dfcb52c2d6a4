//! HTTPS: the real binary with `--tls-cert` / `--tls-key`, certificates made by the test
//! (rcgen). HTTP/2 and HTTP/1.1 on one port, SSE and WebSocket over TLS, a renewed
//! certificate picked up without dropping streams, bad files refused at start and on
//! reload, and plain HTTP to the TLS port answered and closed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{Server, WAIT, eventually, uid};
use futures_util::StreamExt;
use rcgen::{CertificateParams, CertifiedIssuer, IsCa, KeyPair, date_time_ymd};
use reqwest::Version;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};

/// A certificate authority the test trusts, which signs server certificates.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate and its key, in PEM, and the certificate's DER to recognise it.
struct Leaf {
    cert: String,
    key: String,
    der: Vec<u8>,
}

type Ymd = (i32, u8, u8);

impl Authority {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("ca cert"),
        }
    }

    fn leaf(&self) -> Leaf {
        self.leaf_valid((2020, 1, 1), (4000, 1, 1))
    }

    fn leaf_valid(&self, from: Ymd, until: Ymd) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf params");
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

/// Where the server's certificate files live (replaced in place to renew).
struct Files {
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Files {
    fn new(leaf: &Leaf) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = Self {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            _dir: dir,
        };
        files.renew(leaf);
        files
    }

    /// Replaces both files the way certbot does: new files renamed over the old.
    fn renew(&self, leaf: &Leaf) {
        replace(&self.cert, &leaf.cert);
        replace(&self.key, &leaf.key);
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

fn replace(path: &Path, text: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, text).expect("write pem");
    std::fs::rename(&fresh, path).expect("rename pem");
}

fn roots(authorities: &[&Authority]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for authority in authorities {
        roots.add(authority.der()).expect("add root");
    }
    roots
}

fn client_config(authorities: &[&Authority], alpn: &[&[u8]]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots(authorities))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// An HTTPS client trusting `authorities`; HTTP/2 where the server offers it.
fn https_client(authorities: &[&Authority], http1_only: bool) -> reqwest::Client {
    let alpn: &[&[u8]] = if http1_only {
        &[b"http/1.1"]
    } else {
        &[b"h2", b"http/1.1"]
    };
    common::install_crypto();
    let builder = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(authorities, alpn))
        .timeout(Duration::from_secs(30));
    let builder = if http1_only {
        builder.http1_only()
    } else {
        builder
    };
    builder.build().expect("https client")
}

/// The certificate a new TLS handshake with the server gets.
async fn served_certificate(server: &Server, authorities: &[&Authority]) -> Vec<u8> {
    let connector = TlsConnector::from(Arc::new(client_config(authorities, &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (_, session) = tls.get_ref();
    session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|cert| cert.as_ref().to_vec())
        .expect("a peer certificate")
}

async fn start_tls(files: &Files) -> Server {
    Server::config().memory().args(files.args()).start().await
}

/// As a process: for the tests that read the log.
async fn spawn_tls(files: &Files) -> Server {
    Server::config().memory().args(files.args()).spawn().await
}

async fn api(client: &reqwest::Client, server: &Server, path: &str, body: Value) -> Value {
    let response = client
        .post(format!("{}/api/v1/{path}", server.url()))
        .bearer_auth(server.api_key())
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e:?}"));
    assert_eq!(response.status(), 200, "POST {path}");
    response.json().await.expect("json answer")
}

/// Reads an SSE body until `count` `data:` lines have come; returns them.
async fn sse_data(response: reqwest::Response, count: usize) -> Vec<Value> {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut found = Vec::new();
    let read = async {
        while found.len() < count {
            let chunk = body.next().await.expect("stream open").expect("chunk");
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                for line in block.lines() {
                    if let Some(data) = line.strip_prefix("data: ") {
                        found.push(serde_json::from_str(data).expect("json data"));
                    }
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("events in time");
    found
}

#[tokio::test]
async fn https_serves_http2_and_http1_on_one_port() {
    let ca = Authority::new("test ca");
    let files = Files::new(&ca.leaf());
    let server = start_tls(&files).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());

    for (http1_only, version) in [(false, Version::HTTP_2), (true, Version::HTTP_11)] {
        let client = https_client(&[&ca], http1_only);
        for path in ["/healthz", "/dolores.js", "/", "/status"] {
            let response = client
                .get(format!("{}{path}", server.url()))
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e:?}"));
            assert_eq!(response.status(), 200, "GET {path} over {version:?}");
            assert_eq!(response.version(), version, "GET {path}");
        }
        let answer = api(
            &client,
            &server,
            "update",
            json!({"track": ":t", "message": 1}),
        )
        .await;
        assert!(answer["id"].is_string(), "{answer}");
    }
}

#[tokio::test]
async fn many_sse_streams_share_one_http2_connection() {
    let ca = Authority::new("test ca");
    let files = Files::new(&ca.leaf());
    let server = start_tls(&files).await;
    // One client: reqwest keeps a single HTTP/2 connection per origin, as a browser does.
    let client = https_client(&[&ca], false);
    let uids: Vec<String> = (0..20).map(|_| uid("h2tab")).collect();
    let mut streams = Vec::new();
    for uid in &uids {
        api(
            &client,
            &server,
            "connect",
            json!({"uid": uid, "track": ":h2"}),
        )
        .await;
        let response = client
            .get(format!("{}/listen/{uid}", server.url()))
            .send()
            .await
            .expect("open stream");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), Version::HTTP_2);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        streams.push(response);
    }
    eventually("20 open SSE streams", WAIT, || async {
        let stats: Value = client
            .get(format!("{}/api/v1/stats", server.url()))
            .bearer_auth(server.api_key())
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (stats["streams"]["sse"] == 20).then_some(())
    })
    .await;
    for n in 0..3 {
        api(
            &client,
            &server,
            "update",
            json!({"track": ":h2", "message": n}),
        )
        .await;
    }
    for stream in streams {
        let data = sse_data(stream, 3).await;
        let got: Vec<&Value> = data.iter().map(|d| &d["message"]).collect();
        assert_eq!(got, [&json!(0), &json!(1), &json!(2)]);
    }
}

#[tokio::test]
async fn websocket_over_tls_delivers() {
    let ca = Authority::new("test ca");
    let files = Files::new(&ca.leaf());
    let server = start_tls(&files).await;
    let client = https_client(&[&ca], false);
    let uid = uid("wss");
    api(
        &client,
        &server,
        "connect",
        json!({"uid": uid, "track": ":w"}),
    )
    .await;
    let connector = TlsConnector::from(Arc::new(client_config(&[&ca], &[b"http/1.1"])));
    let tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let url = format!("wss://{}/ws/{uid}", server.addr());
    let (mut socket, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("websocket over TLS");
    api(
        &client,
        &server,
        "update",
        json!({"track": ":w", "message": "over tls"}),
    )
    .await;
    let frame = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await.expect("socket open").expect("frame") {
                tokio_tungstenite::tungstenite::Message::Text(text) => break text,
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame in time");
    let event: Value = serde_json::from_str(&frame).expect("json frame");
    assert_eq!(event["message"], "over tls");
}

#[tokio::test]
async fn a_renewed_certificate_is_used_without_dropping_open_streams() {
    let old_ca = Authority::new("old ca");
    let new_ca = Authority::new("new ca");
    let old = old_ca.leaf();
    let new = new_ca.leaf();
    let files = Files::new(&old);
    let server = spawn_tls(&files).await;
    let both = [&old_ca, &new_ca];
    assert_eq!(served_certificate(&server, &both).await, old.der);

    let client = https_client(&both, false);
    let uid = uid("renew");
    api(
        &client,
        &server,
        "connect",
        json!({"uid": uid, "track": ":r"}),
    )
    .await;
    let stream = client
        .get(format!("{}/listen/{uid}", server.url()))
        .send()
        .await
        .expect("open stream");

    files.renew(&new);
    eventually("the renewed certificate served", WAIT, || async {
        (served_certificate(&server, &both).await == new.der).then_some(())
    })
    .await;
    // The stream opened under the old certificate is still open and delivering.
    let fresh = https_client(&[&new_ca], false);
    api(
        &fresh,
        &server,
        "update",
        json!({"track": ":r", "message": "after renewal"}),
    )
    .await;
    let data = sse_data(stream, 1).await;
    assert_eq!(data[0]["message"], "after renewal");
    assert!(
        server.stderr_text().contains("TLS certificate reloaded"),
        "{}",
        server.stderr_text()
    );
}

#[tokio::test]
async fn a_bad_renewal_keeps_the_old_certificate_and_warns() {
    let ca = Authority::new("test ca");
    let other = Authority::new("other ca");
    let leaf = ca.leaf();
    let files = Files::new(&leaf);
    let server = spawn_tls(&files).await;

    // A key that is not the certificate's: half a renewal.
    replace(&files.key, &other.leaf().key);
    eventually("a warning about the bad renewal", WAIT, || async {
        server
            .stderr_text()
            .contains("not reloaded, keeping the old one")
            .then_some(())
    })
    .await;
    assert_eq!(served_certificate(&server, &[&ca]).await, leaf.der);
    // Garbage in the certificate file: the same.
    replace(&files.cert, "not a certificate\n");
    eventually("a second warning", WAIT, || async {
        (server.stderr_text().matches("not reloaded").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(served_certificate(&server, &[&ca]).await, leaf.der);
    let client = https_client(&[&ca], false);
    let answer = client
        .get(format!("{}/healthz", server.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(answer.status(), 200);
}

/// Runs `dolores serve` with `args` and returns its exit status and stderr.
async fn refused(args: &[String]) -> String {
    let output = tokio::time::timeout(
        WAIT,
        common::command()
            .args([
                "serve",
                "--memory",
                "--listen",
                "127.0.0.1:0",
                "--api-key",
                "k",
            ])
            .args(args)
            .output(),
    )
    .await
    .expect("exits in time")
    .expect("run dolores");
    assert!(!output.status.success(), "started with {args:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn unusable_certificates_are_refused_at_start() {
    let ca = Authority::new("test ca");
    let good = Files::new(&ca.leaf());
    let other = Files::new(&ca.leaf());

    let missing = vec![
        "--tls-cert".into(),
        good.cert
            .with_file_name("missing.pem")
            .display()
            .to_string(),
        "--tls-key".into(),
        good.key.display().to_string(),
    ];
    let e = refused(&missing).await;
    assert!(
        e.contains("cannot read") && e.contains("missing.pem"),
        "{e}"
    );
    assert_eq!(e.matches("No such file").count(), 1, "cause said once: {e}");

    let mismatched = vec![
        "--tls-cert".into(),
        good.cert.display().to_string(),
        "--tls-key".into(),
        other.key.display().to_string(),
    ];
    let e = refused(&mismatched).await;
    assert!(e.contains("does not go with"), "{e}");

    let swapped = vec![
        "--tls-cert".into(),
        good.key.display().to_string(),
        "--tls-key".into(),
        good.cert.display().to_string(),
    ];
    let e = refused(&swapped).await;
    assert!(e.contains("no certificate in it"), "{e}");

    let expired = Files::new(&ca.leaf_valid((2020, 1, 1), (2021, 1, 1)));
    let e = refused(&expired.args()).await;
    assert!(e.contains("expired"), "{e}");

    let future = Files::new(&ca.leaf_valid((3000, 1, 1), (3001, 1, 1)));
    let e = refused(&future.args()).await;
    assert!(e.contains("not valid before"), "{e}");

    let alone = vec!["--tls-cert".into(), good.cert.display().to_string()];
    let e = refused(&alone).await;
    assert!(e.contains("--tls-key"), "{e}");
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_answered_and_closed() {
    let ca = Authority::new("test ca");
    let files = Files::new(&ca.leaf());
    let server = start_tls(&files).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("https_required"), "{answer}");
}
