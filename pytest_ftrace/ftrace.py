"""--ftrace: the session seed, the instrumentation around each threaded test, the replay line,
and per-test statistics.

Seeds. The session seed comes from `--seed N|last|random` (ini `ftrace_seed`; default random).
Each test's seed is derived from the session seed and its node id, and each thread's stream from
the test seed, its thread index and the round (see `_native.derive_seed`), so a failure seen in a
run with many tests, or in an xdist worker (every worker uses the controller's session seed),
replays in a run of that test alone.

Replay. A failing test prints `replay: pytest '<nodeid>' --ftrace --seed N --ftrace-replay T`,
where T = `t<threads>i<iteration>` names the thread count and the first failing round. Running it
re-runs that round `--ftrace-replay-runs` times (default 10) with the same per-thread streams and
reports how often the failure came back.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass

import pytest

from pytest_ftrace import options
from pytest_ftrace.report import Outcome
from pytest_ftrace.runner import Hooks

CACHE_KEY = "ftrace/seed"
DEFAULT_THREADS = 4
DEFAULT_ITERATIONS = 10
DEFAULT_REPLAY_RUNS = 10
MODE = "chaos"
_TOKEN = re.compile(r"^t(\d+)i(\d+)$")


def add_options(group, parser, pluginmanager) -> None:
    options.add_option(
        group,
        parser,
        pluginmanager,
        "--ftrace-seed",
        aliases=("--seed",),
        dest="ftrace_seed",
        default=None,
        type=parse_seed_option,
        metavar="N|last|random",
        help="session seed for --ftrace: a whole number, 'last' (the previous run's, from the "
        "pytest cache) or 'random' (default). ini: ftrace_seed",
    )
    group.addoption(
        "--ftrace-include",
        action="append",
        dest="ftrace_include",
        default=None,
        metavar="GLOB",
        help="module glob to instrument as well (repeatable). ini: ftrace_include",
    )
    group.addoption(
        "--ftrace-exclude",
        action="append",
        dest="ftrace_exclude",
        default=None,
        metavar="GLOB",
        help="module glob never to instrument (repeatable). ini: ftrace_exclude",
    )
    group.addoption(
        "--ftrace-replay",
        dest="ftrace_replay",
        default=None,
        type=parse_token,
        metavar="TOKEN",
        help="re-run the failing round a replay: line names, and report how often it failed",
    )
    group.addoption(
        "--ftrace-replay-runs",
        dest="ftrace_replay_runs",
        default=DEFAULT_REPLAY_RUNS,
        type=options.positive_int("--ftrace-replay-runs"),
        metavar="K",
        help=f"how many times --ftrace-replay re-runs the round (default {DEFAULT_REPLAY_RUNS})",
    )
    group.addoption(
        "--ftrace-policy",
        action="append",
        dest="ftrace_policy",
        default=None,
        type=parse_policy_item,
        metavar="KEY=VALUE",
        help="tune the injection (repeatable): yield_probability, delay_probability, "
        "sleep_share, max_spin_ns, max_sleep_us. ini: ftrace_policy",
    )
    parser.addini("ftrace_policy", "injection policy, KEY=VALUE per line", type="linelist")
    parser.addini("ftrace_seed", "session seed for --ftrace (N, last or random)", default="")
    parser.addini("ftrace_include", "module globs to instrument as well", type="linelist")
    parser.addini("ftrace_exclude", "module globs never to instrument", type="linelist")


def parse_seed_option(value: str) -> int | str:
    value = str(value).strip()
    if value in ("last", "random"):
        return value
    try:
        seed = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seed must be a whole number, 'last' or 'random', not {value!r}"
        ) from None
    if not 0 <= seed < 2**64:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and 2**64-1, not {seed}")
    return seed


def policy_keys() -> dict:
    from pytest_ftrace import _native

    return dict(_native.policy_defaults())


def parse_policy_item(value: str) -> tuple[str, float]:
    key, sep, raw = str(value).partition("=")
    key = key.strip()
    defaults = policy_keys()
    if not sep or key not in defaults:
        raise argparse.ArgumentTypeError(
            f"--ftrace-policy takes KEY=VALUE with KEY one of {', '.join(defaults)}, "
            f"not {value!r}"
        )
    kind = type(defaults[key])
    try:
        number = kind(raw.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ftrace-policy {key} must be a {'whole ' if kind is int else ''}number, "
            f"not {raw.strip()!r}"
        ) from None
    return key, number


def resolve_policy(config: pytest.Config) -> dict:
    """ini lines first, then the command line; each later KEY wins."""
    policy: dict = {}
    for line in options.ini_value(config, "ftrace_policy") or ():
        try:
            key, number = parse_policy_item(line)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"ini key ftrace_policy: {exc}") from None
        policy[key] = number
    policy.update(config.option.ftrace_policy or ())
    return policy


@dataclass(frozen=True)
class Token:
    threads: int
    iteration: int

    def __str__(self) -> str:
        return f"t{self.threads}i{self.iteration}"


def parse_token(value: str) -> Token:
    match = _TOKEN.match(str(value).strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(
            f"--ftrace-replay takes the token of a replay: line, such as t8i3, not {value!r}"
        )
    return Token(int(match.group(1)), int(match.group(2)))


def session_seed(config: pytest.Config) -> int:
    """The session seed, resolved once: xdist controller's, option, ini, or a fresh one."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "ftrace_seed" in workerinput:
        return int(workerinput["ftrace_seed"])
    value = config.option.ftrace_seed
    if value is None:
        raw = options.ini_value(config, "ftrace_seed")
        if raw is not None:
            try:
                value = parse_seed_option(raw)
            except argparse.ArgumentTypeError as exc:
                raise pytest.UsageError(f"ini key ftrace_seed: {exc}") from None
    if value is None or value == "random":
        return random.Random().getrandbits(32)
    if value == "last":
        cache = getattr(config, "cache", None)
        last = cache.get(CACHE_KEY, None) if cache is not None else None
        if last is None:
            raise pytest.UsageError(
                "--seed last: no previous seed in the pytest cache (run once with --ftrace first, "
                "and keep the cache provider enabled)"
            )
        return int(last)
    return int(value)


