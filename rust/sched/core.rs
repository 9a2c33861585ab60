//! Exact mode: the threads of a test run one at a time, and a [`Scheduler`] decides at each
//! scheduling point which one goes on. Pure logic, no Python: the `hooks` module calls
//! [`Core`] with the interpreter released, so waiting threads hold neither the GIL nor
//! (on a free-threaded build) an attached thread state that a stop-the-world would wait for.
//!
//! The core keeps, for the current round, every managed thread (by a small id: the worker
//! index, or a number given to a thread the test starts) and its status: runnable, blocked on
//! a resource (a lock, a condition, a thread to join), or finished. Exactly one managed thread
//! is `running`; the others wait on one condition variable until they are chosen. Every
//! choice is appended to the round's decision list, which the replay policy can follow.
//!
//! - Blocking: a thread that would block calls [`Core::block`] with a resource id; another
//!   runnable thread is chosen. [`Core::wake`] makes the threads blocked on a resource runnable.
//!   A block with a timeout is woken as timed out when nothing else can run (virtual time).
//! - Deadlock: when no thread can run, none has a timeout and no wake comes within
//!   [`STALL_GRACE`] (a wake can only come from a thread the core does not manage), every
//!   blocked thread gets [`Wait::Deadlock`] and the round runs free from then on.
//! - Watchdog: [`Core::release`] (called when the running thread has not reached a scheduling
//!   point for too long, blocked where the core cannot see) lets every thread run free until
//!   the round ends; the round is recorded as not exact.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::*;

#[derive(Clone, Debug)]
struct Thread {
    status: Status,
    ident: u64,
    timed_out: bool,
    deadlocked: bool,
    /// When a timed block ends, on the round's virtual clock (ns).
    wake_at: u64,
    /// Where the thread waits to go on: (code object address, instruction offset), or
    /// [`AT_START`] / [`AT_SYNC`].
    at: Location,
}

struct State {
    round: Option<u64>,
    threads: BTreeMap<u32, Thread>,
    expected: usize,
    started: bool,
    first_arrival: Option<Instant>,
    running: Option<u32>,
    stalled_since: Option<Instant>,
    step: u64,
    record: RoundRecord,
    free: bool,
    sched: Box<dyn Scheduler>,
    next_child: u32,
    progress: u64,
    max_steps: u64,
    history: HashMap<u64, RoundRecord>,
    /// Resources woken while nobody was blocked on them: the next block on one returns at
    /// once, so a wake from a thread the core does not manage (which may come between a
    /// waiter's check and its block) is never lost. A spurious return is harmless: every
    /// caller checks its condition again.
    pending: HashSet<u64>,
    /// The runnable threads, ascending; rebuilt when `runnable_dirty` (set by every change
    /// of a thread's status or of the set of threads).
    runnable_buf: Vec<u32>,
    runnable_dirty: bool,
    /// The round's virtual clock (ns): advanced only when every thread waits with a timeout.
    vnow: u64,
}

impl State {
    fn live(&self) -> bool {
        self.threads.values().any(|t| t.status != Status::Finished)
    }

    /// Choose the next thread. `current` is the thread that reached the point, if runnable.
    /// Returns whether someone was chosen (false: nothing can run now).
    fn choose(&mut self, current: Option<u32>) -> bool {
        // A choice is made at every scheduling point; the runnable list only changes when a
        // thread comes, blocks, wakes or finishes, so it is kept until then.
        let mut runnable = std::mem::take(&mut self.runnable_buf);
        if self.runnable_dirty {
            runnable.clear();
            runnable.extend(
                self.threads
                    .iter()
                    .filter(|(_, t)| t.status == Status::Runnable)
                    .map(|(&id, _)| id),
            );
            self.runnable_dirty = false;
        }
        let chosen = self.choose_among(&mut runnable, current);
        self.runnable_buf = runnable;
        chosen
    }

