//! The CPU time a server on this machine spends in each phase of a run, read from
//! `/proc/PID/stat` (`--server-pid`): subscribing, opening the streams, and publishing
//! and delivering. The last phase over the deliveries is the cost of a delivery, without
//! the setup that a short run is otherwise dominated by.

use serde::Serialize;

/// The processes whose CPU time is summed (a server and its helpers).
#[derive(Debug, Clone, Default)]
pub(super) struct ServerCpu {
    pids: Vec<u32>,
}

/// CPU seconds per phase, and per delivery.
#[derive(Debug, Clone, Serialize)]
pub(super) struct CpuReport {
    /// The processes measured.
    pub(super) pids: Vec<u32>,
    /// Subscribing the listeners (`/api/v1/connect`).
    pub(super) subscribe_s: f64,
    /// Opening the streams (and the settle pause).
    pub(super) open_s: f64,
    /// From the first publish until every delivery came (or the timeout).
    pub(super) publish_deliver_s: f64,
    /// The whole run.
    pub(super) total_s: f64,
    /// `publish_deliver_s` over the distinct deliveries, in microseconds.
    pub(super) us_per_delivery: Option<f64>,
    /// `publish_deliver_s` over the accepted publishes, in microseconds.
    pub(super) us_per_publish: Option<f64>,
}

impl ServerCpu {
    pub(super) fn new(pids: Vec<u32>) -> Self {
        Self { pids }
    }

    /// Whether there is anything to measure.
    pub(super) fn enabled(&self) -> bool {
        !self.pids.is_empty()
    }

    /// The processes' user + system CPU seconds so far (0 with no pids). A process
    /// that is gone counts as 0: the run reports what it could read.
    pub(super) fn seconds(&self) -> f64 {
        self.pids
            .iter()
            .filter_map(|&pid| cpu_ticks(pid))
            .sum::<u64>() as f64
            / clock_ticks()
    }

    /// Checks that every pid can be read, so a typo fails before the run.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        for &pid in &self.pids {
            if cpu_ticks(pid).is_none() {
                anyhow::bail!("--server-pid {pid}: no such process to measure (/proc/{pid}/stat)");
            }
        }
        Ok(())
    }

    /// The report from the samples taken at the phase boundaries.
    pub(super) fn report(
        &self,
        [start, subscribed, opened, delivered]: [f64; 4],
        deliveries: u64,
        publishes: u64,
    ) -> CpuReport {
        let publish_deliver_s = delivered - opened;
        let per = |n: u64| (n > 0).then(|| publish_deliver_s / n as f64 * 1e6);
        CpuReport {
            pids: self.pids.clone(),
            subscribe_s: subscribed - start,
            open_s: opened - subscribed,
            publish_deliver_s,
            total_s: delivered - start,
            us_per_delivery: per(deliveries),
            us_per_publish: per(publishes),
        }
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a configuration value; it has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            return ticks as f64;
        }
    }
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_a_missing_one_is_refused() {
        let own = ServerCpu::new(vec![std::process::id()]);
        assert!(own.check().is_ok());
        // Busy until the kernel has counted at least one tick of this process's CPU.
        let began = std::time::Instant::now();
        let mut x = 0u64;
        while own.seconds() == 0.0 && began.elapsed() < std::time::Duration::from_secs(10) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(own.seconds() > 0.0);
        let gone = ServerCpu::new(vec![u32::MAX - 1]);
        assert!(gone.check().is_err());
        assert_eq!(gone.seconds(), 0.0);
    }

    #[test]
    fn phases_are_differences_of_samples() {
        let r = ServerCpu::new(vec![1]).report([1.0, 1.5, 2.0, 4.0], 1_000_000, 0);
        assert_eq!(
            (r.subscribe_s, r.open_s, r.publish_deliver_s, r.total_s),
            (0.5, 0.5, 2.0, 3.0)
        );
        assert_eq!(r.us_per_delivery, Some(2.0));
        assert_eq!(r.us_per_publish, None);
    }
}
