//! The injection engine: which test run is active, and each thread's generator and counts.
//! Pure logic, no Python: the `hooks` module calls [`on_access`] from the sys.monitoring
//! callback and carries out the decision with the interpreter released.
//!
//! Hot path ([`on_access`]): one atomic load of the active run id, then this thread's slot
//! (a `thread_local!`), one draw from its PCG32 generator, and a counter bump in the slot.
//! No allocation, no lock. The slow path runs once per thread per run, when a thread first
//! reaches a hook while a run it has no stream for is active: it takes the read side of the
//! lock that holds the active run, to join that run as a "foreign" thread (one that called no
//! [`thread_enter`]), with a stream numbered by an atomic counter of the run.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rand_pcg::Pcg32;

use crate::opcodes::Kind;
use crate::policy::{Decision, Policy};
use crate::sched::{Core, Wait};
use crate::seed;
use crate::stats::{Batch, RunStats};

/// One test run: its seed, policy and statistics, shared by every thread taking part.
pub struct RunShared {
    id: u64,
    seed: u64,
    policy: Policy,
    foreign: AtomicU64,
    pub stats: RunStats,
    /// Exact mode: the serialising core; None in chaos mode.
    core: Option<Arc<Core>>,
}

impl RunShared {
    pub fn new(test_seed: u64, policy: Policy) -> Arc<RunShared> {
        Self::with_core(test_seed, policy, None)
    }

    /// A run in exact mode when `core` is given: hooked accesses of managed threads become
    /// scheduling points of the core instead of injected yields and delays.
    pub fn with_core(test_seed: u64, policy: Policy, core: Option<Core>) -> Arc<RunShared> {
        Arc::new(RunShared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            seed: test_seed,
            policy,
            foreign: AtomicU64::new(0),
            stats: RunStats::default(),
            core: core.map(Arc::new),
        })
    }

    pub fn core(&self) -> Option<&Arc<Core>> {
        self.core.as_ref()
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Id of the active run, 0 when none is. Read on every hooked access.
static ACTIVE_ID: AtomicU64 = AtomicU64::new(0);
/// The active run itself; written by activate/deactivate, read on the slow path only.
static ACTIVE: RwLock<Option<Arc<RunShared>>> = RwLock::new(None);

/// Make `run` the active run. Fails when another run is active.
pub fn activate(run: &Arc<RunShared>) -> Result<(), String> {
    let mut active = ACTIVE.write();
    if let Some(other) = active.as_ref() {
        if other.id != run.id {
            return Err(format!(
                "another test run (id {}) is active; deactivate it first",
                other.id
            ));
        }
    }
    *active = Some(Arc::clone(run));
    ACTIVE_ID.store(run.id, Ordering::Release);
    Ok(())
}

/// Stop `run` if it is the active one; returns whether it was.
pub fn deactivate(run: &RunShared) -> bool {
    let mut active = ACTIVE.write();
    if active.as_ref().is_some_and(|a| a.id == run.id) {
        ACTIVE_ID.store(0, Ordering::Release);
        *active = None;
        true
    } else {
        false
    }
}

/// Id of the active run, 0 when none is.
pub fn active_id() -> u64 {
    ACTIVE_ID.load(Ordering::Acquire)
}

/// Explicit threads add their counts every this many accesses (and at each round and exit).
const EXPLICIT_FLUSH: u32 = 256;

struct Slot {
    run: Option<Arc<RunShared>>,
    /// `run`'s id, 0 when there is none (saves a pointer chase on the hot path).
    run_id: u64,
    policy: Policy,
    /// Set by `thread_enter`; None for a foreign thread.
    thread_index: Option<u64>,
    /// Exact mode: the core of `run`, and this thread's id in it while it is managed.
    core: Option<Arc<Core>>,
    managed: Option<u32>,
    /// The core's round generation when `managed` was set: a thread left from an earlier
    /// round (released when the round ended) is not managed in a later one.
    managed_gen: u64,
    rng: Pcg32,
    batch: Batch,
    pending: u32,
    flush_every: u32,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            run: None,
            run_id: 0,
            policy: Policy::passive(),
            thread_index: None,
            core: None,
            managed: None,
            managed_gen: 0,
            rng: seed::stream(0),
            batch: Batch::default(),
            pending: 0,
            flush_every: 1,
        }
    }

    /// This thread's managed id, if it is managed in the core's current round.
    #[inline]
    fn managed(&self) -> Option<u32> {
        let tid = self.managed?;
        let core = self.core.as_ref()?;
        (core.generation() == self.managed_gen).then_some(tid)
    }

    fn flush(&mut self) {
        if let Some(run) = &self.run {
            run.stats.add(self.batch);
        }
        self.batch = Batch::default();
        self.pending = 0;
    }

    fn attach(&mut self, run: &Arc<RunShared>, index: Option<u64>, rng_seed: u64) {
        self.flush();
        self.run = Some(Arc::clone(run));
        self.run_id = run.id;
        self.policy = run.policy;
        self.thread_index = index;
        self.core = run.core.clone();
        self.managed = None;
        self.rng = seed::stream(rng_seed);
        self.flush_every = if index.is_some() { EXPLICIT_FLUSH } else { 1 };
    }

    fn detach(&mut self) {
        self.flush();
        *self = Slot::new();
    }

    /// Slow path: join the active run (id `active`) as a foreign thread.
    #[cold]
    fn join_active(&mut self, active: u64) -> bool {
        let run = match ACTIVE.read().as_ref() {
            Some(run) if run.id == active => Arc::clone(run),
            _ => return false, // deactivated meanwhile
        };
        let n = run.foreign.fetch_add(1, Ordering::Relaxed);
        run.stats.foreign_thread();
        self.attach(&run, None, seed::foreign_seed(run.seed, n));
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static SLOT: RefCell<Slot> = RefCell::new(Slot::new());
}

