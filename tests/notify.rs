//! systemd readiness (`Type=notify`): run by systemd, `dolores serve` sends `READY=1`
//! to `NOTIFY_SOCKET` once its port answers, and `STOPPING=1` when SIGTERM arrives.
//! Here a test plays systemd: it binds the datagram socket and reads what arrives.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{API_KEY, Server, WAIT, within};
use reqwest::StatusCode;
use tokio::net::UnixDatagram;

/// Starts `dolores serve` with `NOTIFY_SOCKET=notify_socket`, reads the notices from
/// `systemd`, and checks the whole conversation: ready only once `/healthz` answers,
/// stopping on SIGTERM, exit 0.
async fn serve_under_fake_systemd(systemd: &UnixDatagram, notify_socket: &str, dir: &Path) {
    let log = std::fs::File::create(dir.join("stderr.log")).expect("log file");
    let mut child = common::command()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
            "--data",
        ])
        .arg(dir.join("store"))
        .env("NOTIFY_SOCKET", notify_socket)
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn dolores serve");
    let pid = child.id().expect("a running server");
    let stderr = || std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();

    let ready = within("READY=1", WAIT, receive(systemd)).await;
    let fields = fields(&ready);
    assert_eq!(fields.get("READY"), Some(&"1"), "{ready:?}; {}", stderr());
    assert_eq!(fields.get("MAINPID"), Some(&pid.to_string().as_str()));
    let url = fields
        .get("STATUS")
        .and_then(|s| s.strip_prefix("listening on "))
        .unwrap_or_else(|| panic!("STATUS names the address: {ready:?}"));

    // Once, no retry: a READY=1 sent before the port is bound and the store open fails here.
    common::install_crypto();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let health = client
        .get(format!("{url}/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}/healthz right after READY=1: {e}"));
    assert_eq!(health.status(), StatusCode::OK);
    let published = client
        .post(format!("{url}/api/v1/update"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({"track": ":data", "message": "ready"}))
        .send()
        .await
        .expect("update");
    assert_eq!(published.status(), StatusCode::OK);

    let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
        panic!("pid {pid} out of range")
    };
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(raw_pid, libc::SIGTERM) }, 0, "SIGTERM");
    let stopping = within("STOPPING=1", WAIT, receive(systemd)).await;
    assert_eq!(fields_of(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    let status = within("the exit", WAIT, child.wait()).await.expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", stderr());
    assert!(
        !stderr().contains("cannot notify"),
        "no warning when systemd listens:\n{}",
        stderr()
    );
}

async fn receive(socket: &UnixDatagram) -> String {
    let mut buffer = vec![0; 4096];
    let n = socket.recv(&mut buffer).await.expect("recv");
    String::from_utf8(buffer[..n].to_vec()).expect("UTF-8 notice")
}

/// The `KEY=value` lines of a notice.
fn fields(notice: &str) -> std::collections::BTreeMap<&str, &str> {
    notice
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect()
}

fn fields_of<'a>(notice: &'a str, key: &str) -> Option<&'a str> {
    fields(notice).get(key).copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_comes_once_the_port_answers_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&path).expect("bind the notify socket");
    let notify_socket = path.to_str().expect("a UTF-8 temp path");
    serve_under_fake_systemd(&systemd, notify_socket, dir.path()).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abstract_notify_socket_works_too() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().expect("temp dir");
    // Unique per run: abstract names live in the network namespace, not the file system.
    let name = format!(
        "dolores-test-notify-{}-{}",
        std::process::id(),
        dir.path().display()
    );
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let systemd = UnixDatagram::from_std(socket).expect("tokio socket");
    serve_under_fake_systemd(&systemd, &format!("@{name}"), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_is_a_warning_not_a_failure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nobody-here.sock");
    let server = Server::config()
        .env(
            "NOTIFY_SOCKET",
            missing.to_str().expect("a UTF-8 temp path"),
        )
        .spawn()
        .await;
    assert!(server.healthy().await, "serves anyway");
    common::eventually("the warning", WAIT, || async {
        server
            .stderr_text()
            .contains("cannot notify systemd")
            .then_some(())
    })
    .await;
}
