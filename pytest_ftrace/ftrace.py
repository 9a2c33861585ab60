"""--ftrace: the session seed, the instrumentation around each threaded test, the replay line,
and per-test statistics.

Seeds. The session seed comes from `--seed N|last|random` (ini `ftrace_seed`; default random).
Each test's seed is derived from the session seed and its node id, and each thread's stream from
the test seed, its thread index and the round (see `_native.derive_seed`), so a failure seen in a
run with many tests, or in an xdist worker (every worker uses the controller's session seed),
replays in a run of that test alone.

Modes. `--ftrace-mode exact` (the default) runs the threads one at a time and lets a scheduler
choose who goes on at every hooked access (`--ftrace-scheduler`: mix, the default, draws
aligned, uniform random or PCT per round; see `pytest_ftrace/exact.py` and `rust/sched/`), so a
failing interleaving replays exactly. `--ftrace-mode chaos` lets the threads run free and
injects seeded yields and delays: that is what finds races inside native code on free-threaded
builds. The options themselves are registered in options.py, so that this module loads only in
runs that use --ftrace.

Replay. A failing test prints `replay: pytest '<nodeid>' --ftrace --seed N --ftrace-replay T`,
where T = `t<threads>i<iteration>` names the thread count and the first failing round. Running it
re-runs that round `--ftrace-replay-runs` times (default 10) and reports how often the failure
came back. The line names `--ftrace-mode` when it is not the default. In exact mode T ends in
`x<hash>`: the key under which the round's decision list (which thread took each step) is kept
in the pytest cache; replaying follows that list, so the same interleaving comes back on every
run (without the cache entry the round is re-scheduled from the seed). In chaos mode the round
re-runs with the same per-thread streams, which reproduces often but not always.
`--ftrace-replay last` replays the last failure recorded in the cache.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from pytest_ftrace import options
from pytest_ftrace.options import (  # noqa: F401 - the defaults live with the options
    DEFAULT_ITERATIONS,
    DEFAULT_MODE,
    DEFAULT_REPLAY_RUNS,
    DEFAULT_SHRINK_SECONDS,
    DEFAULT_SWITCH_BUDGET,
    DEFAULT_THREADS,
    MODES,
)

if TYPE_CHECKING:  # imported when a threaded test runs, not when pytest starts
    from pytest_ftrace.report import Outcome
    from pytest_ftrace.runner import Hooks

# Shrinking tries at most this many candidate schedules (each run twice): a count, not a time,
# so that the same seed shrinks to the same schedule on every run.
SHRINK_CANDIDATES = 40
# What the statistics show of exact mode (see exact.ExactTest.summary).
EXACT_STATS = ("rounds", "points", "handovers", "preemptions", "waits")
CACHE_KEY = "ftrace/seed"
REPLAY_KEY = "ftrace/replay/"  # + hash: one failing round's decision list (exact mode)
LAST_KEY = "ftrace/replay/last"

MODE = DEFAULT_MODE  # kept for importers of the old constant
_TOKEN = re.compile(r"^t([0-9]+)i([0-9]+)(?:k([0-9]+))?(?:x([0-9a-f]{6,40}))?$")
_SCHEDULER = re.compile(r"^(random|mix|pct|aligned)([0-9]*)$")


def parse_seed_option(value) -> int | str:
    text = value.strip() if isinstance(value, str) else value
    if text in ("last", "random"):
        return text
    try:
        return options.check_whole(text, "--seed", 0, options.U64)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "--seed must be a whole number between 0 and 2**64-1, 'last' or 'random', "
            f"not {value!r}"
        ) from None


def usable_seed(value) -> int | None:
    """A seed read from the cache, or None where it is not one (a corrupt cache)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= options.U64:
        return None
    return value


def policy_keys() -> dict:
    from pytest_ftrace import _native

    return dict(_native.policy_defaults())


# The bounds of the policy's numbers: probabilities and shares are 0..1; a delay is at most a
# second (each hooked access may take one).
POLICY_MAX = {"max_spin_ns": 10**9, "max_sleep_us": 10**6}


