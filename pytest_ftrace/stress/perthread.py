"""What each worker thread of a threaded test has of its own: its function fixtures, built in
that thread and nowhere else; its tmp_path / tmpdir; its unittest TestCase instance.

Function fixtures (fixtures.py builds them): pytest's set-up phase would build every fixture
the test names in the main thread, and the workers would build their own on top (1 + N
instances, the first unused). Instead, in the set-up phase:
- `prefill` puts a placeholder in `item.funcargs` for each fixture the workers build, so that
  pytest's set-up (`FixtureRequest._fillfixtures` skips names already in funcargs) builds only
  the shared ones;
- `Crew.start`, after pytest's set-up, starts the worker threads; each builds its fixtures and
  waits. An error there is raised in the set-up phase, so pytest reports it as a set-up error
  of the test, as it would without threads.
The call phase runs the rounds in the same threads (runner.py), and the crew's tear-down is a
finalizer of the item, registered after pytest's own: it runs first in the tear-down phase
(the per-thread fixtures may use shared function fixtures), and its errors are the test's
tear-down errors.

tmp_path / tmpdir: a new directory for each thread and round, named
`<test>_t<thread>_r<round>_<n>`; when a fixture of the thread uses it, the thread keeps one
directory, `<test>_t<thread>_<n>`, for all its rounds (the fixture and the test see the same).

unittest: each thread makes its own instance of the TestCase, runs its setUp before the first
round and its tearDown and cleanups after the last, in the call phase (where unittest runs them).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pytest_ftrace.stress.tmpdirs import builtin_tmp

CREW_KEY = pytest.StashKey["Crew"]()


class Placeholder:
    """Stands in `item.funcargs` for a fixture every worker thread builds for itself."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<fixture {self.name!r}: built in each worker thread (pytest-ftrace)>"


def per_thread_names(item: pytest.Item) -> list[str]:
    """The fixtures each worker builds for itself (fixtures.ThreadFixtures): those the test
    names and, through them, the per-thread fixtures they use."""
    from pytest_ftrace.stress.fixtures import THREAD_AWARE, _is_per_thread

    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found: list[str] = []
    todo = list(info.argnames)
    while todo:
        name = todo.pop(0)
        if name in found or name in THREAD_AWARE:
            continue
        if builtin_tmp(item, name):
            found.append(name)
            continue
        fixturedefs = info.name2fixturedefs.get(name)
        if fixturedefs and _is_per_thread(fixturedefs[-1]):
            found.append(name)
            todo.extend(fixturedefs[-1].argnames)
    return found


def prefill(item: pytest.Item) -> None:
    """Before pytest's set-up: keep it from building the fixtures the workers build."""
    funcargs = getattr(item, "funcargs", None)
    if not isinstance(funcargs, dict):
        return
    try:
        names = per_thread_names(item)
    except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
        from pytest_ftrace import report

        raise report.internal_error("finding the per-thread fixtures", exc) from None
    for name in names:
        funcargs.setdefault(name, Placeholder(name))


def fixture_values(item: pytest.Item) -> tuple:
    """The values of the test's fixtures: the shared ones and every worker's own."""
    values = [v for v in getattr(item, "funcargs", {}).values() if not isinstance(v, Placeholder)]
    crew = item.stash.get(CREW_KEY, None)
    if crew is not None:
        for kwargs in crew.kwargs:
            values.extend((kwargs or {}).values())
    return tuple(values)


class SetupError(Exception):
    """Raised in place of a worker's fixture error when it is not an Exception."""


