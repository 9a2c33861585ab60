"""The stress runner: a test body in N threads at once, for M rounds, each round started by a
barrier, with every execution's outcome collected.

Nothing can leave a thread waiting forever: each worker catches every exception (SystemExit,
KeyboardInterrupt and pytest's outcome exceptions included) and goes on to the next round, the
barrier has a timeout, and the supervising thread aborts the barrier and stops waiting once the
deadline passes. Workers are daemon threads, so a body that never returns cannot keep the
process alive at exit; threads the test starts get the daemon flag they would get on the main
thread (not daemon, unless the test says so), and the test waits for its non-daemon threads
(within the timeout), so their work is not dropped.

A verdict is never lost: an exception from the plugin's own machinery in a worker (the hooks
--ftrace plugs in, the waits, anything but the test's body and fixtures) fails the test as an
internal error of pytest-ftrace, with its traceback, and stops the run; it never ends as an
unhandled-thread-exception warning.

A worker given up on (its body still running at the deadline) is abandoned: an exception is
raised in it at its next Python instruction, so a body spinning in Python stops instead of
taking CPU (and, on a GIL build, the interpreter) from the tests that come after it.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import _thread
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_ftrace import state
from pytest_ftrace.report import (
    OUTCOME_SKIP,
    OUTCOME_XFAIL,
    Failure,
    Outcome,
    internal_error,
)
from pytest_ftrace.stress.fixtures import ThreadFixtures

_STOPPING = (KeyboardInterrupt, pytest.exit.Exception)
STOPPING = _STOPPING  # what stops the session: never turned into a test's failure

# Called as (threads, iteration) by each worker as its round starts; --ftrace-isolate sets it
# in the child process so that a crash can be blamed on its round.
ROUND_LISTENER: Callable[[int, int], None] | None = None


def _real_perf_counter() -> float:
    """Real time in a managed thread too (exact mode's virtual clock stands in for
    time.perf_counter there)."""
    from pytest_ftrace import _native

    return (_native.real_clock("perf_counter") or time.perf_counter)()


# What a worker does outside the rounds: a hang there is not a round's (no replay line).
_OUTSIDE = ("thread set-up", "fixture tear-down")


class Hang(Exception):
    """The test's threaded execution did not finish within the timeout."""


class Abandoned(BaseException):  # noqa: N818 - not an error of the test: it was given up on
    """Raised in a worker the runner gave up on, so that a body still spinning stops."""


def abandon(thread: threading.Thread) -> None:
    """Raise `Abandoned` in `thread` at its next Python instruction (a thread blocked in C
    gets it when it comes back, if ever)."""
    import ctypes

    if thread.ident is None or not thread.is_alive():
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(Abandoned)
    )


def _waited_for(thread: threading.Thread) -> bool:
    """Whether the test waits for `thread`, one it started: a non-daemon thread other than a
    pool's worker (an executor's threads live as long as the executor, not the test)."""
    if thread.daemon:
        return False
    futures = sys.modules.get("concurrent.futures.thread")
    target = getattr(thread, "_target", None)
    return futures is None or target is not getattr(futures, "_worker", None)


@dataclass
class Hooks:
    """Calls the runner makes in each worker thread; --ftrace plugs its instrumentation in here."""

    thread_enter: Callable[[int], None] | None = None
    round_start: Callable[[int], None] | None = None
    round_end: Callable[[float], None] | None = None
    thread_exit: Callable[[], None] | None = None
    # Called with a reason when the run stops early (an internal error): whatever waits in
    # the plugin's machinery (the exact-mode scheduler) is let go.
    release: Callable[[str], None] | None = None
    # Called, once the workers are done, with the threads the test started that the test
    # waits for and the others it left running: whether they are all blocked for good (only
    # a thread outside the test could wake them, e.g. a fixture's teardown that stops them),
    # so the test does not wait for them, as plain pytest would not.
    settled: Callable[[list, list], bool] | None = None
    # Called as (round, failures so far) by each worker before every round after the first,
    # once the round barrier is passed: False ends the run there (explore mode's budget).
    # It must give every worker the same answer for a round.
    more_rounds: Callable[[int, int], bool] | None = None
    # Called with a round's number once every worker has ended that round, by one of them,
    # before the next round starts (forked rounds send the round's results from here);
    # False: no round after it.
    round_over: Callable[[int], bool] | None = None


