"""Issue 6: --threadpool against pytest-threadpool and pytest-xdist, on I/O- and CPU-bound suites.

The I/O suite: 200 tests, each sleeping 20 ms, in one module marked
``pytestmark = pytest.mark.parallelizable("children")`` (both threadpool plugins read that
marker; xdist ignores it). Sides, per interpreter (3.12, 3.13 and 3.13t by default), all on the
same base interpreter:

- ``sequential``: our venv (.venvs/<py>), plain pytest run (no --threadpool);
- ``ours``: our venv, ``--threadpool 8``;
- ``pytest-threadpool``: .venvs/bench-threadpool-<py> with pytest-threadpool 0.4.0 from PyPI,
  ``--threadpool 8`` (it needs Python >= 3.13, so 3.12 has no such side);
- ``xdist``: .venvs/bench-xdist-<py> with pytest-xdist from PyPI, ``-n 8``.

The peer venvs are made on first use (``python -m venv`` from the same base interpreter and
``pip install``). Each side runs once untimed (warm-up: imports, .pyc files), then K trials; in
each trial every side runs once, in an order rotated from trial to trial, so that load from
other processes falls on all sides alike. The table shows medians over the trials. The slow
sequential side (4+ s a run; it only gives the base of the speed-ups) runs in the first
``--seq-repeat`` trials only.

``PYTHONDONTWRITEBYTECODE`` is removed from the environment of the runs: the peers are installed
into site-packages with their .pyc files, while our package is an editable install that would
otherwise be compiled from source by every run.

Three times per run:

- *test phase*: the wall time of ``pytest_runtestloop``, taken by a wrapper in the suite's
  conftest that encloses every plugin's implementation: everything a side does to run the
  tests and report them (setting up, running, tearing down, reporting), nothing of start-up or
  collection. For xdist, whose controller's loop also waits for its workers to start and
  collect, it is the *reports* span instead;
- *reports* (last column): from the start of the first test's setup to the end of the last
  test's teardown, from the ``start``/``stop`` stamps of the setup and teardown reports that a
  ``pytest_runtest_logreport`` hook in the conftest sees (in xdist's controller, which gets its
  workers' reports with their stamps). It leaves out what a side does before its first setup
  report's stamp and after its last teardown: pytest-threadpool runs the setup hooks of every
  test of a group on its main thread before its workers start, and makes the setup report it
  logs from the worker's own setup call, so that span leaves out its per-test hook work;
  which is why the test loop is the test phase here;
- *whole run*: wall time of the pytest subprocess, start-up and collection included.

*efficiency* is the sequential test phase divided by 8 times the side's test phase (1.0 is the
ideal 8x speed-up of the test phase); *vs ideal* is 200 x 20 ms / 8 = 0.5 s divided by the
side's test phase (the same with no per-test overhead at all). The ratios ours / peer are of
the medians (below 1.0: ours is faster). Goal: ours >= 0.90 efficiency, and a shorter test
phase and whole run than every peer.

The CPU suite (on by default, run on 3.13t and, for contrast, 3.13): 16 tests of pure-Python
arithmetic, sequential against ``--threadpool 1`` and ``--threadpool 2`` (the CPUs here). The
speed-up of the test phase with 2 workers over 1 shows how CPU-bound tests scale with cores.

Every run is checked: exit code 0 and exactly the expected number of passed tests. The load
average is printed before and after each table.

    python3 benches/bench_threadpool.py [--python 3.13 ...] [--repeat 11] [--seq-repeat 3]
        [--no-cpu] [--no-io]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
IO_TESTS = 200
IO_SLEEP = 0.020
WORKERS = 8
CPU_TESTS = 16
GOAL = 0.90
PEERS = {
    "pytest-threadpool": ("bench-threadpool", ["pytest-threadpool==0.4.0"]),
    "xdist": ("bench-xdist", ["pytest-xdist"]),
}
DROP_ENV = (
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "PYTHON_GIL",
    "PYTHONDONTWRITEBYTECODE",
)
MIN_PYTHON = {"pytest-threadpool": (3, 13)}
PYTHONS = ("3.12", "3.13", "3.13t")
COMMON = ["-q", "-p", "no:cacheprovider"]

CONFTEST = """
import json, os, threading, time
import pytest

_lock = threading.Lock()
_span = {"start": None, "stop": None, "tests": 0, "loop": None}

def pytest_configure(config):
    config.addinivalue_line("markers", "parallelizable(scope): run concurrently")

# A wrapper encloses every plugin's pytest_runtestloop (ours, pytest-threadpool's, pytest's).
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session):
    started = time.time()
    try:
        return (yield)
    finally:
        _span["loop"] = time.time() - started

def pytest_runtest_logreport(report):
    with _lock:
        if report.when == "setup":
            s = _span["start"]
            _span["start"] = report.start if s is None else min(s, report.start)
        elif report.when == "teardown":
            s = _span["stop"]
            _span["stop"] = report.stop if s is None else max(s, report.stop)
            _span["tests"] += 1

