//! Exact mode's schedulers: the [`Scheduler`] trait that a policy implements, the shared
//! types of a round, and one file per policy. The serialising runtime that asks a scheduler at
//! every scheduling point lives in [`core`].

mod core;
pub use self::core::{clock_anchor, Core};
pub mod aligned;
pub mod explore;
pub mod pct;
pub mod random;
pub mod replay;
pub mod watch;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::seed::{self, Part};

/// A scheduling policy: which runnable thread takes the next step.
pub trait Scheduler: Send {
    /// Choose among `runnable` (ascending ids, never empty). `step` counts the round's
    /// choices from 0; `current` is the thread that reached the point, when it can go on.
    fn choose(&mut self, step: u64, runnable: &[u32], current: Option<u32>) -> u32;

    /// [`Scheduler::choose`] with where each runnable thread would go on from (`at`); a
    /// policy that needs it (explore) overrides this one.
    fn choose_at(
        &mut self,
        step: u64,
        runnable: &[u32],
        current: Option<u32>,
        _at: &dyn Fn(u32) -> Location,
    ) -> u32 {
        self.choose(step, runnable, current)
    }

    /// The round is over (explore: queue what it found).
    fn round_end(&mut self) {}

    /// The round is not exact (called before [`Scheduler::round_end`]): a thread ran outside
    /// the schedule (explore runs the execution again).
    fn round_not_exact(&mut self) {}

    /// Steps at which the policy could not follow its plan (replay only).
    fn divergences(&self) -> u64 {
        0
    }
}

/// Which policy a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    Random,
    /// Threads kept abreast; the one at a point goes on with probability `stay` (percent).
    Aligned {
        stay_percent: u32,
    },
    /// Each round draws its policy from the round seed: aligned (6 in 8), random or PCT
    /// (depth 3); aligned and random hand over about `budget` times in a long round.
    Mix {
        budget: u32,
    },
    /// PCT with this depth; the step estimate `k` comes from the previous rounds.
    Pct {
        depth: u32,
    },
    /// Every round follows this decision list.
    Replay(Vec<u32>),
    /// Systematic exploration: each round is one execution of the shared tree.
    Explore(explore::Shared),
}

/// Waits for a round's workers to arrive before the first choice, at most this long.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(2);
/// When every managed thread is blocked, how long to wait for a wake from outside.
pub const STALL_GRACE: Duration = Duration::from_millis(200);
/// Waiting threads are spread over this many condition variables, by id.
pub const WAIT_SLOTS: usize = 32;
/// PCT's step estimate before a round has been seen.
pub const DEFAULT_K: u64 = 200;

/// Set once, when the interpreter is about to shut down: every core is closed from then on
/// (see [`Core::close`]), so no thread waits in one while the interpreter finalizes.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// How a wait in the core ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// It is this thread's turn (it was chosen, or never had to wait).
    Turn,
    /// A blocked thread was woken by [`Core::wake`] and chosen.
    Woken,
    /// A timed block ended: nothing else could run.
    TimedOut,
    /// Every managed thread was blocked.
    Deadlock,
    /// The round runs free (watchdog, deadlock, or the thread is not managed).
    Free,
}

impl Wait {
    pub fn name(self) -> &'static str {
        match self {
            Wait::Turn => "turn",
            Wait::Woken => "woken",
            Wait::TimedOut => "timeout",
            Wait::Deadlock => "deadlock",
            Wait::Free => "free",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Runnable,
    Blocked { resource: u64, timed: bool },
    Finished,
}

/// A place in the program: (code object address, instruction offset).
pub type Location = (usize, u32);
/// A thread that has not reached a hooked access yet in this round.
pub const AT_START: Location = (0, 0);
/// A thread in a cooperative primitive (lock, condition, join, sleep).
pub const AT_SYNC: Location = (0, 1);

/// What one round came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundRecord {
    /// The thread chosen at each step.
    pub decisions: Vec<u32>,
    /// Choices of another thread while the one that reached the point could go on.
    pub preemptions: u64,
    /// False when the round ended free-running (watchdog or deadlock).
    pub exact: bool,
    pub deadlock: bool,
    /// Replay steps that could not follow the list.
    pub divergences: u64,
    /// Why the round stopped being exact, if it did.
    pub reason: Option<String>,
    /// For each decision, where the chosen thread went on from (for the lane view).
    pub steps: Vec<Location>,
    /// The step estimate the round's scheduler was made with (PCT's k; the mix policy's
    /// switch rate): a replay from the seed needs the same one to make the same choices.
    pub k: u64,
    /// The round ran free from some point on (watchdog, deadlock, end of the test).
    pub released: bool,
    /// The thread that ran outside the schedule (blocked in C) while others were scheduled,
    /// which made the round not exact, and where it was when it left.
    pub free_run: Option<(u32, Location)>,
}

/// Hand-overs the mix policy aims at per round by default, once a round's length is known:
/// each one wakes another OS thread (microseconds), where a scheduling point at which the
/// thread goes on costs well under one.
pub const DEFAULT_SWITCH_BUDGET: u32 = 48;

/// The mix policy's draw rate at a scheduling point for rounds of about `k` steps: 1 for short
/// rounds, `budget / k` for long ones.
pub fn mix_switch_rate(budget: u32, k: u64) -> f64 {
    (f64::from(budget) / k.max(1) as f64).min(1.0)
}

/// A per-step chance `rate` for a round expected to take `k` steps, at `step`: the same up to
/// `k`, then `rate * k / step`. A round far longer than its estimate (the first round of a
/// test is made with [`DEFAULT_K`]) thus gets about `rate * k * (1 + ln(steps / k))` draws, not
/// `rate * steps`: each hand-over wakes another OS thread, and a long first round of a loop-heavy
/// test made thousands of them.
pub fn faded(rate: f64, k: u64, step: u64) -> f64 {
    if step <= k {
        rate
    } else {
        rate * k as f64 / step as f64
    }
}

/// The scheduler of one round: seeded from (test seed, "exact", round).
pub fn make_scheduler(seed: u64, policy: &Policy, round: u64, k: u64) -> Box<dyn Scheduler> {
    let round_seed = seed::derive_ok(seed, &[Part::Str("exact"), Part::Int(round as i128)]);
    match policy {
        Policy::Random => Box::new(random::RandomScheduler::new(round_seed)),
        Policy::Aligned { stay_percent } => Box::new(aligned::AlignedScheduler::new(
            round_seed,
            *stay_percent as f64 / 100.0,
        )),
        // Aligned finds one-shot races between threads running the same body best (the
        // plugin's case); uniform random and PCT (depth 3) cover other shapes. Aligned and
        // random hand the turn over at a rate capped by the switch budget: a short round
        // keeps the full rate, a long one gets about MIX_SWITCH_BUDGET hand-overs.
        Policy::Mix { budget } => {
            let rate = mix_switch_rate(*budget, k);
            match seed::mix64(round_seed) % 8 {
                0..=5 => Box::new(
                    aligned::AlignedScheduler::new(round_seed, 1.0 - rate / 2.0).fading_after(k),
                ),
                6 => Box::new(
                    random::RandomScheduler::with_switch_rate(round_seed, rate).fading_after(k),
                ),
                _ => Box::new(pct::PctScheduler::new(round_seed, 3, k)),
            }
        }
        Policy::Pct { depth } => Box::new(pct::PctScheduler::new(round_seed, *depth, k)),
        Policy::Replay(list) => Box::new(replay::ReplayScheduler::new(list.clone())),
        Policy::Explore(tree) => Box::new(explore::ExploreScheduler::new(
            tree.clone(),
            crate::accesses::classify,
        )),
    }
}
