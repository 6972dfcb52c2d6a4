//! What `dolores bench` prints: a report for people, or (`--json`) one JSON object
//! with the same numbers for scripts.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Transport;

/// The whole run.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    /// The run's id: in every uid and track name of the run.
    pub(super) run: String,
    /// The servers, as given.
    pub(super) servers: Vec<String>,
    /// How listeners received.
    pub(super) transport: Transport,
    /// Listeners asked for.
    pub(super) listeners: usize,
    /// Tracks.
    pub(super) tracks: usize,
    /// Tracks per listener.
    pub(super) tracks_per_listener: usize,
    /// Publishers.
    pub(super) publishers: usize,
    /// Messages asked for.
    pub(super) messages: u64,
    /// Messages per request.
    pub(super) batch: usize,
    /// The fixed rate, if any (messages/s).
    pub(super) rate: Option<f64>,
    /// Source addresses the listeners connected from.
    pub(super) source_addrs: Vec<String>,
    /// Whether everything finished before `--timeout`.
    pub(super) complete: bool,
    /// Whether `--timeout` cut the run short.
    pub(super) timed_out: bool,
    /// Wall time of the whole run.
    pub(super) elapsed_s: f64,
    /// Subscribing the listeners (absent with `--no-connect`).
    pub(super) setup: Option<Setup>,
    /// Opening the streams.
    pub(super) connections: Connections,
    /// Publishing.
    pub(super) publish: Publish,
    /// Receiving.
    pub(super) deliveries: Deliveries,
    /// End-to-end latency: publisher's send to listener's read.
    pub(super) latency_ms: Quantiles,
    /// Expected messages that never came.
    pub(super) loss: u64,
    /// Messages a listener got more than once.
    pub(super) duplicates: u64,
    /// Messages a listener got that were not for it (or not benchmark messages).
    pub(super) misroutes: u64,
    /// Messages that came after a later one of the same publisher.
    pub(super) reordered: u64,
    /// Reset events (the server could not replay).
    pub(super) resets: u64,
    /// Streams that ended before the run did.
    pub(super) drops: u64,
    /// The first few errors.
    pub(super) errors: Vec<String>,
    /// The server's CPU time per phase (with `--server-pid`).
    pub(super) server_cpu: Option<super::cpu::CpuReport>,
}

/// Subscribing the listeners through the backend API.
#[derive(Debug, Serialize)]
pub(super) struct Setup {
    /// `connect` calls made.
    pub(super) subscriptions: u64,
    /// How long they took.
    pub(super) seconds: f64,
}

/// Opening the streams.
#[derive(Debug, Serialize)]
pub(super) struct Connections {
    /// Streams open.
    pub(super) made: u64,
    /// Streams that could not open.
    pub(super) failed: u64,
    /// From the first attempt until the last stream was open.
    pub(super) seconds: f64,
    /// Time to open one stream.
    pub(super) connect_ms: Quantiles,
}

/// Publishing.
#[derive(Debug, Serialize)]
pub(super) struct Publish {
    /// Messages the server accepted.
    pub(super) ok: u64,
    /// Messages whose request failed.
    pub(super) failed: u64,
    /// Requests sent.
    pub(super) requests: u64,
    /// From the first request to the last answer.
    pub(super) seconds: f64,
    /// `ok` per second over that span.
    pub(super) per_second: f64,
}

/// Receiving.
#[derive(Debug, Serialize)]
pub(super) struct Deliveries {
    /// Accepted messages × the open listeners they were for.
    pub(super) expected: u64,
    /// Distinct expected messages received.
    pub(super) unique: u64,
    /// Everything received.
    pub(super) received: u64,
    /// From the first publish to the last distinct delivery.
    pub(super) seconds: f64,
    /// `unique` per second over that span.
    pub(super) per_second: f64,
}

/// A distribution, in milliseconds.
#[derive(Debug, Serialize)]
pub(super) struct Quantiles {
    /// How many values.
    pub(super) samples: u64,
    /// Mean.
    pub(super) mean: f64,
    /// Median.
    pub(super) p50: f64,
    /// 90th percentile.
    pub(super) p90: f64,
    /// 99th percentile.
    pub(super) p99: f64,
    /// 99.9th percentile.
    pub(super) p999: f64,
    /// Largest.
    pub(super) max: f64,
}

