"""Rounds from a snapshot (--ftrace-rounds snapshot, the default; issue 14 item
4): every round starts from the test's starting state. Rounds run in the test's process while
they leave the module state as they found it; after a round that changed it, the rest run in
children of a process forked at the start of the call, which holds the starting state."""

from __future__ import annotations

import os
import re
import shlex
import warnings

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# A lazily made module-level singleton (check, make, publish): two threads that both find it
# missing both make one, and the one that publishes last replaces what the first one got.
LAZY_SINGLETON = """
import itertools

_made = itertools.count()
_client = None


class Client:
    def __init__(self):
        self.serial = next(_made)
        self.sessions = []


def client():
    global _client
    if _client is None:
        _client = Client()
    return _client


def test_everyone_shares_one_client(thread_index):
    mine = client()
    mine.sessions.append(thread_index)
    assert client() is mine, "a second client replaced the first"
    assert mine.serial == 0, f"client number {mine.serial} was made"
"""

# Its safe twin: the check and the making under one lock.
LAZY_SINGLETON_LOCKED = """
import itertools
import threading

_made = itertools.count()
_client = None
_lock = threading.Lock()


class Client:
    def __init__(self):
        self.serial = next(_made)
        self.sessions = []


def client():
    global _client
    with _lock:
        if _client is None:
            _client = Client()
        return _client


def test_everyone_shares_one_client(thread_index):
    mine = client()
    with _lock:
        mine.sessions.append(thread_index)
    assert client() is mine, "a second client replaced the first"
    assert mine.serial == 0, f"client number {mine.serial} was made"
"""


def run(pytester, *args):
    # a process of its own (a thread another test of this process left running would keep
    # the rounds in the test's process); the default options: snapshot
    return pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-timeout",
        "120",
        "-p",
        "no:cacheprovider",
        *args,
        timeout=600,
    )


SEEDS = 20


def test_a_first_fill_race_in_module_state_fails_with_every_seed(pytester):
    pytester.makepyfile(test_singleton=LAZY_SINGLETON)
    failed = [
        run(pytester, "--seed", str(seed), "--ftrace-shrink", "0").parseoutcomes().get("failed")
        == 1
        for seed in range(1, SEEDS + 1)
    ]
    assert sum(failed) >= 0.95 * SEEDS, failed


def test_its_safe_twin_passes(pytester):
    pytester.makepyfile(test_singleton=LAZY_SINGLETON_LOCKED)
    for seed in range(1, 6):
        result = run(pytester, "--seed", str(seed))
        result.assert_outcomes(passed=1)


def test_the_replay_of_a_first_fill_race_reproduces_10_of_10_in_a_fresh_process(pytester):
    pytester.makepyfile(test_singleton=LAZY_SINGLETON)
    # with the cache (the replay follows the recorded schedule) and shrinking from the
    # snapshot on
    first = pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-timeout",
        "120",
        "--seed",
        "3",
        timeout=600,
    )
    first.assert_outcomes(failed=1)
    lines = [line for line in first.stdout.lines if "replay: pytest " in line]
    assert lines, first.stdout.str()
    args = shlex.split(lines[0].split("replay: pytest ", 1)[1])
    assert "--ftrace-rounds" not in args  # the default: the replay line need not say it
    token = args[args.index("--ftrace-replay") + 1]
    assert re.fullmatch(r"t4i\d+\w*", token), token
    again = pytester.runpytest_subprocess(*args, "--ftrace-timeout", "120", timeout=600)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs*following the recorded schedule*"])


# Each execution writes its process id and round beside the test module.
PIDS = """
import os
import threading

_lock = threading.Lock()
_seen = []
HERE = os.path.dirname(os.path.abspath(__file__))


def record(iteration_index):
    with open(os.path.join(HERE, "pids.txt"), "a") as out:
        out.write(f"{os.getpid()} {iteration_index}\\n")


def test_keeps_nothing(iteration_index, thread_index):
    record(iteration_index)
    assert sum(range(10 + thread_index)) >= 45


def test_keeps_module_state(iteration_index, thread_index):
    record(iteration_index)
    with _lock:
        _seen.append(thread_index)
        assert len(_seen) <= 2, f"{len(_seen)} entries: a round saw another's"


def test_state_left_for_later_tests():
    # the rounds that ran in the test's process: round 0 alone changed the state there
    assert len(_seen) == 2, _seen
"""


def _pids(pytester) -> dict[int, set[int]]:
    found: dict[int, set[int]] = {}
    for line in (pytester.path / "pids.txt").read_text().split("\n"):
        if line:
            pid, iteration = map(int, line.split())
            found.setdefault(iteration, set()).add(pid)
    return found