    fn choose_among(&mut self, runnable: &mut Vec<u32>, current: Option<u32>) -> bool {
        let mut timeout_wake = false;
        if runnable.is_empty() {
            // Virtual time: when nothing else can run, the clock jumps to the earliest end of
            // a timed block, and the threads whose block ends then may go on (timed out).
            self.runnable_dirty = true; // the list below is not the runnable one
            let timed = |t: &Thread| matches!(t.status, Status::Blocked { timed: true, .. });
            if let Some(first) = self
                .threads
                .values()
                .filter(|t| timed(t))
                .map(|t| t.wake_at)
                .min()
            {
                self.vnow = self.vnow.max(first);
                runnable.extend(
                    self.threads
                        .iter()
                        .filter(|(_, t)| timed(t) && t.wake_at == first)
                        .map(|(&id, _)| id),
                );
            }
            timeout_wake = true;
        }
        if runnable.is_empty() {
            self.running = None;
            if self.live() && self.stalled_since.is_none() {
                self.stalled_since = Some(Instant::now());
            }
            return false;
        }
        self.stalled_since = None;
        let chosen = self.sched.choose(self.step, runnable, current);
        if timeout_wake {
            let t = self.threads.get_mut(&chosen).expect("chosen thread exists");
            t.status = Status::Runnable;
            t.timed_out = true;
        }
        self.step += 1;
        self.record.decisions.push(chosen);
        let at = self.threads.get(&chosen).map_or(AT_START, |t| t.at);
        self.record.steps.push(at);
        if current.is_some_and(|c| c != chosen) {
            self.record.preemptions += 1;
        }
        self.running = Some(chosen);
        true
    }

    fn finish_round(&mut self) {
        if let Some(round) = self.round {
            let mut record = std::mem::take(&mut self.record);
            record.divergences = self.sched.divergences();
            self.max_steps = self.max_steps.max(record.decisions.len() as u64);
            self.history.insert(round, record);
        }
    }
}

/// The serialising core of one test run.
pub struct Core {
    seed: u64,
    policy: Policy,
    /// The step estimate every round's scheduler is made with, when fixed (a replay from the
    /// seed: the round it replays was made with this one); otherwise the longest round so far.
    fixed_k: Option<u64>,
    state: Mutex<State>,
    /// One condition variable per slot (thread id modulo [`WAIT_SLOTS`]): a hand-over wakes
    /// the chosen thread only, not every waiter.
    cvs: [Condvar; WAIT_SLOTS],
    /// Set by [`Core::close`] (the test is over): no thread waits in this core any more.
    closed: AtomicBool,
    /// Bumped when a round starts: a thread's managed id is valid in one generation only.
    generation: AtomicU64,
}

impl Core {
    pub fn new(seed: u64, policy: Policy) -> Core {
        let sched = make_scheduler(seed, &policy, 0, DEFAULT_K);
        Core {
            seed,
            policy,
            fixed_k: None,
            state: Mutex::new(State {
                round: None,
                threads: BTreeMap::new(),
                expected: 0,
                started: false,
                first_arrival: None,
                running: None,
                stalled_since: None,
                step: 0,
                record: RoundRecord {
                    exact: true,
                    ..RoundRecord::default()
                },
                free: false,
                sched,
                next_child: 0,
                progress: 0,
                max_steps: 0,
                history: HashMap::new(),
                pending: HashSet::new(),
                runnable_buf: Vec::new(),
                runnable_dirty: true,
                vnow: 0,
            }),
            cvs: std::array::from_fn(|_| Condvar::new()),
            closed: AtomicBool::new(false),
            generation: AtomicU64::new(0),
        }
    }

    /// Make every round's scheduler with step estimate `k` (see [`RoundRecord::k`]).
    pub fn with_k(mut self, k: Option<u64>) -> Core {
        self.fixed_k = k.map(|k| k.max(1));
        self
    }