def parse_policy_item(value: str) -> tuple[str, float]:
    key, sep, raw = str(value).partition("=")
    key = key.strip()
    defaults = policy_keys()
    if not sep or key not in defaults:
        raise argparse.ArgumentTypeError(
            f"--ftrace-policy takes KEY=VALUE with KEY one of {', '.join(defaults)}, not {value!r}"
        )
    what = f"--ftrace-policy {key}"
    if isinstance(defaults[key], int):
        number = options.check_whole(raw, what, 0, POLICY_MAX.get(key, options.U32))
    else:
        number = options.check_real(raw, what, 0.0, 1.0)
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


def parse_scheduler(value: str) -> tuple[str, int]:
    """random, mix[B] (hand-over budget per round, default DEFAULT_SWITCH_BUDGET), pct[D]
    (depth, default 3) or aligned[P] (stay percent, default 50)."""
    match = _SCHEDULER.match(str(value).strip())
    if not match or (match.group(1) == "random" and match.group(2)):
        raise argparse.ArgumentTypeError(
            "--ftrace-scheduler takes random, mix, mix<hand-overs per round> (e.g. mix48), pct, "
            "pct<depth> (e.g. pct3), aligned or aligned<stay percent> (e.g. aligned50), "
            f"not {value!r}"
        )
    name = match.group(1)
    defaults = {"aligned": 50, "mix": DEFAULT_SWITCH_BUDGET, "pct": 3}
    # mix: hand-overs per round (u32 in the core); pct: depth (each level is a change point
    # the scheduler draws and keeps); aligned: a percentage
    low, high, what = {
        "mix": (1, options.U32, "--ftrace-scheduler mix budget"),
        "pct": (1, PCT_MAX_DEPTH, "--ftrace-scheduler pct depth"),
        "aligned": (0, 100, "--ftrace-scheduler aligned stay percent"),
    }.get(name, (0, 0, "--ftrace-scheduler"))
    param = options.check_whole(match.group(2) or str(defaults.get(name, 0)), what, low, high)
    return name, param


PCT_MAX_DEPTH = 1000


@dataclass(frozen=True)
class Token:
    threads: int
    iteration: int
    key: str | None = None  # exact mode: cache key suffix of the decision list
    # exact mode: the round's step estimate, which its scheduler was made with; a replay
    # from the seed (no decision list in the cache) needs it to make the same choices
    k: int | None = None

    def __str__(self) -> str:
        k = f"k{self.k}" if self.k is not None else ""
        return f"t{self.threads}i{self.iteration}{k}" + (f"x{self.key}" if self.key else "")


LAST = "last"


def parse_token(value) -> Token | str:
    """A replay token, its numbers checked against what the native core takes: threads
    1..MAX_THREADS, the round and the step estimate k in the u64 range."""
    text = value.strip() if isinstance(value, str) else value
    if text == LAST:
        return LAST
    match = _TOKEN.match(text) if isinstance(text, str) else None
    if not match:
        raise argparse.ArgumentTypeError(
            "--ftrace-replay takes the token of a replay: line, such as t8i3, or 'last', "
            f"not {value!r}"
        )
    what = f"--ftrace-replay {text}:"
    threads = options.check_whole(match.group(1), f"{what} threads", 1, options.MAX_THREADS)
    iteration = options.check_whole(match.group(2), f"{what} round", 0, options.U64)
    k = None
    if match.group(3) is not None:
        k = options.check_whole(match.group(3), f"{what} step estimate k", 0, options.U64)
    return Token(threads, iteration, match.group(4), k)


def resolve_mode(config: pytest.Config) -> str:
    mode = config.option.ftrace_mode
    if mode is None:
        raw = str(options.ini_value(config, "ftrace_mode") or "").strip()
        if raw and raw not in MODES:
            raise pytest.UsageError(f"ini key ftrace_mode: exact or chaos, not {raw!r}")
        mode = raw or DEFAULT_MODE
    return mode


def resolve_scheduler(config: pytest.Config) -> tuple[str, int]:
    value = config.option.ftrace_scheduler
    if value is None:
        raw = str(options.ini_value(config, "ftrace_scheduler") or "").strip()
        try:
            value = parse_scheduler(raw) if raw else ("mix", DEFAULT_SWITCH_BUDGET)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"ini key ftrace_scheduler: {exc}") from None
    return value


