//! Uniform random policy: at every scheduling point, each runnable thread is equally likely to
//! run next. Cheap, and good at shallow bugs, because it switches threads often.

use rand::RngExt;
use rand_pcg::Pcg32;

use super::Scheduler;
use crate::seed;

pub struct RandomScheduler {
    rng: Pcg32,
}

impl RandomScheduler {
    /// A scheduler whose choices are a function of `seed` (and of what it is asked).
    pub fn new(seed: u64) -> RandomScheduler {
        RandomScheduler {
            rng: seed::stream(seed),
        }
    }
}

impl Scheduler for RandomScheduler {
    fn choose(&mut self, _step: u64, runnable: &[u32], _current: Option<u32>) -> u32 {
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
    fn a_single_runnable_thread_is_always_chosen() {
        let mut s = RandomScheduler::new(1);
        assert!((0..50).all(|i| s.choose(i, &[7], None) == 7));
    }
}
