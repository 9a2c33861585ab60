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

/// The running thread has reached no scheduling point for this long and sleeps in the kernel:
/// it runs free (longer than a GIL hand-over, which a thread may wait for up to the 5 ms
/// switch interval).
pub const DETACH_QUIET: Duration = Duration::from_millis(10);
/// The watcher's record of the running thread asleep on every look (see `State::asleep`),
/// after a look that saw `state` for thread `running` at `progress`.
fn asleep_since(
    asleep: Option<(u32, u64, Instant)>,
    running: u32,
    progress: u64,
    state: Option<watch::ThreadState>,
    now: Instant,
) -> Option<(u32, u64, Instant)> {
    if state != Some(watch::ThreadState::Sleeping) {
        return None;
    }
    match asleep {
        Some((who, seen, since)) if who == running && seen == progress => Some((who, seen, since)),
        _ => Some((running, progress, now)),
    }
}

/// How long the running thread has been seen asleep on every look.
fn asleep_for(asleep: Option<(u32, u64, Instant)>, now: Instant) -> Duration {
    asleep.map_or(Duration::ZERO, |(_, _, since)| {
        now.saturating_duration_since(since)
    })
}

/// Whether the running thread, asleep at this look (`in_io`: in a system call that is not a
/// futex wait), seen asleep on every look for `asleep`, is blocked in C.
fn asleep_runs_free(in_io: bool, hurry: bool, asleep: Duration) -> bool {
    (in_io && (hurry || asleep > Duration::ZERO)) || asleep >= DETACH_QUIET
}

/// A thread computing without a scheduling point (a long C call, code outside the
/// instrumentation) runs free after this long, when it used CPU time meanwhile (a thread the
/// OS merely did not run is left alone).
pub const DETACH_COMPUTING: Duration = Duration::from_millis(500);
pub const DETACH_CPU_TICKS: u64 = 10;
/// How far a clock read moves the virtual clock on.
pub const CLOCK_TICK_NS: u64 = 1_000;

/// The instant virtual timelines count from (the first use in the process).
pub fn clock_anchor() -> Instant {
    static ANCHOR: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ANCHOR.get_or_init(Instant::now)
}

fn current_native_id() -> u64 {
    watch::native_id()
}

#[derive(Clone, Debug)]
struct Thread {
    status: Status,
    ident: u64,
    timed_out: bool,
    deadlocked: bool,
    /// Blocked by [`Core::block_patient`]: a stall ends its wait (as a time-out), not a
    /// deadlock.
    patient: bool,
    /// When a timed block ends, on the round's virtual clock (ns); for a patient block, its
    /// deadline (u64::MAX: none), past which the clock does not jump while it waits.
    wake_at: u64,
    /// Where the thread waits to go on: (code object address, instruction offset), or
    /// [`AT_START`] / [`AT_SYNC`].
    at: Location,
    /// The OS's id of the thread (`threading.get_native_id()`), 0 when unknown: the watcher
    /// reads whether it sleeps in the kernel.
    native: u64,
    /// Waiting inside the core for its turn (chosen but not woken yet counts too).
    in_core: bool,
    /// Running free, outside the schedule, since it blocked in C (see [`Core::watch`]):
    /// (the step at which it left, where it was). It rejoins at its next scheduling point.
    detached: Option<(u64, Location)>,
    /// It came back from running free and has not had the turn since: while it waits, the
    /// watcher looks often (the thread holding the turn may be blocked in C, waiting for it).
    back: bool,
    /// Real time (ns) the watcher saw the thread sleep in the kernel while it had the turn
    /// or ran free (a C call that waits: `select` with a timeout, a socket, a real lock), not
    /// yet on the virtual clock: it counts when the thread next reads a clock, so a loop that
    /// waits in C until the clock says it is time (asyncio's) sees time pass. The time the
    /// scheduling takes, the time others run and the time the OS did not run it do not count.
    slept_ns: u64,
    /// The virtual time when that sleep began to count: a read moves the clock to
    /// `slept_from + slept_ns` at most, so threads waiting in C at the same time (a client
    /// and its server, each on its socket) do not add up their waits.
    slept_from: u64,
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
    /// The round's virtual clock (ns since the round started): advanced by a timed block
    /// that ends and by a tick at every clock read of a managed thread (see `clock.rs`);
    /// never by the real time the scheduling takes.
    vnow: u64,
    /// Real time when the round started, and how far the virtual timeline (ns since
    /// [`clock_anchor`]) is ahead of it (so the clocks never go back from round to round).
    origin: Instant,
    carry: u64,
    /// The furthest point of the virtual timeline seen so far (ns since the anchor).
    timeline_end: u64,
    /// The earliest end of a timed block (u64::MAX: none, or not known to be earlier).
    next_wake: u64,
    /// Nothing to schedule while a thread runs free: since when (real), and vnow then.
    idle_real: Option<(Instant, u64)>,
    /// The round runs free: since when (real), and the virtual timeline then.
    free_at: Option<(Instant, u64)>,
    /// The watcher's view of the running thread: (thread, progress, since, its CPU ticks,
    /// the collector's epoch then).
    watch: Option<(u32, u64, Instant, Option<u64>, u64)>,
    /// Since when the watcher has seen the running thread asleep on every look, for
    /// (thread, progress): a thread seen asleep once (a page fault of a freshly forked child,
    /// a short futex wait) is not blocked in C.
    asleep: Option<(u32, u64, Instant)>,
    /// When the watcher last looked (the real time its samples stand for).
    last_poll: Option<Instant>,
    /// Ids below this may still be used by threads the test started in an earlier round
    /// that ran free and never finished: later rounds number their threads from above it.
    reserved: u32,
}

impl State {
    /// Whether the round goes on: a thread has not finished (a thread the test started that
    /// runs free outside the schedule does not hold the round open; a worker does).
    fn live(&self) -> bool {
        let workers = self.expected.max(1) as u32;
        self.threads
            .iter()
            .any(|(&id, t)| t.status != Status::Finished && (t.detached.is_none() || id < workers))
    }