class Crew:
    """The worker threads of one threaded test, started in its set-up phase with their
    fixtures built, running its rounds in the call phase and tearing down in the tear-down
    phase (runner.ThreadedRun uses them)."""

    def __init__(self, item: pytest.Item, threads: int, iterations: int, timeout: float):
        from pytest_ftrace.stress.fixtures import ThreadFixtures

        self.item = item
        self.threads = threads
        self.timeout = timeout
        self.contexts = [
            ThreadFixtures(
                item,
                {
                    "thread_index": k,
                    "iteration_index": 0,
                    "num_parallel_threads": threads,
                    "num_iterations": iterations,
                },
            )
            for k in range(threads)
        ]
        self.kwargs: list[dict[str, Any] | None] = [None] * threads
        self._errors: list[BaseException | None] = [None] * threads
        self._teardown_errors: list[list[BaseException]] = [[] for _ in range(threads)]
        self._machinery: list[BaseException | None] = [None] * threads  # the plugin's errors
        self._ready = [threading.Event() for _ in range(threads)]
        self._done = [threading.Event() for _ in range(threads)]  # the current job is done
        self._gone = [threading.Event() for _ in range(threads)]  # torn down
        self._jobs = [queue.SimpleQueue() for _ in range(threads)]
        self.abandoned: set[threading.Thread] = set()
        self.used = False  # a threaded run took the crew
        self.finished = False
        self.watch = None  # oneshot.Watch, while the fixtures are built
        self.workers = [
            threading.Thread(target=self._main, args=(k,), name=f"ftrace-{k}", daemon=True)
            for k in range(threads)
        ]

    # the worker's side
    def _main(self, index: int) -> None:
        from pytest_ftrace.stress.runner import Abandoned

        try:
            self._serve(index)
        except Abandoned:  # given up on (the runner or the set-up phase said so): just end
            pass
        except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
            self._machinery[index] = exc
            for events in (self._ready, self._done, self._gone):  # nobody waits for it
                events[index].set()

    def _serve(self, index: int) -> None:
        me = threading.current_thread()
        me._daemonic = False  # threads a fixture starts get the main thread's default
        watch = self.watch
        if watch is not None:
            watch.enter()
        try:
            self.kwargs[index] = self.contexts[index].setup()
        except BaseException as exc:  # noqa: BLE001 - reported in the set-up phase
            self._errors[index] = exc
        finally:
            if watch is not None:
                watch.leave()
            me._daemonic = True
            self._ready[index].set()
        if me in self.abandoned:  # stuck in its set-up, given up on: ends once it comes back
            return
        while True:
            job = self._jobs[index].get()
            if job is None:
                break
            try:
                job(index)
            finally:
                self._done[index].set()
            if me in self.abandoned:  # its round was given up on: no tear-down
                return
        me._daemonic = False
        try:
            self._teardown_errors[index] = self.contexts[index].teardown()
        finally:
            me._daemonic = True
            self._gone[index].set()

    def _send(self, index: int, job: Callable[[int], None] | None) -> None:
        self._jobs[index].put(job)

    # the main thread's side
    def start(self) -> tuple[str | None, BaseException | None]:
        """Start the workers and wait until each has built its fixtures; returns (None, the
        first error: a set-up error of the test; the finalizer tears down what the others
        built). When a fixture entered a process-wide facility (oneshot.py), every worker
        tears down at once and the reason comes first: the test is to run on one thread."""
        from pytest_ftrace.stress import oneshot

        self.item.addfinalizer(self.finish)
        watch = oneshot.watch_for(self.threads)
        if watch is not None and watch.activate():
            self.watch = watch
        try:
            for worker in self.workers:
                worker.start()
            deadline = time.monotonic() + self.timeout
            for event in self._ready:
                event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            if self.watch is not None:
                self.watch.deactivate()
        if self.watch is not None and self.watch.reason is not None:
            reason = self.watch.reason
            exc = self._finish()
            if exc is not None:  # of a set-up that is dropped: said with the reason
                reason += (
                    f" (and tearing down the threads' fixtures failed: {type(exc).__name__}: {exc})"
                )
            return reason, None
        stuck = [k for k in range(self.threads) if not self._ready[k].is_set()]
        if stuck:
            from pytest_ftrace.stress import runner

            self.abandoned.update(self.workers[k] for k in stuck)
            _give_up(self.item, [self.workers[k] for k in stuck])
            return None, runner.Hang(
                f"the per-thread fixtures of thread(s) {', '.join(map(str, stuck))} were not "
                f"set up within {self.timeout:g}s (--ftrace-timeout)"
            )
        broken = [(k, e) for k, e in enumerate(self._machinery) if e is not None]
        if broken:
            from pytest_ftrace import report

            k, exc = broken[0]
            return None, report.internal_error(f"the set-up of worker thread {k}", exc)
        failed = [(k, exc) for k, exc in enumerate(self._errors) if exc is not None]
        if failed:
            k, exc = failed[0]
            where = f"in thread {k}" + (
                f" (and {len(failed) - 1} more of the {self.threads} threads)"
                if len(failed) > 1
                else ""
            )
            if hasattr(exc, "add_note"):
                exc.add_note(f"(per-thread fixture set-up {where}, pytest-ftrace)")
            return None, exc
        return None, None

    def submit(self, job: Callable[[int], None]) -> None:
        """Run `job(index)` in every worker (the call phase's rounds)."""
        self.used = True
        for k in range(self.threads):
            self._done[k].clear()
            self._send(k, job)

    def wait(self, worker: threading.Thread, timeout: float) -> None:
        self._done[self.workers.index(worker)].wait(timeout)

    def running(self, worker: threading.Thread) -> bool:
        return worker.is_alive() and not self._done[self.workers.index(worker)].is_set()

    def finish(self) -> None:
        """The item's finalizer: every worker tears its fixtures down; the first error is
        raised (the test's tear-down error)."""
        __tracebackhide__ = True
        from pytest_ftrace import report

        try:
            error = self._finish()
        except _passing():
            raise
        except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
            raise report.internal_error("the per-thread fixtures' tear-down", exc) from None
        if error is not None:
            raise error

    def _finish(self) -> BaseException | None:
        if self.finished:
            return None
        self.finished = True
        if CREW_KEY in self.item.stash:
            del self.item.stash[CREW_KEY]
        # Not the workers given up on, nor those still in a round the run stopped waiting for
        # (Ctrl-C): the test is over, their tear-down must not run into the next test.
        live = [
            k
            for k, w in enumerate(self.workers)
            if w not in self.abandoned
            and w.ident is not None
            and self._ready[k].is_set()
            and (not self.used or self._done[k].is_set())
        ]
        unready = [
            w
            for k, w in enumerate(self.workers)
            if w not in self.abandoned and w.ident is not None and not self._ready[k].is_set()
        ]
        if unready:  # still building its fixtures (the set-up phase was given up on)
            self.abandoned.update(unready)
            _give_up(self.item, unready)
        for k in live:
            self._send(k, None)
        deadline = time.monotonic() + self.timeout
        for k in live:
            self._gone[k].wait(max(0.0, deadline - time.monotonic()))
        for k in live:
            self.workers[k].join(max(0.0, deadline - time.monotonic()))
        stuck = [k for k in live if not self._gone[k].is_set()]
        errors = [(k, e) for k in live for e in self._teardown_errors[k]]
        broken = [(k, e) for k, e in enumerate(self._machinery) if e is not None]
        if broken:
            from pytest_ftrace import report

            k, exc = broken[0]
            return report.internal_error(f"the per-thread fixtures' tear-down of thread {k}", exc)
        if stuck:
            from pytest_ftrace.stress import runner

            _give_up(self.item, [self.workers[k] for k in stuck])
            return runner.Hang(
                f"the per-thread fixtures of thread(s) {', '.join(map(str, stuck))} were not "
                f"torn down within {self.timeout:g}s (--ftrace-timeout)"
            )
        if errors:
            k, exc = errors[0]
            if hasattr(exc, "add_note"):
                more = f" ({len(errors)} tear-down errors in all)" if len(errors) > 1 else ""
                exc.add_note(f"(per-thread fixture tear-down in thread {k}{more}, pytest-ftrace)")
            return exc
        return None


