"""What a failure, the statistics and --help tell a new user (issue 19, items 3-7): one replay
line, a shrunk schedule that shows accesses and comes out the same every run, lanes that fit
the terminal and name the threads the test started, exact mode's own statistics, a threadpool
run with nothing to parallelize, and replay headers that agree with the report."""

from __future__ import annotations

import re
import shlex

import pytest

# The id generator of examples/test_ids.py, with a fresh generator every round (so a shrink
# candidate, run after the rounds, starts from the same state as the round did).
IDS = """
import threading

class Ids:
    def __init__(self):
        self.next_id = 0

    def new_id(self):
        current = self.next_id
        self.next_id = current + 1
        return current

ROUNDS = {}
DONE = {}
LOCK = threading.Lock()

def test_ids(iteration_index, num_parallel_threads):
    ids, issued = ROUNDS.setdefault(iteration_index, (Ids(), set()))
    try:
        for _ in range(20):
            new = ids.new_id()
            assert new not in issued, f"id {new} was handed out twice"
            issued.add(new)
    finally:  # the round's last thread leaves the module state as the round found it
        with LOCK:
            DONE[iteration_index] = DONE.get(iteration_index, 0) + 1
            if DONE[iteration_index] == num_parallel_threads:
                del ROUNDS[iteration_index], DONE[iteration_index]
"""

# Each run of rounds gets fresh objects (a shrink candidate too: it runs in new threads), and
# whether a round fails depends on its schedule alone: the same seed, the same shrink.
FRESH = """
import itertools
import threading

_local = threading.local()
_seq = itertools.count()
_shared = {}


def per_round(factory, threads):
    if not hasattr(_local, "gen"):
        _local.gen, _local.calls = next(_seq) // threads, 0
    key = (_local.gen, _local.calls)
    _local.calls += 1
    return _shared.setdefault(key, factory())


class Ids:
    def __init__(self):
        self.next_id = 0
        self.issued = set()

    def new_id(self):
        current = self.next_id
        self.next_id = current + 1
        return current


def test_ids(num_parallel_threads):
    ids = per_round(Ids, num_parallel_threads)
    for _ in range(30):
        new = ids.new_id()
        assert new not in ids.issued, f"id {new} handed out twice"
        ids.issued.add(new)
"""

# Each worker starts a helper thread that takes the ids: the lanes show the helpers, named by
# who started them and where.
STARTED = """
import threading

class Ids:
    def __init__(self):
        self.next_id = 0

ROUNDS = {}
DONE = {}
LOCK = threading.Lock()

def test_helpers(iteration_index, num_parallel_threads):
    ids, issued = ROUNDS.setdefault(iteration_index, (Ids(), []))
    try:
        check(ids, issued)
    finally:  # the round's last thread leaves the module state as the round found it
        with LOCK:
            DONE[iteration_index] = DONE.get(iteration_index, 0) + 1
            if DONE[iteration_index] == num_parallel_threads:
                del ROUNDS[iteration_index], DONE[iteration_index]

def check(ids, issued):
    got = []

    def take():
        for _ in range(5):
            current = ids.next_id
            ids.next_id = current + 1
            got.append(current)

    helper = threading.Thread(target=take, name="taker")
    helper.start()
    helper.join()
    for new in got:
        assert new not in issued, f"id {new} was handed out twice"
        issued.append(new)
"""


def run(pytester, *args):
    return pytester.runpytest_subprocess(
        "--ftrace", "--ftrace-timeout", "120", "-p", "no:cacheprovider", *args
    )


def lane_block(result) -> list[str]:
    """The lines from the schedule's intro to the replay line."""
    lines = result.stdout.lines
    start = next(
        i for i, line in enumerate(lines) if re.match(r"(shrunk )?schedule (of round )?", line)
    )
    end = next(i for i, line in enumerate(lines) if line.startswith("replay: "))
    return lines[start:end]


# -- item 3: one replay line; the shrunk schedule shows accesses, the same on every run -------


def test_a_shrunk_failure_offers_one_replay_line(pytester):
    pytester.makepyfile(FRESH)
    # with the cache: the recorded schedule could be offered twice (the round, the shrunk one)
    result = pytester.runpytest_subprocess("--ftrace", "--seed", "1", "--ftrace-shrink", "30")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "shrunk: a schedule with" in out, out
    # the failure section (pytest's short summary repeats the whole message when CI is set)
    failures = out.split("short test summary info")[0]
    assert len(re.findall(r"--ftrace-replay", failures)) == 1, out
    shrunk = next(line for line in result.stdout.lines if line.startswith("shrunk:"))
    assert shrunk.endswith("fails the same way; the lanes below show it"), shrunk


