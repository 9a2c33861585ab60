"""Issue 18 item 4: `--ftrace-mode explore` against frontrun's DPOR on the same two-thread
tests: interleavings per second, and how many interleavings each needs to cover the test.

    python3 benches/bench_explore.py [--python 3.12] [--repeat 3] [--bound 2] [--json out.json]

frontrun (0.7.0, from PyPI) lives in its own venv, benches/.venv-frontrun (made on first use
with the same interpreter: `python -m venv benches/.venv-frontrun && benches/.venv-frontrun/bin/
pip install frontrun==0.7.0`); it runs only under its own `frontrun` command, so each of its
runs is `frontrun python <script>`, timed inside the script around `frontrun.explore(...)`
(preemption_bound as ours, stop_on_first=False: the whole space). Ours is a pytest session in
explore mode (.venvs/<python>, made by scripts/test_all.py, or the venv at an absolute path);
its exploration time is the test's time in the session's junit XML less that of the same test
cut to one execution (--ftrace-explore-rounds 1), so the session and the test's set-up are left
out; the test runs as COPIES copies in the session (each searched alike, on its own states) and
the time is their total's share of one.

Tests (the same code on both sides; each side's harness only says who runs what):
- transfer: two threads, five locked two-account transfers each (one lock, two accounts);
- counters: two threads, six read-modify-writes each of its own counter, each checked against
  a shared limit read: 18 accesses per thread (independent: one interleaving covers it);
- shared: two threads, six unlocked read-modify-writes each of one counter (12 accesses per
  thread, all dependent), nothing checked: every interleaving runs on both sides.
Our harness makes every round's state before the threads start (frontrun's setup) and lets each
thread check what it can without a race when it is done (frontrun checks after both).

The medians over the repeats are reported. On a loaded machine the times move: compare ratios.
CPU time is given beside the wall time (ours: the test process's CPU time, every thread, over
the test's call phase, less that of the call cut to one execution; frontrun: the process's CPU
time around its explore): under load the wall time of ours counts the waits of each hand-over
between its threads for the OS, which frontrun's single tracer does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
FRONTRUN_VENV = ROOT / "benches" / ".venv-frontrun"
FRONTRUN_VERSION = "0.7.0"

# The code under test, shared by both sides.
CODE = {
    "transfer": """
        import threading

        class Account:
            def __init__(self, balance):
                self.balance = balance

        class Bank:
            def __init__(self):
                self.lock = threading.Lock()
                self.a = Account(100)
                self.b = Account(100)

        def transfer(bank, src, dst, amount):
            with bank.lock:
                src.balance -= amount
                dst.balance += amount

        def work(bank, index):
            src, dst = (bank.a, bank.b) if index == 0 else (bank.b, bank.a)
            for _ in range(5):
                transfer(bank, src, dst, 1)

        def make():
            return Bank()

        def holds(bank):
            return bank.a.balance + bank.b.balance == 200

        def check(bank, index):
            with bank.lock:  # the other thread may be inside a transfer
                assert holds(bank)
        """,
    "counters": """
        class Box:
            def __init__(self):
                self.limit = 100
                self.a = 0
                self.b = 0

        def work(box, index):
            if index == 0:
                for _ in range(6):
                    if box.a < box.limit:
                        box.a = box.a + 1
            else:
                for _ in range(6):
                    if box.b < box.limit:
                        box.b = box.b + 1

        def make():
            return Box()

        def holds(box):
            return box.a == 6 and box.b == 6

        def check(box, index):
            assert (box.a if index == 0 else box.b) == 6  # its own counter: no race
        """,
    "shared": """
        class Box:
            def __init__(self):
                self.n = 0

        def work(box, index):
            for _ in range(6):
                box.n = box.n + 1

        def make():
            return Box()

        def holds(box):
            return True  # lost updates are allowed here: every interleaving runs

        def check(box, index):
            pass
        """,
}

# Ours: every round's state is made before the threads start (as frontrun's setup), both
# threads work on it, and each checks what it can check without a race when it is done
# (frontrun checks the invariant after both threads).
# The same search runs COPIES times in the session (each copy on its own states), so that the
# time it takes stands out of the noise of one call's set-up (the snapshot's fork, ...).
PYTEST_HARNESS = """
import pytest

