"""Forked rounds (--ftrace-rounds fork and fork-each; the default, snapshot, forks the same
way): every round, replay run and shrink attempt starts from the test's starting state; the
parent reports as before."""

from __future__ import annotations

import os
import re
import shlex

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# A module-level cache filled on first use (check, compute, store): two threads that both find
# it empty both compute, and the second store replaces what the first thread already returned.
FIRST_FILL = """
_cache = {}
_computed = []

def settings(name):
    if name not in _cache:
        value = {"name": name, "serial": len(_computed)}
        _computed.append(name)
        _cache[name] = value
    return _cache[name]

def test_settings_are_computed_once():
    mine = settings("db")
    assert mine is settings("db")
    assert len(_computed) == 1, f"computed {len(_computed)} times"
"""

# A registry whose first subscriber creates the topic; a second creator drops the first one's
# subscription.
FIRST_SUBSCRIBER = """
_topics = {}

class Topic:
    def __init__(self):
        self.subscribers = []

def subscribe(name, who):
    topic = _topics.get(name)
    if topic is None:
        topic = Topic()
        _topics[name] = topic
    topic.subscribers.append(who)

def test_every_subscriber_is_kept(thread_index, num_parallel_threads):
    subscribe("news", thread_index)
    assert thread_index in _topics["news"].subscribers
"""

RACES = {"first_fill": FIRST_FILL, "first_subscriber": FIRST_SUBSCRIBER}


def run(pytester, *args, rounds=None):
    # a process of its own: in this one, a thread another test left running would make the
    # rounds run here (a forked round would not have it); rounds None: fork (the default is
    # snapshot; a later --ftrace-rounds in args wins)
    where = ("--ftrace-rounds", rounds or "fork")
    return pytester.runpytest_subprocess(
        "--ftrace", *where, "--ftrace-timeout", "120", *args, timeout=600
    )


def replay_args(result) -> list[str]:
    lines = [line for line in result.stdout.lines if "replay: pytest " in line]
    assert lines, result.stdout.str()
    return shlex.split(lines[0].split("replay: pytest ", 1)[1])


@pytest.mark.parametrize("rounds", [None, "fork-each"])
@pytest.mark.parametrize("race", sorted(RACES))
def test_a_first_fill_race_in_module_state_fails_with_every_seed(pytester, race, rounds):
    pytester.makepyfile(**{f"test_{race}": RACES[race]})
    failed = []
    for seed in range(1, 11):
        result = run(
            pytester,
            "--seed",
            str(seed),
            "--ftrace-shrink",
            "0",
            "-p",
            "no:cacheprovider",
            rounds=rounds,
        )
        outcomes = result.parseoutcomes()
        failed.append(outcomes.get("failed", 0) == 1)
    assert sum(failed) >= 10, failed  # >= 95 %


@pytest.mark.parametrize("race", sorted(RACES))
def test_the_replay_of_a_first_fill_race_reproduces_every_time(pytester, race):
    pytester.makepyfile(**{f"test_{race}": RACES[race]})
    result = run(pytester, "--seed", "2", "--ftrace-shrink", "0")
    result.assert_outcomes(failed=1)
    args = replay_args(result)
    token = args[args.index("--ftrace-replay") + 1]
    assert re.fullmatch(r"t4i\d+\w*", token), token
    again = pytester.runpytest_subprocess(*args, "--ftrace-timeout", "120", timeout=600)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*reproduced in 10/10 runs*following the recorded schedule*"])


# The safe twin of FIRST_FILL: check, compute and store under one lock.
FIRST_FILL_LOCKED = """
import threading

_cache = {}
_computed = []
_lock = threading.Lock()

def settings(name):
    with _lock:
        if name not in _cache:
            value = {"name": name, "serial": len(_computed)}
            _computed.append(name)
            _cache[name] = value
        return _cache[name]

def test_settings_are_computed_once():
    mine = settings("db")
    assert mine is settings("db")
    assert len(_computed) == 1, f"computed {len(_computed)} times"
"""


def test_the_safe_twin_of_a_first_fill_race_passes(pytester):
    pytester.makepyfile(FIRST_FILL_LOCKED)
    for seed in range(1, 4):
        run(pytester, "--seed", str(seed), "-p", "no:cacheprovider").assert_outcomes(passed=1)


