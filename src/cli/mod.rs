//! The command line: `dolores serve` runs the server; `update`, `connect`,
//! `disconnect`, `listen`, `token`, `track` and `history` are a client of a running
//! server; `bench` is a load generator for servers on loopback (the crate `dolores_bench`).
//! Each command lives in its own file; this one only parses and dispatches.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{ClientOptions, KeyOptions, Options, Settings};

mod client;
mod serve;

/// What `dolores --help` says after the commands: where the settings are listed.
const AFTER_HELP: &str = "\
Settings: each is a flag, a DOLORES_* environment variable and a key in the file given
by --config dolores.toml. `dolores serve --help` lists the server's settings;
`dolores COMMAND --help` lists a command's own options.

The client commands (update, connect, disconnect, listen, token, track, history) talk to the server at
--server URL (DOLORES_SERVER, default http://127.0.0.1:8007) with --api-key
(DOLORES_API_KEY); beside a local server they find the key it generated in
./dolores-data/api-key.";

/// The whole command line.
#[derive(Debug, Parser)]
#[command(
    name = "dolores",
    version,
    about = "A small realtime push server",
    after_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of `Serve` (every setting) costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the server
    Serve {
        #[command(flatten)]
        options: Options,
    },
    /// Publish MESSAGE to TRACK (MESSAGE is JSON if it parses as JSON, else a string)
    Update {
        /// The track, like :data
        track: String,
        /// The message
        message: String,
        /// Send MESSAGE as a string even if it looks like JSON
        #[arg(long)]
        string: bool,
        /// The Idempotency-Key to send (1 to 255 printable ASCII): the update sent again
        /// with it (for at least 24 h) stores nothing new [default: a new one per call,
        /// the same on its retries]
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Subscribe listener UID to TRACK (creates the listener)
    Connect {
        /// The listener's uid
        uid: String,
        /// The track
        track: String,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Unsubscribe UID from TRACK, or forget the listener when TRACK is left out
    Disconnect {
        /// The listener's uid
        uid: String,
        /// The track
        track: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Print each event of listener UID as a JSON line as it arrives; resumes after drops
    Listen {
        /// The listener's uid
        uid: String,
        /// A listener token, where the server requires one
        #[arg(long)]
        token: Option<String>,
        /// Start after this event id instead of where the server last delivered
        #[arg(long)]
        last_event_id: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Print TRACK's subscribers and how many are online (with --listeners, each listener)
    Track {
        /// The track
        track: String,
        /// Then print each listener, {"uid", "online", "last_seen"}, one JSON line each
        #[arg(long)]
        listeners: bool,
        /// With --listeners: only those online
        #[arg(long, requires = "listeners")]
        online: bool,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Print what the server keeps of TRACK, one message a JSON line, oldest first
    History {
        /// The track
        track: String,
        /// Start after this event id
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Make a listener token for UID (signed locally when the token secret is known)
    Token {
        /// The listener's uid
        uid: String,
        /// A track the listener is connected to when it opens its stream (repeatable)
        #[arg(long = "track")]
        tracks: Vec<String>,
        /// How long the token is valid, like 1h
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Secret to sign the token with here, instead of asking the server
        #[arg(long, env = "DOLORES_TOKEN_SECRET", hide_env_values = true)]
        token_secret: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        key: KeyOptions,
    },
    /// Load-test servers on loopback: open listeners, publish, measure delivery
    Bench(dolores_bench::BenchArgs),
    /// Check the embedded store in --data without changing it (stop the server first)
    Check {
        /// The data dir [default: ./dolores-data]
        #[arg(long, env = "DOLORES_DATA")]
        data: Option<std::path::PathBuf>,
    },
    /// Repair the embedded store in --data in place (stop the server first)
    Repair {
        /// The data dir [default: ./dolores-data]
        #[arg(long, env = "DOLORES_DATA")]
        data: Option<std::path::PathBuf>,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the process: the server's HTTPS and the clients'
    // (reqwest is built without one of its own). Fails only if one is already set.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    // One line per panic (a backtrace only when RUST_BACKTRACE asks): the store's
    // panics on a damaged file are caught and answered as errors, and must not fill
    // the log with a backtrace for every failed read.
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::capture();
        match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => {
                eprintln!("dolores: internal error: {info}\n{backtrace}");
            }
            _ => eprintln!("dolores: internal error: {info}"),
        }
    }));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve { options } => serve::run(settings(&options)?).await,
            Command::Update {
                track,
                message,
                string,
                idempotency_key,
                client,
                key,
            } => {
                let target = target(&client, Some(&key), None)?;
                client::update(target, track, message, string, idempotency_key).await
            }
            Command::Connect {
                uid,
                track,
                client,
                key,
            } => client::connect(target(&client, Some(&key), None)?, uid, track).await,
            Command::Disconnect {
                uid,
                track,
                client,
                key,
            } => client::disconnect(target(&client, Some(&key), None)?, uid, track).await,
            Command::Track {
                track,
                listeners,
                online,
                client,
                key,
            } => {
                let target = target(&client, Some(&key), None)?;
                client::track(target, track, listeners, online).await
            }
            Command::History {
                track,
                after,
                client,
                key,
            } => client::history(target(&client, Some(&key), None)?, track, after).await,
            Command::Listen {
                uid,
                token,
                last_event_id,
                client,
            } => client::listen(target(&client, None, None)?, uid, token, last_event_id).await,
            Command::Token {
                uid,
                tracks,
                ttl,
                token_secret,
                client,
                key,
            } => {
                let target = target(&client, Some(&key), token_secret)?;
                client::token(target, uid, tracks, ttl).await
            }
            Command::Bench(args) => dolores_bench::run(args).await,
            Command::Check { data } => check_store(data, false),
            Command::Repair { data } => check_store(data, true),
        }
    });
    // Don't wait for blocking reads still running (a listen that was cut, say).
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

/// `dolores check` and `dolores repair`.
fn check_store(data: Option<std::path::PathBuf>, repair: bool) -> anyhow::Result<()> {
    let dir = data.unwrap_or_else(|| crate::config::DEFAULT_DATA.into());
    let sound = crate::engine::check_embedded(&dir, repair)?;
    match (sound, repair) {
        (true, _) => println!("{}: the store is sound", dir.display()),
        (false, true) => println!("{}: the store was damaged and is repaired", dir.display()),
        (false, false) => {
            anyhow::bail!(
                "{}: the store is damaged but can be repaired: run `dolores repair --data {}`",
                dir.display(),
                dir.display()
            )
        }
    }
    Ok(())
}

fn settings(options: &Options) -> anyhow::Result<Settings> {
    Ok(Settings::resolve(options)?)
}

/// What a client subcommand needs: the settings and where its api key comes from.
fn target(
    client: &ClientOptions,
    key: Option<&KeyOptions>,
    token_secret: Option<String>,
) -> anyhow::Result<client::Target> {
    let settings = Settings::resolve_client(client, key, token_secret)?;
    Ok(client::Target::new(settings, client, key))
}

fn fail(message: String) -> ExitCode {
    eprintln!("dolores: {message}");
    ExitCode::FAILURE
}
