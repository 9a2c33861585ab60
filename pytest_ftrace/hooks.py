"""The plugin's hooks: a thin layer over the modules of this package (plugin.py hands them to
pytest).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from pytest_ftrace import gil, markers, options

if TYPE_CHECKING:  # loaded only in the runs that use them
    from pytest_ftrace.ftrace import FtraceSession

# The sessions configured in this process, innermost last (pytester runs nest them).
ACTIVE_CONFIGS: list[pytest.Config] = []


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    options.add_options(parser, pluginmanager)


def pytest_configure(config: pytest.Config) -> None:
    peers = options.active_peers(config.pluginmanager)
    for line in markers.MARKERS:
        config.addinivalue_line("markers", line)
    for peer, lines in markers.PEER_MARKERS.items():
        if peer not in peers:
            for line in lines:
                config.addinivalue_line("markers", line)
    settings = _settings(config)
    options.check_combinations(config, settings, peers)
    workers = options.threadpool_workers(config)
    isolating = options.isolate_requested(config)
    if isolating and workers is not None:
        from pytest_ftrace import isolate

        isolate.refuse_with_threadpool(config)
    if settings.require_gil_disabled and gil.enabled():
        why = "this is a GIL build" if not gil.FREE_THREADED_BUILD else "the GIL is enabled"
        given = config.option.ftrace_require_gil_disabled is not None
        source = "--require-gil-disabled" if given else "ini key ftrace_require_gil_disabled"
        raise pytest.UsageError(
            f"{source}: {why} (Python {sys.version.split()[0]} at "
            f"{sys.executable}); run the tests with a free-threaded Python such as python3.13t "
            "(with PYTHON_GIL unset or 0)"
        )
    state = config.stash[STATE_KEY] = SessionState(settings, peers)
    ACTIVE_CONFIGS.append(config)
    config.add_cleanup(lambda: ACTIVE_CONFIGS.remove(config))
    if config.option.ftrace:
        from pytest_ftrace import ftrace

        state.ftrace = config.stash[ftrace.SESSION_KEY] = ftrace.FtraceSession(config)
        config.pluginmanager.register(_FtraceClose(state.ftrace), "ftrace-close")
        if config.pluginmanager.hasplugin("xdist"):
            config.pluginmanager.register(_XdistSeed(), "ftrace-xdist")
    if workers is not None:
        from pytest_ftrace import threadpool

        threadpool.configure(config, workers)
    if isolating:
        from pytest_ftrace import isolate

        isolate.configure(config)


class _XdistSeed:
    @staticmethod
    def pytest_configure_node(node) -> None:
        from pytest_ftrace.ftrace import pytest_configure_node

        pytest_configure_node(node)


class _FtraceClose:
    """Registered with --ftrace only: every hook the plugin has costs each session time."""

    def __init__(self, session: FtraceSession) -> None:
        self.session = session

    def pytest_unconfigure(self) -> None:
        self.session.close()


def _settings(config: pytest.Config) -> options.Settings:
    unsafe = set(markers.BUILTIN_THREAD_UNSAFE)
    unsafe.update(options.ini_value(config, "thread_unsafe_fixtures") or ())
    on = config.option.ftrace
    require = config.option.ftrace_require_gil_disabled
    if require is None:
        require = bool(options.ini_value(config, "ftrace_require_gil_disabled"))
    return options.Settings(
        threads=options.resolve(
            config,
            "ftrace_threads",
            "ftrace_threads",
            options.positive_int_or_auto("ftrace_threads"),
            options.DEFAULT_THREADS if on else 1,
        ),
        iterations=options.resolve(
            config,
            "ftrace_iterations",
            "ftrace_iterations",
            options.positive_int("ftrace_iterations"),
            options.DEFAULT_ITERATIONS if on else 1,
        ),
        require_gil_disabled=require,
        thread_unsafe_fixtures=frozenset(unsafe),
        timeout=options.resolve(
            config,
            "ftrace_timeout",
            "ftrace_timeout",
            options.positive_float("ftrace_timeout"),
            options.DEFAULT_TIMEOUT,
        ),
    )


class SessionState:
    def __init__(self, settings: options.Settings, peers: set[str]):
        self.settings = settings
        self.peers = peers
        self.single: list[tuple[str, str]] = []  # (nodeid, reason) of tests run on one thread
        self.gil = gil.Watch()
        self.ftrace: FtraceSession | None = None


STATE_KEY = pytest.StashKey[SessionState]()


# The thread-aware fixtures. In a threaded run each worker gets its own values; on the main
# thread (a plain or single-threaded run) they describe that single execution.


@pytest.fixture
def thread_index() -> int:
    """Index of the thread running the test body, 0..num_parallel_threads-1."""
    return 0


@pytest.fixture
def iteration_index() -> int:
    """Index of the current round, 0..num_iterations-1."""
    return 0


@pytest.fixture
def num_parallel_threads(request: pytest.FixtureRequest) -> int:
    """Threads running this test's body at once."""
    plan = request.node.stash.get(markers.PLAN_KEY, None)
    return plan.threads if plan is not None and plan.threaded else 1


