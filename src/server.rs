//! The server: the routes each part offers, merged into one app, and the accept loop
//! that serves them until shutdown, then shuts down in order: stop accepting, end every
//! open stream (clients reconnect elsewhere or later and resume), let in-flight
//! requests finish, flush the store.
//!
//! Requests flow one way: `api`, `transport` and `page` each offer a `router()` and use
//! the [`Node`]; none of them knows this module.

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::Redirect;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::error::{ApiError, ErrorCode};
use crate::node::Node;
use crate::tls::Tls;
use crate::{api, connection, page, transport};

/// Longest the server waits for open requests after a shutdown signal before it
/// flushes the store and exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The routes, without a socket (tests can call it directly).
pub fn app(node: Node) -> Router {
    let routes = Router::new()
        .merge(api::router(&node))
        .merge(transport::router(&node))
        .merge(page::router(&node));
    let base = node.settings.base_path.as_str();
    let routes = if base.is_empty() {
        routes.route("/", get(page::index))
    } else {
        // The page at `{base}/`: what it fetches is relative to it. `{base}` alone is
        // sent there, relatively, so that it works whatever the proxy put in front.
        let last = base.rsplit('/').next().unwrap_or_default();
        let to_page = format!("{last}/");
        Router::new()
            .nest(base, routes)
            .route(&format!("{base}/"), get(page::index))
            .route(
                base,
                get(move || async move { Redirect::permanent(&to_page) }),
            )
    };
    routes
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such endpoint",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .with_state(node)
}

/// Serves on `listener` (HTTPS when `tls` is given) until `shutdown` resolves, then
/// shuts down in order.
pub async fn run(
    listener: TcpListener,
    node: Node,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = app(node.clone());
    if let Some(tls) = &tls {
        tls.watch(node.shutdown.clone());
    }
    let connections = TaskTracker::new();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut last_accept_warning: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(tls) = &tls {
                        connections.spawn(connection::serve_tls(
                            stream,
                            peer,
                            tls.acceptor.clone(),
                            node.clone(),
                            router.clone(),
                            graceful.watcher(),
                        ));
                    } else {
                        connections.spawn(connection::serve(
                            stream,
                            peer,
                            node.clone(),
                            router.clone(),
                            graceful.watcher(),
                        ));
                    }
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin, and
                    // say so at most once a second, not once per try.
                    if last_accept_warning.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!("accept failed: {e}");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    tracing::info!("shutting down: closing open streams");
    drop(listener);
    node.shutdown.cancel();
    connections.close();
    let drained = async {
        graceful.shutdown().await;
        connections.wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        tracing::warn!("requests still open after {SHUTDOWN_GRACE:?}; closing anyway");
    }
    node.presence.close().await;
    node.engine.close().await;
    if let Some(webhooks) = &node.webhooks {
        webhooks.close().await;
    }
    tracing::info!("store flushed; bye");
    Ok(())
}
