//! `dolores serve`: binds, finds or makes the api key, and runs the server until
//! Ctrl-C or SIGTERM.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::node::Node;
use crate::server;

/// Runs the server with `settings`.
pub(crate) async fn run(mut settings: Settings) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(colours())
        .init();
    let tls = settings
        .tls
        .clone()
        .map(crate::tls::Tls::new)
        .transpose()
        .context("cannot serve HTTPS")?;
    let listener = bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    // The address as bound (a port 0 resolved): the server's own origin is made of it.
    settings.listen = addr.to_string();
    let (api_key, generated) = api_key(&settings, addr)?;
    let where_stored = if let Some(url) = &settings.redis {
        format!(
            "redis engine at {url}, keys under {}:",
            settings.redis_prefix
        )
    } else if settings.memory {
        "in memory, nothing on disk".to_owned()
    } else {
        format!("embedded store in {}", settings.data.display())
    };
    let key_file = settings.api_key_file();
    let memory = settings.memory;
    // With a base path, that is where everything is, the status page included.
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{}", settings.base_path);
    let state = Node::open(settings, api_key.clone()).await?;
    let shutdown = shutdown_signal();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "dolores {} listening on {url} ({where_stored})",
        env!("CARGO_PKG_VERSION")
    )?;
    if generated {
        let kept = if memory {
            "for this run only".to_owned()
        } else {
            format!("kept in {}", key_file.display())
        };
        writeln!(out, "api key: {api_key} ({kept})")?;
        writeln!(
            out,
            "try it: curl -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \
             -d '{{\"track\":\":data\",\"message\":\"hello\"}}' {url}/api/v1/update"
        )?;
    }
    out.flush()?;
    drop(out);
    crate::notify::ready(&format!("listening on {url}"));
    server::run(listener, state, tls, shutdown).await
}

/// Colours in the log only on a terminal, and not there either when `NO_COLOR` is set
/// (no-color.org): a log in a file or the journal must not fill with escape codes.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Room for connections the kernel has accepted but the server has not taken yet: a
/// push server sees thousands of browsers reconnect at once after a restart, and the
/// usual 1,024 overflows (each overflow costs a client a one-second SYN retry).
const LISTEN_BACKLOG: u32 = 8192;

async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
}

/// The api key: given, or (on loopback only) read from or made in the data dir.
fn api_key(settings: &Settings, addr: SocketAddr) -> anyhow::Result<(String, bool)> {
    if let Some(key) = &settings.api_key {
        return Ok((key.clone(), false));
    }
    if !addr.ip().is_loopback() {
        bail!(
            "refusing to listen on {addr} without an api key: set --api-key or DOLORES_API_KEY \
             (only a loopback address gets a generated one)"
        );
    }
    let key = hex(&rand::random::<[u8; 24]>());
    if settings.memory {
        return Ok((key, true));
    }
    let path = settings.api_key_file();
    if let Ok(stored) = std::fs::read_to_string(&path) {
        let stored = stored.trim();
        if !stored.is_empty() {
            return Ok((stored.to_owned(), true));
        }
    }
    std::fs::create_dir_all(&settings.data)
        .with_context(|| format!("cannot create {}", settings.data.display()))?;
    write_private(&path, &key).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((key, true))
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)?
        .write_all(format!("{text}\n").as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a supervisor may send SIGTERM as soon as the server
/// says it listens, and that must be a clean shutdown, not the default action (death).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        let term = async {
            match term {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            () = term => {},
        }
        crate::notify::stopping();
    }
}
