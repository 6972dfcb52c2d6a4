//! Presence on one node: the hub knows every open stream, so it is exact. A task
//! looks at each turn the hub notes and reports the transitions, offline ones after
//! their grace; when the node stops, everyone it reported online is reported gone.
//!
//! After a `kill -9` it cannot say so: the sink keeps who stands reported (the
//! embedded webhook outbox does, in the transaction that writes the events:
//! [`PresenceSink::reported_online`]), and the reporter starts from them as if each had
//! just left: one that comes back within the grace is no news, one that does not is
//! reported offline (its tracks vacated) once the grace runs out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Graces, PresenceEvent, PresenceSink, emit, until};
use crate::hub::Hub;

/// Reports the hub's turns to `sink` until `stop`.
pub(super) async fn report(
    hub: Arc<Hub>,
    sink: Arc<dyn PresenceSink>,
    grace: Duration,
    stop: CancellationToken,
) {
    hub.watch();
    let mut uids = Graces::default();
    let mut tracks = Graces::default();
    // Those a previous run reported online (it was killed) are leaving until they
    // come back.
    let (reported_uids, reported_tracks) = sink.reported_online();
    let leave_at = Instant::now() + grace;
    uids.reported_before(reported_uids, leave_at);
    tracks.reported_before(reported_tracks, leave_at);
    // Streams opened before the watch began are turns too.
    let (open_uids, open_tracks) = hub.open();
    let mut pending = (open_uids, open_tracks);
    loop {
        let now = Instant::now();
        let (turned_uids, turned_tracks) = std::mem::take(&mut pending);
        let mut events = Vec::new();
        let mut gone = Vec::new();
        for uid in turned_uids {
            if hub.online(&uid) > 0 {
                if uids.arrive(&uid) {
                    events.push(PresenceEvent::ListenerOnline {
                        uid: uid.to_string(),
                    });
                }
            } else {
                uids.leave(&uid, now + grace);
            }
        }
        for track in turned_tracks {
            if hub.track_open(&track) {
                if tracks.arrive(&track) {
                    events.push(PresenceEvent::TrackOccupied {
                        track: track.to_string(),
                    });
                }
            } else {
                tracks.leave(&track, now + grace);
            }
        }
        for track in tracks.due(now) {
            gone.push(PresenceEvent::TrackVacated {
                track: track.to_string(),
            });
        }
        for uid in uids.due(now) {
            gone.push(PresenceEvent::ListenerOffline {
                uid: uid.to_string(),
            });
        }
        events.extend(gone);
        emit(&*sink, events);
        let next = [uids.next_due(), tracks.next_due()]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            () = stop.cancelled() => break,
            () = hub.turned() => {}
            () = until(next) => {}
        }
        pending = hub.take_turns();
    }
    // The node stops: whoever was reported here is gone, at once.
    let mut gone: Vec<PresenceEvent> = Vec::new();
    gone.extend(
        tracks
            .reported
            .drain()
            .map(|track| PresenceEvent::TrackVacated {
                track: track.to_string(),
            }),
    );
    gone.extend(
        uids.reported
            .drain()
            .map(|uid| PresenceEvent::ListenerOffline {
                uid: uid.to_string(),
            }),
    );
    emit(&*sink, gone);
}
