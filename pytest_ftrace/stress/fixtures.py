"""Per-thread fixture instances (the thread-aware fixtures themselves are in hooks.py, which
pytest loads in every session; this module is loaded with the runner).

pytest sets a test's fixtures up once, in the main thread, and caches each value for the test.
For a threaded run every worker thread needs its own instances of the function-scoped fixtures
the test asks for, made in that thread (some resources, such as sqlite connections, belong to
the thread that made them). So each worker calls the fixture functions itself, resolving their
arguments the same way, and tears the generator fixtures down in reverse order when it is done.

What is shared between the threads, taken from pytest's own set-up:
- fixtures of a broader scope (class, module, package, session), as pytest intends;
- pytest's built-in fixtures (request, capsys, ...) and fixtures of parametrization, except
  tmp_path and tmpdir: each thread gets its own directory for each round (perthread.py);
- parametrized fixtures and async fixtures, which need pytest's own machinery;
- autouse fixtures the test does not name, which pytest has already run once for the test.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from _pytest.fixtures import resolve_fixture_function

THREAD_AWARE = ("thread_index", "iteration_index", "num_parallel_threads", "num_iterations")


def _is_per_thread(fixturedef) -> bool:
    if fixturedef.scope != "function" or fixturedef.params is not None:
        return False
    func = fixturedef.func
    module = getattr(func, "__module__", "") or ""
    if module.startswith(("_pytest", "pytest_ftrace")) or module == "pytest":
        return False
    unwrapped = inspect.unwrap(func)
    return not (inspect.iscoroutinefunction(unwrapped) or inspect.isasyncgenfunction(unwrapped))


class ThreadFixtures:
    """The argument values one worker thread passes to the test function."""

    def __init__(self, item: pytest.Item, thread_values: dict[str, Any]):
        self._item = item
        self._thread_values = thread_values
        self._values: dict[str, Any] = {}
        self._finalizers: list[Callable[[], None]] = []

    def setup(self) -> dict[str, Any]:
        """Make this thread's instances; returns the test function's keyword arguments."""
        __tracebackhide__ = True
        from pytest_ftrace.stress.tmpdirs import ThreadTmp

        info = getattr(self._item, "_fixtureinfo", None)
        argnames = info.argnames if info is not None else ()
        self._tmp = ThreadTmp(self._item, self._thread_values.get("thread_index", 0))
        self._finalizers.append(self._tmp.cleanup)
        kwargs = {name: self._resolve(name) for name in argnames if name not in self._tmp.names}
        self._round_tmp = [name for name in argnames if name in self._tmp.names]
        return self.for_round(kwargs, 0)

    def for_round(self, kwargs: dict[str, Any], iteration: int) -> dict[str, Any]:
        """`kwargs` with this round's tmp_path / tmpdir (a new directory for each round, unless
        a fixture of this thread uses it: then the thread's one)."""
        for name in self._round_tmp:
            kwargs[name] = self._tmp.value(name, iteration)
        return kwargs

    def _resolve(self, name: str) -> Any:
        __tracebackhide__ = True
        if name in self._values:
            return self._values[name]
        if name in self._thread_values:
            return self._thread_values[name]
        if name in self._tmp.names:
            return self._tmp.value(name, None)  # a fixture of this thread's: kept for the thread
        item = self._item
        fixturedefs = item._fixtureinfo.name2fixturedefs.get(name)
        if not fixturedefs or not _is_per_thread(fixturedefs[-1]):
            return item.funcargs[name]
        fixturedef = fixturedefs[-1]
        kwargs = {arg: self._resolve(arg) for arg in fixturedef.argnames}
        func = resolve_fixture_function(fixturedef, item._request)
        if inspect.isgeneratorfunction(func):
            generator = func(**kwargs)
            try:
                value = next(generator)
            except StopIteration:
                raise ValueError(f"fixture {name!r} did not yield a value") from None
            self._finalizers.append(lambda: _finish_generator(name, generator))
        else:
            value = func(**kwargs)
        self._values[name] = value
        return value

    def teardown(self) -> list[BaseException]:
        """Tear down in reverse order; returns the errors (the rest still run)."""
        errors = []
        while self._finalizers:
            finalizer = self._finalizers.pop()
            try:
                finalizer()
            except BaseException as exc:  # noqa: BLE001 - every error is reported
                errors.append(exc)
        return errors


def _finish_generator(name: str, generator) -> None:
    __tracebackhide__ = True
    try:
        next(generator)
    except StopIteration:
        return
    raise ValueError(f"fixture {name!r} has more than one 'yield'")
