"""Issue 14 item 4: the cost of forked rounds. Time per round of exact mode on a small
race-free test with each `--ftrace-rounds` side: snapshot (the default: rounds in the test's
process while they keep the module state, from a snapshot's children after one that changed it),
fork (forked rounds, a child
reused while its round left the module state unchanged), fork-each (a new child every round)
and process (every round in the test's process).

    python3 benches/bench_fork.py [--python 3.12 ...] [--threads 4] [--rounds 200] [--repeat 3]
        [--sides snapshot,fork,fork-each,process] [--test small|first-fill]

For each interpreter whose venv exists under .venvs/, each side runs the test file twice per
repeat: with --iterations ROUNDS and with --iterations 1; the difference of the wall times
(the session's start-up and collection cancel out) over ROUNDS - 1 gives the time of a round.
The sides rotate, the medians over the repeats are reported, and each side's ratio to process
of the time per round, in wall time and in CPU time (user + system of pytest and the children
it forked: steadier than wall time on a loaded machine). Every run must pass (the tests check
each round's own work); a broken run stops the bench. On a loaded machine the numbers move:
compare the ratios, not the times.
`--test first-fill` times a race-free test whose rounds each fill a module-level cache (so
every round needs a child of its own under fork too).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
INTERPRETERS = ("3.12", "3.13", "3.13t")

TEST = """
import threading

_lock = threading.Lock()

class Account:
    def __init__(self):
        self.balance = 0

def test_small_work(thread_index):
    account = Account()  # the thread's own: race-free
    totals = {}
    for step in range(20):
        account.balance += step
        totals[step % 3] = totals.get(step % 3, 0) + step
    with _lock:
        assert account.balance == sum(range(20))
        assert sum(totals.values()) == sum(range(20))
"""


FIRST_FILL = """
import threading

_lock = threading.Lock()
_cache = {}

def test_small_work(thread_index, iteration_index):
    with _lock:
        if iteration_index not in _cache:  # every round fills the module-level cache
            _cache[iteration_index] = sum(range(20))
    totals = {}
    for step in range(20):
        totals[step % 3] = totals.get(step % 3, 0) + step
    assert sum(totals.values()) == _cache[iteration_index]
"""

TESTS = {"small": TEST, "first-fill": FIRST_FILL}


def _env() -> dict:
    env = dict(os.environ)
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHON_GIL"):
        env.pop(key, None)
    return env


def timed(python: Path, where: Path, threads: int, rounds: int, side: str) -> tuple[float, float]:
    cmd = [
        str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ftrace", "--seed", "1",
        "--threads", str(threads), "--iterations", str(rounds), "--ftrace-rounds", side,
        "--ftrace-timeout", "600", "test_small.py",
    ]  # fmt: skip
    start = time.perf_counter()
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        cmd, cwd=where, capture_output=True, text=True, timeout=1800, env=_env(), check=False
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    if proc.returncode != 0 or "1 passed" not in proc.stdout:
        sys.exit(f"broken run ({side}, {rounds} rounds):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", choices=INTERPRETERS)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sides", default="snapshot,fork,fork-each,process")
    parser.add_argument("--test", choices=sorted(TESTS), default="small")
    args = parser.parse_args()
    sides = args.sides.split(",")
    wanted = args.python or list(INTERPRETERS)
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp:
        where = Path(tmp)
        (where / "test_small.py").write_text(TESTS[args.test])
        print(
            f"exact mode, test {args.test}, {args.threads} threads, {args.rounds} rounds; "
            f"medians of {args.repeat} repeats; ms per round (rounds/s, x process)"
        )
        print(f"{'python':<11} " + " ".join(f"{side:>24}" for side in sides))
        for name in wanted:
            python = VENVS / name / "bin" / "python"
            if not python.exists():
                print(f"{name:<7} (no venv at {python.parent.parent})")
                continue
            per_round: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
            for repeat in range(args.repeat):
                order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]
                for side in order:
                    many = timed(python, where, args.threads, args.rounds, side)
                    one = timed(python, where, args.threads, 1, side)
                    per_round[side].append(
                        tuple(
                            max(m - o, 1e-9) / (args.rounds - 1)
                            for m, o in zip(many, one, strict=True)
                        )
                    )
            for what, index in (("wall", 0), ("cpu", 1)):
                median = {s: statistics.median(r[index] for r in per_round[s]) for s in sides}
                here = median.get("process")
                cells = []
                for side in sides:
                    ratio = f", {median[side] / here:.1f}x" if here else ""
                    cells.append(f"{median[side] * 1e3:.2f} ({1 / median[side]:.0f}/s{ratio})")
                print(f"{name + ' ' + what:<11} " + " ".join(f"{cell:>24}" for cell in cells))


if __name__ == "__main__":
    main()
