//! The `dolores` binary as a child process, for what only a process has: its exit code,
//! its log lines and what it prints, its environment, and being killed with a signal.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::wait::{WAIT, within};

/// The path of the binary under test.
pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dolores"))
}

/// A `dolores` command with no `DOLORES_*` variable inherited from the environment
/// (so the developer's own settings cannot change what a test sees).
pub(crate) fn command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("DOLORES_") {
            command.env_remove(key);
        }
    }
    command.env("NO_COLOR", "1");
    command.stdin(Stdio::null());
    command.kill_on_drop(true);
    command
}

/// A `dolores serve` that printed where it listens.
#[derive(Debug)]
pub(super) struct Spawned {
    /// The process (killed when dropped).
    pub(super) child: Child,
    /// `host:port`.
    pub(super) addr: String,
    /// Whether it serves HTTPS.
    pub(super) https: bool,
    /// The api key it printed, when it generated one.
    pub(super) generated_key: Option<String>,
    /// What it printed on stdout before serving.
    pub(super) stdout_lines: Vec<String>,
}

/// Runs `dolores serve` with `args` and `env` in `dir` (where relative paths, like the
/// default `./dolores-data`, land), and reads its first lines: where it listens and,
/// when `generates_key`, the key it generated. Its log goes to `stderr`.
pub(super) async fn spawn(
    dir: &Path,
    args: &[OsString],
    env: &[(String, String)],
    generates_key: bool,
    stderr: Arc<Mutex<String>>,
) -> Spawned {
    let mut command = command();
    command.current_dir(dir).arg("serve").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn dolores serve");
    let log = child.stderr.take().expect("stderr");
    let sink = stderr.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(log).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = sink.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = match tokio::time::timeout(WAIT, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let status = child.try_wait();
            // Let the log reader catch up with what the server said before it died.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let said = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            panic!(
                "the server printed no first line ({other:?}, status {status:?}); stderr:\n{said}"
            );
        }
    };
    let https = first.contains("listening on https://");
    let addr = first
        .split("listening on http://")
        .nth(1)
        .or_else(|| first.split("listening on https://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
        .to_owned();
    let mut stdout_lines = vec![first];
    let mut generated_key = None;
    if generates_key {
        // The generated key is printed on the next line.
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("api key line in time")
            .expect("read stdout")
            .expect("an api key line");
        generated_key = Some(
            line.strip_prefix("api key: ")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no api key line: {line:?}"))
                .to_owned(),
        );
        stdout_lines.push(line);
    }
    // Keep draining stdout so the server can never block on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Spawned {
        child,
        addr,
        https,
        generated_key,
        stdout_lines,
    }
}

/// Sends `signal` to `child`.
pub(super) fn signal(child: &Child, signal: libc::c_int) {
    let pid = child.id().expect("the server is running");
    let pid = libc::pid_t::try_from(pid).expect("pid fits");
    // SAFETY: sends a signal to our own child process; no memory is touched.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Kills `child` with SIGKILL (no chance to flush anything) and reaps it.
pub(super) async fn kill9(mut child: Child) {
    signal(&child, libc::SIGKILL);
    let status = within("the killed server to exit", WAIT, child.wait())
        .await
        .expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
}

/// Sends SIGTERM to `child` and returns its exit status (panics if it takes longer than
/// `limit` to exit).
pub(super) async fn terminate(mut child: Child, limit: Duration) -> ExitStatus {
    signal(&child, libc::SIGTERM);
    within("the server to exit after SIGTERM", limit, child.wait())
        .await
        .expect("wait")
}

/// The resident memory of process `pid` in KiB, from /proc.
pub(super) fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}
