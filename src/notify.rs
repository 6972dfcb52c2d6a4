//! Tells systemd how the server is doing (`Type=notify` units): `READY=1` once the
//! listener is bound and the store is open, `STOPPING=1` when shutdown begins.
//!
//! This is the whole of the `sd_notify` protocol a server needs — one datagram to the
//! Unix socket named by `NOTIFY_SOCKET` — written out by hand rather than linking
//! libsystemd. Without `NOTIFY_SOCKET` (not run by systemd) every call does nothing.
//! A notice that cannot be sent is logged as a warning and never stops the server:
//! systemd then reports the start as timed out, which says more than a refusal would.

#[cfg(unix)]
use std::ffi::OsStr;
#[cfg(unix)]
use std::os::unix::ffi::OsStrExt;
#[cfg(unix)]
use std::os::unix::net::{SocketAddr, UnixDatagram};
#[cfg(unix)]
use std::time::Duration;

/// The variable systemd sets to the address of its notification socket.
pub(crate) const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How long a send may block. systemd reads its socket promptly; a reader that does not
/// must not hold up the server's start or its shutdown.
#[cfg(unix)]
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Says the server is ready; `status` is the one line `systemctl status` shows.
pub(crate) fn ready(status: &str) {
    let status = status.replace('\n', " ");
    let message = format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id());
    warn_on_error(notify(&message));
}

/// Says the server has begun to shut down.
pub(crate) fn stopping() {
    warn_on_error(notify("STOPPING=1\nSTATUS=shutting down"));
}

fn warn_on_error(sent: std::io::Result<bool>) {
    if let Err(e) = sent {
        let to = std::env::var_os(NOTIFY_SOCKET).unwrap_or_default();
        tracing::warn!("cannot notify systemd at {}: {e}", to.to_string_lossy());
    }
}

/// Sends `message` (newline-separated `KEY=value` assignments) to the socket named by
/// `NOTIFY_SOCKET`. `Ok(false)` when the variable is unset or empty.
#[cfg(unix)]
pub(crate) fn notify(message: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET).filter(|t| !t.is_empty()) else {
        return Ok(false);
    };
    let addr = address(&target)?;
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    let sent = socket.send_to_addr(message.as_bytes(), &addr)?;
    if sent != message.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            message.len()
        )));
    }
    Ok(true)
}

/// Without Unix sockets there is no systemd to tell.
#[cfg(not(unix))]
pub fn notify(_message: &str) -> std::io::Result<bool> {
    Ok(false)
}

/// The socket address in `NOTIFY_SOCKET`: a path, or `@name` for a Linux abstract socket.
#[cfg(unix)]
fn address(target: &OsStr) -> std::io::Result<SocketAddr> {
    let bytes = target.as_bytes();
    if bytes.first() == Some(&b'/') {
        return SocketAddr::from_pathname(target);
    }
    if let Some(name) = bytes.strip_prefix(b"@") {
        return abstract_address(name);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "not an absolute path or @abstract socket name (the only kinds supported)",
    ))
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &[u8]) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(all(unix, not(target_os = "linux")))]
fn abstract_address(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        let path = address(OsStr::new("/run/systemd/notify")).expect("a path");
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let named = address(OsStr::new("@dolores/notify")).expect("an abstract name");
            assert_eq!(named.as_abstract_name(), Some(&b"dolores/notify"[..]));
        }
        let refused = address(OsStr::new("vsock:2:1234")).expect_err("not supported");
        assert_eq!(refused.kind(), std::io::ErrorKind::InvalidInput);
        assert!(address(OsStr::new("relative/path")).is_err());
    }
}
