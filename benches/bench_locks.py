"""Cost of exact mode's schedulable locks (rust/locks.rs) outside a round, and the wall time of
a test using module-level primitives under exact vs chaos mode.

usage: python benches/bench_locks.py [--loops N] [--trials N]

Runs in the interpreter that starts it (pytest-ftrace installed). Prints:

- ns per uncontended `acquire(); release()` and per `with lock:` for the real `_thread.lock`
  and `_thread.RLock` and for the native ones (`pytest_ftrace._native.lock` / `RLock`), and
  the ratio native / real (best of --trials);
- the wall time of `pytest --ftrace --threads 4 --iterations 20` on a file whose tests use a
  module-level Queue, Event, BoundedSemaphore, Condition and a class-attribute lock, in exact
  mode and in chaos mode, and the ratio (goal: exact within 3x chaos).
"""

from __future__ import annotations

import _thread
import argparse
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pytest_ftrace import _native

SUITE = textwrap.dedent(
    """
    import queue
    import threading

    JOBS = queue.Queue()
    READY = threading.Event()
    SLOTS = threading.BoundedSemaphore(2)
    COND = threading.Condition()
    STATE = {"n": 0, "turn": 0}

    class Memo:
        _lock = threading.Lock()
        _value = None

        @classmethod
        def get(cls):
            if cls._value is None:
                with cls._lock:
                    if cls._value is None:
                        cls._value = object()
            return cls._value

    def test_queue(thread_index):
        for i in range(20):
            JOBS.put(i)
            assert JOBS.get(timeout=30) in range(20)

    def test_event(thread_index):
        if thread_index == 0:
            READY.set()
        assert READY.wait(timeout=30)

    def test_semaphore():
        for _ in range(20):
            with SLOTS:
                with COND:
                    STATE["n"] += 1
                    assert STATE["n"] <= 2
                with COND:
                    STATE["n"] -= 1

    def test_condition(thread_index):
        with COND:
            assert COND.wait_for(lambda: STATE["turn"] % 4 == thread_index, timeout=30)
            STATE["turn"] += 1
            COND.notify_all()

    def test_memo():
        for _ in range(20):
            assert Memo.get() is Memo.get()
    """
)


def per_op(make, loops: int, trials: int) -> tuple[float, float]:
    """Best ns per acquire+release pair, and per `with` block."""
    lock = make()
    best_pair = best_with = float("inf")
    for _ in range(trials):
        acquire, release = lock.acquire, lock.release
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            acquire()
            release()
        best_pair = min(best_pair, (time.perf_counter_ns() - t0) / loops)
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            with lock:
                pass
        best_with = min(best_with, (time.perf_counter_ns() - t0) / loops)
    return best_pair, best_with


def wall(path: Path, mode: str) -> tuple[float, str]:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    args += ["--ftrace", "--ftrace-mode", mode, "--threads", "4", "--iterations", "20"]
    args += ["--seed", "1"]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=path.parent, check=False)
    seconds = time.perf_counter() - t0
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-200:]
    if "not exact" in out.stdout:
        last += " (a round was not exact)"
    return seconds, last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--trials", type=int, default=5)
    opts = parser.parse_args()
    print(f"Python {sys.version.split()[0]} ({sys.executable})")
    print(f"{'lock':<10} {'real ns':>9} {'native ns':>10} {'ratio':>6}   (acquire+release / with)")
    for name, real, native in (
        ("Lock", _thread.allocate_lock, _native.lock),
        ("RLock", _thread.RLock, _native.RLock),
    ):
        r_pair, r_with = per_op(real, opts.loops, opts.trials)
        n_pair, n_with = per_op(native, opts.loops, opts.trials)
        ratio = n_pair / r_pair
        print(f"{name:<10} {r_pair:>9.1f} {n_pair:>10.1f} {ratio:>6.2f}   acquire+release")
        print(f"{'':<10} {r_with:>9.1f} {n_with:>10.1f} {n_with / r_with:>6.2f}   with")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_module_primitives.py"
        path.write_text(SUITE)
        results = {}
        for mode in ("chaos", "exact"):
            wall(path, mode)  # warm the caches
            best = min((wall(path, mode) for _ in range(opts.trials)), key=lambda r: r[0])
            results[mode] = best
            print(f"{mode:<6} {best[0]:6.2f} s  {best[1]}")
        ratio = results["exact"][0] / results["chaos"][0]
        print(f"exact / chaos, process wall time: {ratio:.2f}x (goal <= 3x)")
        session = {m: _session_seconds(r[1]) for m, r in results.items()}
        if all(session.values()):
            ratio = session["exact"] / session["chaos"]
            print(f"exact / chaos, pytest's session time: {ratio:.2f}x (without start-up)")


def _session_seconds(line: str) -> float | None:
    import re

    match = re.search(r" in ([0-9.]+)s", line)
    return float(match.group(1)) if match else None


if __name__ == "__main__":
    main()
