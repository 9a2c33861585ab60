"""Exact mode (`--ftrace-mode exact`): a test's threads run one at a time, and the Rust core
(`rust/sched/`) chooses, at every hooked access, which one takes the next step.

This module is the Python side:

- `ExactTest` plugs a test's threads into the core through the runner's hooks: a worker is
  managed from `round_start` to `round_end`, and waits for its turn in Rust with the
  interpreter released.
- While a test runs, `threading.Lock`, `RLock`, `Condition`, `time.sleep` and
  `Thread.start`/`join` are patched (`install`/`uninstall`). Objects made by a managed thread
  are cooperative: a thread that would block tells the core, which hands the turn to another
  thread, and a release wakes the waiters. `Semaphore`, `BoundedSemaphore`, `Event`, `Barrier`
  and `queue.Queue` are built from `Lock` and `Condition` by the standard library, so the
  ones a managed thread makes are cooperative too. Objects made elsewhere (module level,
  fixtures) are the real ones.
- A watchdog thread notices a running thread that reaches no scheduling point for
  `WATCHDOG_SECONDS` (blocked in I/O, in C, or on a lock made outside the test), reports
  "unmanaged blocking at <file:line>" and lets the rest of that round run free.
- When every managed thread is blocked, the core says so at once and each blocked thread
  raises `DeadlockError`; the first one carries the wait-for cycle and every thread's stack.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import _thread
import collections
import os
import queue
import re
import sys
import threading
import time
import types

WATCHDOG_SECONDS = 1.0
POLL_SECONDS = 0.0005  # free-running fallback: how often a would-be-blocked thread retries

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
_HERE = os.path.dirname(os.path.abspath(__file__))
_SKIP_FILES = {threading.__file__, queue.__file__, __file__}


class DeadlockError(Exception):
    """Every managed thread of a round was blocked (exact mode)."""


def _managed():
    """The current exact run when the calling thread is one of its managed threads."""
    run = _CURRENT
    if run is not None and run.sched_me() is not None:
        return run
    return None


_WORKER = threading.local()  # .run: the exact run whose worker this thread is


def _creates_cooperative() -> bool:
    """Whether a lock made now should be cooperative: made by a managed thread, or by a worker
    of the test outside its rounds (its own function-scoped fixtures)."""
    run = _CURRENT
    if run is None:
        return False
    return run.sched_me() is not None or getattr(_WORKER, "run", None) is run


def _from_user_code() -> bool:
    """Whether the nearest caller outside this module is outside threading and queue too: a
    lock taken inside Event, Semaphore or Queue is not a scheduling point of its own (the
    user's call into them already was one), which keeps rounds short."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename not in _SKIP_FILES


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
    _WAITING[me] = (what, _stack_of(sys._getframe(2)), getattr(what, "_owner_tid", None))
    answer = run.sched_block(resource, timed, timeout)
    if answer == "deadlock":
        raise DeadlockError(_deadlock_report(run, me))
    _WAITING.pop(me, None)
    return answer


def _deadlock_report(run, me: int) -> str:
    """The same report in every deadlocked thread (its entry in _WAITING stays for the round),
    so the runner groups them as one failure."""
    waiting = dict(_WAITING)
    lines = ["deadlock: every managed thread is blocked"]
    holds: dict[int, int] = {}
    for tid, (what, _stack, owner) in sorted(waiting.items()):
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


# -- cooperative primitives -------------------------------------------------------------------


# Where a cooperative stand-in for a lock or condition made outside the test came from.
OUTSIDE = "made outside the test (a cooperative stand-in for the real one during it)"


def _origin(made_at: str) -> str:
    return made_at if made_at == OUTSIDE else f"made at {made_at}"


class _CoopLock:
    """A lock whose waits go through the core. Owner-checked like RLock when reentrant."""

    _reentrant = False
    _kind = "Lock"

    def __init__(self):
        self._mutex = _real_lock()
        self._owner = None  # thread ident
        self._owner_tid = None  # managed id of the owner, if it is managed
        self._count = 0
        self._made_at = _site(3)

    def _ftrace_describe(self) -> str:
        return f"{self._kind} {_origin(self._made_at)}"

    def __repr__(self) -> str:
        state = "locked" if self._owner is not None else "unlocked"
        return f"<cooperative {self._kind} {state}, {_origin(self._made_at)}>"

    def _try(self, me: int, tid) -> bool:
        with self._mutex:
            if self._owner is None:
                self._owner, self._owner_tid, self._count = me, tid, 1
                return True
            if self._reentrant and self._owner == me:
                self._count += 1
                return True
            return False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        me = _thread.get_ident()
        run = _managed()
        if run is not None and _from_user_code():
            run.sched_point()
        deadline = None if timeout < 0 else _real_monotonic() + timeout
        while True:
            run = _managed()
            if self._try(me, run.sched_me() if run is not None else None):
                return True
            if not blocking:
                return False
            if run is not None:
                answer = _block(run, id(self), timeout >= 0, self, timeout)
                if answer == "timeout":
                    return False
                if answer != "free":
                    continue
            if deadline is not None and _real_monotonic() >= deadline:
                return False
            _real_sleep(POLL_SECONDS)

    def release(self) -> None:
        with self._mutex:
            if self._owner is None:
                raise RuntimeError("release unlocked lock")
            if self._reentrant and self._owner != _thread.get_ident():
                raise RuntimeError("cannot release un-acquired lock")
            self._count -= 1
            if self._count:
                return
            self._owner = self._owner_tid = None
        run = _CURRENT
        if run is not None:
            run.sched_wake(id(self))
            if run.sched_me() is not None and _from_user_code():
                run.sched_point()

    def locked(self) -> bool:
        return self._owner is not None

    def _is_owned(self) -> bool:
        return self._owner == _thread.get_ident()

    def _release_save(self):
        with self._mutex:
            state = (self._count, self._owner, self._owner_tid)
            self._count = 1
        self.release()
        return state

    def _acquire_restore(self, state) -> None:
        self.acquire()
        with self._mutex:
            self._count, self._owner, self._owner_tid = state

    def _at_fork_reinit(self) -> None:
        self._mutex = _real_lock()
        self._owner = self._owner_tid = None
        self._count = 0

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _CoopRLock(_CoopLock):
    _reentrant = True
    _kind = "RLock"

    def _recursion_count(self) -> int:
        """How often the calling thread holds it (0 if it does not), as RLock says; the
        standard library asks (multiprocessing's resource tracker, for one)."""
        return self._count if self._owner == _thread.get_ident() else 0


class _Waiter:
    __slots__ = ("notified",)

    def __init__(self):
        self.notified = False


class _CoopCondition:
    """threading.Condition whose waits go through the core."""

    def __init__(self, lock=None):
        self._lock = lock if lock is not None else RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._made_at = _site(2)

    def _ftrace_describe(self) -> str:
        return f"Condition {_origin(self._made_at)}"

    @property
    def _owner_tid(self):
        return None  # nobody holds a condition: it is waited for until notified

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def __repr__(self) -> str:
        return f"<cooperative Condition({self._lock!r}, {len(self._waiters)})>"

    def _is_owned(self) -> bool:
        owned = getattr(self._lock, "_is_owned", None)
        if owned is not None:
            return owned()
        if self._lock.acquire(False):
            self._lock.release()
            return False
        return True

    def _release_save(self):
        save = getattr(self._lock, "_release_save", None)
        if save is not None:
            return save()
        self._lock.release()
        return None

    def _acquire_restore(self, state) -> None:
        restore = getattr(self._lock, "_acquire_restore", None)
        if restore is not None:
            restore(state)
        else:
            self._lock.acquire()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _Waiter()
        self._waiters.append(waiter)
        saved = self._release_save()
        try:
            deadline = None if timeout is None else _real_monotonic() + timeout
            while not waiter.notified:
                run = _managed()
                if run is not None:
                    answer = _block(run, id(waiter), timeout is not None, self, timeout)
                    if answer == "timeout":
                        return waiter.notified
                    if answer != "free":
                        continue
                if deadline is not None and _real_monotonic() >= deadline:
                    return waiter.notified
                _real_sleep(POLL_SECONDS)
            return True
        finally:
            self._acquire_restore(saved)
            if not waiter.notified:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def wait_for(self, predicate, timeout: float | None = None):
        endtime = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = _real_monotonic() + waittime
                else:
                    waittime = endtime - _real_monotonic()
                    if waittime <= 0:
                        break
            if not self.wait(waittime) and timeout is not None:
                result = predicate()
                break
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():
            raise RuntimeError("cannot notify on un-acquired lock")
        run = _CURRENT
        while n > 0 and self._waiters:
            waiter = self._waiters.popleft()
            waiter.notified = True
            n -= 1
            if run is not None:
                run.sched_wake(id(waiter))

    def notify_all(self) -> None:
        self.notify(len(self._waiters))

    notifyAll = notify_all  # noqa: N815 - the threading name


def Lock():  # noqa: N802 - stands in for threading.Lock
    return _CoopLock() if _creates_cooperative() else _real_lock()


def RLock(*args, **kwargs):  # noqa: N802 - stands in for threading.RLock
    if _creates_cooperative():
        return _CoopRLock()
    return _ORIGINAL[(threading, "RLock")](*args, **kwargs)


def Condition(lock=None):  # noqa: N802 - stands in for threading.Condition
    if _creates_cooperative() or isinstance(lock, _CoopLock):
        return _CoopCondition(lock)
    return _ORIGINAL[(threading, "Condition")](lock)


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
    self._ftrace_tid = tid
    self._ftrace_run = run
    test = _TEST
    if test is not None:  # who started it, and where: the lanes name the thread by it
        test.spawned[(test.current_round, tid)] = (self.name, run.sched_me(), _site())
    body = self.run

    def managed_run():
        # The plugin's own calls here are guarded: an error of theirs fails the test (as an
        # internal error, see ExactTest.internal_errors), never the user's thread.
        try:
            run.sched_attach(tid)
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
    started = threading.Event.__new__(threading.Event)
    started._cond = _ORIGINAL[(threading, "Condition")](_real_lock())
    started._flag = False
    self._started = started
    _ORIGINAL[(threading.Thread, "start")](self)
    run.sched_point()
    return None


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
    return _ORIGINAL[(threading.Thread, "join")](self, timeout)


class _ThreadWait:
    def __init__(self, thread, tid):
        self.thread, self._owner_tid = thread, None
        self.tid = tid

    def _ftrace_describe(self) -> str:
        return f"thread {self.tid} ({self.thread.name}) to finish"


_PATCHES = (
    (threading, "Lock", Lock),
    (threading, "RLock", RLock),
    (threading, "Condition", Condition),
    (time, "sleep", sleep),
    (threading.Thread, "start", _thread_start),
    (threading.Thread, "join", _thread_join),
)


_REAL_LOCK_TYPES = (type(_real_lock()), type(threading.RLock()))
_REAL_CONDITION = threading.Condition
_SWAPPED: list[tuple[object, object, object, object]] = []  # (container, key, real, coop)
_SCAN_LIMIT = 200  # items looked at per container
_NOT_SCANNED = (type, types.ModuleType, types.FunctionType, types.MethodType)


def _swap_locks(scope, roots=()) -> None:
    """Stand cooperative locks in for the real, unheld locks the test can reach, for the test's
    duration: in-scope modules' globals and the attributes of their module-level objects, and
    the values of `roots` (the test's shared fixtures) down to the attributes of the objects
    they hold.

    A lock is swapped only when no closure, default argument, tuple or other object refers to
    it (code could reach the real one there): the references found by the scan are put back
    afterwards. Any other lock stays real, and a wait on it is caught by the watchdog."""
    if scope is None:
        return
    found: dict[int, object] = {}
    places: dict[int, list[tuple[object, object]]] = {}
    seen: set[int] = set()
    # Objects whose attribute dict the scan went through: on 3.13 such an object refers to
    # its attribute values itself (inline values), which a swap in the dict replaces too.
    owners: set[int] = set()

    def visit(container, key, value, depth: int) -> None:
        if isinstance(value, _REAL_LOCK_TYPES) or type(value) is _REAL_CONDITION:
            # A real Condition is swapped whole (it holds bound methods of its lock): that
            # covers the Event, Semaphore, Barrier and Queue objects built on one.
            if type(container) in (dict, list):
                found[id(value)] = value
                places.setdefault(id(value), []).append((container, key))
            return
        if depth <= 0 or id(value) in seen:
            return
        seen.add(id(value))
        if type(value) is dict:
            for k, v in list(value.items())[:_SCAN_LIMIT]:
                visit(value, k, v, depth - 1)
        elif type(value) is list:
            for i, v in enumerate(value[:_SCAN_LIMIT]):
                visit(value, i, v, depth - 1)
        elif type(value) is tuple:
            for v in value[:_SCAN_LIMIT]:
                visit(value, None, v, depth - 1)
        elif not isinstance(value, _NOT_SCANNED) and hasattr(value, "__dict__"):
            try:
                attrs = vars(value)
            except TypeError:
                return
            if type(attrs) is dict:
                owners.add(id(value))
                for k, v in list(attrs.items())[:_SCAN_LIMIT]:
                    visit(attrs, k, v, depth - 1)

    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or not scope.contains(file, name):
            continue
        namespace = vars(module)
        for key, value in list(namespace.items()):
            visit(namespace, key, value, 2)
    for value in roots:
        visit(None, None, value, 3)
    if not found:
        return
    import gc

    locks = list(found.values())
    bad: set[int] = set()
    # Best effort: other holders of a lock that code could use (not every build tracks every
    # container, so this can miss some).
    for referrer in gc.get_referrers(*locks):
        if referrer is found or referrer is locks or isinstance(referrer, types.FrameType):
            continue  # ours, or a frame's locals (this one's, on 3.13): transient
        if type(referrer) in (dict, list):
            continue  # a container the scan saw, or e.g. a hook call's keyword arguments
        if id(referrer) in owners:
            continue  # holds it through the attribute dict the scan saw
        if (
            type(referrer) is tuple
            and len(referrer) == len(locks)
            and all(a is b for a, b in zip(referrer, locks, strict=True))
        ):
            continue  # the call's own argument tuple (tracked on 3.13)
        for value in gc.get_referents(referrer):
            if id(value) in found:
                bad.add(id(value))
    for key, lock in found.items():
        if key in bad:
            continue
        if type(lock) is _REAL_CONDITION:
            coop = _cooperative_condition(lock)
            if coop is None:
                continue
            for container, slot in places[key]:
                container[slot] = coop
                _SWAPPED.append((container, slot, lock, coop))
            continue
        if not lock.acquire(False):  # held now: leave it alone
            continue
        lock.release()
        coop = _CoopRLock() if isinstance(lock, _REAL_LOCK_TYPES[1]) else _CoopLock()
        coop._made_at = OUTSIDE
        for container, slot in places[key]:
            container[slot] = coop
            _SWAPPED.append((container, slot, lock, coop))


def _cooperative_condition(real):
    """A cooperative condition to stand in for `real` during the test, or None when it is in
    use now (a waiter, or its lock held)."""
    if real._waiters:
        return None
    inner = real._lock
    if not inner.acquire(False):
        return None
    inner.release()
    lock = _CoopRLock() if isinstance(inner, _REAL_LOCK_TYPES[1]) else _CoopLock()
    lock._made_at = OUTSIDE
    coop = _CoopCondition(lock)
    coop._made_at = OUTSIDE
    return coop


def _restore_locks() -> None:
    while _SWAPPED:
        container, slot, real, coop = _SWAPPED.pop()
        try:
            if container[slot] is coop:
                container[slot] = real
        except (IndexError, KeyError):
            pass


def install(run, scope=None, roots=()) -> None:
    """Patch the threading names for the test whose native run is `run`; with the
    instrumentation's `scope`, stand cooperative locks in for the locks of the in-scope
    modules and of `roots` (the shared fixture values)."""
    global _CURRENT
    for owner, name, replacement in _PATCHES:
        _ORIGINAL.setdefault((owner, name), getattr(owner, name))
        setattr(owner, name, replacement)
    _WAITING.clear()
    _BLOCKS.clear()
    _swap_locks(scope, roots)
    _CURRENT = run


def uninstall() -> None:
    global _CURRENT
    _CURRENT = None
    _restore_locks()
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
        self.roots = tuple(roots)  # shared fixture values, scanned for locks to stand in for
        self.threads = threads
        self.seed_round = seed_round  # replaying by seed: every round reseeded as this one
        self._local = threading.local()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.blocking: list[str] = []  # unmanaged blocking reports, one per released round
        self.exit_steps: dict[tuple[int, int], int] = {}  # (round, worker) -> step
        self.rounds_seen: set[int] = set()
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
            record = self.round(iteration)
            if record is None:
                continue
            decisions = record["decisions"]
            points += len(decisions)
            handovers += sum(1 for a, b in zip(decisions, decisions[1:], strict=False) if a != b)
            preemptions += record["preemptions"]
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
        _WORKER.run = self.native
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
        _WORKER.run = None
        self.native.sched_exit()
        self.native.thread_exit()

    def round(self, iteration: int) -> dict | None:
        if iteration in self.records:
            return self.records[iteration]
        return self.native.sched_round(iteration)

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
        while not self._stop.wait(0.05):
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
        for ins in dis.get_instructions(code):
            kind = _KINDS.get(ins.opname, ins.opname.lower())
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
) -> str:
    """The schedule as lanes: one column per thread, one row per run of steps of one thread
    (its first access, and how many steps the run took), the last `rows` runs up to `cut`, or
    up to where thread `failing` started explaining a failed assertion (pytest's rewritten
    asserts load @py... names only then).

    Every line fits in `width` columns: a cell's text wraps rather than being cut; when the
    columns would be too narrow, threads that made no access in the rows shown are left out
    (and named below the table); when they still would be, the rows are printed as a list.
    `labels` names the threads the test started (who started each, and where); a
    `(lock/wait)` row is explained below the table when there is one."""
    import textwrap

    runs = lane_runs(steps, cut, failing)
    if not runs:
        return "(no steps recorded)"
    accesses = [_split_idle(what)[1] for _tid, what, _n in runs]
    files = {access.split(":", 1)[0] for access in accesses if ":" in access}
    runs = [(tid, _short(what, files), n) for tid, what, n in runs]
    width = max(40, width)
    shown = runs[-rows:]
    skipped = len(runs) - len(shown)
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
    if skipped:
        out.append(f"  ({skipped} earlier runs, {step} steps, not shown)")
    texts = []
    for tid, what, n in runs[skipped:]:
        texts.append((step, tid, what + (f" (+{n - 1})" if n > 1 else "")))
        step += n
    texts = [t for t in texts if t[1] in threads]
    if cw >= _MIN_CELL:
        out.append("  step  " + " | ".join(f"thread {t}".ljust(cw) for t in threads))
        for at, tid, text in texts:
            pieces = textwrap.wrap(text, cw, break_on_hyphens=False) or [""]
            for i, piece in enumerate(pieces):
                number = f"{at:>4}" if i == 0 else "    "
                cells = [(piece if t == tid else "").ljust(cw) for t in threads]
                out.append(f"  {number}  " + " | ".join(cells))
    else:
        out.append("  step  thread  access")
        room = width - 16
        for at, tid, text in texts:
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
    if any(text.startswith("(lock/wait)") for _at, _tid, text in texts):
        notes.append(_LOCK_WAIT_NOTE)
    for note in notes:
        out.extend(textwrap.wrap(note, width - 2, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(line.rstrip() for line in out)


def lane_runs(steps: list, cut: int | None = None, failing: int | None = None) -> list:
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
    for tid, code, offset in steps:
        what = describe_step(code, offset)
        if _ASSERT_NOISE.search(what):
            continue  # pytest's assertion rewriting explaining a failure, not the program
        if runs and runs[-1][0] == tid:
            runs[-1][2] += 1
            if runs[-1][1] in _IDLE and what not in _IDLE:
                runs[-1][1] = f"{runs[-1][1]} {what}"
        else:
            runs.append([tid, what, 1])
    return [tuple(run) for run in runs]


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
