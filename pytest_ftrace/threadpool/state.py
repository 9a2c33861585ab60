"""Per-test state for tests that run in worker threads: setup stack, fixture values, capture.

pytest keeps the state of "the running test" in a few process-wide places. While the threadpool
runner is active they are made thread-aware, and the main thread sees exactly what it saw before:

- `session._setupstate` (the stack of set-up nodes) becomes a `SetupStateProxy`. On a worker it
  delegates to a `ThreadSetupState` whose stack is the shared stack of the wave (session,
  package, module, class: set up once by the main thread) plus the worker's own test.
- `FixtureDef.cached_result` and `FixtureDef._finalizers` become descriptors: on a worker, a
  function-scoped fixture keeps its value and finalizers in the worker's `ItemContext`, so two
  tests that use one fixture at the same time get two values. Wider fixtures stay shared; a
  worker that has to create one (e.g. through `request.getfixturevalue`) holds a lock meanwhile.
- `CaptureManager.item_capture` and `LoggingPlugin._runtest_for` (the per-phase capture
  helpers) are replaced, on workers only, by per-test versions (see threadpool_capture).
- `_pytest.runner._update_current_test_var` (PYTEST_CURRENT_TEST) is skipped on workers: the
  environment is process-wide, and racing updates could remove the variable twice.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import pytest
from _pytest import runner as _runner
from _pytest.fixtures import FixtureDef
from _pytest.logging import LogCaptureHandler, caplog_handler_key, caplog_records_key
from _pytest.outcomes import TEST_OUTCOME
from _pytest.scope import Scope

from pytest_ftrace.threadpool import capture


class ItemContext:
    """What one running test owns; `threadpool_capture.current()` returns it on its thread."""

    def __init__(self, item: pytest.Item | None, capturing: bool, worker: bool) -> None:
        self.item = item
        self.worker = worker
        self.sink = capture.Sink(capturing)
        self.log_handlers: list = []
        self.warnings: list = []
        self.fixture_state: dict[FixtureDef, dict] = {}
        self.classless = item is None or item.getparent(pytest.Class) is None
        self.setupstate: ThreadSetupState | None = None
        self.results: list = []  # (CallInfo | None, TestReport)
        self.phase = "setup"
        self.thread: threading.Thread | None = None
        self.started = 0.0
        self.fatal: BaseException | None = None
        self.ihook = None
        # LogCaptureHandlers of a worker's test (caplog's, the report's): the worker thread's,
        # made once per thread and reset for each phase (making one takes logging's lock).
        self.phase_log_handlers: tuple[LogCaptureHandler, LogCaptureHandler] | None = None


class ThreadSetupState:
    """The setup stack of one worker: the wave's shared nodes, then the worker's test."""

    def __init__(self, shared: dict, lock: threading.Lock) -> None:
        self._shared = shared
        self._lock = lock
        self._own: dict = {}

    @property
    def stack(self) -> dict:
        combined = dict(self._shared)
        combined.update(self._own)
        return combined

    def is_node_active(self, node) -> bool:
        return node in self._own or node in self._shared

    def setup(self, item: pytest.Item) -> None:
        for _, exc in self._shared.values():
            if exc:
                raise exc[0].with_traceback(exc[1])
        for node in item.listchain():
            if node in self._shared or node in self._own:
                continue
            self._own[node] = ([node.teardown], None)
            try:
                node.setup()
            except TEST_OUTCOME as exc:
                self._own[node] = (self._own[node][0], (exc, exc.__traceback__))
                raise

    def addfinalizer(self, finalizer: Callable[[], object], node) -> None:
        if node in self._own:
            self._own[node][0].append(finalizer)
        elif node in self._shared:
            with self._lock:
                self._shared[node][0].append(finalizer)
        else:
            raise AssertionError(f"{node!r} is not set up on this worker thread")

    def teardown_exact(self, nextitem: pytest.Item | None) -> None:
        """Tear down this worker's own nodes; the shared ones belong to the main thread."""
        exceptions: list[BaseException] = []
        while self._own:
            node, (finalizers, _) = self._own.popitem()
            errors = []
            while finalizers:
                fin = finalizers.pop()
                try:
                    fin()
                except TEST_OUTCOME as exc:
                    errors.append(exc)
            if len(errors) == 1:
                exceptions.extend(errors)
            elif errors:
                exceptions.append(
                    BaseExceptionGroup(f"errors while tearing down {node!r}", errors[::-1])
                )
        if len(exceptions) == 1:
            raise exceptions[0]
        if exceptions:
            raise BaseExceptionGroup("errors during test teardown", exceptions[::-1])