@pytest.fixture
def num_iterations(request: pytest.FixtureRequest) -> int:
    """Rounds each thread runs the body for."""
    plan = request.node.stash.get(markers.PLAN_KEY, None)
    return plan.iterations if plan is not None and plan.threaded else 1


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_ftrace import _native

    info = _native.build_info()
    state = config.stash[STATE_KEY]
    settings = state.settings
    lines = [
        f"ftrace: threads={settings.threads} iterations={settings.iterations} "
        f"timeout={settings.timeout:g}s, GIL {gil.state()}, "
        f"native {info['version']} (pyo3 {info['pyo3']})"
    ]
    if state.ftrace is not None:
        lines.append(state.ftrace.header())
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    state = collector.config.stash[STATE_KEY]
    state.gil.before()
    report = yield
    if report.outcome == "passed":
        message = _bad_marker(collector, report.result, state.peers)
        if message is not None:  # a collection error, like any other one in this collector
            report.outcome = "failed"
            report.longrepr = message
            report.result = []
    message = state.gil.after(collector.nodeid or "collection")
    if message and state.settings.require_gil_disabled and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = message
    return report


def _bad_marker(collector: pytest.Collector, nodes: list, peers: set[str]) -> str | None:
    """The errors of the collected tests whose markers of ours have wrong arguments, one line
    per test (all of them: fixing one should not reveal the next).

    Checked once per collector: a test is looked at closely only if it, or a node above it,
    carries one of our marker names (most tests have none)."""
    inherited = None
    errors = []
    for node in nodes:
        if not isinstance(node, pytest.Item):
            continue
        if inherited is None:
            inherited = any(mark.name in markers.OURS for mark in collector.iter_markers())
        own = node.own_markers  # most tests have none
        if inherited or (own and any(mark.name in markers.OURS for mark in own)):
            try:
                markers.check_markers(node, peers)
            except markers.MarkerError as exc:
                errors.append(f"{node.name}: {exc}")
    return "\n".join(errors) if errors else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state = item.config.stash[STATE_KEY]
    state.gil.before()  # before the test's fixtures import anything
    plan = markers.plan_for(item, state.settings, state.peers)
    item.stash[markers.PLAN_KEY] = plan
    if plan.single_reason is not None:
        state.single.append((item.nodeid, plan.single_reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    plan = item.stash.get(markers.PLAN_KEY, None)
    if plan is None or not plan.threaded:
        return (yield)
    state = item.config.stash[STATE_KEY]
    original = item.obj
    item.obj = _threaded(item, original, plan, state)
    try:
        return (yield)
    finally:
        item.obj = original


def _threaded(item: pytest.Item, original, plan: markers.Plan, state: SessionState):
    # unittest is only loaded when a session has TestCase tests; don't import it for the others
    unittest = sys.modules.get("unittest")
    takes_fixtures = unittest is None or not isinstance(
        getattr(original, "__self__", None), unittest.TestCase
    )

    from pytest_ftrace import report, runner

    def run_in_threads(*args, **kwargs):
        __tracebackhide__ = True
        threads, iterations, hooks = plan.threads, plan.iterations, runner.Hooks()
        traced = state.ftrace.start(item, threads, iterations) if state.ftrace else None
        if traced is not None:
            threads, iterations, hooks = traced.threads, traced.iterations, traced.hooks()
        run = runner.ThreadedRun(
            item,
            original,
            threads,
            iterations,
            state.settings.timeout,
            hooks=hooks,
            takes_fixtures=takes_fixtures,
        )
        if traced is None:
            outcome = run.run()
        else:
            traced.run.activate()
            try:
                outcome = run.run()
            finally:
                traced.run.deactivate()
            traced.finish(outcome)
        report.raise_outcome(outcome)

    run_in_threads.__name__ = getattr(original, "__name__", "test")
    run_in_threads.ftrace_body = (original, takes_fixtures)  # exact mode re-runs it to shrink
    return run_in_threads


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    if call.excinfo is not None and call.excinfo.typename == "ConcurrencyError":
        from pytest_ftrace.report import ConcurrencyError

        if isinstance(call.excinfo.value, ConcurrencyError):
            rep.longrepr = f"ConcurrencyError: {call.excinfo.value}"
    state = item.config.stash[STATE_KEY]
    message = state.gil.after(item.nodeid)
    if message:
        if state.settings.require_gil_disabled:
            rep.outcome = "failed"
            rep.longrepr = message if rep.longrepr is None else f"{rep.longrepr}\n\n{message}"
        else:
            rep.sections.append(("ftrace: GIL re-enabled", message))
    return rep


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return
    if state.gil.events:
        terminalreporter.section("ftrace: GIL re-enabled", sep="-", yellow=True)
        for where, message in state.gil.events:
            terminalreporter.line(f"{where}: {message}")
    if state.ftrace is not None:
        ftrace_summary(terminalreporter, state.ftrace, config.option.verbose)
    if state.single and config.option.verbose > 0:
        terminalreporter.section("ftrace: tests run on one thread", sep="-")
        for nodeid, reason in state.single:
            terminalreporter.line(f"{nodeid}: {reason}")


def ftrace_summary(tr, session: FtraceSession, verbose: int) -> None:
    for note in session.notes:
        tr.line(note, yellow=True)
    for nodeid, reproduced, runs in session.replays:
        tr.line(f"ftrace replay: {nodeid}: reproduced {reproduced}/{runs}")
    if verbose <= 0 or not session.stats:
        return
    tr.section(f"ftrace statistics (seed {session.seed})", sep="-")
    tr.line(
        f"{'executions':>10} {'hooked':>10} {'yields':>8} {'delays':>8} "
        f"{'p50 us':>8} {'p99 us':>8} {'max us':>8}  test"
    )
    for nodeid, st in session.stats:
        tr.line(
            f"{st.get('executions', 0):>10} {st.get('hooked', 0):>10} "
            f"{st.get('yields', 0):>8} {st.get('delays', 0):>8} "
            f"{st.get('round_p50_us', 0):>8.0f} {st.get('round_p99_us', 0):>8.0f} "
            f"{st.get('round_max_us', 0):>8.0f}  {nodeid}"
        )