class FtraceSession:
    """What --ftrace keeps for the whole session."""

    def __init__(self, config: pytest.Config):
        from pytest_ftrace.instrument import Instrumentation

        self.config = config
        self.seed = session_seed(config)
        self.replay: Token | None = config.option.ftrace_replay
        self.replay_runs: int = config.option.ftrace_replay_runs
        include = (config.option.ftrace_include or []) + list(
            options.ini_value(config, "ftrace_include") or []
        )
        exclude = (config.option.ftrace_exclude or []) + list(
            options.ini_value(config, "ftrace_exclude") or []
        )
        self.policy = resolve_policy(config)
        try:
            self.instrumentation = Instrumentation(
                self.seed, str(config.rootpath), include, exclude, **self.policy
            )
        except ValueError as exc:
            raise pytest.UsageError(f"--ftrace-policy: {exc}") from None
        self.stats: list[tuple[str, dict]] = []
        self.replays: list[tuple[str, int, int]] = []
        cache = getattr(config, "cache", None)
        if cache is not None:
            cache.set(CACHE_KEY, self.seed)

    def close(self) -> None:
        self.instrumentation.close()

    def header(self) -> str:
        replay = f" replay={self.replay} x{self.replay_runs}" if self.replay else ""
        return f"ftrace: seed={self.seed} mode={MODE}{replay}"

    def start(self, item: pytest.Item, threads: int, iterations: int) -> TestSession:
        return TestSession(self, item, threads, iterations)


class TestSession:
    """One test's threaded run under --ftrace."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, session: FtraceSession, item: pytest.Item, threads: int, iterations: int):
        self.session = session
        self.item = item
        self.run = session.instrumentation.start_test(item.nodeid)
        self.replay = session.replay
        if self.replay is not None:
            threads, iterations = self.replay.threads, session.replay_runs
        self.threads = threads
        self.iterations = iterations

    def hooks(self) -> Hooks:
        run = self.run
        if self.replay is None:
            round_start = run.round_start
        else:
            # Every round replays the recorded one: the same per-thread streams each time.
            iteration = self.replay.iteration

            def round_start(_round: int) -> None:
                run.round_start(iteration)

        return Hooks(run.thread_enter, round_start, run.record_round, run.thread_exit)

    def finish(self, outcome: Outcome) -> None:
        """Add the seed, the replay line and the statistics to the outcome and the report."""
        stats = self.run.stats()
        self.session.stats.append((self.item.nodeid, stats))
        props = self.item.user_properties
        props.append(("ftrace_seed", self.session.seed))
        props.append(("ftrace_test_seed", self.run.seed))
        for key in ("executions", "hooked", "yields", "delays"):
            if key in stats:
                props.append((f"ftrace_{key}", stats[key]))
        if self.replay is not None:
            failed_rounds = {f.iteration for f in outcome.failures if f.iteration is not None}
            self.session.replays.append(
                (self.item.nodeid, len(failed_rounds), self.session.replay_runs)
            )
            outcome.notes.append(
                f"replay: reproduced in {len(failed_rounds)}/{self.session.replay_runs} runs of "
                f"round {self.replay.iteration} (seed {self.session.seed}, mode {MODE})"
            )
            return
        if not outcome.failures:
            return
        first = min(
            (f for f in outcome.failures if f.iteration is not None),
            key=lambda f: (f.iteration, f.thread),
            default=None,
        )
        where = (
            f"first failure in thread {first.thread}, iteration {first.iteration}"
            if first is not None
            else "the failure was outside the rounds"
        )
        outcome.notes.append(
            f"ftrace: seed={self.session.seed} test-seed={self.run.seed} mode={MODE}; {where}"
        )
        if first is not None:
            token = Token(self.threads, first.iteration)
            outcome.notes.append("replay: " + replay_command(self.item, self.session.seed, token))


def replay_command(item: pytest.Item, seed: int, token: Token) -> str:
    """A complete command, run from the rootdir, that re-runs this test's failing round."""
    nodeid = "'" + item.nodeid.replace("'", "'\"'\"'") + "'"
    return f"pytest {nodeid} --ftrace --seed {seed} --ftrace-replay {token}"


def pytest_configure_node(node) -> None:
    """xdist controller: every worker gets the session seed (registered only under xdist)."""
    session = node.config.stash.get(SESSION_KEY, None)
    if session is not None:
        node.workerinput["ftrace_seed"] = session.seed


SESSION_KEY = pytest.StashKey[FtraceSession]()
