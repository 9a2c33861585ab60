"""Issue 14 item 4: the cost of forked rounds. Rounds per second of exact mode on a small
race-free test, each round in a forked child (`--ftrace-rounds fork`, the default) against all
rounds in the test's process (`--ftrace-rounds process`).

    python3 benches/bench_fork.py [--python 3.12 ...] [--threads 4] [--rounds 200] [--repeat 3]

For each interpreter whose venv exists under .venvs/, each side runs the test file twice per
repeat: with --iterations ROUNDS and with --iterations 1; the difference of the wall times
(the session's start-up and collection cancel out) over ROUNDS - 1 gives the time of a round.
The sides alternate, the medians over the repeats are reported, and the ratio forked/in-process
of the time per round. Every run must pass (the test checks each round's own work); a broken
run stops the bench. On a loaded machine the numbers move: compare the ratio, not the times.
"""

from __future__ import annotations

import argparse
import os
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


def _env() -> dict:
    env = dict(os.environ)
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHON_GIL"):
        env.pop(key, None)
    return env


def timed(python: Path, where: Path, threads: int, rounds: int, side: str) -> float:
    cmd = [
        str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--ftrace", "--seed", "1",
        "--threads", str(threads), "--iterations", str(rounds), "--ftrace-rounds", side,
        "--ftrace-timeout", "600", "test_small.py",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=where, capture_output=True, text=True, timeout=1800, env=_env(), check=False
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or "1 passed" not in proc.stdout:
        sys.exit(f"broken run ({side}, {rounds} rounds):\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", choices=INTERPRETERS)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    wanted = args.python or list(INTERPRETERS)
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp:
        where = Path(tmp)
        (where / "test_small.py").write_text(TEST)
        print(
            f"exact mode, {args.threads} threads, {args.rounds} rounds; medians of "
            f"{args.repeat} repeats"
        )
        print(
            f"{'python':<7} {'fork ms/round':>14} {'process ms/round':>17} "
            f"{'fork rounds/s':>14} {'process rounds/s':>17} {'ratio':>6}"
        )
        for name in wanted:
            python = VENVS / name / "bin" / "python"
            if not python.exists():
                print(f"{name:<7} (no venv at {python.parent.parent})")
                continue
            per_round: dict[str, list[float]] = {"fork": [], "process": []}
            for repeat in range(args.repeat):
                sides = ["fork", "process"] if repeat % 2 == 0 else ["process", "fork"]
                for side in sides:
                    many = timed(python, where, args.threads, args.rounds, side)
                    one = timed(python, where, args.threads, 1, side)
                    per_round[side].append(max(many - one, 1e-9) / (args.rounds - 1))
            fork = statistics.median(per_round["fork"])
            here = statistics.median(per_round["process"])
            print(
                f"{name:<7} {fork * 1e3:>14.2f} {here * 1e3:>17.2f} {1 / fork:>14.0f} "
                f"{1 / here:>17.0f} {fork / here:>5.1f}x"
            )


if __name__ == "__main__":
    main()
