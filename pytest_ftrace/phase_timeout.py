"""--ftrace-timeout on every phase of a test: set-up, call and tear-down, each bounded by the
timeout, on one thread too and without --ftrace-isolate.

The stress runner bounds a threaded call itself (its supervisor stops waiting). Everything else
runs on the thread that runs pytest: a fixture that never returns, a test on one thread, a
tear-down stuck on a lock. There the bound is a timer signal, as pytest-timeout's "signal"
method does it: SIGALRM (setitimer) interrupts the main thread, even in a blocking call such
as time.sleep or a lock's acquire, and its handler raises `Hang` with every thread's stack, so
that phase fails and the session goes on with the next test.

Where no timer signal can be used (no setitimer, or pytest runs in another thread), a watchdog
thread raises the same failure in the stuck thread at its next Python instruction (a call
blocked in C then stays blocked: use --ftrace-isolate for those).

Other users of SIGALRM come first: when pytest-timeout is active for the test, the bound is
left to it; when another alarm is already pending and due sooner, it is left alone; when ours
is due sooner, ours runs and theirs is put back afterwards with the time it had left.

Registered only in sessions that use the plugin (--ftrace, --threads/--iterations other than
1, or an --ftrace-timeout / ftrace_timeout given): a plain pytest run is left as it is.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import pytest

from pytest_ftrace.stress.runner import Hang

_SIGNALS = hasattr(signal, "setitimer") and hasattr(signal, "SIGALRM")


def _stacks(stuck: int, current_frame=None, skip: int | None = None) -> str:
    """Every thread's Python stack, the stuck one (`stuck`, at `current_frame`) first."""
    frames = sys._current_frames()
    if current_frame is not None:
        frames[stuck] = current_frame
    frames.pop(skip, None)
    names = {t.ident: t for t in threading.enumerate()}
    parts = []
    for ident in sorted(frames, key=lambda i: i != stuck):
        thread = names.get(ident)
        name = thread.name if thread is not None else f"0x{ident:x}"
        daemon = "" if thread is None else (" (daemon)" if thread.daemon else " (not daemon)")
        where = ", the stuck one" if ident == stuck else ""
        parts.append(f"\nThread {name}{daemon}{where} (most recent call last):")
        parts.append(_format(frames[ident]))
    return "\n".join(parts)


_MACHINERY = (
    os.sep + "pluggy" + os.sep,
    os.sep + "_pytest" + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


def _format(frame) -> str:
    """A stack, most recent call last, without the frames of pytest, pluggy and this plugin."""
    lines = []
    hidden = 0
    for entry in traceback.extract_stack(frame):
        if any(part in os.path.abspath(entry.filename) for part in _MACHINERY):
            hidden += 1
            continue
        if hidden:
            lines.append(f"  ... {hidden} frame(s) of pytest and pytest-ftrace hidden\n")
            hidden = 0
        lines.extend(traceback.StackSummary.from_list([entry]).format())
    if hidden:
        lines.append(f"  ... {hidden} frame(s) of pytest and pytest-ftrace hidden\n")
    return "".join(lines).rstrip()


def _message(item: pytest.Item, phase: str, timeout: float, stuck: int, frame=None, skip=None):
    return (
        f"the test's {phase} did not finish within {timeout:g}s (--ftrace-timeout); "
        f"stopped there, the session goes on with the next test ({item.nodeid})\n"
        + _stacks(stuck, frame, skip)
    )


def _pytest_timeout_active(item: pytest.Item) -> bool:
    """Whether pytest-timeout bounds this test (then the bound is its business)."""
    config = item.config
    if not config.pluginmanager.hasplugin("timeout"):
        return False
    marker = item.get_closest_marker("timeout")
    values = []
    if marker is not None:
        values.append(marker.args[0] if marker.args else marker.kwargs.get("timeout"))
    try:
        values.append(config.getoption("timeout"))
    except ValueError:
        pass
    try:
        values.append(config.getini("timeout"))
    except ValueError:
        pass
    values.append(os.environ.get("PYTEST_TIMEOUT"))
    for value in values:
        if value is None or value == "":
            continue
        try:
            return float(value) > 0
        except (TypeError, ValueError):
            continue
    return False


class _AsyncHang(BaseException):  # noqa: N818 - turned into Hang where it lands
    """Raised in a stuck thread by the fallback watchdog; the phase turns it into `Hang`."""


class PhaseTimeout:
    """The plugin object: a bound on each phase run on pytest's thread."""

    def __init__(self, timeout: float):
        self.timeout = timeout

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        with self.bound(item, "setup"):
            return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item):
        from pytest_ftrace import markers

        plan = item.stash.get(markers.PLAN_KEY, None)
        if plan is not None and plan.threaded:  # the stress runner bounds it itself
            return (yield)
        with self.bound(item, "call"):
            return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item):
        with self.bound(item, "teardown"):
            return (yield)

    @contextmanager
    def bound(self, item: pytest.Item, phase: str):
        timeout = self.timeout
        if timeout <= 0 or _pytest_timeout_active(item):
            yield
            return
        try:
            if _SIGNALS and threading.current_thread() is threading.main_thread():
                with _alarm(item, phase, timeout):
                    yield
            else:
                with _watchdog(item, phase, timeout):
                    yield
        except Hang as exc:
            _how_to_rerun(item, exc, timeout)
            raise


