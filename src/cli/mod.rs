//! The command line: `dolores serve` runs the server; `update`, `connect`,
//! `disconnect`, `listen` and `token` are a client of a running server; `bench` is a
//! load generator for servers on loopback.
//! Each command lives in its own file; this one only parses and dispatches.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{Options, Settings};

mod bench;
mod client;
mod serve;

/// The whole command line.
#[derive(Debug, Parser)]
#[command(name = "dolores", version, about = "A small realtime push server")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
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
        #[command(flatten)]
        options: Options,
    },
    /// Subscribe listener UID to TRACK (creates the listener)
    Connect {
        /// The listener's uid
        uid: String,
        /// The track
        track: String,
        #[command(flatten)]
        options: Options,
    },
    /// Unsubscribe UID from TRACK, or forget the listener when TRACK is left out
    Disconnect {
        /// The listener's uid
        uid: String,
        /// The track
        track: Option<String>,
        #[command(flatten)]
        options: Options,
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
        options: Options,
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
        #[command(flatten)]
        options: Options,
    },
    /// Load-test servers on loopback: open listeners, publish, measure delivery
    Bench(bench::BenchArgs),
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
                options,
            } => client::update(settings(&options)?, track, message, string).await,
            Command::Connect {
                uid,
                track,
                options,
            } => client::connect(settings(&options)?, uid, track).await,
            Command::Disconnect {
                uid,
                track,
                options,
            } => client::disconnect(settings(&options)?, uid, track).await,
            Command::Listen {
                uid,
                token,
                last_event_id,
                options,
            } => client::listen(settings(&options)?, uid, token, last_event_id).await,
            Command::Token {
                uid,
                tracks,
                ttl,
                options,
            } => client::token(settings(&options)?, uid, tracks, ttl).await,
            Command::Bench(args) => bench::run(args).await,
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

fn fail(message: String) -> ExitCode {
    eprintln!("dolores: {message}");
    ExitCode::FAILURE
}
