//! Counters and round latencies of one test run. Pure logic, no Python.
//!
//! The hot path never touches these directly: each thread counts into its own slot and adds
//! its counts here in batches (see `engine`). Round latencies go into an HDR histogram behind
//! a per-run lock, once per round.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Counts a thread adds in one batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub hooked: u64,
    /// Of `hooked`: generator points (yields, resumptions) and iteration steps.
    pub generator: u64,
    pub iteration: u64,
    pub yields: u64,
    pub delays: u64,
    pub delay_ns: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        *self == Batch::default()
    }
}

pub struct RunStats {
    threads: AtomicU64,
    foreign_threads: AtomicU64,
    executions: AtomicU64,
    hooked: AtomicU64,
    generator: AtomicU64,
    iteration: AtomicU64,
    yields: AtomicU64,
    delays: AtomicU64,
    delay_ns: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

/// A point-in-time copy of [`RunStats`].
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// `thread_enter` calls.
    pub threads: u64,
    /// Threads that reached a hook without `thread_enter`.
    pub foreign_threads: u64,
    /// `round_start` calls: one per thread per round, i.e. executions of the test body.
    pub executions: u64,
    /// `record_round` calls.
    pub rounds: u64,
    pub hooked: u64,
    /// Of `hooked`: generator points (yields, resumptions) and iteration steps.
    pub generator: u64,
    pub iteration: u64,
    pub yields: u64,
    pub delays: u64,
    /// Sum of the requested delay lengths.
    pub delay_ns: u64,
    /// Round latency percentiles and maximum, microseconds (0 when no round was recorded).
    pub round_p50_us: u64,
    pub round_p99_us: u64,
    pub round_max_us: u64,
}

/// Longest round the histogram resolves: one hour; longer rounds are clamped to it.
const MAX_ROUND_US: u64 = 3_600_000_000;

impl Default for RunStats {
    fn default() -> Self {
        RunStats {
            threads: AtomicU64::new(0),
            foreign_threads: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            hooked: AtomicU64::new(0),
            generator: AtomicU64::new(0),
            iteration: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            delays: AtomicU64::new(0),
            delay_ns: AtomicU64::new(0),
            // 3 significant digits: at most 0.1% error on a percentile.
            latency_us: Mutex::new(Histogram::new_with_bounds(1, MAX_ROUND_US, 3).expect("bounds")),
        }
    }
}

impl RunStats {
    pub fn add(&self, b: Batch) {
        if b.is_empty() {
            return;
        }
        self.hooked.fetch_add(b.hooked, Relaxed);
        self.generator.fetch_add(b.generator, Relaxed);
        self.iteration.fetch_add(b.iteration, Relaxed);
        self.yields.fetch_add(b.yields, Relaxed);
        self.delays.fetch_add(b.delays, Relaxed);
        self.delay_ns.fetch_add(b.delay_ns, Relaxed);
    }

    pub fn thread_entered(&self) {
        self.threads.fetch_add(1, Relaxed);
    }

    pub fn foreign_thread(&self) {
        self.foreign_threads.fetch_add(1, Relaxed);
    }

    pub fn execution(&self) {
        self.executions.fetch_add(1, Relaxed);
    }

    /// Record one round's latency (negative or NaN seconds count as 0).
    pub fn record_round(&self, seconds: f64) {
        let us = if seconds.is_finite() && seconds > 0.0 {
            (seconds * 1e6).round().min(MAX_ROUND_US as f64) as u64
        } else {
            0
        };
        self.latency_us.lock().saturating_record(us.max(1));
    }

    pub fn snapshot(&self) -> Snapshot {
        let h = self.latency_us.lock();
        let (rounds, p50, p99, max) = if h.is_empty() {
            (0, 0, 0, 0)
        } else {
            (
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.max(),
            )
        };
        Snapshot {
            threads: self.threads.load(Relaxed),
            foreign_threads: self.foreign_threads.load(Relaxed),
            executions: self.executions.load(Relaxed),
            rounds,
            hooked: self.hooked.load(Relaxed),
            generator: self.generator.load(Relaxed),
            iteration: self.iteration.load(Relaxed),
            yields: self.yields.load(Relaxed),
            delays: self.delays.load(Relaxed),
            delay_ns: self.delay_ns.load(Relaxed),
            round_p50_us: p50,
            round_p99_us: p99,
            round_max_us: max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_add_up() {
        let s = RunStats::default();
        s.add(Batch {
            hooked: 3,
            generator: 2,
            iteration: 1,
            yields: 1,
            delays: 2,
            delay_ns: 500,
        });
        s.add(Batch {
            hooked: 4,
            ..Batch::default()
        });
        s.thread_entered();
        s.execution();
        s.execution();
        s.foreign_thread();
        let snap = s.snapshot();
        assert_eq!(
            (snap.hooked, snap.yields, snap.delays, snap.delay_ns),
            (7, 1, 2, 500)
        );
        assert_eq!((snap.generator, snap.iteration), (2, 1));
        assert_eq!(
            (snap.threads, snap.executions, snap.foreign_threads),
            (1, 2, 1)
        );
        assert_eq!(
            (snap.rounds, snap.round_p50_us, snap.round_max_us),
            (0, 0, 0)
        );
    }

    #[test]
    fn round_percentiles() {
        let s = RunStats::default();
        for ms in 1..=100 {
            s.record_round(ms as f64 / 1000.0);
        }
        s.record_round(-1.0);
        let snap = s.snapshot();
        assert_eq!(snap.rounds, 101);
        // Within the histogram's 0.1% precision.
        assert!(
            (49_900..=50_100).contains(&snap.round_p50_us),
            "{}",
            snap.round_p50_us
        );
        assert!(
            (98_900..=99_100).contains(&snap.round_p99_us),
            "{}",
            snap.round_p99_us
        );
        assert!(
            (99_900..=100_100).contains(&snap.round_max_us),
            "{}",
            snap.round_max_us
        );
        s.record_round(1e12); // clamped, not an error
        assert!(s.snapshot().round_max_us >= MAX_ROUND_US);
    }
}
