"""Rounds by budget (`--ftrace-budget SECONDS`, ini `ftrace_budget`): unless the round count is
fixed (`--iterations`, ini `ftrace_iterations`, a marker, a replay), a test under --ftrace runs
rounds until its rounds have taken the budget in real time (default 1 s) or it reaches the
round cap, whichever comes first, but never fewer than MIN_ROUNDS (the fixed count the default
was before: on a slow or loaded machine a race is not missed for want of rounds); and a test
whose first rounds touch no object from two threads with one of them writing (rust/shared.rs,
ftrace/sharing.py) has nothing to interleave and stops after PROBE_ROUNDS rounds. A test that
does touch one keeps going to the budget: stopping early never drops a round that could fail.

The decision is taken between rounds, by the round barrier's action in one worker thread while
every other waits (stress/runner.py), so every thread runs the same rounds. Which rounds run
does not change what a round does: round i's schedule comes from the seed and i, so a replay
token names its round whatever the budget was.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import time

from pytest_ftrace import _native
from pytest_ftrace.options import DEFAULT_BUDGET, MIN_ROUNDS, PROBE_ROUNDS

# Why a test's rounds stopped (what the summary counts).
NOTHING_SHARED = "nothing shared"
BUDGET = "budget"
CAP = "cap"
ALL = "all"  # ran every round it was given (the cap, or the run ended early: a hang)


def _real_monotonic() -> float:
    """Real time, also in a managed thread (exact mode's virtual clock stands in there)."""
    return (_native.real_clock("monotonic") or time.monotonic)()


class Budget:
    """One test's budget: `go_on(n)` before round n, `finish()` when its rounds are over."""

    def __init__(self, seconds: float, cap: int, signal: bool):
        self.seconds = seconds
        self.cap = cap
        # Whether the shared-location signal is there (not on interpreters whose frames the
        # extension cannot read): without it no test stops early. Forked rounds carry it on
        # in their processes and send it back (ftrace/fork.py).
        self.signal = signal
        self.shared: str | None = None if signal else "no signal"
        self.started: float | None = None
        self.elapsed = 0.0
        self.rounds = 0  # rounds started
        self.reason: str | None = None
        self.tracking = False
        # rounds by count instead of time (`by_count`): set for the rounds that run in forked
        # children, whose forks would otherwise take the budget, the more so the busier the
        # machine, so that the same seed would no longer run the same rounds
        self.count: int | None = None

    def go_on(self, n: int) -> bool:
        """Whether round `n` runs (called once per round, between rounds, in one thread)."""
        now = _real_monotonic()
        if n == 0:
            self.started = now
            if self.signal:
                _native.shared_track(True)
                self.tracking = True
            self.rounds = 1
            return True
        self.elapsed = now - (self.started or now)
        if self.tracking:
            why = _native.shared_take()
            if why is not None:
                self.shared = why
                _native.shared_track(False)  # known now: no need to watch any more
                self.tracking = False
        if n >= self.cap:
            self.reason = CAP
        elif self.count is not None:
            if n >= self.count:
                self.reason = BUDGET
        elif self.elapsed >= self.seconds and n >= MIN_ROUNDS:
            self.reason = BUDGET
        elif self.shared is None and n >= PROBE_ROUNDS:
            self.reason = NOTHING_SHARED
        if self.reason is not None:
            self.stop_tracking()
            return False
        self.rounds = n + 1
        return True

    def by_count(self) -> None:
        """From here on, the rounds stop at a count that depends on the options only:
        MIN_ROUNDS for the default budget, in proportion for a larger one (at most the cap)."""
        if self.count is None:
            share = max(1.0, self.seconds / DEFAULT_BUDGET)
            self.count = min(self.cap, max(self.rounds, round(MIN_ROUNDS * share)))

    def stop_tracking(self) -> None:
        if self.tracking:
            _native.shared_track(False)
            self.tracking = False

    def finish(self) -> tuple[int, float, str]:
        """(rounds run, seconds, why they stopped)."""
        self.stop_tracking()
        if self.started is not None and self.reason is None:
            self.elapsed = _real_monotonic() - self.started
            if self.rounds >= self.cap:
                self.reason = CAP
        return self.rounds, self.elapsed, self.reason or ALL


def summary(records: list[tuple[str, int, float, str]]) -> str | None:
    """The summary line of the tests that ran by budget ((nodeid, rounds, seconds, why) each)."""
    if not records:
        return None
    rounds = sum(r[1] for r in records)
    seconds = sum(r[2] for r in records)
    count = {why: 0 for why in (NOTHING_SHARED, BUDGET, CAP, ALL)}
    for record in records:
        count[record[3]] = count.get(record[3], 0) + 1
    parts = []
    if count[NOTHING_SHARED]:
        parts.append(
            f"{_tests(count[NOTHING_SHARED])} stopped after {PROBE_ROUNDS} rounds (nothing shared)"
        )
    if count[BUDGET]:
        parts.append(f"{count[BUDGET]} ran to the budget")
    if count[CAP]:
        parts.append(f"{count[CAP]} reached the round cap")
    if count[ALL]:
        parts.append(f"{count[ALL]} ended otherwise")
    return (
        f"ftrace budget: {_tests(len(records))}, {rounds:,} rounds in {seconds:.1f} s; "
        + ", ".join(parts)
    )


def _tests(n: int) -> str:
    return f"{n} test" if n == 1 else f"{n} tests"
