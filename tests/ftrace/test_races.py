"""--ftrace-races: happens-before conflicts explain failing rounds, and are reported (or fail
the test) when a test passes. Real pytest sessions on small test files."""

from __future__ import annotations

import sys

import pytest

COUNTER = """
import threading

class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1  # LINE-RMW

    def increment_locked(self, lock):
        with lock:
            self.value += 1

ROUNDS = {}
LOCK = threading.Lock()

def shared(iteration_index):
    with LOCK:
        return ROUNDS.setdefault(
            iteration_index, {"c": Counter(), "lock": threading.Lock(), "done": []}
        )
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

LOCKED_TWIN = (
    COUNTER
    + """
def test_counter_locked(iteration_index, num_parallel_threads):
    state = shared(iteration_index)
    for _ in range(3):
        state["c"].increment_locked(state["lock"])
    with state["lock"]:
        assert state["c"].value > 0
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

PRIVATE = (
    COUNTER
    + """
def test_private_counters():
    mine = Counter()  # each thread's own object
    for _ in range(5):
        mine.increment()
    assert mine.value == 5

def test_handed_over_by_start_and_join():
    box = Counter()
    box.increment()  # before the start: the child sees it
    worker = threading.Thread(target=box.increment)
    worker.start()
    worker.join()
    box.increment()  # after the join: the child's write is seen
    assert box.value == 3
"""
)

CHECK_THEN_ACT = """
import threading

REGISTRIES = {}
LOCK = threading.Lock()

def registry(iteration_index):
    with LOCK:
        return REGISTRIES.setdefault(iteration_index, ({}, []))

def test_register(iteration_index, num_parallel_threads):
    d, done = registry(iteration_index)
    key = "k"
    if key not in d:  # LINE-CHECK
        d[key] = object()  # LINE-ACT
    mine = d[key]
    done.append(mine)
    if len(done) == num_parallel_threads:
        assert all(x is done[0] for x in done), "two objects registered"
"""

ORDERED_AND_NOT = """
import threading

class Racy:
    def __init__(self):
        self.value = 0

class Locked:
    def __init__(self):
        self.n = 0

class Handed:
    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1

ROUNDS = {}
LOCK = threading.Lock()

def shared(iteration_index):
    with LOCK:
        return ROUNDS.setdefault(
            iteration_index, (Racy(), Locked(), threading.Lock(), Handed(), [])
        )

def test_mixed(iteration_index, num_parallel_threads):
    racy, locked, lock, handed, done = shared(iteration_index)
    racy.value += 1
    for _ in range(2):
        with lock:
            locked.n += 1
    with lock:
        # a child thread works on the object while this thread waits for it: start and
        # join order the parent's accesses before and after the child's
        worker = threading.Thread(target=handed.bump)
        handed.n += 1
        worker.start()
        worker.join()
        handed.n += 1
    done.append(1)
    assert len(done) < num_parallel_threads, "the last thread of a round always fails"
"""

NONLOCAL = """
import threading

def test_nonlocal_counter():
    count = 0

    def work():
        nonlocal count
        count += 1  # LINE-CELL

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count == 2, "lost update"
"""


def exact(pytester, *args):
    # The programs here keep each round's objects in module dicts keyed by round: under rounds
    # from a snapshot each round would pay a fork; they test the conflicts, in one process
    # (test_fork_results.py has the conflicts of forked rounds).
    return pytester.runpytest(
        "--ftrace",
        "--ftrace-mode",
        "exact",
        "--ftrace-rounds",
        "process",
        "--ftrace-timeout",
        "120",
        "--threads",
        "2",
        "--ftrace-shrink",
        "0",
        "-p",
        "no:cacheprovider",
        *args,
    )


def _line(source: str, marker: str) -> int:
    return next(i for i, line in enumerate(source.lstrip("\n").splitlines(), 1) if marker in line)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_lost_update_names_the_location_both_lines_and_the_class(pytester, seed):
    pytester.makepyfile(test_lost=LOST_UPDATE)
    result = exact(pytester, "--seed", str(seed))
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    rmw = _line(LOST_UPDATE, "LINE-RMW")
    result.stdout.fnmatch_lines(
        [
            "conflicts in round *",
            "*] lost update on Counter.value: both threads read it before either wrote it*",
            f"*thread ? read    test_lost.py:{rmw}   self.value += 1*",
            f"*thread ? wrote   test_lost.py:{rmw}   self.value += 1*",
            f"*thread ? wrote   test_lost.py:{rmw}   self.value += 1*",
        ]
    )
    # the lanes mark the runs that make a conflicting access
    result.stdout.fnmatch_lines(
        ["*[*] line 8 *", "*: the run makes one of the conflicting accesses*"]
    )
    # the explanation comes before the lanes, and the replay line stays last
    assert out.index("conflicts in round") < out.index("schedule of round")
    assert out.index("conflicts in round") < out.index("replay: pytest")
    notes = [line for line in result.stdout.lines if line.startswith(("replay:", "conflicts in"))]
    assert notes[-1].startswith("replay: pytest")


