"""Exact mode: the threads of a test run one at a time and the native core's scheduler chooses
who goes on at every scheduling point, so a failing interleaving replays exactly (from its
recorded decision list), shrinks to fewer preemptions, and is drawn as lanes.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import pytest

from pytest_ftrace.ftrace.locks import blocked_for_good
from pytest_ftrace.ftrace.tokens import REPLAY_KEY, Token, cached_schedule
from pytest_ftrace.options import DEFAULT_SWITCH_BUDGET
from pytest_ftrace.report import terminal_width, wrap
from pytest_ftrace.stress.perthread import fixture_values

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import FtraceSession, TestSession
    from pytest_ftrace.report import Failure, Outcome
    from pytest_ftrace.stress.runner import Hooks

# Shrinking tries at most this many candidate schedules (each run twice): a count, not a time,
# so that the same seed shrinks to the same schedule on every run.
SHRINK_CANDIDATES = 40
# What the statistics show of exact mode (see coop.ExactTest.summary).
EXACT_STATS = ("rounds", "points", "handovers", "preemptions", "waits")


class FtraceWarning(pytest.PytestWarning):
    """Something --ftrace could not do as asked (e.g. a round that was not exact)."""


def native_options(session: FtraceSession, nodeid: str, replay: Token | None) -> dict:
    """Keyword arguments of the native run for one test in exact mode."""
    name, param = session.scheduler
    kwargs: dict = {"mode": "exact", "scheduler": name}
    if name == "pct":
        kwargs["pct_depth"] = param
    elif name == "aligned":
        kwargs["stay_percent"] = param
    elif name == "mix":
        kwargs["switch_budget"] = param
    if replay is not None and replay.k is not None:
        kwargs["sched_k"] = replay.k
    if replay is not None and replay.key and session.cache is not None:
        decisions, ignored = cached_schedule(
            session.cache.get(REPLAY_KEY + replay.key, None), nodeid
        )
        if decisions is not None:
            kwargs["replay"] = decisions
        elif ignored is not None and ignored not in session.notes:
            session.notes.append(f"ftrace: {REPLAY_KEY}{replay.key}: {ignored}")
    return kwargs


class ExactMode:
    stat_keys = EXACT_STATS
    own_budget = False  # its rounds are counted by --ftrace-budget or the count
    native_options = staticmethod(native_options)  # a mode built on this one may differ

    def __init__(self, test: TestSession):
        from pytest_ftrace.ftrace.coop import ExactTest

        self.test = test
        session, item, replay = test.session, test.item, test.replay
        self.shrink_cut_short: int | None = None  # candidates tried when time ran out
        self.race_rounds: dict[int, list[dict]] = {}  # {round: conflicts} (--ftrace-races)
        self.forked_conflicts: dict[int, list[dict]] = {}  # those of forked rounds (fork.py)
        kwargs = self.native_options(session, item.nodeid, replay)
        self.replay_exact = "replay" in kwargs  # following a recorded decision list
        self.replay_decisions: list[int] | None = kwargs.get("replay")
        self.traced = session.instrumentation.start_test(item.nodeid, **kwargs)
        seed_round = None
        if replay is not None and not self.replay_exact:
            seed_round = replay.iteration  # no decision list: reschedule from the seed
        self.exact = ExactTest(
            self.traced._native,
            test.threads,
            seed_round,
            session.instrumentation.scope,
            fixture_values(item),
        )

    @staticmethod
    def header(session: FtraceSession) -> str:
        name, param = session.scheduler
        shown = name in ("pct", "aligned") or (name == "mix" and param != DEFAULT_SWITCH_BUDGET)
        return f" scheduler={name}{param if shown else ''}"

    def hooks(self) -> Hooks:
        from pytest_ftrace.stress.runner import Hooks

        e = self.exact
        return Hooks(
            e.thread_enter,
            e.round_start,
            e.round_end,
            e.thread_exit,
            e.native.sched_release,
            blocked_for_good,
        )

    def activate(self, watchdog: bool = True) -> None:
        self.traced.activate()
        try:
            self.exact.activate(watchdog)
        except BaseException:
            self.traced.deactivate()
            raise

    def deactivate(self) -> None:
        try:
            self.exact.deactivate()
        finally:
            self.traced.deactivate()

    def forked_state(self):
        """What a forked round's process needs of this mode beyond what it inherits, and
        sends back after its rounds (plain data; None: nothing, as here)."""
        return None

    def resume_forked_state(self, state) -> None:
        """Go on from `state`, which `forked_state` gave in another process of the test."""

    def stats(self) -> dict:
        stats = self.traced.stats()
        stats.update(self.exact.summary())
        return stats

    def test_end(self, outcome: Outcome) -> None:
        from pytest_ftrace.report import Failure, internal_error

        for where, exc in self.exact.internal_errors:
            outcome.failures.append(Failure(None, None, internal_error(where, exc), "internal"))
        self._exact_notes(outcome)
        if self.test.session.instrumentation.races:
            from pytest_ftrace.ftrace.explain import passing_test

            self.race_rounds = passing_test(
                self.test, self.traced._native.id, outcome, self.forked_conflicts
            )

    def replay_note(self) -> str:
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

    def failure_report(self, outcome: Outcome, first: Failure) -> tuple[str | None, int | None]:
        """The recorded schedule (kept in the cache), its shrunk form and its lanes; returns
        (cache key, k) for the replay token."""
        key = None
        k = None
        config = self.test.item.config
        if self.test.session.instrumentation.races:
            from pytest_ftrace.ftrace.explain import failing_round

            failing_round(outcome, first, self.race_rounds)
        record = self.exact.round(first.iteration)
        if record is not None and record.get("k"):
            k = record["k"]
        if record is not None and record["decisions"]:
            key = self.test.session.store_round(
                self.test.item.nodeid, self.test.threads, first.iteration, record
            )
        shrunk = self._shrink(first, record)
        if self.shrink_cut_short is not None:
            outcome.notes.append(
                wrap(
                    f"shrinking: stopped by the --ftrace-shrink limit "
                    f"({self.test.session.shrink_seconds:g} s) after {self.shrink_cut_short} "
                    f"of {SHRINK_CANDIDATES} candidate schedules; give it more time for "
                    "the same result on every run",
                    config,
                )
            )
        if shrunk is not None and shrunk[0]["preemptions"] == 0:
            # Failing without any preemption after the run: what fails is the state
            # the test kept from the rounds that ran, not an interleaving.
            outcome.notes.append(
                wrap(
                    "shrinking: after the run, a schedule without preemptions fails too "
                    "(the test keeps state between rounds, e.g. in a module-scoped "
                    "fixture), so the lanes show the round as it ran",
                    config,
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
            steps = self.exact.steps(first.iteration)
            cut = self.exact.exit_steps.get((first.iteration, first.thread))
            labels = self.exact.thread_labels(first.iteration)
            marked = None
            if self.race_rounds.get(first.iteration):
                from pytest_ftrace.ftrace.explain import marked_at

                if first.iteration in self.forked_conflicts:  # its steps are text
                    from pytest_ftrace.ftrace.fork import marked_text

                    marked = marked_text(self.race_rounds[first.iteration]) or None
                else:
                    marked = marked_at(self.race_rounds[first.iteration], steps, cut) or None
            self._lane_view(outcome, first, record, steps, cut, False, labels, marked)
        if record is not None and not record["exact"] and not record["deadlock"]:
            outcome.notes.append(
                f"round {first.iteration} was not exact ({record['reason']}): the "
                "replay line below may not reproduce it"
            )
        return key, k

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

        from pytest_ftrace.ftrace.coop import shows_interleaving
        from pytest_ftrace.report import location

        budget = self.test.session.shrink_seconds
        body = getattr(self.test.item.obj, "ftrace_body", None)
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
        failure or None, round record, steps, cut), or None when it could not run. When the
        test's rounds are forked, so is this one: it starts from the test's starting state."""
        if self.test.forked:
            from pytest_ftrace.ftrace import fork

            return fork.schedule_in_child(
                self.test, decisions, lambda: self._run_schedule_here(body, decisions), 60.0
            )
        return self._run_schedule_here(body, decisions)

    def _run_schedule_here(self, body, decisions):
        from pytest_ftrace.ftrace.coop import ExactTest
        from pytest_ftrace.report import location
        from pytest_ftrace.stress.runner import Hooks, ThreadedRun

        original, takes_fixtures = body
        traced = self.test.session.instrumentation.start_test(
            self.test.item.nodeid, mode="exact", replay=list(decisions)
        )
        exact = ExactTest(
            traced._native,
            self.test.threads,
            None,
            self.test.session.instrumentation.scope,
            fixture_values(self.test.item),
        )
        hooks = Hooks(
            exact.thread_enter,
            exact.round_start,
            exact.round_end,
            exact.thread_exit,
            exact.native.sched_release,
            blocked_for_good,
        )
        run = ThreadedRun(
            self.test.item,
            original,
            self.test.threads,
            1,
            60.0,
            hooks=hooks,
            takes_fixtures=takes_fixtures,
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
        if self.test.session.instrumentation.races:
            from pytest_ftrace.ftrace.explain import forget

            forget(traced._native.id)
        record = exact.round(0)
        failures = [f for f in outcome.failures if f.iteration is not None]
        if record is None or not record["exact"]:
            return None
        if not failures:
            return (None, record, None, None, None, None)
        failure = min(failures, key=lambda f: f.thread)
        steps = exact.steps(0)
        cut = exact.exit_steps.get((0, failure.thread))
        where = (type(failure.exc).__name__, location(failure.exc))
        return (where, record, steps, cut, failure, exact.thread_labels(0))

    def _lane_view(
        self, outcome: Outcome, first, record, steps, cut, shrunk: bool, labels=None, marked=None
    ) -> None:
        import textwrap

        from pytest_ftrace.ftrace.coop import lanes

        if not steps:
            return
        record = record or {}
        width = terminal_width(self.test.item.config)
        which = "shrunk schedule" if shrunk else f"schedule of round {first.iteration}"
        intro = (
            f"{which} up to thread {first.thread}'s failure "
            f"({record.get('preemptions', '?')} preemptions; a row is a run of steps of one "
            "thread, shown by its first access):"
        )
        focus = bool(marked) and self.test.item.config.get_verbosity() < 1  # -v: all rows
        table = lanes(
            steps,
            cut,
            failing=first.thread,
            width=width,
            labels=labels,
            marked=marked,
            focus=focus,
        )
        outcome.notes.append("\n".join([*textwrap.wrap(intro, width), table]))

    def _exact_notes(self, outcome: Outcome) -> None:
        """Rounds that were not exact (unmanaged blocking, deadlock), said once each."""
        notes = []
        for iteration in sorted(self.exact.rounds_seen):
            counts = self.exact.round_counts(iteration)
            if counts is None or counts[3] or counts[4]:
                continue  # not finished, exact, or a deadlock (reported as a failure)
            record = self.exact.round(iteration)
            if record is not None and not record["exact"] and not record["deadlock"]:
                tail = "; it ran free from there" if record.get("released", True) else ""
                notes.append(f"ftrace: round {iteration} was not exact: {record['reason']}{tail}")
        if notes:  # the report's copy fits the terminal, the warning's stays one line per round
            outcome.notes.extend(wrap(note, self.test.item.config) for note in notes)
            warnings.warn(FtraceWarning("\n".join(notes)), stacklevel=2)


def _runs(decisions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive decisions for one thread."""
    out = []
    start = 0
    for i in range(1, len(decisions) + 1):
        if i == len(decisions) or decisions[i] != decisions[start]:
            out.append((start, i))
            start = i
    return out


MODE = ExactMode