def test_a_test_that_keeps_no_module_state_runs_every_round_in_its_process(pytester):
    pytester.makepyfile(test_pids=PIDS)
    result = run(
        pytester, "test_pids.py::test_keeps_nothing", "--seed", "1", "--threads", "2",
        "--iterations", "5",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    pids = _pids(pytester)
    assert sorted(pids) == [0, 1, 2, 3, 4]
    assert len(set().union(*pids.values())) == 1, pids  # one process: pytest's


def test_rounds_after_one_that_changed_the_state_start_from_the_snapshot(pytester):
    pytester.makepyfile(test_pids=PIDS)
    result = run(
        pytester, "test_pids.py::test_keeps_module_state",
        "test_pids.py::test_state_left_for_later_tests", "--seed", "1", "--threads", "2",
        "--iterations", "5",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    pids = _pids(pytester)
    assert sorted(pids) == [0, 1, 2, 3, 4]
    assert all(len(p) == 1 for p in pids.values()), pids  # a round runs in one process
    here = pids[0]
    later = [pids[i] for i in range(1, 5)]
    # round 0 in pytest's process; each later round changed the state too: a child each
    assert all(p != here for p in later), pids
    assert len(set().union(*later)) == 4, pids


# The rounds by budget go on from the snapshot as in the test's process.
FAST_SHARED = """
TOTAL = {"n": 0}

def test_fast_rounds():
    TOTAL["n"] += 1
"""


def test_rounds_by_budget_go_on_from_the_snapshot(pytester):
    from pytest_ftrace.options import ROUND_CAP

    pytester.makepyfile(test_fast=FAST_SHARED)
    result = run(pytester, "--seed", "1", "--ftrace-budget", "1e6")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"ftrace budget: 1 test, {ROUND_CAP} rounds in * s; 1 reached the round cap"]
    )


def test_a_snapshot_relays_an_answer_before_its_child_has_exited():
    """In a snapshot, a child's answer goes on as soon as it came: the child is
    reaped later (an exiting child of a big process takes milliseconds to go), and reaped."""
    from pytest_ftrace.ftrace import fork

    read_fd, write_fd = os.pipe()
    hold_r, hold_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child
        pid = os.fork()  # only writes and waits
    if pid == 0:  # the child: its answer, then it waits until the test lets it go
        try:
            os.close(read_fd)
            os.close(hold_w)
            fork.write_frame(write_fd, ("message", 1))
            fork.write_frame(write_fd, ("ok", "answer"))
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.close(hold_r)
    got = []
    try:
        answer = fork._collect(pid, read_fd, 60.0, got.append, wait=False)
        assert answer == ("ok", "answer")
        assert got == [1]
        assert fork.REAP == [pid]
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still there: not waited for
    finally:
        os.close(hold_w)  # the child goes
        os.close(read_fd)
    fork.reap(block=True)
    assert fork.REAP == []


def test_the_child_of_the_next_request_is_forked_ahead():
    """The snapshot forks the child of the next request while the current one runs: a request
    finds its child there, idle, already forked (the fork is not on its way)."""
    from pytest_ftrace.ftrace import fork, snapshot

    ahead = snapshot._Ahead(lambda command, send: (command, os.getpid()), (), True)
    try:
        first = ahead.run(("rounds", 1), 60.0, None)
        assert first[0] == "ok" and first[1][0] == ("rounds", 1)
        waiting = ahead.child[0]  # forked ahead, waiting for its request
        assert os.waitpid(waiting, os.WNOHANG) == (0, 0)
        second = ahead.run(("rounds", 2), 60.0, None)
        assert second == ("ok", (("rounds", 2), waiting))
    finally:
        ahead.close()
    fork.reap(block=True)
    assert fork.REAP == []


# Writes each arming of a code object (INSTRUCTION events on: instrument._arm) beside the
# tests: the process, whether it is pytest's own, and the code's name. (Compiled as
# "<counting>", so that exact mode does not hook the counting itself.)
COUNT_ARMING = """
import os

from pytest_ftrace.ftrace import instrument

COUNTING = (
    "def counting(tool_id, code):\\n"
    "    with open(os.path.join(HERE, 'armed.txt'), 'a') as out:\\n"
    "        out.write(f'{os.getpid()} {int(os.getpid() == MAIN)} {code.co_qualname}\\\\n')\\n"
    "    _arm(tool_id, code)\\n"
)
namespace = {
    "os": os,
    "MAIN": os.getpid(),
    "HERE": os.path.dirname(os.path.abspath(__file__)),
    "_arm": instrument._arm,
}
exec(compile(COUNTING, "<counting>", "exec"), namespace)
instrument._arm = namespace["counting"]
"""


def test_the_snapshot_arms_what_the_rounds_here_armed_before_its_first_child(pytester):
    """The code the rounds in the test's process armed (round 0's) is armed in the snapshot
    once, before its first child: the children start with it armed and arm none of it again
    (on a free-threaded build an arming stops the world, in every child)."""
    pytester.makepyfile(test_pids=PIDS)
    pytester.makeconftest(COUNT_ARMING)
    result = run(
        pytester, "test_pids.py::test_keeps_module_state", "--seed", "1", "--threads", "2",
        "--iterations", "5",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    pids = _pids(pytester)
    assert len(set().union(*(pids[i] for i in range(1, 5)))) == 4, pids  # four children
    by_code: dict[str, set[int]] = {}
    main: set[str] = set()
    for line in (pytester.path / "armed.txt").read_text().split("\n"):
        if line:
            pid, is_main, name = line.split()
            if is_main == "1":
                main.add(name)
            else:
                by_code.setdefault(name, set()).add(int(pid))
    assert {"test_keeps_module_state", "record"} <= main, main
    # armed again in one process only (the snapshot), not in each child
    assert all(len(p) == 1 for name, p in by_code.items() if name in main), by_code
    assert len(set().union(*by_code.values())) <= 1, by_code