STATES = [[make() for _ in range({rounds} + 1)] for _ in range({copies})]

@pytest.mark.parametrize("copy", range({copies}))
def test_explore(copy, iteration_index, thread_index):
    state = STATES[copy][iteration_index]
    work(state, thread_index)
    check(state, thread_index)
"""
ROUNDS = 2000  # the most executions a search of these tests may take (an IndexError beyond)
COPIES = 10

# The CPU time of the test's process over the call phase, written where the bench reads it.
CPU_PLUGIN = """
import os
import time

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    started = time.process_time()
    try:
        return (yield)
    finally:
        with open(os.environ["BENCH_CPU_FILE"], "a") as out:
            out.write(repr(time.process_time() - started) + "\\n")
"""

FRONTRUN_HARNESS = """
import json, time
import frontrun

started = time.perf_counter()
cpu_started = time.process_time()
result = frontrun.explore(
    setup=make,
    workers=[lambda s: work(s, 0), lambda s: work(s, 1)],
    invariant=holds,
    preemption_bound={bound},
    stop_on_first=False,
)
seconds = time.perf_counter() - started
cpu = time.process_time() - cpu_started
print("BENCH " + json.dumps({{
    "interleavings": result.num_explored,
    "seconds": seconds,
    "cpu": cpu,
    "holds": result.property_holds,
    "exhausted": getattr(result, "exhausted", None),
}}))
"""

PROVEN = re.compile(
    r"ftrace explore: \S+: no failure in (?:all )?(\d+) interleavings of \d+ threads within (\d+) "
    r"preemptions? \((\d+) executions?, pruned from at least (\d+)\)"
)


def ensure_frontrun(python: Path) -> Path:
    tool = FRONTRUN_VENV / "bin" / "frontrun"
    if not tool.exists():
        subprocess.run([str(python), "-m", "venv", str(FRONTRUN_VENV)], check=True)
        pip = FRONTRUN_VENV / "bin" / "pip"
        subprocess.run([str(pip), "install", "-q", f"frontrun=={FRONTRUN_VERSION}"], check=True)
    return tool


def ours(python: Path, name: str, bound: int, workdir: Path) -> dict:
    tests = workdir / "tests"
    tests.mkdir(exist_ok=True)
    path = tests / f"test_{name}.py"
    path.write_text(
        textwrap.dedent(CODE[name]) + PYTEST_HARNESS.format(rounds=ROUNDS, copies=COPIES)
    )
    base = [
        str(python),
        "-m",
        "pytest",
        str(path),
        "-q",
        "-p",
        "no:cacheprovider",
        "--ftrace",
        "--ftrace-mode",
        "explore",
        "--threads",
        "2",
        "--ftrace-bound",
        str(bound),
        "--seed",
        "1",
    ]

    plugins = workdir / "plugins"  # outside the tests' rootdir: not hooked
    plugins.mkdir(exist_ok=True)
    (plugins / "bench_cpu.py").write_text(CPU_PLUGIN)
    cpu_file = workdir / "cpu.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
        "BENCH_CPU_FILE": str(cpu_file),
    }

    def timed(extra: list[str]) -> tuple[float, float, str]:
        """The test's call time (junit XML: set-up and the session around it left out), and
        the CPU time of the test's process over its call phase (every thread of it)."""
        xml = workdir / "junit.xml"
        cpu_file.write_text("")
        proc = subprocess.run(
            [*base, f"--junitxml={xml}", "-p", "bench_cpu", *extra],
            capture_output=True,
            text=True,
            cwd=tests,
            env=env,
        )
        if proc.returncode != 0:
            sys.exit(f"ours failed on {name}:\n{proc.stdout}\n{proc.stderr}")
        cases = ElementTree.parse(xml).getroot().iter("testcase")
        cpu = sum(float(x) for x in cpu_file.read_text().split())
        return sum(float(case.get("time")) for case in cases), cpu, proc.stdout

    full, full_cpu, out = timed([])
    one, one_cpu, _ = timed(["--ftrace-explore-rounds", "1"])
    found = PROVEN.findall(out)
    if len(found) != COPIES:
        sys.exit(f"not {COPIES} explore lines for {name}:\n{out}")
    if len(set(found)) != 1:
        sys.exit(f"the copies of {name} searched differently: {sorted(set(found))}")
    interleavings, _bound, executions, unreduced = (int(g) for g in found[0])
    # the difference may be below the noise of the calls' own set-up on a loaded machine
    # (zero or less): no rate then
    seconds = (full - one) / COPIES
    cpu = (full_cpu - one_cpu) / COPIES
    return {
        "interleavings": interleavings,
        "executions": executions,
        "unreduced_at_least": unreduced,
        "complete": "no failure in all" in out,
        "seconds": seconds,
        "cpu": cpu,
    }


