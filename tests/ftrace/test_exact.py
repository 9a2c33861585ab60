"""--ftrace-mode exact end to end: real pytest sessions on small test files."""

from __future__ import annotations

import re
import shlex

import pytest

from pytest_ftrace import _native

ONE_SHOT = """
class Counter:
    def __init__(self):
        self.n = 0

ROUNDS = {}

def test_one_shot(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(iteration_index, {"c": Counter(), "done": []})
    state["c"].n += 1  # one racy read-modify-write per thread
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert state["c"].n == num_parallel_threads, f"lost update: {state['c'].n}"
"""

SYNCHRONISED = """
import queue
import threading
import time

ROUNDS = {}
LOCK = threading.Lock()  # made outside the test: the real one

def shared(name, iteration, factory):
    key = (name, iteration)
    with LOCK:
        if key not in ROUNDS:
            ROUNDS[key] = factory()
        return ROUNDS[key]

class Box:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()
        self.rlock = threading.RLock()
        self.cond = threading.Condition()
        self.items = []

def test_lock_and_rlock(iteration_index):
    box = shared("lock", iteration_index, Box)
    for _ in range(10):
        with box.lock:
            box.n += 1
        with box.rlock:
            with box.rlock:
                box.n += 1
    assert box.n > 0

def test_condition_handoff(iteration_index, thread_index, num_parallel_threads):
    box = shared("cond", iteration_index, Box)
    if thread_index == 0:
        for _ in range(num_parallel_threads - 1):
            with box.cond:
                box.cond.wait_for(lambda: box.items)
                box.items.pop()
    else:
        with box.cond:
            box.items.append(thread_index)
            box.cond.notify_all()

def test_semaphores(iteration_index):
    state = shared("sem", iteration_index, lambda: {
        "sem": threading.Semaphore(1), "bsem": threading.BoundedSemaphore(2), "inside": [0]})
    for _ in range(5):
        with state["sem"]:
            state["inside"][0] += 1
            assert state["inside"][0] == 1
            state["inside"][0] -= 1
        with state["bsem"]:
            pass

def test_event(iteration_index, thread_index):
    state = shared("event", iteration_index, lambda: {"ev": threading.Event(), "v": []})
    if thread_index == 0:
        state["v"].append("set")
        state["ev"].set()
    else:
        assert state["ev"].wait()
        assert state["v"] == ["set"]

def test_barrier(iteration_index, num_parallel_threads):
    state = shared("barrier", iteration_index, lambda: {
        "b": threading.Barrier(num_parallel_threads), "before": []})
    state["before"].append(1)
    state["b"].wait()
    assert len(state["before"]) == num_parallel_threads

def test_queue(iteration_index, thread_index, num_parallel_threads):
    q = shared("queue", iteration_index, queue.Queue)
    q.put(thread_index)
    assert q.get(timeout=30) in range(num_parallel_threads)
    q.task_done()

def test_sleep_polling(iteration_index, thread_index):
    state = shared("sleep", iteration_index, lambda: {"flag": False})
    if thread_index == 0:
        time.sleep(0.01)
        state["flag"] = True
    else:
        while not state["flag"]:
            time.sleep(0.001)

def test_start_and_join(iteration_index):
    box = Box()
    def work():
        for _ in range(5):
            with box.lock:
                box.n += 1
    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert box.n == 15
"""

CHILD_RACE = """
import threading

class Counter:
    def __init__(self):
        self.n = 0

def test_children_race():
    c = Counter()
    def bump():
        c.n += 1
    workers = [threading.Thread(target=bump) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert c.n == 2, f"lost update: {c.n}"
"""

DEADLOCK = """
import threading

ROUNDS = {}

class Pair:
    def __init__(self):
        self.a = threading.Lock()
        self.b = threading.Lock()
        self.n = 0

def test_two_locks(iteration_index, thread_index):
    pair = ROUNDS.setdefault(iteration_index, Pair())
    first, second = (pair.a, pair.b) if thread_index == 0 else (pair.b, pair.a)
    with first:
        pair.n += 1
        with second:
            pair.n += 1
"""

