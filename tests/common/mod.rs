//! Helpers shared by the integration tests, one file per concern; everything is
//! re-exported here, so a test says `common::Server`, `common::eventually`, ….
//!
//! - `server` — [`Server`]: `dolores serve` on a loopback port, in this process
//!   ([`Server::start`], the default) or as a process of the binary ([`Server::spawn`],
//!   for kill -9, SIGTERM, log lines, the environment).
//! - `in_process` — the server on its own thread and runtime, stopped gracefully.
//! - `process` — the binary as a child process: [`command`], signals.
//! - `http` — the API calls a test makes on a server, and reading their answers.
//! - `sse` — the event-stream parser and the `/listen/{uid}` client [`Sse`].
//! - `wait` — bounded waits: [`eventually`], [`within`], [`WAIT`].
//! - `redis` — [`RedisProcess`]: a redis-server of the test's own, to kill, pause or fail over.
//!
//! Every wait is bounded ([`WAIT`] unless said otherwise) so that no test can hang: a
//! wait that runs out panics with what it was waiting for.

// Each test file uses some of these helpers, none uses them all.
#![allow(dead_code)]

mod http;
mod in_process;
mod process;
mod redis;
mod server;
mod sse;
mod wait;

#[allow(unused_imports)]
pub(crate) use http::{
    assert_error, id_of, install_crypto, plain_tls, read_json, read_response, strings,
};
#[allow(unused_imports)]
pub(crate) use process::{binary, command};
#[allow(unused_imports)]
pub(crate) use redis::{RedisProcess, free_port};
#[allow(unused_imports)]
pub(crate) use server::{Server, ServerConfig};
#[allow(unused_imports)]
pub(crate) use sse::{Block, Event, Refused, Sse, SseParser, positions, to_event};
#[allow(unused_imports)]
pub(crate) use wait::{WAIT, eventually, within};

/// The api key the tests pass with `--api-key` unless they test something else.
pub(crate) const API_KEY: &str = "test-api-key";

/// A unique, valid uid (8–128 chars of `A-Za-z0-9-_.`).
pub(crate) fn uid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n:04}", std::process::id())
}
