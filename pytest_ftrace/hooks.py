"""The plugin's hooks: a thin layer over the modules of this package (plugin.py hands them to
pytest).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from pytest_ftrace import gil, markers, options
from pytest_ftrace.state import ACTIVE_CONFIGS, STATE_KEY, SessionState

if TYPE_CHECKING:  # loaded only in the runs that use them
    from pytest_ftrace.ftrace.session import FtraceSession


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    options.add_options(parser, pluginmanager)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args: list[str]) -> None:
    """`--ftrace-isolate PATH`: the path is a path (rewritten to `--ftrace-isolate=test PATH`
    before pytest parses the command line for good, and before it looks for conftests).
    `--ftrace` in exact mode: schedulable locks from now on, before any conftest or test module
    is imported."""
    _install_locks(early_config, early_config.known_args_namespace)
    if "--ftrace-isolate" not in args:
        return
    before = list(args)
    options.split_isolate_path(args)
    if args != before:
        import copy

        namespace = parser.parse_known_args(args, namespace=copy.copy(early_config.option))
        early_config.known_args_namespace.file_or_dir = namespace.file_or_dir
        early_config.known_args_namespace.ftrace_isolate = namespace.ftrace_isolate


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
    _install_locks(config, config.option)
    state = config.stash[STATE_KEY] = SessionState(settings, peers, gil.Watch())
    ACTIVE_CONFIGS.append(config)
    config.add_cleanup(lambda: ACTIVE_CONFIGS.remove(config))
    if config.option.ftrace:
        from pytest_ftrace.ftrace import session as ftrace
        from pytest_ftrace.ftrace import vclock

        vclock.install()  # before collection imports the test modules
        config.add_cleanup(vclock.uninstall)

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
    if workers is None and _bounds_phases(config, settings):
        from pytest_ftrace import phase_timeout

        phase_timeout.configure(config, settings.timeout)


_LOCKS_KEY = pytest.StashKey[bool]()


def _install_locks(config: pytest.Config, namespace) -> None:
    """Under --ftrace in exact mode, make threading's locks schedulable for the session (once
    per config; undone when the config is cleaned up)."""
    if not getattr(namespace, "ftrace", False) or config.stash.get(_LOCKS_KEY, False):
        return
    mode = getattr(namespace, "ftrace_mode", None)
    if mode is None:
        try:
            mode = str(config.getini("ftrace_mode") or "").strip() or options.DEFAULT_MODE
        except (ValueError, TypeError, pytest.UsageError):
            return  # the usage error comes at configure
    if mode not in ("exact", "explore"):
        return
    from pytest_ftrace.ftrace import locks

    locks.install()
    config.stash[_LOCKS_KEY] = True
    config.add_cleanup(locks.uninstall)


def _bounds_phases(config: pytest.Config, settings: options.Settings) -> bool:
    """Whether --ftrace-timeout bounds every phase of each test: in the sessions that use the
    plugin (a plain run is left as pytest has it)."""
    return bool(
        config.option.ftrace
        or settings.threads != 1
        or settings.iterations != 1
        or config.option.ftrace_timeout is not None
        or options.ini_value(config, "ftrace_timeout")
    )


class _XdistSeed:
    @staticmethod
    def pytest_configure_node(node) -> None:
        from pytest_ftrace.ftrace.session import pytest_configure_node

        pytest_configure_node(node)


class _FtraceClose:
    """Registered with --ftrace only: every hook the plugin has costs each session time."""

    def __init__(self, session: FtraceSession) -> None:
        self.session = session

    def pytest_unconfigure(self) -> None:
        self.session.close()


def _explore(config: pytest.Config) -> bool:
    """Whether --ftrace-mode (or ini ftrace_mode) asks for explore mode (its own default
    thread count); a bad ini value is reported where the mode is resolved."""
    mode = config.option.ftrace_mode
    if mode is None:
        mode = str(options.ini_value(config, "ftrace_mode") or "").strip()
    return mode == "explore"


def _settings(config: pytest.Config) -> options.Settings:
    unsafe = set(markers.BUILTIN_THREAD_UNSAFE)
    unsafe.update(options.ini_value(config, "thread_unsafe_fixtures") or ())
    on = config.option.ftrace
    require = config.option.ftrace_require_gil_disabled
    if require is None:
        require = bool(options.ini_value(config, "ftrace_require_gil_disabled"))
    budget = options.resolve(  # checked whenever given, used when the count is not fixed
        config,
        "ftrace_budget",
        "ftrace_budget",
        options.positive_float("ftrace_budget"),
        options.DEFAULT_BUDGET,
    )
    fixed = (
        not on
        or config.option.ftrace_iterations is not None
        or options.ini_value(config, "ftrace_iterations") is not None
    )
    cap = options.ROUND_CAP
    return options.Settings(
        threads=options.resolve(
            config,
            "ftrace_threads",
            "ftrace_threads",
            options.positive_int_or_auto("ftrace_threads"),
            (options.DEFAULT_EXPLORE_THREADS if _explore(config) else options.DEFAULT_THREADS)
            if on
            else 1,
        ),
        iterations=options.resolve(
            config,
            "ftrace_iterations",
            "ftrace_iterations",
            options.positive_int("ftrace_iterations"),
            cap if on else 1,
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
        budget=None if fixed else budget,
    )


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
    """Rounds each thread runs the body for (rounds by budget: the round cap, the most it runs)."""
    plan = request.node.stash.get(markers.PLAN_KEY, None)
    return plan.iterations if plan is not None and plan.threaded else 1


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_ftrace import _native

    info = _native.build_info()
    state = config.stash[STATE_KEY]
    settings = state.settings
    threads, iterations = settings.threads, settings.iterations
    replay = state.ftrace.replay if state.ftrace is not None else None
    rounds = f"{iterations}"
    if replay is not None:  # a replay runs the token's threads, --ftrace-replay-runs times
        threads, rounds = replay.threads, f"{state.ftrace.replay_runs}"
    elif settings.budget is not None:
        rounds = f"by budget ({settings.budget:g}s, at most {iterations})"
    lines = [
        f"ftrace: threads={threads} iterations={rounds} "
        f"timeout={settings.timeout:g}s, GIL {gil.state()}, "
        f"native {info['version']} (pyo3 {info['pyo3']})"
    ]
    if state.ftrace is not None:
        lines.append(state.ftrace.header())
    import pytest_ftrace

    if pytest_ftrace._STAND_IN is not None:
        lines.append(f"ftrace: {pytest_ftrace._STAND_IN}")
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    state = collector.config.stash[STATE_KEY]
    state.gil.before()
    report = yield
    if report.outcome == "passed":
        message = _bad_marker(collector, report.result, state)
        if message is not None:  # a collection error, like any other one in this collector
            report.outcome = "failed"
            report.longrepr = message
            report.result = []
    message = state.gil.after(collector.nodeid or "collection")
    if message and state.settings.require_gil_disabled and report.outcome != "failed":
        report.outcome = "failed"
        report.longrepr = message
    return report


def _bad_marker(collector: pytest.Collector, nodes: list, state: SessionState) -> str | None:
    """The errors of the collected tests whose markers of ours have wrong arguments, one line
    per test (all of them: fixing one should not reveal the next).

    Checked once per collector: a test is looked at closely only if it, or a node above it,
    carries one of our marker names (most tests have none). A test marked `forked` or
    `ftrace_concurrent` turns on the feature behind the marker for the session."""
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
                markers.check_markers(node, state.peers)
            except markers.MarkerError as exc:
                errors.append(f"{node.name}: {exc}")
                continue
            _enable_for_markers(node, state)
    return "\n".join(errors) if errors else None


def _enable_for_markers(item: pytest.Item, state: SessionState) -> None:
    """Register the runner a feature marker needs, once, when the first test carrying it is
    collected (the runners' hooks are then there for the rest of collection and the run)."""
    for name in markers.FEATURE_MARKERS - state.enabled:
        if item.get_closest_marker(name) is None:
            continue
        state.enabled.add(name)
        if name == "forked" and "pytest_forked" not in state.peers:
            from pytest_ftrace import isolate

            isolate.configure_marked(item.config)
        elif name == "ftrace_concurrent":
            from pytest_ftrace import threadpool

            threadpool.configure_implicit(item.config)


@pytest.hookimpl(tryfirst=True, wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    state = item.config.stash[STATE_KEY]
    plan = markers.plan_for(item, state.settings, state.peers)
    if plan.threaded:  # the plugin's own imports come before the GIL watch looks
        from pytest_ftrace.stress import oneshot, perthread, runner  # noqa: F401
    state.gil.before()  # before the test's fixtures import anything
    item.stash[markers.PLAN_KEY] = plan
    if plan.single_reason is not None:
        state.single.append((item.nodeid, plan.single_reason))
    if not plan.threaded or "unittest" in sys.modules and _is_unittest(item):
        return (yield)
    # Each worker thread builds the test's function fixtures, and only it (perthread.py).
    from pytest_ftrace.stress import perthread

    perthread.prefill(item)
    result = yield
    threads, iterations = plan.threads, plan.iterations
    ftrace = state.ftrace
    if ftrace is not None and ftrace.mode != "chaos" and ftrace.rounds != "process":
        return result  # forked rounds: each round's process builds its threads' fixtures
    if ftrace is not None and ftrace.replay is not None:
        if ftrace.replay_nodeid in (None, item.nodeid):  # as ftrace.TestSession runs it
            threads, iterations = ftrace.replay.threads, ftrace.replay_runs
    reason = perthread.start_crew(item, threads, iterations, state.settings.timeout)
    if reason is not None:  # a fixture entered a process-wide facility: one thread
        item.stash[markers.PLAN_KEY] = markers.Plan(1, 1, reason)
        state.single.append((item.nodeid, reason))
    return result


def _is_unittest(item: pytest.Item) -> bool:
    from pytest_ftrace.stress.perthread import is_unittest

    return is_unittest(item)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    plan = item.stash.get(markers.PLAN_KEY, None)
    if plan is None or not plan.threaded:
        return (yield)
    state = item.config.stash[STATE_KEY]
    original = item.obj
    threaded = _threaded(item, original, plan, state)
    if threaded.ftrace_context is not None:  # unittest: each thread runs its own instance
        item.runtest = threaded  # pytest's runtest would run setUp/tearDown on its own one
        try:
            return (yield)
        finally:
            del item.runtest
    item.obj = threaded
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

    from pytest_ftrace import report
    from pytest_ftrace.stress import oneshot, perthread, runner

    # unittest: each thread makes its own instance (perthread.UnitTestThread)
    context = None if takes_fixtures else (lambda _index: perthread.UnitTestThread(item))

    def run_in_threads(*args, **kwargs):
        __tracebackhide__ = True
        # Every step of the plugin's own machinery on this side (starting the test's
        # instrumentation, activating it, supervising, reporting) is guarded the same way as
        # in the workers: an exception there fails the test as an internal error of
        # pytest-ftrace, never lets it pass. Ctrl-C and pytest.exit go on as they are.
        step = "starting the threaded run"
        try:
            threads, iterations, hooks = plan.threads, plan.iterations, runner.Hooks()
            traced = None
            if state.ftrace is not None:
                traced = state.ftrace.start(item, threads, iterations, plan.budget)
                step = "setting up --ftrace for the test"
                threads, iterations, hooks = traced.threads, traced.iterations, traced.hooks()
            run = runner.ThreadedRun(
                item,
                original,
                threads,
                iterations,
                state.settings.timeout,
                hooks=hooks,
                takes_fixtures=takes_fixtures,
                crew=perthread.take_crew(item, threads) if takes_fixtures else None,
                context=context,
                watch=oneshot.watch_for(threads),
                go_on=traced.go_on if traced is not None and traced.budget else None,
            )
            if traced is None:
                step = "the threaded run"
                outcome = oneshot.run(run)
            else:
                from pytest_ftrace.ftrace import fork

                in_process = fork.reason_not_to_fork(item, traced)
                if in_process is None:  # each round in a child forked from here
                    if traced.session.rounds != "snapshot":  # (its rounds start here)
                        run.watch = None  # the one-thread fallback watches rounds in this process
                    step = "activating --ftrace"
                    traced.run.activate(watchdog=False)
                    try:
                        step = "the threaded run"
                        if traced.session.rounds == "snapshot":  # the default
                            from pytest_ftrace.ftrace import snapshot

                            outcome = snapshot.run_rounds(traced, run)
                        else:
                            outcome = fork.run_rounds(traced, run)
                    finally:
                        step = "deactivating --ftrace"
                        traced.run.deactivate()
                else:
                    step = "activating --ftrace"
                    traced.run.activate()
                    try:
                        step = "the threaded run"
                        outcome = oneshot.run(run)
                    finally:
                        step = "deactivating --ftrace"
                        traced.run.deactivate()
                    fork.note_in_process(outcome, in_process)
                step = "the --ftrace report"
                try:
                    traced.finish(outcome)
                except runner.STOPPING:
                    raise
                except BaseException as exc:  # noqa: BLE001 - keep the results, fail the test
                    outcome.failures.append(
                        report.Failure(None, None, report.internal_error(step, exc), "internal")
                    )
                finally:
                    if traced.snapshot is not None:  # its shrink attempts are over
                        traced.snapshot.close()
            if run.watch is not None and run.watch.reason is not None:
                step = "the run on one thread"
                state.single.append((item.nodeid, run.watch.reason))
                outcome = oneshot.once(run)
        except runner.STOPPING:
            raise
        except BaseException as exc:  # noqa: BLE001 - the machinery's: fails the test
            raise report.internal_error(step, exc) from None
        report.raise_outcome(outcome)

    run_in_threads.__name__ = getattr(original, "__name__", "test")
    run_in_threads.ftrace_body = (original, takes_fixtures)  # exact mode re-runs it to shrink
    run_in_threads.ftrace_context = context
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


_KIND_HEADER = f" {'access':>9} {'gen':>7} {'iter':>7} {'gen-code':>8}"


def _kinds(st: dict) -> str:
    """The hooked events of one test by kind (ftrace/genpoints.py), for the stats table."""
    gen, it = st.get("generator_points", 0), st.get("iteration_points", 0)
    access = st.get("hooked", 0) - gen - it
    return f" {access:>9} {gen:>7} {it:>7} {st.get('generated_code', 0):>8}"


def ftrace_summary(tr, session: FtraceSession, verbose: int) -> None:
    for note in session.notes:
        tr.line(note, yellow=True)
    for nodeid, reproduced, runs in session.replays:
        tr.line(f"ftrace replay: {nodeid}: reproduced {reproduced}/{runs}")
    if session.budgets:
        from pytest_ftrace.ftrace.budget import summary

        tr.line(summary(session.budgets))
    for nodeid, line in session.explored:
        tr.line(f"ftrace explore: {nodeid}: {line}")
    if session.race_reports:
        from pytest_ftrace.ftrace.explain import summary

        summary(tr, session.race_reports)
    if verbose <= 0 or not session.stats:
        return
    tr.section(f"ftrace statistics (seed {session.seed})", sep="-")
    serial = ("exact", "explore")
    exact = [(nodeid, st) for nodeid, st in session.stats if st.get("mode") in serial]
    chaos = [(nodeid, st) for nodeid, st in session.stats if st.get("mode") not in serial]
    if exact:
        tr.line("exact mode: points = scheduling points (the scheduler chose who goes on);")
        tr.line("  hand-overs = points where another thread went on; preempt = hand-overs away")
        tr.line("  from a thread that could have gone on; waits = blocking waits of the threads")
        tr.line("  (locks, conditions, joins, sleeps)")
        tr.line(
            f"{'executions':>10} {'rounds':>6} {'points':>9} {'hand-overs':>10} {'preempt':>8} "
            f"{'waits':>7} {'p50 us':>8} {'p99 us':>8} {'max us':>8}{_KIND_HEADER}  test"
        )
        for nodeid, st in exact:
            tr.line(
                f"{st.get('executions', 0):>10} {st.get('rounds', 0):>6} "
                f"{st.get('points', 0):>9} {st.get('handovers', 0):>10} "
                f"{st.get('preemptions', 0):>8} {st.get('waits', 0):>7} "
                f"{st.get('round_p50_us', 0):>8.0f} {st.get('round_p99_us', 0):>8.0f} "
                f"{st.get('round_max_us', 0):>8.0f}{_kinds(st)}  {nodeid}"
            )
    if chaos:
        tr.line(
            f"{'executions':>10} {'hooked':>10} {'yields':>8} {'delays':>8} "
            f"{'p50 us':>8} {'p99 us':>8} {'max us':>8}{_KIND_HEADER}  test"
        )
        for nodeid, st in chaos:
            tr.line(
                f"{st.get('executions', 0):>10} {st.get('hooked', 0):>10} "
                f"{st.get('yields', 0):>8} {st.get('delays', 0):>8} "
                f"{st.get('round_p50_us', 0):>8.0f} {st.get('round_p99_us', 0):>8.0f} "
                f"{st.get('round_max_us', 0):>8.0f}{_kinds(st)}  {nodeid}"
            )
    tr.line("hooked events by kind: access = shared-state accesses, gen = generator and")
    tr.line("  coroutine suspensions, iter = loop steps over a dict, list, set or deque;")
    tr.line("  gen-code = code objects compiled at run time that were hooked")
