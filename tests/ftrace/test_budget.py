"""Rounds by budget (issue 17 item 4): under --ftrace a test runs rounds until its time budget or
the round cap, unless --iterations or a marker fixes the count; a test whose first rounds touch
nothing from two threads stops after a few rounds; the summary says how the budget was spent."""

from __future__ import annotations

import re

import pytest

from pytest_ftrace.ftrace import sharing
from pytest_ftrace.options import MIN_ROUNDS, PROBE_ROUNDS, ROUND_CAP

needs_signal = pytest.mark.skipif(
    not sharing.AVAILABLE, reason="no shared-location signal on this interpreter"
)


@pytest.fixture(autouse=True)
def _rounds_here(pytester):
    # The budget's time and probe rounds, in the test's process: the files here change module
    # state in every round, which under the default (snapshot) costs a fork a round (forked
    # rounds stop at a count instead: test_fork_results.py and test_snapshot.py).
    pytester.makeini("[pytest]\nftrace_rounds = process\n")


SUMMARY = re.compile(r"^ftrace budget: (\d+) tests?, ([\d,]+) rounds in [\d.]+ s; (.*)$", re.M)


def budget_line(result) -> tuple[int, int, str]:
    match = SUMMARY.search(result.stdout.str())
    assert match, result.stdout.str()
    return int(match.group(1)), int(match.group(2).replace(",", "")), match.group(3)


INDEPENDENT = """
import collections


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def moved(self, dx):
        return Point(self.x + dx, self.y)


def build(n):
    out = []
    seen = {}
    for i in range(n):
        p = Point(i, -i).moved(1)
        out.append(p.x)
        seen[i] = p
    return out, seen


def test_objects_of_its_own():
    out, seen = build(20)
    assert out == list(range(1, 21))
    assert len(seen) == 20


def test_containers_of_its_own():
    d = collections.defaultdict(list)
    for word in "a b a c b a".split():
        d[word].append(1)
    assert {k: len(v) for k, v in d.items()} == {"a": 3, "b": 2, "c": 1}
    total = sum(x * x for x in range(10))
    assert total == 285


def gen(n):
    for i in range(n):
        yield i


def test_generators_of_its_own():
    assert list(gen(5)) == [0, 1, 2, 3, 4]
    assert sorted({i % 3 for i in gen(30)}) == [0, 1, 2]


def test_closures_of_its_own():
    forward = {f"k{n}": n * 5 for n in range(50)}
    backward = {v: k for k, v in forward.items()}
    assert all(forward[backward[v]] == v for v in backward)
    assert all(all(p % d for d in range(2, p)) for p in (3, 5, 7))
"""

READ_ONLY = """
import pytest


@pytest.fixture(scope="module")
def catalogue():
    return {f"item{n}": {"price": n, "tags": frozenset({"x", f"t{n % 4}"})} for n in range(40)}


CONFIG = {"limit": 3, "names": ["a", "b"]}


@pytest.mark.parametrize("n", range(3))
def test_reads_shared_state_only(catalogue, n):
    assert catalogue[f"item{n}"]["price"] == n
    assert catalogue.get("nothing") is None
    assert sum(1 for v in catalogue.values() if f"t{n}" in v["tags"]) == 10
    assert CONFIG["names"].count("a") == 1 and CONFIG["limit"] == 3
"""

WRITING_GET = """
class Cache:
    def __init__(self):
        self.hits = 0

    def get(self):  # named like a read, but it writes
        self.hits = self.hits + 1
        return self.hits


CACHE = Cache()


def test_calls_a_writing_get():
    CACHE.get()
"""