# Each execution writes the pid of its process to a file beside the test module.
PIDS = """
import os
import threading

_lock = threading.Lock()
_seen = []
HERE = os.path.dirname(os.path.abspath(__file__))

def record():
    with open(os.path.join(HERE, "pids.txt"), "a") as out:
        out.write(f"{os.getpid()}\\n")

def test_keeps_nothing(thread_index):
    record()
    total = sum(range(10 + thread_index))
    assert total >= 45

def test_keeps_module_state(thread_index):
    record()
    with _lock:
        _seen.append(thread_index)
"""


@pytest.mark.parametrize(
    ("test", "rounds", "children"),
    [
        ("test_keeps_nothing", None, 1),  # its child runs every round
        ("test_keeps_module_state", None, 5),  # each round leaves state: a child each
        ("test_keeps_nothing", "fork-each", 5),
    ],
)
def test_a_child_runs_the_next_round_while_its_round_kept_no_module_state(
    pytester, test, rounds, children
):
    pytester.makepyfile(test_pids=PIDS)
    result = run(
        pytester, f"test_pids.py::{test}", "--seed", "1", "--threads", "2", "--iterations", "5",
        "-p", "no:cacheprovider", rounds=rounds,
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    pids = (pytester.path / "pids.txt").read_text().split()
    assert len(pids) == 10  # 2 threads x 5 rounds
    assert len(set(pids)) == children, pids


KEPT = """
import threading

_seen = []
_lock = threading.Lock()

def test_each_round_sees_only_its_own_work(thread_index, num_parallel_threads):
    with _lock:
        _seen.append(thread_index)
        assert len(_seen) <= num_parallel_threads, f"{len(_seen)} entries: rounds share state"
"""


def test_a_round_starts_from_the_state_the_test_started_with(pytester):
    pytester.makepyfile(KEPT)
    run(pytester, "--seed", "1", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    # in this process, a round sees what the rounds before it left
    result = run(pytester, "--seed", "1", "-p", "no:cacheprovider", "--ftrace-rounds", "process")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*rounds share state*", "*replay: pytest * --ftrace* --ftrace-rounds process --seed 1 *"]
    )
    # the default (snapshot) too
    result = pytester.runpytest_subprocess(
        "--ftrace", "--ftrace-timeout", "120", "--seed", "1", "-p", "no:cacheprovider",
        timeout=600,
    )  # fmt: skip
    result.assert_outcomes(passed=1)


def test_ftrace_rounds_from_the_ini_file_and_bad_values(pytester):
    pytester.makepyfile(KEPT)
    plain = ("--ftrace", "--ftrace-timeout", "120", "--seed", "1", "-p", "no:cacheprovider")
    pytester.makeini("[pytest]\nftrace_rounds = fork\n")
    pytester.runpytest_subprocess(*plain, timeout=600).assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nftrace_rounds = snapshot\n")
    pytester.runpytest_subprocess(*plain, timeout=600).assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nftrace_rounds = process\n")
    pytester.runpytest_subprocess(*plain, timeout=600).assert_outcomes(failed=1)
    pytester.makeini("[pytest]\nftrace_rounds = sometimes\n")
    result = pytester.runpytest_subprocess(*plain, timeout=600)
    assert result.ret == 4
    result.stderr.fnmatch_lines(
        ["*ini key ftrace_rounds: snapshot, fork, fork-each or process, not 'sometimes'*"]
    )


DIFFERENT_FAILURES = """
import pickle


class Picklable(Exception):
    pass


def helper(thread_index):
    if thread_index == 1:
        raise Picklable("from a helper")


def test_kinds(thread_index, iteration_index):
    class Local(Exception):  # its class cannot be found again by pickle
        pass

    helper(thread_index)
    if thread_index == 2:
        try:
            {}["missing"]
        except KeyError as exc:
            raise ValueError("chained") from exc
    if thread_index == 3 and iteration_index % 2:
        raise Local("made in the test")
    value = [thread_index]
    assert value == [0], "thread 0 only"


def test_the_same_everywhere():
    data = {"a": 1}
    assert data["a"] == 2
"""


def _comparable(text: str) -> list[str]:
    text = re.sub(r" in [\d.]+s", "", text)
    text = re.sub(r"0x[0-9a-f]+", "0x?", text)
    return [line for line in text.splitlines() if not line.startswith(("platform", "rootdir"))]


def test_failures_read_the_same_as_from_rounds_in_this_process(pytester):
    pytester.makepyfile(DIFFERENT_FAILURES)
    # (conflict explanations too: forked children send them back)
    args = ("--seed", "4", "--ftrace-shrink", "0", "-p", "no:cacheprovider", "--iterations", "4")
    forked = run(pytester, *args)
    here = run(pytester, *args, "--ftrace-rounds", "process")
    forked.assert_outcomes(failed=2)
    out = forked.stdout.str()
    for expected in (
        "Picklable at test_failures_read_the_same_as_from_rounds_in_this_process.py:10",
        "test_kinds.<locals>.Local: made in the test",
        "ValueError: chained",
        "AssertionError: thread 0 only",
        '>       assert data["a"] == 2',
    ):
        assert expected in out, out
    here_lines = [
        line.replace(" --ftrace-rounds process --seed", " --seed")
        for line in _comparable(here.stdout.str())
    ]
    forked_lines = [
        line.replace(" --ftrace-rounds fork --seed", " --seed") for line in _comparable(out)
    ]
    assert forked_lines == here_lines


OUTPUT = """
import logging
import sys

def test_talks(thread_index, iteration_index):
    print(f"out {thread_index}/{iteration_index}")
    sys.stderr.write(f"err {thread_index}/{iteration_index}\\n")
    logging.getLogger("talk").warning("log %d/%d", thread_index, iteration_index)
    assert (thread_index, iteration_index) != (1, 2)
"""


@pytest.mark.parametrize("capture", ["fd", "sys", "tee-sys"])
def test_the_output_of_every_round_is_reported(pytester, capture):
    pytester.makepyfile(OUTPUT)
    result = run(
        pytester, "--seed", "1", "--threads", "2", "--iterations", "3", f"--capture={capture}",
        "--ftrace-shrink", "0", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    captured = out.split("Captured stdout call", 1)[1]
    for thread in (0, 1):
        for iteration in range(3):
            assert f"out {thread}/{iteration}" in captured
            assert f"err {thread}/{iteration}" in out.split("Captured stderr call", 1)[1]
            assert f"log {thread}/{iteration}" in out.split("Captured log call", 1)[1]
    assert captured.count("out 0/0") == 1


def test_a_round_that_crashes_fails_the_test_and_the_session_goes_on(pytester):
    pytester.makepyfile(
        """
        import os
        import signal

        def test_crash(iteration_index):
            if iteration_index == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        def test_after():
            pass
        """
    )
    result = run(pytester, "--seed", "1", "-p", "no:cacheprovider", "--iterations", "5")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*RoundCrashed: round 2: its process ended (killed by SIGKILL) without sending*",
            "*iterations 3-4 did not run*",
            "*replay: pytest 'test_a_round_that_crashes*::test_crash' --ftrace "
            "--ftrace-iterations 5 --ftrace-rounds fork --seed 1 --ftrace-replay t4i2*",
        ]
    )


