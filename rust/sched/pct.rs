//! PCT (probabilistic concurrency testing, Burckhardt et al., ASPLOS 2010).
//!
//! Each thread gets a random priority when it is first seen, above every value the change
//! points use. Before the run, `depth - 1` change points are drawn uniformly among the first
//! `k` steps. At each scheduling point the runnable thread with the highest priority runs;
//! when step `k_i` (the i-th change point, i = 1..d-1) is reached, the thread taking that step
//! drops to priority `i`, below every other thread, so another one takes over.
//!
//! Guarantee: for a program of `n` threads and at most `k` steps, a bug of depth `d` (one that
//! needs `d` ordering constraints between steps to show) is hit in one round with probability
//! at least 1/(n·k^(d−1)): the initial priorities order the first constraint right with
//! probability at least 1/n, and each of the d−1 change points lands on the one step that
//! orders the next constraint with probability at least 1/k. Rounds are independent draws, so
//! R rounds miss it with probability at most (1 − 1/(n·k^(d−1)))^R. A `k` smaller than the
//! real step count only makes the change points fall earlier; the bound then holds for bugs
//! within the first `k` steps.

use rand::{Rng, RngExt};
use rand_pcg::Pcg32;

use super::Scheduler;
use crate::seed;

pub struct PctScheduler {
    rng: Pcg32,
    depth: u32,
    /// Steps at which the running thread is demoted, ascending.
    change_points: Vec<u64>,
    next_change: usize,
    /// By thread id (ids are small: worker indexes, then the test's threads); 0: not seen
    /// yet (every priority given is at least 1).
    priority: Vec<u64>,
}

impl PctScheduler {
    /// `depth` >= 1 (1: no change points, the highest-priority thread runs until it blocks);
    /// `k` is the expected number of steps of a round (at least 1).
    pub fn new(seed: u64, depth: u32, k: u64) -> PctScheduler {
        let mut rng = seed::stream(seed);
        let depth = depth.max(1);
        let k = k.max(1);
        let mut change_points: Vec<u64> = Vec::new();
        let wanted = ((depth - 1) as u64).min(k) as usize;
        while change_points.len() < wanted {
            let step = rng.random_range(1..=k);
            if !change_points.contains(&step) {
                change_points.push(step);
            }
        }
        change_points.sort_unstable();
        PctScheduler {
            rng,
            depth,
            change_points,
            next_change: 0,
            priority: Vec::new(),
        }
    }

    pub fn change_points(&self) -> &[u64] {
        &self.change_points
    }

    fn priority_of(&mut self, tid: u32) -> u64 {
        let i = tid as usize;
        if i >= self.priority.len() {
            self.priority.resize(i + 1, 0);
        }
        if self.priority[i] == 0 {
            // Initial priorities lie above every change-point priority (1..depth).
            self.priority[i] = ((self.depth as u64 + 1) << 32) | self.rng.next_u32() as u64;
        }
        self.priority[i]
    }
}

impl Scheduler for PctScheduler {
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32 {
        for &t in runnable {
            self.priority_of(t);
        }
        while self.next_change < self.change_points.len()
            && self.change_points[self.next_change] <= step
        {
            self.next_change += 1;
            if let Some(c) = current {
                let i = c as usize;
                if i >= self.priority.len() {
                    self.priority.resize(i + 1, 0);
                }
                self.priority[i] = self.next_change as u64;
            }
        }
        // Highest priority wins; equal priorities (a 2^-32 chance) go to the lower id.
        *runnable
            .iter()
            .max_by_key(|&&t| (self.priority[t as usize], std::cmp::Reverse(t)))
            .expect("runnable is not empty")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64, depth: u32, k: u64) -> Vec<u32> {
        let mut s = PctScheduler::new(seed, depth, k);
        let mut current = None;
        (0..k)
            .map(|step| {
                let c = s.choose(step, &[0, 1, 2], current);
                current = Some(c);
                c
            })
            .collect()
    }

    fn switches(t: &[u32]) -> usize {
        t.windows(2).filter(|w| w[0] != w[1]).count()
    }

    #[test]
    fn deterministic_per_seed() {
        assert_eq!(run(5, 3, 100), run(5, 3, 100));
        let distinct = (0..20)
            .map(|s| run(s, 3, 100))
            .collect::<std::collections::HashSet<_>>();
        assert!(distinct.len() > 5);
    }

    #[test]
    fn depth_one_never_switches_between_runnable_threads() {
        for s in 0..20 {
            assert_eq!(switches(&run(s, 1, 200)), 0);
        }
    }

    #[test]
    fn each_change_point_demotes_the_running_thread() {
        for s in 0..50 {
            let mut p = PctScheduler::new(s, 3, 100);
            let cps = p.change_points().to_vec();
            assert_eq!(cps.len(), 2);
            assert!(cps.iter().all(|&c| (1..=100).contains(&c)) && cps[0] < cps[1]);
            let mut current = None;
            let mut trace = Vec::new();
            for step in 0..100 {
                let c = p.choose(step, &[0, 1, 2], current);
                trace.push(c);
                current = Some(c);
            }
            // A switch happens exactly at the change points, and nowhere else.
            for step in 1..100u64 {
                let switched = trace[step as usize] != trace[step as usize - 1];
                assert_eq!(
                    switched,
                    cps.contains(&step),
                    "seed {s} step {step}: {cps:?}"
                );
            }
        }
    }

    #[test]
    fn blocked_threads_are_skipped() {
        let mut p = PctScheduler::new(1, 2, 10);
        let first = p.choose(0, &[0, 1], None);
        let other = 1 - first;
        assert_eq!(p.choose(1, &[other], None), other);
        assert_eq!(
            p.choose(2, &[0, 1], Some(other)) == first,
            p.next_change == 0
        );
    }

    #[test]
    fn each_thread_runs_first_in_some_seeds() {
        let firsts: std::collections::HashSet<u32> = (0..60)
            .map(|s| PctScheduler::new(s, 2, 10).choose(0, &[0, 1, 2], None))
            .collect();
        assert_eq!(firsts.len(), 3);
    }
}
