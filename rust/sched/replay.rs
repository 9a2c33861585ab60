//! Replay policy: follows a recorded decision list (the thread that ran at each step).
//!
//! When the recorded thread cannot run at a step (the program took another path), or the list
//! has run out, it keeps the current thread if it can, else the lowest runnable id, and counts
//! the step as a divergence.

use super::Scheduler;

pub struct ReplayScheduler {
    decisions: Vec<u32>,
    divergences: u64,
}

impl ReplayScheduler {
    pub fn new(decisions: Vec<u32>) -> ReplayScheduler {
        ReplayScheduler {
            decisions,
            divergences: 0,
        }
    }
}

impl Scheduler for ReplayScheduler {
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32 {
        if let Some(&want) = self.decisions.get(step as usize) {
            if runnable.contains(&want) {
                return want;
            }
        }
        self.divergences += 1;
        match current {
            Some(c) if runnable.contains(&c) => c,
            _ => runnable[0],
        }
    }

    fn divergences(&self) -> u64 {
        self.divergences
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_list() {
        let list = vec![1, 0, 0, 2, 1];
        let mut r = ReplayScheduler::new(list.clone());
        let got: Vec<u32> = (0..5).map(|i| r.choose(i, &[0, 1, 2], Some(0))).collect();
        assert_eq!(got, list);
        assert_eq!(r.divergences(), 0);
    }

    #[test]
    fn keeps_the_current_thread_when_the_list_runs_out() {
        let mut r = ReplayScheduler::new(vec![2]);
        assert_eq!(r.choose(0, &[0, 1, 2], None), 2);
        assert_eq!(r.choose(1, &[0, 1, 2], Some(1)), 1);
        assert_eq!(r.choose(2, &[0, 2], None), 0);
        assert_eq!(r.divergences(), 2);
    }

    #[test]
    fn a_recorded_thread_that_cannot_run_is_replaced() {
        let mut r = ReplayScheduler::new(vec![1, 1]);
        assert_eq!(r.choose(0, &[0, 2], Some(2)), 2);
        assert_eq!(r.choose(1, &[0, 1, 2], Some(2)), 1);
        assert_eq!(r.divergences(), 1);
    }
}