/// One hooked access on this thread: count it and decide what to do. `Continue` when no run
/// is active (an event that raced with deactivation) or while the thread is being torn down.
#[inline]
pub fn on_access() -> Decision {
    on_point(Kind::Access)
}

/// One hooked point of `kind` on this thread (see [`on_access`]).
#[inline]
pub fn on_point(kind: Kind) -> Decision {
    let active = ACTIVE_ID.load(Ordering::Acquire);
    if active == 0 {
        return Decision::Continue;
    }
    SLOT.try_with(|cell| {
        let Ok(mut s) = cell.try_borrow_mut() else {
            return Decision::Continue;
        };
        if s.run_id != active && !s.join_active(active) {
            return Decision::Continue;
        }
        match kind {
            Kind::Access => {}
            Kind::Generator => s.batch.generator += 1,
            Kind::Iteration => s.batch.iteration += 1,
        }
        if s.core.is_some() {
            s.batch.hooked += 1;
            s.pending += 1;
            if s.pending >= s.flush_every {
                s.flush();
            }
            return if s.managed().is_some() {
                Decision::Schedule
            } else {
                Decision::Continue
            };
        }
        let policy = s.policy;
        let d = policy.decide(&mut s.rng);
        s.batch.hooked += 1;
        match d {
            Decision::Continue | Decision::Schedule => {}
            Decision::Yield => s.batch.yields += 1,
            Decision::Spin(_) | Decision::Sleep(_) => {
                s.batch.delays += 1;
                s.batch.delay_ns += d.nominal_ns();
            }
        }
        s.pending += 1;
        if s.pending >= s.flush_every {
            s.flush();
        }
        d
    })
    .unwrap_or(Decision::Continue)
}

fn with_slot<T>(f: impl FnOnce(&mut Slot) -> T) -> Result<T, String> {
    SLOT.try_with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => Ok(f(&mut s)),
        Err(_) => Err("thread slot is busy".to_string()),
    })
    .map_err(|_| "thread is exiting".to_string())?
}

/// This thread is worker `index` of `run`: give it the run's stream for that index.
pub fn thread_enter(run: &Arc<RunShared>, index: u64) -> Result<(), String> {
    with_slot(|s| s.attach(run, Some(index), seed::thread_seed(run.seed, index)))?;
    run.stats.thread_entered();
    Ok(())
}

/// This thread starts round `iteration` of `run`: reseed its stream from
/// (test seed, thread index, iteration) and count one execution.
pub fn round_start(run: &Arc<RunShared>, iteration: u64) -> Result<(), String> {
    with_slot(|s| match s.thread_index {
        Some(index) if s.run_id == run.id => {
            s.flush();
            s.rng = seed::stream(seed::round_seed(run.seed, index, iteration));
            Ok(())
        }
        _ => Err("round_start() on a thread that has not called thread_enter()".to_string()),
    })??;
    run.stats.execution();
    Ok(())
}

/// This thread leaves `run` (no-op when it is not in it): its counts are added to the run.
pub fn thread_exit(run: &RunShared) -> Result<(), String> {
    with_slot(|s| {
        if s.run_id == run.id {
            s.detach();
        }
    })
}