def session_seed(config: pytest.Config, notes: list[str] | None = None) -> int:
    """The session seed, resolved once: xdist controller's, option, ini, or a fresh one.
    `--seed last` with a corrupt cache entry goes on with a fresh seed, noted in `notes`."""
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
        seed = usable_seed(last)
        if seed is None:
            seed = random.Random().getrandbits(32)
            if notes is not None:
                notes.append(
                    f"ftrace: --seed last has nothing usable: the pytest cache's {CACHE_KEY} "
                    f"holds {_shown(last)}, not a seed (cached value ignored); this run uses "
                    f"a fresh seed, {seed}"
                )
        return seed
    return int(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def last_failure(cache) -> tuple[str, Token, int, str]:
    """`--ftrace-replay last`: (nodeid, token, seed, mode) of the failure the cache recorded.
    A missing record is a usage error; an unusable one raises CorruptCache (ignored, noted)."""
    last = cache.get(LAST_KEY, None) if cache is not None else None
    if not last:
        raise pytest.UsageError(
            "--ftrace-replay last: no failure recorded in the pytest cache (run with "
            "--ftrace first, and keep the cache provider enabled)"
        )
    problem = None
    if not isinstance(last, dict):
        problem = "is not a record"
    elif not isinstance(last.get("nodeid"), str) or not last["nodeid"]:
        problem = "names no test (nodeid)"
    elif usable_seed(last.get("seed")) is None:
        problem = f"has no usable seed ({_shown(last.get('seed'))})"
    elif last.get("mode", DEFAULT_MODE) not in MODES:
        problem = f"has an unknown mode {_shown(last.get('mode'))}"
    else:
        try:
            token = parse_token(last.get("token"))
        except argparse.ArgumentTypeError:
            token = None
        if not isinstance(token, Token):
            problem = f"has an unusable token {_shown(last.get('token'))}"
    if problem is not None:
        raise CorruptCache(
            f"ftrace: --ftrace-replay last has nothing usable: the pytest cache's {LAST_KEY} "
            f"{problem} (cached value ignored); this run replays nothing"
        )
    return last["nodeid"], token, last["seed"], last.get("mode", DEFAULT_MODE)


class CorruptCache(Exception):
    """A cache entry the plugin wrote, holding something it would not have written."""


def cached_schedule(stored, nodeid: str) -> tuple[list[int] | None, str | None]:
    """A round's decision list from the cache, for `nodeid`: (list, None), or (None, why it
    was ignored) where the entry is there but unusable."""
    if stored is None:
        return None, None
    if not isinstance(stored, dict) or not isinstance(stored.get("decisions"), list):
        return None, "the cached schedule is not one (cached value ignored)"
    if stored.get("nodeid") != nodeid:
        return None, None  # another test's: this one is rescheduled from the seed
    decisions = stored["decisions"]
    # thread ids: the core's are u32 (threads the test starts get ids of their own)
    if not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= options.U32 for d in decisions
    ):
        return (
            None,
            "the cached schedule holds values that are not thread ids (cached value ignored)",
        )
    return decisions, None


