//! What the server shows a browser besides the listener endpoints: the status page at
//! `/` (with its "try it" panel), `/status` (the public numbers it draws, and the last
//! five minutes of them for its chart), and the JavaScript client at `/dolores.js`.
//! All of it is compiled into the binary: no build step, no CDN.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

use crate::error::ApiError;
use crate::server::AppState;

/// The status page.
const INDEX_HTML: &str = include_str!("index.html");
/// The browser client, the same file as `clients/js/dolores.js`.
pub const DOLORES_JS: &str = include_str!("../../clients/js/dolores.js");

/// `GET /`.
pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// `GET /dolores.js`.
pub async fn client_js() -> Response {
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
pub async fn status(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut status = crate::api::stats_json(&state).await?;
    status["history"] = state.metrics.history_json();
    Ok(axum::Json(status).into_response())
}