/// Exact mode: whether the calling thread is managed by the active run (cheap: a thread-local
/// read and an atomic load).
#[inline]
pub fn managed_now() -> bool {
    let active = ACTIVE_ID.load(Ordering::Acquire);
    if active == 0 {
        return false;
    }
    SLOT.try_with(|cell| {
        cell.try_borrow()
            .is_ok_and(|s| s.run_id == active && s.managed().is_some())
    })
    .unwrap_or(false)
}

/// Exact mode: this thread's core and managed id, when it has both.
fn managed_core() -> Option<(Arc<Core>, u32)> {
    SLOT.try_with(|cell| {
        let s = cell.try_borrow().ok()?;
        Some((Arc::clone(s.core.as_ref()?), s.managed()?))
    })
    .ok()
    .flatten()
}

/// The scheduling point of a hooked access at `at` (the caller has released the
/// interpreter).
pub fn schedule_point(at: crate::sched::Location) -> Wait {
    match managed_core() {
        Some((core, tid)) => core.point_at(tid, at),
        None => Wait::Free,
    }
}

/// The part of a scheduling point that never waits (see [`Core::try_point_quiet`]); may be
/// called with the interpreter held. `(None, handed)`: call [`schedule_wait`] with `handed`
/// once the interpreter is released (it wakes the thread the turn was handed to, so that
/// thread does not wake only to wait for the GIL).
pub fn schedule_point_try(at: crate::sched::Location) -> (Option<Wait>, bool) {
    SLOT.try_with(|cell| {
        let Ok(s) = cell.try_borrow() else {
            return (Some(Wait::Free), false);
        };
        match (s.core.as_ref(), s.managed()) {
            (Some(core), Some(tid)) => core.try_point_quiet(tid, at),
            _ => (Some(Wait::Free), false),
        }
    })
    .unwrap_or((Some(Wait::Free), false))
}

/// Wait for this thread's turn after [`schedule_point_try`] said so (the caller has released
/// the interpreter); `handed`: its answer, whether the turn went to another thread that is
/// still to be woken.
pub fn schedule_wait(handed: bool) -> Wait {
    match managed_core() {
        Some((core, tid)) => core.await_turn_handed(tid, handed),
        None => Wait::Free,
    }
}

/// Wake the thread a hand-over went to, when the caller will not wait (see
/// [`schedule_point_try`]).
pub fn schedule_notify() {
    if let Some((core, _)) = managed_core() {
        core.notify_running();
    }
}

/// Exact mode: this thread's (core, id), joining `run` as a foreign thread if it has not.
pub fn exact_slot(run: &Arc<RunShared>) -> Result<(Arc<Core>, Option<u32>), String> {
    let core = run.core.clone().ok_or("this run is not in exact mode")?;
    with_slot(|s| {
        if s.run_id != run.id {
            let n = run.foreign.fetch_add(1, Ordering::Relaxed);
            run.stats.foreign_thread();
            s.attach(run, None, seed::foreign_seed(run.seed, n));
        }
        (core, s.managed())
    })
}

/// Exact mode: this thread's managed id in `run`, without joining it.
pub fn managed_id(run: &RunShared) -> Option<u32> {
    SLOT.try_with(|cell| {
        let s = cell.try_borrow().ok()?;
        if s.run_id == run.id {
            s.managed()
        } else {
            None
        }
    })
    .ok()
    .flatten()
}

/// Exact mode: set (or clear) this thread's managed id in `run`.
pub fn set_managed(run: &Arc<RunShared>, tid: Option<u32>) -> Result<(), String> {
    exact_slot(run)?;
    with_slot(|s| {
        s.managed = tid;
        s.managed_gen = s.core.as_ref().map_or(0, |c| c.generation());
    })
}

/// Add this thread's pending counts for `run` (before reading statistics).
pub fn flush_current(run: &RunShared) {
    let _ = with_slot(|s| {
        if s.run_id == run.id {
            s.flush();
        }
    });
}

/// Exact mode: `f` with the calling thread's core and managed id, when it has both and a run
/// is active (an atomic load first, then the thread's slot: cheap for every other thread).
#[inline]
pub fn with_managed<T>(f: impl FnOnce(&Arc<Core>, u32) -> T) -> Option<T> {
    if ACTIVE_ID.load(Ordering::Acquire) == 0 {
        return None;
    }
    SLOT.try_with(|cell| {
        let s = cell.try_borrow().ok()?;
        Some(f(s.core.as_ref()?, s.managed?))
    })
    .ok()
    .flatten()
}

