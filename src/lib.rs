//! Dolores, a small realtime push server.
//!
//! # Layout
//!
//! Follow a message from `update` to a browser by following the modules:
//!
//! - [`api`] — the backend's HTTP API (`/api/v1/…`): checks input, calls the engine.
//! - [`engine`] — the store: one ordered log, listeners and their cursors; group commit.
//!   `engine::memory` and `engine::logstore` (a segment log for messages, `embedded`'s
//!   redb file for listeners) are the storages; the trait is the seam.
//! - [`hub`] — this node's live fan-out: track → open streams, bounded queues.
//! - [`presence`] — who is online (an open stream on any node), which tracks are
//!   occupied, and their transitions, reported once per cluster to a sink (webhooks).
//! - [`transport`] — the listener side: replay-then-live delivery shared by every
//!   transport; `sse`, `ws` and `poll` each turn it into their wire format.
//! - [`auth`] — api keys and listener tokens.
//! - [`page`] — the status page at `/`, `/status`, and the JS client at `/dolores.js`.
//! - [`node`] — the node: engine, hub, metrics, keys and settings in one handle that
//!   every handler receives. `api`, `transport` and `page` → `node` → `hub`, `engine`.
//! - [`cors`] — which browser pages may listen, and their CORS headers, for every path.
//! - [`server`] — merges the routers of `api`, `transport` and `page`; runs and shuts down.
//! - [`notify`] — tells systemd the server is ready or stopping (`sd_notify`).
//! - [`connection`] — accepts connections: SSE and WebSocket streams served directly on the socket,
//!   everything else through hyper and axum.
//! - [`tls`] — HTTPS: the certificate and key, checked at start and reloaded when renewed.
//! - [`webhooks`] — tells the app when listeners come and go: a durable outbox and a
//!   sender of signed POSTs that never slows a publish.
//! - [`metrics`] — counters for `/metrics` and `/api/v1/stats`.
//! - [`error`] — the one error type of the HTTP edge.
//! - [`proxy`] — behind a reverse proxy: the base path, and whose `X-Forwarded-*`
//!   headers are believed.
//! - [`config`] — settings from flags, `DOLORES_*` variables and `dolores.toml`.
//! - [`names`] — what a track and a uid may be.
//! - [`cli`] — the command line: `serve` and the client subcommands; `bench` runs the
//!   load generator, a crate of its own (`crates/dolores-bench`).
//!
//! What the server and the bench agree on (paths, transports, the batch limit) is in
//! `crates/dolores-protocol`. This crate has no `unsafe`; the bench keeps what it needs.
//!
//! Public are only what the binary and the in-process tests use — `cli`, `config`,
//! `node`, `server`, `tls`, and `proxy` for a setting's type; every other module is the
//! crate's own.

#![forbid(unsafe_code)]

pub(crate) mod api;
pub(crate) mod auth;
pub mod cli;
pub mod config;
pub(crate) mod connection;
pub(crate) mod cors;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod hub;
pub(crate) mod metrics;
pub(crate) mod names;
pub mod node;
pub(crate) mod notify;
pub(crate) mod page;
pub(crate) mod presence;
pub mod proxy;
pub mod server;
pub mod tls;
pub(crate) mod transport;
pub(crate) mod webhooks;
