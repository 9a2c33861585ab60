"""--ftrace end to end: real pytest sessions on small test files (chaos mode)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from pytest_ftrace.options import PROBE_ROUNDS, ROUND_CAP

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

ONE_RACE = """
import threading

class Counter:
    def __init__(self):
        self.n = 0

COUNTER = Counter()
LOCK = threading.Lock()
CALLS = []

def test_lost_update(num_parallel_threads, iteration_index, thread_index):
    # each round starts from zero; every thread adds 50, so the round must end at 50 * threads
    # (and the last thread leaves the module state as the round found it)
    for _ in range(50):
        COUNTER.n += 1
    with LOCK:
        CALLS.append(iteration_index)
        done = CALLS.count(iteration_index)
        if done == num_parallel_threads:
            CALLS.clear()
    if done == num_parallel_threads:
        total, COUNTER.n = COUNTER.n, 0
        assert total == 50 * num_parallel_threads, f"lost {50 * num_parallel_threads - total}"
"""

# A race-free test for the seed and report tests: a locked counter that each thread takes back
# down, so that a round leaves the module state as it found it (under rounds from a snapshot a
# round that changed it would make every later round pay a fork; these tests are not about that;
# ONE_RACE above ends its rounds the same way).
SAFE = """
import threading

LOCK = threading.Lock()
STATE = {"n": 0}

def test_locked_counter():
    for _ in range(50):
        with LOCK:
            STATE["n"] += 1
    for _ in range(50):
        with LOCK:
            STATE["n"] -= 1