UNMANAGED = """
import os
import time

PIPE = os.pipe()

def test_pipe(thread_index):
    if thread_index == 0:
        assert os.read(PIPE[0], 1) == b"x"  # blocks in C until thread 1 writes
    else:
        time.sleep(0.01)  # hands the turn to thread 0
        os.write(PIPE[1], b"x")
"""


SHRINKABLE = """
import itertools
import threading

_local = threading.local()
_seq = itertools.count()
_shared = {}

def per_round(factory, threads):
    # every thread's i-th call gets the same object: fresh state in every round, and in every
    # run of rounds (a shrink candidate runs in new threads: a new generation)
    if not hasattr(_local, "gen"):
        _local.gen, _local.calls = next(_seq) // threads, 0
    key = (_local.gen, _local.calls)
    _local.calls += 1
    return _shared.setdefault(key, factory())

class Ids:
    def __init__(self):
        self.next_id = 0
        self.issued = {}

    def new_id(self):
        current = self.next_id
        self.next_id = current + 1
        return current

def test_ids(num_parallel_threads):
    ids = per_round(Ids, num_parallel_threads)
    me = threading.get_ident()
    for _ in range(30):
        new = ids.new_id()
        assert ids.issued.setdefault(new, me) == me, f"id {new} handed out twice"
"""


def exact(pytester, *args):
    # The tests here are about scheduling; their files keep each round's objects in module
    # dicts keyed by round, made for rounds in one process: under the default (snapshot)
    # every such round would pay a fork (test_fork.py and test_snapshot.py test those).
    return pytester.runpytest(
        "--ftrace", "--ftrace-mode", "exact", "--ftrace-rounds", "process",
        "--ftrace-timeout", "120", *args,
    )  # fmt: skip


def replay_args(result) -> list[str]:
    lines = [line for line in result.stdout.lines if "replay: pytest " in line]
    assert lines, result.stdout.str()
    return shlex.split(lines[0].split("replay: pytest ", 1)[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_shot_race_fails_with_a_fixed_seed(pytester, seed):
    pytester.makepyfile(ONE_SHOT)
    result = exact(pytester, "--seed", str(seed), "--threads", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"ftrace: seed={seed} mode=exact scheduler=mix",
            "*AssertionError: lost update: 1*",
            # exact is the default mode: the replay line does not name it
            "*replay: pytest '*::test_one_shot' --ftrace --ftrace-rounds process "
            f"--seed {seed} --ftrace-replay t2i*",
        ]
    )


def test_the_failure_shows_the_schedule_as_lanes(pytester):
    pytester.makepyfile(ONE_SHOT)
    # without shrinking: the lanes show the round as it ran (a shrunk one shows fewer rows)
    result = exact(
        pytester, "--seed", "1", "--threads", "2", "-p", "no:cacheprovider", "--ftrace-shrink", "0"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*schedule of round * up to thread *'s failure (* preemptions*",
            "*in test_the_failure_shows_the_schedule_as_lanes.py:",
            "*step  thread 0 * | thread 1*",
            "*line 9 load .n*",
            "*line 9 store .n*",
        ]
    )
    assert "@py" not in result.stdout.str().split("schedule of round", 1)[1]


def test_a_failure_is_shrunk_to_fewer_preemptions(pytester):
    pytester.makepyfile(SHRINKABLE)
    result = exact(pytester, "--seed", "1", "--ftrace-shrink", "5")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    match = re.search(r"shrunk: a schedule with (\d+) preemptions \(from (\d+)\)", out)
    assert match, out
    assert int(match.group(1)) < int(match.group(2))
    result.stdout.fnmatch_lines(["*shrunk schedule up to thread *'s failure*"])
    # the replay line still names the round as it ran, and reproduces it
    again = pytester.runpytest(*replay_args(result))
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs*following the recorded schedule*"])
    off = exact(pytester, "--seed", "1", "--ftrace-shrink", "0")
    off.assert_outcomes(failed=1)
    assert "shrunk:" not in off.stdout.str()


