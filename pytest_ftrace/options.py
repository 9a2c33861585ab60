"""Command-line options and ini keys, and how their values are parsed and resolved.

Some names we would like (`--threads`, `--iterations`, ...) are also defined by peer plugins.
pytest cannot hold two options of one name, so such a name is registered only when no installed
plugin has taken it; every option also has an `--ftrace-` spelling that is always there.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import os
import re

import pytest

DEFAULT_TIMEOUT = 300.0
# --ftrace (ftrace.py re-exports these; the help texts below need them without importing it)
DEFAULT_THREADS = 4
DEFAULT_ITERATIONS = 40
DEFAULT_REPLAY_RUNS = 10
# Unless the round count is fixed (--iterations, ini ftrace_iterations, a marker), a test runs
# rounds until this many seconds of rounds, or ROUND_CAP rounds, whichever comes first; one
# whose first PROBE_ROUNDS rounds touch nothing from two threads stops there; one that does
# runs at least MIN_ROUNDS, the fixed count the default was before (ftrace/budget.py).
DEFAULT_BUDGET = 1.0
MIN_ROUNDS = DEFAULT_ITERATIONS
ROUND_CAP = 200  # benches/budget.md: the mix finds every corpus race by round 8
PROBE_ROUNDS = 4
DEFAULT_SHRINK_SECONDS = 10.0  # a safety bound: the count of candidates ends a search first
# Exact mode, mix policy: about this many hand-overs between threads in a long round (each
# wakes an OS thread; short rounds keep a hand-over chance of 1/2 at every point).
DEFAULT_SWITCH_BUDGET = 48
MODES = ("chaos", "exact", "explore")
# --ftrace-mode explore: the preemption bound, and the budget (executions, seconds) per test.
DEFAULT_BOUND = 2
MAX_BOUND = 1000
DEFAULT_EXPLORE_ROUNDS = 20000
DEFAULT_EXPLORE_SECONDS = 60.0
# Explore's thread count when --threads is not given: two. A race between two threads is the
# common case and its space stays searchable; each thread more multiplies the interleavings
# within the bound (with four, a 40-operation test does not finish one preemption's pass in
# the budget). Ask for more with --threads.
DEFAULT_EXPLORE_THREADS = 2
DEFAULT_MODE = "exact"

# Names that installed peer plugins (by pytest11 entry-point name) define themselves.
PEER_NAMES: dict[str, frozenset[str]] = {
    "run-parallel": frozenset({"--parallel-threads", "--iterations", "thread_unsafe_fixtures"}),
    "freethreaded": frozenset({"--threads", "--iterations", "--require-gil-disabled"}),
    "threadpool": frozenset({"--threadpool", "threadpool"}),
    # pytest-forked has no --forked-subprocess; it is ours only as a spelling of --forked.
    "pytest_forked": frozenset({"--forked", "--forked-subprocess"}),
}


# The distribution each peer plugin comes in, and the top-level module its plugin is in.
PEER_DISTRIBUTIONS = {
    "run-parallel": ("pytest-run-parallel", "pytest_run_parallel"),
    "freethreaded": ("pytest-freethreaded", "pytest_freethreaded"),
    "threadpool": ("pytest-threadpool", "pytest_threadpool"),
    "pytest_forked": ("pytest-forked", "pytest_forked"),
}


@functools.cache
def installed_peers() -> frozenset[str]:
    """Entry-point names of the installed peer plugins, once per process (pytester runs many
    sessions in one).

    A peer whose module cannot be found cannot be loaded either: that check reads the import
    system's cached directory listings. Only then is its distribution looked up, by name. A
    lookup costs about 0.4 ms per name even when nothing is found, and reading every
    distribution's entry points would cost in proportion to the size of the environment."""
    found = set()
    for peer in PEER_NAMES:
        dist_name, module = PEER_DISTRIBUTIONS[peer]  # every peer needs both here
        try:
            if importlib.util.find_spec(module) is None:
                continue
            eps = importlib.metadata.distribution(dist_name).entry_points
        except Exception:  # not installed, or broken: it must not break option parsing
            continue
        if any(ep.group == "pytest11" and ep.name == peer for ep in eps):
            found.add(peer)
    return frozenset(found)


