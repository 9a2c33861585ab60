"""Hold something in another thread, process or asyncio task while a test runs.

Code that copes with contention (a lock taken elsewhere, a file locked by another program) is
hard to test from a single thread: the test would have to start a thread, make it take the
resource, keep it there until the assertions are done, then let it go and join it, and report
what went wrong over there. These helpers do that:

    with run_thread(lock):           # another thread is inside `with lock:` ...
        assert not try_acquire(lock, timeout=0.1)
    # ... and has left it, and has been joined, once the block is over

`run_thread(obj)`, `run_process(obj)` and `run_task(obj)` enter `obj` in a new thread, a new
process or a new asyncio task, keep that thread, process or task inside it while the body of the
`with` block (or the decorated test) runs, then make it leave and wait for it to finish.

What they accept
    A context manager (anything with `__enter__`/`__exit__`; `run_task` also takes an async one
    with `__aenter__`/`__aexit__`), or an instance of a subclass of `ThreadConfig`,
    `ProcessConfig` or `TaskConfig` for when the set-up is not a context manager: its
    `set_up_thread()` / `set_up_process()` / `set_up_task()` runs over there first, and its
    `tear_down_thread()` / ... runs there on the way out. For a task both may be coroutines.

How they are used
    `with run_thread(obj):`, `with run_process(obj):` and `async with run_task(obj):`; or as
    decorators: `@run_thread(obj)` / `@run_process(obj)` on a test function (plain or async), and
    `@run_task(obj)` on an async function. A decorated function gets a fresh helper on every
    call, so it may run in several threads at once (under `--threads N`); each call's helper
    then enters the same `obj`. For a lock that means the calls take turns (each helper's
    set-up waits, within its timeout, for the one before to let go); an object that cannot be
    entered from several threads at once calls for marking the test `thread_unsafe`. One helper
    object serves one `with` block at a time.

    `with ... as held:` gives the helper itself: `held.value` is what `__enter__` or the set-up
    returned (threads and tasks), `held.thread`, `held.process` / `held.pid` and `held.task` the
    thread, process or task holding the object.

Errors
    An exception raised over there while entering or leaving is raised again in the test: the
    same exception object for threads and tasks, with a note saying where it came from, so its
    traceback runs on into the other thread's frames. From a process the exception travels back
    by pickle, its traceback cannot, so the formatted remote traceback is attached as its
    `__cause__` (a `RemoteTraceback`); an exception that cannot be pickled is replaced by a
    `ProcessHelperError` naming its type and message, with the same cause. When the test body
    raises as well, an error from the tear-down carries the body's exception as its context.

Timeouts
    Entering and leaving are each bounded by `timeout` seconds (30 for threads and tasks, 60 for
    processes, which have an interpreter to start). When it runs out, `HelperTimeout` (a
    `TimeoutError`) is raised, naming the helper and the object, with the stack of the stuck
    thread or task. A stuck thread is a daemon thread and is left behind (if its set-up ever
    returns it leaves the object at once); a stuck task is cancelled; a stuck process is
    terminated. A task's set-up must await to be stopped: a blocking call blocks the event loop,
    the timeout included.

Processes
    On Linux the child is started with the `fork` start method: it is a copy of the test
    process, so it sees the test module's state as it is, module-level multiprocessing objects
    included (a `multiprocessing.Lock()` made at import time is the same lock in the child, as
    seamstress users expect), and the object is not pickled. Forking a process that has other
    threads (the stress runner's, say) copies their locks in whatever state they are: the child
    only enters and leaves the object, and if it ever hangs on such a lock its step times out
    and it is terminated. Python 3.12+ warns about that fork (a DeprecationWarning); the helper
    silences that one warning for its own fork only. Elsewhere (and with `context="forkserver"`
    or `"spawn"`) the child is a new interpreter: the object is sent with pickle, so it must be
    picklable and its class importable there (a class defined in a test module is fine: the
    child gets the parent's `sys.path`), the test module is imported again there (its module
    state is new), and multiprocessing objects shared with the child must come from the same
    context, `process_context().Lock()`. Changes the child makes to the object are never seen
    by the test. Pass `context=` ("fork", "forkserver", "spawn" or a context object) to choose.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import itertools
import multiprocessing
import os
import pickle
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

__all__ = [
    "HelperTimeout",
    "ProcessConfig",
    "ProcessHelperError",
    "RemoteTraceback",
    "TaskConfig",
    "ThreadConfig",
    "process_context",
    "run_process",
    "run_task",
    "run_thread",
]

THREAD_TIMEOUT = 30.0
TASK_TIMEOUT = 30.0
PROCESS_TIMEOUT = 60.0

_numbers = itertools.count(1)


class HelperTimeout(TimeoutError):
    """A set-up or tear-down in the other thread, process or task did not finish in time."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process (as `__cause__`)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


