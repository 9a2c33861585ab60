"""Issue 18 item 4: the cost of explore mode's forked executions. A two-thread test whose
every execution writes a module-level dict (so each one after the first runs in a child of the
snapshot of the test's starting state: ftrace/snapshot.py) runs for a fixed number of
executions; the same test cut to one execution is subtracted (the session's start and the
snapshot's first fork cancel out).

    python3 benches/bench_explore_fork.py [--python 3.12 ...] [--executions 300] [--repeat 3]
        [--plugin DIR]

Reports per interpreter the wall time and the CPU time (every process of the session: pytest,
the snapshot and its children, counted by `perf stat -e task-clock` when perf is there; else
CPU is not given) per forked execution, and executions per wall second. `--plugin DIR` runs
the plugin's Python package found in DIR (a copy of another commit's `pytest_ftrace`, with a
native module built for it) instead of the venv's, for a before/after run back to back.
On a loaded machine the wall times move with the load: compare the CPU, and runs made back to
back.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"

TEST = """
import threading

_slots = {}
_local = threading.local()


class Box:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()


def slot():
    i = _local.__dict__.setdefault("i", 0)
    _local.i = i + 1
    return _slots.setdefault(i, Box())  # a new key every execution: the module state changes


def test_writes_module_dict():
    box = slot()
    for _ in range(12):
        with box.lock:
            box.n += 1
"""


def run_once(python: Path, workdir: Path, executions: int, plugin: str | None) -> tuple:
    """(wall seconds, CPU seconds or None, executions that ran) of one session."""
    env = dict(os.environ)
    if plugin:
        env["PYTHONPATH"] = plugin
    command = [
        str(python),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "--ftrace",
        "--ftrace-mode",
        "explore",
        "--ftrace-shrink",
        "0",
        "--ftrace-explore-rounds",
        str(executions),
        "test_forked.py",
    ]
    perf = shutil.which("perf")
    stat = workdir / "stat.txt"
    if perf:
        command = [perf, "stat", "-x,", "-e", "task-clock", "-o", str(stat), "--", *command]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"the session failed:\n{proc.stdout}\n{proc.stderr}")
    found = re.search(r"\((\d+) executions?", proc.stdout)
    ran = int(found.group(1)) if found else 1
    cpu = None
    if perf and stat.exists():
        for line in stat.read_text().splitlines():
            if "task-clock" in line:
                cpu = float(line.split(",")[0]) / 1000.0
    return wall, cpu, ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=None)
    parser.add_argument("--executions", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--plugin", default=None)
    args = parser.parse_args()
    for name in args.python or ["3.12"]:
        python = Path(name) if os.path.isabs(name) else VENVS / name / "bin" / "python"
        if not python.exists():
            print(f"{name}: no venv at {python}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            (workdir / "test_forked.py").write_text(TEST)
            walls, cpus, counts = [], [], []
            for _ in range(args.repeat):
                one = run_once(python, workdir, 1, args.plugin)
                full = run_once(python, workdir, args.executions, args.plugin)
                forked = full[2] - one[2]
                walls.append((full[0] - one[0]) / forked)
                if full[1] is not None and one[1] is not None:
                    cpus.append((full[1] - one[1]) / forked)
                counts.append(full[2])
        wall = statistics.median(walls)
        cpu = f"{statistics.median(cpus) * 1000:.1f} ms CPU" if cpus else "CPU not measured"
        print(
            f"{name}: {statistics.median(counts)} executions; per forked execution "
            f"{wall * 1000:.1f} ms wall ({1 / wall:.0f}/s), {cpu}; "
            f"load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
