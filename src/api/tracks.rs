//! The track calls of the backend API: a track's counts, its listeners with who is
//! online, and its history. Thin: names and parameters are checked here, the engine
//! and presence answer.
//!
//! A track exists for as long as anyone is subscribed to it: an unknown track is not
//! an error, it has no subscribers (and perhaps still some history).

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::Position;
use crate::error::{ApiError, ErrorCode};
use crate::names;
use crate::node::Node;

/// Items in a page when the caller does not say: a screenful.
pub(crate) const DEFAULT_PAGE: usize = 100;
/// Most items in one page: bounds one answer's size and the work behind it.
pub(crate) const MAX_PAGE: usize = 1000;
/// Most subscribers looked at for one page of `?online=`: a page of online listeners of
/// a track where few are online may need several reads of the store; past this many
/// the page ends short, with `next` to carry on from (one request stays bounded).
const MAX_SCANNED_PER_PAGE: usize = 10 * MAX_PAGE;
/// Subscribers read per step while counting a track's online ones where presence does
/// not count them itself (several nodes).
const COUNT_STEP: usize = MAX_PAGE;

/// `GET /api/v1/tracks/{track}`: `{"track", "subscribers", "online"}`.
pub(crate) async fn track(
    State(node): State<Node>,
    track: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let track = track_name(track)?;
    let subscribers = node.engine.subscribers(&track, "", 0).await?.count;
    let online = match node.presence.online_in_track(&track) {
        Some(online) => online,
        None => count_online(&node, &track).await?,
    };
    Ok(Json(json!({
        "track": track,
        "subscribers": subscribers,
        "online": online.min(subscribers),
    })))
}

/// Counts the online subscribers of `track` one page of the store at a time.
async fn count_online(node: &Node, track: &str) -> Result<u64, ApiError> {
    let mut online = 0;
    let mut after = String::new();
    loop {
        let page = node.engine.subscribers(track, &after, COUNT_STEP).await?;
        let uids: Vec<String> = page.page.into_iter().map(|(uid, _)| uid).collect();
        let flags = node.presence.online(&uids).await?;
        online += flags.iter().filter(|&&on| on).count() as u64;
        match uids.last() {
            Some(last) if uids.len() == COUNT_STEP => after.clone_from(last),
            _ => return Ok(online),
        }
    }
}

/// The query of `…/listeners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenersQuery {
    /// `true`: only online listeners; `false`: only offline ones; absent: all.
    online: Option<String>,
    /// Most listeners in the page.
    limit: Option<String>,
    /// Start after this uid (the `next` of the previous page).
    after: Option<String>,
}

/// `GET /api/v1/tracks/{track}/listeners?online=&limit=&after=`: the track's listeners
/// ordered by uid, `{"listeners": [{"uid", "online", "last_seen"}], "next"?}`. With
/// `online`, a page may hold fewer than `limit` (see [`MAX_SCANNED_PER_PAGE`]): follow
/// `next` while there is one.
pub(crate) async fn listeners(
    State(node): State<Node>,
    track: Result<Path<String>, PathRejection>,
    query: Result<Query<ListenersQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let track = track_name(track)?;
    let Query(query) = query.map_err(ApiError::from_query)?;
    let limit = parse_limit(query.limit.as_deref())?;
    let want_online = match query.online.as_deref() {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_field(
                ErrorCode::BadRequest,
                format!("\"online\" is true or false, not {other:?}"),
            ));
        }
    };
    let mut after = match query.after {
        Some(uid) if !uid.is_empty() => {
            names::check_uid(&uid).map_err(|e| ApiError::bad_field(ErrorCode::BadUid, e.0))?;
            uid
        }
        _ => String::new(),
    };
    let mut listeners = Vec::new();
    let mut last_kept = String::new();
    let mut scanned = 0;
    let next = 'scan: loop {
        // Unfiltered, one more than asked tells whether another page follows.
        let chunk = match want_online {
            Some(_) => MAX_PAGE,
            None => limit + 1 - listeners.len(),
        };
        let page = node.engine.subscribers(&track, &after, chunk).await?.page;
        let read = page.len();
        scanned += read;
        let uids: Vec<String> = page.iter().map(|(uid, _)| uid.clone()).collect();
        let flags = node.presence.online(&uids).await?;
        for ((uid, seen), online) in page.into_iter().zip(flags) {
            if want_online.is_some_and(|want| want != online) {
                after = uid;
                continue;
            }
            if listeners.len() == limit {
                break 'scan Some(last_kept);
            }
            listeners.push(json!({
                "uid": uid,
                "online": online,
                "last_seen": rfc3339(seen),
            }));
            last_kept.clone_from(&uid);
            after = uid;
        }
        if read < chunk {
            break None;
        }
        if scanned >= MAX_SCANNED_PER_PAGE {
            break Some(after);
        }
    };
    let mut answer = json!({ "listeners": listeners });
    if let Some(next) = next {
        answer["next"] = json!(next);
    }
    Ok(Json(answer))
}

/// The query of `…/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MessagesQuery {
    /// Start after this event id.
    after: Option<String>,
    /// Most messages in the page.
    limit: Option<String>,
}

/// `GET /api/v1/tracks/{track}/messages?after=&limit=`: what the store still keeps of
/// the track, in order, `{"messages": [{"id", "track", "message"}], "next"?, "reset"?}`;
/// `reset` when `after` is older than what is kept (or not a position of this log).
pub(crate) async fn messages(
    State(node): State<Node>,
    track: Result<Path<String>, PathRejection>,
    query: Result<Query<MessagesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let track = track_name(track)?;
    let Query(query) = query.map_err(ApiError::from_query)?;
    let limit = parse_limit(query.limit.as_deref())?;
    let after: Option<Position> = match query.after.as_deref() {
        None | Some("") => None,
        Some(id) => Some(id.parse().map_err(|_| {
            ApiError::bad_field(
                ErrorCode::BadEventId,
                format!("\"after\" must be an event id this server gave out, not {id:?}"),
            )
        })?),
    };
    let mut history = node
        .engine
        .history(&track, after.unwrap_or(0), limit + 1)
        .await?;
    let reset = after.is_some_and(|after| history.is_reset(after));
    let next = (history.messages.len() > limit).then(|| {
        history.messages.truncate(limit);
        history.messages.last().map_or(0, |m| m.pos)
    });
    // Each item is the message's JSON event, built once and shared with the streams.
    let mut body = Vec::with_capacity(64 + history.messages.len() * 64);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in history.messages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&message.json_event());
    }
    body.push(b']');
    if let Some(next) = next {
        body.extend_from_slice(format!(",\"next\":\"{next}\"").as_bytes());
    }
    if reset {
        body.extend_from_slice(b",\"reset\":true");
    }
    body.push(b'}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The `{track}` path segment, decoded and checked.
fn track_name(track: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(track) = track.map_err(|e| ApiError::bad_field(ErrorCode::BadTrack, e.body_text()))?;
    names::check_track(&track).map_err(|e| ApiError::bad_field(ErrorCode::BadTrack, e.0))?;
    Ok(track)
}

/// `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
fn parse_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    match limit {
        None | Some("") => Ok(DEFAULT_PAGE),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_field(
                    ErrorCode::BadLimit,
                    format!("\"limit\" is a whole number from 1 to {MAX_PAGE}, not {text:?}"),
                )
            }),
    }
}

/// A time in ms since the epoch as RFC 3339, to the second (as `/api/v1/listeners`).
fn rfc3339(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}