class SetupStateProxy:
    """Stands in for session._setupstate: the real one on the main thread, a worker's on it."""

    def __init__(self, real) -> None:
        self.real = real
        self.presetup_item: pytest.Item | None = None

    def _target(self):
        context = capture.current()
        if context is not None and context.setupstate is not None:
            return context.setupstate
        return self.real

    @property
    def stack(self) -> dict:
        return self._target().stack

    def is_node_active(self, node) -> bool:
        target = self._target()
        if target is self.real and node is not None and node is self.presetup_item:
            return True
        return target.is_node_active(node)

    def setup(self, item) -> None:
        return self._target().setup(item)

    def addfinalizer(self, finalizer, node) -> None:
        return self._target().addfinalizer(finalizer, node)

    def teardown_exact(self, nextitem) -> None:
        return self._target().teardown_exact(nextitem)


_local = capture._local
_FUNCTION = Scope.Function
_CLASS = Scope.Class


def _worker_state(fixturedef) -> dict | None:
    """The worker-private state of a fixture definition, or None where it is shared."""
    context = getattr(_local, "context", None)
    if context is None or not context.worker:
        return None
    scope = fixturedef.__dict__.get("_scope")
    if scope is _FUNCTION or (scope is _CLASS and context.classless):
        state = context.fixture_state.get(fixturedef)
        if state is None:
            state = context.fixture_state[fixturedef] = {}
        return state
    return None


class _WorkerSlot:
    """A FixtureDef attribute that is per-test on worker threads and plain elsewhere.

    Read and written several times per fixture and test, so the common path is kept short.
    """

    def __init__(self, name: str, empty: Callable[[], object]) -> None:
        self.name = name
        self.empty = empty

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        context = getattr(_local, "context", None)
        if context is None or not context.worker:
            try:
                return obj.__dict__[self.name]
            except KeyError:
                raise AttributeError(self.name) from None
        state = _worker_state(obj)
        if state is None:
            try:
                return obj.__dict__[self.name]
            except KeyError:
                raise AttributeError(self.name) from None
        try:
            return state[self.name]
        except KeyError:
            value = state[self.name] = self.empty()
            return value

    def __set__(self, obj, value) -> None:
        context = getattr(_local, "context", None)
        state = None if context is None or not context.worker else _worker_state(obj)
        if state is None:
            obj.__dict__[self.name] = value
        else:
            state[self.name] = value


class Patches:
    """Install the thread-aware replacements; nested sessions (pytester) share one install."""

    _count = 0
    _saved: dict = {}
    shared_fixture_lock = threading.RLock()

    @classmethod
    def install(cls) -> None:
        cls._count += 1
        if cls._count > 1:
            return
        saved = cls._saved
        for name, empty in (("cached_result", lambda: None), ("_finalizers", list)):
            saved[name] = FixtureDef.__dict__.get(name)
            setattr(FixtureDef, name, _WorkerSlot(name, empty))
        original_execute = FixtureDef.execute
        saved["execute"] = original_execute
        lock = cls.shared_fixture_lock

        def execute(self, request):
            context = capture.current()
            if context is not None and context.worker and _worker_state(self) is None:
                with lock:
                    return original_execute(self, request)
            return original_execute(self, request)

        FixtureDef.execute = execute
        original_update = _runner._update_current_test_var
        saved["update"] = original_update

        def update_current_test_var(item, when):
            context = capture.current()
            if context is not None and context.worker:
                return
            original_update(item, when)

        _runner._update_current_test_var = update_current_test_var

    @classmethod
    def uninstall(cls) -> None:
        cls._count -= 1
        if cls._count > 0:
            return
        saved = cls._saved
        for name in ("cached_result", "_finalizers"):
            if saved.get(name) is None:
                delattr(FixtureDef, name)
            else:
                setattr(FixtureDef, name, saved[name])
        FixtureDef.execute = saved["execute"]
        _runner._update_current_test_var = saved["update"]
        saved.clear()