def _passing() -> tuple[type[BaseException], ...]:
    """What goes through the guards as it is: Ctrl-C, pytest.exit, --ftrace-timeout's Hang."""
    from pytest_ftrace.stress import runner

    phase_timeout = sys.modules.get("pytest_ftrace.phase_timeout")
    landing = getattr(phase_timeout, "_AsyncHang", None)  # its watchdog's, off the main thread
    return (*runner.STOPPING, runner.Hang, *((landing,) if landing is not None else ()))


def _give_up(item: pytest.Item, workers: list[threading.Thread]) -> None:
    """As the runner does with a stuck worker: interrupted, daemon again, reported as leaked."""
    from pytest_ftrace.stress import runner

    for worker in workers:
        worker._daemonic = True
        runner.abandon(worker)
    runner.LEAKED.extend((item.nodeid, worker) for worker in workers)
    runner._guard_sessions()


def start_crew(item: pytest.Item, threads: int, iterations: int, timeout: float) -> str | None:
    """After pytest's set-up of a threaded test: its workers, with their fixtures. Returns
    why the test runs on one thread instead (its fixtures were built here, by pytest), or
    None."""
    __tracebackhide__ = True
    from pytest_ftrace import report

    try:
        crew = Crew(item, threads, iterations, timeout)
        item.stash[CREW_KEY] = crew
        reason, error = crew.start()
    except _passing():
        raise
    except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
        raise report.internal_error("starting the worker threads", exc) from None
    if error is not None:
        raise error
    if reason is not None:
        # As in a plain run: pytest builds them, on this thread, and tears them down.
        funcargs = item.funcargs
        for name in [n for n, v in funcargs.items() if isinstance(v, Placeholder)]:
            del funcargs[name]
        one = {"thread_index": 0, "iteration_index": 0, "num_parallel_threads": 1}
        one["num_iterations"] = 1
        for name, value in one.items():
            if name in funcargs:
                funcargs[name] = value
        item._request._fillfixtures()
    return reason


