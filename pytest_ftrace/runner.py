"""The stress runner: a test body in N threads at once, for M rounds, each round started by a
barrier, with every execution's outcome collected.

Nothing can leave a thread waiting forever: each worker catches every exception (SystemExit,
KeyboardInterrupt and pytest's outcome exceptions included) and goes on to the next round, the
barrier has a timeout, and the supervising thread aborts the barrier and stops waiting once the
deadline passes. Workers are daemon threads, so a body that never returns cannot keep the
process alive at exit.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_ftrace.fixtures import ThreadFixtures
from pytest_ftrace.report import OUTCOME_SKIP, OUTCOME_XFAIL, Failure, Outcome

_STOPPING = (KeyboardInterrupt, pytest.exit.Exception)

# Called as (threads, iteration) by each worker as its round starts; --ftrace-isolate sets it
# in the child process so that a crash can be blamed on its round.
ROUND_LISTENER: Callable[[int, int], None] | None = None

# (test node id, thread) for every thread a watchdog gave up on in this process.
LEAKED: list[tuple[str, threading.Thread]] = []


def leaked_alive() -> list[tuple[str, threading.Thread]]:
    """The leaked threads that are still running."""
    return [(nodeid, thread) for nodeid, thread in LEAKED if thread.is_alive()]


def _guard_sessions() -> None:
    """Make every session in this process report the leak and not wait for it at exit."""
    from pytest_ftrace import hooks, isolate

    isolate.guard_sessions(hooks.ACTIVE_CONFIGS)


class Hang(Exception):
    """The test's threaded execution did not finish within the timeout."""


@dataclass
class Hooks:
    """Calls the runner makes in each worker thread; --ftrace plugs its instrumentation in here."""

    thread_enter: Callable[[int], None] | None = None
    round_start: Callable[[int], None] | None = None
    round_end: Callable[[float], None] | None = None
    thread_exit: Callable[[], None] | None = None


@dataclass
class ThreadedRun:
    item: pytest.Item
    body: Callable[..., Any]
    threads: int
    iterations: int
    timeout: float
    hooks: Hooks = field(default_factory=Hooks)
    takes_fixtures: bool = True

    def run(self) -> Outcome:
        """Run every thread's rounds; returns the outcome (raises KeyboardInterrupt/Exit)."""
        __tracebackhide__ = True
        outcome = Outcome(self.threads, self.iterations)
        self._lock = threading.Lock()
        self._outcome = outcome
        self._stop = threading.Event()
        self._stopping: BaseException | None = None
        # One party more than the workers for the final barrier would let the supervisor wait
        # for teardown; the workers alone suffice, the supervisor joins them.
        self._barrier = threading.Barrier(self.threads, timeout=self.timeout)
        self._rounds: list[int | None] = [None] * self.threads  # the round each worker is in
        before = set(threading.enumerate())
        workers = [
            threading.Thread(target=self._worker, args=(k,), name=f"ftrace-{k}", daemon=True)
            for k in range(self.threads)
        ]
        deadline = time.monotonic() + self.timeout
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                worker.join(max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C in the main thread: let the workers stop, then go on
            self._abort()
            for worker in workers:
                worker.join(1.0)
            raise
        if any(w.is_alive() for w in workers):
            # Let the threads that only wait at the barrier leave; the rest are stuck.
            self._abort()
            grace = time.monotonic() + 0.5
            for worker in workers:
                worker.join(max(0.0, grace - time.monotonic()))
        alive = [w for w in workers if w.is_alive()]
        if alive:
            # Threads the body started and left running (a deadlocked helper thread, say).
            started = [
                t
                for t in threading.enumerate()
                if t not in before and t not in workers and t.is_alive()
            ]
            stuck = [workers.index(w) for w in alive]
            first = min(stuck, key=lambda k: (self._rounds[k] is None, self._rounds[k] or 0, k))
            # Threads running since before the test (a fixture's, an earlier test's): one of
            # them may hold what the stuck ones wait for. The waiting thread is left out.
            me = threading.current_thread()
            earlier = [t for t in before if t is not me and t.is_alive()]
            hang = self._hang_error(workers, alive, started, earlier)
            if self._rounds[first] is None:  # stuck before its first round (fixture set-up)
                outcome.failures.append(Failure(None, None, hang, "call"))
            else:  # blamed on the earliest stuck round, so --ftrace prints its replay line
                outcome.failures.append(Failure(first, self._rounds[first], hang, "call"))
            leaked = alive + started
            LEAKED.extend((self.item.nodeid, t) for t in leaked)
            _guard_sessions()
            blocking = [t.name for t in started if not t.daemon]
            outcome.notes.append(
                f"leaked threads: {', '.join(t.name for t in leaked)} were still running when "
                "the test was given up"
                + (f" ({', '.join(blocking)} not daemon)" if blocking else "")
                + "; if they still are at the end of the session, the process exits with "
                "os._exit instead of waiting for them."
            )
            reached = max((r for r in self._rounds if r is not None), default=-1)
            if reached < self.iterations - 1:
                outcome.notes.append(
                    f"iterations {reached + 1}-{self.iterations - 1} did not run"
                    if reached + 1 < self.iterations - 1
                    else f"iteration {reached + 1} did not run"
                )
        if self._stopping is not None:
            raise self._stopping
        return outcome

    def _abort(self) -> None:
        self._stop.set()
        self._barrier.abort()

    def _record(self, failure: Failure) -> None:
        exc = failure.exc
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

    def _worker(self, index: int) -> None:
        hooks = self.hooks
        fixtures = ThreadFixtures(
            self.item,
            {
                "thread_index": index,
                "iteration_index": 0,
                "num_parallel_threads": self.threads,
                "num_iterations": self.iterations,
            },
        )
        kwargs: dict[str, Any] | None = None
        try:
            if hooks.thread_enter is not None:
                hooks.thread_enter(index)
            kwargs = fixtures.setup() if self.takes_fixtures else {}
        except BaseException as exc:  # noqa: BLE001 - reported as this thread's failure
            self._record(Failure(index, None, exc, "setup"))
        iteration_arg = kwargs is not None and "iteration_index" in kwargs
        try:
            for iteration in range(self.iterations):
                if not self._wait():
                    return
                if kwargs is None:
                    continue
                if iteration_arg:
                    kwargs["iteration_index"] = iteration
                self._rounds[index] = iteration
                if ROUND_LISTENER is not None:
                    ROUND_LISTENER(self.threads, iteration)
                if hooks.round_start is not None:
                    hooks.round_start(iteration)
                started = time.perf_counter()
                try:
                    self.body(**kwargs)
                except BaseException as exc:  # noqa: BLE001 - every outcome is collected
                    self._record(Failure(index, iteration, exc))
                    if isinstance(exc, _STOPPING):
                        return
                if hooks.round_end is not None:
                    hooks.round_end(time.perf_counter() - started)
            # Tear down only once every thread has finished its last round.
            self._wait()
        finally:
            for exc in fixtures.teardown():
                self._record(Failure(index, None, exc, "teardown"))
            if hooks.thread_exit is not None:
                try:
                    hooks.thread_exit()
                except BaseException as exc:  # noqa: BLE001
                    self._record(Failure(index, None, exc, "teardown"))

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
        parts = [
            f"the test's threads did not finish within {self.timeout:g}s "
            f"(--ftrace-timeout); {len(alive)} of {self.threads} still running"
        ]
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
