//! What to do at one hooked access: continue, yield, or delay. Pure logic, no Python.

use std::time::{Duration, Instant};

use rand::{Rng, RngExt};

/// The outcome of one draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go on at once.
    Continue,
    /// Release the interpreter and let the OS run another thread.
    Yield,
    /// Busy-wait this many nanoseconds with the interpreter released.
    Spin(u32),
    /// Sleep this many microseconds with the interpreter released.
    Sleep(u32),
    /// Exact mode: a scheduling point; the serialising core decides who runs next.
    Schedule,
}

impl Decision {
    /// Carry out the decision on this thread (the caller releases the interpreter first).
    pub fn wait(self) {
        match self {
            Decision::Continue | Decision::Schedule => {}
            Decision::Yield => std::thread::yield_now(),
            Decision::Spin(ns) => spin_for(Duration::from_nanos(ns as u64)),
            Decision::Sleep(us) => std::thread::sleep(Duration::from_micros(us as u64)),
        }
    }

    /// Nanoseconds this decision asks to wait (0 for continue and yield).
    pub fn nominal_ns(self) -> u64 {
        match self {
            Decision::Continue | Decision::Yield | Decision::Schedule => 0,
            Decision::Spin(ns) => ns as u64,
            Decision::Sleep(us) => us as u64 * 1000,
        }
    }
}