def take_crew(item: pytest.Item, threads: int) -> Crew | None:
    """The crew for the call phase's run of `threads` threads, or None (a run of another
    size, such as a replay's, builds its fixtures in its own threads)."""
    crew = item.stash.get(CREW_KEY, None)
    if crew is None or crew.used or crew.threads != threads:
        return None
    return crew


def is_unittest(item: pytest.Item) -> bool:
    """Whether `item` is a unittest TestCase's test (its instance is not made here)."""
    plugin = sys.modules.get("_pytest.unittest")
    return plugin is not None and isinstance(item, plugin.TestCaseFunction)


class UnitTestThread:
    """One worker's own instance of a unittest TestCase: setUp before its first round, the
    test method each round, tearDown and the cleanups after the last."""

    def __init__(self, item: pytest.Item):
        self._item = item
        self._instance = None
        self._set_up = False  # setUp passed: tearDown runs (the cleanups run in any case)

    def setup(self) -> dict[str, Any]:
        __tracebackhide__ = True
        import unittest

        item = self._item
        cls = item.parent.obj
        method = getattr(cls, item.name, None)
        for holder in (cls, method):
            if getattr(holder, "__unittest_skip__", False):
                pytest.skip(getattr(holder, "__unittest_skip_why__", "") or "skipped")
        instance = cls(item.name)
        setup_runner = getattr(instance, "_setupAsyncioRunner", None)
        if setup_runner is not None:  # IsolatedAsyncioTestCase: its loop, as run() makes it
            setup_runner()
        self._instance = instance
        try:
            instance._callSetUp()
        except unittest.SkipTest as exc:
            pytest.skip(str(exc))
        self._set_up = True
        return {}

    def body(self) -> None:
        """One round: the test method on this thread's instance."""
        __tracebackhide__ = True
        import unittest

        instance = self._instance
        method = getattr(instance, self._item.name)
        expecting = getattr(method, "__unittest_expecting_failure__", False) or getattr(
            instance, "_expecting_failure", False
        )
        try:
            instance._callTestMethod(method)
        except unittest.SkipTest as exc:
            pytest.skip(str(exc))
        except Exception as exc:
            if expecting:
                pytest.xfail(f"expected failure: {type(exc).__name__}: {exc}")
            raise
        if expecting:
            pytest.fail("Unexpected success", pytrace=False)

    def teardown(self) -> list[BaseException]:
        instance = self._instance
        if instance is None:
            return []
        errors: list[BaseException] = []
        if self._set_up:
            try:
                instance._callTearDown()
            except BaseException as exc:  # noqa: BLE001 - reported; the cleanups still run
                errors.append(exc)
        try:
            outcome_errors = _cleanups(instance)
            errors.extend(outcome_errors)
        except BaseException as exc:  # noqa: BLE001 - reported
            errors.append(exc)
        teardown_runner = getattr(instance, "_tearDownAsyncioRunner", None)
        if teardown_runner is not None:
            try:
                teardown_runner()
            except BaseException as exc:  # noqa: BLE001 - reported
                errors.append(exc)
        return errors


def _cleanups(instance) -> list[BaseException]:
    """Run the instance's cleanups (addCleanup), last added first; their errors."""
    errors = []
    cleanups = getattr(instance, "_cleanups", [])
    while cleanups:
        function, args, kwargs = cleanups.pop()
        try:
            instance._callCleanup(function, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every error is reported
            errors.append(exc)
    return errors
