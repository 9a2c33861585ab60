"""--ftrace: the session seed, the instrumentation around each threaded test, the replay line,
and per-test statistics.

Seeds. The session seed comes from `--seed N|last|random` (ini `ftrace_seed`; default random).
Each test's seed is derived from the session seed and its node id, and each thread's stream from
the test seed, its thread index and the round (see `_native.derive_seed`), so a failure seen in a
run with many tests, or in an xdist worker (every worker uses the controller's session seed),
replays in a run of that test alone.

Modes. `--ftrace-mode exact` (the default) runs the threads one at a time and lets a scheduler
choose who goes on at every hooked access (`--ftrace-scheduler`: mix, the default, draws
aligned, uniform random or PCT per round; see `ftrace/modes/exact.py`, `ftrace/coop.py` and
`rust/sched/`), so a failing interleaving replays exactly. `--ftrace-mode chaos` lets the
threads run free and injects seeded yields and delays: that is what finds races inside native
code on free-threaded builds. The options themselves are registered in options.py, so that
this module loads only in runs that use --ftrace.

Replay. A failing test prints `replay: pytest '<nodeid>' --ftrace --seed N --ftrace-replay T`,
where T = `t<threads>i<iteration>` names the thread count and the first failing round. Running it
re-runs that round `--ftrace-replay-runs` times (default 10) and reports how often the failure
came back. The line names `--ftrace-mode` when it is not the default. In exact mode T ends in
`x<hash>`: the key under which the round's decision list (which thread took each step) is kept
in the pytest cache; replaying follows that list, so the same interleaving comes back on every
run (without the cache entry the round is re-scheduled from the seed). In chaos mode the round
re-runs with the same per-thread streams, which reproduces often but not always. The line also
names every other option that shapes the schedule (replay_options.py), and a replay whose options
differ from those recorded with the failure says so.
`--ftrace-replay last` replays the last failure recorded in the cache, with its options.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse
import hashlib
from typing import TYPE_CHECKING

import pytest

from pytest_ftrace import options
from pytest_ftrace.ftrace import modes
from pytest_ftrace.ftrace.tokens import (  # noqa: F401 - importers of this module use them too
    CACHE_KEY,
    LAST,
    LAST_KEY,
    REPLAY_KEY,
    CorruptCache,
    Token,
    cached_schedule,
    last_failure,
    parse_policy_item,
    parse_scheduler,
    parse_seed_option,
    parse_token,
    policy_keys,
    resolve_mode,
    resolve_policy,
    resolve_scheduler,
    session_seed,
    usable_seed,
)
from pytest_ftrace.options import (  # noqa: F401 - the defaults live with the options
    DEFAULT_ITERATIONS,
    DEFAULT_MODE,
    DEFAULT_REPLAY_RUNS,
    DEFAULT_SHRINK_SECONDS,
    DEFAULT_SWITCH_BUDGET,
    DEFAULT_THREADS,
    MODES,
)
from pytest_ftrace.report import wrap

if TYPE_CHECKING:  # imported when a threaded test runs, not when pytest starts
    from pytest_ftrace.report import Outcome
    from pytest_ftrace.stress.runner import Hooks


class FtraceSession:
    """What --ftrace keeps for the whole session."""

    def __init__(self, config: pytest.Config):
        from pytest_ftrace.ftrace.instrument import Instrumentation

        self.config = config
        self.cache = getattr(config, "cache", None)
        self.mode = resolve_mode(config)
        self.scheduler = resolve_scheduler(config)
        from pytest_ftrace.ftrace.fork import rounds_setting

        self.rounds = rounds_setting(config, self.mode)  # fork or process (--ftrace-rounds)
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
                self.rounds = rounds_setting(config, self.mode)  # the recorded mode's
                config.option.ftrace_seed = seed
                config.pluginmanager.register(_OnlyTest(nodeid), "ftrace-replay-last")
                _recorded_options(config, self.cache.get(LAST_KEY, None))
        self.seed = session_seed(config, self.notes)
        self.replay = replay
        self.replay_runs: int = config.option.ftrace_replay_runs
        self.shrink_seconds: float = max(0.0, config.option.ftrace_shrink)
        include = (config.option.ftrace_include or []) + _globs(config, "ftrace_include")
        exclude = (config.option.ftrace_exclude or []) + _globs(config, "ftrace_exclude")
        self.include, self.exclude = include, exclude
        self.policy = resolve_policy(config)
        from pytest_ftrace.ftrace.instrument import NEVER_MODULES, NoFreeToolId
        from pytest_ftrace.ftrace.project_scope import find_project

        # The project the rootdir belongs to: its packages are hooked wherever they are installed
        self.project = find_project(str(config.rootpath))
        self.project_packages = tuple(
            p for p in (self.project.packages if self.project else ()) if p not in NEVER_MODULES
        )
        try:
            self.instrumentation = Instrumentation(
                self.seed,
                str(config.rootpath),
                include,
                exclude,
                packages=self.project_packages,
                **self.policy,
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
        from pytest_ftrace.state import STATE_KEY

        # the budget's signal needs each access's object (ftrace/sharing.py)
        self.instrumentation.access_slots = config.stash[STATE_KEY].settings.budget is not None
        self.races: str = getattr(config.option, "ftrace_races", "report")
        self.race_reports: list[tuple[str, int, str]] = []  # passing tests' conflicts
        if self.mode == "exact" and self.races != "off":
            from pytest_ftrace.ftrace import explain

            explain.start()
            self.instrumentation.races = True
        if self.replay is not None:
            config.pluginmanager.register(_ReplayCheck(self), "ftrace-replay-check")
        self.stats: list[tuple[str, dict]] = []
        self.replays: list[tuple[str, int, int]] = []
        self.budgets: list[tuple[str, int, float, str]] = []  # (nodeid, rounds, s, why)
        self.explored: list[tuple[str, str]] = []  # explore mode: what each test's run proved
        if self.cache is not None:
            self.cache.set(CACHE_KEY, self.seed)

    def close(self) -> None:
        if self.instrumentation.races:
            from pytest_ftrace import _native

            _native.races_enable(False)
        self.instrumentation.close()

    def header(self) -> str:
        replay = f" replay={self.replay} x{self.replay_runs}" if self.replay else ""
        described = modes.mode_class(self.mode).header(self)
        notes = "".join("\n" + note for note in self.notes)
        from pytest_ftrace.ftrace.project_scope import describe

        hooked = describe(self.config.rootpath, self.project, self.include, self.exclude)
        return f"ftrace: seed={self.seed} mode={self.mode}{described}{replay}\n{hooked}{notes}"

    def run_options(self) -> dict:
        """This run's schedule-shaping options (replay_options.py)."""
        from pytest_ftrace.ftrace.replay_options import run_options
        from pytest_ftrace.state import STATE_KEY

        settings = self.config.stash[STATE_KEY].settings
        return run_options(self, settings.iterations if settings.budget is None else None)

    def replay_options(self) -> str:
        """The options a replay line names after --ftrace (empty, or starting with a space)."""
        from pytest_ftrace.ftrace.replay_options import command_line

        return "".join(" " + part for part in command_line(self.run_options()))

    def options_differ(self, nodeid: str, token: Token) -> str | None:
        """A replay: which of this run's options differ from those recorded with the failure
        (None: the same, or no record in the cache)."""
        from pytest_ftrace.ftrace import replay_options

        if self.cache is None:
            return None
        key = replay_options.OPTIONS_KEY + replay_options.record_key(nodeid, self.seed, token)
        found = replay_options.differences(self.cache.get(key, None), self.run_options())
        if not found:
            return None
        return (
            f"ftrace: this replay of {nodeid} runs with other options than the recorded "
            f"failure, so the round may not come back: {'; '.join(found)}"
        )

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
                "options": self.run_options(),
                "decisions": decisions,
            },
        )
        return digest

    def remember_failure(self, nodeid: str, token: Token) -> None:
        if self.cache is not None:
            from pytest_ftrace.ftrace import replay_options

            opts = self.run_options()
            self.cache.set(
                LAST_KEY,
                {
                    "nodeid": nodeid,
                    "token": str(token),
                    "seed": self.seed,
                    "mode": self.mode,
                    "options": opts,
                },
            )
            key = replay_options.record_key(nodeid, self.seed, token)
            self.cache.set(replay_options.OPTIONS_KEY + key, opts)

    def start(
        self, item: pytest.Item, threads: int, iterations: int, budget: float | None = None
    ) -> TestSession:
        return TestSession(self, item, threads, iterations, budget)