    fn any_detached(&self) -> bool {
        self.threads
            .values()
            .any(|t| t.detached.is_some() && t.status != Status::Finished)
    }

    /// The virtual timeline now (ns since [`clock_anchor`]).
    fn timeline(&self) -> u64 {
        let origin = self.origin.saturating_duration_since(clock_anchor());
        (origin.as_nanos() as u64)
            .saturating_add(self.carry)
            .saturating_add(self.vnow)
    }

    /// Nothing was scheduled while a thread ran free: when the earliest timed block would
    /// have ended in the real time waited, the virtual clock moves on to its end (a poll
    /// with a sleep waits in real time for a thread outside the schedule). Otherwise the
    /// virtual clock stays: the wait for the free thread took real time, not virtual time.
    fn advance_idle(&mut self) {
        if let Some((since, v0)) = self.idle_real.take() {
            let first = self
                .threads
                .values()
                .filter(|t| matches!(t.status, Status::Blocked { timed: true, .. }))
                .map(|t| t.wake_at)
                .min();
            let waited = since.elapsed().as_nanos() as u64;
            if let Some(first) = first.filter(|&first| !self.patient_first(first)) {
                if v0.saturating_add(waited) >= first {
                    self.vnow = self.vnow.max(first);
                    self.next_wake = self.next_wake.min(first);
                }
            }
        }
    }

    /// Whether a patient block (see [`Core::block_patient`]) has a deadline no later than
    /// `first`, the earliest end of a timed block: the clock must not jump there, since that
    /// waiter would give up first (it ends at the stall, and then waits on the clock).
    fn patient_first(&self, first: u64) -> bool {
        self.threads
            .values()
            .any(|t| t.patient && matches!(t.status, Status::Blocked { .. }) && t.wake_at <= first)
    }

    /// Timed blocks whose end the virtual clock has reached become runnable (timed out).
    fn expire_timers(&mut self) {
        if self.vnow < self.next_wake {
            return;
        }
        let vnow = self.vnow;
        let mut next = u64::MAX;
        for t in self.threads.values_mut() {
            if matches!(t.status, Status::Blocked { timed: true, .. }) {
                if t.wake_at <= vnow {
                    t.status = Status::Runnable;
                    t.timed_out = true;
                    self.runnable_dirty = true;
                } else {
                    next = next.min(t.wake_at);
                }
            }
        }
        self.next_wake = next;
    }

    /// A thread that ran free comes back to the schedule (at a scheduling point of its own):
    /// when other threads were scheduled meanwhile, the round is no longer exact, and the
    /// record names where it left.
    fn rejoin(&mut self, tid: u32) {
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        let Some((step, at)) = t.detached.take() else {
            return;
        };
        self.runnable_dirty = true;
        self.progress += 1;
        t.back = true;
        if self.running.is_some_and(|r| r != tid) {
            watch::kick(); // the thread holding the turn may be blocked in C: look now
        }
        if self.step > step && self.record.exact && !self.free {
            self.record.exact = false;
            self.record.free_run = Some((tid, at));
            self.record.reason.get_or_insert_with(|| {
                format!(
                    "unmanaged blocking in thread {tid}: it ran outside the schedule while \
                     other threads were scheduled"
                )
            });
        }
    }