class ProcessHelperError(RuntimeError):
    """The other process failed in a way it could not report as its own exception."""


class ThreadConfig:
    """Subclass and pass an instance to `run_thread`: set-up and tear-down run in that thread."""

    def set_up_thread(self) -> Any:
        """Runs in the other thread before the test body; the result is the helper's `value`."""

    def tear_down_thread(self) -> None:
        """Runs in the other thread after the test body."""


class ProcessConfig:
    """Subclass and pass an instance to `run_process`: set-up and tear-down run in that process.

    The instance is pickled into the child: it works on its own copy there.
    """

    def set_up_process(self) -> None:
        """Runs in the other process before the test body."""

    def tear_down_process(self) -> None:
        """Runs in the other process after the test body."""


class TaskConfig:
    """Subclass and pass an instance to `run_task`: set-up and tear-down run in that task.

    Either method may be a coroutine function (`async def`) or a plain one.
    """

    async def set_up_task(self) -> Any:
        """Runs in the other task before the test body; the result is the helper's `value`."""

    async def tear_down_task(self) -> None:
        """Runs in the other task after the test body."""


# --- what "enter" and "leave" mean for an object ------------------------------------------------


def _sync_steps(obj: Any, config: type, set_up: str, tear_down: str, helper: str):
    """(enter, leave, enter's name, leave's name) for a Config instance or a context manager."""
    if isinstance(obj, config):
        return getattr(obj, set_up), getattr(obj, tear_down), set_up, tear_down
    kind = type(obj)
    if hasattr(kind, "__enter__") and hasattr(kind, "__exit__"):
        # Looked up on the type, as the with statement does.
        return (
            functools.partial(kind.__enter__, obj),
            functools.partial(kind.__exit__, obj, None, None, None),
            "__enter__",
            "__exit__",
        )
    raise TypeError(
        f"{helper}() takes a context manager or a {config.__name__} instance, "
        f"not {kind.__qualname__}"
    )