def test_a_check_then_act_is_classified_as_such(pytester):
    pytester.makepyfile(test_cta=CHECK_THEN_ACT)
    result = exact(pytester, "--seed", "1")
    result.assert_outcomes(failed=1)
    check, act = _line(CHECK_THEN_ACT, "LINE-CHECK"), _line(CHECK_THEN_ACT, "LINE-ACT")
    result.stdout.fnmatch_lines(
        [
            "*] check-then-act on d?'k'?: *",
            f"*thread ? read    test_cta.py:{check}   if key not in d:*",
            f"*thread ? wrote   test_cta.py:{act}   d?key? = object()*",
            f"*thread ? wrote   test_cta.py:{act}   d?key? = object()*",
        ]
    )


def test_the_locked_twin_reports_no_race(pytester):
    pytester.makepyfile(test_locked=LOCKED_TWIN)
    result = exact(pytester, "--seed", "1", "--ftrace-races", "fail")
    result.assert_outcomes(passed=1)
    assert "data race" not in result.stdout.str()
    assert "conflicts in round" not in result.stdout.str()


def test_a_passing_racy_test_is_listed_under_data_races(pytester):
    pytester.makepyfile(test_passing=PASSING_RACE)
    result = exact(pytester, "--seed", "1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*- data races: 1 in 1 test -*",
            "test_passing.py::test_racy_but_passes passed, but:",
            "conflicts in round *",
            "*lost update on Counter.value*",
        ]
    )


def test_races_fail_fails_a_passing_racy_test_with_a_replay_line(pytester):
    pytester.makepyfile(test_passing=PASSING_RACE)
    result = exact(pytester, "--seed", "1", "--ftrace-races", "fail")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*DataRaceError: 1 data race (--ftrace-races=fail), although every assertion held:*",
            "*lost update on Counter.value*",
            "*replay: pytest '*::test_racy_but_passes' --ftrace* --ftrace-races fail --seed 1 "
            "--ftrace-replay t2i*",
        ]
    )


def test_races_off_reports_nothing(pytester):
    pytester.makepyfile(test_passing=PASSING_RACE, test_lost=LOST_UPDATE)
    result = exact(pytester, "--seed", "1", "--ftrace-races", "off")
    result.assert_outcomes(passed=1, failed=1)
    assert "data race" not in result.stdout.str()
    assert "conflicts in round" not in result.stdout.str()


def test_thread_private_objects_are_never_reported(pytester):
    pytester.makepyfile(test_private=PRIVATE)
    result = exact(pytester, "--seed", "1", "--ftrace-races", "fail")
    result.assert_outcomes(passed=2)
    assert "data race" not in result.stdout.str()


def test_a_bad_races_value_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--ftrace", "--ftrace-races", "sometimes")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "error:" in line]
    assert len(errors) == 1
    assert "--ftrace-races" in errors[0] and "sometimes" in errors[0]


@pytest.mark.parametrize("seed", [1, 2])
def test_locks_and_thread_start_join_order_accesses(pytester, seed):
    """The failing round's explanation shows every kind of conflict, unclassified data races
    too: the accesses a lock or a thread's start and join order are not among them."""
    pytester.makepyfile(test_mixed=ORDERED_AND_NOT)
    result = exact(pytester, "--seed", str(seed))
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "Racy.value" in out
    assert "Locked.n" not in out
    assert "Handed.n" not in out


@pytest.mark.skipif(
    sys.version_info[:2] not in ((3, 12), (3, 13)), reason="cells are read on 3.12 and 3.13"
)
def test_a_closure_variable_is_a_location(pytester):
    """`nonlocal count; count += 1` in threads the test starts: the cell is the location, and
    the accesses before the starts and after the joins are ordered."""
    pytester.makepyfile(test_cell=NONLOCAL)
    result = exact(pytester, "--seed", "1")
    result.assert_outcomes(failed=1)
    line = _line(NONLOCAL, "LINE-CELL")
    result.stdout.fnmatch_lines(
        [
            "*] lost update on count (a closure variable): *",
            f"*thread ? read    test_cell.py:{line}   count += 1*",
        ]
    )
    explained = result.stdout.str().split("conflicts in round", 1)[1].split("schedule of", 1)[0]
    # before the starts and after the joins: ordered, never a conflict
    assert f"test_cell.py:{_line(NONLOCAL, 'count = 0')} " not in explained
    assert f"test_cell.py:{_line(NONLOCAL, 'assert count')} " not in explained