def pytest_sessionfinish(session):
    out = os.environ.get("BENCH_SPAN")
    if out and not hasattr(session.config, "workerinput"):
        with open(out, "w") as f:
            json.dump(_span, f)
"""

IO_SUITE = f"""
import time
import pytest

pytestmark = pytest.mark.parallelizable("children")

@pytest.mark.parametrize("n", range({IO_TESTS}))
def test_io(n):
    time.sleep({IO_SLEEP})
"""

CPU_SUITE = f"""
import pytest

pytestmark = pytest.mark.parallelizable("children")

def work(n):
    total = 0
    for i in range(n):
        total += (i * i) % 7
    return total

@pytest.mark.parametrize("n", range({CPU_TESTS}))
def test_cpu(n):
    assert work(1_500_000) > 0
"""


@dataclass
class Side:
    name: str
    python: Path
    args: list[str]
    tests: int
    trials: int | None = None  # at most this many timed runs (None: every trial)
    by_reports: bool = False  # test phase from the report stamps (xdist), not the test loop
    phases: list[float] = field(default_factory=list)
    spans: list[float] = field(default_factory=list)  # first setup start to last teardown stop
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # user + system time of the process

    @property
    def phase(self) -> float:
        return statistics.median(self.phases)

    @property
    def span(self) -> float:
        return statistics.median(self.spans)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cores(self) -> float:
        """CPU time per second of the whole run: how many cores the run kept busy."""
        return statistics.median([c / w for c, w in zip(self.cpus, self.walls, strict=True)])


def venv_python(name: str) -> Path:
    return VENVS / name / "bin" / "python"


def ensure_peer(base: Path, name: str, packages: list[str]) -> Path | None:
    python = venv_python(name)
    if python.exists():
        return python
    print(f"making {name}: {' '.join(packages)}", flush=True)
    try:
        subprocess.run([str(base), "-m", "venv", str(VENVS / name)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        print(f"  could not make {name}: {exc}", file=sys.stderr)
        return None
    return python


def run_once(side: Side, suite: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        span_file = handle.name
    env["BENCH_SPAN"] = span_file
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(side.python), "-m", "pytest", *COMMON, *side.args, str(suite)],
        cwd=suite,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-500:]]
    passed = re.search(r"(\d+) passed", tail[0])
    if proc.returncode != 0 or not passed or int(passed.group(1)) != side.tests:
        raise SystemExit(f"{side.name}: bad run (exit {proc.returncode}): {tail[0]}")
    if " failed" in tail[0] or " error" in tail[0]:
        raise SystemExit(f"{side.name}: bad run: {tail[0]}")
    span = json.loads(Path(span_file).read_text())
    os.unlink(span_file)
    if span["tests"] != side.tests:
        raise SystemExit(f"{side.name}: the conftest saw {span['tests']} tests")
    reports = span["stop"] - span["start"]
    side.spans.append(reports)
    side.phases.append(reports if side.by_reports or span["loop"] is None else span["loop"])
    side.walls.append(wall)
    side.cpus.append(cpu)


def measure(sides: list[Side], suite: Path, repeat: int) -> None:
    for side in sides:
        run_once(side, suite)  # warm-up (imports, .pyc files)
        side.phases.clear()
        side.spans.clear()
        side.walls.clear()
        side.cpus.clear()
    for trial in range(repeat):
        shift = trial % len(sides)
        for side in sides[shift:] + sides[:shift]:
            if side.trials is None or trial < side.trials:
                run_once(side, suite)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def write_suite(root: Path, source: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "test_suite.py").write_text(textwrap.dedent(source))
    (root / "pytest.ini").write_text("[pytest]\n")
    return root


def version_of(python: Path) -> tuple[int, int]:
    out = subprocess.check_output(
        [str(python), "-c", "import sys; print(*sys.version_info[:2])"], text=True
    )
    major, minor = out.split()
    return int(major), int(minor)


def io_bench(py: str, repeat: int, seq_repeat: int, tmp: Path) -> dict | None:
    ours = venv_python(py)
    if not ours.exists():
        print(f"\n(I/O suite on {py}: {ours} is missing; run scripts/test_all.py --python {py})")
        return None
    base = Path(
        subprocess.check_output([str(ours), "-c", "import sys; print(sys._base_executable)"])
        .decode()
        .strip()
    )
    version = version_of(ours)
    sides = [
        Side("sequential", ours, [], IO_TESTS, trials=seq_repeat),
        Side(f"ours --threadpool {WORKERS}", ours, ["--threadpool", str(WORKERS)], IO_TESTS),
    ]
    skipped = []
    for label, (prefix, packages) in PEERS.items():
        needs = MIN_PYTHON.get(label)
        if needs is not None and version < needs:
            skipped.append(f"{label} needs Python >= {needs[0]}.{needs[1]}")
            continue
        python = ensure_peer(base, f"{prefix}-{py}", packages)
        if python is None:
            skipped.append(f"{label} could not be installed")
            continue
        if label == "xdist":
            args, label = ["-n", str(WORKERS)], f"xdist -n {WORKERS}"
        else:
            args, label = ["--threadpool", str(WORKERS)], f"{label} --threadpool {WORKERS}"
        sides.append(Side(label, python, args, IO_TESTS, by_reports=label.startswith("xdist")))
    suite = write_suite(tmp / f"io-{py}", IO_SUITE)
    before = load()
    measure(sides, suite, repeat)
    after = load()
    sequential, ours_side, peers = sides[0], sides[1], sides[2:]
    ideal = IO_TESTS * IO_SLEEP / WORKERS
    print(f"\nI/O-bound: {IO_TESTS} tests x {IO_SLEEP * 1000:g} ms, Python {py}, ", end="")
    print(
        f"{os.cpu_count()} CPUs, median of {repeat} (sequential: {min(repeat, seq_repeat)}); "
        f"ideal test phase {ideal:.2f} s"
    )
    print(f"before: {before}; after: {after}")
    for note in skipped:
        print(f"(no {note})")
    header = (
        f"{'side':32} {'test phase':>10} {'speed-up':>9} {'efficiency':>10} {'vs ideal':>8} "
        f"{'whole run':>10} {'speed-up':>9} {'CPU time':>9} {'reports':>8}"
    )
    print(header)
    print("-" * len(header))
    for side in sides:
        speed = sequential.phase / side.phase
        print(
            f"{side.name:32} {side.phase:9.3f}s {speed:8.2f}x {speed / WORKERS:10.2f} "
            f"{ideal / side.phase:8.2f} {side.wall:9.3f}s {sequential.wall / side.wall:8.2f}x"
            f" {statistics.median(side.cpus):8.3f}s {side.span:7.3f}s"
        )
    for peer in peers:
        name = f"ours / {peer.name.split()[0]}"
        print(
            f"{name:32} {ours_side.phase / peer.phase:9.2f}  {'':30} "
            f"{ours_side.wall / peer.wall:9.2f}"
        )
    efficiency = sequential.phase / ours_side.phase / WORKERS
    ahead = all(ours_side.phase < p.phase for p in peers)
    ahead_wall = all(ours_side.wall < p.wall for p in peers)
    print(
        f"goal: efficiency {efficiency:.2f} >= {GOAL} {'met' if efficiency >= GOAL else 'MISSED'};"
        f" ahead of every peer on the test phase: {'yes' if ahead else 'NO'},"
        f" on the whole run: {'yes' if ahead_wall else 'NO'}"
    )
    return {"efficiency": efficiency, "met": efficiency >= GOAL and ahead and ahead_wall}


def cpu_bench(py: str, repeat: int, tmp: Path) -> None:
    python = venv_python(py)
    if not python.exists():
        print(f"\n(CPU-bound suite: {python} missing, skipped)")
        return
    sides = [
        Side("sequential", python, [], CPU_TESTS),
        Side("ours --threadpool 1", python, ["--threadpool", "1"], CPU_TESTS),
        Side("ours --threadpool 2", python, ["--threadpool", "2"], CPU_TESTS),
    ]
    suite = write_suite(tmp / f"cpu-{py}", CPU_SUITE)
    before = load()
    measure(sides, suite, repeat)
    after = load()
    one = sides[1]
    print(f"\nCPU-bound: {CPU_TESTS} tests of pure-Python arithmetic, Python {py}, ", end="")
    print(f"{os.cpu_count()} CPUs, median of {repeat}")
    print(f"before: {before}; after: {after}")
    header = (
        f"{'side':32} {'test phase':>10} {'vs 1 worker':>11} {'whole run':>10} {'cores used':>10}"
    )
    print(header)
    print("-" * len(header))
    for side in sides:
        print(
            f"{side.name:32} {side.phase:9.3f}s {one.phase / side.phase:10.2f}x {side.wall:9.3f}s"
            f" {side.cores:10.2f}"
        )
    print("(cores used: CPU time of the run per second of its wall time; other processes on")
    print(" the machine leave less than the full number of CPUs to the run)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        help=f"interpreter of the I/O comparison (repeatable; default {' '.join(PYTHONS)})",
    )
    parser.add_argument("--repeat", type=int, default=11, help="timed trials per side")
    parser.add_argument(
        "--seq-repeat", type=int, default=3, help="timed runs of the (slow) sequential side"
    )
    parser.add_argument("--cpu-repeat", type=int, default=5, help="timed trials, CPU suite")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU-bound suite")
    parser.add_argument("--no-io", action="store_true", help="skip the I/O-bound suite")
    args = parser.parse_args()
    met = True
    with tempfile.TemporaryDirectory(prefix="bench-threadpool-") as tmp:
        if not args.no_io:
            for py in args.python or PYTHONS:
                result = io_bench(py, args.repeat, args.seq_repeat, Path(tmp))
                met = met and result is not None and result["met"]
        if not args.no_cpu:
            for py in ("3.13t", "3.13"):
                cpu_bench(py, args.cpu_repeat, Path(tmp))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