def cache_hook_proxies(session: pytest.Session) -> Callable[[], None]:
    """Remember `session.gethookproxy(path)` per path; return the undo function.

    `node.ihook` asks for it several times per test (fixture set-up and finish, reports). On a
    free-threaded build its look-ups (an lru_cache and a set shared by every thread) made the
    workers wait for each other: 0.28 ms a call with 8 workers. The answer only changes when
    conftest files are loaded, so it is kept until the count of loaded conftests changes.
    """
    pm = session.config.pluginmanager
    if not hasattr(pm, "_conftest_plugins") or "gethookproxy" in session.__dict__:
        return lambda: None
    original = session.gethookproxy
    cache: dict = {}

    def gethookproxy(fspath):
        version = len(pm._conftest_plugins)
        try:
            known, proxy = cache[fspath]
        except (KeyError, TypeError):
            known = proxy = None
        if known == version and proxy is not None:
            return proxy
        proxy = original(fspath)
        try:
            cache[fspath] = (version, proxy)
        except TypeError:
            pass  # an unhashable path: not cached
        return proxy

    session.gethookproxy = gethookproxy
    return lambda: session.__dict__.pop("gethookproxy", None)


def patch_plugins(config: pytest.Config) -> Callable[[], None]:
    """Make the capture and logging plugins per-test on workers; return the undo function."""
    undo: list[Callable[[], None]] = []
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None and hasattr(capman, "item_capture"):
        original = capman.item_capture

        def item_capture(when, item):
            context = capture.current()
            if context is None or not context.worker:
                return original(when, item)
            return _worker_item_capture(context, when, item)

        capman.item_capture = item_capture
        undo.append(lambda: capman.__dict__.pop("item_capture", None))
    logging_plugin = config.pluginmanager.getplugin("logging-plugin")
    if logging_plugin is not None and hasattr(logging_plugin, "_runtest_for"):
        original_for = logging_plugin._runtest_for

        def runtest_for(item, when):
            context = capture.current()
            if context is None or not context.worker:
                return original_for(item, when)
            return _worker_logs(logging_plugin, context, item, when)

        logging_plugin._runtest_for = runtest_for
        undo.append(lambda: logging_plugin.__dict__.pop("_runtest_for", None))

    def restore() -> None:
        for step in undo:
            step()

    return restore


@contextlib.contextmanager
def _worker_item_capture(context: ItemContext, when: str, item: pytest.Item):
    try:
        yield
    finally:
        context.sink.settle()
        out, err = context.sink.take()
        item.add_report_section(when, "stdout", out)
        item.add_report_section(when, "stderr", err)


def new_log_handlers(logging_plugin) -> tuple[LogCaptureHandler, LogCaptureHandler]:
    caplog_handler, report_handler = LogCaptureHandler(), LogCaptureHandler()
    for handler in (caplog_handler, report_handler):
        if logging_plugin is not None:
            handler.setFormatter(logging_plugin.formatter)
            if logging_plugin.log_level is not None:
                handler.setLevel(logging_plugin.log_level)
    return caplog_handler, report_handler


@contextlib.contextmanager
def _worker_logs(logging_plugin, context: ItemContext, item: pytest.Item, when: str):
    handlers = context.phase_log_handlers
    if handlers is None:
        handlers = context.phase_log_handlers = new_log_handlers(logging_plugin)
    else:
        # The worker's handlers, used by its tests one after the other: fresh records and text
        # for each phase (reset() replaces them, so the lists of the phases and tests before
        # stay as they are), and the level that caplog.set_level may have changed.
        level = logging_plugin.log_level if logging_plugin is not None else None
        for handler in handlers:
            handler.reset()
            handler.setLevel(level if level is not None else logging.NOTSET)
    caplog_handler, report_handler = handlers
    item.stash[caplog_records_key][when] = caplog_handler.records
    item.stash[caplog_handler_key] = caplog_handler
    context.log_handlers[:] = [caplog_handler, report_handler]
    try:
        yield
    finally:
        context.log_handlers[:] = []
        item.add_report_section(when, "log", report_handler.stream.getvalue().strip())