@dataclass
class ThreadedRun:
    item: pytest.Item
    body: Callable[..., Any]
    threads: int
    iterations: int
    timeout: float
    hooks: Hooks = field(default_factory=Hooks)
    takes_fixtures: bool = True
    # perthread.Crew: workers started in the set-up phase with their fixtures built
    crew: Any = None
    # index -> what a worker has of its own, instead of its fixtures (perthread.UnitTestThread)
    context: Callable[[int], Any] | None = None
    # oneshot.Watch: stops the run when a round enters a process-wide facility
    watch: Any = None
    # Run only this round (a forked round's process, see ftrace/fork.py), not all of them.
    only_round: int | None = None
    # --ftrace's budget (ftrace/budget.py): called with n before round n, in one worker while
    # the others wait at the round barrier; False ends the rounds there.
    go_on: Callable[[int], bool] | None = None
    # The first round to run (a forked child that goes on from there), when only_round is None.
    first_round: int = 0

    def run(self) -> Outcome:
        """Run every thread's rounds; returns the outcome (raises KeyboardInterrupt/Exit)."""
        __tracebackhide__ = True
        outcome = Outcome(self.threads, self.iterations)
        # A real lock (exact mode makes threading.Lock schedulable): the plugin's own.
        self._lock = _thread.allocate_lock()
        self._outcome = outcome
        self._stop = threading.Event()
        self._stopping: BaseException | None = None
        # One party more than the workers for the final barrier would let the supervisor wait
        # for teardown; the workers alone suffice, the supervisor joins them.
        self._passes = 0  # the barrier's: one before each round and one after the last
        self._ended_at: int | None = None  # the round before which go_on said stop
        self._barrier = threading.Barrier(
            self.threads,
            action=self._between
            if self.go_on is not None or self.hooks.round_over is not None
            else None,
            timeout=self.timeout,
        )
        self._rounds: list[int | None] = [None] * self.threads  # the round each worker is in
        self._abandoned = False  # the supervisor gave up on the workers still running
        self._steps = ["thread set-up"] * self.threads  # what each worker does (for errors)
        before = set(threading.enumerate())
        crew = self.crew
        workers = (
            crew.workers
            if crew is not None
            else [
                threading.Thread(target=self._worker, args=(k,), name=f"ftrace-{k}", daemon=True)
                for k in range(self.threads)
            ]
        )
        deadline = time.monotonic() + self.timeout
        if crew is not None:
            crew.submit(self._worker)
        else:
            for worker in workers:
                worker.start()
        try:
            for worker in workers:
                self._join(worker, max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C in the main thread: let the workers stop, then go on
            self._abort()
            for worker in workers:
                self._join(worker, 1.0)
            raise
        if any(self._running(w) for w in workers):
            # Let the threads that only wait at the barrier leave; the rest are stuck.
            self._abort()
            grace = time.monotonic() + 0.5
            for worker in workers:
                self._join(worker, max(0.0, grace - time.monotonic()))
        alive = [w for w in workers if self._running(w)]
        unfinished: list[threading.Thread] = []
        if not alive:
            # The non-daemon threads the test started: the process would wait for them at
            # exit, so the test does, within its timeout (their work is part of the test).
            pending = [
                t
                for t in threading.enumerate()
                if t not in before and t not in workers and t.is_alive() and _waited_for(t)
            ]
            unfinished = self._wait_started(pending, before, workers, deadline)
        if alive or unfinished:
            # Threads the body started and left running (a deadlocked helper thread, say).
            started = [
                t
                for t in threading.enumerate()
                if t not in before and t not in workers and t.is_alive()
            ]
            # Threads running since before the test (a fixture's, an earlier test's): one of
            # them may hold what the stuck ones wait for. The waiting thread is left out.
            me = threading.current_thread()
            earlier = [t for t in before if t is not me and t.is_alive()]
            hang = self._hang_error(workers, alive, started, earlier)
            stuck = [workers.index(w) for w in alive]
            first = min(
                stuck,
                key=lambda k: (self._rounds[k] is None, self._rounds[k] or 0, k),
                default=None,
            )
            if first is None or self._rounds[first] is None or self._steps[first] in _OUTSIDE:
                # stuck before its first round (fixture set-up), or only the test's threads
                outcome.failures.append(Failure(None, None, hang, "call"))
            else:  # blamed on the earliest stuck round, so --ftrace prints its replay line
                outcome.failures.append(Failure(first, self._rounds[first], hang, "call"))
            # The workers still running are given up on: a body spinning in Python stops at
            # once, instead of slowing every test after this one.
            self._abandoned = True
            if crew is not None:
                crew.abandoned.update(alive)
            for worker in alive:
                worker._daemonic = True  # ours: back to what it was started as
                abandon(worker)
            leaked = alive + started
            state.LEAKED.extend((self.item.nodeid, t) for t in leaked)
            state.guard_sessions()  # every session reports the leak and does not wait for it
            blocking = [t.name for t in started if not t.daemon]
            outcome.notes.append(
                f"leaked threads: {', '.join(t.name for t in leaked)} were still running when "
                "the test was given up"
                + (f" ({', '.join(blocking)} not daemon)" if blocking else "")
                + "; if they still are at the end of the session, the process exits with "
                "os._exit instead of waiting for them."
            )
            if alive:
                outcome.notes.append(
                    f"interrupted: the test's body in {', '.join(t.name for t in alive)} gets "
                    "an exception at its next Python instruction, so that it stops instead of "
                    "slowing the tests after this one."
                )
            reached = max((r for r in self._rounds if r is not None), default=-1)
            if self.go_on is not None:  # rounds by budget: no count was promised
                self._ended_at = max(1, min(self._ended_at or self.iterations, reached + 1))
            elif reached < self.iterations - 1 and self.only_round is None:
                outcome.notes.append(
                    f"iterations {reached + 1}-{self.iterations - 1} did not run"
                    if reached + 1 < self.iterations - 1
                    else f"iteration {reached + 1} did not run"
                )
        if self._stopping is not None:
            raise self._stopping
        if self._ended_at is not None:
            outcome.iterations = self._ended_at  # the rounds that ran
        return outcome

    def _wait_started(self, pending: list, before: set, workers: list, deadline: float) -> list:
        """Wait, until `deadline`, for the threads in `pending` (non-daemon threads the test
        started) to finish, or, when the mode can tell (`Hooks.settled`), until every thread
        the test started that is left is blocked for good. Returns the threads of `pending`
        the test still waits for (a hang). A mode that cannot tell (its locks are the real
        ones: chaos mode, a plain --threads run) asks the kernel (`blocked.KernelView`)."""
        settled = self.hooks.settled
        if settled is None:
            from pytest_ftrace.stress.blocked import KernelView

            settled = KernelView()
        seen = 0  # consecutive looks that found them blocked for good
        while True:
            pending = [t for t in pending if t.is_alive()]
            left = max(0.0, deadline - time.monotonic())
            if not pending or not left:
                return pending
            others = [
                t
                for t in threading.enumerate()
                if t not in before and t not in workers and t not in pending and t.is_alive()
            ]
            try:
                seen = seen + 1 if settled(pending, others) else 0
            except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
                where = "telling whether the test's threads are blocked for good"
                self._record(Failure(None, None, internal_error(where, exc), "internal"))
                return []
            if seen == 2:  # twice, a poll apart: not a thread between a wake and its wait
                return []
            pending[0].join(min(left, 0.02))

    def _between(self) -> None:
        """The round barrier's action (by the last worker to get there): the end of the round
        before it (round_over), and whether the next round runs (go_on)."""
        passes, self._passes = self._passes, self._passes + 1
        if self.hooks.round_over is not None:
            self._round_over(passes)
        n = self.first_round + passes
        if self.go_on is None or self._ended_at is not None or self._stop.is_set():
            return
        if n < self.iterations and not self.go_on(n):
            self._ended_at = n

    def _abort(self) -> None:
        self._stop.set()
        self._barrier.abort()

    def _join(self, worker: threading.Thread, timeout: float) -> None:
        if self.crew is None:
            worker.join(timeout)
        else:  # a crew's worker lives on until the tear-down phase
            self.crew.wait(worker, timeout)

    def _running(self, worker: threading.Thread) -> bool:
        return worker.is_alive() if self.crew is None else self.crew.running(worker)

    def _context(self, index: int) -> Any:
        """What worker `index` has of its own: its fixtures (or a TestCase instance)."""
        if self.crew is not None:
            return self.crew.contexts[index]
        if self.context is not None:
            return self.context(index)
        return ThreadFixtures(
            self.item,
            {
                "thread_index": index,
                "iteration_index": 0,
                "num_parallel_threads": self.threads,
                "num_iterations": self.iterations,
            },
        )

    def _record(self, failure: Failure) -> None:
        exc = failure.exc
        if self._abandoned:
            return  # the run is over and reported; an abandoned worker's news is not news
        with self._lock:
            if isinstance(exc, OUTCOME_XFAIL):
                self._outcome.xfailed.append(failure)
            elif isinstance(exc, OUTCOME_SKIP):
                self._outcome.skipped.append(failure)
            else:
                self._outcome.failures.append(failure)
            if isinstance(exc, _STOPPING) and self._stopping is None:
                self._stopping = exc
        if isinstance(exc, _STOPPING):
            self._abort()

    def _internal(self, index: int, iteration: int | None, where: str, exc: BaseException):
        """An exception from the plugin's machinery in worker `index`: the test fails with it,
        and the run stops (its other results cannot be trusted to be complete)."""
        if self._abandoned or isinstance(exc, Abandoned):
            return
        if isinstance(exc, _STOPPING):  # Ctrl-C or pytest.exit landing in the machinery
            self._record(Failure(index, iteration, exc))
            return
        self._record(
            Failure(index, iteration, internal_error(f"{where} of thread {index}", exc), "internal")
        )
        self._abort()
        release = self.hooks.release
        if release is not None:
            try:
                release(f"internal error of pytest-ftrace in thread {index}")
            except BaseException:  # noqa: BLE001, S110 - already failing; the run is stopping
                pass

    def _worker(self, index: int) -> None:
        # The test's own threads get the daemon flag they would get when started from the
        # main thread; the worker itself was started as a daemon thread.
        threading.current_thread()._daemonic = False
        self._steps[index] = "thread set-up"
        try:
            self._work(index)
        except BaseException as exc:  # noqa: BLE001 - only the machinery's can get here
            self._internal(index, self._rounds[index], self._steps[index], exc)
        finally:
            threading.current_thread()._daemonic = True

    def _work(self, index: int) -> None:
        hooks = self.hooks
        fixtures = self._context(index)
        kwargs: dict[str, Any] | None = None
        if hooks.thread_enter is not None:
            self._steps[index] = "thread_enter"
            try:
                hooks.thread_enter(index)
            except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
                self._internal(index, None, "thread_enter", exc)
                self._leave(index, fixtures)
                return
        self._steps[index] = "thread set-up"
        try:
            if self.crew is not None:  # built in the set-up phase
                kwargs = self.crew.kwargs[index]
            else:
                kwargs = fixtures.setup() if self.takes_fixtures or self.context else {}
        except BaseException as exc:  # noqa: BLE001 - reported as this thread's failure
            if self._abandoned:
                return
            self._record(Failure(index, None, exc, "setup"))
        iteration_arg = kwargs is not None and "iteration_index" in kwargs
        body = getattr(fixtures, "body", None) or self.body
        for_round = getattr(fixtures, "for_round", None) if self.takes_fixtures else None
        watch = self.watch
        try:
            if self.only_round is None:
                rounds = range(self.first_round, self.iterations)
            else:
                rounds = [self.only_round]
            for iteration in rounds:
                if iteration and kwargs is not None and for_round is not None:
                    self._steps[index] = "making the round's tmp_path"
                    for_round(kwargs, iteration)
                self._steps[index] = "the round barrier"
                if not self._wait():
                    return
                if self._ended_at is not None:
                    break  # the budget ends the rounds here: on to the last barrier
                if iteration and hooks.more_rounds is not None:
                    self._steps[index] = "more_rounds"
                    if not hooks.more_rounds(iteration, len(self._outcome.failures)):
                        break
                if kwargs is None:
                    continue
                if iteration_arg:
                    kwargs["iteration_index"] = iteration
                self._rounds[index] = iteration
                self._steps[index] = "round_start"
                if ROUND_LISTENER is not None:
                    ROUND_LISTENER(self.threads, iteration)
                if hooks.round_start is not None:
                    hooks.round_start(iteration)
                started = _real_perf_counter()
                if watch is not None:
                    watch.enter()
                try:
                    body(**kwargs)
                except BaseException as exc:  # noqa: BLE001 - every outcome is collected
                    if self._abandoned:
                        return
                    if watch is None or not watch.caught(exc):
                        self._record(Failure(index, iteration, exc))
                    if isinstance(exc, _STOPPING):
                        return
                finally:
                    if watch is not None:
                        watch.leave()
                if watch is not None and watch.reason is not None:
                    self._stop.set()  # the round goes on to its end; no round after it
                    self._barrier.abort()
                self._steps[index] = "round_end"
                if hooks.round_end is not None:
                    hooks.round_end(_real_perf_counter() - started)
            # Tear down only once every thread has finished its last round.
            self._steps[index] = "the last barrier"
            self._wait()
        except BaseException as exc:  # noqa: BLE001 - only the machinery's can get here
            self._internal(index, self._rounds[index], self._steps[index], exc)
        finally:
            self._leave(index, fixtures)

    def _leave(self, index: int, fixtures: ThreadFixtures) -> None:
        """Tear this worker's fixtures down and leave the machinery (not when abandoned: the
        test is over, and its fixtures' tear-down must not run into the next test)."""
        if self._abandoned:
            return
        if self.crew is None:
            self._steps[index] = "fixture tear-down"
        for exc in fixtures.teardown() if self.crew is None else ():  # the crew's: later
            self._record(Failure(index, None, exc, "teardown"))
        if self.hooks.thread_exit is not None:
            self._steps[index] = "thread_exit"
            try:
                self.hooks.thread_exit()
            except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
                self._internal(index, None, "thread_exit", exc)

    def _round_over(self, passes: int) -> None:
        """After the first pass of the barrier, every worker has ended a round."""
        if passes == 0 or self._stop.is_set():
            return
        finished = self.first_round + passes - 1 if self.only_round is None else self.only_round
        try:
            go_on = self.hooks.round_over(finished)
        except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
            self._record(Failure(None, finished, internal_error("round_over", exc), "internal"))
            go_on = False
        if not go_on:
            self._stop.set()  # the workers leave at this barrier: no round after this one

    def _wait(self) -> bool:
        """Wait for the round's barrier; False when the run is being stopped."""
        if self._stop.is_set():
            return False
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return not self._stop.is_set()

    def _hang_error(
        self,
        workers: list[threading.Thread],
        alive: list[threading.Thread],
        started: list[threading.Thread],
        earlier: list[threading.Thread],
    ) -> Hang:
        import traceback

        frames = sys._current_frames()
        if alive:
            head = (
                f"the test's threads did not finish within {self.timeout:g}s "
                f"(--ftrace-timeout); {len(alive)} of {self.threads} still running"
            )
            steps = sorted({self._steps[workers.index(t)] for t in alive if t in workers})
            if steps and set(steps) <= set(_OUTSIDE):  # their fixtures, not the test's body
                head += f", in their per-thread fixtures' {' or '.join(steps)}"
        else:
            waited = [t for t in started if _waited_for(t)]
            head = (
                f"the threads the test started did not finish within {self.timeout:g}s "
                f"(--ftrace-timeout): {', '.join(t.name for t in waited)} (not daemon, so "
                "the test waits for them, as the process would at exit)"
            )
        parts = [head]
        for thread in [*alive, *started, *earlier]:
            frame = frames.get(thread.ident)
            daemon = "daemon" if thread.daemon else "not daemon"
            if thread in alive:
                parts.append(f"\nThread {thread.name} (most recent call last):")
            elif thread in started:
                parts.append(
                    f"\nThread {thread.name}, started by the test, {daemon} "
                    "(most recent call last):"
                )
            else:
                parts.append(
                    f"\nThread {thread.name}, running since before the test, {daemon} "
                    "(most recent call last):"
                )
            if frame is not None:
                parts.append("".join(traceback.format_stack(frame)).rstrip())
        return Hang("\n".join(parts))