def test_rounds_run_here_while_another_thread_runs(pytester):
    """A fixture's thread would not be in a forked child: the rounds run in this process,
    and a failure says so."""
    pytester.makepyfile(
        """
        import queue
        import threading

        import pytest

        JOBS = queue.Queue()
        DONE = []

        @pytest.fixture(scope="module")
        def worker():
            def serve():
                while (job := JOBS.get()) is not None:
                    DONE.append(job)
            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            yield
            JOBS.put(None)
            thread.join()

        def test_uses_the_worker(worker, thread_index, iteration_index):
            JOBS.put((thread_index, iteration_index))
            assert iteration_index < 3
        """
    )
    result = run(pytester, "--seed", "1", "-p", "no:cacheprovider", "--iterations", "4")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the rounds ran in this process (*"
            "*so each round saw the state the rounds before it left*"
        ]
    )


def test_exact_mode_statistics_count_the_forked_rounds(pytester):
    pytester.makepyfile(KEPT)
    result = run(
        pytester, "--seed", "3", "--threads", "3", "--iterations", "5", "-v",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    row = next(
        line
        for line in result.stdout.lines
        if line.rstrip().endswith("::test_each_round_sees_only_its_own_work")
    )
    executions, rounds, points = (int(n) for n in row.split()[:3])
    assert (executions, rounds) == (15, 5)
    assert points > 0


def test_a_warning_of_a_forked_round_is_reported(pytester):
    pytester.makepyfile(
        """
        import warnings

        def test_warns(iteration_index):
            warnings.warn(f"careful {iteration_index}", UserWarning)
        """
    )
    result = run(pytester, "--seed", "1", "-p", "no:cacheprovider", "--iterations", "2")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*UserWarning: careful 0*", "*UserWarning: careful 1*"])


def test_a_forked_round_that_hangs_fails_alone_and_leaves_no_thread_here(pytester):
    pytester.makepyfile(
        test_a_spin="""
        import threading

        def test_spins():
            while True:
                pass
        """,
        test_b_after="""
        import threading

        import pytest

        @pytest.mark.thread_unsafe  # on pytest's thread: no worker of its own to see
        def test_nothing_left_running():
            assert [t.name for t in threading.enumerate() if t.name.startswith("ftrace-")] == []
        """,
    )
    result = pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-rounds",
        "fork",
        "--seed",
        "1",
        "-p",
        "no:cacheprovider",
        "--ftrace-timeout",
        "2",
        timeout=300,
    )
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            # by budget: the rounds that ran, as in this process
            "*1 of 4 executions failed (4 threads x 1 iteration)*",
            "*did not finish within 2s (--ftrace-timeout)*",
        ]
    )