    /// Choose the next thread. `current` is the thread that reached the point, if runnable.
    /// Returns whether someone was chosen (false: nothing can run now).
    fn choose(&mut self, current: Option<u32>) -> bool {
        // A choice is made at every scheduling point; the runnable list only changes when a
        // thread comes, blocks, wakes or finishes, so it is kept until then.
        self.advance_idle();
        self.expire_timers();
        let mut runnable = std::mem::take(&mut self.runnable_buf);
        if self.runnable_dirty {
            runnable.clear();
            runnable.extend(
                self.threads
                    .iter()
                    .filter(|(_, t)| t.status == Status::Runnable && t.detached.is_none())
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
        if runnable.is_empty() && self.any_detached() {
            // A thread runs free outside the schedule (blocked in C, say on a socket another
            // thread serves): wait for it in real time, the clock going on meanwhile, until
            // it comes back or the earliest timed block ends (see `Core::wait_turn`).
            self.runnable_dirty = true;
            self.idle_real = Some((Instant::now(), self.vnow));
            self.running = None;
            self.stalled_since = None;
            return false;
        }
        if runnable.is_empty() {
            // Virtual time: when nothing else can run, the clock jumps to the earliest end of
            // a timed block, and the threads whose block ends then may go on (timed out).
            self.runnable_dirty = true; // the list below is not the runnable one
            let timed = |t: &Thread| matches!(t.status, Status::Blocked { timed: true, .. });
            // A patient waiter whose deadline comes first is let be: the stall ends its
            // wait, and its time-out then comes first on the clock.
            if let Some(first) = self
                .threads
                .values()
                .filter(|t| timed(t))
                .map(|t| t.wake_at)
                .min()
                .filter(|&first| !self.patient_first(first))
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
        let threads = &self.threads;
        // A thread the test started is at its start inside threading's code: not a worker's
        // start (the test's body), so it says "in a primitive" instead.
        let workers = self.expected as u32;
        let at = |t: u32| match threads.get(&t) {
            Some(x) if x.at == AT_START && t >= workers => AT_SYNC,
            Some(x) => x.at,
            None => AT_START,
        };
        let chosen = self.sched.choose_at(self.step, runnable, current, &at);
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
            self.timeline_end = self.timeline_end.max(self.timeline());
            let mut record = std::mem::take(&mut self.record);
            record.divergences = self.sched.divergences();
            if !record.exact {
                self.sched.round_not_exact();
            }
            self.sched.round_end();
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
    /// Wake-ups of the thread given the turn ([`Core::notify_turn`]), for [`Core::wakes`].
    wakes: AtomicU64,
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
                origin: Instant::now(),
                carry: 0,
                timeline_end: 0,
                next_wake: u64::MAX,
                idle_real: None,
                free_at: None,
                watch: None,
                asleep: None,
                last_poll: None,
                reserved: 0,
            }),
            cvs: std::array::from_fn(|_| Condvar::new()),
            wakes: AtomicU64::new(0),
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

    /// What the core learned from the rounds so far that shapes the next rounds' schedules:
    /// the longest round's steps (the step estimate a round's scheduler is made with).
    pub fn learned_steps(&self) -> u64 {
        self.state.lock().max_steps
    }

    /// Learn what [`Core::learned_steps`] gave in another process of the test (a forked
    /// round's): the estimate is the longest round of both.
    pub fn learn_steps(&self, steps: u64) {
        let mut st = self.state.lock();
        st.max_steps = st.max_steps.max(steps);
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
            st.go_free();
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
            self.wakes.fetch_add(1, Ordering::Relaxed);
            self.slot(running).notify_all();
        }
    }

    /// How many times a thread was woken to take the turn so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
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
            if let Some(left) = st
                .threads
                .iter()
                .filter(|(_, t)| t.status != Status::Finished)
                .map(|(&id, _)| id)
                .max()
            {
                st.reserved = st.reserved.max(left + 1);
            }
            st.threads.clear();
            st.asleep = None;
            st.runnable_dirty = true;
            // The first round's virtual clock starts at the real time (never behind where a
            // timeline got to); each later round goes on from where the last one's stopped.
            // The real time the serialised rounds took is no time the code saw pass: state
            // kept from round to round (a circuit breaker opened in round 0) sees only the
            // time the rounds' code waited, as it would without the scheduling.
            let first = st.round.is_none();
            let end = st.timeline().max(st.timeline_end);
            st.timeline_end = end;
            st.vnow = 0;
            if first {
                st.origin = Instant::now();
                st.carry = 0;
                let start = st.timeline();
                st.carry = end.saturating_sub(start);
            } else {
                let origin = st.origin.saturating_duration_since(clock_anchor());
                st.carry = end.saturating_sub(origin.as_nanos() as u64);
            }
            st.next_wake = u64::MAX;
            st.idle_real = None;
            st.free_at = None;
            st.watch = None;
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
            st.next_child = (expected.max(1) as u32).max(st.reserved);
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
                patient: false,
                wake_at: 0,
                at: AT_START,
                native: current_native_id(),
                in_core: false,
                detached: None,
                back: false,
                slept_ns: 0,
                slept_from: 0,
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
                patient: false,
                wake_at: 0,
                at: AT_START,
                native: 0, // known once it attaches
                in_core: false,
                detached: None,
                back: false,
                slept_ns: 0,
                slept_from: 0,
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
            Some(t) if t.status != Status::Finished => {
                t.ident = ident;
                t.native = current_native_id();
            }
            _ => return Wait::Free,
        }
        st.rejoin(tid);
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
        let (kept, handed) = self.try_point_quiet(tid, at);
        if handed {
            self.notify_running();
        }
        kept
    }

    /// [`Core::try_point_at`] without waking the thread it hands the turn to: `(kept,
    /// handed)`, and when `handed` the caller wakes it with [`Core::notify_running`] (or
    /// [`Core::await_turn_handed`]) once it has let go of the interpreter. Woken while this
    /// thread still holds the GIL, the next thread would only wake to block on the GIL and
    /// sleep again: two wake-ups for one hand-over instead of one.
    pub fn try_point_quiet(&self, tid: u32, at: Location) -> (Option<Wait>, bool) {
        if self.is_closed() {
            return (Some(Wait::Free), false);
        }
        let mut st = self.state.lock();
        if st.free {
            return (Some(Wait::Free), false);
        }
        match st.threads.get_mut(&tid) {
            Some(t) => {
                if t.detached.is_some() {
                    st.rejoin(tid);
                    return (self.rejoin_turn(&mut st, tid), false);
                }
                t.at = at;
            }
            None => return (Some(Wait::Free), false),
        }
        st.progress += 1;
        if st.running == Some(tid) {
            st.choose(Some(tid));
            if st.running == Some(tid) {
                return (Some(Wait::Turn), false);
            }
            return (None, true);
        }
        (None, false)
    }

    /// Wake the thread whose turn it is now (after [`Core::try_point_quiet`] handed it over).
    pub fn notify_running(&self) {
        let st = self.state.lock();
        self.notify_turn(&st);
    }

    /// Wait until it is `tid`'s turn again (or the round runs free).
    pub fn await_turn(&self, tid: u32) -> Wait {
        self.await_turn_handed(tid, false)
    }

    /// [`Core::await_turn`] after [`Core::try_point_quiet`]: when `handed`, first wake the
    /// thread the turn went to (under the same lock as the wait).
    pub fn await_turn_handed(&self, tid: u32, handed: bool) -> Wait {
        let mut st = self.state.lock();
        if handed {
            self.notify_turn(&st);
        }
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
        self.block_with(tid, resource, timeout_ns, false)
    }

    /// An untimed [`Core::block`] that a stall ends: when every managed thread has been
    /// blocked for [`STALL_GRACE`], it returns [`Wait::TimedOut`] instead of a deadlock being
    /// declared. For a timed wait that a thread the core does not manage may end: the waiter
    /// looks at that thread again and waits on (see `coop._patient_block`). `deadline_ns`:
    /// what is left of that wait's timeout on the virtual clock; while it waits, no timed
    /// block that ends later times out (the clock does not jump past its deadline).
    pub fn block_patient(&self, tid: u32, resource: u64, deadline_ns: Option<u64>) -> Wait {
        self.block_with(tid, resource, deadline_ns, true)
    }

    fn block_with(&self, tid: u32, resource: u64, timeout_ns: Option<u64>, patient: bool) -> Wait {
        let timed = timeout_ns.is_some() && !patient;
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
        st.rejoin(tid);
        let vnow = st.vnow;
        let wake_at = match st.threads.get_mut(&tid) {
            Some(t) if t.status == Status::Runnable => {
                t.status = Status::Blocked { resource, timed };
                t.timed_out = false;
                t.patient = patient;
                t.at = AT_SYNC;
                t.wake_at = match timeout_ns {
                    Some(ns) => vnow.saturating_add(ns),
                    None if patient => u64::MAX,
                    None => vnow,
                };
                t.wake_at
            }
            _ => return Wait::Free,
        };
        if timed {
            st.next_wake = st.next_wake.min(wake_at);
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
        st.rejoin(tid);
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
        if st.running == Some(tid) || (st.running.is_none() && st.started && !st.free) {
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
            st.go_free();
            st.record.exact = false;
            st.record.reason.get_or_insert_with(|| reason.to_string());
        }
        self.notify_every();
    }

    /// The watcher's look at the round (every millisecond or two, see `watch.rs`): when the
    /// running thread has reached no scheduling point for a while and sleeps in the kernel
    /// (a socket, `select`, a real lock, a C extension's wait, a child process), or has
    /// computed without one for long, it runs free from here, outside the schedule, and
    /// another thread is chosen; it rejoins at its next scheduling point. A thread asleep in
    /// a system call that is not a futex wait (a socket, a pipe, `select`: see
    /// [`watch::blocked_in_io`]) runs free when seen so on two looks in a row, and on the first
    /// while a thread that came back from C waits for the turn (the two ends of a socket take
    /// turns this way). A thread that waits for the interpreter (given the turn and taking
    /// the GIL back, or asleep on the GIL's own futex: [`watch::waits_for_interpreter`]) is
    /// in the hand-over, not blocked in C: on a loaded machine the GIL's holder may run late,
    /// and that wait neither lets it run free nor counts as time it waited in C. Returns
    /// whether such a thread waits (the watcher then looks again soon).
    pub fn watch(&self, now: Instant) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut st = self.state.lock();
        let mut interval = st.last_poll.replace(now).map_or(0, |last| {
            now.saturating_duration_since(last).as_nanos() as u64
        });
        let (gc, collecting) = watch::gc_state();
        if collecting {
            interval = 0; // parked by the collector, not waiting in C
        }
        if collecting && st.started && !st.free {
            // The collector, or the plugin arming code (a stop of the world on a free-threaded
            // build: `instrument._arm`), holds the threads up: the running thread waits for
            // the interpreter, not in C, however long; the look starts over when it ends.
            st.watch = None;
            st.asleep = None;
            return false;
        }
        if !st.started || st.free {
            st.watch = None;
            st.last_poll = None;
            return false;
        }
        // Sample who sleeps in the kernel: the running thread (unless it waits in the core
        // for its turn) and the threads that run free; each sample stands for the time since
        // the last one.
        let mut running_state = None;
        let mut running_waits = false;
        let running = st.running;
        let vnow = st.vnow;
        for (&id, t) in st.threads.iter_mut() {
            let watched = if Some(id) == running {
                !t.in_core
            } else {
                t.detached.is_some() && t.status != Status::Finished
            };
            if !watched || t.native == 0 {
                continue;
            }
            let state = watch::thread_state(t.native);
            let sleeping = state == Some(watch::ThreadState::Sleeping);
            // Waiting for the interpreter (the GIL, a stop-the-world) is no wait in C: the
            // thread is in the schedule's own hand-over, however long the OS takes.
            if watch::waits_for_interpreter(t.native, sleeping) {
                running_waits |= Some(id) == running;
                continue;
            }
            if sleeping {
                if t.slept_ns == 0 {
                    t.slept_from = vnow;
                }
                t.slept_ns = t.slept_ns.saturating_add(interval);
            }
            if Some(id) == running {
                running_state = Some(state);
            }
        }
        let hurry = st.threads.iter().any(|(&id, t)| {
            t.back && t.status == Status::Runnable && t.detached.is_none() && Some(id) != running
        });
        let Some(running) = running else {
            st.watch = None;
            return hurry;
        };
        let Some(state) = running_state.filter(|_| !running_waits) else {
            st.watch = None; // chosen, not awake yet, or taking the interpreter back
            st.asleep = None;
            return hurry;
        };
        let progress = st.progress;
        st.asleep = asleep_since(st.asleep, running, progress, state, now);
        let in_io = state == Some(watch::ThreadState::Sleeping)
            && !collecting
            && st
                .threads
                .get(&running)
                .is_some_and(|t| watch::blocked_in_io(t.native) == Some(true));
        let (since, cpu0, seen_before) = match st.watch {
            Some((who, seen, since, cpu, epoch))
                if who == running && seen == progress && epoch == gc =>
            {
                (since, cpu, true)
            }
            _ if in_io && hurry => (now, None, false),
            _ => {
                st.watch = Some((running, progress, now, None, gc));
                return hurry;
            }
        };
        let quiet = now.saturating_duration_since(since);
        // Asleep in I/O: at once when a thread that came back from C waits, else on the
        // second look asleep; any other wait (a futex may be the GIL's) when asleep on every look
        // for DETACH_QUIET.
        if quiet < DETACH_QUIET && !(in_io && (hurry || seen_before)) {
            return hurry;
        }
        let others = st
            .threads
            .iter()
            .any(|(&id, t)| id != running && t.status != Status::Finished);
        // A thread being started, not attached yet: its starter waits in C for it on
        // purpose, holding the turn (the schedule must not depend on when the OS runs it).
        let starting = st
            .threads
            .values()
            .any(|t| t.ident == 0 && t.status != Status::Finished);
        if !others || starting {
            return hurry;
        }
        let detach = match state {
            // In I/O: at once while a thread that came back from C waits, else when it was
            // asleep at the look before too; any other sleep: on every look for the quiet time.
            Some(watch::ThreadState::Sleeping) => {
                asleep_runs_free(in_io, hurry, asleep_for(st.asleep, now))
            }
            Some(watch::ThreadState::Running { cpu_ticks }) => {
                if cpu0.is_none() {
                    st.watch = Some((running, progress, since, Some(cpu_ticks), gc));
                }
                let spent = cpu_ticks.saturating_sub(cpu0.unwrap_or(cpu_ticks));
                spent >= DETACH_CPU_TICKS && quiet >= DETACH_COMPUTING
            }
            Some(watch::ThreadState::Other) => false,
            None => quiet >= DETACH_COMPUTING,
        };
        if !detach {
            return hurry;
        }
        let step = st.step;
        let t = st.threads.get_mut(&running).expect("running thread exists");
        t.detached = Some((step, t.at));
        st.watch = None;
        st.runnable_dirty = true;
        st.progress += 1;
        st.running = None;
        st.choose(None);
        self.notify_turn(&st);
        false
    }

    /// The virtual timeline (ns since [`clock_anchor`]) as managed thread `tid` reads a clock:
    /// each read moves it on by [`CLOCK_TICK_NS`] (two reads never see the same time), a
    /// thread that runs free reads it as it is, and once the round runs free it goes on with
    /// real time. None when `tid` is not in a round (it reads the real clocks).
    pub fn clock_now(&self, tid: u32) -> Option<u64> {
        if self.is_closed() {
            return None;
        }
        let mut st = self.state.lock();
        let t = st.threads.get(&tid)?;
        if t.status == Status::Finished || !st.started {
            return None;
        }
        if let Some((at, base)) = st.free_at {
            let now = base.saturating_add(at.elapsed().as_nanos() as u64);
            st.timeline_end = st.timeline_end.max(now);
            return Some(now);
        }
        let detached = t.detached.is_some();
        if detached || st.running == Some(tid) {
            let t = st.threads.get_mut(&tid).expect("checked above");
            let slept = std::mem::take(&mut t.slept_ns);
            if slept > 0 {
                let reached = t.slept_from.saturating_add(slept);
                st.vnow = st.vnow.max(reached);
            }
        }
        if !detached {
            // A thread that runs free reads without a tick: its reads are not part of the
            // schedule.
            st.vnow = st.vnow.saturating_add(CLOCK_TICK_NS);
        }
        Some(st.timeline())
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

    /// `f` of the record of a finished round, read in place (a record holds every decision
    /// and step of the round: a copy costs as much as the round had points).
    pub fn with_round<T>(&self, round: u64, f: impl FnOnce(&RoundRecord) -> T) -> Option<T> {
        self.state.lock().history.get(&round).map(f)
    }

    fn wait_turn(&self, st: &mut parking_lot::MutexGuard<'_, State>, tid: u32) -> Wait {
        if st.threads.get(&tid).is_some_and(|t| t.detached.is_some()) {
            st.rejoin(tid); // a thread waiting here is at a scheduling point
            if st.running.is_none() && st.started && !st.free {
                st.choose(None);
                self.notify_turn(st);
            }
        }
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
                if let Some(me) = st.threads.get_mut(&tid) {
                    me.in_core = false;
                    me.back = false;
                    watch::given_turn(me.native);
                }
                return Wait::Turn;
            }
            let mut nap = Duration::from_millis(50);
            if st.running.is_none() {
                if let Some(since) = st.stalled_since {
                    if since.elapsed() >= STALL_GRACE {
                        if st.end_patient_blocks() {
                            self.notify_turn(st);
                        } else {
                            self.declare_deadlock(st);
                        }
                        continue;
                    }
                }
                if let Some((since, v0)) = st.idle_real {
                    // Waiting for a thread that runs free: the earliest timed block ends when
                    // as much real time has passed.
                    if st.next_wake == u64::MAX {
                        st.next_wake = st
                            .threads
                            .values()
                            .filter(|t| matches!(t.status, Status::Blocked { timed: true, .. }))
                            .map(|t| t.wake_at)
                            .min()
                            .unwrap_or(u64::MAX);
                    }
                    if st.next_wake != u64::MAX {
                        let due = Duration::from_nanos(st.next_wake.saturating_sub(v0));
                        let waited = since.elapsed();
                        if waited >= due {
                            st.choose(None);
                            self.notify_turn(st);
                            continue;
                        }
                        nap = nap.min(due - waited);
                    }
                }
            }
            if let Some(me) = st.threads.get_mut(&tid) {
                me.in_core = true;
            }
            self.slot(tid).wait_for(st, nap);
            if let Some(me) = st.threads.get_mut(&tid) {
                me.in_core = false;
            }
        }
    }

    /// A thread that ran free came back at a scheduling point: it goes on when it is chosen
    /// (at once when nothing else is scheduled). `None`: the caller waits for its turn.
    fn rejoin_turn(&self, st: &mut parking_lot::MutexGuard<'_, State>, tid: u32) -> Option<Wait> {
        if st.running.is_none() && st.started {
            st.choose(None);
            self.notify_turn(st);
        }
        if st.running == Some(tid) {
            if let Some(me) = st.threads.get_mut(&tid) {
                me.back = false;
            }
            Some(Wait::Turn)
        } else {
            None
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
        st.go_free();
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

    /// A stall: the patient blocks (see [`Core::block_patient`]) end as timed out, and one of
    /// them is chosen. Returns whether there was one.
    fn end_patient_blocks(&mut self) -> bool {
        let mut any = false;
        for t in self.threads.values_mut() {
            if t.patient && matches!(t.status, Status::Blocked { .. }) {
                t.status = Status::Runnable;
                t.timed_out = true;
                t.patient = false;
                any = true;
            }
        }
        if any {
            self.runnable_dirty = true;
            self.stalled_since = None;
            self.progress += 1;
            self.choose(None);
        }
        any
    }

    fn finish_round_if_pending(&mut self) {
        // A round whose threads never all exited (e.g. a child thread never attached).
        if self.round.is_some() && !self.record.decisions.is_empty() {
            self.finish_round();
        }
    }

    /// The round runs free from now on: the clocks go on with real time from where the
    /// virtual one got to.
    fn go_free(&mut self) {
        self.free = true;
        self.record.released = true;
        let now = self.timeline();
        self.free_at = Some((Instant::now(), now));
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

    #[test]
    fn a_thread_is_blocked_only_when_asleep_on_every_look() {
        let sleeping = Some(watch::ThreadState::Sleeping);
        let running = Some(watch::ThreadState::Running { cpu_ticks: 3 });
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Asleep at the first look and at one 12 ms later, awake (a page fault of a forked
        // child, a short futex wait) between them: not asleep for the quiet time.
        let a = asleep_since(None, 1, 5, sleeping, at(0));
        let a = asleep_since(a, 1, 5, running, at(6));
        let a = asleep_since(a, 1, 5, sleeping, at(12));
        assert!(asleep_for(a, at(12)) < DETACH_QUIET);
        // Asleep on every look: blocked.
        let b = asleep_since(None, 1, 5, sleeping, at(0));
        let b = asleep_since(b, 1, 5, sleeping, at(6));
        let b = asleep_since(b, 1, 5, sleeping, at(12));
        assert!(asleep_for(b, at(12)) >= DETACH_QUIET);
        assert!(!asleep_runs_free(false, false, asleep_for(a, at(12))));
        assert!(asleep_runs_free(false, false, asleep_for(b, at(12))));
        // In I/O: on the second look asleep in a row, or at once while a thread waits.
        let c = asleep_since(None, 1, 5, sleeping, at(20));
        assert!(!asleep_runs_free(true, false, asleep_for(c, at(20))));
        assert!(asleep_runs_free(true, true, asleep_for(c, at(20))));
        let c = asleep_since(c, 1, 5, sleeping, at(22));
        assert!(asleep_runs_free(true, false, asleep_for(c, at(22))));
        // Progress or another thread starts it over.
        assert_eq!(
            asleep_for(asleep_since(b, 1, 6, sleeping, at(13)), at(13)),
            Duration::ZERO
        );
        assert_eq!(
            asleep_for(asleep_since(b, 2, 5, sleeping, at(13)), at(13)),
            Duration::ZERO
        );
    }

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
    fn a_hand_over_wakes_the_next_thread_only_when_the_giver_waits() {
        // The hook's sequence: `try_point_quiet` with the interpreter held, then (the GIL
        // released) `await_turn_handed`. The thread given the turn must not be woken before
        // the giver lets go of the GIL (it would wake only to wait for the GIL): the quiet
        // try wakes nobody, and the wait wakes it once.
        let core = Arc::new(Core::new(3, Policy::Random));
        let threads = 3u32;
        let early = Arc::new(AtomicU64::new(0));
        let handed = Arc::new(AtomicU64::new(0));
        std::thread::scope(|sc| {
            for tid in 0..threads {
                let (core, early, handed) =
                    (Arc::clone(&core), Arc::clone(&early), Arc::clone(&handed));
                sc.spawn(move || {
                    assert_eq!(
                        core.enter(tid, tid as u64, 0, 0, threads as usize),
                        Wait::Turn
                    );
                    for i in 0..200u32 {
                        let before = core.wakes();
                        let (kept, gave) = core.try_point_quiet(tid, (1, i));
                        // Only this thread runs, so nobody else wakes anyone meanwhile.
                        early.fetch_add(core.wakes() - before, Ordering::SeqCst);
                        if kept.is_none() {
                            handed.fetch_add(gave as u64, Ordering::SeqCst);
                            let before = core.wakes();
                            assert_eq!(core.await_turn_handed(tid, gave), Wait::Turn);
                            // The wake-up it gave is counted before it slept.
                            assert!(core.wakes() > before || !gave);
                        }
                    }
                    core.exit(tid);
                });
            }
        });
        assert_eq!(
            early.load(Ordering::SeqCst),
            0,
            "woken while the giver held the GIL"
        );
        assert!(handed.load(Ordering::SeqCst) > 50);
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
    fn a_first_round_far_longer_than_its_estimate_keeps_few_hand_overs() {
        // Round 0 is made with DEFAULT_K (200) steps; this one takes 20,000. At the full rate
        // the aligned and random policies made thousands of hand-overs here (0.12 and 0.24 of
        // the points); past the estimate the rate fades, so about the budget's worth times a
        // log factor are left.
        for seed in 1..=6 {
            let core = Arc::new(Core::new(seed, Policy::Mix { budget: 48 }));
            let (_, record) = round(&core, 0, 4, 5_000);
            assert_eq!(record.decisions.len(), 20_000 + 4);
            assert!(
                record.preemptions < 600,
                "seed {seed}: {} preemptions in a round of 20,000 steps",
                record.preemptions
            );
        }
    }

    #[test]
    fn a_core_that_learns_the_steps_makes_the_rounds_another_core_would() {
        // A forked round runs in a copy of the core made before the rounds that ran in other
        // processes: handed what those taught the scheduler, it makes the same round as the
        // core that ran them.
        let full = Arc::new(Core::new(8, Policy::Mix { budget: 16 }));
        for r in 0..3 {
            round(&full, r, 3, 200);
        }
        let (log, rec) = round(&full, 3, 3, 200);
        let fresh = Arc::new(Core::new(8, Policy::Mix { budget: 16 }));
        assert_eq!(fresh.learned_steps(), 0);
        fresh.learn_steps(full.learned_steps());
        fresh.learn_steps(1); // a shorter round elsewhere does not lower the estimate
        let (again, rec2) = round(&fresh, 3, 3, 200);
        assert_eq!(rec2.k, rec.k);
        assert_eq!(rec2.decisions, rec.decisions);
        assert_eq!(again, log);
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
    fn a_stall_ends_a_patient_block_and_is_no_deadlock() {
        // Thread 0 waits patiently (a wake may come from outside the core), thread 1 for a
        // wake: once both have waited the stall grace, thread 0's wait ends as timed out and
        // the round goes on exact; when it then waits for a wake too, it is a deadlock.
        let core = Arc::new(Core::new(3, Policy::Random));
        let results: Vec<Vec<Wait>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|tid| {
                    let core = Arc::clone(&core);
                    sc.spawn(move || {
                        core.enter(tid, 0, 0, 0, 2);
                        let mut out = Vec::new();
                        if tid == 0 {
                            out.push(core.block_patient(0, 100, None));
                            assert!(!core.state.lock().record.deadlock);
                        }
                        out.push(core.block(tid, 200, false));
                        core.exit(tid);
                        out
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results,
            vec![vec![Wait::TimedOut, Wait::Deadlock], vec![Wait::Deadlock]]
        );
    }

    #[test]
    fn a_longer_timed_block_never_times_out_before_a_patient_deadline() {
        // Thread 0 waits patiently with 0.1 s left, thread 1 for 30 s: the clock must not
        // jump to thread 1's end first. The stall ends thread 0's patient wait, its timed
        // wait then ends first, and thread 1's after it.
        let core = Arc::new(Core::new(3, Policy::Random));
        let log = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|sc| {
            for tid in 0..2u32 {
                let (core, log) = (Arc::clone(&core), Arc::clone(&log));
                sc.spawn(move || {
                    core.enter(tid, 0, 0, 0, 2);
                    if tid == 0 {
                        let w = core.block_patient(0, 100, Some(100_000_000));
                        log.lock().push((0, w));
                        let w = core.block_for(0, 100, Some(100_000_000));
                        log.lock().push((0, w));
                    } else {
                        let w = core.block_for(1, 200, Some(30_000_000_000));
                        log.lock().push((1, w));
                    }
                    core.exit(tid);
                });
            }
        });
        assert_eq!(
            *log.lock(),
            vec![
                (0, Wait::TimedOut),
                (0, Wait::TimedOut),
                (1, Wait::TimedOut)
            ]
        );
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
    fn a_thread_blocked_in_the_kernel_runs_free_and_the_others_go_on() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // Thread 0 has the turn and blocks on a channel (in the kernel) that thread 1 fills:
        // the watcher lets it run free, thread 1 is scheduled, and thread 0 rejoins.
        let core = Arc::new(Core::new(1, Policy::Replay(vec![0, 0, 1])));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let done = Arc::new(AtomicU64::new(0));
        std::thread::scope(|sc| {
            let c0 = Arc::clone(&core);
            let d0 = Arc::clone(&done);
            sc.spawn(move || {
                c0.enter(0, 10, 0, 0, 2);
                c0.point_at(0, (7, 3));
                rx.recv().unwrap(); // blocks outside the core
                c0.point(0); // rejoins
                c0.exit(0);
                d0.fetch_add(1, Ordering::SeqCst);
            });
            let c1 = Arc::clone(&core);
            let d1 = Arc::clone(&done);
            sc.spawn(move || {
                c1.enter(1, 11, 0, 0, 2);
                tx.send(()).unwrap();
                c1.exit(1);
                d1.fetch_add(1, Ordering::SeqCst);
            });
            while done.load(Ordering::SeqCst) < 2 {
                core.watch(Instant::now());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let rec = core.round(0).unwrap();
        assert!(!rec.exact && !rec.released, "{rec:?}");
        assert_eq!(rec.free_run, Some((0, (7, 3))));
        assert!(rec.reason.unwrap().contains("thread 0"));
    }

    #[test]
    fn the_virtual_clock_moves_by_reads_and_timed_blocks_only_and_never_goes_back() {
        let core = Core::new(1, Policy::Random);
        assert_eq!(core.clock_now(0), None, "no round yet: real time");
        core.enter(0, 0, 0, 0, 1);
        let a = core.clock_now(0).unwrap();
        let b = core.clock_now(0).unwrap();
        assert!(b - a >= CLOCK_TICK_NS);
        // A wait in the kernel while the thread has the turn counts (a C call's timeout), as
        // far as the watcher saw it.
        let stop = AtomicU64::new(0);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while stop.load(Ordering::SeqCst) == 0 {
                    core.watch(Instant::now());
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            std::thread::sleep(Duration::from_millis(40));
            stop.store(1, Ordering::SeqCst);
        });
        let b2 = core.clock_now(0).unwrap();
        if cfg!(target_os = "linux") {
            assert!(b2 - b >= 20_000_000, "{}", b2 - b);
        }
        assert_eq!(core.block_for(0, 3, Some(5_000_000_000)), Wait::TimedOut);
        let c = core.clock_now(0).unwrap();
        assert!(c - b2 >= 5_000_000_000);
        assert!(
            c - b2 < 5_010_000_000,
            "the block took no virtual time of its own"
        );
        core.exit(0);
        assert_eq!(core.clock_now(0), None, "finished: real time");
        core.enter(0, 0, 1, 1, 1);
        assert!(
            core.clock_now(0).unwrap() > c,
            "round 1 starts where round 0 got to"
        );
        core.release("test");
        let d = core.clock_now(0).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            core.clock_now(0).unwrap() >= d + 5_000_000,
            "free: real time again"
        );
        core.exit(0);
    }

    #[test]
    fn a_later_round_goes_on_from_where_the_last_ones_clock_stopped() {
        let core = Core::new(1, Policy::Random);
        core.enter(0, 0, 0, 0, 1);
        let first = core.clock_now(0).unwrap();
        core.exit(0);
        // The real time between the rounds (or the scheduling of a long round) is not seen.
        std::thread::sleep(Duration::from_millis(30));
        core.enter(0, 0, 1, 1, 1);
        let next = core.clock_now(0).unwrap();
        assert!(next > first, "never back");
        assert!(next - first < 10_000_000, "{}", next - first);
        core.exit(0);
    }

    /// Stands for the interpreter's lock (the GIL): a static, so its futex word is never the
    /// word of another test's lock.
    static INTERPRETER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// One round of two threads; thread 0, once it has the turn, waits for [`INTERPRETER`]
    /// (held by the caller) as if taking the interpreter back, having said so (`flagged`) or
    /// not. The watcher looks at it many times, far apart on the clock it is given, while it
    /// sleeps on that futex; then the lock is let go. Returns the round's record.
    fn round_with_a_wait_for_the_interpreter(flagged: bool) -> RoundRecord {
        let core = Arc::new(Core::new(1, Policy::Replay(vec![0, 0, 1])));
        let held = INTERPRETER.lock().unwrap();
        let native = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        std::thread::scope(|sc| {
            let (c0, n0, d0) = (Arc::clone(&core), Arc::clone(&native), Arc::clone(&done));
            sc.spawn(move || {
                if flagged {
                    watch::will_take_back();
                }
                c0.enter(0, 10, 0, 0, 2);
                n0.store(watch::native_id(), Ordering::SeqCst); // it has the turn
                drop(INTERPRETER.lock().unwrap());
                watch::taken_back();
                c0.point_at(0, (7, 3));
                c0.exit(0);
                d0.fetch_add(1, Ordering::SeqCst);
            });
            let (c1, d1) = (Arc::clone(&core), Arc::clone(&done));
            sc.spawn(move || {
                c1.enter(1, 11, 0, 0, 2);
                c1.exit(1);
                d1.fetch_add(1, Ordering::SeqCst);
            });
            // Wait (no bound in time) until thread 0 has the turn and sleeps on the lock.
            let asleep = loop {
                let n = native.load(Ordering::SeqCst);
                if n != 0
                    && watch::thread_state(n) == Some(watch::ThreadState::Sleeping)
                    && watch::futex_word(n).is_some()
                {
                    break n;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let t = Instant::now();
            for i in 0..20 {
                core.watch(t + DETACH_QUIET * i);
            }
            assert!(
                watch::futex_word(asleep).is_some(),
                "still waiting for the lock"
            );
            drop(held);
            while done.load(Ordering::SeqCst) < 2 {
                core.watch(Instant::now());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        core.round(0).unwrap()
    }

    #[test]
    fn a_thread_taking_the_interpreter_back_is_not_blocked_in_c() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // However long the thread given the turn waits for the interpreter (a loaded machine
        // runs the GIL's holder late), it stays in the schedule: the round is exact.
        let rec = round_with_a_wait_for_the_interpreter(true);
        assert!(rec.exact && rec.free_run.is_none(), "{rec:?}");
        assert_eq!(rec.decisions, vec![0, 0, 1]);
        // The futex word it slept on was learned as the interpreter's: a wait on it elsewhere
        // (a thread that let go of the GIL for another and wants it back) is one too. Not on a
        // free-threaded build, whose threads wait for the interpreter on their own semaphore.
        if !cfg!(Py_GIL_DISABLED) {
            let rec = round_with_a_wait_for_the_interpreter(false);
            assert!(rec.exact && rec.free_run.is_none(), "{rec:?}");
        }
    }

    #[test]
    fn a_thread_asleep_on_a_lock_of_its_own_after_its_turn_runs_free() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // The same wait on a lock that is not the interpreter's (no flag, nothing learned):
        // blocked in C, so it runs free and the round is not exact.
        static OWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let core = Arc::new(Core::new(1, Policy::Replay(vec![0, 1, 0])));
        let held = OWN.lock().unwrap();
        let native = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        std::thread::scope(|sc| {
            let (c0, n0, d0) = (Arc::clone(&core), Arc::clone(&native), Arc::clone(&done));
            sc.spawn(move || {
                watch::will_take_back();
                c0.enter(0, 10, 0, 0, 2);
                watch::taken_back(); // it holds the interpreter again
                n0.store(watch::native_id(), Ordering::SeqCst);
                drop(OWN.lock().unwrap());
                c0.point_at(0, (7, 3));
                c0.exit(0);
                d0.fetch_add(1, Ordering::SeqCst);
            });
            let (c1, d1) = (Arc::clone(&core), Arc::clone(&done));
            sc.spawn(move || {
                c1.enter(1, 11, 0, 0, 2);
                c1.exit(1);
                d1.fetch_add(1, Ordering::SeqCst);
            });
            loop {
                let n = native.load(Ordering::SeqCst);
                if n != 0
                    && watch::thread_state(n) == Some(watch::ThreadState::Sleeping)
                    && watch::futex_word(n).is_some()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let t = Instant::now();
            for i in 0..20 {
                core.watch(t + DETACH_QUIET * i);
            }
            drop(held);
            while done.load(Ordering::SeqCst) < 2 {
                core.watch(Instant::now());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let rec = core.round(0).unwrap();
        assert!(!rec.exact, "{rec:?}");
        assert_eq!(rec.free_run, Some((0, AT_START)));
    }

    #[test]
    fn threads_waiting_in_c_at_the_same_time_count_once() {
        let core = Core::new(1, Policy::Random);
        core.enter(0, 0, 0, 0, 1);
        let child = core.spawn().expect("a round is going on");
        let start = core.clock_now(0).unwrap();
        {
            // What the watcher leaves after seeing both asleep in the kernel for the same
            // 30 ms: the worker holding the turn, and the child running free.
            let mut st = core.state.lock();
            let vnow = st.vnow;
            for (id, t) in st.threads.iter_mut() {
                if *id == child {
                    t.detached = Some((0, AT_START));
                }
                t.slept_from = vnow;
                t.slept_ns = 30_000_000;
            }
        }
        let a = core.clock_now(0).unwrap();
        let b = core.clock_now(child).unwrap();
        assert!(a - start >= 30_000_000, "{}", a - start);
        assert!(b - start < 31_000_000, "the waits added up: {}", b - start);
        core.exit(child);
        core.exit(0);
    }

    #[test]
    fn a_read_that_passes_a_timed_block_ends_it() {
        // Thread 1 waits 10 us; thread 0 reads the clock and never blocks: the reads end the
        // wait (no jump of the clock is needed, nothing else ever stops).
        let core = Arc::new(Core::new(3, Policy::Random));
        let woke = Arc::new(Mutex::new(None));
        std::thread::scope(|sc| {
            let c1 = Arc::clone(&core);
            let w = Arc::clone(&woke);
            sc.spawn(move || {
                c1.enter(1, 1, 0, 0, 2);
                let answer = c1.block_for(1, 9, Some(10_000));
                *w.lock() = Some(answer);
                c1.exit(1);
            });
            let c0 = Arc::clone(&core);
            let w = Arc::clone(&woke);
            sc.spawn(move || {
                c0.enter(0, 0, 0, 0, 2);
                let mut seen = false;
                for _ in 0..10_000 {
                    c0.clock_now(0);
                    c0.point(0);
                    if w.lock().is_some() {
                        seen = true;
                        break;
                    }
                }
                c0.exit(0);
                assert!(seen, "the wait did not end while thread 0 ran");
            });
        });
        assert_eq!(*woke.lock(), Some(Wait::TimedOut));
        assert!(core.round(0).unwrap().exact);
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
