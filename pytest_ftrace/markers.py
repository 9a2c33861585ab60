"""Markers, and the plan each test runs with: how many threads and rounds, or why only one.

Precedence: marker > command-line option > ini key. Among markers, `ftrace(...)` wins over the
drop-in markers of pytest-run-parallel (`parallel_threads`, `iterations`) and
pytest-freethreaded (`freethreaded`); those are honoured only while the plugin that owns them is
not active, so a test is never threaded by two plugins at once.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import inspect
import sys

import pytest

from pytest_ftrace.options import MAX_ROUNDS, MAX_THREADS, Settings, usable_cpus

MARKERS = [
    "ftrace(threads=None, iterations=None): run this test's body in `threads` threads for "
    "`iterations` rounds (pytest-ftrace)",
    "thread_unsafe(reason=None): run this test on one thread (pytest-ftrace)",
    "parallelizable(scope): under --threadpool, let tests below this node run concurrently; "
    "scope: children, parameters or all",
    "not_parallelizable: under --threadpool, run these tests one at a time",
    "ftrace_concurrent: set by generate_tests (pytest-threaded spelling): run concurrently with "
    "the other such tests of the module, in the thread pool",
]
PEER_MARKERS = {
    "run-parallel": [
        "parallel_threads(n): run this test in n threads (pytest-run-parallel spelling)",
        "iterations(n): rounds per thread (pytest-run-parallel spelling)",
    ],
    "pytest_forked": [
        "forked: run this test in a forked child process (pytest-forked spelling of "
        "--ftrace-isolate for one test)",
    ],
    "freethreaded": [
        "freethreaded(threads=n, executions=m): run this test in n threads for m rounds "
        "(pytest-freethreaded spelling; iterations=m is the same as executions=m)",
    ],
}

CONTEXT_AWARE_WARNINGS = bool(getattr(sys.flags, "context_aware_warnings", False))
BUILTIN_THREAD_UNSAFE = ("capsys", "capfd", "capsysbinary", "capfdbinary", "monkeypatch") + (
    () if CONTEXT_AWARE_WARNINGS else ("recwarn",)
)


class Plan:
    """How one test runs: threads x iterations, or on one thread for `single_reason`."""

    __slots__ = ("threads", "iterations", "single_reason", "budget")

    def __init__(
        self,
        threads: int,
        iterations: int,
        single_reason: str | None = None,
        budget: float | None = None,
    ):
        self.threads = threads
        self.iterations = iterations
        self.single_reason = single_reason  # set when the test runs on one thread, plainly
        # --ftrace's seconds of rounds (iterations is then the round cap); None: a fixed count
        self.budget = budget

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (
            (self.threads, self.iterations, self.single_reason)
            == (other.threads, other.iterations, other.single_reason)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Plan({self.threads}, {self.iterations}, {self.single_reason!r})"

    @property
    def threaded(self) -> bool:
        return self.single_reason is None and self.threads * self.iterations > 1


PLAN_KEY = pytest.StashKey[Plan]()


class MarkerError(Exception):
    """A marker with arguments we cannot use."""


def _count(marker_name: str, what: str, value, allow_auto: bool) -> int:
    """A marker's thread count (allow_auto) or round count: an int (not text) within the
    limits the options have."""
    if allow_auto and value == "auto":
        return min(usable_cpus(), MAX_THREADS)
    high = MAX_THREADS if allow_auto else MAX_ROUNDS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        expected = f"a whole number from 1 to {high}" + (" or 'auto'" if allow_auto else "")
        raise MarkerError(f"@pytest.mark.{marker_name}: {what} must be {expected}, not {value!r}")
    return value


def _args(mark: pytest.Mark, names: tuple[str, ...]) -> dict:
    """Positional and keyword arguments of a marker, by name; unknown ones are errors."""
    if len(mark.args) > len(names):
        raise MarkerError(
            f"@pytest.mark.{mark.name} takes at most {len(names)} positional "
            f"argument(s) ({', '.join(names)}), got {len(mark.args)}"
        )
    values = dict(zip(names, mark.args, strict=False))
    for key, value in mark.kwargs.items():
        if key not in names:
            raise MarkerError(
                f"@pytest.mark.{mark.name} got an unexpected argument {key!r} "
                f"(accepted: {', '.join(names)})"
            )
        values[key] = value
    return values


COUNT_MARKERS = frozenset({"parallel_threads", "iterations", "freethreaded", "ftrace"})
# Markers that turn a feature on for the session when a collected test carries one (hooks.py).
FEATURE_MARKERS = frozenset({"forked", "ftrace_concurrent"})
OURS = COUNT_MARKERS | {"thread_unsafe"} | FEATURE_MARKERS  # the markers the collector looks at


def check_markers(item: pytest.Item, peers: set[str]) -> None:
    """At collection: raise MarkerError for a marker with wrong arguments. One pass over the
    item's markers; most items have none of ours and cost only that pass."""
    names = {mark.name for mark in item.iter_markers()}
    if names & COUNT_MARKERS:
        marker_counts(item, peers)
    if "thread_unsafe" in names:
        _args(item.get_closest_marker("thread_unsafe"), ("reason",))


