"""The threadpool test loop: waves of tests run by worker threads, reported by the main thread.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import sys
import threading
import time
import traceback
import warnings
from typing import NamedTuple

import pytest
from _pytest._code import getfslineno
from _pytest.outcomes import TEST_OUTCOME, Exit, Skipped
from _pytest.pathlib import absolutepath
from _pytest.scope import Scope

from pytest_ftrace.threadpool import capture
from pytest_ftrace.threadpool import plan as planning
from pytest_ftrace.threadpool.state import (
    ItemContext,
    Patches,
    SetupStateProxy,
    ThreadSetupState,
    cache_hook_proxies,
    new_log_handlers,
    patch_plugins,
)

POLL_SECONDS = 0.25


class Leak(NamedTuple):
    nodeid: str
    thread_name: str
    phase: str


class Outcome:
    """What the runner tells the terminal summary."""

    def __init__(self) -> None:
        self.leaked: list[Leak] = []
        self.not_run = 0
        self.waves = 0
        self.pooled = 0


class _Wave:
    """The bookkeeping of one wave, shared by its workers (under `lock`) and the main thread."""

    def __init__(self, items: list[pytest.Item]) -> None:
        self.lock = threading.Lock()
        self.pending = collections.deque(items)
        self.inflight: dict[pytest.Item, ItemContext] = {}
        self.done: queue.SimpleQueue[ItemContext] = queue.SimpleQueue()
        self.stop = False
        self.remaining = len(items)
        self.first_due = float("inf")  # no timeout before then (set when the wave starts)


class Runner:
    def __init__(
        self,
        session: pytest.Session,
        workers: int,
        timeout: float,
        default: str,
        decisions: dict | None = None,
    ):
        self.session = session
        self.config = session.config
        self.workers = workers
        self.timeout = timeout
        self.default = default
        self.decisions = decisions
        self.outcome = Outcome()
        self.capturing = self.config.option.capture != "no"
        self.logging_plugin = self.config.pluginmanager.getplugin("logging-plugin")
        self.reraise: tuple[type[BaseException], ...] = (Exit,)
        if not self.config.getoption("usepdb", False):
            self.reraise += (KeyboardInterrupt,)
        self.proxy: SetupStateProxy | None = None
        self._thread_ids = 0
        # The worker threads, started once per session and given one wave after the other
        # (see _start_pool). `members` counts the threads that take part in the next wave.
        self.pool = threading.Condition()
        self.pool_wave: _Wave | None = None
        self.pool_serial = 0
        self.pool_closed = False
        self.members = 0
        self.retired: set[threading.Thread] = set()  # timed out: leave the pool
        self.setuponly = bool(self.config.getoption("setuponly", False))
        self.shared_lock = threading.Lock()
        self.extra_warnings: dict[pytest.Item, list] = {}
        self._log_handlers = threading.local()

    # The loop ----------------------------------------------------------------------------------

    def run(self) -> bool:
        session = self.session
        if session.testsfailed and not self.config.option.continue_on_collection_errors:
            raise session.Interrupted(
                f"{session.testsfailed} error{'s' if session.testsfailed != 1 else ''}"
                " during collection"
            )
        if self.config.option.collectonly:
            return True
        steps = planning.plan(session.items, self.default, self.decisions)
        if not any(step.wave for step in steps):
            return self._sequential(session.items)
        position = {item: i for i, item in enumerate(session.items)}
        self.position = position
        self._start_pool(min(self.workers, max(len(s.wave.items) for s in steps if s.wave)))
        try:
            return self._steps(steps, position)
        finally:
            self._close_pool()

    def _steps(self, steps: list, position: dict) -> bool:
        session = self.session
        self._install()
        for index, step in enumerate(steps):
            following = steps[index + 1] if index + 1 < len(steps) else None
            nextitem = None
            if following is not None:
                nextitem = following.item or following.wave.items[0]
            if step.item is not None:
                step.item.config.hook.pytest_runtest_protocol(item=step.item, nextitem=nextitem)
                done = position[step.item] + 1
            else:
                self._run_wave(step.wave.items, nextitem)
                done = position[step.wave.items[-1]] + 1
            if session.shouldfail or session.shouldstop:
                self.outcome.not_run += len(session.items) - done
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        return True

    def _install(self) -> None:
        Patches.install()
        self._restore_plugins = patch_plugins(self.config)
        self._restore_hook_proxies = cache_hook_proxies(self.session)
        self.proxy = SetupStateProxy(self.session._setupstate)
        self.session._setupstate = self.proxy

    def close(self) -> None:
        """Undo the patches (at pytest_unconfigure, not at the end of the loop: a worker that
        timed out may still be running, and must not touch the main thread's state)."""
        if self.proxy is None:
            return
        self._restore_plugins()
        self._restore_hook_proxies()
        Patches.uninstall()
        self.proxy = None

    def _sequential(self, items) -> bool:
        session = self.session
        for i, item in enumerate(items):
            nextitem = items[i + 1] if i + 1 < len(items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if session.shouldfail or session.shouldstop:
                self.outcome.not_run += len(items) - i - 1
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        return True

    # One wave -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _routing(self):
        level = getattr(self.logging_plugin, "log_level", None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(capture.routed_streams(sys))
            stack.enter_context(capture.routed_logs(level))
            catch = getattr(self.config, "_catch_configured_warnings", None)
            if catch is not None:
                stack.enter_context(catch(record=False))
            else:
                stack.enter_context(warnings.catch_warnings())
            warnings.showwarning = capture.route_warning
            yield

    def _run_wave(self, items: list[pytest.Item], nextitem: pytest.Item | None) -> None:
        self.outcome.waves += 1
        self.outcome.pooled += len(items)
        with self._routing():
            self._shared_setup(items)
            wave = _Wave(items)
            held = self._drive(wave)
            self._shared_teardown(items, held, nextitem)
        for message in capture.stray_warnings:
            self.config.hook.pytest_warning_recorded.call_historic(
                kwargs=dict(warning_message=message, nodeid="", when="runtest", location=None)
            )
        capture.stray_warnings.clear()

    def _main_context(self, item: pytest.Item) -> ItemContext:
        context = ItemContext(item, self.capturing, worker=False)
        context.log_handlers[:] = new_log_handlers(self.logging_plugin)[1:]
        return context

    def _keep_main_output(self, context: ItemContext, item: pytest.Item, when: str) -> None:
        out, err = context.sink.take()
        item.add_report_section(when, "stdout", out)
        item.add_report_section(when, "stderr", err)
        if context.log_handlers:
            item.add_report_section(when, "log", context.log_handlers[0].stream.getvalue().strip())

    def _shared_setup(self, items: list[pytest.Item]) -> None:
        """Set up the collectors and the wider-than-function fixtures, once, on this thread."""
        real = self.proxy.real
        first = items[0]
        chain = first.listchain()
        if any(node not in chain for node in real.stack):
            real.teardown_exact(first)
        context = self._main_context(first)
        capture.set_current(context)
        try:
            failed = False
            for node in chain[:-1]:
                if node in real.stack:
                    failed = failed or real.stack[node][1] is not None
                    continue
                real.stack[node] = ([node.teardown], None)
                try:
                    node.setup()
                except TEST_OUTCOME as exc:
                    real.stack[node] = (real.stack[node][0], (exc, exc.__traceback__))
                    failed = True
                    break
            self._prepare_lazy_state(items)
            for item in items:
                if not item._request:
                    item._initrequest()
                if failed:
                    continue
                self.proxy.presetup_item = item
                for name in item.fixturenames:
                    if _is_shared(item, name):
                        try:
                            item._request.getfixturevalue(name)
                        except self.reraise:
                            raise
                        except BaseException:
                            pass  # raised again, and reported, in the test's own setup
        finally:
            self.proxy.presetup_item = None
            capture.set_current(None)
            self._keep_main_output(context, first, "setup")
            self.extra_warnings.setdefault(first, []).extend(context.warnings)

    def _prepare_lazy_state(self, items: list[pytest.Item]) -> None:
        """Create, on this thread, what pytest creates on first use and workers would race on."""
        if any({"tmp_path", "tmpdir"} & set(item.fixturenames) for item in items):
            factory = getattr(self.config, "_tmp_path_factory", None)
            if factory is not None:
                try:
                    factory.getbasetemp()
                except Exception:
                    pass  # the tests' own setup reports it

    def _shared_teardown(self, items, held: ItemContext | None, nextitem) -> None:
        session = self.session
        if session.shouldfail or session.shouldstop:
            nextitem = None
        last = held.item if held is not None else items[-1]
        context = self._main_context(last)
        capture.set_current(context)
        try:
            call = pytest.CallInfo.from_call(
                lambda: self.proxy.real.teardown_exact(nextitem), "teardown", reraise=self.reraise
            )
        finally:
            capture.set_current(None)
        self._keep_main_output(context, last, "teardown")
        self.extra_warnings.setdefault(last, []).extend(context.warnings)
        if held is None:
            if call.excinfo is not None:
                report = last.ihook.pytest_runtest_makereport(item=last, call=call)
                last.ihook.pytest_runtest_logreport(report=report)
            return
        if call.excinfo is not None:
            report = last.ihook.pytest_runtest_makereport(item=last, call=call)
            own = held.results[-1][1] if held.results else None
            if own is not None and own.when == "teardown" and own.passed:
                held.results[-1] = (call, report)
            else:
                held.results.append((call, report))
        elif held.results and held.results[-1][1].when == "teardown":
            # Sections of the shared teardown belong to the last report of the item.
            call0, report = held.results[-1]
            extra = [s for s in _sections(last) if s not in report.sections]
            report.sections.extend(extra)
        self._report(held)

    def _drive(self, wave: _Wave) -> ItemContext | None:
        """Run the wave; report each test as it ends; return the last one, not yet reported."""
        items = list(wave.pending)
        starting = min(self.workers, len(items))
        # Each report needs its test's location; working it out in a worker (a stat and a
        # source lookup) would keep the GIL from the other workers, so it is done here: for
        # the first tests before the wave starts, for the others while those first tests run.
        _fill_locations(items[:starting])
        self._publish(wave, starting)
        _fill_locations(items[starting:])
        try:
            return self._collect(wave)
        except BaseException:  # Ctrl-C on the main thread: start no further test
            with wave.lock:
                wave.stop = True
                wave.pending.clear()
            raise

    def _collect(self, wave: _Wave) -> ItemContext | None:
        session = self.session
        fatal: BaseException | None = None
        while True:
            # One lock per report: `stop` and `remaining` are read without it (a stale value
            # only makes this loop wait for the next report or poll once more).
            if (session.shouldfail or session.shouldstop or fatal) and not wave.stop:
                with wave.lock:
                    wave.stop = True
                    skipped = len(wave.pending)
                    wave.pending.clear()
                    wave.remaining -= skipped
                    self.outcome.not_run += skipped
            if wave.remaining == 0:
                break
            try:
                context = wave.done.get(timeout=self._wait_seconds(wave))
            except queue.Empty:
                self._check_timeouts(wave)
                self._ensure_members(min(self.workers, len(wave.pending)))
                continue
            self._check_timeouts(wave)
            with wave.lock:
                wave.remaining -= 1
                last = wave.remaining == 0 and not wave.pending
            if context.fatal is not None:
                fatal = context.fatal
            if context.item is None:
                continue
            if last and fatal is None:
                return context
            self._report(context)
        if fatal is not None:
            raise fatal
        return None

    def _new_context(self, item: pytest.Item, log_handlers) -> ItemContext:
        context = ItemContext(item, self.capturing, worker=True)
        context.phase_log_handlers = log_handlers
        return context

    def _wait_seconds(self, wave: _Wave) -> float:
        if time.monotonic() + POLL_SECONDS < wave.first_due:
            return POLL_SECONDS
        with wave.lock:
            starts = [c.started for c in wave.inflight.values()]
        if not starts:
            return POLL_SECONDS
        due = min(starts) + self.timeout - time.monotonic()
        return max(0.01, min(POLL_SECONDS, due))

    def _check_timeouts(self, wave: _Wave) -> None:
        now = time.monotonic()
        if now < wave.first_due:
            return  # no test of the wave can have run for that long yet
        expired = []
        with wave.lock:
            for item, context in list(wave.inflight.items()):
                if now - context.started > self.timeout:
                    del wave.inflight[item]
                    wave.remaining -= 1
                    expired.append(context)
            replace = min(len(expired), len(wave.pending))
        for context in expired:
            with self.pool:
                self.retired.add(context.thread)
                self.members -= 1
            self._report_timeout(context)
        # Replacements join this wave at once (and the pool for the waves after it).
        if replace:
            with self.pool:
                size = self.members + replace
            self._ensure_members(size)

    # Workers ------------------------------------------------------------------------------------

    def _start_pool(self, size: int) -> None:
        """Start `size` worker threads, from a starter thread.

        Thread.start() waits until the new thread runs; under load that takes milliseconds per
        thread. The starter waits instead of the main thread, which meanwhile sets up the first
        wave; a worker that starts late joins the wave that is running by then.
        """
        with self.pool:
            self.members += size
        starter = threading.Thread(
            target=self._start_threads, args=(size,), name="ftrace-pool-starter", daemon=True
        )
        starter.start()

    def _start_threads(self, count: int) -> None:
        for started in range(count):
            try:
                self._start_thread()
            except BaseException:
                # The main thread sees the pool short and starts the missing threads itself
                # (or raises the error there): a wave never waits for threads that never come.
                with self.pool:
                    self.members -= count - started
                return

    def _start_thread(self) -> None:
        self._thread_ids += 1
        thread = threading.Thread(
            target=self._pool_member, name=f"ftrace-threadpool-{self._thread_ids}", daemon=True
        )
        thread.start()

    def _ensure_members(self, size: int) -> None:
        """Start threads until the pool has `size` members (after timeouts, or a bigger wave)."""
        with self.pool:
            missing = max(0, size - self.members)
            self.members += missing
        for _ in range(missing):
            self._start_thread()

    def _publish(self, wave: _Wave, size: int) -> None:
        self._ensure_members(size)
        wave.first_due = time.monotonic() + self.timeout
        with self.pool:
            self.pool_wave = wave
            self.pool_serial += 1
            self.pool.notify_all()

    def _close_pool(self) -> None:
        with self.pool:
            self.pool_closed = True
            self.pool_wave = None
            self.pool.notify_all()

    def _pool_member(self) -> None:
        """A worker thread: runs tests of each wave the main thread publishes, until closed."""
        me = threading.current_thread()
        seen = 0
        log_handlers = None
        while True:
            with self.pool:
                while self.pool_serial == seen and not self.pool_closed:
                    self.pool.wait()
                if self.pool_closed:
                    return
                seen, wave = self.pool_serial, self.pool_wave
            if log_handlers is None and self.logging_plugin is not None:
                # Made once per thread and reset for each test and phase: making a handler
                # takes logging's module lock, and freeing one takes it again.
                log_handlers = new_log_handlers(self.logging_plugin)
            self._log_handlers.value = log_handlers
            self._work(wave)
            if me in self.retired:
                return

    def _work(self, wave: _Wave) -> None:
        try:
            self._work_loop(wave)
        except BaseException as exc:  # a bug of ours: stop the wave rather than hang the session
            me = threading.current_thread()
            context = ItemContext(None, self.capturing, worker=True)
            context.fatal = exc
            with wave.lock:
                lost = [item for item, c in wave.inflight.items() if c.thread is me]
                for item in lost:
                    del wave.inflight[item]
                dropped = len(wave.pending) + len(lost)
                wave.stop = True
                wave.pending.clear()
                # The fatal context below is counted like one test.
                wave.remaining -= dropped - 1
                self.outcome.not_run += dropped
            wave.done.put(context)

    def _work_loop(self, wave: _Wave) -> None:
        me = threading.current_thread()
        log_handlers = getattr(self._log_handlers, "value", None)
        finished = None
        while True:
            # One lock per test: the end of the one before and the start of the next.
            with wave.lock:
                if finished is not None and wave.inflight.pop(finished.item, None) is None:
                    return  # timed out: reported already, and this thread was replaced
                if wave.stop or not wave.pending or me in self.retired:
                    item = None
                else:
                    item = wave.pending.popleft()
                    context = self._new_context(item, log_handlers)
                    context.thread = me
                    context.started = time.monotonic()
                    wave.inflight[item] = context
            if finished is not None:
                wave.done.put(finished)
            if item is None:
                return
            context.ihook = item.ihook
            self._run_item(context)
            finished = context

    def _run_item(self, context: ItemContext) -> None:
        item = context.item
        capture.set_current(context)
        try:
            context.setupstate = ThreadSetupState(self.proxy.real.stack, self.shared_lock)
            setup = self._phase(context, "setup")
            if setup.passed and not self.setuponly:
                self._phase(context, "call")
            index = self.position[item] + 1
            items = self.session.items
            nextitem = items[index] if index < len(items) else None
            self._phase(context, "teardown", nextitem=nextitem)
        except BaseException as exc:  # Exit or KeyboardInterrupt, re-raised by the main thread
            context.fatal = exc
        finally:
            item._request = False
            item.funcargs = None
            capture.set_current(None)

    def _phase(self, context: ItemContext, when: str, **kwds) -> pytest.TestReport:
        item = context.item
        context.phase = when
        ihook = context.ihook
        hook = getattr(ihook, f"pytest_runtest_{when}")
        call = pytest.CallInfo.from_call(
            lambda: hook(item=item, **kwds), when=when, reraise=self.reraise
        )
        report = ihook.pytest_runtest_makereport(item=item, call=call)
        context.results.append((call, report))
        return report

    # Reports (main thread) ----------------------------------------------------------------------

    def _report(self, context: ItemContext) -> None:
        item = context.item
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for call, report in list(context.results):
            ihook.pytest_runtest_logreport(report=report)
            if call is not None and _interactive(call, report):
                ihook.pytest_exception_interact(node=item, call=call, report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        for message in context.warnings + self.extra_warnings.pop(item, []):
            ihook.pytest_warning_recorded.call_historic(
                kwargs=dict(
                    warning_message=message, nodeid=item.nodeid, when="runtest", location=None
                )
            )

    def _report_timeout(self, context: ItemContext) -> None:
        item = context.item
        thread = context.thread
        phase = context.phase
        frame = sys._current_frames().get(thread.ident) if thread is not None else None
        stack = _user_stack(frame)
        elapsed = time.monotonic() - context.started
        text = (
            f"Timeout: {item.nodeid} was still in its {phase} after {self.timeout:g} s "
            f"(--ftrace-timeout). Its worker thread {thread.name if thread else '?'} was "
            f"abandoned (leaked) and the session went on.\n\n"
            f"Stack of the worker thread:\n{stack}"
        )
        out, err = context.sink.take()
        sections = [(f"Captured {key} {when}", c) for when, key, c in _report_sections(item)]
        sections += [
            (f"Captured {key} {phase}", c) for key, c in (("stdout", out), ("stderr", err))
        ]
        sections = [s for s in sections if s[1]]
        reports = [(c, r) for c, r in list(context.results) if r.when != phase]
        keywords = {name: 1 for name in item.keywords}
        now = time.time()
        failed = pytest.TestReport(
            item.nodeid,
            item.location,
            keywords,
            "failed",
            text,
            phase,
            sections,
            duration=elapsed,
            start=now - elapsed,
            stop=now,
            user_properties=list(item.user_properties),
        )
        reports.append((None, failed))
        if phase != "teardown":
            leaked = pytest.TestReport(
                item.nodeid,
                item.location,
                keywords,
                "passed",
                None,
                "teardown",
                [("threadpool", "function-scoped fixtures of this test were not torn down")],
                user_properties=list(item.user_properties),
            )
            reports.append((None, leaked))
        context.results = reports
        name = thread.name if thread is not None else "?"
        self.outcome.leaked.append(Leak(item.nodeid, name, phase))
        self._report(context)


_ITEM_LOCATION = pytest.Item.__dict__.get("location")
_FUNCTION_REPORTINFO = getattr(pytest.Function, "reportinfo", None)


def _fill_locations(items: list[pytest.Item]) -> None:
    """Work out `item.location` of each test, once per test function for its variants.

    pytest's `Item.location` looks up the function's file and line (`getfslineno`: a stat and
    a source lookup) for every parametrized variant again. For plain test functions the file
    and line come from a cache here, and the rest of the tuple is made the way pytest makes
    it; other items (own `reportinfo` or `location`) use their own.
    """
    found: dict[int, tuple] = {}
    for item in items:
        if "location" in item.__dict__:
            continue
        kind = type(item)
        try:
            if (
                _ITEM_LOCATION is None
                or getattr(kind, "location", None) is not _ITEM_LOCATION
                or getattr(kind, "reportinfo", None) is not _FUNCTION_REPORTINFO
            ):
                item.location  # noqa: B018 - a cached_property, filled in here
                continue
            obj = item.obj
            function = getattr(obj, "__func__", obj)
            entry = found.get(id(function))
            if entry is None or entry[0] is not function:
                path, lineno = getfslineno(obj)
                relpath = item.session._node_location_to_relpath(absolutepath(path))
                entry = found[id(function)] = (function, relpath, lineno)
            domain = item.getmodpath()
            if type(domain) is not str:
                item.location  # noqa: B018
                continue
            item.__dict__["location"] = (entry[1], entry[2], domain)
        except Exception:
            pass  # the worker's own report runs into it again, and reports it


_MACHINERY = ("threading.py", "/pluggy/", "/_pytest/", "/pytest_ftrace/threadpool")


def _user_stack(frame) -> str:
    """The stack of a hung worker, without the leading frames of threads, pluggy and pytest."""
    if frame is None:
        return "(the thread has ended)\n"
    entries = traceback.extract_stack(frame)
    start = 0
    for i, entry in enumerate(entries):
        if not any(part in entry.filename for part in _MACHINERY):
            start = i
            break
    return "".join(traceback.format_list(entries[start:]))


def _report_sections(item) -> list:
    return list(getattr(item, "_report_sections", []))


def _sections(item) -> list[tuple[str, str]]:
    return [(f"Captured {key} {when}", content) for when, key, content in _report_sections(item)]


def _is_shared(item: pytest.Item, name: str) -> bool:
    """Whether the fixture `name` of `item` is wider than the test (set up by the main thread)."""
    definitions = item._fixtureinfo.name2fixturedefs.get(name)
    if not definitions:
        return False
    definition = definitions[-1]
    scope = definition._scope
    callspec = getattr(item, "callspec", None)
    if callspec is not None and name in callspec.params:
        scope = callspec._arg2scope.get(name, scope)
    if scope is Scope.Function:
        return False
    return not (scope is Scope.Class and item.getparent(pytest.Class) is None)


def _interactive(call: pytest.CallInfo, report: pytest.TestReport) -> bool:
    if call.excinfo is None or hasattr(report, "wasxfail"):
        return False
    return not isinstance(call.excinfo.value, Skipped)