def _how_to_rerun(item: pytest.Item, exc: Hang, timeout: float) -> None:
    """Under --ftrace: the seed, as a junitxml property and a note, and the command to run
    the test again."""
    from pytest_ftrace.ftrace import session as ftrace

    session = item.config.stash.get(ftrace.SESSION_KEY, None)
    if session is None:
        return
    item.user_properties.append(("ftrace_seed", session.seed))
    nodeid = "'" + item.nodeid.replace("'", "'\"'\"'") + "'"
    mode = f" --ftrace-mode {session.mode}" if session.mode != ftrace.DEFAULT_MODE else ""
    exc.add_note(f"ftrace: seed={session.seed} mode={session.mode}")
    exc.add_note(
        f"rerun: pytest {nodeid} --ftrace{mode} --seed {session.seed} --ftrace-timeout {timeout:g}"
    )


@contextmanager
def _alarm(item: pytest.Item, phase: str, timeout: float):
    pending, interval = signal.getitimer(signal.ITIMER_REAL)
    if pending and pending <= timeout:
        yield  # another alarm is due first: it is the bound
        return

    def on_alarm(_signum, frame):
        __tracebackhide__ = True
        raise Hang(_message(item, phase, timeout, threading.get_ident(), frame))

    try:
        previous = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:  # not the main interpreter's main thread after all
        with _watchdog(item, phase, timeout):
            yield
        return
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if pending:  # put the other alarm back, with the time it had left
            left = pending - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), interval)


@contextmanager
def _watchdog(item: pytest.Item, phase: str, timeout: float):
    import ctypes

    target = threading.current_thread()
    lock = threading.Lock()
    state = {"done": False, "message": None}
    stop = threading.Event()

    def _watch():
        if stop.wait(timeout):
            return
        with lock:
            if state["done"]:
                return
            state["message"] = _message(
                item, phase, timeout, target.ident, skip=threading.get_ident()
            )
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(target.ident), ctypes.py_object(_AsyncHang)
            )

    watcher = threading.Thread(target=_watch, name="ftrace-phase-timeout", daemon=True)
    watcher.start()
    try:
        yield
    except _AsyncHang:
        raise Hang(state["message"] or _message(item, phase, timeout, target.ident)) from None
    finally:
        with lock:
            state["done"] = True
            if state["message"] is not None:  # fired: drop it if it has not landed yet
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target.ident), None)
        stop.set()


def configure(config: pytest.Config, timeout: float) -> None:
    config.pluginmanager.register(PhaseTimeout(timeout), "ftrace-phase-timeout")
