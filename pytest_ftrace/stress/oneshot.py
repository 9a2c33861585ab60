"""Tests that enter a process-wide, not thread-safe facility in a threaded round run once, on
one thread, and say so.

`mock.patch` (decorator, context manager, `start()`; `patch.object`, `patch.multiple`,
`patch.dict`), warnings capture (`warnings.catch_warnings`, which `pytest.warns`,
`pytest.deprecated_call` and `assertWarns` use; not when the interpreter's warnings are
context-aware), `MonkeyPatch` used in the body (`pytest.MonkeyPatch.context()`; the
`monkeypatch` fixture already makes a test run on one thread), `contextlib.chdir`,
`contextlib.redirect_stdout` / `redirect_stderr`, `assertLogs` and `caplog.set_level` /
`caplog.at_level`, and, when loaded, freezegun, time_machine and pyfakefs change state the
whole process shares: several threads entering them at once break each other ("Patch is
already started", a warning recorded by the wrong thread, a global left patched), which says
nothing about the code under test.

Found at run time, not by reading the test's source: while a threaded round runs, a
sys.monitoring tool (its own tool id, taken for the run and given back after it) watches the
start of those functions (local events on their code objects only: nothing else is slowed).
When a worker thread of the round starts one, the function raises `OneThread` before it
changes anything, the round is let finish and no round comes after it; its results are
dropped, and the test runs once more on one thread, with its own fixtures, for its verdict. It
is listed with the reason among the tests run on one thread (`-v`). Threads the test starts
itself are not watched: what they share is the test's business.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

TOOL_NAME = "pytest-ftrace one-thread watch"
_TOOL_IDS = (3, 4, 5, 2)

WARNINGS = (
    "warnings capture (warnings.catch_warnings; pytest.warns, pytest.deprecated_call and "
    "assertWarns use it)"
)
# (module, qualified name of the function, what it is)
TARGETS = (
    ("warnings", "catch_warnings.__enter__", WARNINGS),
    ("unittest.mock", "_patch.__enter__", "mock.patch (patch, patch.object, patch.multiple)"),
    ("unittest.mock", "_patch_dict._patch_dict", "mock.patch.dict"),
    ("_pytest.monkeypatch", "MonkeyPatch.setattr", "MonkeyPatch.setattr"),
    ("_pytest.monkeypatch", "MonkeyPatch.delattr", "MonkeyPatch.delattr"),
    ("_pytest.monkeypatch", "MonkeyPatch.setitem", "MonkeyPatch.setitem"),
    ("_pytest.monkeypatch", "MonkeyPatch.delitem", "MonkeyPatch.delitem"),
    ("_pytest.monkeypatch", "MonkeyPatch.setenv", "MonkeyPatch.setenv"),
    ("_pytest.monkeypatch", "MonkeyPatch.delenv", "MonkeyPatch.delenv"),
    ("_pytest.monkeypatch", "MonkeyPatch.syspath_prepend", "MonkeyPatch.syspath_prepend"),
    ("_pytest.monkeypatch", "MonkeyPatch.chdir", "MonkeyPatch.chdir"),
    ("contextlib", "chdir.__enter__", "contextlib.chdir (the process's working directory)"),
    ("contextlib", "_RedirectStream.__enter__", "contextlib.redirect_stdout / redirect_stderr"),
    ("unittest.case", "_AssertLogsContext.__enter__", "assertLogs / assertNoLogs"),
    ("_pytest.logging", "LogCaptureFixture.set_level", "caplog.set_level"),
    ("_pytest.logging", "LogCaptureFixture.at_level", "caplog.at_level"),
    # third-party ones that patch modules for the whole process (watched when loaded)
    ("freezegun.api", "_freeze_time.start", "freezegun.freeze_time"),
    ("time_machine", "travel.start", "time_machine.travel"),
    ("pyfakefs.fake_filesystem_unittest", "Patcher.setUp", "pyfakefs (its Patcher)"),
)


def _context_aware_warnings() -> bool:
    return bool(getattr(sys.flags, "context_aware_warnings", False))


class OneThread(BaseException):  # noqa: N818 - not an error: the test runs on one thread
    """Raised in a worker of a threaded round at the start of a process-wide facility."""


def _codes() -> dict[Any, str]:
    """The code objects to watch, of the modules loaded now (a module loaded later by the
    test's body is not watched), each with what it is."""
    codes = {}
    for module_name, qualname, what in TARGETS:
        if module_name == "warnings" and _context_aware_warnings():
            continue
        obj = sys.modules.get(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        # the function itself, not a decorator's wrapper (contextmanager's is shared by all)
        obj = getattr(obj, "__wrapped__", obj)
        code = getattr(obj, "__code__", None)
        if code is not None:
            codes[code] = what
    return codes


_SKIP_DIRS = tuple(
    os.path.normcase(os.path.dirname(os.path.abspath(m.__file__))) + os.sep
    for m in (os, threading)
    if getattr(m, "__file__", None)
)


def _caller() -> str | None:
    """file:line of the test's code that entered the facility (the first frame outside the
    standard library, pytest and this plugin), or None."""
    import pytest as _pytest_pkg

    skip = (
        *_SKIP_DIRS,
        os.path.normcase(os.path.dirname(os.path.dirname(os.path.abspath(_pytest_pkg.__file__))))
        + os.sep
        + "_pytest"
        + os.sep,
        os.path.normcase(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    )
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.normcase(os.path.abspath(frame.f_code.co_filename))
        if not path.startswith(skip):
            try:
                shown = os.path.relpath(frame.f_code.co_filename)
            except ValueError:
                shown = frame.f_code.co_filename
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class Watch:
    """Watches the worker threads of one threaded run (enter/leave around each round's body)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._tool: int | None = None
        self._codes: dict[Any, str] = {}

    def activate(self) -> bool:
        """Take a tool id and watch the facilities; False when no tool id is free (then the
        run is not watched)."""
        mon = sys.monitoring
        codes = _codes()
        if not codes:
            return False
        for tool in _TOOL_IDS:
            if mon.get_tool(tool) is None:
                try:
                    mon.use_tool_id(tool, TOOL_NAME)
                except ValueError:  # taken in the meantime
                    continue
                self._tool = tool
                break
        else:
            return False
        self._codes = codes
        mon.register_callback(self._tool, mon.events.PY_START, self._started)
        for code in codes:
            mon.set_local_events(self._tool, code, mon.events.PY_START)
        return True

    def deactivate(self) -> None:
        tool = self._tool
        if tool is None:
            return
        self._tool = None
        mon = sys.monitoring
        for code in self._codes:
            mon.set_local_events(tool, code, 0)
        mon.register_callback(tool, mon.events.PY_START, None)
        mon.free_tool_id(tool)

    def enter(self) -> None:
        self._local.on = True

    def leave(self) -> None:
        self._local.on = False

    def caught(self, exc: BaseException) -> bool:
        """Whether `exc`, raised by a round's body, is the watch's own stop."""
        return isinstance(exc, OneThread)

    def _started(self, code, offset: int) -> None:
        if not getattr(self._local, "on", False) or os.getpid() != self._pid:
            return
        with self._lock:
            if self.reason is None:
                where = _caller()
                self.reason = (
                    f"entered {self._codes.get(code, code.co_qualname)} in a threaded round"
                    + (f" (at {where})" if where else "")
                    + ": process-wide state that is not thread-safe"
                )
        raise OneThread(self.reason)


def watch_for(threads: int) -> Watch | None:
    """A watch for a run of `threads` threads (none for one thread: nothing runs at once)."""
    if threads < 2 or not hasattr(sys, "monitoring"):
        return None
    return Watch()


def run(threaded) -> Any:
    """`threaded.run()` (a runner.ThreadedRun) with its watch on; when a round entered a
    watched facility, an empty outcome (its results are dropped: the run on one thread, by
    `once`, gives the verdict)."""
    __tracebackhide__ = True
    watch = threaded.watch
    if watch is None or not watch.activate():
        threaded.watch = None
        return threaded.run()
    try:
        outcome = threaded.run()
    finally:
        watch.deactivate()
    if watch.reason is None:
        return outcome
    from pytest_ftrace.report import Outcome

    return Outcome(threaded.threads, threaded.iterations)


def once(threaded) -> Any:
    """The test run once, on one new thread, with its own fixtures, unwatched (it keeps the
    run's `settled`: the threads it leaves blocked for good are not waited for either)."""
    __tracebackhide__ = True
    from pytest_ftrace.stress.runner import Hooks, ThreadedRun

    return ThreadedRun(
        threaded.item,
        threaded.body,
        1,
        1,
        threaded.timeout,
        hooks=Hooks(settled=threaded.hooks.settled),
        takes_fixtures=threaded.takes_fixtures,
        context=threaded.context,
    ).run()
