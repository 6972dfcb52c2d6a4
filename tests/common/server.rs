//! [`Server`]: a `dolores serve` on a loopback port, in one of two modes.
//!
//! - **In this process** ([`Server::start`], the default): the server's own code on a
//!   thread and runtime of its own (`in_process`). For the API and the transports.
//! - **As a process** ([`Server::spawn`]): the real binary (`process`). For what only a
//!   process has: `kill -9`, SIGTERM and its exit code, its log lines and what it
//!   prints, `DOLORES_*` variables, a config file found by itself.
//!
//! Both take the same [`ServerConfig`] and flags, and answer the same calls.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;

use super::API_KEY;
use super::http::{install_crypto, plain_tls};
use super::in_process::{self, InProcess};
use super::process;
use super::wait::WAIT;

/// How to start a server.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    /// `--memory` instead of a data dir.
    pub(crate) memory: bool,
    /// `--api-key` (none: let the server generate one).
    pub(crate) api_key: Option<String>,
    /// Extra command-line arguments.
    pub(crate) args: Vec<String>,
    /// Extra environment variables.
    pub(crate) env: Vec<(String, String)>,
    /// Pass only `args`: no `--listen`, `--data`/`--memory` or `--api-key` (the test
    /// sets them some other way, like a config file or the environment).
    pub(crate) bare: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            memory: false,
            api_key: Some(API_KEY.to_owned()),
            args: Vec::new(),
            env: Vec::new(),
            bare: false,
        }
    }
}

impl ServerConfig {
    /// Adds command-line arguments.
    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds an environment variable.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// In memory, nothing on disk.
    pub(crate) fn memory(mut self) -> Self {
        self.memory = true;
        self
    }

    /// Without `--api-key`.
    pub(crate) fn no_api_key(mut self) -> Self {
        self.api_key = None;
        self
    }

    /// Passes only the given arguments; `api_key` is the key the server will use (set
    /// by a config file or the environment), `None` when it generates one.
    pub(crate) fn bare(mut self, api_key: Option<&str>) -> Self {
        self.bare = true;
        self.api_key = api_key.map(str::to_owned);
        self
    }

    /// Starts the server in this process.
    pub(crate) async fn start(self) -> Server {
        Server::start_with(self).await
    }

    /// Starts the server as a process of the binary.
    pub(crate) async fn spawn(self) -> Server {
        Server::spawn_with(self).await
    }

    /// The flags of `dolores serve` (the defaults `bare` leaves out, then `args`).
    fn serve_args(&self, dir: &Path) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if !self.bare {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
            if self.memory {
                args.push("--memory".into());
            } else {
                args.extend(["--data".into(), dir.join("store").into_os_string()]);
            }
            if let Some(key) = &self.api_key {
                args.extend(["--api-key".into(), key.into()]);
            }
        }
        args.extend(self.args.iter().map(OsString::from));
        args
    }
}

/// Whether a [`Server`] runs in this process or as a process of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    InProcess,
    Process,
}

/// A running `dolores serve` on a loopback port, stopped (in process) or killed (a
/// process) when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    config: ServerConfig,
    mode: Mode,
    data: Arc<tempfile::TempDir>,
    /// The running server in this process (until stopped).
    in_process: Option<InProcess>,
    /// The running process (until killed or terminated).
    child: Option<Child>,
    addr: String,
    https: bool,
    api_key: String,
    /// What the process printed on stdout before serving.
    stdout_lines: Vec<String>,
    /// What the process logged.
    stderr: Arc<Mutex<String>>,
    client: reqwest::Client,
}

impl Server {
    /// A server in this process with the defaults: a fresh data dir and [`API_KEY`].
    pub(crate) async fn start() -> Server {
        ServerConfig::default().start().await
    }

    /// A server in this process with extra arguments.
    pub(crate) async fn start_args(args: &[&str]) -> Server {
        ServerConfig::default()
            .args(args.iter().copied())
            .start()
            .await
    }

    /// A process of the binary with the defaults: a fresh data dir and [`API_KEY`].
    pub(crate) async fn spawn() -> Server {
        ServerConfig::default().spawn().await
    }

    /// A process of the binary with extra arguments.
    pub(crate) async fn spawn_args(args: &[&str]) -> Server {
        ServerConfig::default()
            .args(args.iter().copied())
            .spawn()
            .await
    }

    /// The settings to start from.
    pub(crate) fn config() -> ServerConfig {
        ServerConfig::default()
    }

    /// Starts a server in this process as `config` says.
    pub(crate) async fn start_with(config: ServerConfig) -> Server {
        let only_a_process = if !config.env.is_empty() {
            Some("environment variables")
        } else if config.bare {
            Some("a bare command line")
        } else if config.api_key.is_none() {
            Some("a generated api key (it is printed)")
        } else {
            None
        };
        if let Some(what) = only_a_process {
            panic!("{what}: only a process has that; start the server with .spawn()");
        }
        Server::new(config, Mode::InProcess).await
    }

