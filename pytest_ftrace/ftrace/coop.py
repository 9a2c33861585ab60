"""Exact mode (`--ftrace-mode exact`): a test's threads run one at a time, and the Rust core
(`rust/sched/`) chooses, at every hooked access, which one takes the next step.

This module is the Python side:

- `ExactTest` plugs a test's threads into the core through the runner's hooks: a worker is
  managed from `round_start` to `round_end`, and waits for its turn in Rust with the
  interpreter released.
- From the start of the session, `threading.Lock`, `RLock` and `_allocate_lock` make the
  native locks of `pytest_ftrace.ftrace.locks`; `Condition`, `Semaphore`, `BoundedSemaphore`,
  `Event`, `Barrier` and `queue.Queue` are built on them by the standard library, wherever
  they are made (module level, class attributes, fixtures, libraries). While a test runs,
  a managed thread that would block on one tells the core, which hands the turn to another
  thread, and a release wakes the waiters (`_acquire_hook`, `_release_hook`); `time.sleep`
  and `Thread.start`/`join` are patched (`install`/`uninstall`). A lock made before the
  session started is a real one, and a wait on it is caught by the watchdog.
- A watchdog thread notices a running thread that reaches no scheduling point for
  `WATCHDOG_SECONDS` (blocked in I/O, in C, or on a lock made outside the test), reports
  "unmanaged blocking at <file:line>" and lets the rest of that round run free.
- When every managed thread is blocked, the core says so at once and each blocked thread
  raises `DeadlockError`; the first one carries the wait-for cycle and every thread's stack.
  A timed wait while a thread outside the round is busy is never one (`_patient_block`).
- Threads the test starts are managed; when the workers are done and those left are all
  blocked, they are blocked for good: they leave the round (the core), and the runner does
  not wait for them at the test's end (`locks.blocked_for_good`).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import _thread
import itertools
import os
import queue
import re
import sys
import threading
import time

from pytest_ftrace import _native

WATCHDOG_SECONDS = 1.0
# How often the watchdog looks at the running thread's progress: each look takes the
# interpreter from whichever thread holds it (a managed thread computing with the turn drops
# it and waits until the watchdog has it), so it looks a few times a second, not more.
WATCHDOG_POLL = 0.2

_real_lock = _thread.allocate_lock
_real_sleep = time.sleep
_real_monotonic = time.monotonic
_ORIGINAL: dict[tuple[object, str], object] = {}

# The native run of the test in progress (exact mode), None between tests.
_CURRENT = None
# (where, exception) of the plugin's own errors in threads the test started (exact mode);
# taken by the ExactTest of the test when it is deactivated.
INTERNAL_ERRORS: list[tuple[str, BaseException]] = []
# Per round: what each blocked managed thread waits for, by thread id (deadlock reports).
_WAITING: dict[int, tuple[object, list[tuple], int | None]] = {}
_TEST = None  # the ExactTest being run: threads the test starts are noted in its .spawned
# One entry per blocking wait of a managed thread while a test is installed (list.append is
# safe from any thread on every build); the statistics count them.
_BLOCKS: list[int] = []
# the plugin's package: frames of its code are machinery, not the test's
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SKIP_FILES = {threading.__file__, queue.__file__, __file__}


class DeadlockError(Exception):
    """Every managed thread of a round was blocked (exact mode)."""


def _managed():
    """The current exact run when the calling thread is one of its managed threads."""
    run = _CURRENT
    if run is not None and run.sched_me() is not None:
        return run
    return None


def _site(depth: int = 2) -> str:
    """file:line of the nearest caller outside threading, queue and this module."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename in _SKIP_FILES:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{_relative(frame.f_code.co_filename)}:{frame.f_lineno}"