class FtraceSession:
    """What --ftrace keeps for the whole session."""

    def __init__(self, config: pytest.Config):
        from pytest_ftrace.instrument import Instrumentation

        self.config = config
        self.cache = getattr(config, "cache", None)
        self.mode = resolve_mode(config)
        self.scheduler = resolve_scheduler(config)
        self.replay: Token | None = None
        self.replay_nodeid: str | None = None  # `--ftrace-replay last`: the test to run
        self.notes: list[str] = []  # cached values that were ignored, said in the report
        replay = config.option.ftrace_replay
        if replay == LAST:
            try:
                nodeid, replay, seed, self.mode = last_failure(self.cache)
            except CorruptCache as exc:
                self.notes.append(str(exc))
                replay = None
            else:
                self.replay_nodeid = nodeid
                config.option.ftrace_seed = seed
                config.pluginmanager.register(_OnlyTest(nodeid), "ftrace-replay-last")
        self.seed = session_seed(config, self.notes)
        self.replay = replay
        self.replay_runs: int = config.option.ftrace_replay_runs
        self.shrink_seconds: float = max(0.0, config.option.ftrace_shrink)
        include = (config.option.ftrace_include or []) + list(
            options.ini_value(config, "ftrace_include") or []
        )
        exclude = (config.option.ftrace_exclude or []) + list(
            options.ini_value(config, "ftrace_exclude") or []
        )
        self.policy = resolve_policy(config)
        from pytest_ftrace.instrument import NoFreeToolId

        try:
            self.instrumentation = Instrumentation(
                self.seed, str(config.rootpath), include, exclude, **self.policy
            )
        except ValueError as exc:  # the values together (each is checked on its own already)
            sources = [
                name
                for name, given in (
                    ("ini key ftrace_policy", options.ini_value(config, "ftrace_policy")),
                    ("--ftrace-policy", config.option.ftrace_policy),
                )
                if given
            ]
            raise pytest.UsageError(f"{' with '.join(sources)}: {exc}") from None
        except NoFreeToolId as exc:
            raise pytest.UsageError(str(exc)) from None
        if self.replay is not None:
            config.pluginmanager.register(_ReplayCheck(self), "ftrace-replay-check")
        self.stats: list[tuple[str, dict]] = []
        self.replays: list[tuple[str, int, int]] = []
        if self.cache is not None:
            self.cache.set(CACHE_KEY, self.seed)

    def close(self) -> None:
        self.instrumentation.close()

    def header(self) -> str:
        replay = f" replay={self.replay} x{self.replay_runs}" if self.replay else ""
        scheduler = ""
        if self.mode == "exact":
            name, param = self.scheduler
            shown = name in ("pct", "aligned") or (name == "mix" and param != DEFAULT_SWITCH_BUDGET)
            scheduler = f" scheduler={name}{param if shown else ''}"
        notes = "".join("\n" + note for note in self.notes)
        return f"ftrace: seed={self.seed} mode={self.mode}{scheduler}{replay}{notes}"

    def exact_options(self, nodeid: str, replay: Token | None) -> dict:
        """Keyword arguments of the native run for one test in exact mode."""
        name, param = self.scheduler
        kwargs: dict = {"mode": "exact", "scheduler": name}
        if name == "pct":
            kwargs["pct_depth"] = param
        elif name == "aligned":
            kwargs["stay_percent"] = param
        elif name == "mix":
            kwargs["switch_budget"] = param
        if replay is not None and replay.k is not None:
            kwargs["sched_k"] = replay.k
        if replay is not None and replay.key and self.cache is not None:
            decisions, ignored = cached_schedule(
                self.cache.get(REPLAY_KEY + replay.key, None), nodeid
            )
            if decisions is not None:
                kwargs["replay"] = decisions
            elif ignored is not None and ignored not in self.notes:
                self.notes.append(f"ftrace: {REPLAY_KEY}{replay.key}: {ignored}")
        return kwargs

    def store_round(self, nodeid: str, threads: int, iteration: int, record: dict) -> str | None:
        """Keep a failing round's decision list in the cache; returns its key (None: no cache)."""
        if self.cache is None:
            return None
        decisions = list(record["decisions"])
        digest = hashlib.sha1(
            f"{nodeid}|{self.seed}|{threads}|{iteration}|{decisions}".encode()
        ).hexdigest()[:10]
        self.cache.set(
            REPLAY_KEY + digest,
            {
                "nodeid": nodeid,
                "seed": self.seed,
                "threads": threads,
                "iteration": iteration,
                "scheduler": list(self.scheduler),
                "decisions": decisions,
            },
        )
        return digest

    def remember_failure(self, nodeid: str, token: Token) -> None:
        if self.cache is not None:
            self.cache.set(
                LAST_KEY,
                {"nodeid": nodeid, "token": str(token), "seed": self.seed, "mode": self.mode},
            )

    def start(self, item: pytest.Item, threads: int, iterations: int) -> TestSession:
        return TestSession(self, item, threads, iterations)