def marker_counts(item: pytest.Item, peers: set[str]) -> tuple[int | None, int | None]:
    """Threads and iterations the markers ask for (None where they say nothing)."""
    threads = iterations = None
    if "run-parallel" not in peers:
        mark = item.get_closest_marker("parallel_threads")
        if mark is not None:
            threads = _count(mark.name, "n", _args(mark, ("n",)).get("n"), allow_auto=True)
        mark = item.get_closest_marker("iterations")
        if mark is not None:
            iterations = _count(mark.name, "n", _args(mark, ("n",)).get("n"), allow_auto=False)
    if "freethreaded" not in peers:
        mark = item.get_closest_marker("freethreaded")
        if mark is not None:
            # pytest-freethreaded's own keyword is `executions`; `iterations` is ours.
            args = _args(mark, ("threads", "iterations", "executions"))
            if "iterations" in args and "executions" in args:
                raise MarkerError(
                    "@pytest.mark.freethreaded: give executions or iterations, not both "
                    "(they are the same count)"
                )
            if "threads" in args:
                threads = _count(mark.name, "threads", args["threads"], allow_auto=True)
            for key in ("iterations", "executions"):
                if key in args:
                    iterations = _count(mark.name, key, args[key], allow_auto=False)
    mark = item.get_closest_marker("ftrace")
    if mark is not None:
        args = _args(mark, ("threads", "iterations"))
        if args.get("threads") is not None:
            threads = _count(mark.name, "threads", args["threads"], allow_auto=True)
        if args.get("iterations") is not None:
            iterations = _count(mark.name, "iterations", args["iterations"], allow_auto=False)
    return threads, iterations


def thread_unsafe_reason(item: pytest.Item, settings: Settings) -> str | None:
    mark = item.get_closest_marker("thread_unsafe")
    if mark is not None:
        reason = _args(mark, ("reason",)).get("reason")
        return f"marked thread_unsafe: {reason}" if reason else "marked thread_unsafe"
    fixturenames = getattr(item, "fixturenames", ())
    for name in fixturenames:
        if name in settings.thread_unsafe_fixtures:
            return f"uses thread-unsafe fixture {name!r}"
    if not isinstance(item, pytest.Function):
        return f"not a Python test function ({type(item).__name__})"
    func = getattr(item, "obj", None)
    if func is not None and inspect.iscoroutinefunction(inspect.unwrap(func)):
        return "async test function"
    return None


def plan_for(item: pytest.Item, settings: Settings, peers: set[str]) -> Plan:
    threads, iterations = marker_counts(item, peers)
    budget = settings.budget if iterations is None else None  # a marker fixes the count
    threads = threads or settings.threads
    iterations = iterations or settings.iterations
    if threads * iterations > 1:
        reason = thread_unsafe_reason(item, settings)
        if reason is not None:
            return Plan(1, 1, reason)
    return Plan(threads, iterations, budget=budget)