"""


def header_seed(result) -> int:
    match = re.search(r"^ftrace: seed=(\d+) mode=(\w+)", result.stdout.str(), re.M)
    assert match, result.stdout.str()
    return int(match.group(1))


def replay_line(result) -> str:
    lines = [line for line in result.stdout.lines if "replay: pytest " in line]
    assert lines, result.stdout.str()
    return lines[0].split("replay: ", 1)[1].strip()


@pytest.fixture
def example(pytester):
    pytester.makepyfile(test_ids=(EXAMPLES / "test_ids.py").read_text())
    return pytester


def test_racy_example_fails_under_ftrace_and_passes_without(example):
    plain = example.runpytest("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=2)
    for seed in (1, 2, 3, 4, 5):
        traced = example.runpytest("-p", "no:cacheprovider", "--ftrace", "--seed", str(seed))
        traced.assert_outcomes(failed=1, passed=1)
        traced.stdout.fnmatch_lines(["FAILED test_ids.py::test_racy_ids_are_unique*"])
        assert header_seed(traced) == seed


def test_header_names_seed_and_mode(pytester):
    pytester.makepyfile(SAFE)
    result = pytester.runpytest("--ftrace", "--seed", "1234")
    result.assert_outcomes(passed=1)
    assert header_seed(result) == 1234
    result.stdout.fnmatch_lines(["ftrace: threads=4 iterations=by budget (1s, at most 200) *"])


def test_without_ftrace_there_is_no_seed_line(pytester):
    pytester.makepyfile(SAFE)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "ftrace: seed=" not in result.stdout.str()


def test_random_seeds_differ_and_last_reuses_the_previous_one(pytester):
    pytester.makepyfile(SAFE)
    seeds = {header_seed(pytester.runpytest("--ftrace")) for _ in range(3)}
    assert len(seeds) > 1
    first = header_seed(pytester.runpytest("--ftrace", "--seed", "987654321"))
    assert first == 987654321
    again = pytester.runpytest("--ftrace", "--seed", "last")
    again.assert_outcomes(passed=1)
    assert header_seed(again) == 987654321


def test_seed_last_without_a_cache_is_a_usage_error(pytester):
    pytester.makepyfile(SAFE)
    result = pytester.runpytest("--ftrace", "--seed", "last", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--seed last: no previous seed*"])


def test_seed_from_ini(pytester):
    pytester.makepyfile(SAFE)
    pytester.makeini("[pytest]\nftrace_seed = 4242\n")
    assert header_seed(pytester.runpytest("--ftrace")) == 4242
    assert header_seed(pytester.runpytest("--ftrace", "--seed", "7")) == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "abc"], "*--seed must be a whole number*'abc'*"),
        (["--seed", "-1"], "*--seed must be a whole number between 0 and 2**64-1*-1*"),
        (["--ftrace-replay", "x9"], "*--ftrace-replay takes the token*'x9'*"),
        (["--ftrace-policy", "yield_probability"], "*--ftrace-policy takes KEY=VALUE*"),
        (["--ftrace-policy", "nope=1"], "*--ftrace-policy takes KEY=VALUE*'nope=1'*"),
        (["--ftrace-policy", "max_spin_ns=fast"], "*max_spin_ns must be a whole number*"),
        (["--ftrace-policy", "yield_probability=2"], "*yield_probability*"),
    ],
)
def test_bad_ftrace_options_are_usage_errors(pytester, args, message):
    pytester.makepyfile(SAFE)
    result = pytester.runpytest("--ftrace", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_bad_ini_seed_is_a_usage_error(pytester):
    pytester.makepyfile(SAFE)
    pytester.makeini("[pytest]\nftrace_seed = soon\n")
    result = pytester.runpytest("--ftrace")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ftrace_seed*'soon'*"])


def test_failure_carries_seed_mode_thread_iteration_and_replay(pytester):
    pytester.makepyfile(test_race=ONE_RACE)
    result = pytester.runpytest("--ftrace", "--seed", "31", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert re.search(
        r"ftrace: seed=31 test-seed=\d+ mode=\w+; first failure in thread \d+, "
        r"iteration \d+",
        out,
    ), out
    command = replay_line(result)
    assert command.startswith("pytest 'test_race.py::test_lost_update' --ftrace --seed 31 ")
    assert "--ftrace-replay " in command


def test_replay_line_reruns_the_failing_round(pytester):
    pytester.makepyfile(test_race=ONE_RACE)
    first = pytester.runpytest("--ftrace", "--seed", "31", "-p", "no:cacheprovider")
    first.assert_outcomes(failed=1)
    argv = shlex.split(replay_line(first))
    assert argv[0] == "pytest"
    replay = pytester.runpytest(*argv[1:], "-p", "no:cacheprovider")
    replay.assert_outcomes(failed=1)
    match = re.search(r"reproduced in (\d+)/(\d+) runs", replay.stdout.str())
    assert match, replay.stdout.str()
    assert int(match.group(2)) == 10
    assert int(match.group(1)) >= 1
    replay.stdout.fnmatch_lines(["ftrace replay: test_race.py::test_lost_update: reproduced */10"])


def test_replay_runs_option_sets_k(pytester):
    pytester.makepyfile(test_race=ONE_RACE)
    result = pytester.runpytest(
        "--ftrace", "--seed", "31", "--ftrace-replay", "t4i0", "--ftrace-replay-runs", "3"
    )
    result.stdout.fnmatch_lines(["*reproduced */3*"])
    result.stdout.fnmatch_lines(["ftrace: seed=31 mode=* replay=t4i0 x3"])


def test_test_seed_depends_on_the_node_id_not_the_rest_of_the_run(pytester):
    pytester.makepyfile(test_race=ONE_RACE, test_other=SAFE)
    both = pytester.runpytest("--ftrace", "--seed", "8", "-p", "no:cacheprovider")
    alone = pytester.runpytest("test_race.py", "--ftrace", "--seed", "8", "-p", "no:cacheprovider")
    other = pytester.runpytest("--ftrace", "--seed", "9", "-p", "no:cacheprovider")

    def test_seed(result):
        match = re.search(r"test-seed=(\d+)", result.stdout.str())
        assert match, result.stdout.str()
        return match.group(1)

    assert test_seed(both) == test_seed(alone)
    assert test_seed(both) != test_seed(other)


def test_verbose_summary_shows_statistics(pytester):
    pytester.makepyfile(test_safe=SAFE)
    result = pytester.runpytest("--ftrace", "--ftrace-mode", "chaos", "--seed", "3", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*ftrace statistics (seed 3)*", "*executions*hooked*yields*"])
    row = next(line for line in result.stdout.lines if line.endswith("test_locked_counter"))
    executions, hooked = (int(x) for x in row.split()[:2])
    # 4 threads, rounds by budget (the --ftrace defaults): shared state, so past the probe
    assert executions % 4 == 0 and 4 * PROBE_ROUNDS < executions <= 4 * ROUND_CAP
    assert hooked >= executions * 50  # at least one hooked access per increment
    quiet = pytester.runpytest("--ftrace", "--seed", "3")
    assert "ftrace statistics" not in quiet.stdout.str()


def test_junitxml_has_seed_and_statistics(pytester):
    pytester.makepyfile(test_race=ONE_RACE, test_safe=SAFE)
    result = pytester.runpytest(
        "--ftrace", "--seed", "11", "--junitxml=out.xml", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=1, passed=1)
    xml = (pytester.path / "out.xml").read_text()
    assert xml.count("<testcase ") == 2
    assert xml.count('name="ftrace_seed" value="11"') == 2
    hooked = [int(v) for v in re.findall(r'name="ftrace_hooked" value="(\d+)"', xml)]
    assert len(hooked) == 2 and min(hooked) > 0
    assert "ConcurrencyError" in xml or "lost" in xml


def test_monitoring_is_released_after_the_session(pytester):
    pytester.makepyfile(test_safe=SAFE)
    before = [sys.monitoring.get_tool(i) for i in range(6)]
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)
    assert [sys.monitoring.get_tool(i) for i in range(6)] == before


def test_ftrace_respects_thread_unsafe_and_markers(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.thread_unsafe(reason="talks to a singleton")
        def test_single(num_parallel_threads):
            assert num_parallel_threads == 1

        @pytest.mark.ftrace(threads=3, iterations=2)
        def test_marked(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (3, 2)

        def test_default(num_parallel_threads, num_iterations):
            # rounds by budget: at most the round cap
            assert (num_parallel_threads, num_iterations) == (4, ROUND_CAP)
        """.replace("ROUND_CAP", str(ROUND_CAP))
    )
    result = pytester.runpytest("--ftrace", "--seed", "2")
    result.assert_outcomes(passed=3)