def _describe(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def _stack_of(frame) -> str:
    if frame is None:
        return "  (no stack available)"
    return "".join(traceback.format_stack(frame)).rstrip()


# --- run_thread and run_process ------------------------------------------------------------------


class _SyncHelper:
    """The with-statement and decorator protocol shared by run_thread and run_process."""

    _name = "helper"

    def __init__(self, obj: Any, timeout: float) -> None:
        timeout = float(timeout)
        if not timeout > 0:
            raise ValueError(f"{self._name}(): timeout must be > 0, not {timeout:g}")
        self._obj = obj
        self._timeout = timeout
        self._active = False

    def _copy(self):
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self._name}({_describe(self._obj)})"

    def __enter__(self):
        __tracebackhide__ = True
        if self._active:
            raise RuntimeError(
                f"{self!r} is already in use; make a new {self._name}(...) for each with block"
            )
        self._start()
        self._active = True
        return self

    def __exit__(self, *exc_info) -> None:
        __tracebackhide__ = True
        if self._active:
            self._active = False
            self._finish()

    def __call__(self, func: Callable) -> Callable:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args, **kwargs):
                __tracebackhide__ = True
                with self._copy():
                    return await func(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run(*args, **kwargs):
            __tracebackhide__ = True
            with self._copy():
                return func(*args, **kwargs)

        return run


class run_thread(_SyncHelper):  # noqa: N801 - used like a function, as contextlib's classes are
    """Enter `obj` in a new (daemon) thread, hold it there while the body runs, then leave it
    and join the thread. `obj` is a context manager or a `ThreadConfig` instance; each step is
    bounded by `timeout` seconds.
    """

    _name = "run_thread"

    def __init__(self, obj: Any, *, timeout: float = THREAD_TIMEOUT) -> None:
        super().__init__(obj, timeout)
        self._steps = _sync_steps(
            obj, ThreadConfig, "set_up_thread", "tear_down_thread", "run_thread"
        )
        self.value: Any = None
        self.thread: threading.Thread | None = None

    def _copy(self) -> run_thread:
        return run_thread(self._obj, timeout=self._timeout)

    def _start(self) -> None:
        __tracebackhide__ = True
        self.value = None
        self._entered = threading.Event()
        self._release = threading.Event()
        self._errors: dict[str, BaseException] = {}
        self.thread = threading.Thread(
            target=self._hold, name=f"run_thread-{next(_numbers)}", daemon=True
        )
        self.thread.start()
        if not self._entered.wait(self._timeout):
            self._release.set()  # should the set-up return after all, leave at once
            raise self._timed_out(self._steps[2])
        error = self._errors.pop("set-up", None)
        if error is not None:
            self.thread.join(self._timeout)
            raise self._noted(error, self._steps[2])

    def _finish(self) -> None:
        __tracebackhide__ = True
        self._release.set()
        self.thread.join(self._timeout)
        if self.thread.is_alive():
            raise self._timed_out(self._steps[3])
        error = self._errors.pop("tear-down", None)
        if error is not None:
            raise self._noted(error, self._steps[3])

    def _hold(self) -> None:
        __tracebackhide__ = True
        enter, leave = self._steps[:2]
        try:
            self.value = enter()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test
            self._errors["set-up"] = exc
            return
        finally:
            self._entered.set()
        self._release.wait()
        try:
            leave()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test
            self._errors["tear-down"] = exc

    def _noted(self, error: BaseException, step: str) -> BaseException:
        error.add_note(f"(raised by {step} in thread {self.thread.name!r}, held by {self!r})")
        return error

    def _timed_out(self, step: str) -> HelperTimeout:
        frame = sys._current_frames().get(self.thread.ident)
        return HelperTimeout(
            f"{self!r}: {step} did not return within the timeout of {self._timeout:g}s; thread "
            f"{self.thread.name!r} is left running as a daemon thread. Its stack:\n"
            + _stack_of(frame)
        )


def process_context(method: str | None = None):
    """The multiprocessing context run_process uses by default (or the one named `method`):
    fork on Linux (the child shares the test module's state), else forkserver where the
    platform has it, else spawn.

    Create the multiprocessing objects you share with the child from it:
    `process_context().Lock()`.
    """
    if method is None:
        available = multiprocessing.get_all_start_methods()
        if sys.platform.startswith("linux") and "fork" in available:
            method = "fork"
        else:
            method = "forkserver" if "forkserver" in available else "spawn"
    return multiprocessing.get_context(method)


# The warning os.fork gives on 3.12+ when the process has other threads. run_process forks on
# purpose (see "Processes" above), so it silences this one warning around its own fork.
_FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
# warnings.catch_warnings saves and restores the process-wide filter list: two of our starts at
# once (from threads of one test) must not restore each other's lists.
_FORK_WARNING_LOCK = threading.Lock()


def _start_process(process, method: str) -> None:
    if method != "fork":
        process.start()
        return
    import warnings

    with _FORK_WARNING_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FORK_WARNING, category=DeprecationWarning)
        process.start()


class _SysPath:
    """Unpickled in the child before the object that follows it in the arguments, so that the
    module defining the object's class (a test module, say) can be imported there."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)

    def __reduce__(self):
        return (_extend_sys_path, (self.paths,))


def _extend_sys_path(paths: list[str]) -> None:
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)


def _pack_error(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """An exception as it can travel to the parent: pickled (when it can be), type, message and
    formatted traceback."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    try:
        data = pickle.dumps(exc)
        pickle.loads(data)  # an exception whose __init__ wants other arguments fails here
    except Exception:  # noqa: BLE001 - fall back to type and message
        data = None
    kind = type(exc)
    return data, f"{kind.__module__}.{kind.__qualname__}", str(exc), text