def test_the_same_seed_gives_the_same_failures(pytester):
    pytester.makepyfile(ONE_SHOT)
    runs = [
        exact(pytester, "--seed", "7", "--threads", "3", "-p", "no:cacheprovider") for _ in range(3)
    ]
    summaries = {re.search(r"failing: .*", r.stdout.str()).group(0) for r in runs if r.ret == 1}
    assert len(summaries) == 1, summaries
    assert all(r.ret == 1 for r in runs)


def test_pct_finds_the_one_shot_race_too(pytester):
    pytester.makepyfile(ONE_SHOT)
    # PCT's bound for a depth-2 bug: at least 1/(n*k) per round, k ~ 10 steps here.
    result = exact(
        pytester,
        "--seed",
        "1",
        "--threads",
        "2",
        "--iterations",
        "150",
        "--ftrace-scheduler",
        "pct2",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=exact scheduler=pct2"])


def test_replay_line_reproduces_on_every_run(pytester):
    pytester.makepyfile(ONE_SHOT)
    first = exact(pytester, "--seed", "3", "--threads", "2")
    first.assert_outcomes(failed=1)
    args = replay_args(first)
    assert "--ftrace-mode" not in args  # exact, the default
    for _ in range(3):
        again = pytester.runpytest(*args)
        again.assert_outcomes(failed=1)
        again.stdout.fnmatch_lines(
            [
                "*replay: reproduced in 10/10 runs of round * (seed 3, mode exact, "
                "following the recorded schedule)",
            ]
        )


def test_replay_from_the_seed_without_a_cache_is_exact(pytester):
    # No cache, so no decision list: the replay reschedules the round from the seed, with the
    # step estimate the token carries (k), and makes the same choices every time.
    pytester.makepyfile(SHRINKABLE)
    no_cache = ("-p", "no:cacheprovider", "--ftrace-shrink", "0")
    first = exact(pytester, "--seed", "5", "--threads", "2", "--iterations", "4", *no_cache)
    first.assert_outcomes(failed=1)
    args = replay_args(first)
    token = args[args.index("--ftrace-replay") + 1]
    assert re.fullmatch(r"t2i\d+k\d+", token), token
    for _ in range(3):
        again = pytester.runpytest(*args, *no_cache)
        again.assert_outcomes(failed=1)
        again.stdout.fnmatch_lines(
            ["*replay: reproduced in 10/10 runs of round * (seed 5, mode exact, rescheduled*"]
        )


def test_replay_last_runs_only_the_last_failure(pytester):
    pytester.makepyfile(test_race=ONE_SHOT, test_other="def test_fine():\n    pass\n")
    first = exact(pytester, "--seed", "2", "--threads", "2")
    first.assert_outcomes(failed=1, passed=1)
    again = pytester.runpytest("--ftrace", "--ftrace-replay", "last")
    again.assert_outcomes(failed=1, deselected=1)
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs*following the recorded schedule*"])


def test_replay_last_without_a_failure_is_a_usage_error(pytester):
    pytester.makepyfile("def test_fine():\n    pass\n")
    result = pytester.runpytest("--ftrace", "--ftrace-replay", "last", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ftrace-replay last: no failure recorded*"])


@pytest.mark.parametrize("seed", [1, 2])
def test_synchronised_code_passes_and_stays_exact(pytester, seed):
    pytester.makepyfile(SYNCHRONISED)
    result = exact(pytester, "--seed", str(seed), "--threads", "3", "--iterations", "4")
    result.assert_outcomes(passed=8)
    out = result.stdout.str()
    assert "not exact" not in out
    assert "deadlock" not in out


def test_threads_the_test_starts_are_scheduled(pytester):
    pytester.makepyfile(CHILD_RACE)
    result = exact(pytester, "--seed", "1", "--threads", "1", "--iterations", "100")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*lost update: 1*", "*replay: pytest *--ftrace* --seed 1 --ftrace-replay t1i*"]
    )
    again = pytester.runpytest(*replay_args(result))
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs*"])


def test_two_lock_deadlock_is_reported_not_hung(pytester):
    pytester.makepyfile(DEADLOCK)
    result = exact(pytester, "--seed", "1", "--threads", "2", "--iterations", "20")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "did not finish" not in out
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError*deadlock: every managed thread is blocked*",
            "*thread 0 waits for Lock made at test_two_lock_deadlock_is_reported_not_hung.py:*"
            " held by thread 1*",
            "*thread 1 waits for Lock made at *held by thread 0*",
            "*wait-for cycle: thread 0 -> thread 1 -> thread 0*",
            "*Thread 0 (most recent call last):*",
            "*ftrace: seed=1 test-seed=* mode=exact*",
            "*replay: pytest *--ftrace* --seed 1 --ftrace-replay t2i*",
        ]
    )