def _relative(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _stack_of(frame) -> list[tuple]:
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    out.reverse()
    return out


def _block(run, resource: int, timed: bool, what: object, timeout: float | None = None) -> str:
    """Block the calling managed thread on `resource`; returns the core's answer. A timed
    block ends (virtually) when nothing else can run, the one with the shortest `timeout`
    first."""
    me = run.sched_me()
    _BLOCKS.append(me)
    _WAITING[me] = (what, _stack_of(sys._getframe(2)), getattr(what, "_owner_ident", None))
    if timed and not isinstance(what, _Sleeper) and _outside_threads(run):
        # A wake may come from a thread exact mode does not manage: the wait must not end
        # on the virtual clock before that thread had its chance.
        answer = _patient_block(run, resource, timeout)
    else:
        answer = run.sched_block(resource, timed, timeout)
    if answer == "deadlock":
        why = _not_a_deadlock(run)
        if why is None:
            raise DeadlockError(_deadlock_report(run, me))
        run.sched_not_deadlock(why)  # the round runs free from here, not exact
        answer = "free"
    _WAITING.pop(me, None)
    return answer


def _patient_block(run, resource: int, timeout: float | None) -> str:
    """A timed wait while a thread exact mode does not manage is busy (not waiting for a native lock
    itself: a fixture's actor handling a request, say), which may end it. It waits without a
    timeout; when every managed thread has waited for the core's stall grace and that thread is
    still busy (it used CPU time meanwhile: a leftover server polling its socket or a sleeping
    daemon is not busy), it waits again, for at most `timeout` in real time in all (as long as
    it would wait without the plugin); once the threads outside are quiet (gone, or waiting for
    a native lock), the rest of `timeout` runs on the virtual clock, as with no thread outside.
    Never a deadlock: the wait has a timeout. While it waits, the virtual clock does not jump
    past its deadline to end another thread's longer timed wait first."""
    from pytest_ftrace.ftrace import vclock

    real = vclock.real("monotonic")
    timeout = max(0.0, timeout or 0.0)
    ends = time.monotonic() + timeout  # the virtual clock, in a managed thread
    real_ends = real() + timeout
    seen = _cpu_times(_outside_threads(run))
    left = timeout
    while True:
        # `left` is the deadline of this wait on the virtual clock: while it waits, no timed
        # wait of the round that would end later times out (it would not in real time).
        answer = run.sched_block(resource, False, left, True)
        if answer != "timeout":
            return answer
        left = ends - time.monotonic()
        if left <= 0 or real() >= real_ends:
            return "timeout"
        now = _cpu_times(_outside_threads(run))
        busy = [ident for ident, cpu in now.items() if cpu - seen.get(ident, 0) > _BUSY_NS]
        seen = now
        if not busy:
            return run.sched_block(resource, True, left)


# A thread outside the round that used less CPU time than this over a stall grace is quiet:
# a leftover server polling its socket, a sleeping daemon, not one working on a request.
_BUSY_NS = 2_000_000


def _cpu_times(threads: list) -> dict:
    """CPU time used so far by each of `threads` (ns, by ident); a thread whose clock
    cannot be read (gone, or no per-thread clocks here) counts as busy forever."""
    out = {}
    for t in threads:
        try:
            out[t.ident] = time.clock_gettime_ns(time.pthread_getcpuclockid(t.ident))
        except (AttributeError, OSError, OverflowError, TypeError):
            out[t.ident] = next(_UNREADABLE) * 2 * _BUSY_NS
    return out


_UNREADABLE = itertools.count(1)


def _not_a_deadlock(run) -> str | None:
    """Why every managed thread being blocked is not a deadlock (None: it is one). It is one
    when the waits for locks form a cycle, or when no thread outside the round can wake a
    waiter: every thread that is alive is managed, a worker of the test, exact mode's own, or
    itself waiting for a lock."""
    waiting = dict(_WAITING)
    idents = {ident: tid for tid, ident, _status, _resource in run.sched_threads()}
    holds: dict[int, int] = {}
    for tid, (_what, _stack, owner_ident) in waiting.items():
        if owner_ident and owner_ident in idents:
            holds[tid] = idents[owner_ident]
    if _cycle(holds):
        return None
    outside = _outside_threads(run)
    if not outside:
        return None
    sites = sorted({what._ftrace_describe() for what, _s, _o in waiting.values() if what})
    # Newest first (threading.enumerate() lists in start order): the one the test's fixture
    # just started is more likely the one than a leftover of an earlier test.
    names = [repr(t.name) for t in reversed(outside)]
    which = f"thread {names[0]}" if len(names) == 1 else "threads " + ", ".join(names[:3])
    if len(names) > 3:
        which += f" and {len(names) - 3} more"
    return (
        f"every managed thread waited ({'; '.join(sites)}) for what {which}, "
        f"which exact mode does not manage, may do"
    )


def _outside_threads(run) -> list:
    """The live threads that could wake a managed thread from outside the round: not
    managed, not a worker of the test nor exact mode's own, not waiting for a lock. A thread
    a managed thread started in this round is managed from its start, before it has attached
    to the core (whose list does not know its ident until then)."""
    ours = {ident for _tid, ident, _status, _resource in run.sched_threads()}
    ours.update(_native.native_waiters())
    test = _TEST
    if test is not None:
        ours |= test.worker_idents
        if test._watchdog is not None:
            ours.add(test._watchdog.ident)
    main = threading.main_thread()
    generation = run.sched_generation()
    return [
        t
        for t in threading.enumerate()
        if t is not main
        and t.ident not in ours
        and not _started_in_round(t, run, generation)
        and t.is_alive()
    ]


def _started_in_round(thread, run, generation: int) -> bool:
    """Whether a managed thread of `run` started `thread` in the round of `generation`."""
    return (
        getattr(thread, "_ftrace_run", None) is run
        and getattr(thread, "_ftrace_generation", None) == generation
    )


def _deadlock_report(run, me: int) -> str:
    """The same report in every deadlocked thread (its entry in _WAITING stays for the round),
    so the runner groups them as one failure."""
    waiting = dict(_WAITING)
    lines = ["deadlock: every managed thread is blocked"]
    holds: dict[int, int] = {}
    idents = {ident: tid for tid, ident, _status, _resource in run.sched_threads()}
    for tid, (what, _stack, owner_ident) in sorted(waiting.items()):
        owner = getattr(what, "_owner_tid", None)
        if owner_ident:
            owner = idents.get(owner_ident)
        held = f" held by thread {owner}" if owner is not None else ""
        lines.append(f"  thread {tid} waits for {_describe(what)}{held}")
        if owner is not None:
            holds[tid] = owner
    cycle = _cycle(holds)
    if cycle:
        lines.append("  wait-for cycle: " + " -> ".join(f"thread {t}" for t in cycle))
    for tid, (_what, stack, _owner) in sorted(waiting.items()):
        lines.append(f"\nThread {tid} (most recent call last):")
        shown = [s for s in stack if not s[0].startswith(_HERE) and s[0] != threading.__file__]
        lines.extend(f'  File "{_relative(f)}", line {n}, in {name}' for f, n, name in shown[-8:])
    return "\n".join(lines)


def _cycle(edges: dict[int, int]) -> list[int]:
    for start in sorted(edges):
        seen: list[int] = []
        node = start
        while node in edges and node not in seen:
            seen.append(node)
            node = edges[node]
        if node in seen:
            return seen[seen.index(node) :] + [node]
    return []


def _describe(what: object) -> str:
    if what is None:
        return "?"
    describe = getattr(what, "_ftrace_describe", None)
    return describe() if describe is not None else repr(what)


# -- schedulable primitives ---------------------------------------------------------------------
#
# `threading.Lock`, `RLock` and `_allocate_lock` are the native locks of `ftrace/locks.py`
# from the start of the session, so `Condition`, `Event`, `Semaphore`, `Barrier` and `Queue`
# (built on them by the standard library) are made of them too, wherever and whenever they
# were made. While a test runs, a managed thread's acquire comes here (`_acquire_hook`): it
# waits in the core instead of in the OS; a release that a managed thread makes, or that a
# managed thread waits for, goes through `_release_hook`.


class _LockWait:
    """What a blocked managed thread waits for: a lock, or (a wait inside
    `threading.Condition.wait`) a condition, named by the user's line that waits."""

    __slots__ = ("kind", "lock", "site")

    def __init__(self, lock, caller):
        self.lock = lock
        if caller.f_code.co_filename == threading.__file__ and caller.f_code.co_name == "wait":
            self.kind = "Condition"
        else:
            self.kind = type(lock).__name__.replace("lock", "Lock")
        self.site = _site_from(caller)

    def _ftrace_describe(self) -> str:
        if self.kind == "Condition":
            return f"Condition (waited for at {self.site})"
        made = self.lock._ftrace_made_at
        if made is None:
            return f"{self.kind} made outside the test (waited for at {self.site})"
        return f"{self.kind} made at {_relative(made.rsplit(':', 1)[0])}:{made.rsplit(':', 1)[1]}"

    @property
    def _owner_ident(self):
        """The OS ident of the thread holding it now (None: a condition, or free)."""
        if self.kind == "Condition":
            return None  # nobody holds a condition: it is waited for until notified
        return self.lock._ftrace_owner() or None


def _site_from(frame) -> str:
    while frame is not None and frame.f_code.co_filename in _SKIP_FILES:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{_relative(frame.f_code.co_filename)}:{frame.f_lineno}"


def _user_file(filename: str) -> bool:
    """Whether a lock operation called from `filename` is a scheduling point: not from
    threading or queue (the user's call into them already was one, which keeps rounds short),
    nor from the plugin's own code."""
    return filename not in _SKIP_FILES and not filename.startswith(_HERE)


# Explore mode: (caller frame, lock, after a release) -> (kind, key) of the step from a lock's
# point, or None.
POINT_ACCESS = None


def _lock_point(run, caller, lock, released: bool = False) -> None:
    """The scheduling point of a lock operation called from `caller` (before an acquire, or
    after a release)."""
    describe = POINT_ACCESS
    if describe is None:
        run.sched_point()
    else:
        run.sched_point_as(*describe(caller, lock, released))


def _acquire_hook(lock, blocking: bool, timeout: float | None, pointed: bool = False) -> bool:
    """A managed thread acquires a native lock: a scheduling point when the user's code (not
    threading's or queue's) asks, then the lock, waiting in the core while it is held.
    `pointed`: the core made the point already and found the lock taken (rust/lockstep.rs)."""
    caller = sys._getframe(1)
    got = _acquire(lock, blocking, timeout, caller, pointed)
    if got and not caller.f_code.co_filename.startswith(_HERE):
        _native.races_lock(id(lock), True)  # happens-before (the test's locks, not ours)
    return got


def _acquire(lock, blocking: bool, timeout: float | None, caller, pointed: bool = False) -> bool:
    run = _managed()
    if run is None:  # no longer managed (the round ended): a plain acquire
        return lock._ftrace_block(timeout) if blocking else lock._ftrace_try()
    if not pointed and _user_file(caller.f_code.co_filename):
        _lock_point(run, caller, lock)
    if lock._ftrace_try():
        return True
    if not blocking or timeout == 0:
        return False
    what = None
    lock._ftrace_waiting(1)  # before the next try: a release after it wakes the core
    try:
        while True:
            if lock._ftrace_try():
                return True
            if what is None:
                what = _LockWait(lock, caller)
            answer = _block(run, id(lock), timeout is not None, what, timeout)
            if answer == "timeout":
                return False
            if answer == "free":
                return lock._ftrace_block(timeout)
    finally:
        lock._ftrace_waiting(-1)


def _release_hook(lock, managed: bool, waiting: bool) -> None:
    """After a release by a managed thread, or of a lock a managed thread waits for."""
    run = _CURRENT
    if run is None:
        return
    frame = sys._getframe(1)
    caller = frame.f_code.co_filename
    if managed and not caller.startswith(_HERE):
        _native.races_lock(id(lock), False)  # before another thread can take it
    if waiting:
        run.sched_wake(id(lock))
    if managed and _user_file(caller):
        _lock_point(run, frame, lock, released=True)


class _Sleeper:
    def _ftrace_describe(self) -> str:
        return "time.sleep"

    _owner_tid = None


def sleep(seconds: float) -> None:
    run = _managed()
    if run is None:
        return _real_sleep(seconds)
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    if seconds == 0:
        run.sched_point()
        return None
    # Virtual time: the sleeper goes on once nothing else can run and no shorter timed wait
    # is pending (it is woken by nobody).
    sleeper = _Sleeper()
    if _block(run, id(sleeper), True, sleeper, seconds) == "free":
        _real_sleep(seconds)
    return None


def _thread_start(self) -> None:
    run = _managed()
    tid = run.sched_spawn() if run is not None else None
    if tid is None:
        return _ORIGINAL[(threading.Thread, "start")](self)
    generation = run.sched_generation()
    self._ftrace_tid = tid
    self._ftrace_run = run
    self._ftrace_generation = generation  # managed from here on, attached or not
    test = _TEST
    if test is not None:  # who started it, and where: the lanes name the thread by it
        test.spawned[(test.current_round, tid)] = (self.name, run.sched_me(), _site())
    body = self.run

    def managed_run():
        # The plugin's own calls here are guarded: an error of theirs fails the test (as an
        # internal error, see ExactTest.internal_errors), never the user's thread.
        try:
            run.sched_attach(tid, generation)
        except Exception as exc:  # noqa: BLE001 - the machinery's: reported with the test
            INTERNAL_ERRORS.append(("a thread the test started, joining the scheduler", exc))
        try:
            body()
        finally:
            try:
                run.sched_wake(id(self))
                run.sched_exit()
            except Exception as exc:  # noqa: BLE001 - the machinery's: reported with the test
                INTERNAL_ERRORS.append(("a thread the test started, leaving the scheduler", exc))

    self.run = managed_run
    # The new thread says it started before it attaches, from outside the core: a real
    # Event makes start() wait for that in C, holding the turn, so the schedule does not
    # depend on when the OS runs the new thread.
    self._started = _StartedEvent()
    _ORIGINAL[(threading.Thread, "start")](self)
    run.sched_point()
    return None


class _StartedEvent:
    """The `_started` event of a thread a managed thread starts: made of a real lock, so the
    parent waits for it in C, holding its turn."""

    def __init__(self):
        self._flag = False
        self._lock = _real_lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return self._flag

    isSet = is_set  # noqa: N815 - the threading name

    def set(self) -> None:
        if not self._flag:
            self._flag = True
            self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._flag and self._lock.acquire(True, -1 if timeout is None else timeout):
            self._lock.release()
        return self._flag

    def _at_fork_reinit(self) -> None:
        self._lock = _real_lock()
        if not self._flag:
            self._lock.acquire()


def _thread_join(self, timeout: float | None = None) -> None:
    run = _managed()
    tid = getattr(self, "_ftrace_tid", None)
    if run is not None and tid is not None and getattr(self, "_ftrace_run", None) is run:
        waited = _ThreadWait(self, tid)
        while run.sched_live(tid):
            answer = _block(run, id(self), timeout is not None, waited, timeout)
            if answer == "timeout":
                return None
            if answer == "free":
                break
        if not run.sched_live(tid):
            _native.races_joined(tid)  # happens-before: the thread's past is the joiner's
    return _ORIGINAL[(threading.Thread, "join")](self, timeout)


class _ThreadWait:
    def __init__(self, thread, tid):
        self.thread, self._owner_tid = thread, None
        self.tid = tid

    def _ftrace_describe(self) -> str:
        return f"thread {self.tid} ({self.thread.name}) to finish"


_PATCHES = (
    (time, "sleep", sleep),
    (threading.Thread, "start", _thread_start),
    (threading.Thread, "join", _thread_join),
)


def install(run, scope=None, roots=()) -> None:
    """Patch `time.sleep` and `Thread.start`/`join` for the test whose native run is `run`,
    and route the managed threads' lock operations to the core. No object of the test's or
    the user's is changed: the locks are schedulable since the session started."""
    global _CURRENT
    del scope, roots  # the locks need no scan any more (kept for callers)
    for owner, name, replacement in _PATCHES:
        _ORIGINAL.setdefault((owner, name), getattr(owner, name))
        setattr(owner, name, replacement)
    _WAITING.clear()
    _BLOCKS.clear()
    _CURRENT = run
    _native.set_lock_hooks(_acquire_hook, _release_hook)


def uninstall() -> None:
    global _CURRENT
    _native.set_lock_hooks(None, None)
    _CURRENT = None
    for owner, name, _replacement in _PATCHES:
        original = _ORIGINAL.get((owner, name))
        if original is not None:
            setattr(owner, name, original)
    _WAITING.clear()


# -- a test under exact mode ---------------------------------------------------------------------


class ExactTest:
    """The runner hooks and the watchdog of one test in exact mode."""

    def __init__(self, native, threads: int, seed_round: int | None = None, scope=None, roots=()):
        self.native = native
        self.scope = scope
        self.roots = tuple(roots)  # shared fixture values (no longer scanned: kept for callers)
        self.threads = threads
        self.seed_round = seed_round  # replaying by seed: every round reseeded as this one
        self._local = threading.local()
        self._stop = _Stop()
        self._watchdog: threading.Thread | None = None
        self.blocking: list[str] = []  # unmanaged blocking reports, one per released round
        self.exit_steps: dict[tuple[int, int], int] = {}  # (round, worker) -> step
        self.rounds_seen: set[int] = set()
        self.worker_idents: set[int] = set()  # the runner's worker threads
        self.waits = 0  # blocking waits of managed threads (locks, conditions, joins, sleeps)
        self.current_round = 0
        # (round, thread id) -> (name, id of the thread that started it, file:line of start())
        self.spawned: dict[tuple[int, int], tuple[str, int | None, str]] = {}
        # (where, exception): the plugin's errors in threads the test started
        self.internal_errors: list[tuple[str, BaseException]] = []
        # Rounds run in forked processes (ftrace/fork.py): their records and steps, by round
        self.records: dict[int, dict] = {}
        self.steps_of: dict[int, list] = {}

    # activation: patch the names and watch for unmanaged blocking
    def activate(self, watchdog: bool = True) -> None:
        """`watchdog` False: start no thread (forked rounds: each child starts its own)."""
        global _TEST
        INTERNAL_ERRORS.clear()
        install(self.native, self.scope, self.roots)
        _TEST = self
        if watchdog:
            self.start_watchdog()

    def start_watchdog(self) -> None:
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="ftrace-watchdog", daemon=True)
        self._watchdog.start()

    def deactivate(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
            self._watchdog = None
        self.waits += len(_BLOCKS)
        _clear_test(self)
        uninstall()
        self.internal_errors.extend(INTERNAL_ERRORS)
        INTERNAL_ERRORS.clear()

    def summary(self) -> dict:
        """What exact mode did in this test's rounds: scheduling points (decisions), hand-overs
        (a decision for another thread than the previous one), preemptions (hand-overs away
        from a thread that could have gone on), rounds, and blocking waits."""
        points = handovers = preemptions = 0
        for iteration in self.rounds_seen:
            counts = self.round_counts(iteration)
            if counts is None:
                continue
            points += counts[0]
            handovers += counts[1]
            preemptions += counts[2]
        return {
            "rounds": len(self.rounds_seen),
            "points": points,
            "handovers": handovers,
            "preemptions": preemptions,
            "waits": self.waits,
        }

    # runner hooks
    def thread_enter(self, index: int) -> None:
        self._local.index = index
        self.worker_idents.add(threading.get_ident())
        self.native.thread_enter(index)

    def round_start(self, iteration: int) -> None:
        self.native.round_start(iteration)
        if iteration not in self.rounds_seen:  # every worker is here, none runs yet
            self.rounds_seen.add(iteration)
            self.current_round = iteration
            _WAITING.clear()
        self._local.round = iteration
        self.native.sched_enter(
            self._local.index,
            iteration,
            self.threads,
            iteration if self.seed_round is None else self.seed_round,
        )

    def round_end(self, seconds: float) -> None:
        # The step at which this thread's body ended: a failing thread's schedule ends here.
        self.exit_steps[(self._local.round, self._local.index)] = self.native.sched_step()
        self.native.sched_exit()
        self.native.record_round(seconds)

    def thread_exit(self) -> None:
        self.native.sched_exit()
        self.native.thread_exit()

    def round(self, iteration: int) -> dict | None:
        if iteration in self.records:
            return self.records[iteration]
        return name_free_run(self.native.sched_round(iteration))

    def round_counts(self, iteration: int) -> tuple[int, int, int, bool, bool] | None:
        """(points, hand-overs, preemptions, exact, deadlock) of round `iteration`, without
        making the list of its decisions (the native core counts them in place)."""
        if iteration in self.records:
            record = self.records[iteration]
            decisions = record["decisions"]
            handovers = sum(1 for a, b in zip(decisions, decisions[1:], strict=False) if a != b)
            return (
                len(decisions),
                handovers,
                record["preemptions"],
                record["exact"],
                record["deadlock"],
            )
        return self.native.sched_counts(iteration)

    def steps(self, iteration: int) -> list | None:
        """The steps of round `iteration`: (thread id, code or its access as text, offset)."""
        if iteration in self.steps_of:
            return self.steps_of[iteration]
        return self.native.sched_steps(iteration)

    def thread_labels(self, iteration: int) -> dict[int, str]:
        """thread id -> who started it and where, for the threads the test started in round
        `iteration` (the lanes print them under the table)."""
        return {
            tid: f"{name}, started by thread {parent} at {site}"
            for (round_, tid), (name, parent, site) in self.spawned.items()
            if round_ == iteration
        }

    def _watch(self) -> None:
        last = None
        since = _real_monotonic()
        while not self._stop.wait(WATCHDOG_POLL):
            status = self.native.sched_status()
            if status is None:
                return
            running, ident, progress, waiting, free, started = status
            now = _real_monotonic()
            if free or running is None or not started or waiting == 0 or progress != last:
                last, since = progress, now
                continue
            if now - since < WATCHDOG_SECONDS:
                continue
            where = _where(sys._current_frames().get(ident))
            reason = f"unmanaged blocking at {where}"
            self.native.sched_release(reason)
            self.blocking.append(reason)
            last = None


class _Stop:
    """The watchdog's stop signal (`set`, `clear`, `is_set`, `wait(timeout)`, as an Event's)
    on a real `_thread` lock, held while the watchdog is to go on. `threading.Event` is made of
    the schedulable locks in exact mode, whose blocking wait takes the interpreter back every
    20 ms slice: the watchdog then took it from a managed thread computing with the turn
    (which drops it and sleeps in the kernel until the watchdog has it) fifty times a second,
    and a round could be let run free, "not exact", for the plugin's own sake. A real lock's
    timed acquire is one wait with the interpreter released."""

    def __init__(self):
        self._state = _real_lock()  # guards _set
        self._held = _real_lock()
        self._held.acquire()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._state:
            if not self._set:
                self._set = True
                self._held.release()

    def clear(self) -> None:
        with self._state:
            if self._set:
                self._held.acquire()
                self._set = False

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._held.acquire(timeout=timeout):
            self._held.release()
            return True
        return self._set


def _clear_test(test) -> None:
    global _TEST
    if _TEST is test:
        _TEST = None


def _where(frame) -> str:
    """file:line of the innermost frame, and of the innermost one outside the stdlib."""
    if frame is None:
        return "<unknown> (the thread has no Python frame)"
    stack = _stack_of(frame)
    inner = stack[-1]
    text = f"{_relative(inner[0])}:{inner[1]} (in {inner[2]})"
    stdlib = os.path.dirname(os.__file__)
    for filename, lineno, name in reversed(stack):
        if not filename.startswith(stdlib) and not filename.startswith(_HERE):
            if (filename, lineno) != inner[:2]:
                text += f", called from {_relative(filename)}:{lineno} (in {name})"
            break
    return text


# -- the lane view ------------------------------------------------------------------------------

_KINDS = {
    "LOAD_ATTR": "load",
    "STORE_ATTR": "store",
    "DELETE_ATTR": "del",
    "LOAD_SUPER_ATTR": "load",
    "LOAD_GLOBAL": "load",
    "STORE_GLOBAL": "store",
    "DELETE_GLOBAL": "del",
    "BINARY_SUBSCR": "load",
    "STORE_SUBSCR": "store",
    "DELETE_SUBSCR": "del",
    "BINARY_SLICE": "load",
    "STORE_SLICE": "store",
    "LOAD_DEREF": "load",
    "STORE_DEREF": "store",
    "DELETE_DEREF": "del",
    "CONTAINS_OP": "in",
    "BINARY_OP": "load",
    "FOR_ITER": "next",  # a loop step over a container (pytest_ftrace.ftrace.genpoints)
    "YIELD_VALUE": "yield",
}
_DECODED: dict[int, tuple[object, dict[int, tuple[int | None, str]]]] = {}


def describe_step(code, offset: int) -> str:
    """'file:line kind name' for the hooked instruction at `offset` of `code` (`code` may be
    that text already: a forked round's steps come as text)."""
    if isinstance(code, str):
        return code
    if code is None:
        return "(start)" if offset == 0 else "(lock/wait)"
    entry = _DECODED.get(id(code))
    if entry is None or entry[0] is not code:
        import dis

        lines = {}
        for start, end, line in code.co_lines():
            for off in range(start, end, 2):
                lines[off] = line
        table = {}
        resumed = False
        for ins in dis.get_instructions(code):
            kind = _KINDS.get(ins.opname, ins.opname.lower())
            if resumed and ins.opname not in _KINDS:
                kind = "resume"  # the first instruction after a generator resumed
            resumed = ins.opname == "RESUME" and bool((ins.arg or 0) & 3)
            name = ins.argval if isinstance(ins.argval, str) else ""
            if ins.opname in ("LOAD_ATTR", "LOAD_SUPER_ATTR"):
                name = "." + name
                if "NULL|self" in (ins.argrepr or ""):
                    kind = "call"
            elif ins.opname in ("STORE_ATTR", "DELETE_ATTR"):
                name = "." + name
            elif "SUBSCR" in ins.opname or "SLICE" in ins.opname or ins.opname == "BINARY_OP":
                name = "[]"
            table[ins.offset] = (lines.get(ins.offset), f"{kind} {name}".strip())
        entry = _DECODED[id(code)] = (code, table)
    line, what = entry[1].get(offset, (None, f"@{offset}"))
    return f"{os.path.basename(code.co_filename)}:{line} {what}"


def _short(what: str, files: set[str]) -> str:
    """Drop the file name when every step is in one file (the header names it)."""
    prefix, access = _split_idle(what)
    if len(files) == 1 and ":" in access and access.split(":", 1)[0] in files:
        access = "line " + access.split(":", 1)[1]
    return f"{prefix} {access}" if prefix and access else prefix or access


def _split_idle(what: str) -> tuple[str, str]:
    """('(start)', 'f.py:3 load .x') for '(start) f.py:3 load .x'; ('', what) for an access."""
    for idle in ("(start)", "(lock/wait)"):
        if what == idle:
            return idle, ""
        if what.startswith(idle + " "):
            return idle, what[len(idle) + 1 :]
    return "", what


_ASSERT_NOISE = re.compile(
    r" (load|call) (@py|\.(_saferepr|_format_explanation|_call_reprcompare|_format_assertmsg|"
    r"_should_repr_global_name|_format_boolop|_check_if_assertion_pass_impl|_reprcompare|"
    r"locals)$)"
)


_LOCK_WAIT_NOTE = (
    "(lock/wait): the thread went on inside a lock, condition, sleep, or a thread's start or "
    "join, where exact mode hands the turn over too; not an access of the test's code"
)
_IDLE = ("(start)", "(lock/wait)")
_MIN_CELL = 20  # narrower columns than this: the lanes become a list, one row per line


def lanes(
    steps: list,
    cut: int | None = None,
    rows: int = 16,
    failing: int | None = None,
    width: int = 120,
    labels: dict[int, str] | None = None,
    marked: set | None = None,
    focus: bool = False,
) -> str:
    """The schedule as lanes: one column per thread, one row per run of steps of one thread
    (its first access, and how many steps the run took), the last `rows` runs up to `cut`, or
    up to where thread `failing` started explaining a failed assertion (pytest's rewritten
    asserts load @py... names only then).

    Every line fits in `width` columns: a cell's text wraps rather than being cut; when the
    columns would be too narrow, threads that made no access in the rows shown are left out
    (and named below the table); when they still would be, the rows are printed as a list.
    `labels` names the threads the test started (who started each, and where); a
    `(lock/wait)` row is explained below the table when there is one. A run with one of the
    `marked` steps ((thread, id(code), offset): the conflicting accesses) starts with `*`;
    with `focus` (and more runs than `rows`), only the rows that matter are shown: the marked
    runs (a marked run shows its conflicting access; `marked` may also hold step indices) and
    the runs next to them, the lock/waits between the first and the last marked run (what
    may order them) and the last run, with a "... N steps not shown" line for each gap."""
    import textwrap

    runs = lane_runs(steps, cut, failing, marked)
    if not runs:
        return "(no steps recorded)"
    hits = [what.startswith("* ") for _tid, what, _n in runs]
    runs = [
        (tid, what[2:] if hit else what, n) for (tid, what, n), hit in zip(runs, hits, strict=True)
    ]
    accesses = [_split_idle(what)[1] for _tid, what, _n in runs]
    files = {access.split(":", 1)[0] for access in accesses if ":" in access}
    runs = [
        (tid, ("* " if hit else "") + _short(what, files), n)
        for (tid, what, n), hit in zip(runs, hits, strict=True)
    ]
    width = max(40, width)
    order = list(range(max(0, len(runs) - rows), len(runs)))
    if focus and any(hits) and len(runs) > rows:  # short lanes are shown whole
        order = _focused(runs, hits, rows)
    shown = [runs[i] for i in order]
    skipped = order[0]
    threads = sorted({tid for tid, _what, _n in runs})

    def cell_width(count: int) -> int:
        return min(44, (width - 8 - 3 * (count - 1)) // max(1, count))

    left_out: list[int] = []
    if cell_width(len(threads)) < _MIN_CELL:
        busy = {tid for tid, what, _n in shown if not _idle(what)} | {failing}
        left_out = [t for t in threads if t not in busy]
        threads = [t for t in threads if t in busy]
        shown = [run for run in shown if run[0] in busy]
    cw = cell_width(len(threads))
    out = [f"  in {next(iter(files))}:"] if len(files) == 1 else []
    step = sum(n for _tid, _what, n in runs[:skipped])  # steps shown, noise left out
    focused = order != list(range(skipped, len(runs)))
    if skipped and not focused:
        out.append(f"  ({skipped} earlier runs, {step} steps, not shown)")
    starts = [0]
    for _tid, _what, n in runs:
        starts.append(starts[-1] + n)
    texts = []
    previous = -1 if focused else skipped - 1
    for i in order:
        if i > previous + 1:
            texts.append((starts[previous + 1], None, f"... {starts[i] - starts[previous + 1]}"))
        tid, what, n = runs[i]
        texts.append((starts[i], tid, what + (f" (+{n - 1})" if n > 1 else "")))
        previous = i
    texts = [t for t in texts if t[1] in threads or t[1] is None]
    if cw >= _MIN_CELL:
        out.append("  step  " + " | ".join(f"thread {t}".ljust(cw) for t in threads))
        for at, tid, text in texts:
            if tid is None:
                out.append(f"  ... {text[4:]} steps not shown")
                continue
            pieces = textwrap.wrap(text, cw, break_on_hyphens=False) or [""]
            for i, piece in enumerate(pieces):
                number = f"{at:>4}" if i == 0 else "    "
                cells = [(piece if t == tid else "").ljust(cw) for t in threads]
                out.append(f"  {number}  " + " | ".join(cells))
    else:
        out.append("  step  thread  access")
        room = width - 16
        for at, tid, text in texts:
            if tid is None:
                out.append(f"  ... {text[4:]} steps not shown")
                continue
            pieces = textwrap.wrap(text, room, break_on_hyphens=False) or [""]
            for i, piece in enumerate(pieces):
                head = f"  {at:>4}  {tid:<6}  " if i == 0 else " " * 16
                out.append(head + piece)
    notes = []
    if left_out:
        notes.append(
            f"threads {_ranges(left_out)} made no access in these rows and are not shown "
            "(too many columns for the terminal)"
        )
    for tid in threads:
        if labels and tid in labels:
            notes.append(f"thread {tid}: {labels[tid]}")
    if any(text.startswith("(lock/wait)") for _at, tid, text in texts if tid is not None):
        notes.append(_LOCK_WAIT_NOTE)
    if any(text.startswith("* ") for _at, tid, text in texts if tid is not None):
        notes.append(
            "*: the run makes one of the conflicting accesses named above (shown by that access)"
        )
    if focused:
        notes.append("only the rows around the conflicting accesses are shown (-v: all of them)")
    for note in notes:
        out.extend(textwrap.wrap(note, width - 2, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(line.rstrip() for line in out)


def _focused(runs: list, hits: list[bool], rows: int) -> list[int]:
    """The indices of the runs a focused lane view shows (see `lanes`)."""
    marked = [i for i, hit in enumerate(hits) if hit]
    keep = {len(runs) - 1}
    for i in marked:
        keep.update((i - 1, i, i + 1))
    for i in range(marked[0], marked[-1] + 1):
        if runs[i][1].lstrip("* ").startswith("(lock/wait)"):
            keep.add(i)
    order = sorted(i for i in keep if 0 <= i < len(runs))
    limit = max(rows, 3 * rows)
    if len(order) > limit:  # the latest ones: nearest the failure
        order = order[-limit:]
    return order


def lane_runs(
    steps: list, cut: int | None = None, failing: int | None = None, marked: set | None = None
) -> list:
    """[(thread id, what, steps)]: the runs of steps of one thread that the lanes show, up to
    `cut`, or up to where thread `failing` started explaining a failed assertion. A run is
    shown by its first access; one that starts at the thread's start or at a lock/wait shows
    that and its first access ("(start) line 5 load .x")."""
    steps = steps[:cut] if cut is not None else steps
    if failing is not None:
        for index, (tid, code, offset) in enumerate(steps):
            if tid == failing and " load @py" in describe_step(code, offset):
                steps = steps[:index]
                break
    runs: list[list] = []
    for index, (tid, code, offset) in enumerate(steps):
        what = describe_step(code, offset)
        if _ASSERT_NOISE.search(what):
            continue  # pytest's assertion rewriting explaining a failure, not the program
        key = code if isinstance(code, str) else id(code)  # a forked round's steps are text
        hit = bool(marked) and ((tid, key, offset) in marked or index in marked)
        if runs and runs[-1][0] == tid:
            runs[-1][2] += 1
            if hit and not runs[-1][3]:
                # a marked run is shown by its conflicting access (after its start or wait)
                idle = _split_idle(runs[-1][1])[0]
                runs[-1][1] = f"{idle} {what}" if idle else what
            elif runs[-1][1] in _IDLE and what not in _IDLE:
                runs[-1][1] = f"{runs[-1][1]} {what}"
            runs[-1][3] |= hit
        else:
            runs.append([tid, what, 1, hit])
    return [(tid, f"* {what}" if hit else what, n) for tid, what, n, hit in runs]


def has_accesses(steps: list, cut: int | None = None, failing: int | None = None) -> bool:
    """Whether the lanes of `steps` show any access of the test's code (not only starts and
    lock/waits)."""
    return any(not _idle(what) for _tid, what, _n in lane_runs(steps, cut, failing))


def shows_interleaving(steps: list, cut: int | None = None, failing: int | None = None) -> bool:
    """Whether the lanes of `steps` show threads interleaving at accesses: an access, and a
    thread that goes on again after another one ran (lanes where each thread only runs once,
    from its start, show no race)."""
    runs = lane_runs(steps, cut, failing)
    seen: set[int] = set()
    again = False
    for tid, _what, _n in runs:
        again |= tid in seen
        seen.add(tid)
    return again and any(not _idle(what) for _tid, what, _n in runs)


def _idle(what: str) -> bool:
    return what in _IDLE


def _ranges(numbers: list[int]) -> str:
    """'4-7, 9' for [4, 5, 6, 7, 9]."""
    parts = []
    for n in sorted(numbers):
        if parts and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def patched_names() -> list[str]:
    """The names exact mode patches while a test runs (for documentation and tests)."""
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _replacement in _PATCHES]


__all__ = [
    "DeadlockError",
    "ExactTest",
    "describe_step",
    "install",
    "lanes",
    "patched_names",
    "uninstall",
]


def name_free_run(record: dict | None) -> dict | None:
    """Say in `record['reason']` which call made the round not exact by running outside the
    schedule: where the thread was (its last access before it blocked in C)."""
    if record is None:
        return None
    free_run = record.get("free_run")
    reason = record.get("reason") or ""
    if not free_run or not reason.startswith("unmanaged blocking in thread"):
        return record
    tid, code, offset = free_run
    where = _access_site(code, offset)
    record["reason"] = (
        f"unmanaged blocking at {where} in thread {tid}: it blocked outside the scheduler "
        "(in C: I/O, a real lock, a C extension's wait) and ran free while other threads "
        "were scheduled"
    )
    return record


def _access_site(code, offset: int) -> str:
    """'file:line (what)' of the access at `offset` of `code`, relative to the current
    directory when below it."""
    if code is None:
        return "the start of the thread" if offset == 0 else "a lock, wait or sleep"
    what = describe_step(code, offset)  # "file.py:12 call .recv"
    line = what.split(" ", 1)[0].rsplit(":", 1)[-1]
    access = what.split(" ", 1)[1] if " " in what else ""
    path = code.co_filename
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:
        pass
    return f"{path}:{line} ({access})" if access else f"{path}:{line}"
