//! Which browser pages may use the listener endpoints, and the CORS headers they get:
//! decided here, once, for every path — the framework's routes and the streams served
//! directly on the socket.
//!
//! Two lists make the rule:
//!
//! - `public_origins`: the server's own origins, where the pages that use it are served
//!   (itself, or the app behind the same proxy). Without the setting, the origins of the
//!   address it listens on (`http://127.0.0.1:8007`, and `localhost` for a loopback one).
//!   The `Host` a request names is never believed for this: a DNS-rebinding page at
//!   `http://evil.example:8007` that resolves to this server sends a matching `Host`.
//! - `cors_origins`: other sites' pages that may listen (`*`: any). Only these get CORS
//!   headers; a page at a public origin is same-origin and needs none.
//!
//! A browser request (one with `Origin`) from neither list is refused with 403 on
//! `/listen`, `/ws` and `/poll` alike: what a foreign page cannot read it must not be able
//! to cause either (a poll would move the listener's cursor, a stream keep it alive).
//! A request without `Origin` is not a browser page and is not an origin's business.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCode};

/// How long a browser may cache a preflight's answer: an hour spares a round trip on
/// every stream a page opens, and a changed `cors_origins` still takes effect the same
/// day.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(3600);

/// The two lists of allowed origins, normalised (`scheme://host[:port]`, lower case, no
/// default port, no trailing slash) so that they compare with what browsers send.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    public: Vec<String>,
    listed: Vec<String>,
    any: bool,
}

impl Origins {
    /// The origins from the settings: `public_origins` (or, without it, those of the
    /// address the server listens on; `https` when it serves TLS) and `cors_origins`.
    pub(crate) fn new(public: &[String], cors: &[String], listen: &str, https: bool) -> Self {
        let public = if public.is_empty() {
            listen_origins(listen, https)
        } else {
            public.iter().map(|o| normalise(o)).collect()
        };
        Self {
            public,
            listed: cors
                .iter()
                .filter(|o| *o != "*")
                .map(|o| normalise(o))
                .collect(),
            any: cors.iter().any(|o| o == "*"),
        }
    }

    /// Whether `origin` is one of `cors_origins` (`*` lists every origin): a page there
    /// gets CORS headers.
    pub(crate) fn listed(&self, origin: &str) -> bool {
        self.any || self.listed.contains(&normalise(origin))
    }

    /// Whether a page at `origin` may use the listener endpoints.
    pub(crate) fn allowed(&self, origin: &str) -> bool {
        self.listed(origin) || self.public.contains(&normalise(origin))
    }

    /// The server's own origins, for the log line that explains a refusal.
    pub(crate) fn public(&self) -> &[String] {
        &self.public
    }
}

/// The origins a browser sees for a server listening on `listen`: its address, and
/// `localhost` too when that is a loopback address. None for a wildcard address
/// (`0.0.0.0`): the names it is reached by are not known, so they must be configured.
fn listen_origins(listen: &str, https: bool) -> Vec<String> {
    let Ok(addr) = listen.parse::<SocketAddr>() else {
        return Vec::new();
    };
    if addr.ip().is_unspecified() {
        return Vec::new();
    }
    let scheme = if https { "https" } else { "http" };
    let mut origins = vec![normalise(&format!("{scheme}://{addr}"))];
    if addr.ip().is_loopback() {
        origins.push(normalise(&format!("{scheme}://localhost:{}", addr.port())));
    }
    origins
}

/// `origin` the one way origins are compared: lower case, without the scheme's default
/// port or a trailing slash.
fn normalise(origin: &str) -> String {
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    for (scheme, port) in [("http://", ":80"), ("https://", ":443")] {
        if origin.starts_with(scheme)
            && let Some(bare) = origin.strip_suffix(port)
        {
            return bare.to_owned();
        }
    }
    origin
}

/// The request's `Origin`, when it sends one that is text.
fn origin_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("?"))
}