def test_unmanaged_blocking_is_reported_and_the_round_completes(pytester):
    pytester.makepyfile(UNMANAGED)
    result = exact(pytester, "--seed", "1", "--threads", "2", "--iterations", "1")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*FtraceWarning: ftrace: round 0 was not exact: unmanaged blocking at "
            "test_unmanaged_blocking_is_reported_and_the_round_completes.py:8*",
        ]
    )


def test_exact_is_the_default_and_ini_or_option_picks_chaos(pytester):
    pytester.makepyfile("def test_fine():\n    pass\n")
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=exact scheduler=mix"])
    result = pytester.runpytest("--ftrace", "--seed", "1", "--ftrace-scheduler", "mix16")
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=exact scheduler=mix16"])
    pytester.makeini("[pytest]\nftrace_mode = chaos\n")
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=chaos"])
    pytester.makeini("[pytest]\nftrace_scheduler = pct4\n")
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=exact scheduler=pct4"])
    result = pytester.runpytest("--ftrace", "--seed", "1", "--ftrace-mode", "chaos")
    result.stdout.fnmatch_lines(["ftrace: seed=1 mode=chaos"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ftrace-mode", "fast"], "*--ftrace-mode: invalid choice: 'fast'*"),
        (["--ftrace-scheduler", "pct0"], "*pct depth must be >= 1, not 0*"),
        (["--ftrace-scheduler", "fifo"], "*--ftrace-scheduler takes random, mix, mix<*"),
        (["--ftrace-scheduler", "mix0"], "*mix budget must be >= 1, not 0*"),
        (["--ftrace-scheduler", "random3"], "*--ftrace-scheduler takes random, mix*"),
        (["--ftrace-scheduler", "aligned101"], "*aligned stay percent must be <= 100*"),
        (["--ftrace-replay", "t2i1xZZ"], "*--ftrace-replay takes the token*"),
    ],
)
def test_bad_exact_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile("def test_fine():\n    pass\n")
    result = pytester.runpytest("--ftrace", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_native_run_checks_the_mode_and_scheduler():
    assert _native.Run(1).mode == "chaos"
    assert _native.Run(1, mode="exact").mode == "exact"
    with pytest.raises(ValueError, match="mode must be"):
        _native.Run(1, mode="fast")
    with pytest.raises(ValueError, match="scheduler must be"):
        _native.Run(1, mode="exact", scheduler="fifo")
    run = _native.Run(1, mode="exact")
    assert run.sched_me() is None
    assert run.sched_round(0) is None
    assert run.sched_point() == "free"  # a thread the run does not manage just goes on


HELPER_HOLDS_A_LOCK = """
import threading
from pytest_ftrace import ThreadConfig, run_thread

class Account:
    def __init__(self):
        self.lock = threading.Lock()
        self.balance = 100

    def try_deposit(self, amount):
        if not self.lock.acquire(timeout=0.1):
            return False
        try:
            self.balance += amount
            return True
        finally:
            self.lock.release()

class Holding(ThreadConfig):
    def __init__(self, account):
        self.account = account

    def set_up_thread(self):
        self.account.lock.acquire()

    def tear_down_thread(self):
        self.account.lock.release()

SHARED = Account()

@run_thread(Holding(SHARED))
def test_refused_while_held():
    assert SHARED.try_deposit(10) is False
"""


def test_a_helper_holding_a_lock_takes_turns_with_the_other_threads(pytester):
    # Each thread's helper waits (30 s timeout) for the lock the other helper holds, while
    # that thread's deposit gives up after 0.1 s: virtual time ends the shorter wait first,
    # so no helper set-up times out.
    pytester.makepyfile(HELPER_HOLDS_A_LOCK)
    result = exact(pytester, "--seed", "1", "--threads", "2", "--iterations", "5")
    result.assert_outcomes(passed=1)
    assert "HelperTimeout" not in result.stdout.str()


MODULE_LEVEL_PRIMITIVES = """
import threading

first, second = threading.Lock(), threading.Lock()
both_hold_one = threading.Barrier(2)
ready = threading.Event()
slots = threading.BoundedSemaphore(1)

def test_event_and_semaphore_made_at_import(thread_index):
    if thread_index == 0:
        ready.set()
    assert ready.wait(timeout=5)
    with slots:
        pass

def test_opposite_lock_order(thread_index):
    mine, theirs = (first, second) if thread_index == 0 else (second, first)
    with mine:
        both_hold_one.wait()
        with theirs:
            pass
"""


def test_primitives_made_at_import_are_cooperative(pytester):
    # The Barrier, Event and Semaphore are built on real Conditions made before the test:
    # they stand in cooperative ones, so the lock-order deadlock is found at once (not by
    # the --ftrace-timeout watchdog) and the safe test never waits in C.
    pytester.makepyfile(MODULE_LEVEL_PRIMITIVES)
    result = exact(pytester, "--seed", "3", "--threads", "2", "--iterations", "3")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "unmanaged blocking" not in out
    assert "did not finish within" not in out
    result.stdout.fnmatch_lines(
        [
            "*DeadlockError: deadlock: every managed thread is blocked",
            "*thread 0 waits for Lock made outside the test* held by thread 1",
            "*wait-for cycle: thread 0 -> thread 1 -> thread 0",
        ]
    )


# A round that computes for a while with no real blocking: meanwhile exact mode's watchdog waits.
COMPUTING = """
import threading

from pytest_ftrace import _native


def work(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def test_computes(thread_index):
    box = [0]
    for _ in range(20):
        box[0] += work(3000)
    dogs = {t.ident for t in threading.enumerate() if t.name == "ftrace-watchdog"}
    assert dogs, "no watchdog"
    assert not dogs & set(_native.native_waiters()), "the watchdog waits on a schedulable lock"
"""


def test_the_watchdog_waits_without_the_schedulable_locks(pytester):
    """The watchdog's wait is a real lock's, with the interpreter released throughout: a
    schedulable lock's wait takes the interpreter back every 20 ms slice, from the managed
    thread computing with the turn, and a round could be reported not exact for that."""
    pytester.makepyfile(COMPUTING)
    result = exact(
        pytester, "--seed", "1", "--threads", "2", "--iterations", "10", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
    assert "not exact" not in result.stdout.str()


# Arming a code object (INSTRUCTION events) stops the world on a free-threaded build: the
# arming thread sleeps until every other thread reaches a safe point. Here that takes long on
# any build: the conftest makes the first arming of the test's body in a worker sleep 0.3 s.
SLOW_ARMING_CONFTEST = """
import select
import sys
import threading

_real = sys.monitoring.set_local_events


def _slow(tool, code, events):
    if events and code.co_name == "test_arms" and threading.current_thread().name.startswith(
        "ftrace-"
    ):
        select.select([], [], [], 0.3)  # as a stop of the world waiting for a late thread
    return _real(tool, code, events)


sys.monitoring.set_local_events = _slow
"""

SLOW_ARMING_TEST = """
def test_arms(thread_index):
    mine = [thread_index]
    assert mine == [thread_index]
"""


def test_a_round_stays_exact_while_a_thread_arms_code(pytester):
    # the arming thread has the turn and sleeps in the interpreter's own pause: the watcher
    # took it for a thread blocked in C and let the round run free ("unmanaged blocking at the
    # start of the thread"), as in forked children on 3.13t under load
    pytester.makeconftest(SLOW_ARMING_CONFTEST)
    pytester.makepyfile(SLOW_ARMING_TEST)
    result = pytester.runpytest_subprocess(
        "--ftrace", "--ftrace-rounds", "process", "--ftrace-timeout", "120", "--seed", "1",
        "--threads", "2", "--iterations", "3", "-p", "no:cacheprovider", timeout=600,
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert "not exact" not in result.stdout.str()
    assert "unmanaged blocking" not in result.stdout.str()
