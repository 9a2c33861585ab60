"""Cost of --ftrace's native injection hooks, and how well they expose a lost update.

usage: python benches/bench_overhead.py [--all] [--trials N] [--json]

Runs in the interpreter that starts it (which needs pytest-ftrace installed); with --all it
runs itself under each of .venvs/3.12, .venvs/3.13 and .venvs/3.13t found in the repository
and prints one table. Columns:

- plain ns/it: one loop iteration of the workload with no monitoring.
- floor ns/ev: CPython's own cost of delivering one INSTRUCTION event to a C callback that
  does nothing (operator.is_, never DISABLEd): the least any callback can cost.
- hook ns/ev: extra time per hooked access with the native callback and a policy that never
  injects (every other instruction DISABLEd): the bare cost of the mechanism.
- slowdown: hooked time / plain time, with that passive policy (goal: <= 3x).
- inject: slowdown with the default chaos policy (yields and delays included).
- exact: slowdown in exact mode, the default of --ftrace: one managed thread, every hooked
  access a scheduling point at which it goes on (the cost of a point without a hand-over).
- activation: one activate() + a window of code + deactivate(), in microseconds, for the
  design used (global PY_START discovers code objects, in-scope ones get local INSTRUCTION
  events) and for global INSTRUCTION events; the "small" window calls one in-scope function,
  the "library" window also calls json.dumps and textwrap.dedent (out of scope).
- races: runs with lost updates out of N, two and eight threads doing `obj.n += 1`, with
  injection vs plain threads.
"""

from __future__ import annotations

import argparse
import json
import operator
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = ("3.12", "3.13", "3.13t")


# ---- workloads (in scope: this file lies under the rootdir the bench gives) ------------------


class Box:
    n = 0


def attr_loop(o, n):
    # 2 hooked accesses per iteration: LOAD_ATTR n, STORE_ATTR n
    for _ in range(n):
        o.n += 1


def dict_list_loop(d, lst, n):
    # 5 hooked accesses per iteration: LOAD_ATTR get, STORE_SUBSCR, LOAD_ATTR append,
    # CONTAINS_OP, LOAD_ATTR pop
    for i in range(n):
        k = i & 15
        d[k] = d.get(k, 0) + 1
        lst.append(k)
        if k in d:
            lst.pop()


def local_loop(n):
    # no hooked access: every offset is DISABLEd at its first event
    total = 0
    for i in range(n):
        total += i * 3 - (i >> 1)
    return total


WORKLOADS = {
    "o.n += 1": (lambda n: attr_loop(Box(), n)),
    "dict+list": (lambda n: dict_list_loop({}, [], n)),
    "locals only": (lambda n: local_loop(n)),
}
CODES = {
    "o.n += 1": attr_loop.__code__,
    "dict+list": dict_list_loop.__code__,
    "locals only": local_loop.__code__,
}


def timed(fn, n):
    t0 = time.perf_counter_ns()
    fn(n)
    return time.perf_counter_ns() - t0


def count_events(code, fn, n):
    """INSTRUCTION events one call of fn(n) delivers to a callback that never disables."""
    mon = sys.monitoring
    tool = free_tool()
    mon.use_tool_id(tool, "bench-count")
    count = 0

    def cb(c, off):
        nonlocal count
        count += 1

    mon.register_callback(tool, mon.events.INSTRUCTION, cb)
    mon.set_local_events(tool, code, mon.events.INSTRUCTION)
    fn(n)
    mon.set_local_events(tool, code, 0)
    mon.register_callback(tool, mon.events.INSTRUCTION, None)
    mon.free_tool_id(tool)
    return count


def free_tool():
    return next(t for t in (3, 4, 5, 2) if sys.monitoring.get_tool(t) is None)


