"""Issue 17 item 4, rounds by budget: what a suite costs and what it finds at the default options.

1. Cost. The race-free suite of bench_runner.py (202 small tests; its execution-counting test
   needs a fixed count and is left out) under `--ftrace` at the default (rounds by budget), at
   the old default `--iterations 40`, and at `--iterations 4` (the probe's rounds without the
   shared-location signal, to see what the signal costs). Median wall time of `--repeat` runs
   per side, and the budget's summary line.
2. Detection. The corpus (benches/corpus: 22 racy tests, 14 safe twins) at the default options,
   one run per seed: every racy test should fail and every safe one pass; the summary line says
   how the budget was spent.
3. The round cap. The racy corpus with `--iterations CAP` (the count fixed at the cap, the
   budget off), per seed: the first failing round of each racy test under the default mix. The
   cap only needs to be well above the rounds the mix needs.

    python3 benches/bench_budget.py [--python 3.12] [--seeds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_runner as br  # noqa: E402  (the race-free suite)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benches" / "corpus"
SUMMARY = re.compile(r"^ftrace budget: .*$", re.M)
OUTCOMES = re.compile(r"(\d+) (passed|failed)")
SECTION = re.compile(r"^_{3,} (\S+) _{3,}$", re.M)
FIRST = re.compile(r"first failure in thread \d+, iteration (\d+)")


def pytest(python: Path, cwd: Path, *args: str) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "--color=no", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=3600,
    )
    took = time.perf_counter() - began
    if done.returncode not in (0, 1):
        raise RuntimeError(
            f"pytest {' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}"
        )
    return took, done.stdout


def counts(out: str) -> dict[str, int]:
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    return {kind: int(n) for n, kind in OUTCOMES.findall(tail)}


def budget_line(out: str) -> str:
    found = SUMMARY.search(out)
    return found.group(0) if found else "(no budget line)"


def first_failing_rounds(out: str) -> dict[str, int]:
    """Test name -> first failing round, from the failure sections."""
    found = {}
    parts = SECTION.split(out)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        match = FIRST.search(body)
        if match:
            found[name] = int(match.group(1))
    return found


def main(argv: list[str] | None = None) -> int:
    options = (ROOT / "pytest_ftrace" / "options.py").read_text()
    cap = int(re.search(r"^ROUND_CAP = (\d+)", options, re.M).group(1))  # measured against
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=("cost", "detect", "cap"))
    args = parser.parse_args(argv)
    python = ROOT / ".venvs" / args.python / "bin" / "python"
    print(f"pytest-ftrace {br._revision()} on {args.python}; load {br._load()}", flush=True)

    if "cost" not in args.skip:
        work = Path(tempfile.mkdtemp(prefix="ftrace-budget-"))
        br.write_suite(work)
        sides = {
            "budget (default)": ["--ftrace", "--seed", "1"],
            "--iterations 40": ["--ftrace", "--seed", "1", "--iterations", "40"],
            "--iterations 4": ["--ftrace", "--seed", "1", "--iterations", "4"],
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        lines = {}
        for _ in range(args.repeat):
            for name, side in sides.items():
                took, out = pytest(python, work, *side, "-k", "not counted_all")
                got = counts(out)
                if got.get("failed") or got.get("passed") != 201:
                    raise RuntimeError(f"{name}: {got}\n{out[-3000:]}")
                times[name].append(took)
                lines[name] = budget_line(out)
        print("\n1. race-free suite (201 tests), median wall time")
        for name in sides:
            print(f"  {name:<18} {statistics.median(times[name]):7.1f} s   {lines[name]}")

    if "detect" not in args.skip:
        print("\n2. corpus at the default options (rounds by budget)")
        for seed in range(1, args.seeds + 1):
            took, out = pytest(python, CORPUS, "--ftrace", "--seed", str(seed), "-rN")
            got = counts(out)
            failed = set(SECTION.findall(out))
            missed_racy = sorted(n for n in _names(CORPUS / "test_racy.py") if n not in failed)
            wrong_safe = sorted(n for n in _names(CORPUS / "test_safe.py") if n in failed)
            print(
                f"  seed {seed}: {got} in {took:.1f} s; racy passing: {missed_racy or 'none'}; "
                f"safe failing: {wrong_safe or 'none'}\n    {budget_line(out)}",
                flush=True,
            )

    if "cap" not in args.skip:
        print(f"\n3. first failing round of each racy test, --iterations {cap} (mix)")
        worst = []
        for seed in range(1, args.seeds + 1):
            _took, out = pytest(
                python,
                CORPUS,
                "test_racy.py",
                "--ftrace",
                "--seed",
                str(seed),
                "--iterations",
                str(cap),
                "--ftrace-shrink",
                "0",
            )
            firsts = first_failing_rounds(out)
            worst.append(max(firsts.values(), default=-1))
            late = {n: r for n, r in firsts.items() if r >= 4}
            print(
                f"  seed {seed}: {len(firsts)} failing, latest first failure in round "
                f"{worst[-1]}; after round 3: {late or 'none'}",
                flush=True,
            )
        print(f"  latest first failing round over all seeds: {max(worst)}")
    return 0


def _names(path: Path) -> list[str]:
    return re.findall(r"^def (test_\w+)", path.read_text(), re.M)


if __name__ == "__main__":
    sys.exit(main())