def test_the_same_seed_shrinks_to_the_same_schedule(pytester):
    pytester.makepyfile(FRESH)
    # The rounds in this process, a budget and a shrink limit no load can cut: FRESH changes
    # the module state every round, so by default the rounds after round 0 and every shrink
    # candidate would run in children of the snapshot; this test is about the shrink alone.
    args = (
        "--seed", "1", "--ftrace-shrink", "600", "--ftrace-budget", "600",
        "--ftrace-rounds", "process",
    )  # fmt: skip
    first = run(pytester, *args)
    second = run(pytester, *args)
    assert "shrunk: a schedule with" in first.stdout.str()
    assert lane_block(first) == lane_block(second)
    shrunk = [line for line in first.stdout.lines if line.startswith("shrunk:")]
    assert shrunk == [line for line in second.stdout.lines if line.startswith("shrunk:")]


def test_a_shrink_cut_short_by_its_time_limit_says_so(pytester):
    pytester.makepyfile(
        FRESH.replace("    for _ in range(30):", "    sum(range(300_000))\n    for _ in range(30):")
    )
    result = run(pytester, "--seed", "1", "--ftrace-shrink", "0.001")
    result.assert_outcomes(failed=1)
    text = " ".join(result.stdout.str().split())
    assert re.search(
        r"shrinking: stopped by the --ftrace-shrink limit \(0\.001 s\) after \d+ of 40 "
        r"candidate schedules",
        text,
    ), result.stdout.str()


def test_a_run_that_starts_with_the_thread_start_shows_its_first_access(pytester):
    pytester.makepyfile(IDS)
    result = run(pytester, "--seed", "5", "--ftrace-shrink", "0", "--threads", "2")
    result.assert_outcomes(failed=1)
    block = "\n".join(lane_block(result))
    assert "(start)" in block
    assert not re.search(r"\(start\)( \(\+\d+\))?\s*(\||$)", block, re.M), block


def test_lanes_where_each_thread_runs_once_show_no_interleaving():
    import threading

    from pytest_ftrace.ftrace.coop import shows_interleaving

    code = threading.Thread.run.__code__
    once = [(0, None, 0), (0, code, 0), (1, None, 0), (1, code, 0)]
    assert not shows_interleaving(once)
    assert shows_interleaving(once + [(0, code, 2)])
    assert not shows_interleaving([(0, None, 0), (1, None, 0), (0, None, 1)])


