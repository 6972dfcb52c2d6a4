//! What the Dolores server and its load generator (`dolores bench`, in
//! `crates/dolores-bench`) must agree on: the paths of the backend API and of the
//! listener endpoints, the transports' names, the batch limit, the header a client
//! resumes with, and where a local server keeps its generated api key.
//!
//! It is a crate of its own because the server's binary runs the bench and the bench
//! cannot depend on the server (Cargo allows no cycle); both depend on this instead.
//! It holds names and numbers only: no I/O but reading the key file, no dependencies,
//! and nothing that is not shared by both sides.

#![forbid(unsafe_code)]

pub mod api;
pub mod local;

/// The header a reconnecting client names its cursor with (`EventSource` sends it by
/// itself); lower case, as HTTP/2 writes header names.
pub const LAST_EVENT_ID_HEADER: &str = "last-event-id";

/// How a listener receives: the three listener endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Server-Sent Events (`GET /listen/{uid}`).
    Sse,
    /// WebSocket (`GET /ws/{uid}`).
    Ws,
    /// Long-polling (`GET /poll/{uid}`).
    Poll,
}

impl Transport {
    /// Every transport, in the order the stats list them.
    pub const ALL: [Transport; 3] = [Transport::Sse, Transport::Ws, Transport::Poll];

    /// Its name in the bench's `--transport`, the stats and the metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Poll => "poll",
        }
    }

    /// The endpoint's path before the uid, like `/listen/`.
    pub const fn prefix(self) -> &'static str {
        match self {
            Transport::Sse => "/listen/",
            Transport::Ws => "/ws/",
            Transport::Poll => "/poll/",
        }
    }

    /// The endpoint as a route, `{uid}` standing for the listener's uid (the spelling
    /// of the contract and of axum's router).
    pub const fn route(self) -> &'static str {
        match self {
            Transport::Sse => "/listen/{uid}",
            Transport::Ws => "/ws/{uid}",
            Transport::Poll => "/poll/{uid}",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_is_its_prefix_and_the_uid() {
        for transport in Transport::ALL {
            assert_eq!(
                transport.route(),
                format!("{}{{uid}}", transport.prefix()),
                "{transport:?}"
            );
        }
    }
}
