//! What the server shows a browser besides the listener endpoints: the status page at
//! `/` (with its "try it" panel), `/status` (the public numbers it draws, and the last
//! five minutes of them for its chart), and the JavaScript client at `/dolores.js`.
//! All of it is compiled into the binary: no build step, no CDN.

use axum::extract::State;
use axum::http::header;
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::error::ApiError;
use crate::node::Node;

/// The status page.
const INDEX_HTML: &str = include_str!("index.html");
/// The browser client, the same file as `clients/js/dolores.js`.
pub(crate) const DOLORES_JS: &str = include_str!("../../clients/js/dolores.js");

/// `/status` and `/dolores.js` (with CORS: pages of other sites load the client). The
/// page at `/` is routed by the server, which knows where the base path puts it.
pub(crate) fn router(node: &Node) -> Router<Node> {
    Router::new()
        .route(
            "/dolores.js",
            get(client_js).options(crate::cors::preflight),
        )
        .layer(middleware::from_fn_with_state(
            node.origins.clone(),
            crate::cors::layer,
        ))
        .route("/status", get(status))
}

/// `GET /`.
pub(crate) async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// `GET /dolores.js`.
pub(crate) async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DOLORES_JS,
    )
        .into_response()
}

/// `GET /status`: the same counts as `/api/v1/stats` (and `/metrics`), without a key,
/// and the last five minutes of published and delivered counts for the chart.
pub(crate) async fn status(State(state): State<Node>) -> Result<Response, ApiError> {
    let mut status = state.stats().await?;
    status["history"] = state.metrics.history_json();
    Ok(Json(status).into_response())
}