    /// The current round's generation (see [`Core::enter`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the core is closed (the test is over, or the interpreter shuts down).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || SHUTDOWN.load(Ordering::Acquire)
    }

    /// The test is over: every thread waiting in the core goes on at once (free), and every
    /// later call returns at once, so a thread the test left running never waits here again.
    /// The round records stay readable. Idempotent.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut st = self.state.lock();
        if !st.free {
            st.free = true;
            st.record.exact = false;
            st.record
                .reason
                .get_or_insert_with(|| "the test was over".to_string());
        }
        drop(st);
        self.notify_every();
    }

    fn slot(&self, tid: u32) -> &Condvar {
        &self.cvs[tid as usize % WAIT_SLOTS]
    }

    /// Wake the thread whose turn it now is (and any other thread sharing its slot).
    fn notify_turn(&self, st: &State) {
        if let Some(running) = st.running {
            self.slot(running).notify_all();
        }
    }

    /// Wake every waiting thread: the round started, runs free, or deadlocked.
    fn notify_every(&self) {
        for cv in &self.cvs {
            cv.notify_all();
        }
    }

    /// Worker `tid` (OS thread `ident`) starts round `round`, in which `expected` workers
    /// take part; the round's scheduler is seeded from `seed_round` (the round itself, or the
    /// round being replayed). The first choice is made once the workers have all arrived (or
    /// after [`ARRIVAL_TIMEOUT`]); returns when it is this thread's turn.
    pub fn enter(
        &self,
        tid: u32,
        ident: u64,
        round: u64,
        seed_round: u64,
        expected: usize,
    ) -> Wait {
        if self.is_closed() {
            return Wait::Free;
        }
        let mut st = self.state.lock();
        // A round goes on while threads the test started in it run: the next one waits.
        while st.round.is_some_and(|r| r != round) && st.live() {
            if self.is_closed() {
                return Wait::Free;
            }
            self.slot(tid).wait_for(&mut st, Duration::from_millis(50));
        }
        if st.round != Some(round) && !st.live() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            let k = self.fixed_k.unwrap_or(if st.max_steps > 0 {
                st.max_steps
            } else {
                DEFAULT_K
            });
            st.finish_round_if_pending();
            st.round = Some(round);
            st.threads.clear();
            st.runnable_dirty = true;
            st.vnow = 0;
            st.expected = expected;
            st.started = false;
            st.first_arrival = None;
            st.running = None;
            st.stalled_since = None;
            st.step = 0;
            st.record = RoundRecord {
                exact: true,
                ..RoundRecord::default()
            };
            st.free = false;
            st.pending.clear();
            st.record.k = k;
            st.sched = make_scheduler(self.seed, &self.policy, seed_round, k);
            st.next_child = expected.max(1) as u32;
        }
        st.progress += 1;
        st.runnable_dirty = true;
        st.threads.insert(
            tid,
            Thread {
                status: Status::Runnable,
                ident,
                timed_out: false,
                deadlocked: false,
                wake_at: 0,
                at: AT_START,
            },
        );
        st.first_arrival.get_or_insert_with(Instant::now);
        if !st.started {
            loop {
                if st.started {
                    break;
                }
                if self.is_closed() {
                    return Wait::Free;
                }
                let arrived = st.threads.len() >= st.expected;
                let late = st
                    .first_arrival
                    .is_some_and(|t| t.elapsed() >= ARRIVAL_TIMEOUT);
                if arrived || late {
                    st.started = true;
                    st.choose(None);
                    self.notify_turn(&st);
                    break;
                }
                self.slot(tid).wait_for(&mut st, Duration::from_millis(50));
            }
        } else if st.running.is_none() {
            st.choose(None);
            self.notify_turn(&st);
        }
        self.wait_turn(&mut st, tid)
    }

    /// Give a thread the test starts an id, runnable at once (it runs once it attaches).
    /// None when no round is going on.
    pub fn spawn(&self) -> Option<u32> {
        let mut st = self.state.lock();
        if !st.started || !st.live() {
            return None;
        }
        let tid = st.next_child;
        st.next_child += 1;
        st.progress += 1;
        st.runnable_dirty = true;
        st.threads.insert(
            tid,
            Thread {
                status: Status::Runnable,
                ident: 0,
                timed_out: false,
                deadlocked: false,
                wake_at: 0,
                at: AT_START,
            },
        );
        Some(tid)
    }

    /// A spawned thread starts running on OS thread `ident`: wait for its turn. `generation`:
    /// the one it was spawned in (a later round does not take it).
    pub fn attach(&self, tid: u32, ident: u64, generation: u64) -> Wait {
        if self.is_closed() || generation != self.generation() {
            return Wait::Free;
        }
        let mut st = self.state.lock();
        match st.threads.get_mut(&tid) {
            Some(t) if t.status != Status::Finished => t.ident = ident,
            _ => return Wait::Free,
        }
        st.progress += 1;
        if st.running.is_none() && st.started {
            st.choose(None);
            self.notify_turn(&st);
        }
        self.wait_turn(&mut st, tid)
    }

    /// A scheduling point reached by `tid`.
    pub fn point(&self, tid: u32) -> Wait {
        self.point_at(tid, AT_SYNC)
    }

    /// A scheduling point reached by `tid` at `at` (the access it is about to make).
    pub fn point_at(&self, tid: u32, at: Location) -> Wait {
        match self.try_point_at(tid, at) {
            Some(w) => w,
            None => self.await_turn(tid),
        }
    }

    /// The part of [`Core::point_at`] that never waits: the choice is made, and when `tid`
    /// goes on (or is not managed) that is the answer. `None`: another thread was chosen,
    /// and the caller must [`Core::await_turn`], with the interpreter released. A thread that
    /// keeps the turn thus never lets go of the interpreter, which is most points.
    pub fn try_point_at(&self, tid: u32, at: Location) -> Option<Wait> {
        if self.is_closed() {
            return Some(Wait::Free);
        }
        let mut st = self.state.lock();
        if st.free {
            return Some(Wait::Free);
        }
        match st.threads.get_mut(&tid) {
            Some(t) => t.at = at,
            None => return Some(Wait::Free),
        }
        st.progress += 1;
        if st.running == Some(tid) {
            st.choose(Some(tid));
            if st.running == Some(tid) {
                return Some(Wait::Turn);
            }
            self.notify_turn(&st);
        }
        None
    }

    /// Wait until it is `tid`'s turn again (or the round runs free).
    pub fn await_turn(&self, tid: u32) -> Wait {
        let mut st = self.state.lock();
        self.wait_turn(&mut st, tid)
    }

    /// `tid` cannot go on until `resource` is woken (or, when `timed`, until nothing else
    /// can run). Another thread is chosen meanwhile.
    pub fn block(&self, tid: u32, resource: u64, timed: bool) -> Wait {
        self.block_for(tid, resource, timed.then_some(0))
    }

    /// [`Core::block`] with the timeout in nanoseconds (None: untimed). When nothing can run,
    /// the block that ends first on the round's virtual clock times out first, so a thread
    /// waiting 0.1 s gives up before one waiting 30 s, as it would in real time.
    pub fn block_for(&self, tid: u32, resource: u64, timeout_ns: Option<u64>) -> Wait {
        let timed = timeout_ns.is_some();
        if self.is_closed() {
            return Wait::Free;
        }
        let mut st = self.state.lock();
        if st.free {
            return Wait::Free;
        }
        if st.pending.remove(&resource) {
            return Wait::Woken;
        }
        let vnow = st.vnow;
        match st.threads.get_mut(&tid) {
            Some(t) if t.status == Status::Runnable => {
                t.status = Status::Blocked { resource, timed };
                t.timed_out = false;
                t.at = AT_SYNC;
                t.wake_at = vnow.saturating_add(timeout_ns.unwrap_or(0));
            }
            _ => return Wait::Free,
        }
        st.runnable_dirty = true;
        st.progress += 1;
        if st.end_if_leftovers_blocked() {
            self.notify_every();
            return Wait::Free;
        }
        if st.running == Some(tid) || st.running.is_none() {
            st.choose(None);
            self.notify_turn(&st);
        }
        match self.wait_turn(&mut st, tid) {
            Wait::Turn => {
                let t = st.threads.get_mut(&tid).expect("managed");
                if std::mem::take(&mut t.timed_out) {
                    Wait::TimedOut
                } else {
                    Wait::Woken
                }
            }
            other => other,
        }
    }

    /// Make the threads blocked on `resource` runnable; returns how many. May be called from
    /// any thread, managed or not.
    pub fn wake(&self, resource: u64) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        for t in st.threads.values_mut() {
            if t.status
                == (Status::Blocked {
                    resource,
                    timed: false,
                })
                || t.status
                    == (Status::Blocked {
                        resource,
                        timed: true,
                    })
            {
                t.status = Status::Runnable;
                n += 1;
            }
        }
        if n == 0 {
            st.pending.insert(resource);
        } else {
            st.runnable_dirty = true;
            st.progress += 1;
            if st.started && st.running.is_none() && !st.free {
                st.choose(None);
                self.notify_turn(&st);
            }
        }
        n
    }

    /// `tid` leaves the round (its body returned or raised). Idempotent.
    pub fn exit(&self, tid: u32) {
        let mut st = self.state.lock();
        match st.threads.get_mut(&tid) {
            Some(t) if t.status != Status::Finished => t.status = Status::Finished,
            _ => return,
        }
        st.runnable_dirty = true;
        st.progress += 1;
        if st.end_if_leftovers_blocked() {
            self.notify_every();
            return;
        }
        if st.running == Some(tid) {
            st.choose(None);
        }
        if !st.live() {
            st.running = None;
            st.finish_round();
            st.round_done();
        }
        if st.live() {
            self.notify_turn(&st);
        } else {
            self.notify_every();
        }
    }

    /// The deadlock just declared was not one (a thread the core does not manage could still
    /// wake a waiter): the round runs free, not exact, for `reason`.
    pub fn not_deadlock(&self, reason: &str) {
        let mut st = self.state.lock();
        if st.record.deadlock {
            st.record.deadlock = false;
            st.record.reason = Some(reason.to_string());
        }
    }

    /// Let every thread of the current round run free until it ends (watchdog).
    pub fn release(&self, reason: &str) {
        let mut st = self.state.lock();
        if !st.free {
            st.free = true;
            st.record.exact = false;
            st.record.reason.get_or_insert_with(|| reason.to_string());
        }
        self.notify_every();
    }

    /// (running thread, its OS ident, progress counter, threads waiting, free, started).
    pub fn status(&self) -> (Option<u32>, u64, u64, usize, bool, bool) {
        let st = self.state.lock();
        let ident = st
            .running
            .and_then(|r| st.threads.get(&r))
            .map_or(0, |t| t.ident);
        let waiting = st
            .threads
            .iter()
            .filter(|(id, t)| t.status != Status::Finished && Some(**id) != st.running)
            .count();
        (st.running, ident, st.progress, waiting, st.free, st.started)
    }

    /// The managed threads of the current round: (id, OS ident, status).
    pub fn threads(&self) -> Vec<(u32, u64, Status)> {
        let st = self.state.lock();
        st.threads
            .iter()
            .map(|(&id, t)| (id, t.ident, t.status))
            .collect()
    }

    /// Whether `tid` is in the current round and has not finished.
    pub fn is_live(&self, tid: u32) -> bool {
        let st = self.state.lock();
        st.threads
            .get(&tid)
            .is_some_and(|t| t.status != Status::Finished)
    }

    /// Decisions made so far in the current round.
    pub fn step(&self) -> u64 {
        self.state.lock().step
    }

    /// The record of a finished round.
    pub fn round(&self, round: u64) -> Option<RoundRecord> {
        self.state.lock().history.get(&round).cloned()
    }

    fn wait_turn(&self, st: &mut parking_lot::MutexGuard<'_, State>, tid: u32) -> Wait {
        loop {
            if self.is_closed() {
                return Wait::Free;
            }
            let Some(me) = st.threads.get_mut(&tid) else {
                return Wait::Free;
            };
            if me.status == Status::Finished {
                return Wait::Free; // released when the round ended without it
            }
            if me.deadlocked {
                me.deadlocked = false;
                me.status = Status::Runnable;
                st.runnable_dirty = true;
                return Wait::Deadlock;
            }
            if st.free {
                if let Some(me) = st.threads.get_mut(&tid) {
                    if matches!(me.status, Status::Blocked { .. }) {
                        me.status = Status::Runnable;
                        st.runnable_dirty = true;
                    }
                }
                return Wait::Free;
            }
            if st.running == Some(tid) {
                return Wait::Turn;
            }
            if st.running.is_none() {
                if let Some(since) = st.stalled_since {
                    if since.elapsed() >= STALL_GRACE {
                        self.declare_deadlock(st);
                        continue;
                    }
                }
            }
            self.slot(tid).wait_for(st, Duration::from_millis(50));
        }
    }

    fn declare_deadlock(&self, st: &mut State) {
        st.record.deadlock = true;
        st.record.exact = false;
        st.record
            .reason
            .get_or_insert_with(|| "deadlock: every managed thread was blocked".to_string());
        for t in st.threads.values_mut() {
            if matches!(t.status, Status::Blocked { .. }) {
                t.deadlocked = true;
            }
        }
        st.free = true;
        st.stalled_since = None;
        self.notify_every();
    }
}

