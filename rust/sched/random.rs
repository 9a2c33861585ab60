//! Uniform random policy: at every scheduling point, each runnable thread is equally likely to
//! run next. Good at shallow bugs, because it switches threads often.
//!
//! With a switch rate below 1 (the mix policy's budget), a scheduling point is a random draw
//! only with that probability; otherwise the thread that reached it goes on. Every hand-over
//! costs a wake-up of another OS thread, so a long round gets a bounded number of them.

use rand::RngExt;
use rand_pcg::Pcg32;

use super::Scheduler;
use crate::seed;

pub struct RandomScheduler {
    rng: Pcg32,
    switch: f64,
    /// Past this step the switch rate fades (see [`super::faded`]).
    horizon: Option<u64>,
}

impl RandomScheduler {
    /// A scheduler whose choices are a function of `seed` (and of what it is asked).
    pub fn new(seed: u64) -> RandomScheduler {
        RandomScheduler::with_switch_rate(seed, 1.0)
    }

    /// Draw at a point with probability `switch` (clamped to 0..=1); else the current thread
    /// goes on.
    pub fn with_switch_rate(seed: u64, switch: f64) -> RandomScheduler {
        RandomScheduler {
            rng: seed::stream(seed),
            switch: switch.clamp(0.0, 1.0),
            horizon: None,
        }
    }

    /// Past step `k` the switch rate fades as k / step (a round longer than expected).
    pub fn fading_after(mut self, k: u64) -> RandomScheduler {
        self.horizon = Some(k.max(1));
        self
    }
}

impl Scheduler for RandomScheduler {
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32 {
        let switch = match self.horizon {
            Some(k) => super::faded(self.switch, k, step),
            None => self.switch,
        };
        if let Some(c) = current {
            if switch < 1.0 && !self.rng.random_bool(switch) {
                return c;
            }
        }
        runnable[self.rng.random_range(0..runnable.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seed: u64) -> Vec<u32> {
        let mut s = RandomScheduler::new(seed);
        (0..500)
            .map(|i| s.choose(i, &[0, 1, 2, 5], Some(0)))
            .collect()
    }

    #[test]
    fn same_seed_same_choices() {
        assert_eq!(trace(11), trace(11));
        assert_ne!(trace(11), trace(12));
    }

    #[test]
    fn every_runnable_thread_is_chosen_about_equally() {
        let t = trace(3);
        for tid in [0, 1, 2, 5] {
            let n = t.iter().filter(|&&x| x == tid).count();
            assert!(
                (80..170).contains(&n),
                "thread {tid} chosen {n} times of 500"
            );
        }
        assert!(t.iter().all(|x| [0, 1, 2, 5].contains(x)));
    }

    #[test]
    fn a_switch_rate_bounds_the_hand_overs() {
        let mut s = RandomScheduler::with_switch_rate(5, 0.02);
        let mut current = 0;
        let mut switches = 0;
        for i in 0..5000 {
            let c = s.choose(i, &[0, 1, 2, 3], Some(current));
            switches += u32::from(c != current);
            current = c;
        }
        // 5000 points x 0.02 draws x 3/4 chance that a draw picks another thread: ~75.
        assert!((35..130).contains(&switches), "{switches} switches");
        let mut full = RandomScheduler::new(5);
        let mut current = 0;
        let mut all = 0;
        for i in 0..5000 {
            let c = full.choose(i, &[0, 1, 2, 3], Some(current));
            all += u32::from(c != current);
            current = c;
        }
        assert!(all > 3000, "{all} switches at rate 1");
    }

    #[test]
    fn a_single_runnable_thread_is_always_chosen() {
        let mut s = RandomScheduler::new(1);
        assert!((0..50).all(|i| s.choose(i, &[7], None) == 7));
    }
}