/// Exact mode: the core of the active run (the watcher looks at it).
pub fn active_core() -> Option<Arc<Core>> {
    if ACTIVE_ID.load(Ordering::Acquire) == 0 {
        return None;
    }
    ACTIVE.read().as_ref()?.core.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;
    use parking_lot::Mutex;

    // The active run is process-wide: tests that activate runs take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn busy_policy() -> Policy {
        Policy::new(PolicyConfig {
            yield_probability: 0.25,
            delay_probability: 0.25,
            sleep_share: 0.0,
            max_spin_ns: 1,
            max_sleep_us: 1,
        })
        .unwrap()
    }

    #[test]
    fn nothing_happens_without_an_active_run() {
        let _g = SERIAL.lock();
        let run = RunShared::new(1, busy_policy());
        for _ in 0..100 {
            assert_eq!(on_access(), Decision::Continue);
        }
        activate(&run).unwrap();
        assert!(deactivate(&run));
        assert!(!deactivate(&run));
        assert_eq!(on_access(), Decision::Continue);
        assert_eq!(run.stats.snapshot().hooked, 0);
    }

    #[test]
    fn one_active_run_at_a_time() {
        let _g = SERIAL.lock();
        let a = RunShared::new(1, Policy::passive());
        let b = RunShared::new(1, Policy::passive());
        activate(&a).unwrap();
        activate(&a).unwrap(); // idempotent
        assert!(activate(&b).is_err());
        assert!(!deactivate(&b));
        assert_eq!(active_id(), a.id());
        deactivate(&a);
        activate(&b).unwrap();
        deactivate(&b);
        assert_eq!(active_id(), 0);
    }

    fn worker_decisions(run: &Arc<RunShared>, index: u64, rounds: u64) -> Vec<Decision> {
        thread_enter(run, index).unwrap();
        let mut out = Vec::new();
        for it in 0..rounds {
            round_start(run, it).unwrap();
            out.extend((0..300).map(|_| on_access()));
        }
        thread_exit(run).unwrap();
        out
    }

    #[test]
    fn workers_are_reproducible_and_counted() {
        let _g = SERIAL.lock();
        let go = |s: u64| {
            let run = RunShared::new(s, busy_policy());
            activate(&run).unwrap();
            let per_thread: Vec<Vec<Decision>> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..3)
                    .map(|i| {
                        let run = &run;
                        sc.spawn(move || worker_decisions(run, i, 2))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            deactivate(&run);
            (per_thread, run.stats.snapshot())
        };
        let (a, sa) = go(7);
        let (b, _) = go(7);
        let (c, _) = go(8);
        assert_eq!(a, b, "same seed, same decisions per thread");
        assert_ne!(a, c);
        assert_ne!(a[0], a[1], "threads get distinct streams");
        assert_eq!(sa.hooked, 3 * 2 * 300);
        assert_eq!((sa.threads, sa.executions, sa.foreign_threads), (3, 6, 0));
        let yields = a
            .iter()
            .flatten()
            .filter(|d| **d == Decision::Yield)
            .count() as u64;
        assert_eq!(sa.yields, yields);
        assert!(sa.delays > 0);
    }

    #[test]
    fn foreign_threads_get_numbered_streams() {
        let _g = SERIAL.lock();
        let run = RunShared::new(3, busy_policy());
        activate(&run).unwrap();
        let seqs: Vec<Vec<Decision>> = std::thread::scope(|sc| {
            (0..2)
                .map(|_| sc.spawn(|| (0..200).map(|_| on_access()).collect()))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        deactivate(&run);
        let snap = run.stats.snapshot();
        assert_eq!(snap.foreign_threads, 2);
        assert_eq!(
            snap.hooked, 400,
            "foreign threads' counts are added at once"
        );
        // Each foreign thread's sequence is one of the two numbered streams.
        let expect = |n| {
            let mut rng = seed::stream(seed::foreign_seed(3, n));
            (0..200)
                .map(|_| busy_policy().decide(&mut rng))
                .collect::<Vec<_>>()
        };
        let (e0, e1) = (expect(0), expect(1));
        assert!((seqs[0] == e0 && seqs[1] == e1) || (seqs[0] == e1 && seqs[1] == e0));
    }

    #[test]
    fn round_start_needs_thread_enter() {
        let _g = SERIAL.lock();
        let run = RunShared::new(3, Policy::passive());
        assert!(round_start(&run, 0).is_err());
        thread_enter(&run, 0).unwrap();
        round_start(&run, 0).unwrap();
        thread_exit(&run).unwrap();
        assert!(round_start(&run, 1).is_err());
    }
}