class TestSession:
    """One test's threaded run under --ftrace."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, session: FtraceSession, item: pytest.Item, threads: int, iterations: int):
        self.session = session
        self.item = item
        self.mode = session.mode
        self.replay = session.replay
        if session.replay_nodeid is not None and session.replay_nodeid != item.nodeid:
            self.replay = None
        if self.replay is not None:
            threads, iterations = self.replay.threads, session.replay_runs
        self.threads = threads
        self.iterations = iterations
        self.exact = None
        self.shrink_cut_short: int | None = None  # candidates tried when time ran out
        self.replay_exact = False  # following a recorded decision list
        self.replay_decisions: list[int] | None = None
        if self.mode == "exact":
            from pytest_ftrace.exact import ExactTest

            kwargs = session.exact_options(item.nodeid, self.replay)
            self.replay_exact = "replay" in kwargs
            self.replay_decisions = kwargs.get("replay")
            traced = session.instrumentation.start_test(item.nodeid, **kwargs)
            seed_round = None
            if self.replay is not None and not self.replay_exact:
                seed_round = self.replay.iteration  # no decision list: reschedule from the seed
            self.exact = ExactTest(
                traced._native,
                threads,
                seed_round,
                session.instrumentation.scope,
                tuple(getattr(item, "funcargs", {}).values()),
            )
            self.traced = traced
            self.run = _ExactActivation(traced, self.exact)
        else:
            self.traced = self.run = session.instrumentation.start_test(item.nodeid)

    def hooks(self) -> Hooks:
        from pytest_ftrace.runner import Hooks

        if self.exact is not None:
            e = self.exact
            return Hooks(
                e.thread_enter, e.round_start, e.round_end, e.thread_exit, e.native.sched_release
            )
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
        stats = self.traced.stats()
        stats["mode"] = self.mode
        if self.exact is not None:
            stats.update(self.exact.summary())
        self.session.stats.append((self.item.nodeid, stats))
        mode = self.mode
        if self.exact is not None:
            from pytest_ftrace.report import Failure, internal_error

            for where, exc in self.exact.internal_errors:
                outcome.failures.append(Failure(None, None, internal_error(where, exc), "internal"))
            self._exact_notes(outcome)
        props = self.item.user_properties
        props.append(("ftrace_seed", self.session.seed))
        props.append(("ftrace_test_seed", self.traced.seed))
        keys = EXACT_STATS if self.exact is not None else ("yields", "delays")
        for key in ("executions", "hooked", *keys):
            if key in stats:
                props.append((f"ftrace_{key}", stats[key]))
        if self.replay is not None:
            failed_rounds = {f.iteration for f in outcome.failures if f.iteration is not None}
            self.session.replays.append(
                (self.item.nodeid, len(failed_rounds), self.session.replay_runs)
            )
            how = ""
            if self.exact is not None:
                how = self._replay_how()
            outcome.notes.append(
                f"replay: reproduced in {len(failed_rounds)}/{self.session.replay_runs} runs of "
                f"round {self.replay.iteration} (seed {self.session.seed}, mode {mode}{how})"
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
            f"ftrace: seed={self.session.seed} test-seed={self.traced.seed} mode={mode}; {where}"
        )
        if first is not None:
            key = None
            k = None
            if self.exact is not None:
                record = self.exact.round(first.iteration)
                if record is not None and record.get("k"):
                    k = record["k"]
                if record is not None and record["decisions"]:
                    key = self.session.store_round(
                        self.item.nodeid, self.threads, first.iteration, record
                    )
                shrunk = self._shrink(first, record)
                if self.shrink_cut_short is not None:
                    outcome.notes.append(
                        _wrap(
                            f"shrinking: stopped by the --ftrace-shrink limit "
                            f"({self.session.shrink_seconds:g} s) after {self.shrink_cut_short} "
                            f"of {SHRINK_CANDIDATES} candidate schedules; give it more time for "
                            "the same result on every run",
                            self.item.config,
                        )
                    )
                if shrunk is not None and shrunk[0]["preemptions"] == 0:
                    # Failing without any preemption after the run: what fails is the state
                    # the test kept from the rounds that ran, not an interleaving.
                    outcome.notes.append(
                        _wrap(
                            "shrinking: after the run, a schedule without preemptions fails too "
                            "(the test keeps state between rounds, e.g. in a module-scoped "
                            "fixture), so the lanes show the round as it ran",
                            self.item.config,
                        )
                    )
                    shrunk = None
                if shrunk is not None:
                    small, steps, cut, before, lane_failure, labels = shrunk
                    outcome.notes.append(
                        f"shrunk: a schedule with {small['preemptions']} preemptions (from "
                        f"{before}) fails the same way; the lanes below show it"
                    )
                    self._lane_view(outcome, lane_failure, small, steps, cut, True, labels)
                else:
                    steps = self.exact.native.sched_steps(first.iteration)
                    cut = self.exact.exit_steps.get((first.iteration, first.thread))
                    labels = self.exact.thread_labels(first.iteration)
                    self._lane_view(outcome, first, record, steps, cut, False, labels)
            token = Token(self.threads, first.iteration, key, k)
            self.session.remember_failure(self.item.nodeid, token)
            if self.exact is not None:
                record = self.exact.round(first.iteration)
                if record is not None and not record["exact"] and not record["deadlock"]:
                    outcome.notes.append(
                        f"round {first.iteration} was not exact ({record['reason']}): the "
                        "replay line below may not reproduce it"
                    )
            outcome.notes.append(
                "replay: " + replay_command(self.item, self.session.seed, token, mode)
            )

    def _shrink(self, first, record: dict | None):
        """Search, within --ftrace-shrink seconds, for a schedule of the failing round with
        fewer preemptions that fails the same way (same exception type and place).

        Candidates, each run as one more round of the test following its decision list:
        prefixes of the list (past its end the running thread goes on until it blocks or
        ends: no more preemptions), found by bisection; then the list with one run of steps of
        one thread left out, from the last run back. A candidate counts when it fails the same
        way twice in a row. Returns (record, steps, cut, preemptions before, failure, thread
        labels) or None.

        The search is bounded by a count of candidates (SHRINK_CANDIDATES), so that the same
        seed shrinks to the same schedule on every run; --ftrace-shrink bounds its time too,
        and a search it cuts short is said in the note. A shrunk schedule whose lanes would
        show no interleaving (no access of the test's code, or each thread running once from
        its start) is not used: the lanes show the round as it ran."""
        import time

        from pytest_ftrace.exact import shows_interleaving
        from pytest_ftrace.report import location

        budget = self.session.shrink_seconds
        body = getattr(self.item.obj, "ftrace_body", None)
        if (
            not budget
            or body is None
            or record is None
            or not record["exact"]
            or record["preemptions"] == 0
        ):
            return None
        want = (type(first.exc).__name__, location(first.exc))
        deadline = time.monotonic() + budget
        best = dict(record)
        best_steps = None
        tried = [0]

        def more() -> bool:
            return tried[0] < SHRINK_CANDIDATES and time.monotonic() < deadline

        def attempt(decisions):
            tried[0] += 1
            result = self._run_schedule(body, decisions)
            if result is None or result[0] != want:
                return None
            again = self._run_schedule(body, decisions)
            if again is None or again[0] != want:
                return None
            return again

        # 1. the shortest failing prefix
        low, high = 0, len(best["decisions"])
        while low < high and more():
            middle = (low + high) // 2
            found = attempt(best["decisions"][:middle])
            if found is not None and found[1]["preemptions"] < best["preemptions"]:
                high = middle
                best, best_steps = found[1], found[2:]
            else:
                low = middle + 1
        # 2. leave out one run of steps at a time
        runs = _runs(best["decisions"])
        index = len(runs) - 1
        while index > 0 and more():
            start, end = runs[index]
            candidate = best["decisions"][:start] + best["decisions"][end:]
            found = attempt(candidate)
            if found is not None and found[1]["preemptions"] < best["preemptions"]:
                best, best_steps = found[1], found[2:]
                runs = _runs(best["decisions"])
                index = min(index, len(runs) - 1)
            else:
                index -= 1
        if tried[0] < SHRINK_CANDIDATES and time.monotonic() >= deadline:
            self.shrink_cut_short = tried[0]
        if best_steps is None:
            return None
        steps, cut, failure, labels = best_steps
        if not shows_interleaving(steps, cut, failure.thread):
            return None
        return best, steps, cut, record["preemptions"], failure, labels

    def _run_schedule(self, body, decisions):
        """One round of the test following `decisions`: ((exception type, place) of the first
        failure or None, round record, steps, cut), or None when it could not run."""
        from pytest_ftrace.exact import ExactTest
        from pytest_ftrace.report import location
        from pytest_ftrace.runner import Hooks, ThreadedRun

        original, takes_fixtures = body
        traced = self.session.instrumentation.start_test(
            self.item.nodeid, mode="exact", replay=list(decisions)
        )
        exact = ExactTest(
            traced._native,
            self.threads,
            None,
            self.session.instrumentation.scope,
            tuple(getattr(self.item, "funcargs", {}).values()),
        )
        hooks = Hooks(
            exact.thread_enter,
            exact.round_start,
            exact.round_end,
            exact.thread_exit,
            exact.native.sched_release,
        )
        run = ThreadedRun(
            self.item, original, self.threads, 1, 60.0, hooks=hooks, takes_fixtures=takes_fixtures
        )
        traced.activate()
        try:
            exact.activate()
            try:
                outcome = run.run()
            finally:
                exact.deactivate()
        finally:
            traced.deactivate()
        record = exact.round(0)
        failures = [f for f in outcome.failures if f.iteration is not None]
        if record is None or not record["exact"]:
            return None
        if not failures:
            return (None, record, None, None, None, None)
        failure = min(failures, key=lambda f: f.thread)
        steps = traced._native.sched_steps(0)
        cut = exact.exit_steps.get((0, failure.thread))
        where = (type(failure.exc).__name__, location(failure.exc))
        return (where, record, steps, cut, failure, exact.thread_labels(0))

    def _lane_view(
        self, outcome: Outcome, first, record, steps, cut, shrunk: bool, labels=None
    ) -> None:
        import textwrap

        from pytest_ftrace.exact import lanes

        if not steps:
            return
        record = record or {}
        width = _terminal_width(self.item.config)
        which = "shrunk schedule" if shrunk else f"schedule of round {first.iteration}"
        intro = (
            f"{which} up to thread {first.thread}'s failure "
            f"({record.get('preemptions', '?')} preemptions; a row is a run of steps of one "
            "thread, shown by its first access):"
        )
        table = lanes(steps, cut, failing=first.thread, width=width, labels=labels)
        outcome.notes.append("\n".join([*textwrap.wrap(intro, width), table]))

    def _replay_how(self) -> str:
        """How the replay's rounds were scheduled, honestly: whether each followed the recorded
        schedule to its end (exact, every recorded decision taken, no more, no fewer), or
        rescheduled from the seed exactly; the first one that did not, and why."""
        planned = self.replay_decisions
        runs = sorted(self.exact.rounds_seen)
        followed = 0
        first_off = None
        for iteration in runs:
            record = self.exact.round(iteration)
            if record is None:
                ok, why = False, "the round did not finish"
            elif not record["exact"]:
                ok, why = False, f"not exact: {record['reason']}"
            elif planned is not None and record["divergences"]:
                ok, why = False, f"{record['divergences']} decisions could not be followed"
            elif planned is not None and len(record["decisions"]) != len(planned):
                ok, why = (
                    False,
                    (
                        f"it took {len(record['decisions'])} decisions, the recorded schedule "
                        f"{len(planned)}"
                    ),
                )
            else:
                ok, why = True, ""
            followed += ok
            if not ok and first_off is None:
                first_off = (iteration, why)
        if planned is not None:
            what = "following the recorded schedule"
        else:
            what = "rescheduled from the seed (no recorded schedule in the cache)"
        if first_off is None:
            return f", {what}"
        iteration, why = first_off
        return (
            f", {what}; only {followed}/{len(runs)} runs did so to the end, so this is not an "
            f"exact reproduction (run {iteration}: {why})"
        )

    def _exact_notes(self, outcome: Outcome) -> None:
        """Rounds that were not exact (unmanaged blocking, deadlock), said once each."""
        notes = []
        for iteration in sorted(self.exact.rounds_seen):
            record = self.exact.round(iteration)
            if record is not None and not record["exact"] and not record["deadlock"]:
                notes.append(
                    f"ftrace: round {iteration} was not exact: {record['reason']}; "
                    "it ran free from there"
                )
        if notes:
            outcome.notes.extend(notes)
            warnings.warn(FtraceWarning("\n".join(notes)), stacklevel=2)


class FtraceWarning(pytest.PytestWarning):
    """Something --ftrace could not do as asked (e.g. a round that was not exact)."""


class _ExactActivation:
    """What the plugin activates around a test in exact mode: events, patches, watchdog."""

    def __init__(self, traced, exact):
        self.traced, self.exact = traced, exact

    def activate(self) -> None:
        self.traced.activate()
        try:
            self.exact.activate()
        except BaseException:
            self.traced.deactivate()
            raise

    def deactivate(self) -> None:
        try:
            self.exact.deactivate()
        finally:
            self.traced.deactivate()


class _OnlyTest:
    """`--ftrace-replay last`: deselect every test but the one that failed."""

    def __init__(self, nodeid: str):
        self.nodeid = nodeid

    def pytest_collection_modifyitems(self, config, items) -> None:
        keep = [item for item in items if item.nodeid == self.nodeid]
        drop = [item for item in items if item.nodeid != self.nodeid]
        if not keep:
            raise pytest.UsageError(
                f"--ftrace-replay last: the last failure recorded is {self.nodeid!r}, which this "
                f"run did not collect (renamed or removed? {len(items)} other test(s) collected)"
            )
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep


def _terminal_width(config: pytest.Config) -> int:
    """The width the report is written in (pytest's terminal writer; 80 when it has none)."""
    try:
        return int(config.get_terminal_writer().fullwidth)
    except Exception:
        return 80


def _wrap(text: str, config: pytest.Config) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, _terminal_width(config), subsequent_indent="  "))