class TestSession:
    """One test's threaded run under --ftrace: what is common to every mode (seeds, the replay
    line, statistics). What differs is the mode object's (`ftrace.modes`)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(
        self,
        session: FtraceSession,
        item: pytest.Item,
        threads: int,
        iterations: int,
        budget: float | None = None,
    ):
        self.session = session
        self.item = item
        self.mode = session.mode
        self.replay = session.replay
        if session.replay_nodeid is not None and session.replay_nodeid != item.nodeid:
            self.replay = None
        if self.replay is not None:
            threads, iterations = self.replay.threads, session.replay_runs
            budget = None  # a replay runs its count
        if modes.mode_class(self.mode).own_budget:
            budget = None  # explore mode's search has its own budget
        self.threads = threads
        self.iterations = iterations
        self.forked = False  # its rounds run in forked processes (ftrace/fork.py)
        self.children = 0  # the forked processes its rounds ran in (ftrace/fork.py)
        self.snapshot = None  # the child holding its starting state (ftrace/snapshot.py)
        self.run: modes.RunMode = modes.mode_class(self.mode)(self)
        self.traced = self.run.traced
        self.budget = None  # ftrace/budget.py: rounds by budget, not by count
        if budget is not None:
            from pytest_ftrace.ftrace.budget import Budget
            from pytest_ftrace.ftrace.sharing import AVAILABLE

            self.budget = Budget(budget, iterations, AVAILABLE)

    def go_on(self, n: int) -> bool:
        """Whether round n runs (the stress runner asks between rounds)."""
        return self.budget.go_on(n)

    def hooks(self) -> Hooks:
        return self.run.hooks()

    def finish(self, outcome: Outcome) -> None:
        """Add the seed, the replay line and the statistics to the outcome and the report."""
        run = self.run
        if self.budget is not None:
            rounds, seconds, why = self.budget.finish()
            self.session.budgets.append((self.item.nodeid, rounds, seconds, why))
            self.item.user_properties.append(("ftrace_budget", f"{rounds} rounds: {why}"))
        stats = run.stats()
        stats["mode"] = self.mode
        self.session.stats.append((self.item.nodeid, stats))
        mode = self.mode
        run.test_end(outcome)
        props = self.item.user_properties
        props.append(("ftrace_seed", self.session.seed))
        props.append(("ftrace_test_seed", self.traced.seed))
        kinds = ("generator_points", "iteration_points", "generated_code")
        for key in ("executions", "hooked", *kinds, *run.stat_keys):
            if key in stats:
                props.append((f"ftrace_{key}", stats[key]))
        if self.replay is not None:
            failed_rounds = {f.iteration for f in outcome.failures if f.iteration is not None}
            self.session.replays.append(
                (self.item.nodeid, len(failed_rounds), self.session.replay_runs)
            )
            outcome.notes.append(
                f"replay: reproduced in {len(failed_rounds)}/{self.session.replay_runs} runs of "
                f"round {self.replay.iteration} (seed {self.session.seed}, mode {mode}"
                f"{run.replay_note()})"
            )
            differ = self.session.options_differ(self.item.nodeid, self.replay)
            if differ is not None:
                outcome.notes.append(wrap(differ, self.item.config))
                if differ not in self.session.notes:
                    self.session.notes.append(differ)
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
            key, k = run.failure_report(outcome, first)
            token = Token(self.threads, first.iteration, key, k)
            self.session.remember_failure(self.item.nodeid, token)
            outcome.notes.append(
                "replay: "
                + replay_command(
                    self.item, self.session.seed, token, mode, self.session.replay_options()
                )
            )


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


class _ReplayCheck:
    """--ftrace-replay: before any test runs, a token that cannot replay in this run is a usage
    error (another test's schedule, another thread count, a test that runs on one thread)."""

    def __init__(self, session: FtraceSession):
        self.session = session

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        from pytest_ftrace import markers
        from pytest_ftrace.state import STATE_KEY

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
                from pytest_ftrace.ftrace.replay_options import command_line

                opts = stored.get("options")
                named = "".join(
                    " " + p for p in command_line(opts if isinstance(opts, dict) else {})
                )
                raise pytest.UsageError(
                    f"{shown}: its schedule was recorded for {recorded_for!r}, which this run "
                    f"does not select; run: pytest {_quoted(recorded_for)} --ftrace{named} "
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


def replay_command(
    item: pytest.Item, seed: int, token: Token, mode: str = "chaos", named: str | None = None
) -> str:
    """A complete command, run from the rootdir, that re-runs this test's failing round.
    `named`: the schedule-shaping options after --ftrace (FtraceSession.replay_options: mode,
    scheduler, policy, globs, iterations, rounds); by default the mode alone."""
    nodeid = "'" + item.nodeid.replace("'", "'\"'\"'") + "'"
    if named is None:
        named = f" --ftrace-mode {mode}" if mode != DEFAULT_MODE else ""
    return f"pytest {nodeid} --ftrace{named} --seed {seed} --ftrace-replay {token}"


def _globs(config: pytest.Config, key: str) -> list[str]:
    """The module globs of ini key `key`; a value that is not text (a TOML number) is a usage
    error naming the key."""
    globs = list(options.ini_value(config, key) or [])
    for glob in globs:
        if not isinstance(glob, str):
            raise pytest.UsageError(f"ini key {key}: module globs are text, not {glob!r}")
    return globs


def _recorded_options(config: pytest.Config, last) -> None:
    """`--ftrace-replay last`: the options recorded with the failure stand in for those the
    command line leaves unset (include, exclude, scheduler, policy). A record without usable
    options changes nothing; the replay then says what differs."""
    opts = last.get("options") if isinstance(last, dict) else None
    if not isinstance(opts, dict):
        return
    option = config.option
    for dest, field in (("ftrace_include", "include"), ("ftrace_exclude", "exclude")):
        globs = opts.get(field)
        if getattr(option, dest, None) is None and isinstance(globs, list):
            if all(isinstance(g, str) for g in globs):
                setattr(option, dest, list(globs))
    scheduler = opts.get("scheduler")
    if option.ftrace_scheduler is None and isinstance(scheduler, str):
        try:
            option.ftrace_scheduler = parse_scheduler(scheduler)
        except argparse.ArgumentTypeError:
            pass
    policy = opts.get("policy")
    if option.ftrace_policy is None and isinstance(policy, dict):
        try:
            option.ftrace_policy = [parse_policy_item(f"{k}={v}") for k, v in policy.items()]
        except argparse.ArgumentTypeError:
            pass


def pytest_configure_node(node) -> None:
    """xdist controller: every worker gets the session seed (registered only under xdist)."""
    session = node.config.stash.get(SESSION_KEY, None)
    if session is not None:
        node.workerinput["ftrace_seed"] = session.seed


SESSION_KEY = pytest.StashKey[FtraceSession]()