# Each round's own box (keyed by round: module state, so every forked round needs a child),
# bumped without a lock: what each thread saw at its end is the round's interleaving.
TRACED = """
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROUNDS = {}

def test_bumps(iteration_index, thread_index):
    box = ROUNDS.setdefault(iteration_index, {"n": 0})
    for _ in range(40):
        seen = box["n"]
        box["n"] = seen + 1
    with open(os.path.join(HERE, os.environ["TRACE_FILE"]), "a") as out:
        out.write(f"{iteration_index} {thread_index} {box['n']}\\n")
"""


@pytest.mark.parametrize("rounds", ["fork-each", "snapshot"])
def test_a_forked_round_is_scheduled_as_the_same_round_in_this_process(
    pytester, monkeypatch, rounds
):
    """The scheduler sizes a round's hand-overs by what it learned from the rounds before
    (the longest round's steps); a forked round gets it from the parent, so round i makes
    the same choices wherever it runs."""
    pytester.makepyfile(test_traced=TRACED)
    # Up to three tries: under heavy load a round whose workers arrive more than the core's
    # arrival timeout apart starts without the late one (a different schedule, on either
    # side); a forked round made with another step estimate differs every time.
    for attempt in range(3):
        traces = {}
        for where in ("process", rounds):
            name = f"{where}{attempt}.txt"
            monkeypatch.setenv("TRACE_FILE", name)
            result = run(
                pytester, "--seed", "3", "--threads", "2", "--iterations", "12",
                "-p", "no:cacheprovider", rounds=where,
            )  # fmt: skip
            result.assert_outcomes(passed=1)
            traces[where] = sorted((pytester.path / name).read_text().splitlines())
        assert len(traces["process"]) == 24
        if traces[rounds] == traces["process"]:
            break
    assert traces[rounds] == traces["process"]


# What a child sees of the heap it inherited, in a process that started no thread before the
# fork: whether the objects a free-threaded build immortalises at the first thread's start
# were immortal already, and whether gc had frozen them.
HEAP_IN_A_CHILD = """
import gc
import sys

from pytest_ftrace.ftrace import fork


def probe():
    pass


def look():
    return {"refcount": sys.getrefcount(probe), "frozen": gc.get_freeze_count()}


print(fork.in_child(look, 60))
"""


@pytest.mark.skipif(
    not __import__("pytest_ftrace.gil").gil.FREE_THREADED_BUILD, reason="free-threaded build"
)
def test_a_child_on_a_free_threaded_build_writes_none_of_the_heap_it_inherited(pytester):
    # 3.13t: gc.freeze/unfreeze set a bit in every object (the unfreeze after the fork copied
    # the parent's whole heap), and a child forked before any thread started immortalised
    # every function and code object when its first worker started (a write to each)
    script = pytester.makepyfile(heap=HEAP_IN_A_CHILD)
    result = pytester.run(__import__("sys").executable, str(script))
    kind, seen = eval(result.outlines[-1])  # noqa: S307 - the child's own repr
    assert kind == "ok", result.outlines
    assert seen["frozen"] == 0, "gc was frozen around the fork"
    assert seen["refcount"] > 1 << 20, "the child would immortalise the heap at its first thread"
