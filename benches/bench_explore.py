"""Issue 18 item 4: `--ftrace-mode explore` against frontrun's DPOR on the same two-thread
tests: interleavings per second, and how many interleavings each needs to cover the test.

    python3 benches/bench_explore.py [--python 3.12] [--repeat 3] [--bound 2] [--json out.json]

frontrun (0.7.0, from PyPI) lives in its own venv, benches/.venv-frontrun (made on first use
with the same interpreter: `python -m venv benches/.venv-frontrun && benches/.venv-frontrun/bin/
pip install frontrun==0.7.0`); it runs only under its own `frontrun` command, so each of its
runs is `frontrun python <script>`, timed inside the script around `frontrun.explore(...)`
(preemption_bound as ours, stop_on_first=False: the whole space). Ours is a pytest session in
explore mode (.venvs/<python>, made by scripts/test_all.py); its exploration time is the test's
time in the session's junit XML less that of the same test cut to one execution
(--ftrace-explore-rounds 1), so the session and the test's set-up are left out.

Tests (the same code on both sides; each side's harness only says who runs what):
- transfer: two threads, five locked two-account transfers each (one lock, two accounts);
- counters: two threads, six read-modify-writes each of its own counter, each checked against
  a shared limit read: 18 accesses per thread (independent: one interleaving covers it);
- shared: two threads, six unlocked read-modify-writes each of one counter (12 accesses per
  thread, all dependent), nothing checked: every interleaving runs on both sides.
Our harness makes every round's state before the threads start (frontrun's setup) and lets each
thread check what it can without a race when it is done (frontrun checks after both).

The medians over the repeats are reported. On a loaded machine the times move: compare ratios.
"""

from __future__ import annotations

import argparse
import json
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
PYTEST_HARNESS = """
STATES = [make() for _ in range({rounds} + 1)]

def test_explore(iteration_index, thread_index):
    state = STATES[iteration_index]
    work(state, thread_index)
    check(state, thread_index)
"""
ROUNDS = 20000  # --ftrace-explore-rounds' default: the most rounds a test runs

FRONTRUN_HARNESS = """
import json, time
import frontrun

started = time.perf_counter()
result = frontrun.explore(
    setup=make,
    workers=[lambda s: work(s, 0), lambda s: work(s, 1)],
    invariant=holds,
    preemption_bound={bound},
    stop_on_first=False,
)
seconds = time.perf_counter() - started
print("BENCH " + json.dumps({{
    "interleavings": result.num_explored,
    "seconds": seconds,
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
    path = workdir / f"test_{name}.py"
    path.write_text(textwrap.dedent(CODE[name]) + PYTEST_HARNESS.format(rounds=ROUNDS))
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

    def timed(extra: list[str]) -> tuple[float, str]:
        """The test's call time (junit XML: set-up and the session around it left out)."""
        xml = workdir / "junit.xml"
        proc = subprocess.run(
            [*base, f"--junitxml={xml}", *extra], capture_output=True, text=True, cwd=workdir
        )
        if proc.returncode != 0:
            sys.exit(f"ours failed on {name}:\n{proc.stdout}\n{proc.stderr}")
        case = ElementTree.parse(xml).getroot().find(".//testcase")
        return float(case.get("time")), proc.stdout

    full, out = timed([])
    one, _ = timed(["--ftrace-explore-rounds", "1"])
    m = PROVEN.search(out)
    if m is None:
        sys.exit(f"no explore line for {name}:\n{out}")
    interleavings, _bound, executions, unreduced = (int(g) for g in m.groups())
    seconds = max(full - one, 1e-6)
    return {
        "interleavings": interleavings,
        "executions": executions,
        "unreduced_at_least": unreduced,
        "complete": "no failure in all" in out,
        "seconds": seconds,
        "per_second": executions / seconds,
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
    found["per_second"] = found["interleavings"] / max(found["seconds"], 1e-6)
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
            results[name] = {
                side: {
                    **found[0],
                    "seconds": statistics.median(r["seconds"] for r in found),
                    "per_second": statistics.median(r["per_second"] for r in found),
                }
                for side, found in runs.items()
            }
    print(f"bound {args.bound}, python {args.python}, medians of {args.repeat}")
    print(f"{'test':<10} {'side':<9} {'interleavings':>13} {'seconds':>8} {'per s':>8}  notes")
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
            rate = f"{r['per_second']:>8.0f}" if count >= 10 else f"{'-':>8}"  # noise below
            print(f"{name:<10} {side:<9} {count:>13} {r['seconds']:>8.2f} {rate}  {notes}")
        if sides["ours"]["executions"] >= 10 and sides["frontrun"]["interleavings"] >= 10:
            ratio = sides["ours"]["per_second"] / max(sides["frontrun"]["per_second"], 1e-9)
            print(f"{name:<10} ours/frontrun interleavings per second: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
