//! Many listeners, concurrent publishers: every listener gets each of its messages
//! exactly once, and all listeners see them in the same (publish) order.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{Server, Sse, positions, uid};
use futures_util::future::join_all;
use serde_json::json;

const LISTENERS: usize = 200;
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 50;

/// Opens one stream per uid and waits until the server counts them all.
async fn open_all(server: &Server, uids: &[String]) -> Vec<Sse> {
    let streams = join_all(uids.iter().map(|u| server.listen(u))).await;
    common::eventually("every stream to be open", common::WAIT, || async {
        (server.stats().await["streams"]["sse"] == uids.len()).then_some(())
    })
    .await;
    streams
}

/// Publishes from `PUBLISHERS` tasks at once, each to the track `track_of(p, i)`;
/// returns every acknowledged (id, track).
async fn publish_concurrently(
    server: &Arc<Server>,
    track_of: fn(usize, usize) -> String,
) -> Vec<(u64, String)> {
    let tasks = (0..PUBLISHERS).map(|p| {
        let server = server.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_PUBLISHER {
                let track = track_of(p, i);
                let id = server.publish(&track, json!({"p": p, "i": i})).await;
                acked.push((id, track));
            }
            acked
        })
    });
    let mut all: Vec<(u64, String)> = join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("publisher"))
        .collect();
    all.sort_unstable();
    all
}

/// Reads `expected.len()` events from every stream and checks each got exactly
/// `expected` (ids in increasing order, so every pair of listeners agrees on order).
async fn check_all(streams: Vec<Sse>, expected: Vec<Vec<u64>>) {
    let checks = streams
        .into_iter()
        .zip(expected)
        .enumerate()
        .map(|(n, (mut sse, want))| {
            tokio::spawn(async move {
                let events = sse.events(want.len()).await;
                assert_eq!(positions(&events), want, "listener {n}");
                sse.assert_no_event(std::time::Duration::from_millis(100))
                    .await;
            })
        });
    for result in join_all(checks).await {
        result.expect("a listener's check");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_listeners_on_one_track_each_get_every_message_once_in_the_same_order() {
    let server = Arc::new(Server::start().await);
    let uids: Vec<String> = (0..LISTENERS).map(|_| uid("fan")).collect();
    join_all(uids.iter().map(|u| server.connect(u, ":room"))).await;
    let streams = open_all(&server, &uids).await;
    let acked = publish_concurrently(&server, |_, _| ":room".to_owned()).await;
    assert_eq!(acked.len(), PUBLISHERS * PER_PUBLISHER);
    let ids: Vec<u64> = acked.iter().map(|(id, _)| *id).collect();
    let unique: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "every publish got its own id");
    check_all(streams, vec![ids; LISTENERS]).await;
    let stats = server.stats().await;
    let delivered = stats["messages_delivered"].as_u64().expect("count");
    assert_eq!(
        delivered,
        (LISTENERS * PUBLISHERS * PER_PUBLISHER) as u64,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_listeners_on_several_tracks_each_get_exactly_their_tracks_messages() {
    const TRACKS: usize = 5;
    let track = |t: usize| format!("rooms/{t}");
    let server = Arc::new(Server::start().await);
    let uids: Vec<String> = (0..LISTENERS).map(|_| uid("multi")).collect();
    // Listener n is on two tracks, n % 5 and (n / 5) % 5 (some on just one).
    let subscriptions: Vec<BTreeSet<String>> = (0..LISTENERS)
        .map(|n| {
            [track(n % TRACKS), track((n / TRACKS) % TRACKS)]
                .into_iter()
                .collect()
        })
        .collect();
    let connects = uids
        .iter()
        .zip(&subscriptions)
        .flat_map(|(u, tracks)| tracks.iter().map(move |t| (u, t)));
    join_all(connects.map(|(u, t)| server.connect(u, t))).await;
    // Half the listeners open their stream before the publishing, half after: the
    // queue and live delivery must agree.
    let (early, late) = uids.split_at(LISTENERS / 2);
    let mut streams = open_all(&server, early).await;
    let acked = publish_concurrently(&server, |p, i| {
        format!("rooms/{}", (p * 7 + i * 3) % TRACKS)
    })
    .await;
    streams.extend(join_all(late.iter().map(|u| server.listen(u))).await);
    let expected: Vec<Vec<u64>> = subscriptions
        .iter()
        .map(|tracks| {
            acked
                .iter()
                .filter(|(_, t)| tracks.contains(t))
                .map(|(id, _)| *id)
                .collect()
        })
        .collect();
    assert!(expected.iter().all(|e| !e.is_empty()));
    check_all(streams, expected).await;
}