def compare(fn, code, n, rounds=7):
    """Best-of-`rounds` times of plain, floor and hooked runs of fn(n), taken round-robin so
    that all three see the same load on a shared machine. Returns the times and hooked/it."""
    from pytest_ftrace.ftrace.instrument import Instrumentation

    mon = sys.monitoring
    best = {"plain": float("inf"), "floor": float("inf"), "hooked": float("inf")}
    hooked_its = 0
    with Instrumentation(7, str(HERE), [], [], yield_probability=0, delay_probability=0) as inst:
        run = inst.start_test("bench")
        floor_tool = free_tool()
        mon.use_tool_id(floor_tool, "bench-floor")
        mon.register_callback(floor_tool, mon.events.INSTRUCTION, operator.is_)
        try:
            fn(n // 10)  # warm up: specialisation
            for _ in range(rounds):
                best["plain"] = min(best["plain"], timed(fn, n))
                mon.set_local_events(floor_tool, code, mon.events.INSTRUCTION)
                best["floor"] = min(best["floor"], timed(fn, n))
                mon.set_local_events(floor_tool, code, 0)
                with run:
                    fn(10)  # first hits: DISABLE what is not hooked
                    best["hooked"] = min(best["hooked"], timed(fn, n))
                hooked_its += n + 10
        finally:
            mon.set_local_events(floor_tool, code, 0)
            mon.register_callback(floor_tool, mon.events.INSTRUCTION, None)
            mon.free_tool_id(floor_tool)
        return best, run.stats()["hooked"] / hooked_its


def injected_slowdown(fn, n, rounds=3):
    from pytest_ftrace.ftrace.instrument import Instrumentation

    plain = hooked = float("inf")
    with Instrumentation(7, str(HERE), [], []) as inst:
        run = inst.start_test("inject")
        for _ in range(rounds):
            plain = min(plain, timed(fn, n))
            with run:
                hooked = min(hooked, timed(fn, n))
    return hooked / plain


def exact_slowdown(fn, n, rounds=3):
    """Slowdown in exact mode (the default of --ftrace): one managed thread, so every hooked
    access is a scheduling point at which the same thread goes on, without a hand-over."""
    from pytest_ftrace.ftrace.instrument import Instrumentation

    plain = hooked = float("inf")
    with Instrumentation(7, str(HERE), [], []) as inst:
        run = inst.start_test("exact", mode="exact", scheduler="mix")
        native = run._native
        native.thread_enter(0)
        try:
            for r in range(rounds):
                plain = min(plain, timed(fn, n))
                with run:
                    native.round_start(r)
                    native.sched_enter(0, r, 1, r)
                    fn(10)  # first hits: DISABLE what is not hooked
                    hooked = min(hooked, timed(fn, n))
                    native.sched_exit()
        finally:
            native.thread_exit()
    return hooked / plain


def small_window(box):
    attr_loop(box, 1)


def library_window(box):
    # in-scope code that calls into out-of-scope library code
    attr_loop(box, 1)
    json.dumps({"a": [1, 2, {"b": None}], "c": "text"})
    textwrap.dedent("    a\n    b\n")


def activation_us(window, cycles=200):
    """One activate() + window + deactivate(), as instrument does it: global PY_START discovers
    code objects, in-scope ones get local INSTRUCTION events."""
    from pytest_ftrace.ftrace.instrument import Instrumentation

    with Instrumentation(7, str(HERE), [], [], yield_probability=0, delay_probability=0) as inst:
        run = inst.start_test("act")
        box = Box()
        window(box)
        t0 = time.perf_counter_ns()
        for _ in range(cycles):
            run.activate()
            window(box)
            run.deactivate()
        return (time.perf_counter_ns() - t0) / cycles / 1000


def global_instruction_us(window, cycles=200):
    """The alternative design: INSTRUCTION events for all code while active, every offset
    DISABLEd at its first event (the native callback, no scope check: a lower bound)."""
    from pytest_ftrace import _native
    from pytest_ftrace.ftrace.instrument import opcode_table

    mon = sys.monitoring
    tool = free_tool()
    mon.use_tool_id(tool, "bench-global")
    _native.set_hooked_opcodes(opcode_table())
    mon.register_callback(tool, mon.events.INSTRUCTION, _native.on_instruction)
    box = Box()
    window(box)
    try:
        t0 = time.perf_counter_ns()
        for _ in range(cycles):
            mon.set_events(tool, mon.events.INSTRUCTION)
            window(box)
            mon.set_events(tool, 0)
        return (time.perf_counter_ns() - t0) / cycles / 1000
    finally:
        mon.set_events(tool, 0)
        mon.register_callback(tool, mon.events.INSTRUCTION, None)
        mon.free_tool_id(tool)


def race_trial(inst, seed, threads, n, inject):
    box = Box()
    run = inst.start_test(f"race[{seed}]")
    barrier = threading.Barrier(threads)

    def body(i):
        run.thread_enter(i)
        run.round_start(0)
        barrier.wait()
        attr_loop(box, n)
        run.thread_exit()

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    if inject:
        run.activate()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    run.deactivate()
    return box.n < threads * n


def races(trials, threads, n=2000):
    from pytest_ftrace.ftrace.instrument import Instrumentation

    with Instrumentation(11, str(HERE), [], []) as inst:
        hit = sum(race_trial(inst, s, threads, n, True) for s in range(trials))
        plain = sum(race_trial(inst, s, threads, n, False) for s in range(trials))
    return hit, plain


def interpreter_name():
    ft = "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""
    return f"{sys.version_info[0]}.{sys.version_info[1]}{ft}"


def measure(trials):
    rows = []
    n = 100_000
    for name, fn in WORKLOADS.items():
        code = CODES[name]
        best, hooked_per_it = compare(fn, code, n)
        events = count_events(code, fn, n)
        plain = best["plain"]
        rows.append(
            {
                "workload": name,
                "plain_ns_per_it": plain / n,
                "floor_ns_per_event": (best["floor"] - plain) / events,
                "hooked_per_it": hooked_per_it,
                "hook_ns_per_event": (best["hooked"] - plain) / (hooked_per_it * n)
                if hooked_per_it
                else None,
                "slowdown": best["hooked"] / plain,
                "inject_slowdown": injected_slowdown(fn, n // 10),
                "exact_slowdown": exact_slowdown(fn, n // 10),
            }
        )
    r2 = races(trials, 2)
    r8 = races(trials, 8)
    return {
        "python": interpreter_name(),
        "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
        "rows": rows,
        "activation_us": {
            "small": activation_us(small_window),
            "library": activation_us(library_window),
            "global_small": global_instruction_us(small_window),
            "global_library": global_instruction_us(library_window),
        },
        "races": {"trials": trials, "2": r2, "8": r8},
    }


def print_table(results):
    head = (
        f"{'python':7} {'workload':12} {'plain ns/it':>11} {'floor ns/ev':>11} "
        f"{'hooked/it':>9} {'hook ns/ev':>10} {'slowdown':>8} {'inject':>7} {'exact':>7}"
    )
    print(head)
    print("-" * len(head))
    for res in results:
        for r in res["rows"]:
            per_ev = "-" if r["hooked_per_it"] < 0.01 else f"{r['hook_ns_per_event']:.0f}"
            print(
                f"{res['python']:7} {r['workload']:12} {r['plain_ns_per_it']:11.1f} "
                f"{r['floor_ns_per_event']:11.1f} {r['hooked_per_it']:9.1f} {per_ev:>10} "
                f"{r['slowdown']:7.2f}x {r['inject_slowdown']:6.1f}x "
                f"{r['exact_slowdown']:6.1f}x"
            )
    print()
    print("activate + window + deactivate, us: PY_START discovery (used) vs global INSTRUCTION")
    print(f"{'python':7} {'small':>7} {'global':>7} {'library':>8} {'global':>7}")
    for res in results:
        a = res["activation_us"]
        print(
            f"{res['python']:7} {a['small']:7.1f} {a['global_small']:7.1f} "
            f"{a['library']:8.1f} {a['global_library']:7.1f}"
        )
    print()
    print(f"{'python':7} {'GIL':5} races with injection vs plain threads (runs with lost updates)")
    for res in results:
        rc = res["races"]
        print(
            f"{res['python']:7} {'on' if res['gil'] else 'off':5} "
            f"2 threads: {rc['2'][0]}/{rc['trials']} vs {rc['2'][1]}/{rc['trials']}; "
            f"8 threads: {rc['8'][0]}/{rc['trials']} vs {rc['8'][1]}/{rc['trials']}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="run under each venv in .venvs")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if not args.all:
        res = measure(args.trials)
        if args.json:
            print(json.dumps(res))
        else:
            print_table([res])
        return
    results = []
    for name in VENVS:
        python = ROOT / ".venvs" / name / "bin" / "python"
        if not python.exists():
            print(f"{name}: no venv at {python}, skipped", file=sys.stderr)
            continue
        out = subprocess.run(
            [str(python), __file__, "--json", "--trials", str(args.trials)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr}", file=sys.stderr)
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(results)


if __name__ == "__main__":
    main()
