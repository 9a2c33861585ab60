"""Issue 5, exact mode: detection and replay fidelity on benches/corpus, per interpreter.

For each interpreter (3.12, 3.13, 3.13t; those whose venv exists under .venvs/):

- detection: R runs (seeds 1..R) of `pytest benches/corpus --ftrace --ftrace-mode exact
  --seed S` (the --ftrace defaults: 4 threads x 40 rounds); for each corpus test, in how many
  runs it failed.
  Racy tests should fail in every run (goal: at least 95 %), safe ones in none.
- replay fidelity: for each racy test, the replay: line of its first failing run is run
  `--replays` times (each run replays the round 10 times, --ftrace-replay-runs); the cell is
  the number of those runs that reproduced the failure 10/10, and the worst k/10 seen.

    python3 benches/bench_exact.py [--runs 20] [--replays 3] [--python 3.12 ...]
        [--scheduler mix|random|pct3|aligned50] [--shrink SECONDS] [--json results.json]

Shrinking is off by default here (--shrink 0): it only changes what a failure report shows,
and costs up to its budget per failing test.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benches" / "corpus"
VENVS = ROOT / ".venvs"
INTERPRETERS = ("3.12", "3.13", "3.13t")
GOAL = 0.95
OUTCOME = re.compile(r"^(?P<node>\S+::\S+)\s+(?P<outcome>PASSED|FAILED|ERROR)\b")
REPLAY = re.compile(r"replay: (pytest .*--ftrace-replay \S+)")
REPRODUCED = re.compile(r"reproduced (\d+)/(\d+)")


def run_pytest(python: Path, args: list[str], cache: str) -> str:
    cmd = [str(python), "-m", "pytest", "-v", "--color=no", "-o", f"cache_dir={cache}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env())
    return proc.stdout + proc.stderr


def _env() -> dict:
    import os

    env = dict(os.environ)
    for key in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHON_GIL"):
        env.pop(key, None)
    return env


def parse_outcomes(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        m = OUTCOME.match(line)
        if m:
            found.setdefault(m.group("node"), m.group("outcome"))
    return found


def parse_replays(out: str) -> dict[str, str]:
    """nodeid -> replay command, from the failure sections."""
    replays = {}
    for m in REPLAY.finditer(out):
        command = m.group(1)
        node = shlex.split(command)[1]
        replays.setdefault(node, command)
    return replays


def bench(python: Path, runs: int, replays: int, scheduler: str, shrink: float) -> dict:
    detected: dict[str, int] = {}
    first_replay: dict[str, str] = {}
    cache = tempfile.mkdtemp(prefix="ftrace-bench-exact-")
    started = time.perf_counter()
    for seed in range(1, runs + 1):
        out = run_pytest(
            python,
            [
                str(CORPUS.relative_to(ROOT)),
                "--ftrace",
                "--ftrace-mode",
                "exact",
                "--ftrace-scheduler",
                scheduler,
                "--seed",
                str(seed),
                "--ftrace-shrink",
                str(shrink),
            ],
            cache,
        )
        outcomes = parse_outcomes(out)
        if not outcomes:
            raise SystemExit(f"no outcomes parsed for seed {seed}:\n{out[-3000:]}")
        for node, outcome in outcomes.items():
            detected.setdefault(node, 0)
            if outcome != "PASSED":
                detected[node] += 1
        for node, command in parse_replays(out).items():
            first_replay.setdefault(node, command)
    elapsed = time.perf_counter() - started
    fidelity: dict[str, list[str]] = {}
    for node, command in sorted(first_replay.items()):
        args = shlex.split(command)[1:]
        results = []
        for _ in range(replays):
            out = run_pytest(python, args, cache)
            m = REPRODUCED.search(out)
            results.append(f"{m.group(1)}/{m.group(2)}" if m else "?")
        fidelity[node] = results
    return {"runs": runs, "detected": detected, "fidelity": fidelity, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--replays", type=int, default=3)
    parser.add_argument("--python", action="append", choices=INTERPRETERS)
    parser.add_argument("--scheduler", default="mix")
    parser.add_argument(
        "--shrink", type=float, default=0.0, help="--ftrace-shrink seconds (default 0: off)"
    )
    parser.add_argument("--json")
    ns = parser.parse_args()
    results = {}
    for version in ns.python or INTERPRETERS:
        python = VENVS / version / "bin" / "python"
        if not python.exists():
            print(f"{version}: no venv at {python}, skipped")
            continue
        print(f"== {version}: {ns.runs} runs, scheduler {ns.scheduler}", flush=True)
        results[version] = res = bench(python, ns.runs, ns.replays, ns.scheduler, ns.shrink)
        print(f"   corpus runs took {res['seconds']:.1f}s in all")
        print(f"   {'failed':>8}  {'replay (k/10 per rerun)':<28}  test")
        for node in sorted(res["detected"]):
            replay = " ".join(res["fidelity"].get(node, [])) or "-"
            print(f"   {res['detected'][node]:>3}/{ns.runs:<4}  {replay:<28}  {node}")
        racy = {n: c for n, c in res["detected"].items() if "test_racy" in n}
        safe = {n: c for n, c in res["detected"].items() if "test_safe" in n}
        rate = sum(racy.values()) / max(1, len(racy) * ns.runs)
        worst = min(racy.values(), default=0) / ns.runs
        replay_ok = sum(all(r == "10/10" for r in v) for v in res["fidelity"].values())
        print(
            f"   racy: {rate:.1%} of runs failed (worst test {worst:.0%}; goal {GOAL:.0%} "
            f"each); safe: {sum(safe.values())} false alarms in {len(safe) * ns.runs} runs; "
            f"replay 10/10 on every rerun: {replay_ok}/{len(res['fidelity'])} racy tests",
            flush=True,
        )
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