@needs_signal
def test_shared_state_that_is_only_read_is_nothing_shared(pytester):
    pytester.makepyfile(test_read_only=READ_ONLY)
    result = pytester.runpytest("--ftrace", "--seed", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert budget_line(result)[2] == f"3 tests stopped after {PROBE_ROUNDS} rounds (nothing shared)"


def test_a_method_named_like_a_read_counts_as_a_write_on_other_types(pytester):
    pytester.makepyfile(test_get=WRITING_GET)
    result = pytester.runpytest("--ftrace", "--seed", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "nothing shared" not in budget_line(result)[2]


@needs_signal
def test_tests_with_nothing_shared_stop_after_the_probe_rounds(pytester):
    pytester.makepyfile(test_independent=INDEPENDENT)
    result = pytester.runpytest("--ftrace", "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    tests, rounds, how = budget_line(result)
    assert (tests, rounds) == (4, 4 * PROBE_ROUNDS), result.stdout.str()
    assert how == f"4 tests stopped after {PROBE_ROUNDS} rounds (nothing shared)"


SHARED_LATE = """
SEEN = {}


def test_fails_only_in_round_9(iteration_index, thread_index):
    SEEN[thread_index] = iteration_index
    assert iteration_index != 9, "round 9"
"""


def test_a_test_with_shared_state_runs_past_the_probe_rounds(pytester):
    # Every round writes one shared dict from every thread: the budget does not stop it early,
    # so the failure of round 9 is found.
    pytester.makepyfile(test_late=SHARED_LATE)
    result = pytester.runpytest("--ftrace", "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: round 9*"])
    assert "nothing shared" not in result.stdout.str()


SLOW_SHARED = """
TOTAL = {"n": 0}


def test_slow_rounds():
    TOTAL["n"] += sum(range(300_000))  # shared, and each round takes real time
"""


def test_the_budget_stops_a_long_test(pytester):
    pytester.makepyfile(test_slow=SLOW_SHARED)
    # rounds in this process: the budget's time (forked rounds stop at a count instead:
    # test_fork_results.py)
    result = pytester.runpytest(
        "--ftrace", "--ftrace-rounds", "process", "--ftrace-budget", "0.05", "--seed", "1",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    # Each round adds up 300,000 numbers in each of 4 threads: the floor of rounds alone takes
    # far more than 0.05 s on any machine, so the budget stops the test right at the floor.
    assert budget_line(result) == (1, MIN_ROUNDS, "1 ran to the budget"), result.stdout.str()


FAST_SHARED = """
TOTAL = {"n": 0}


def test_fast_rounds():
    TOTAL["n"] += 1
"""


def test_the_round_cap_stops_a_fast_test(pytester):
    pytester.makepyfile(test_fast=FAST_SHARED)
    # rounds in this process (each round changes the module state: under the default, 200
    # forks; test_fork_results.py has the forked cap)
    result = pytester.runpytest(
        "--ftrace", "--ftrace-rounds", "process", "--ftrace-budget", "1e6", "--seed", "1",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert budget_line(result) == (1, ROUND_CAP, "1 reached the round cap")


FAILING_SHARED = """
TOTAL = {"n": 0}


def test_counts(iteration_index):
    TOTAL["n"] += 1
    assert False, "always"
"""


@pytest.mark.parametrize(
    ("args", "marker", "rounds"),
    [
        (["--iterations", "7"], "", 7),
        (["--ftrace-iterations", "5", "--ftrace-budget", "0.01"], "", 5),
        ([], "@pytest.mark.ftrace(iterations=6)", 6),
        ([], "@pytest.mark.iterations(3)", 3),
    ],
)
def test_a_fixed_count_runs_exactly_that_many_rounds(pytester, args, marker, rounds):
    source = FAILING_SHARED.replace("def test_counts", f"{marker}\ndef test_counts")
    pytester.makepyfile(test_fixed="import pytest\n" + source)
    result = pytester.runpytest("--ftrace", "--seed", "1", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*all {4 * rounds} executions: 4 threads x {rounds} iterations*"])
    assert "ftrace budget:" not in result.stdout.str()


def test_the_ini_key_sets_the_budget(pytester):
    pytester.makeini("[pytest]\nftrace_budget = 0.05\nftrace_rounds = process\n")
    pytester.makepyfile(test_slow=SLOW_SHARED)
    result = pytester.runpytest("--ftrace", "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert budget_line(result)[2] == "1 ran to the budget"
    result.stdout.fnmatch_lines(["ftrace: threads=4 iterations=by budget (0.05s, at most *"])


@pytest.mark.parametrize("value", ["-1", "abc", "0", "nan", "inf"])
def test_a_bad_budget_is_a_usage_error(pytester, value):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--ftrace", f"--ftrace-budget={value}", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "error" in line.lower()]
    assert any("--ftrace-budget must be" in line for line in errors), result.stderr.str()


@pytest.mark.parametrize("value", ["-1", "abc", "0"])
def test_a_bad_ini_budget_is_a_usage_error(pytester, value):
    pytester.makeini(f"[pytest]\nftrace_budget = {value}\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--ftrace", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini key ftrace_budget" in result.stderr.str(), result.stderr.str()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_the_budget_needs_ftrace(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--ftrace-budget", "2", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--ftrace-budget only means something with --ftrace" in result.stderr.str()


LOST_UPDATE = """
class Box:
    n = 0


BOX = Box()


def test_lost_update():
    seen = BOX.n
    BOX.n = seen + 1
    assert BOX.n == seen + 1, "another thread wrote in between"
"""


def test_a_replay_of_a_budgeted_run_reproduces_its_round(pytester):
    pytester.makepyfile(test_lost=LOST_UPDATE)
    first = pytester.runpytest("--ftrace", "--seed", "5", "--ftrace-shrink", "0")
    first.assert_outcomes(failed=1)
    line = next(x for x in first.stdout.lines if "replay: pytest " in x)
    command = line.split("replay: pytest ", 1)[1].split()
    assert "--ftrace-iterations" not in command  # rounds by budget: the default
    again = pytester.runpytest(*[part.strip("'") for part in command])
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs of round *"])
    assert "ftrace budget:" not in again.stdout.str()  # a replay runs its count