def active_peers(pluginmanager: pytest.PytestPluginManager) -> set[str]:
    """Peer plugins that are installed (or registered) and not disabled with -p no:NAME."""
    found = {name for name in installed_peers() if not pluginmanager.is_blocked(name)}
    for name in PEER_NAMES:
        if pluginmanager.has_plugin(name):
            found.add(name)
    return found


def taken_names(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> set[str]:
    """Option and ini names we must not register: already defined, or owned by a peer.

    Read once per session: our own names do not clash with each other."""
    taken: set[str] = set(parser._inidict)
    for group in [parser._anonymous, *parser._groups]:
        for option in group.options:
            taken.update(option.names())
    for peer in active_peers(pluginmanager):
        taken |= PEER_NAMES[peer]
    return taken


# The limits every number the plugin takes is checked against, wherever it comes from (option,
# ini key, marker, cache, replay token): beyond them a value cannot be what the user meant, or
# does not fit the native core (its thread ids and counts are u32, its rounds and steps u64).
MAX_THREADS = 1024  # threads of a test, and --threadpool workers
MAX_ROUNDS = 10**9  # rounds of a test (--iterations, --ftrace-replay-runs)
ROUNDS_WHERE = ("snapshot", "fork", "fork-each", "process")  # --ftrace-rounds
DEFAULT_ROUNDS = "snapshot"  # every round from the test's starting state (issue 14)
MAX_SECONDS = 1e9  # --ftrace-timeout, --ftrace-shrink: about 31 years, far below the OS limits
U32 = 2**32 - 1
U64 = 2**64 - 1


def check_whole(value, what: str, low: int, high: int, *, auto: bool = False) -> int:
    """The one parser of whole numbers: `value` (text from the command line or an ini file, or
    an int from a TOML file, a marker or the cache) as an int in low..high, or 'auto' (the
    usable CPUs) where `auto`. Anything else raises argparse.ArgumentTypeError naming `what`.

    Decimal, with leading zeros allowed (010 is ten); 0x, 0o and 0b prefixes are read as such."""
    expected = f"a whole number >= {low}" if high is None else _between(low, high)
    if auto:
        expected += " or 'auto'"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise argparse.ArgumentTypeError(f"{what} must be {expected}, not {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if auto and text == "auto":
            return min(usable_cpus(), high) if high is not None else usable_cpus()
        number = _whole(text)
        if number is None:
            raise argparse.ArgumentTypeError(f"{what} must be {expected}, not {value!r}")
    else:
        number = value
    if number < low:
        raise argparse.ArgumentTypeError(f"{what} must be >= {low}, not {number}")
    if high is not None and number > high:
        raise argparse.ArgumentTypeError(f"{what} must be <= {high}, not {number}")
    return number


def _between(low: int, high: int) -> str:
    return f"a whole number from {low} to {high}"


def _whole(text: str) -> int | None:
    if len(text) > 100:  # int() of a long digit string is slow, and nothing that long fits
        return None
    try:
        return int(text, 10)
    except ValueError:
        pass
    if re.fullmatch(r"[+-]?0[xXoObB][0-9a-fA-F_]+", text):
        try:
            return int(text, 0)
        except ValueError:
            return None
    return None


def check_real(value, what: str, low: float, high: float, *, low_open: bool = False) -> float:
    """The one parser of real numbers: finite, in low..high (above low where `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise argparse.ArgumentTypeError(f"{what} must be a number, not {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{what} must be a finite number, not {value!r}")
    if low_open and not number > low:
        raise argparse.ArgumentTypeError(f"{what} must be > {low:g}, not {value}")
    if not number >= low:
        raise argparse.ArgumentTypeError(f"{what} must be >= {low:g}, not {value}")
    if number > high:
        raise argparse.ArgumentTypeError(f"{what} must be <= {high:g}, not {value}")
    return number


def whole(what: str, low: int = 1, high: int | None = None, *, auto: bool = False):
    """An argparse type (and ini parser): check_whole with these bounds."""

    def parse(value) -> int:
        return check_whole(value, what, low, high, auto=auto)

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def real(what: str, low: float = 0.0, high: float = MAX_SECONDS, *, low_open: bool = True):
    """An argparse type (and ini parser): check_real with these bounds."""

    def parse(value) -> float:
        return check_real(value, what, low, high, low_open=low_open)

    parse.__name__ = what
    return parse


def positive_int_or_auto(what: str):
    """A thread count: a whole number from 1 to MAX_THREADS, or 'auto' (the usable CPUs)."""
    return whole(what, 1, MAX_THREADS, auto=True)


def positive_int(what: str, high: int = MAX_ROUNDS):
    return whole(what, 1, high)


def positive_float(what: str, high: float = MAX_SECONDS):
    return real(what, 0.0, high, low_open=True)


def usable_cpus() -> int:
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def lazy_type(module: str, name: str, what: str):
    """An argparse type that imports `module` and calls its `name` when the option is given.

    pytest imports the plugin and registers its options in every run; the modules behind
    --ftrace, --threadpool and --ftrace-isolate load only in runs that use them."""

    def parse(value: str):
        import importlib

        return getattr(importlib.import_module(module), name)(value)

    parse.__name__ = what
    return parse


class _Registrar:
    """Registers options and ini keys, leaving out the aliases another plugin has taken."""

    def __init__(self, parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager):
        self.parser = parser
        self.group = parser.getgroup("ftrace", "thread-safety testing (pytest-ftrace)")
        self.taken = taken_names(parser, pluginmanager)

    def option(self, canonical: str, *aliases: str, **kwargs) -> None:
        names = [canonical, *(alias for alias in aliases if alias not in self.taken)]
        self.group.addoption(*names, **kwargs)

    def ini(self, name: str, help: str, **kwargs) -> None:
        if name not in self.taken:
            self.parser.addini(name, help, **kwargs)


class _Recording:
    """A registrar that also notes the dest of each option and the name of each ini key."""

    def __init__(self, add: _Registrar, dests: set[str], inis: set[str]):
        self.add, self.dests, self.inis = add, dests, inis

    def option(self, canonical: str, *aliases: str, **kwargs) -> None:
        self.dests.add(kwargs["dest"])
        self.add.option(canonical, *aliases, **kwargs)

    def ini(self, name: str, help: str, **kwargs) -> None:
        self.inis.add(name)
        self.add.ini(name, help, **kwargs)


def add_options(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Every option and ini key of the plugin (its pytest_addoption)."""
    add = _Registrar(parser, pluginmanager)
    _add_runner_options(add)
    _add_ftrace_options(add)
    _add_threadpool_options(add)
    _add_isolate_options(add)


def _add_runner_options(add: _Registrar) -> None:
    add.option(
        "--ftrace",
        action="store_true",
        default=False,
        help="run each test body in several threads and steer their interleaving at "
        "shared-state accesses so races fail every run. Exact mode (the default) runs one "
        "thread at a time and a seeded scheduler picks who goes on at every access, so a "
        "failure replays exactly; chaos mode lets the threads run free and injects seeded "
        "yields and delays (finds races inside native code). See --ftrace-mode",
    )
    add.option(
        "--ftrace-threads",
        "--threads",
        "--parallel-threads",
        dest="ftrace_threads",
        type=positive_int_or_auto("--threads"),
        default=None,
        metavar="N|auto",
        help="run each test body in N threads at once (auto: usable CPUs). ini: ftrace_threads",
    )
    add.option(
        "--ftrace-iterations",
        "--iterations",
        "--executions",
        dest="ftrace_iterations",
        type=positive_int("--iterations"),
        default=None,
        metavar="M",
        help="rounds per test; each thread runs the body once per round. ini: ftrace_iterations",
    )
    add.option(
        "--ftrace-require-gil-disabled",
        "--require-gil-disabled",
        dest="ftrace_require_gil_disabled",
        action="store_true",
        default=None,
        help="refuse a build whose GIL is on, and fail the run if a module re-enables it. "
        "ini: ftrace_require_gil_disabled",
    )
    add.option(
        "--ftrace-timeout",
        dest="ftrace_timeout",
        type=positive_float("--ftrace-timeout"),
        default=None,
        metavar="SECONDS",
        help="bound each test's threaded execution; on expiry the test fails with every "
        f"thread's stack (default {DEFAULT_TIMEOUT:g}). ini: ftrace_timeout",
    )
    add.ini("ftrace_threads", "threads per test (N or auto)", default="")
    add.ini("ftrace_iterations", "rounds per test", default="")
    add.ini("ftrace_require_gil_disabled", "refuse a GIL-enabled build", type="bool")
    add.ini("ftrace_timeout", "seconds a test's threaded execution may take", default="")
    add.ini(
        "thread_unsafe_fixtures",
        "fixtures that make a test run on one thread (added to the built-in list)",
        type="linelist",
        default=[],
    )


# Options (by dest) and ini keys that only mean something with --ftrace: all those
# _add_ftrace_options registers.
FTRACE_ONLY: set[str] = set()
FTRACE_ONLY_INI: set[str] = set()


def _add_ftrace_options(add: _Registrar) -> None:
    ftrace = "pytest_ftrace.ftrace.session"
    add = _Recording(add, FTRACE_ONLY, FTRACE_ONLY_INI)
    add.option(
        "--ftrace-seed",
        "--seed",
        dest="ftrace_seed",
        default=None,
        type=lazy_type(ftrace, "parse_seed_option", "--seed"),
        metavar="N|last|random",
        help="session seed for --ftrace: a whole number, 'last' (the previous run's, from the "
        "pytest cache) or 'random' (default). ini: ftrace_seed",
    )
    add.option(
        "--ftrace-include",
        action="append",
        dest="ftrace_include",
        default=None,
        metavar="GLOB",
        help="module glob to instrument as well (repeatable). ini: ftrace_include",
    )
    add.option(
        "--ftrace-exclude",
        action="append",
        dest="ftrace_exclude",
        default=None,
        metavar="GLOB",
        help="module glob never to instrument (repeatable; for code compiled at run time it "
        "also matches the file name, e.g. '<generated*'). ini: ftrace_exclude",
    )
    add.option(
        "--ftrace-replay",
        dest="ftrace_replay",
        default=None,
        type=lazy_type(ftrace, "parse_token", "--ftrace-replay"),
        metavar="TOKEN",
        help="re-run the failing round a replay: line names (TOKEN, e.g. t4i0k200x1a2b3c), or "
        "'last': the last failure recorded in the pytest cache; reports how often it failed",
    )
    add.option(
        "--ftrace-replay-runs",
        dest="ftrace_replay_runs",
        default=DEFAULT_REPLAY_RUNS,
        type=positive_int("--ftrace-replay-runs"),
        metavar="K",
        help=f"how many times --ftrace-replay re-runs the round (default {DEFAULT_REPLAY_RUNS})",
    )
    add.option(
        "--ftrace-policy",
        action="append",
        dest="ftrace_policy",
        default=None,
        type=lazy_type(ftrace, "parse_policy_item", "--ftrace-policy"),
        metavar="KEY=VALUE",
        help="tune the injection (repeatable): yield_probability, delay_probability, "
        "sleep_share, max_spin_ns, max_sleep_us. ini: ftrace_policy",
    )
    add.option(
        "--ftrace-mode",
        dest="ftrace_mode",
        default=None,
        choices=MODES,
        help="exact: run the threads one at a time and choose who goes on at every hooked "
        "access (replays exactly); chaos: free-running threads with injected yields and delays; "
        "explore: run every interleaving within --ftrace-bound preemptions, one per round, "
        "leaving out reorderings of independent steps "
        f"(default {DEFAULT_MODE}). ini: ftrace_mode",
    )
    add.option(
        "--ftrace-bound",
        dest="ftrace_bound",
        default=None,
        type=whole("--ftrace-bound", 0, MAX_BOUND),
        metavar="N",
        help="explore mode: the most preemptions an explored interleaving makes (a switch away "
        f"from a thread that could go on; default {DEFAULT_BOUND}). Explore runs "
        f"{DEFAULT_EXPLORE_THREADS} threads unless --threads says otherwise: each thread more "
        "multiplies the interleavings to search",
    )
    add.option(
        "--ftrace-explore-rounds",
        dest="ftrace_explore_rounds",
        default=None,
        type=positive_int("--ftrace-explore-rounds"),
        metavar="M",
        help="explore mode: the most executions (rounds) per test; a test with more "
        f"interleavings says how far it got (default {DEFAULT_EXPLORE_ROUNDS})",
    )
    add.option(
        "--ftrace-explore-seconds",
        dest="ftrace_explore_seconds",
        default=None,
        type=positive_float("--ftrace-explore-seconds"),
        metavar="SECONDS",
        help="explore mode: the most time per test spent exploring (default "
        f"{DEFAULT_EXPLORE_SECONDS:g}; --ftrace-timeout still bounds the whole run)",
    )
    add.option(
        "--ftrace-scheduler",
        dest="ftrace_scheduler",
        default=None,
        type=lazy_type(ftrace, "parse_scheduler", "--ftrace-scheduler"),
        metavar="mix[B]|random|pct[D]|aligned[P]",
        help="exact mode's policy: mix (default: each round draws aligned, random or pct3, "
        f"with about B hand-overs in a long round, default {DEFAULT_SWITCH_BUDGET}), "
        "random (uniform), pct (PCT with depth D, default 3), aligned (threads kept abreast; "
        "the one at a point goes on with P percent, default 50). ini: ftrace_scheduler",
    )
    add.option(
        "--ftrace-shrink",
        dest="ftrace_shrink",
        default=DEFAULT_SHRINK_SECONDS,
        type=real("--ftrace-shrink", 0.0, MAX_SECONDS, low_open=False),
        metavar="SECONDS",
        help="exact mode: after a failure, search this long for a schedule with fewer "
        f"preemptions that fails the same way (default {DEFAULT_SHRINK_SECONDS:g}; 0: off)",
    )
    add.option(
        "--ftrace-races",
        dest="ftrace_races",
        default="report",
        choices=("off", "report", "fail"),
        help="exact mode: conflicting accesses (two threads, one location, at least one write, "
        "not ordered by a lock, queue or thread start/join) explain a failure; in a test that "
        "passes they are listed under 'data races' (report, the default) or fail it (fail)",
    )
    add.option(
        "--ftrace-rounds",
        dest="ftrace_rounds",
        default=None,
        choices=ROUNDS_WHERE,
        help="where exact mode runs each round (and each replay run and shrink attempt): "
        "snapshot (the default: every round starts from the test's starting state; rounds run "
        "in this process while they leave the project's module state as they found it, the "
        "rest in children of a process forked at the start of the test's call), "
        "process (this process, a round sees the state earlier rounds left), fork "
        "(in a child process forked at the start of the test's call, where os.fork exists, so "
        "every round starts from the test's starting state; a child whose round left the "
        "project's module state unchanged runs the next round too) "
        "or fork-each (a new child for every round). ini: ftrace_rounds",
    )
    add.option(
        "--ftrace-budget",
        dest="ftrace_budget",
        default=None,
        type=positive_float("--ftrace-budget"),
        metavar="SECONDS",
        help=f"seconds of rounds per test (default {DEFAULT_BUDGET:g}): a test runs rounds until "
        f"this time (but at least {MIN_ROUNDS} rounds) or {ROUND_CAP} rounds, and one whose "
        f"first {PROBE_ROUNDS} rounds touch nothing from two threads stops there; --iterations "
        "(or a marker) fixes the count instead. ini: ftrace_budget",
    )
    add.ini("ftrace_budget", "seconds of rounds per test (--ftrace-budget)", default="")
    add.ini("ftrace_rounds", "snapshot, fork, fork-each or process (--ftrace-rounds)", default="")
    add.ini("ftrace_mode", "exact, chaos or explore (--ftrace-mode)", default="")
    add.ini(
        "ftrace_scheduler", "exact mode's policy: mix[B], random, pct[D] or aligned[P]", default=""
    )
    add.ini("ftrace_policy", "injection policy, KEY=VALUE per line", type="linelist")
    add.ini("ftrace_seed", "session seed for --ftrace (N, last or random)", default="")
    add.ini("ftrace_include", "module globs to instrument as well", type="linelist")
    add.ini("ftrace_exclude", "module globs never to instrument", type="linelist")


def _add_threadpool_options(add: _Registrar) -> None:
    add.option(
        "--ftrace-threadpool",
        "--threadpool",
        dest="ftrace_threadpool",
        type=positive_int_or_auto("--threadpool"),
        default=None,
        metavar="N|auto",
        help="run tests marked parallelizable concurrently in N worker threads "
        "(auto: usable CPUs). ini: ftrace_threadpool",
    )
    add.option(
        "--ftrace-threadpool-default",
        dest="ftrace_threadpool_default",
        type=lazy_type(
            "pytest_ftrace.threadpool", "parse_default_scope", "--ftrace-threadpool-default"
        ),
        default=None,
        metavar="SCOPE",
        help="parallelizable scope of unmarked tests under --threadpool: none (default), "
        "children, parameters or all. ini: ftrace_threadpool_default",
    )
    add.ini("ftrace_threadpool", "worker threads for --threadpool (N or auto)", default="")
    add.ini("threadpool", "worker threads (N or auto); alias", default="")
    add.ini(
        "ftrace_threadpool_default",
        "parallelizable scope of unmarked tests: none, children, parameters or all",
        default="",
    )


ISOLATE_MODES = ("test", "module")
ISOLATE_OFF = ("off", "no", "none", "false", "0")


def isolate_word(value: str) -> bool:
    """Whether `value` is one of --ftrace-isolate's own values (a mode, or a word for off)."""
    return str(value).strip().lower() in ISOLATE_MODES + ISOLATE_OFF


def _isolate_value(value: str) -> str:
    """--ftrace-isolate's value, checked later (isolate.resolve_mode): while pytest parses the
    command line early, before pytest_load_initial_conftests has put a path that follows the
    flag back in its place (see split_isolate_path), a path can still stand here."""
    return str(value).strip()


_isolate_value.__name__ = "--ftrace-isolate"


def split_isolate_path(args: list[str]) -> None:
    """`--ftrace-isolate PATH` means the default mode and then a path: rewritten in place to
    `--ftrace-isolate=test PATH`, so that `--ftrace-isolate` can stand where `--forked` stood.
    Only the values test, module and off (and off's synonyms) are taken as the flag's value;
    anything after `--` is left alone."""
    for index, arg in enumerate(args):
        if arg == "--":
            return
        if arg != "--ftrace-isolate" or index + 1 >= len(args):
            continue
        following = str(args[index + 1])
        if following.startswith("-") or isolate_word(following):
            continue
        args[index] = "--ftrace-isolate=test"


def _add_isolate_options(add: _Registrar) -> None:
    add.option(
        "--ftrace-isolate",
        dest="ftrace_isolate",
        nargs="?",
        const="test",
        default=None,
        type=_isolate_value,
        metavar="test|module|off",
        help="run tests in a forked child process, one per test (default) or per module, so "
        "a crash (segfault, abort, os._exit) fails only that test; each test is then also "
        "bounded by 3 x --ftrace-timeout + 2s; off: no child process (overrides the ini key). "
        "A path after the bare flag is a path. "
        "ini: ftrace_isolate",
    )
    add.option(
        "--ftrace-forked",
        "--forked",
        dest="ftrace_forked",
        action="store_true",
        default=False,
        help="pytest-forked spelling: the same as --ftrace-isolate=test",
    )
    add.option(
        "--ftrace-forked-subprocess",
        "--forked-subprocess",
        dest="ftrace_forked_subprocess",
        action="store_true",
        default=False,
        help="accepted for set-ups written for pytest-forked: each test already runs in a "
        "child process of its own, so this is the same as --ftrace-isolate=test",
    )
    add.ini("ftrace_isolate", "run tests in a child process: test, module or off", default="")


def check_combinations(config: pytest.Config, settings: Settings, peers: set[str]) -> None:
    """Usage errors for options that cannot go together, wherever each came from."""
    if not config.option.ftrace:
        given = command_line_options(config, FTRACE_ONLY)
        if given:
            raise pytest.UsageError(
                f"{given[0]} only means something with --ftrace, which is missing (add --ftrace, "
                f"or leave out {', '.join(given)})"
            )
    for peer in sorted(peers & PEER_THREADS.keys()):
        dest, name, plugin = PEER_THREADS[peer]
        theirs = getattr(config.option, dest, None)
        if theirs is None or settings.threads <= 1:
            continue
        try:
            nested = int(str(theirs).strip()) > 1
        except ValueError:  # 'auto' and the like
            nested = True
        if nested:
            raise pytest.UsageError(
                f"{name} {theirs} ({plugin}) with pytest-ftrace's {settings.threads} threads "
                "(--ftrace-threads, ini ftrace_threads, or --ftrace's default) would run each "
                f"test nested in both plugins' threads; use one of them ({name} 1, or "
                "--ftrace-threads 1)"
            )


# Peer plugins that run each test in threads themselves: (dest, option, distribution).
PEER_THREADS = {
    "run-parallel": ("parallel_threads", "--parallel-threads", "pytest-run-parallel"),
    "freethreaded": ("threads", "--threads", "pytest-freethreaded"),
}


def command_line_options(config: pytest.Config, dests: set[str]) -> list[str]:
    """The option strings of `dests` given on the command line or in PYTEST_ADDOPTS (not in
    the ini file's addopts: a project may set them there for its --ftrace runs)."""
    names: dict[str, str] = {}
    parser = getattr(config, "_parser", None)
    for group in [getattr(parser, "_anonymous", None), *getattr(parser, "_groups", ())]:
        for option in getattr(group, "options", ()):
            if option.dest in dests:
                for name in option.names():
                    names[name] = name
    if not names:
        return []
    import shlex

    try:
        env = shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    except ValueError:
        env = []
    found: list[str] = []
    for token in [*config.invocation_params.args, *env]:
        if not isinstance(token, str):
            continue
        if token == "--":
            break
        name = token.partition("=")[0] if token.startswith("--") else token
        if name in names and name not in found:
            found.append(name)
    return found


def threadpool_workers(config: pytest.Config) -> int | None:
    """--threadpool's worker count (option > ini), or None when it is off."""
    workers = resolve(
        config,
        "ftrace_threadpool",
        "ftrace_threadpool",
        positive_int_or_auto("ftrace_threadpool"),
        None,
    )
    if workers is None and "threadpool" not in active_peers(config.pluginmanager):
        raw = ini_value(config, "threadpool")
        if raw is not None:
            try:
                workers = positive_int_or_auto("threadpool")(raw)
            except argparse.ArgumentTypeError as exc:
                raise pytest.UsageError(f"ini key threadpool: {exc}") from None
    return workers


def isolate_requested(config: pytest.Config) -> bool:
    """--ftrace-isolate, --forked or the ini key is given (possibly as off: isolate.configure
    decides)."""
    option = config.option
    if option.ftrace_isolate is not None or option.ftrace_forked or option.ftrace_forked_subprocess:
        return True
    return ini_value(config, "ftrace_isolate") is not None


def ini_value(config: pytest.Config, name: str):
    """The ini value, or None where it is unset or the key is unknown. A value pytest cannot
    convert to the key's type (a boolean that is not one, say) is a usage error naming the key."""
    try:
        value = config.getini(name)
    except (ValueError, TypeError, pytest.UsageError) as exc:
        # pytest 8 raises ValueError for an unknown key and for a bad value alike; pytest 9
        # raises UsageError for a bad value, not always naming the key
        if name in getattr(getattr(config, "_parser", None), "_inidict", {}):
            message = str(exc)
            if not message.startswith(f"ini key {name}:"):
                message = f"ini key {name}: {message}"
            raise pytest.UsageError(message) from None
        return None  # unknown: registered by nobody in this session
    if value in ("", [], None):
        return None
    return value


def resolve(config: pytest.Config, dest: str, ini: str, parse, default):
    """Command line > ini > default. A bad ini value is a usage error naming the key."""
    value = getattr(config.option, dest, None)
    if value is not None:
        return value
    raw = ini_value(config, ini)
    if raw is None:
        return default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"ini key {ini}: {exc}") from None


class Settings:
    """The session-wide settings of the stress runner, after option > ini > default.

    A plain class, not a dataclass: making a dataclass costs startup time on every pytest run.
    """

    __slots__ = (
        "threads",
        "iterations",
        "require_gil_disabled",
        "thread_unsafe_fixtures",
        "timeout",
        "budget",
    )

    def __init__(
        self,
        threads: int,
        iterations: int,
        require_gil_disabled: bool,
        thread_unsafe_fixtures: frozenset[str],
        timeout: float,
        budget: float | None = None,
    ):
        # budget: --ftrace's seconds of rounds per test, None when the count is fixed (then
        # `iterations` is the count; with a budget it is the round cap)
        self.budget = budget
        self.threads = threads
        self.iterations = iterations
        self.require_gil_disabled = require_gil_disabled
        self.thread_unsafe_fixtures = thread_unsafe_fixtures
        self.timeout = timeout

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Settings({fields})"
