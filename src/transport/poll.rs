//! `GET /poll/{uid}`: long-polling, for where neither SSE nor WebSocket gets through.
//!
//! A request answers `{"events": […], "last_event_id"}` as soon as at least one event
//! is there (with everything else already waiting), or with no events after `timeout`
//! seconds. Unlike the streams, a poll does not move the listener's delivered cursor
//! when it answers: the *next* request's `last_event_id` acknowledges, so an answer
//! lost on the way is sent again. That is why a page at a foreign origin is refused
//! before anything else (`check_origin`): its poll would acknowledge for the listener.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};

use super::{Delivery, End, ListenRequest};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Transport;
use crate::node::Node;

/// How long a poll waits by default: under the 30 s idle timeout of common proxies.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);
/// Longest wait a client may ask for.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Most events in one answer, so an answer stays a reasonable size.
const MAX_EVENTS: usize = 1000;

/// The `timeout` query parameter: seconds from 0 to [`MAX_TIMEOUT`], fractions allowed;
/// none (or empty) is [`DEFAULT_TIMEOUT`]. Anything else is a 400, never a panic (NaN,
/// infinities and negatives are refused before they become a `Duration`).
pub(crate) fn parse_timeout(timeout: Option<&str>) -> Result<Duration, ApiError> {
    match timeout {
        None | Some("") => Ok(DEFAULT_TIMEOUT),
        Some(t) => t
            .parse::<f64>()
            .ok()
            .filter(|t| (0.0..=MAX_TIMEOUT.as_secs_f64()).contains(t))
            .and_then(|t| Duration::try_from_secs_f64(t).ok())
            .ok_or_else(|| {
                ApiError::bad_field(
                    ErrorCode::BadTimeout,
                    format!(
                        "timeout is a number of seconds from 0 to {}",
                        MAX_TIMEOUT.as_secs()
                    ),
                )
            }),
    }
}

/// `GET /poll/{uid}`: waits for the listener's next events, at most `timeout`.
pub(crate) async fn listen(
    State(state): State<Node>,
    request: ListenRequest,
) -> Result<Response, ApiError> {
    // Before anything else: a poll acknowledges, and a foreign page must not.
    request.check_origin(&state, "a long poll")?;
    let timeout = parse_timeout(request.query.timeout.as_deref())?;
    let mut deliveries = super::open(&state, &request).await?;
    let _open = state.metrics.open_stream(Transport::Poll);
    // The request's cursor acknowledges everything up to it.
    deliveries.ack();
    // What is already queued answers at once, whatever the timeout (even 0); only the
    // wait for live messages is bounded by it.
    let first = match deliveries.ready().await {
        Ok(Some(delivery)) => Some(Ok(delivery)),
        Err(end) => Some(Err(end)),
        Ok(None) => tokio::select! {
            biased;
            () = state.shutdown.cancelled() => None,
            delivery = deliveries.next() => Some(delivery),
            () = tokio::time::sleep(timeout) => None,
        },
    };
    let mut body = BytesMut::from(&b"{\"events\":["[..]);
    let reset = matches!(first, Some(Ok(Delivery::Reset { .. })));
    match first {
        None => {}
        Some(Ok(Delivery::Message(message))) => {
            body.put(message.json_event());
            let mut count = 1;
            while count < MAX_EVENTS {
                let Some(next) = deliveries.take_ready() else {
                    break;
                };
                body.put_u8(b',');
                body.put(next.json_event());
                count += 1;
            }
            state.metrics.delivered(count);
        }
        Some(Ok(Delivery::Reset { .. })) => {}
        Some(Err(End::Forgotten)) => return Err(ApiError::unknown_listener()),
        // Shutting down: an empty answer, as when the wait below is cut by it.
        Some(Err(End::Shutdown)) => {}
        Some(Err(End::Store)) => {
            return Err(crate::engine::EngineError::Storage("replay failed".into()).into());
        }
    }
    if reset {
        body.put(&b"],\"reset\":true,\"last_event_id\":\""[..]);
    } else {
        body.put(&b"],\"last_event_id\":\""[..]);
    }
    body.put(deliveries.cursor().to_string().as_bytes());
    body.put(&b"\"}"[..]);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body.freeze(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_TIMEOUT, MAX_TIMEOUT, parse_timeout};

    #[test]
    fn timeouts_at_the_edges() {
        assert_eq!(parse_timeout(None), Ok(DEFAULT_TIMEOUT));
        assert_eq!(parse_timeout(Some("")), Ok(DEFAULT_TIMEOUT));
        assert_eq!(parse_timeout(Some("0")), Ok(std::time::Duration::ZERO));
        assert_eq!(parse_timeout(Some("-0")), Ok(std::time::Duration::ZERO));
        assert_eq!(parse_timeout(Some("60")), Ok(MAX_TIMEOUT));
        for refused in [
            "NaN", "inf", "-inf", "-1", "60.0001", "1e400", " 1", "0x10", "1s",
        ] {
            assert_eq!(
                parse_timeout(Some(refused)).map_err(|e| e.code.as_str()),
                Err("bad_timeout"),
                "{refused:?}"
            );
        }
    }

    proptest::proptest! {
        /// Any text: no panic; taken exactly when it is a number of seconds in range.
        #[test]
        fn any_timeout_is_a_duration_in_range_or_a_400(t in "\\PC{0,12}|-?[0-9]{0,3}(\\.[0-9]{0,4})?(e-?[0-9]{1,3})?") {
            let number = t.parse::<f64>().ok().filter(|n| (0.0..=60.0).contains(n));
            match parse_timeout(Some(&t)) {
                Ok(d) => {
                    proptest::prop_assert!(t.is_empty() || number.is_some(), "took {:?}", t);
                    proptest::prop_assert!(d <= MAX_TIMEOUT);
                }
                Err(e) => {
                    proptest::prop_assert!(number.is_none(), "refused {:?}", t);
                    proptest::prop_assert_eq!(e.code, "bad_timeout");
                    proptest::prop_assert_eq!(e.status.as_u16(), 400);
                }
            }
        }
    }
}