class _ReplayCheck:
    """--ftrace-replay: before any test runs, a token that cannot replay in this run is a usage
    error (another test's schedule, another thread count, a test that runs on one thread)."""

    def __init__(self, session: FtraceSession):
        self.session = session

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        from pytest_ftrace import markers
        from pytest_ftrace.hooks import STATE_KEY

        token = self.session.replay
        if not items or not isinstance(token, Token):
            return
        if self.session.replay_nodeid is not None:  # `last`: only that test is run
            items = [item for item in items if item.nodeid == self.session.replay_nodeid]
        shown = f"--ftrace-replay {token}"
        stored = None
        if token.key and self.session.cache is not None:
            stored = self.session.cache.get(REPLAY_KEY + token.key, None)
        if isinstance(stored, dict):
            recorded_for = stored.get("nodeid")
            if isinstance(recorded_for, str) and all(i.nodeid != recorded_for for i in items):
                raise pytest.UsageError(
                    f"{shown}: its schedule was recorded for {recorded_for!r}, which this run "
                    f"does not select; run: pytest {_quoted(recorded_for)} --ftrace "
                    f"--seed {self.session.seed} --ftrace-replay {token}"
                )
            recorded = stored.get("threads")
            if isinstance(recorded, int) and recorded != token.threads:
                raise pytest.UsageError(
                    f"{shown}: the token says {token.threads} threads, but its schedule was "
                    f"recorded with {recorded}"
                )
        state = config.stash[STATE_KEY]
        explicit = config.option.ftrace_threads is not None or (
            options.ini_value(config, "ftrace_threads") is not None
        )
        single = []
        for item in items:
            try:
                marked, _ = markers.marker_counts(item, state.peers)
            except markers.MarkerError:  # a collection error already
                continue
            threads = marked or (state.settings.threads if explicit else None)
            if threads is not None and threads != token.threads:
                source = "its marker" if marked else "--threads (or ini ftrace_threads)"
                raise pytest.UsageError(
                    f"{shown} replays a round of {token.threads} threads, but {item.nodeid} "
                    f"runs in {threads} ({source}); drop one of them"
                )
            reason = markers.thread_unsafe_reason(item, state.settings)
            if reason is not None:
                single.append((item.nodeid, reason))
        if single and len(single) == len(items):
            nodeid, reason = single[0]
            more = f" (and {len(single) - 1} more such test(s))" if len(single) > 1 else ""
            raise pytest.UsageError(
                f"{shown}: {nodeid} runs on one thread ({reason}){more}: nothing to replay"
            )


def _quoted(nodeid: str) -> str:
    return "'" + nodeid.replace("'", "'\"'\"'") + "'"


def _runs(decisions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive decisions for one thread."""
    out = []
    start = 0
    for i in range(1, len(decisions) + 1):
        if i == len(decisions) or decisions[i] != decisions[start]:
            out.append((start, i))
            start = i
    return out


def replay_command(item: pytest.Item, seed: int, token: Token, mode: str = "chaos") -> str:
    """A complete command, run from the rootdir, that re-runs this test's failing round."""
    nodeid = "'" + item.nodeid.replace("'", "'\"'\"'") + "'"
    named = f" --ftrace-mode {mode}" if mode != DEFAULT_MODE else ""
    return f"pytest {nodeid} --ftrace{named} --seed {seed} --ftrace-replay {token}"


def pytest_configure_node(node) -> None:
    """xdist controller: every worker gets the session seed (registered only under xdist)."""
    session = node.config.stash.get(SESSION_KEY, None)
    if session is not None:
        node.workerinput["ftrace_seed"] = session.seed


SESSION_KEY = pytest.StashKey[FtraceSession]()