impl State {
    /// Every worker of the round has finished, and the threads the test started that have
    /// not are all blocked: nothing in the round can wake them, so they are blocked for good.
    /// They leave the round (each one's wait returns `Free`, and it runs unmanaged from then
    /// on) and the round ends. Returns whether it did.
    fn end_if_leftovers_blocked(&mut self) -> bool {
        let workers_done = (0..self.expected as u32).all(|id| {
            self.threads
                .get(&id)
                .is_some_and(|t| t.status == Status::Finished)
        });
        let blocked_only = self
            .threads
            .values()
            .all(|t| matches!(t.status, Status::Finished | Status::Blocked { .. }));
        if !workers_done || !blocked_only || !self.live() {
            return false;
        }
        for t in self.threads.values_mut() {
            t.status = Status::Finished;
        }
        self.runnable_dirty = true;
        self.running = None;
        self.stalled_since = None;
        self.finish_round();
        self.round_done();
        true
    }

    fn finish_round_if_pending(&mut self) {
        // A round whose threads never all exited (e.g. a child thread never attached).
        if self.round.is_some() && !self.record.decisions.is_empty() {
            self.finish_round();
        }
    }

    fn round_done(&mut self) {
        self.record = RoundRecord {
            exact: true,
            ..RoundRecord::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Run `threads` workers for one round; each takes `points` scheduling points and logs
    /// (tid, i) while it holds the turn. Returns the log and the round record.
    fn round(
        core: &Arc<Core>,
        r: u64,
        threads: u32,
        points: u32,
    ) -> (Vec<(u32, u32)>, RoundRecord) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicU64::new(0));
        std::thread::scope(|sc| {
            for tid in 0..threads {
                let (core, log, active) = (Arc::clone(core), Arc::clone(&log), Arc::clone(&active));
                sc.spawn(move || {
                    assert_eq!(
                        core.enter(tid, tid as u64, r, r, threads as usize),
                        Wait::Turn
                    );
                    for i in 0..points {
                        assert_eq!(active.fetch_add(1, Ordering::SeqCst), 0, "two threads ran");
                        log.lock().push((tid, i));
                        active.fetch_sub(1, Ordering::SeqCst);
                        core.point(tid);
                    }
                    core.exit(tid);
                });
            }
        });
        let log = log.lock().clone();
        (log, core.round(r).expect("recorded"))
    }

