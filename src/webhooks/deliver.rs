//! The sender: reads the outbox in order and POSTs each event to the app, at least
//! once, in order per lane (a listener, a track), retrying with capped, jittered
//! backoff. It is a task of its own with its own HTTP client: a receiver that is slow,
//! fails or never answers delays only the events behind it in its lane — never a
//! publish, a delivery to a listener, nor the other lanes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, Seq, Stored};
use super::sign;
use crate::metrics::WebhookMetrics;

/// Most lanes sent to at once: enough to keep a slow app busy and to go around a lane
/// whose receiver hangs, few enough that Dolores never floods the app.
pub(crate) const CONCURRENCY: usize = 16;
/// Most events read from the outbox and not yet sent: what the sender holds in memory
/// (bodies are small), and how far it can look ahead past a stuck lane.
pub(crate) const WINDOW: usize = 1024;
/// The first wait after a failed try; each further failure doubles it, up to the
/// `webhook_max_backoff` setting.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How often the sender renews (or tries to take) its lease on a shared outbox.
pub(crate) const LEASE_EVERY: Duration = Duration::from_secs(1);
/// How often the sender looks for events it was not woken for (another node's, on a
/// shared outbox; or after a failed read): a quarter second adds little to an event's
/// delay and costs one cheap read.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(250);
/// A failing receiver is reported at most this often, not once per try.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// What every send needs.
#[derive(Debug)]
pub(crate) struct Target {
    /// Where events go.
    pub(crate) url: reqwest::Url,
    /// The HMAC key.
    pub(crate) secret: String,
    /// The HTTP client, with the `webhook_timeout` per request.
    pub(crate) http: reqwest::Client,
    /// The longest wait between two tries of one event.
    pub(crate) max_backoff: Duration,
    /// Counters.
    pub(crate) metrics: Arc<WebhookMetrics>,
    /// When a failure was last reported.
    reported: Mutex<Option<Instant>>,
}

impl Target {
    /// A target for `url`, signing with `secret`.
    pub(crate) fn new(
        url: reqwest::Url,
        secret: String,
        timeout: Duration,
        max_backoff: Duration,
        metrics: Arc<WebhookMetrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect is the app's mistake to see in the log, not to follow: the
            // body and its signature would go somewhere not configured.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dolores/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            url,
            secret,
            http,
            max_backoff,
            metrics,
            reported: Mutex::new(None),
        })
    }

    /// Tries once: `Err` says why it failed.
    async fn try_send(&self, body: &str) -> Result<(), String> {
        let now = crate::engine::now_ms() / 1000;
        let response = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::HEADER, sign::signature(&self.secret, now, body))
            .body(body.to_owned())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the app answered {status}"))
        }
    }

    /// Sends one event until the app takes it, or until it is dropped from the
    /// outbox past its bound (checked before each try: it may have waited long).
    async fn send(&self, outbox: &dyn Outbox, event: &Stored) {
        let mut failures = 0u32;
        loop {
            // When the outbox cannot say, send: at least once.
            if !outbox.contains(event.seq).await.unwrap_or(true) {
                return;
            }
            match self.try_send(&event.entry.body).await {
                Ok(()) => {
                    self.metrics.delivered.inc();
                    return;
                }
                Err(why) => {
                    self.metrics.failed.inc();
                    self.report(&why);
                }
            }
            tokio::time::sleep(backoff(failures, self.max_backoff)).await;
            failures = failures.saturating_add(1);
        }
    }

    fn report(&self, why: &str) {
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            *reported = Some(Instant::now());
            tracing::warn!(
                "webhook to {} failed: {why}; retrying with backoff (said at most once a minute)",
                self.url
            );
        }
    }
}

/// reqwest's error with its causes (its own text leaves them out).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "no answer within webhook_timeout".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The wait after `failures` failed tries (0 after the first): doubling from
/// [`FIRST_BACKOFF`], capped at `max`, then a random half of it taken off, so that
/// many lanes failing at once do not retry at once.
pub(crate) fn backoff(failures: u32, max: Duration) -> Duration {
    let full = FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(20))
        .min(max);
    full.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// The events read and not yet sent, by lane.
#[derive(Debug, Default)]
struct Lanes {
    waiting: HashMap<String, VecDeque<Stored>>,
    /// Lanes with a waiting event and none being sent, in the order they became so.
    ready: VecDeque<String>,
    /// Lanes with an event being sent.
    busy: HashSet<String>,
    /// Events read and not sent.
    held: usize,
}

impl Lanes {
    fn add(&mut self, event: Stored) {
        self.held += 1;
        let lane = event.entry.lane.clone();
        let queue = self.waiting.entry(lane.clone()).or_default();
        if queue.is_empty() && !self.busy.contains(&lane) {
            self.ready.push_back(lane);
        }
        queue.push_back(event);
    }

