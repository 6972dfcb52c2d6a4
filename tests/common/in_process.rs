//! The server in the test's own process: the `Settings` the binary would make of the
//! same flags, served on a thread of its own with its own multi-thread runtime (so the
//! test's runtime and the server's are separate, as with a real process). A stop is
//! the graceful shutdown the binary runs on SIGTERM; a drop ends it at once, as the
//! process is killed when dropped.
//!
//! No process to spawn and no log line to parse makes a start cheap. What it cannot do:
//! read `DOLORES_*` variables (the environment is shared by every test in the process),
//! show its log or exit code, or be killed — those tests run the binary (`process`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dolores::config::{Options, Settings};
use dolores::tls::Tls;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;

use super::wait::{WAIT, within};

/// Worker threads of the server's runtime: more than one, so that the server's tasks run
/// in parallel as in the binary, and few, because a test may run several nodes.
const SERVER_WORKERS: usize = 2;

/// Room for connections not yet accepted: the binary's (`src/cli/serve.rs`), so that a
/// test opening many connections at once sees what a real server does.
const LISTEN_BACKLOG: u32 = 8192;

/// Longest a stop may take: the server waits up to 5 s for open requests, then flushes
/// the store; past this the test is told (on `stop`) or the thread is left to end on its
/// own (on drop).
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A server running in this process: [`InProcess::stop`] stops it gracefully; dropping
/// it ends it at once, as a killed process ends.
#[derive(Debug)]
pub(super) struct InProcess {
    /// Sending stops the server gracefully.
    stop_tx: Option<oneshot::Sender<()>>,
    /// Dropping ends the server at once: a graceful stop would wait for the clients'
    /// side of open connections (an HTTP/2 connection's, say), which lives on the test's
    /// runtime, blocked in the drop.
    abandon_tx: Option<oneshot::Sender<()>>,
    /// How the server ended: `Err` with what went wrong.
    done_rx: Option<oneshot::Receiver<Result<(), String>>>,
    thread: Option<JoinHandle<()>>,
}

/// A server that started: where it listens, and whether it serves HTTPS.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) server: InProcess,
    pub(super) addr: SocketAddr,
    pub(super) https: bool,
}

/// Starts a server with the flags `args` (as `dolores serve` takes them) and `api_key`.
/// The server's thread holds on to `data` until it has ended, so the data dir outlives
/// the store that writes to it.
pub(super) async fn start(
    args: &[OsString],
    api_key: String,
    data: Arc<tempfile::TempDir>,
) -> Started {
    show_log_in_test_output();
    let settings = settings(args);
    let https = settings.tls.is_some();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (abandon_tx, abandon_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("dolores-server".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(SERVER_WORKERS)
                .thread_name("dolores-server")
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let stop = async move {
                        // Sent or dropped: either way the test is done with the server.
                        let _ = stop_rx.await;
                    };
                    let served = runtime.block_on(async move {
                        tokio::select! {
                            served = serve(settings, api_key, ready_tx, stop) => served,
                            _ = abandon_rx => Ok(()),
                        }
                    });
                    // What is left of the server's tasks ends here (all of them, when
                    // abandoned), and lets go of the store before a restart opens it.
                    drop(runtime);
                    served.map_err(|e| format!("{e:#}"))
                }
                Err(e) => Err(format!("cannot build the server's runtime: {e}")),
            };
            drop(data);
            let _ = done_tx.send(result);
        })
        .expect("spawn the server's thread");
    let mut server = InProcess {
        stop_tx: Some(stop_tx),
        abandon_tx: Some(abandon_tx),
        done_rx: Some(done_rx),
        thread: Some(thread),
    };
    match within("the in-process server to open", WAIT, ready_rx).await {
        Ok(addr) => Started {
            server,
            addr,
            https,
        },
        // It ended before it was ready: say why.
        Err(_) => match server.wait().await {
            Err(e) => panic!("the in-process server did not start: {e}"),
            Ok(()) => panic!("the in-process server ended before it was ready"),
        },
    }
}

/// Opens the node and serves until `stop`: what `dolores serve` does once it has its
/// settings and key, without printing. The one place that names the server's state.
async fn serve(
    mut settings: Settings,
    api_key: String,
    ready_tx: oneshot::Sender<SocketAddr>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = settings.tls.clone().map(Tls::new).transpose()?;
    let listener = bind(&settings.listen).await?;
    let addr = listener.local_addr()?;
    // As the binary does: the server's own origin is made of the address as bound.
    settings.listen = addr.to_string();
    let node = dolores::node::Node::open(settings, api_key).await?;
    let _ = ready_tx.send(addr);
    dolores::server::run(listener, node, tls, stop).await
}

async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let addr = tokio::net::lookup_host(listen)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{listen} resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

/// The settings `dolores serve` resolves from `args`. Only the flags count: the
/// `DOLORES_*` variables are the whole test process's, not this server's.
fn settings(args: &[OsString]) -> Settings {
    use clap::{Args, FromArgMatches};
    let command = Options::augment_args(clap::Command::new("dolores serve").no_binary_name(true))
        .mut_args(|arg| arg.env(None::<&str>));
    let options = command
        .try_get_matches_from(args)
        .and_then(|matches| Options::from_arg_matches(&matches))
        .unwrap_or_else(|e| panic!("the server's flags {args:?}: {e}"));
    Settings::resolve(&options).unwrap_or_else(|e| panic!("the server's settings {args:?}: {e}"))
}

/// The server's log goes to the test's captured output, which the test runner shows
/// when the test fails. The first server of the process installs it.
fn show_log_in_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

impl InProcess {
    /// Stops the server (open streams end, requests finish, the store is flushed) and
    /// waits until it has; `Err` says what went wrong.
    pub(super) async fn stop(mut self) -> Result<(), String> {
        if let Some(stop_tx) = self.stop_tx.take() {
            let _ = stop_tx.send(());
        }
        self.wait().await
    }

    /// Waits for the server's thread to end.
    async fn wait(&mut self) -> Result<(), String> {
        let done_rx = self.done_rx.take().ok_or("already stopped")?;
        let thread = self.thread.take();
        let result = match tokio::time::timeout(STOP_LIMIT, done_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the server's thread panicked".to_owned()),
            // Left to end on its own.
            Err(_) => return Err(format!("the server did not stop within {STOP_LIMIT:?}")),
        };
        if let Some(thread) = thread {
            // It has sent its result or panicked: at most a moment from its end.
            let _ = thread.join();
        }
        result
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.abandon_tx.take();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Blocking is fine here: the server runs on its own runtime, and ending it
        // takes no help from the test's. Waiting lets its thread delete the data dir
        // before the test process exits.
        let deadline = Instant::now() + STOP_LIMIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}