def _send(conn, message) -> None:
    try:
        conn.send(message)
    except OSError:  # the parent is gone
        pass


def _leave_ftrace() -> None:
    """In a forked child: stop --ftrace's hooks and patches, which the child inherited from a
    threaded round that goes on in the parent without it. Its scheduler would wait there for
    threads the child does not have; the child only enters and leaves the object."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:
        events = monitoring.events
        for tool in range(6):
            if monitoring.get_tool(tool) == "pytest-ftrace":
                monitoring.set_events(tool, 0)
                for event in (events.INSTRUCTION, events.PY_START, events.PY_RESUME):
                    monitoring.register_callback(tool, event, None)
    exact = sys.modules.get("pytest_ftrace.ftrace.coop")
    if exact is not None and getattr(exact, "_CURRENT", None) is not None:
        exact.uninstall()


def _process_main(_path: None, obj: Any, conn, forked: bool = False) -> None:
    """The child's side: enter, report, wait for the word (or the parent's end), leave, report."""
    if forked:
        _leave_ftrace()
    enter, leave, _, _ = _sync_steps(
        obj, ProcessConfig, "set_up_process", "tear_down_process", "run_process"
    )
    try:
        enter()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        _send(conn, ("error", _pack_error(exc)))
        return
    _send(conn, ("entered", os.getpid()))
    try:
        conn.recv()
    except (EOFError, OSError):  # the parent went away: leave all the same
        pass
    try:
        leave()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        _send(conn, ("error", _pack_error(exc)))
        return
    _send(conn, ("left", None))


class run_process(_SyncHelper):  # noqa: N801 - used like a function, as contextlib's classes are
    """Enter `obj` in a new process, hold it there while the body runs, then leave it and join
    the process. `obj` is a picklable context manager or `ProcessConfig` instance; each step is
    bounded by `timeout` seconds, after which the process is terminated. `context` picks the
    multiprocessing start method (default: see `process_context`).
    """

    _name = "run_process"

    def __init__(self, obj: Any, *, timeout: float = PROCESS_TIMEOUT, context: Any = None) -> None:
        super().__init__(obj, timeout)
        self._steps = _sync_steps(
            obj, ProcessConfig, "set_up_process", "tear_down_process", "run_process"
        )
        self._context_arg = context
        self._context = (
            process_context(context) if context is None or isinstance(context, str) else context
        )
        self.process = None
        self.pid: int | None = None

    def _copy(self) -> run_process:
        return run_process(self._obj, timeout=self._timeout, context=self._context_arg)

    def _start(self) -> None:
        __tracebackhide__ = True
        self.pid = None
        self._conn, child_end = self._context.Pipe()
        self.process = self._context.Process(
            target=_process_main,
            args=(
                _SysPath(sys.path),
                self._obj,
                child_end,
                self._context.get_start_method() == "fork",
            ),
            name=f"run_process-{next(_numbers)}",
            daemon=True,
        )
        try:
            _start_process(self.process, self._context.get_start_method())
        except Exception as exc:
            self._conn.close()
            exc.add_note(
                f"{self!r} sends the object to a new process with pickle "
                f"({self._context.get_start_method()} start method); it must be picklable, and "
                "multiprocessing objects must come from pytest_ftrace.helpers.process_context()"
            )
            raise
        finally:
            child_end.close()  # so that the child's death reads as EOF here
        self.pid = self.process.pid
        self._expect("entered", self._steps[2])

    def _finish(self) -> None:
        __tracebackhide__ = True
        try:
            self._conn.send("leave")
        except OSError:
            pass  # it died; _expect says how
        try:
            self._expect("left", self._steps[3])
            self.process.join(self._timeout)
            if self.process.is_alive():
                self._stop()
                raise HelperTimeout(
                    f"{self!r}: process {self.pid} did not exit within {self._timeout:g}s "
                    "after its tear-down; it was terminated"
                )
        finally:
            self._conn.close()

    def _expect(self, expected: str, step: str) -> None:
        """Wait for the child's report of `step`; raise what went wrong there."""
        __tracebackhide__ = True
        if not self._conn.poll(self._timeout):
            self._stop()
            self._conn.close()
            raise HelperTimeout(
                f"{self!r}: {step} did not return within the timeout of {self._timeout:g}s in "
                f"process {self.pid}; the process was terminated"
            )
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.process.join(self._timeout)
            code = self.process.exitcode
            self._conn.close()
            raise ProcessHelperError(
                f"{self!r}: process {self.pid} exited with code {code} before it finished "
                f"{step}; its stderr may say why (the object could not be unpickled there?)"
            ) from None
        if kind == expected:
            return
        self.process.join(self._timeout)
        if self.process.is_alive():
            self._stop()
        self._conn.close()
        raise self._remote_error(payload, step)

    def _remote_error(self, payload, step: str) -> BaseException:
        data, kind, text, remote_traceback = payload
        error: BaseException | None = None
        if data is not None:
            try:
                error = pickle.loads(data)
            except Exception:  # noqa: BLE001 - e.g. its class is not importable here
                error = None
        if error is None:
            error = ProcessHelperError(f"{kind}: {text}")
        error.__cause__ = RemoteTraceback(remote_traceback)
        error.add_note(f"(raised by {step} in process {self.pid}, held by {self!r})")
        return error

    def _stop(self) -> None:
        self.process.terminate()
        self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)


