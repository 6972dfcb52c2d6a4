//! Bounded waits: every wait in a test ends, by [`WAIT`] unless said otherwise, and a
//! wait that runs out panics with what it was waiting for.

use std::time::{Duration, Instant};

/// The longest any single wait in a test may take.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Waits until `check` returns `Some`, polling every 20 ms, at most `within`.
pub(crate) async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `future` with a deadline; panics naming `what` when it runs out.
pub(crate) async fn within<T>(
    what: &str,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}
