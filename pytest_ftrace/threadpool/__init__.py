"""--threadpool N|auto: run distinct tests concurrently in worker threads of one process.

I/O-bound suites get faster on any build, CPU-bound ones on free-threaded builds; unlike
pytest-xdist, tests share one process, so state that cannot be pickled (locks, connections,
caches) can be shared between them.

Which tests run concurrently
----------------------------
Only tests that are marked. ``@parallelizable(scope)`` (or ``pytest.mark.parallelizable(scope)``)
goes on a test function, a class, a module (``pytestmark``) or a package (``pytestmark`` in its
``__init__.py``); ``@not_parallelizable`` opts out. The scope says which tests below the marked
node may run at the same time:

- ``"children"``: every test below the marked node may run concurrently with every other test
  below it (each parametrized variant is a test of its own, so variants are included).
- ``"parameters"``: only the parametrized variants of one test function run concurrently with
  each other; different functions run one after another. Unparametrized tests run alone.
- ``"all"``: both. On a class, module or package this is the same as ``"children"``.

On a test function all three scopes mean the same: the function's children are its
parametrized variants, and they run concurrently with each other (not with other functions; to
let those run together, mark their class or module).

Which marker counts: ``not_parallelizable`` on the test or on any node above it wins; otherwise
the most specific ``parallelizable`` marker decides: the test's own, then its class (innermost
first), then its module, then its packages (innermost first), then the session default
(``--ftrace-threadpool-default`` or the ini key ``ftrace_threadpool_default``: ``none``,
``children``, ``parameters`` or ``all``; a default of ``children`` makes every test
parallelizable). An unknown scope is a usage error (exit code 4) that names the node.

The order of the session is kept: consecutive tests that may run together form a group, and an
unmarked test between them runs on its own, in its place, after the tests before it have ended
and before the tests after it start. A group is run as *waves*: consecutive tests with the same
parent (class or module) and the same values of parametrized wider-scope fixtures. A wave's
tests run concurrently on up to N worker threads; the next wave starts when it has ended.

Some marked tests still run on their own, because they need something that belongs to the whole
process: tests that use ``capfd``, ``capfdbinary`` or ``capteesys``, tests with a
``filterwarnings`` mark, tests that are not plain functions (unittest, doctest), and tests
that parametrize a fixture with a scope other than the fixture's own.

Fixtures
--------
Before a wave, the main thread sets up, once and in order, its collectors (session, packages,
module, class) and every fixture of the wave's tests that is wider than the function (class,
module, package, session); they are torn down after the wave, as far as the next test does not
need them. Function-scoped fixtures (and class-scoped ones used outside a class) are set up,
used and torn down by the worker, per test: two tests running at the same time get two values.
An error in any fixture is reported against each test that uses it.

Capture
-------
Each test's writes to ``sys.stdout`` and ``sys.stderr``, its log records and its warnings are
captured per thread and shown with that test's report; ``capsys``, ``capsysbinary`` and
``caplog`` see only their own test. Output of threads a test starts itself, and output written
to file descriptors 1 and 2 directly, is not captured. With ``-s`` the output is shown live,
interleaved.

Reports, timeouts
-----------------
The main thread reports each test as it ends (terminal progress, --junitxml, --lf, -x all see
ordinary reports). With -x (or --maxfail) no new test is started after the failure; tests that
are running finish and are reported, the others are counted as not run. A test that runs longer
than ``--ftrace-timeout`` seconds (ini ``ftrace_timeout``, default 300) fails with its worker's
stack; the worker thread is abandoned (daemon, listed as leaked at the end) and the session goes
on.

Limits: ``monkeypatch``, environment variables, the working directory, logger levels set by
``caplog.set_level`` and ``--pdb`` are process-wide; tests that change them should be marked
``not_parallelizable``. Hooks that wrap ``pytest_runtest_protocol`` (e.g. pytest-timeout,
pytest-rerunfailures, the faulthandler timeout) do not run for tests run by workers.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse

import pytest

from pytest_ftrace import options
from pytest_ftrace.threadpool import plan as planning

__all__ = ["parallelizable", "not_parallelizable"]


def parallelizable(scope: str = "all") -> pytest.MarkDecorator:
    """Let tests below the marked node run concurrently under --threadpool.

    scope: "children" (all tests below the node), "parameters" (the parametrized variants of
    each test function) or "all" (both).
    """
    if scope not in planning.SCOPES:
        raise ValueError(
            f"unknown parallelizable scope {scope!r}; use one of {', '.join(planning.SCOPES)}"
        )
    return pytest.mark.parallelizable(scope)


not_parallelizable: pytest.MarkDecorator = pytest.mark.not_parallelizable
"""Run the marked tests one at a time, whatever the markers above them say."""


def _default_scope(what: str):
    def parse(value: str) -> str:
        value = str(value).strip()
        if value not in planning.DEFAULT_SCOPES:
            raise argparse.ArgumentTypeError(
                f"{what} must be one of {', '.join(planning.DEFAULT_SCOPES)}, not {value!r}"
            )
        return value

    parse.__name__ = what
    return parse


parse_default_scope = _default_scope("--ftrace-threadpool-default")


def configure(config: pytest.Config, workers: int, implicit: bool = False) -> None:
    """Validate the options and register the threadpool runner (called from pytest_configure
    when --threadpool is on: options.threadpool_workers)."""
    default = options.resolve(
        config,
        "ftrace_threadpool_default",
        "ftrace_threadpool_default",
        _default_scope("ftrace_threadpool_default"),
        "none",
    )
    timeout = options.resolve(
        config,
        "ftrace_timeout",
        "ftrace_timeout",
        options.positive_float("ftrace_timeout"),
        options.DEFAULT_TIMEOUT,
    )
    # Imported here, with the plugins, rather than when the test loop starts.
    from pytest_ftrace.threadpool import fixtures as threadpool_fixtures
    from pytest_ftrace.threadpool import runner as threadpool_runner  # noqa: F401

    plugin = ThreadpoolPlugin(workers, timeout, default, implicit)
    config.pluginmanager.register(plugin, "ftrace-threadpool")
    config.pluginmanager.register(threadpool_fixtures, "ftrace-threadpool-fixtures")


def configure_implicit(config: pytest.Config) -> None:
    """Turn the thread pool on for the tests that generate_tests made (pytest-threaded's API),
    which run concurrently without any option. Called at collection, when the first of them is
    found; nothing to do when --threadpool is on already. Under --ftrace-isolate, under
    pytest-xdist, or with --collect-only they run one after another."""
    manager = config.pluginmanager
    if manager.has_plugin("ftrace-threadpool") or config.getoption("collectonly", False):
        return
    if manager.has_plugin("ftrace-isolate") or options.isolate_requested(config):
        return
    if manager.hasplugin("dsession") or hasattr(config, "workerinput"):
        return
    configure(config, implicit_workers(), implicit=True)


def implicit_workers() -> int:
    """As many workers as concurrent.futures.ThreadPoolExecutor has by default (pytest-threaded
    ran its tests in one): a few more than the CPUs, for tests that wait on each other or on
    I/O."""
    return min(32, options.usable_cpus() + 4)


class ThreadpoolPlugin:
    """The hooks of --threadpool, registered only when it is given."""

    def __init__(self, workers: int, timeout: float, default: str, implicit: bool = False) -> None:
        self.workers = workers
        self.implicit = implicit  # on for generate_tests' tests only (configure_implicit)
        self.timeout = timeout
        self.default = default
        self.runner = None
        self.decisions: dict = {}

    def pytest_report_header(self) -> list[str]:
        return [
            f"ftrace threadpool: {self.workers} workers, timeout {self.timeout:g} s, "
            f"default scope {self.default}"
        ]

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.decisions = planning.validate(items, self.default)
        if self.implicit:
            # Turned on for generate_tests' tests only: without --threadpool, the
            # parallelizable markers stay inert, as pytest-threadpool's are without its option.
            unmarked = planning.Decision(None, "unmarked", "")
            for item, decision in self.decisions.items():
                if decision.level != "concurrent":
                    self.decisions[item] = unmarked

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        from pytest_ftrace.threadpool.runner import Runner

        config = session.config
        if config.pluginmanager.hasplugin("dsession") or hasattr(config, "workerinput"):
            return None  # pytest-xdist schedules the tests (-n with --threadpool: xdist wins)

        self.runner = Runner(session, self.workers, self.timeout, self.default, self.decisions)
        return self.runner.run()

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.runner is None:
            return
        outcome = self.runner.outcome
        write = terminalreporter.write_line
        marked = sum(1 for d in self.decisions.values() if d.scope is not None)
        if self.decisions and not marked:
            # Nothing to run side by side: the run was serial, which the header alone does not say.
            write(
                f"ftrace threadpool: 0 of {len(self.decisions)} tests are marked parallelizable; "
                "see --threadpool in the README",
                yellow=True,
            )
        if outcome.not_run:
            write(f"ftrace threadpool: {outcome.not_run} tests not run (the session stopped)")
        for leak in outcome.leaked:
            write(
                f"ftrace threadpool: leaked worker thread {leak.thread_name}, still in the "
                f"{leak.phase} of {leak.nodeid} after the timeout",
                yellow=True,
            )

    def pytest_unconfigure(self) -> None:
        if self.runner is not None:
            self.runner.close()