def theirs(tool: Path, name: str, bound: int, workdir: Path) -> dict:
    path = workdir / f"frontrun_{name}.py"
    path.write_text(textwrap.dedent(CODE[name]) + FRONTRUN_HARNESS.format(bound=bound))
    proc = subprocess.run(
        [str(tool), "python", str(path)], capture_output=True, text=True, cwd=workdir
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if line is None:
        sys.exit(f"frontrun failed on {name}:\n{proc.stdout}\n{proc.stderr}")
    found = json.loads(line[len("BENCH ") :])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bound", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    python = VENVS / args.python / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python} missing: run scripts/test_all.py --python {args.python} first")
    tool = ensure_frontrun(Path(sys.executable))
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ftrace-bench-explore-") as tmp:
        workdir = Path(tmp)
        for name in CODE:
            runs = {"ours": [], "frontrun": []}
            for _ in range(args.repeat):
                runs["ours"].append(ours(python, name, args.bound, workdir))
                runs["frontrun"].append(theirs(tool, name, args.bound, workdir))
            results[name] = {}
            for side, found in runs.items():
                # rates from the median times: ours counts executions, frontrun interleavings
                count = found[0]["executions" if side == "ours" else "interleavings"]
                seconds = statistics.median(r["seconds"] for r in found)
                cpu = statistics.median(r["cpu"] for r in found)
                results[name][side] = {
                    **found[0],
                    "seconds": seconds,
                    "per_second": count / seconds if seconds > 0 else None,
                    "cpu": cpu,
                    "per_cpu_second": count / cpu if cpu > 0 else None,
                }
    print(f"bound {args.bound}, python {args.python}, medians of {args.repeat}")
    print(
        f"{'test':<10} {'side':<9} {'interleavings':>13} {'seconds':>8} {'per s':>8} "
        f"{'cpu s':>6} {'per cpu s':>9}  notes"
    )
    print(
        "(ours: the interleavings of the search within the bound, its last pass; executions "
        "count every pass, and the rate is executions per second; frontrun: num_explored)"
    )
    for name, sides in results.items():
        for side, r in sides.items():
            if side == "ours":
                notes = (
                    f"executions {r['executions']}, unreduced >= {r['unreduced_at_least']}"
                    f"{'' if r['complete'] else ', NOT complete'}"
                )
                count = r["interleavings"]
            else:
                notes = f"holds {r['holds']}, exhausted {r['exhausted']}"
                count = r["interleavings"]
            rate, cpu_rate = (
                f"{x:>{w}.0f}" if count >= 10 and x is not None else f"{'-':>{w}}"  # noise below
                for x, w in ((r["per_second"], 8), (r["per_cpu_second"], 9))
            )
            print(
                f"{name:<10} {side:<9} {count:>13} {r['seconds']:>8.2f} {rate} "
                f"{r['cpu']:>6.2f} {cpu_rate}  {notes}"
            )
        if sides["ours"]["executions"] >= 10 and sides["frontrun"]["interleavings"] >= 10:

            def ratio(key: str, sides: dict = sides) -> str:
                ours_rate, theirs_rate = sides["ours"][key], sides["frontrun"][key]
                if not ours_rate or not theirs_rate:
                    return "- (below the noise)"
                return f"{ours_rate / theirs_rate:.1f}x"

            print(
                f"{name:<10} ours/frontrun interleavings per second: {ratio('per_second')} "
                f"(per CPU second: {ratio('per_cpu_second')})"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