# --- run_task ------------------------------------------------------------------------------------


def _task_steps(obj: Any):
    """(enter, leave, enter's name, leave's name), each a coroutine function."""
    if isinstance(obj, TaskConfig):
        return (
            _maybe_async(obj.set_up_task),
            _maybe_async(obj.tear_down_task),
            "set_up_task",
            "tear_down_task",
        )
    kind = type(obj)
    if hasattr(kind, "__aenter__") and hasattr(kind, "__aexit__"):
        return (
            functools.partial(kind.__aenter__, obj),
            functools.partial(kind.__aexit__, obj, None, None, None),
            "__aenter__",
            "__aexit__",
        )
    if hasattr(kind, "__enter__") and hasattr(kind, "__exit__"):
        return (
            _maybe_async(functools.partial(kind.__enter__, obj)),
            _maybe_async(functools.partial(kind.__exit__, obj, None, None, None)),
            "__enter__",
            "__exit__",
        )
    raise TypeError(
        "run_task() takes an async or plain context manager or a TaskConfig instance, "
        f"not {kind.__qualname__}"
    )


def _maybe_async(func: Callable) -> Callable:
    async def call():
        __tracebackhide__ = True
        result = func()
        if inspect.isawaitable(result):
            result = await result
        return result

    return call


class run_task:  # noqa: N801 - used like a function, as contextlib's classes are
    """Enter `obj` in a new asyncio task, hold it there while the body runs, then leave it and
    await the task. `obj` is an async or plain context manager or a `TaskConfig` instance; each
    step is bounded by `timeout` seconds, after which the task is cancelled. Use it with
    `async with`, or as a decorator on an async function.

    From synchronous code (a plain test function, seamstress's `with run_task(...)` in a
    TestCase method) it also works with a plain `with`, or as a decorator on a plain function:
    the task then runs on an event loop of its own, in a thread of its own, which is closed
    when the block ends. Objects bound to an event loop (an asyncio.Lock that has had waiters,
    a connection) are then used from that loop. Inside a running event loop use `async with`.
    """

    def __init__(self, obj: Any, *, timeout: float = TASK_TIMEOUT) -> None:
        timeout = float(timeout)
        if not timeout > 0:
            raise ValueError(f"run_task(): timeout must be > 0, not {timeout:g}")
        self._obj = obj
        self._timeout = timeout
        self._steps = _task_steps(obj)
        self._active = False
        self.value: Any = None
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"run_task({_describe(self._obj)})"

    async def __aenter__(self) -> run_task:
        __tracebackhide__ = True
        if self._active:
            raise RuntimeError(
                f"{self!r} is already in use; make a new run_task(...) for each with block"
            )
        self.value = None
        self._entered = asyncio.Event()
        self._release = asyncio.Event()
        self._errors: dict[str, BaseException] = {}
        self.task = asyncio.create_task(self._hold(), name=f"run_task-{next(_numbers)}")
        try:
            await asyncio.wait_for(self._entered.wait(), self._timeout)
        except TimeoutError:
            raise await self._timed_out(self._steps[2]) from None
        except BaseException:  # cancelled while waiting: do not leave the task behind
            self.task.cancel()
            raise
        error = self._errors.pop("set-up", None)
        if error is not None:
            await asyncio.wait({self.task}, timeout=self._timeout)
            raise self._noted(error, self._steps[2])
        self._active = True
        return self

    async def __aexit__(self, *exc_info) -> None:
        __tracebackhide__ = True
        if not self._active:
            return
        self._active = False
        self._release.set()
        await asyncio.wait({self.task}, timeout=self._timeout)
        if not self.task.done():
            raise await self._timed_out(self._steps[3])
        error = self._errors.pop("tear-down", None)
        if error is not None:
            raise self._noted(error, self._steps[3])

    def __call__(self, func: Callable) -> Callable:
        if not inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            def run_sync(*args, **kwargs):
                __tracebackhide__ = True
                with run_task(self._obj, timeout=self._timeout):
                    return func(*args, **kwargs)

            return run_sync

        @functools.wraps(func)
        async def run(*args, **kwargs):
            __tracebackhide__ = True
            async with run_task(self._obj, timeout=self._timeout):
                return await func(*args, **kwargs)

        return run

    # The synchronous form: the task on an event loop of its own, in a thread of its own.

    def __enter__(self) -> run_task:
        __tracebackhide__ = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                f"{self!r}: inside a running event loop use `async with`, not `with` (a plain "
                "`with` would block this loop while the task is held on another one)"
            )
        if self._active:
            raise RuntimeError(
                f"{self!r} is already in use; make a new run_task(...) for each with block"
            )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"run_task-loop-{next(_numbers)}", daemon=True
        )
        thread.start()
        self._loop_thread = (loop, thread)
        try:
            self._on_own_loop(self.__aenter__(), self._steps[2])
        except BaseException:
            self._close_own_loop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        __tracebackhide__ = True
        if getattr(self, "_loop_thread", None) is None:
            return
        try:
            self._on_own_loop(self.__aexit__(*exc_info), self._steps[3])
        finally:
            self._close_own_loop()

    def _on_own_loop(self, coroutine, step: str):
        """Run one step on the task's own loop and wait for it (its own timeout, plus a margin
        for a step that blocks that loop, so that its timeout cannot fire)."""
        __tracebackhide__ = True
        import concurrent.futures

        loop, thread = self._loop_thread
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(self._timeout + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            frame = sys._current_frames().get(thread.ident)
            self._loop_thread = None  # the loop is stuck: leave its (daemon) thread behind
            raise HelperTimeout(
                f"{self!r}: {step} blocked its event loop beyond the timeout of "
                f"{self._timeout:g}s; thread {thread.name!r} is left running as a daemon thread. "
                "Its stack:\n" + _stack_of(frame)
            ) from None

    def _close_own_loop(self) -> None:
        held = getattr(self, "_loop_thread", None)
        self._loop_thread = None
        if held is None:
            return
        loop, thread = held

        async def shut_down() -> None:
            await loop.shutdown_asyncgens()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shut_down(), loop)
        thread.join(self._timeout)
        if not thread.is_alive():
            loop.close()

    async def _hold(self) -> None:
        __tracebackhide__ = True
        enter, leave = self._steps[:2]
        try:
            self.value = await enter()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test
            self._errors["set-up"] = exc
            if isinstance(exc, asyncio.CancelledError):
                raise  # the task stays a cancelled one
            return
        finally:
            self._entered.set()
        await self._release.wait()
        try:
            await leave()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test
            self._errors["tear-down"] = exc
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _noted(self, error: BaseException, step: str) -> BaseException:
        error.add_note(f"(raised by {step} in task {self.task.get_name()!r}, held by {self!r})")
        return error

    async def _timed_out(self, step: str) -> HelperTimeout:
        stack = io.StringIO()
        self.task.print_stack(file=stack)
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=1.0)
        return HelperTimeout(
            f"{self!r}: {step} did not return within the timeout of {self._timeout:g}s; task "
            f"{self.task.get_name()!r} was cancelled. Its stack:\n" + stack.getvalue().rstrip()
        )
