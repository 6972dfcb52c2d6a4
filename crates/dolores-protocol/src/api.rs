//! The backend API (`/api/v1/…`): its paths and the limit a batch update must keep.

/// Publish one message or a batch.
pub const UPDATE: &str = "/api/v1/update";
/// Subscribe a listener to a track.
pub const CONNECT: &str = "/api/v1/connect";
/// Unsubscribe a listener from a track, or forget it.
pub const DISCONNECT: &str = "/api/v1/disconnect";
/// One listener's state; `{uid}` stands for the uid.
pub const LISTENER: &str = "/api/v1/listeners/{uid}";
/// Mint a listener token.
pub const TOKENS: &str = "/api/v1/tokens";
/// The node's counts.
pub const STATS: &str = "/api/v1/stats";
/// A track's counts; `{track}` stands for the track, one percent-encoded segment.
pub const TRACK: &str = "/api/v1/tracks/{track}";
/// A track's listeners, a page at a time.
pub const TRACK_LISTENERS: &str = "/api/v1/tracks/{track}/listeners";
/// A track's history, a page at a time.
pub const TRACK_MESSAGES: &str = "/api/v1/tracks/{track}/messages";

/// Most updates in one batch (`{"updates": […]}`): keeps one request's commit (and its
/// memory) bounded. The server refuses more; the bench refuses `--batch` above it.
pub const MAX_BATCH: usize = 1000;