fn spin_for(d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Probabilities and delay ranges, as given by the user; validated by [`Policy::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyConfig {
    /// Chance that an access yields.
    pub yield_probability: f64,
    /// Chance that an access delays (spin or sleep).
    pub delay_probability: f64,
    /// Among delays, the share that sleep rather than spin.
    pub sleep_share: f64,
    /// Spin length is uniform in `1..=max_spin_ns`.
    pub max_spin_ns: u32,
    /// Sleep length is uniform in `1..=max_sleep_us`.
    pub max_sleep_us: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            yield_probability: 0.02,
            delay_probability: 0.01,
            sleep_share: 0.5,
            max_spin_ns: 20_000,
            max_sleep_us: 200,
        }
    }
}

/// A validated policy in the form the hot path uses: thresholds on one `u32` draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `draw < yield_below`: yield.
    yield_below: u64,
    /// `yield_below <= draw < delay_below`: delay.
    delay_below: u64,
    /// Second draw `< sleep_below`: sleep, else spin.
    sleep_below: u64,
    max_spin_ns: u32,
    max_sleep_us: u32,
}

const SCALE: f64 = 4_294_967_296.0; // 2^32

fn threshold(p: f64) -> u64 {
    // p in [0, 1]: the number of u32 draws (out of 2^32) below the threshold.
    (p * SCALE).round().clamp(0.0, SCALE) as u64
}

impl Policy {
    pub fn new(c: PolicyConfig) -> Result<Policy, String> {
        let prob = |name: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(p)
            } else {
                Err(format!("{name} must be between 0 and 1, not {p}"))
            }
        };
        let y = prob("yield_probability", c.yield_probability)?;
        let d = prob("delay_probability", c.delay_probability)?;
        let s = prob("sleep_share", c.sleep_share)?;
        if y + d > 1.0 {
            return Err(format!(
                "yield_probability + delay_probability must be at most 1, not {}",
                y + d
            ));
        }
        if d > 0.0 && ((s < 1.0 && c.max_spin_ns == 0) || (s > 0.0 && c.max_sleep_us == 0)) {
            return Err("max_spin_ns and max_sleep_us must be >= 1 where they are used".into());
        }
        let yield_below = threshold(y);
        Ok(Policy {
            yield_below,
            delay_below: (yield_below + threshold(d)).min(1 << 32),
            sleep_below: threshold(s),
            max_spin_ns: c.max_spin_ns,
            max_sleep_us: c.max_sleep_us,
        })
    }

    /// A policy that never injects anything (for measuring the bare hook).
    pub fn passive() -> Policy {
        Policy::new(PolicyConfig {
            yield_probability: 0.0,
            delay_probability: 0.0,
            ..PolicyConfig::default()
        })
        .expect("valid")
    }

    /// One decision. Draws one `u32`, and for a delay a second one and a length.
    #[inline]
    pub fn decide<R: Rng>(&self, rng: &mut R) -> Decision {
        let draw = rng.next_u32() as u64;
        if draw >= self.delay_below {
            return Decision::Continue;
        }
        if draw < self.yield_below {
            return Decision::Yield;
        }
        if (rng.next_u32() as u64) < self.sleep_below {
            Decision::Sleep(rng.random_range(1..=self.max_sleep_us))
        } else {
            Decision::Spin(rng.random_range(1..=self.max_spin_ns))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed;

    fn tally(policy: &Policy, n: u32) -> (u32, u32, u32, u32) {
        let mut rng = seed::stream(seed::derive_ok(9, &[]));
        let (mut c, mut y, mut sp, mut sl) = (0, 0, 0, 0);
        for _ in 0..n {
            match policy.decide(&mut rng) {
                Decision::Continue => c += 1,
                Decision::Yield => y += 1,
                Decision::Schedule => unreachable!("chaos policies never schedule"),
                Decision::Spin(ns) => {
                    assert!((1..=1000).contains(&ns));
                    sp += 1
                }
                Decision::Sleep(us) => {
                    assert!((1..=50).contains(&us));
                    sl += 1
                }
            }
        }
        (c, y, sp, sl)
    }

    #[test]
    fn frequencies_follow_the_probabilities() {
        let p = Policy::new(PolicyConfig {
            yield_probability: 0.1,
            delay_probability: 0.2,
            sleep_share: 0.25,
            max_spin_ns: 1000,
            max_sleep_us: 50,
        })
        .unwrap();
        let (c, y, sp, sl) = tally(&p, 100_000);
        assert!((69_000..71_000).contains(&c), "continue {c}");
        assert!((9_500..10_500).contains(&y), "yield {y}");
        assert!((14_500..15_500).contains(&sp), "spin {sp}");
        assert!((4_500..5_500).contains(&sl), "sleep {sl}");
    }

    #[test]
    fn extremes() {
        let (c, ..) = tally(&Policy::passive(), 10_000);
        assert_eq!(c, 10_000);
        let always = Policy::new(PolicyConfig {
            yield_probability: 1.0,
            delay_probability: 0.0,
            ..PolicyConfig::default()
        })
        .unwrap();
        assert_eq!(tally(&always, 1000).1, 1000);
    }

    #[test]
    fn decisions_are_reproducible_from_the_seed() {
        let p = Policy::new(PolicyConfig::default()).unwrap();
        let run = |s| {
            let mut rng = seed::stream(s);
            (0..2000).map(|_| p.decide(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(
            run(seed::round_seed(1, 2, 3)),
            run(seed::round_seed(1, 2, 3))
        );
        assert_ne!(
            run(seed::round_seed(1, 2, 3)),
            run(seed::round_seed(1, 2, 4))
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let base = PolicyConfig::default();
        for bad in [
            PolicyConfig {
                yield_probability: -0.1,
                ..base
            },
            PolicyConfig {
                delay_probability: 1.5,
                ..base
            },
            PolicyConfig {
                yield_probability: 0.6,
                delay_probability: 0.6,
                ..base
            },
            PolicyConfig {
                sleep_share: f64::NAN,
                ..base
            },
            PolicyConfig {
                max_spin_ns: 0,
                sleep_share: 0.5,
                ..base
            },
        ] {
            assert!(Policy::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn waits_take_about_their_time() {
        let t = Instant::now();
        Decision::Spin(200_000).wait();
        assert!(t.elapsed() >= Duration::from_micros(200));
        assert_eq!(Decision::Sleep(3).nominal_ns(), 3000);
    }
}