    fn next(&mut self) -> Option<Stored> {
        let lane = self.ready.pop_front()?;
        let event = self.waiting.get_mut(&lane)?.pop_front()?;
        self.busy.insert(lane);
        Some(event)
    }

    fn done(&mut self, lane: &str) {
        self.held = self.held.saturating_sub(1);
        self.busy.remove(lane);
        match self.waiting.get(lane) {
            Some(queue) if !queue.is_empty() => self.ready.push_back(lane.to_owned()),
            _ => {
                self.waiting.remove(lane);
            }
        }
    }
}

/// Runs the sender until `stop`.
pub(crate) async fn run(
    outbox: Arc<dyn Outbox>,
    target: Arc<Target>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut leased = false;
    let mut next_lease = tokio::time::Instant::now();
    let mut read_after: Seq = 0;
    let mut lanes = Lanes::default();
    let mut sending: JoinSet<(String, Seq)> = JoinSet::new();
    let mut sent: Vec<Seq> = Vec::new();
    loop {
        if tokio::time::Instant::now() >= next_lease {
            let held = outbox.lease().await.unwrap_or(false);
            if leased && !held {
                // Another node sends now: what is read here is its to send.
                sending.abort_all();
                while sending.join_next().await.is_some() {}
                lanes = Lanes::default();
                read_after = 0;
            }
            leased = held;
            next_lease = tokio::time::Instant::now() + LEASE_EVERY;
            // On a shared outbox other nodes send and write: every node's gauge
            // follows the cluster's count, not only what it did itself.
            if let Ok(len) = outbox.len().await {
                target.metrics.pending.set(len as i64);
            }
        }
        if leased && lanes.held < WINDOW {
            match outbox.read(read_after, WINDOW - lanes.held).await {
                Ok(events) => {
                    for event in events {
                        read_after = event.seq;
                        lanes.add(event);
                    }
                }
                Err(e) => tracing::warn!("cannot read the webhook outbox: {e}"),
            }
        }
        while sending.len() < CONCURRENCY {
            let Some(event) = lanes.next() else { break };
            let (target, outbox) = (target.clone(), outbox.clone());
            sending.spawn(async move {
                target.send(&*outbox, &event).await;
                (event.entry.lane, event.seq)
            });
        }
        let poll =
            tokio::time::sleep_until(next_lease.min(tokio::time::Instant::now() + POLL_EVERY));
        tokio::select! {
            () = stop.cancelled() => break,
            () = wake.notified() => {}
            Some(done) = sending.join_next(), if !sending.is_empty() => {
                let mut done = Some(done);
                while let Some(finished) = done {
                    if let Ok((lane, seq)) = finished {
                        lanes.done(&lane);
                        sent.push(seq);
                    }
                    done = sending.try_join_next();
                }
            }
            () = poll => {}
        }
        if !sent.is_empty() {
            // Removed after the app has them: a crash in between sends them again
            // (at least once), never loses them.
            if let Err(e) = outbox.remove(std::mem::take(&mut sent)).await {
                tracing::warn!("cannot remove sent events from the webhook outbox: {e}");
            }
            if let Ok(len) = outbox.len().await {
                target.metrics.pending.set(len as i64);
            }
        }
    }
    sending.abort_all();
    outbox.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let max = Duration::from_secs(10);
        for failures in 0..40 {
            let full = FIRST_BACKOFF
                .saturating_mul(1u32 << failures.min(20))
                .min(max);
            let wait = backoff(failures, max);
            assert!(wait >= full / 2 && wait <= full, "{failures}: {wait:?}");
        }
    }

    #[test]
    fn lanes_send_one_event_at_a_time_in_order() {
        let event = |seq: Seq, lane: &str| Stored {
            seq,
            entry: super::super::outbox::Entry {
                lane: lane.into(),
                body: String::new(),
            },
        };
        let mut lanes = Lanes::default();
        lanes.add(event(1, "a"));
        lanes.add(event(2, "a"));
        lanes.add(event(3, "b"));
        assert_eq!(lanes.next().map(|e| e.seq), Some(1));
        assert_eq!(lanes.next().map(|e| e.seq), Some(3));
        assert_eq!(lanes.next().map(|e| e.seq), None, "a is busy with 1");
        lanes.done("a");
        assert_eq!(lanes.next().map(|e| e.seq), Some(2));
        lanes.done("b");
        lanes.done("a");
        assert_eq!(lanes.held, 0);
        assert!(lanes.waiting.is_empty() && lanes.busy.is_empty());
    }
}