    #[test]
    fn one_thread_at_a_time_and_reproducible() {
        let a = Arc::new(Core::new(9, Policy::Random));
        let b = Arc::new(Core::new(9, Policy::Random));
        let (la, ra) = round(&a, 0, 3, 20);
        let (lb, rb) = round(&b, 0, 3, 20);
        assert_eq!(la, lb, "same seed, same interleaving");
        assert_eq!(ra.decisions, rb.decisions);
        assert!(ra.exact && !ra.deadlock);
        assert!(ra.preemptions > 5);
        let (lc, _) = round(&a, 1, 3, 20);
        assert_ne!(la, lc, "another round, another schedule");
    }

    #[test]
    fn the_mix_budget_bounds_hand_overs_in_long_rounds() {
        let switches = |budget: u32| -> u64 {
            let core = Arc::new(Core::new(5, Policy::Mix { budget }));
            // Round 0 measures the length; the later rounds are made with it as k.
            (0..9)
                .map(|r| round(&core, r, 4, 500).1.preemptions)
                .skip(1)
                .sum()
        };
        let (small, large) = (switches(4), switches(400));
        assert!(
            small < 8 * 40,
            "budget 4: {small} preemptions in 8 rounds of 2000 steps"
        );
        assert!(large > 4 * small, "budget 400: {large}, budget 4: {small}");
    }

