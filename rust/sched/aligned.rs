//! Aligned policy: keeps the threads abreast, with random runs of a few steps.
//!
//! At each scheduling point the thread that reached it goes on with probability `stay`;
//! otherwise the runnable thread that has taken the fewest steps this round runs (ties broken
//! at random). Threads that start a round together thus reach the same code at about the same
//! time, which is where one-shot races (check-then-act, read-modify-write done once per
//! thread) need them, while the random runs decide who gets through a window first. Uniform
//! random choice lets the threads drift apart, so two of them rarely meet in a short window.

use rand::RngExt;
use rand_pcg::Pcg32;

use super::Scheduler;
use crate::seed;

pub struct AlignedScheduler {
    rng: Pcg32,
    stay: f64,
    /// Steps taken this round, by thread id.
    taken: Vec<u64>,
    /// The round's expected length: past it the chance of leaving fades (see
    /// [`super::faded`]). None: the same chance at every step.
    horizon: Option<u64>,
}

impl AlignedScheduler {
    /// `stay`: probability that the thread at a point goes on (clamped to 0..=1).
    pub fn new(seed: u64, stay: f64) -> AlignedScheduler {
        AlignedScheduler {
            rng: seed::stream(seed),
            stay: stay.clamp(0.0, 1.0),
            taken: Vec::new(),
            horizon: None,
        }
    }

    /// Past step `k` the chance of leaving (1 - `stay`) fades as k / step: a round much
    /// longer than expected keeps about as many hand-overs as one of the expected length.
    pub fn fading_after(mut self, k: u64) -> AlignedScheduler {
        self.horizon = Some(k.max(1));
        self
    }
}

impl AlignedScheduler {
    fn steps_of(&self, tid: u32) -> u64 {
        self.taken.get(tid as usize).copied().unwrap_or(0)
    }
}

impl Scheduler for AlignedScheduler {
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32 {
        let stay = match self.horizon {
            Some(k) => 1.0 - super::faded(1.0 - self.stay, k, step),
            None => self.stay,
        };
        let chosen = match current {
            Some(c) if runnable.len() == 1 || self.rng.random_bool(stay) => c,
            _ => {
                let others: Vec<u32> = runnable
                    .iter()
                    .copied()
                    .filter(|&t| Some(t) != current)
                    .collect();
                let least = others
                    .iter()
                    .map(|&t| self.steps_of(t))
                    .min()
                    .expect("runnable has another thread");
                let behind: Vec<u32> = others
                    .into_iter()
                    .filter(|&t| self.steps_of(t) == least)
                    .collect();
                behind[self.rng.random_range(0..behind.len())]
            }
        };
        let i = chosen as usize;
        if i >= self.taken.len() {
            self.taken.resize(i + 1, 0);
        }
        self.taken[i] += 1;
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(seed: u64, stay: f64) -> Vec<u32> {
        let mut s = AlignedScheduler::new(seed, stay);
        let mut current = None;
        (0..300)
            .map(|i| {
                let c = s.choose(i, &[0, 1, 2], current);
                current = Some(c);
                c
            })
            .collect()
    }

    #[test]
    fn deterministic_per_seed() {
        assert_eq!(trace(3, 0.5), trace(3, 0.5));
        assert_ne!(trace(3, 0.5), trace(4, 0.5));
    }

    #[test]
    fn threads_stay_abreast() {
        let t = trace(9, 0.5);
        let mut taken = [0i64; 3];
        for (i, &c) in t.iter().enumerate() {
            taken[c as usize] += 1;
            let spread = taken.iter().max().unwrap() - taken.iter().min().unwrap();
            assert!(spread <= 12, "step {i}: {taken:?}");
        }
    }

    #[test]
    fn never_staying_is_round_robin_like() {
        let t = trace(1, 0.0);
        assert!(t.windows(2).all(|w| w[0] != w[1]));
        for tid in 0..3 {
            assert_eq!(t.iter().filter(|&&x| x == tid).count(), 100);
        }
    }
}