fn ms(us: f64) -> f64 {
    us.round() / 1000.0
}

impl Quantiles {
    /// From a histogram of µs.
    pub(super) fn of(h: &Histogram<u64>) -> Self {
        let q = |q: f64| ms(h.value_at_quantile(q) as f64);
        Self {
            samples: h.len(),
            mean: ms(h.mean()),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: ms(h.max() as f64),
        }
    }
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Report {
    /// Whether nothing went wrong.
    pub(super) fn clean(&self) -> bool {
        self.complete
            && self.loss == 0
            && self.duplicates == 0
            && self.misroutes == 0
            && self.reordered == 0
            && self.resets == 0
            && self.drops == 0
            && self.connections.failed == 0
            && self.publish.failed == 0
    }

    /// The report for people.
    pub(super) fn human(&self) -> String {
        let mut out = String::new();
        let rate = match self.rate {
            Some(rate) => format!("at {rate}/s"),
            None => "as fast as answered".to_owned(),
        };
        let batch = if self.batch > 1 {
            format!(" in batches of {}", self.batch)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "dolores bench {}: {} {} on {} ({} each), {} from {} {rate}{batch}, {}",
            self.run,
            plural(self.listeners as u64, "listener", "listeners"),
            self.transport.name(),
            plural(self.tracks as u64, "track", "tracks"),
            self.tracks_per_listener,
            plural(self.messages, "message", "messages"),
            plural(self.publishers as u64, "publisher", "publishers"),
            plural(self.servers.len() as u64, "server", "servers"),
        );
        if let Some(setup) = &self.setup {
            let _ = writeln!(
                out,
                "  setup        {} in {:.3} s",
                plural(setup.subscriptions, "subscription", "subscriptions"),
                setup.seconds
            );
        }
        let c = &self.connections;
        let sources = if self.source_addrs.is_empty() {
            String::new()
        } else {
            format!(", from {}", self.source_addrs.join(" "))
        };
        let _ = writeln!(
            out,
            "  connections  {} of {} open in {:.3} s ({} failed; one takes p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms{sources})",
            c.made,
            self.listeners,
            c.seconds,
            c.failed,
            c.connect_ms.p50,
            c.connect_ms.p99,
            c.connect_ms.max
        );
        let p = &self.publish;
        let _ = writeln!(
            out,
            "  publishes    {} ok, {} failed, {} requests in {:.3} s = {}/s",
            p.ok, p.failed, p.requests, p.seconds, p.per_second
        );
        let d = &self.deliveries;
        let _ = writeln!(
            out,
            "  deliveries   {} of {} expected ({} received) in {:.3} s = {}/s",
            d.unique, d.expected, d.received, d.seconds, d.per_second
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            out,
            "  latency      p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (mean {:.3} ms, {} samples)",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.samples
        );
        let _ = writeln!(
            out,
            "  checks       loss {}  duplicates {}  misroutes {}  reordered {}  resets {}  drops {}",
            self.loss, self.duplicates, self.misroutes, self.reordered, self.resets, self.drops
        );
        if let Some(cpu) = &self.server_cpu {
            let per = |v: Option<f64>, what: &str| {
                v.map(|v| format!(" = {v:.2} µs per {what}"))
                    .unwrap_or_default()
            };
            let _ = writeln!(
                out,
                "  server CPU   subscribe {:.2} s, open {:.2} s, publish+deliver {:.2} s{} (pids {:?})",
                cpu.subscribe_s,
                cpu.open_s,
                cpu.publish_deliver_s,
                per(cpu.us_per_delivery, "delivery"),
                cpu.pids
            );
        }
        for error in &self.errors {
            let _ = writeln!(out, "  error        {error}");
        }
        let verdict = if self.timed_out {
            "TIMED OUT (--timeout): counted what did not come as lost"
        } else if self.clean() {
            "complete, clean"
        } else {
            "complete, NOT clean"
        };
        let _ = writeln!(out, "  {verdict} in {:.3} s", self.elapsed_s);
        out
    }
}