    #[test]
    fn a_fixed_k_makes_a_round_the_same_without_its_history() {
        // A round made after others (k from their length) equals the same round run alone
        // with that k: what a replay from the seed does.
        let full = Arc::new(Core::new(8, Policy::Mix { budget: 16 }));
        for r in 0..3 {
            round(&full, r, 3, 200);
        }
        let (log, rec) = round(&full, 3, 3, 200);
        assert_ne!(rec.k, DEFAULT_K);
        let alone = Arc::new(Core::new(8, Policy::Mix { budget: 16 }).with_k(Some(rec.k)));
        let (again, rec2) = round(&alone, 3, 3, 200);
        assert_eq!(rec2.decisions, rec.decisions);
        assert_eq!(again, log);
    }

    #[test]
    fn replay_reproduces_a_recorded_round() {
        let a = Arc::new(Core::new(4, Policy::Pct { depth: 3 }));
        let (la, ra) = round(&a, 0, 3, 30);
        let r = Arc::new(Core::new(77, Policy::Replay(ra.decisions.clone())));
        for k in 0..3 {
            let (lr, rr) = round(&r, k, 3, 30);
            assert_eq!(lr, la);
            assert_eq!(rr.divergences, 0);
        }
    }

    #[test]
    fn blocking_hands_the_turn_over_and_wake_returns_it() {
        let core = Arc::new(Core::new(1, Policy::Replay(vec![0, 0])));
        let order = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|sc| {
            let (c0, o0) = (Arc::clone(&core), Arc::clone(&order));
            sc.spawn(move || {
                c0.enter(0, 0, 0, 0, 2);
                o0.lock().push("0 blocks");
                assert_eq!(c0.block(0, 42, false), Wait::Woken);
                o0.lock().push("0 woken");
                c0.exit(0);
            });
            let (c1, o1) = (Arc::clone(&core), Arc::clone(&order));
            sc.spawn(move || {
                c1.enter(1, 1, 0, 0, 2);
                o1.lock().push("1 wakes");
                assert_eq!(c1.wake(42), 1);
                c1.exit(1);
            });
        });
        assert_eq!(*order.lock(), vec!["0 blocks", "1 wakes", "0 woken"]);
    }

    #[test]
    fn a_wake_before_the_block_is_not_lost() {
        let core = Core::new(1, Policy::Random);
        core.enter(0, 0, 0, 0, 1);
        assert_eq!(core.wake(9), 0);
        assert_eq!(core.block(0, 9, false), Wait::Woken);
        core.exit(0);
    }

    #[test]
    fn a_timed_block_times_out_when_nothing_else_can_run() {
        let core = Core::new(1, Policy::Random);
        assert_eq!(core.enter(0, 0, 0, 0, 1), Wait::Turn);
        assert_eq!(core.block(0, 5, true), Wait::TimedOut);
        core.exit(0);
        assert!(core.round(0).unwrap().exact);
    }

    #[test]
    fn the_shortest_timed_block_times_out_first() {
        // Thread 0 waits 30 s, thread 1 waits 0.1 s, thread 2 for a wake that never comes:
        // with nothing else to run, virtual time ends thread 1's wait first.
        for seed in 0..8 {
            let core = Arc::new(Core::new(seed, Policy::Random));
            let order = Arc::new(Mutex::new(Vec::new()));
            std::thread::scope(|sc| {
                for (tid, timeout) in [
                    (0u32, Some(30_000_000_000u64)),
                    (1, Some(100_000_000)),
                    (2, None),
                ] {
                    let (core, order) = (Arc::clone(&core), Arc::clone(&order));
                    sc.spawn(move || {
                        core.enter(tid, tid as u64, 0, 0, 3);
                        let w = core.block_for(tid, 100 + tid as u64, timeout);
                        order.lock().push((tid, w));
                        if tid == 1 {
                            core.wake(102); // let thread 2 go too
                        }
                        core.exit(tid);
                    });
                }
            });
            let order = order.lock().clone();
            assert_eq!(order[0], (1, Wait::TimedOut), "seed {seed}: {order:?}");
            assert!(order.contains(&(2, Wait::Woken)), "seed {seed}: {order:?}");
            assert!(
                order.contains(&(0, Wait::TimedOut)),
                "seed {seed}: {order:?}"
            );
        }
    }

    #[test]
    fn close_releases_every_waiter_and_later_calls_pass_through() {
        let core = Arc::new(Core::new(5, Policy::Random));
        let results: Vec<Wait> = std::thread::scope(|sc| {
            // Two of three expected workers arrive and block: nobody can finish the round.
            let hs: Vec<_> = (0..2)
                .map(|tid| {
                    let core = Arc::clone(&core);
                    sc.spawn(move || {
                        core.enter(tid, 0, 0, 0, 3);
                        core.block(tid, 100 + tid as u64, false)
                    })
                })
                .collect();
            while core.threads().len() < 2 {
                std::thread::yield_now();
            }
            core.close();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|w| *w == Wait::Free), "{results:?}");
        assert!(core.is_closed());
        assert_eq!(core.enter(2, 0, 1, 1, 3), Wait::Free);
        assert_eq!(core.attach(7, 0, core.generation()), Wait::Free);
        assert_eq!(core.point(0), Wait::Free);
        assert_eq!(core.block(0, 1, false), Wait::Free);
    }

    #[test]
    fn deadlock_is_reported_to_every_blocked_thread() {
        let core = Arc::new(Core::new(3, Policy::Random));
        let results: Vec<Wait> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|tid| {
                    let core = Arc::clone(&core);
                    sc.spawn(move || {
                        core.enter(tid, 0, 0, 0, 2);
                        let w = core.block(tid, 100 + tid as u64, false);
                        core.exit(tid);
                        w
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results, vec![Wait::Deadlock, Wait::Deadlock]);
        let rec = core.round(0).unwrap();
        assert!(rec.deadlock && !rec.exact);
    }

    #[test]
    fn release_lets_everyone_run_free() {
        let core = Arc::new(Core::new(3, Policy::Pct { depth: 1 }));
        std::thread::scope(|sc| {
            let c = Arc::clone(&core);
            sc.spawn(move || {
                c.enter(0, 0, 0, 0, 2);
                c.enter(0, 0, 0, 0, 2); // idempotent re-entry keeps the turn logic sane
                c.exit(0);
            });
            let c = Arc::clone(&core);
            sc.spawn(move || {
                c.enter(1, 1, 0, 0, 2);
                c.exit(1);
            });
        });
        let c2 = Core::new(1, Policy::Random);
        c2.enter(0, 0, 0, 0, 1);
        c2.release("stuck in I/O");
        assert_eq!(c2.point(0), Wait::Free);
        assert_eq!(c2.block(0, 1, false), Wait::Free);
        c2.exit(0);
        let rec = c2.round(0).unwrap();
        assert!(!rec.exact);
        assert_eq!(rec.reason.as_deref(), Some("stuck in I/O"));
    }

    #[test]
    fn spawned_threads_take_turns_too() {
        let core = Arc::new(Core::new(5, Policy::Random));
        core.enter(0, 0, 0, 0, 1);
        let child = core.spawn().unwrap();
        assert_eq!(child, 1);
        std::thread::scope(|sc| {
            let c = Arc::clone(&core);
            sc.spawn(move || {
                c.attach(child, 7, c.generation());
                for _ in 0..10 {
                    c.point(child);
                }
                c.exit(child);
                c.wake(1000 + child as u64);
            });
            while core.is_live(child) {
                core.block(0, 1000 + child as u64, false);
            }
        });
        core.exit(0);
        let rec = core.round(0).unwrap();
        assert!(rec.exact && rec.decisions.contains(&1));
        assert_eq!(rec.steps.len(), rec.decisions.len());
    }

    #[test]
    fn steps_say_where_each_chosen_thread_went_on() {
        let core = Arc::new(Core::new(2, Policy::Replay(vec![0, 1, 0, 1, 0, 1])));
        std::thread::scope(|sc| {
            for tid in 0..2u32 {
                let core = Arc::clone(&core);
                sc.spawn(move || {
                    core.enter(tid, 0, 0, 0, 2);
                    for i in 0..2 {
                        core.point_at(tid, (100 + tid as usize, i));
                    }
                    core.exit(tid);
                });
            }
        });
        let rec = core.round(0).unwrap();
        assert_eq!(&rec.decisions[..4], &[0, 1, 0, 1]);
        assert_eq!(rec.steps[0], AT_START);
        assert_eq!(rec.steps[1], AT_START);
        assert_eq!(rec.steps[2], (100, 0));
        assert_eq!(rec.steps[3], (101, 0));
    }
}