/// Refuses a browser page at an origin in neither list with 403 `origin_not_allowed`.
/// `what` and `client` name the request in the log, which says why: behind a proxy,
/// a page of the app lands here until its origin is in `public_origins`, and the
/// operator needs to see which one.
pub(crate) fn check_origin(
    origins: &Origins,
    headers: &HeaderMap,
    what: &str,
    client: impl std::fmt::Display,
) -> Result<(), ApiError> {
    let Some(origin) = origin_of(headers) else {
        return Ok(());
    };
    if origins.allowed(origin) {
        return Ok(());
    }
    tracing::warn!(
        "refused {what} from {client} at origin {origin:?}: neither one of this server's \
         public_origins {:?} nor in cors_origins",
        origins.public(),
    );
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::OriginNotAllowed,
        "this page's origin is neither one of this server's public_origins nor in cors_origins",
    ))
}

/// The CORS header lines (each ending in CRLF) for a stream answered directly on the
/// socket: the same headers [`layer`] gives a framework answer.
pub(crate) fn header_lines(origins: &Origins, headers: &HeaderMap) -> String {
    match origin_of(headers) {
        Some(origin) if origins.listed(origin) && !origin.contains(['\r', '\n']) => {
            format!("access-control-allow-origin: {origin}\r\nvary: origin\r\n")
        }
        _ => String::new(),
    }
}

/// CORS for the listener endpoints and the JS client on the framework path: a page at
/// a `cors_origins` origin gets its origin echoed (with `Vary: Origin`, as caches must
/// keep one answer per origin), and a preflight from it the methods and headers a
/// listener uses. Any other page gets no CORS header at all, preflight included.
pub(crate) async fn layer(
    State(origins): State<Origins>,
    request: Request,
    next: Next,
) -> Response {
    let origin = origin_of(request.headers())
        .filter(|o| origins.listed(o) && !o.contains(['\r', '\n']))
        .and_then(|o| HeaderValue::from_str(o).ok());
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let Some(origin) = origin else {
        return response;
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    if preflight {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(dolores_protocol::LAST_EVENT_ID_HEADER),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE.as_secs()),
        );
    }
    response
}

/// The answer to an `OPTIONS` that [`layer`] did not answer itself (a page it gives no
/// CORS headers): routed beside each `GET` it guards, since a route without it would
/// answer 405 before any layer ran.
pub(crate) async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_loopback_server_is_its_address_and_localhost() {
        let origins = Origins::new(&[], &[], "127.0.0.1:8007", false);
        assert!(origins.allowed("http://127.0.0.1:8007"));
        assert!(origins.allowed("http://LOCALHOST:8007/"));
        assert!(!origins.allowed("https://127.0.0.1:8007"));
        assert!(!origins.allowed("http://127.0.0.1:8008"));
        // A rebinding page names this server's port on its own name.
        assert!(!origins.allowed("http://evil.example:8007"));
        assert!(!origins.listed("http://127.0.0.1:8007"));
    }

    #[test]
    fn a_wildcard_address_has_no_origin_until_configured() {
        let origins = Origins::new(&[], &[], "0.0.0.0:8007", true);
        assert!(!origins.allowed("https://0.0.0.0:8007"));
        let origins = Origins::new(
            &strings(&["https://app.example"]),
            &[],
            "0.0.0.0:8007",
            true,
        );
        assert!(origins.allowed("https://app.example:443"));
        assert!(!origins.allowed("http://app.example"));
        assert!(!origins.listed("https://app.example"));
    }

    #[test]
    fn cors_origins_are_listed_and_star_lists_all() {
        let origins = Origins::new(&[], &strings(&["https://a.example/"]), "127.0.0.1:1", false);
        assert!(origins.listed("https://a.example"));
        assert!(!origins.listed("https://b.example"));
        let any = Origins::new(&[], &strings(&["*"]), "127.0.0.1:1", false);
        assert!(any.listed("https://b.example") && any.allowed("null"));
    }
}