def test_a_shrunk_schedule_without_interleaving_is_not_shown(pytester):
    """The example's generator lives in a module-scoped fixture: after the run, any schedule
    fails on the state the rounds left, so the shrunk lanes would show threads that each ran
    once from their start; the lanes show the round as it ran instead."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "test_ids.py"
    pytester.makepyfile(test_ids=example.read_text())
    for seed in ("1", "5", "8", "14"):
        result = run(pytester, "test_ids.py::test_racy_ids_are_unique", "--seed", seed)
        result.assert_outcomes(failed=1)
        block = lane_block(result)
        if block[0].startswith("shrunk schedule"):
            rows = lane_rows(block)
            assert len(set(rows)) < len(rows), "\n".join(block)  # a thread goes on again


def lane_rows(block: list[str]) -> list[int]:
    """The thread of each row of the lanes, in order (column or list form)."""
    header = next(line for line in block if line.strip().startswith("step  "))
    rows = []
    if header.split()[1:3] == ["thread", "access"]:  # the list form
        for line in block:
            match = re.match(r"\s+\d+\s+(\d+)\s", line)
            if match:
                rows.append(int(match.group(1)))
        return rows
    threads = [int(n) for n in re.findall(r"thread (\d+)", header)]
    for line in block:
        match = re.match(r"(\s+\d+\s\s)(.*)", line)
        if match and line is not header:
            cells = match.group(2).split(" | ")
            rows.append(threads[next(i for i, cell in enumerate(cells) if cell.strip())])
    return rows


def test_lanes_of_starts_and_waits_only_have_no_access_to_show():
    import threading

    from pytest_ftrace.ftrace.coop import has_accesses

    code = threading.Thread.run.__code__
    idle = [(0, None, 0), (1, None, 0), (0, None, 1), (1, None, 1)]
    assert not has_accesses(idle)
    assert has_accesses(idle + [(1, code, 0)])


# -- item 4: lanes fit the terminal, name the threads the test started, explain lock/wait ----


def test_lanes_fit_the_terminal_width(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    pytester.makepyfile(STARTED)
    result = run(pytester, "--seed", "3", "--threads", "8", "--ftrace-shrink", "0")
    result.assert_outcomes(failed=1)
    block = lane_block(result)
    assert len(block) > 3
    assert max(len(line) for line in block) <= 80, "\n".join(block)
    assert not any("~" in line for line in block), "\n".join(block)


def test_lanes_name_the_threads_the_test_started_and_explain_lock_wait(pytester, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    pytester.makepyfile(STARTED)
    result = run(pytester, "--seed", "3", "--threads", "2", "--ftrace-shrink", "0")
    result.assert_outcomes(failed=1)
    block = "\n".join(lane_block(result))
    started = re.findall(r"thread (\d+): taker, started by thread (\d) at (\S+\.py):(\d+)", block)
    assert started, block
    for tid, by, name, at in started:
        source = (pytester.path / name).read_text().splitlines()
        assert source[int(at) - 1].strip() == "helper.start()", block
        assert int(tid) >= 2 and int(by) in (0, 1), block
    if "(lock/wait)" in block:
        assert "(lock/wait): the thread went on inside a lock" in block, block


def test_lanes_wrap_long_cells_and_drop_idle_threads():
    import threading

    from pytest_ftrace.ftrace.coop import lanes

    code = threading.Thread.run.__code__
    steps = [(t, None, 0) for t in range(12)] + [(0, code, 0), (11, code, 2)] * 3
    text = lanes(steps, width=60)
    assert max(len(line) for line in text.splitlines()) <= 60, text
    assert "threads 1-10 made no access in these rows" in text, text
    assert "~" not in text


# -- item 5: exact mode's statistics; --help describes both modes -------------------------------


def test_exact_mode_statistics_show_what_the_scheduler_did(pytester):
    pytester.makepyfile(
        """
        import threading

        LOCK = threading.Lock()
        STATE = {"n": 0}

        def test_locked_counter():
            for _ in range(20):
                with LOCK:
                    STATE["n"] += 1
        """
    )
    result = run(pytester, "--seed", "3", "--threads", "3", "--iterations", "5", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*ftrace statistics (seed 3)*", "*executions*rounds*points*hand-overs*preempt*waits*"]
    )
    row = next(line for line in result.stdout.lines if line.endswith("test_locked_counter"))
    executions, rounds, points, handovers, preemptions, waits = (int(x) for x in row.split()[:6])
    assert (executions, rounds) == (15, 5)
    assert points >= 3 * 20 * 5  # at least one scheduling point per locked increment
    assert 0 < handovers <= points
    assert preemptions <= handovers
    assert waits >= 0
    assert "yields" not in result.stdout.str()


def test_help_describes_both_modes_and_the_special_values(pytester):
    result = pytester.runpytest("--help")
    text = " ".join(result.stdout.str().split())
    ftrace_help = text.split("--ftrace ", 1)[1].split("--ftrace-threads", 1)[0]
    assert "Exact mode" in ftrace_help and "chaos mode" in ftrace_help, ftrace_help
    replay_help = text.split("--ftrace-replay=TOKEN", 1)[1].split("--ftrace-replay-runs", 1)[0]
    assert "'last'" in replay_help, replay_help
    isolate_help = text.split("--ftrace-isolate", 1)[1].split("ini: ftrace_isolate", 1)[0]
    assert "off:" in isolate_help, isolate_help


# -- item 6: --threadpool with nothing marked parallelizable -----------------------------------


def test_threadpool_with_no_parallelizable_test_says_so(pytester):
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n")
    result = pytester.runpytest("--threadpool", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "ftrace threadpool: 0 of 3 tests are marked parallelizable; "
            "see --threadpool in the README"
        ]
    )
    pytester.makepyfile(
        "import pytest\n@pytest.mark.parallelizable\ndef test_a(): pass\ndef test_b(): pass\n"
    )
    marked = pytester.runpytest("--threadpool", "2", "-p", "no:cacheprovider")
    marked.assert_outcomes(passed=2)
    assert "marked parallelizable" not in marked.stdout.str()


# -- item 7: a replay's header agrees with its report ------------------------------------------


def test_replay_header_counts_agree_with_the_report(pytester):
    pytester.makepyfile(IDS)
    result = run(pytester, "--seed", "5", "--ftrace-shrink", "0")
    result.assert_outcomes(failed=1)
    line = next(x for x in result.stdout.lines if x.startswith("replay: pytest "))
    args = shlex.split(line.split("replay: pytest ", 1)[1])
    again = pytester.runpytest(*args, "--ftrace-replay-runs", "6", "-p", "no:cacheprovider")
    again.stdout.fnmatch_lines(["ftrace: threads=4 iterations=6 *"])
    assert "4 threads x 40 iterations" not in again.stdout.str()
    out = again.stdout.str()
    match = re.search(r"of (\d+) executions failed \((\d+) threads x (\d+) iterations\)", out)
    if match:  # the report of a failing replay names the same counts
        assert (match.group(2), match.group(3)) == ("4", "6"), out


@pytest.mark.parametrize("mode", ["exact", "chaos"])
def test_the_replay_header_names_the_token_threads(pytester, mode):
    pytester.makepyfile(IDS)
    token = "t3i2" if mode == "chaos" else "t3i2k60"
    result = run(pytester, "--ftrace-mode", mode, "--seed", "5", "--ftrace-replay", token)
    result.stdout.fnmatch_lines(["ftrace: threads=3 iterations=10 *"])
