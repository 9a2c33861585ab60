"""What forked rounds send back besides failures (issue 14 item 4): each round's happens-before
conflicts (explanations, the 'data races' section, --ftrace-races fail) and the budget's state
(its "anything shared?" signal, its start and its rounds), so that rounds in child processes
report and stop as rounds in the test's process do."""

from __future__ import annotations

import os
import re

import pytest

from pytest_ftrace.ftrace import sharing
from pytest_ftrace.options import MIN_ROUNDS, PROBE_ROUNDS, ROUND_CAP

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FORKED = ["fork", "fork-each"]

# One counter per round, kept in a module-level dict: every round changes the module's state,
# so under fork too each round runs in a child of its own.
COUNTER = """
import threading

class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1  # LINE-RMW

ROUNDS = {}
LOCK = threading.Lock()

def shared(iteration_index):
    with LOCK:
        return ROUNDS.setdefault(iteration_index, {"c": Counter(), "done": []})
"""

LOST_UPDATE = (
    COUNTER
    + """
def test_counter(iteration_index, num_parallel_threads):
    state = shared(iteration_index)
    state["c"].increment()
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert state["c"].value == num_parallel_threads, "lost update"
"""
)

PASSING_RACE = (
    COUNTER
    + """
def test_racy_but_passes(iteration_index):
    state = shared(iteration_index)
    for _ in range(3):
        state["c"].increment()  # no assertion looks at the count
"""
)


def exact(pytester, rounds, *args):
    return pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-rounds",
        rounds,
        "--ftrace-timeout",
        "120",
        "--threads",
        "2",
        "--ftrace-shrink",
        "0",
        "-p",
        "no:cacheprovider",
        *args,
        timeout=600,
    )


def _line(source: str, marker: str) -> int:
    return next(i for i, line in enumerate(source.lstrip("\n").splitlines(), 1) if marker in line)


@pytest.mark.parametrize("rounds", FORKED)
def test_a_forked_round_s_failure_is_explained_by_its_conflicts(pytester, rounds):
    pytester.makepyfile(test_lost=LOST_UPDATE)
    result = exact(pytester, rounds, "--seed", "1")
    result.assert_outcomes(failed=1)
    rmw = _line(LOST_UPDATE, "LINE-RMW")
    result.stdout.fnmatch_lines(
        [
            "conflicts in round *",
            "*] lost update on Counter.value: both threads read it before either wrote it*",
            f"*thread ? read    test_lost.py:{rmw}   self.value += 1*",
            f"*thread ? wrote   test_lost.py:{rmw}   self.value += 1*",
        ]
    )
    # the lanes (whose steps came back as text) mark the conflicting accesses too
    result.stdout.fnmatch_lines(
        ["*[*] line 8 *", "*: the run makes one of the conflicting accesses*"]
    )
    assert "rounds ran in this process" not in result.stdout.str()


@pytest.mark.parametrize("rounds", FORKED)
def test_a_passing_racy_test_with_forked_rounds_is_listed_under_data_races(pytester, rounds):
    pytester.makepyfile(test_passing=PASSING_RACE)
    result = exact(pytester, rounds, "--seed", "1", "--iterations", "6")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*- data races: 1 in 1 test -*",
            "test_passing.py::test_racy_but_passes passed, but:",
            "conflicts in round *",
            "*lost update on Counter.value*",
        ]
    )


@pytest.mark.parametrize("rounds", FORKED)
def test_races_fail_fails_each_racy_forked_round(pytester, rounds):
    pytester.makepyfile(test_passing=PASSING_RACE)
    result = exact(pytester, rounds, "--seed", "1", "--iterations", "6", "--ftrace-races", "fail")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*DataRaceError: 1 data race (--ftrace-races=fail), although every assertion held:*",
            "*lost update on Counter.value*",
            "*replay: pytest '*::test_racy_but_passes' --ftrace* --ftrace-races fail --seed 1 "
            "--ftrace-replay t2i*",
        ]
    )


# -- rounds by budget -----------------------------------------------------------------------------

SUMMARY = re.compile(r"^ftrace budget: (\d+) tests?, ([\d,]+) rounds in [\d.]+ s; (.*)$", re.M)


def budget_line(result) -> tuple[int, int, str]:
    match = SUMMARY.search(result.stdout.str())
    assert match, result.stdout.str()
    return int(match.group(1)), int(match.group(2).replace(",", "")), match.group(3)


def by_budget(pytester, rounds, *args):
    return pytester.runpytest_subprocess(
        "--ftrace", "--ftrace-rounds", rounds, "--seed", "1", "-p", "no:cacheprovider", *args,
        timeout=600,
    )  # fmt: skip


# Each thread works on objects of its own: nothing is shared, no module state is kept.
INDEPENDENT = """
class Point:
    def __init__(self, x):
        self.x = x

def test_objects_of_its_own():
    p = Point(1)
    p.x += 1
    assert p.x == 2

def test_containers_of_its_own():
    d = {}
    for i in range(5):
        d[i] = [i]
    assert len(d) == 5
"""


@pytest.mark.skipif(not sharing.AVAILABLE, reason="no shared-location signal here")
@pytest.mark.parametrize("rounds", FORKED)
def test_forked_tests_with_nothing_shared_stop_after_the_probe_rounds(pytester, rounds):
    pytester.makepyfile(test_independent=INDEPENDENT)
    result = by_budget(pytester, rounds)
    result.assert_outcomes(passed=2)
    tests, total, how = budget_line(result)
    assert (tests, total) == (2, 2 * PROBE_ROUNDS), result.stdout.str()
    assert how == f"2 tests stopped after {PROBE_ROUNDS} rounds (nothing shared)"


# Shared, and every round changes module state (a new int in the dict): a child per round.
FAST_SHARED = """
TOTAL = {"n": 0}

def test_fast_rounds():
    TOTAL["n"] += 1
"""

SLOW_SHARED = """
TOTAL = {"n": 0}

def test_slow_rounds():
    TOTAL["n"] += sum(range(300_000))  # shared, and each round takes real time
"""


@pytest.mark.parametrize("rounds", FORKED)
def test_the_round_cap_stops_a_fast_forked_test(pytester, rounds):
    pytester.makepyfile(test_fast=FAST_SHARED)
    result = by_budget(pytester, rounds, "--ftrace-budget", "1e6")
    result.assert_outcomes(passed=1)
    assert budget_line(result) == (1, ROUND_CAP, "1 reached the round cap"), result.stdout.str()


@pytest.mark.parametrize("rounds", FORKED)
def test_the_budget_stops_a_long_forked_test_at_the_floor(pytester, rounds):
    pytester.makepyfile(test_slow=SLOW_SHARED)
    result = by_budget(pytester, rounds, "--ftrace-budget", "0.05")
    result.assert_outcomes(passed=1)
    # the floor of rounds alone takes far more than 0.05 s: the budget stops at the floor, the
    # time counted from the first round of the first child on
    assert budget_line(result) == (1, MIN_ROUNDS, "1 ran to the budget"), result.stdout.str()