    /// Starts a process of the binary as `config` says.
    pub(crate) async fn spawn_with(config: ServerConfig) -> Server {
        Server::new(config, Mode::Process).await
    }

    async fn new(config: ServerConfig, mode: Mode) -> Server {
        install_crypto();
        let mut server = Server {
            config,
            mode,
            data: Arc::new(tempfile::tempdir().expect("temp dir")),
            in_process: None,
            child: None,
            addr: String::new(),
            https: false,
            api_key: String::new(),
            stdout_lines: Vec::new(),
            stderr: Arc::default(),
            // Without the system's roots: reading them took ~27 ms, most of a start,
            // and the HTTPS tests bring their own.
            client: reqwest::Client::builder()
                .tls_backend_preconfigured(plain_tls())
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        };
        server.run().await;
        server
    }

    /// Starts the server in its mode, on a new port.
    async fn run(&mut self) {
        let args = self.config.serve_args(self.data.path());
        match self.mode {
            Mode::InProcess => {
                let key = self.config.api_key.clone().expect("checked at start");
                let started = in_process::start(&args, key.clone(), self.data.clone()).await;
                self.in_process = Some(started.server);
                self.addr = started.addr.to_string();
                self.https = started.https;
                self.api_key = key;
            }
            Mode::Process => {
                self.stderr = Arc::default();
                let spawned = process::spawn(
                    self.data.path(),
                    &args,
                    &self.config.env,
                    self.config.api_key.is_none(),
                    self.stderr.clone(),
                )
                .await;
                self.child = Some(spawned.child);
                self.addr = spawned.addr;
                self.https = spawned.https;
                self.api_key = match (&self.config.api_key, spawned.generated_key) {
                    (Some(key), _) => key.clone(),
                    (None, Some(generated)) => generated,
                    (None, None) => unreachable!("a generated key is read when none is given"),
                };
                self.stdout_lines = spawned.stdout_lines;
            }
        }
    }

    /// The server's working directory (kept across restarts, deleted when the server is
    /// dropped).
    pub(crate) fn work_dir(&self) -> &Path {
        self.data.path()
    }

    /// The data dir passed with `--data` (unless bare or in memory).
    pub(crate) fn store_dir(&self) -> PathBuf {
        self.data.path().join("store")
    }

    /// `host:port`.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://host:port` (`https://` when the server serves HTTPS).
    pub(crate) fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The api key the backend API takes.
    pub(crate) fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The shared HTTP client (30 s timeout per request).
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Panics unless the server is a process: `what` needs one.
    #[track_caller]
    fn process_only(&self, what: &str) {
        assert!(
            self.mode == Mode::Process,
            "{what}: only a process has that; start the server with Server::spawn or .spawn()"
        );
    }

    /// What the process printed on stdout before serving.
    #[track_caller]
    pub(crate) fn stdout_lines(&self) -> &[String] {
        self.process_only("what the server printed");
        &self.stdout_lines
    }

    /// What the process logged so far.
    #[track_caller]
    pub(crate) fn stderr_text(&self) -> String {
        self.process_only("the server's log");
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The running process.
    #[track_caller]
    fn child(&self) -> &Child {
        self.process_only("a process id");
        self.child.as_ref().expect("the server is running")
    }

    /// The server's process id.
    #[track_caller]
    pub(crate) fn pid(&self) -> u32 {
        self.child().id().expect("the server is running")
    }

    /// The server's resident memory in KiB, from /proc.
    #[track_caller]
    pub(crate) fn rss_kib(&self) -> u64 {
        process::rss_kib(self.pid())
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and reaps it.
    pub(crate) async fn kill9(&mut self) {
        self.child();
        process::kill9(self.child.take().expect("running")).await;
    }

    /// Sends SIGTERM and returns the exit status (panics if the server takes longer
    /// than `limit` to exit).
    pub(crate) async fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        self.child();
        process::terminate(self.child.take().expect("running"), limit).await
    }

    /// Sends SIGTERM and returns the exit status.
    pub(crate) async fn terminate(&mut self) -> ExitStatus {
        self.terminate_within(WAIT).await
    }

    /// Stops the server gracefully, in either mode (a process gets SIGTERM), and waits
    /// until it has flushed its store and ended; panics if it ends in an error.
    pub(crate) async fn stop(&mut self) {
        match self.mode {
            Mode::InProcess => {
                let server = self.in_process.take().expect("the server is running");
                if let Err(e) = server.stop().await {
                    panic!("the server ended in an error: {e}");
                }
            }
            Mode::Process => {
                let status = self.terminate().await;
                assert!(status.success(), "the server ended with {status:?}");
            }
        }
    }

    /// Starts the server again with the same settings and data dir (on a new port).
    /// It must be stopped first (see [`Server::stop`], [`Server::kill9`],
    /// [`Server::terminate`]).
    pub(crate) async fn restart(&mut self) {
        assert!(
            self.child.is_none() && self.in_process.is_none(),
            "stop the server before restarting it"
        );
        self.run().await;
    }
}
