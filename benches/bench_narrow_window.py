"""Issue 17, narrow windows: which exact-mode policy finds a rarely hit race in the fewest rounds.

The race is the corpus's non-atomic max (benches/corpus/test_racy.py::test_non_atomic_max: a
read-compare-write of a shared maximum, broken only when a thread is switched out between its
compare and its write while another thread's larger value lands). For each policy and seed,
one `pytest --ftrace --seed S --iterations R --ftrace-scheduler P` run records which rounds
failed; a round's schedule depends on (seed, round) only, so the first failing round of a run
tells whether a run of fewer rounds would have failed too. The table gives, per policy, the
share of seeds whose first failing round is below each round count, and the mean failing rounds
per run.

    python3 benches/bench_narrow_window.py [--python 3.12] [--seeds 8] [--rounds 160]
        [--policy mix --policy pct3 ...] [--test test_non_atomic_max]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benches" / "corpus"
POLICIES = ("mix", "random", "pct3", "pct6", "pct10", "aligned50", "aligned80")
CHECKPOINTS = (10, 20, 40, 80, 160, 320)
_GROUP = re.compile(r"iterations? ([0-9][0-9, -]*)\)")


def failing_rounds(output: str) -> set[int]:
    """The rounds the ConcurrencyError summary names (e.g. 'iterations 0-2, 7')."""
    rounds: set[int] = set()
    for match in _GROUP.finditer(output):
        for part in match.group(1).split(","):
            part = part.strip()
            if not part:
                continue
            low, _, high = part.partition("-")
            rounds.update(range(int(low), int(high or low) + 1))
    return rounds


def run(python: Path, test: str, policy: str, seed: int, rounds: int) -> set[int]:
    args = [
        str(python), "-m", "pytest", f"{CORPUS / 'test_racy.py'}::{test}", "--ftrace",
        "--seed", str(seed), "--iterations", str(rounds), "--ftrace-scheduler", policy,
        "-p", "no:cacheprovider", "-q", "--color=no",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=CORPUS, timeout=900)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout[-2000:]}")
    return failing_rounds(done.stdout) if done.returncode == 1 else set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=160)
    parser.add_argument("--policy", action="append")
    parser.add_argument("--test", default="test_non_atomic_max")
    args = parser.parse_args(argv)
    python = ROOT / ".venvs" / args.python / "bin" / "python"
    policies = args.policy or POLICIES
    marks = [c for c in CHECKPOINTS if c <= args.rounds]
    print(
        f"{args.test} on {args.python}: {args.seeds} seeds x {args.rounds} rounds per policy "
        "(default threads)",
        flush=True,
    )
    began = time.perf_counter()
    rows = []
    for policy in policies:
        firsts, counts = [], []
        for seed in range(1, args.seeds + 1):
            failed = run(python, args.test, policy, seed, args.rounds)
            firsts.append(min(failed) if failed else None)
            counts.append(len(failed))
        found = [
            sum(1 for f in firsts if f is not None and f < mark) / len(firsts) for mark in marks
        ]
        rows.append((policy, found, sum(counts) / len(counts)))
        print(f"  {policy}: first failing rounds {firsts}", flush=True)
    header = f"{'policy':<10} " + " ".join(f"{'<' + str(m):>6}" for m in marks) + "  fail/run"
    print("\nshare of seeds found within N rounds")
    print(header)
    for policy, found, mean in rows:
        cells = " ".join(f"{f:>6.2f}" for f in found)
        print(f"{policy:<10} {cells}  {mean:>8.1f}")
    print(f"total {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
