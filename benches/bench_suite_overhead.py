"""Issue 4, overhead: wall time of `--ftrace` on a race-free suite against pytest-run-parallel,
at the same threads x iterations, in the same run.

The suite is the one bench_runner.py writes (202 small tests; a lock-guarded counter test fails
the run unless every body ran threads x iterations times). For each interpreter:

- ours: `pytest --ftrace --seed 1 --threads T --iterations I` in .venvs/<py> (default policy),
  plus one side per `--variant NAME=ARGS` (e.g. a tuned `--ftrace-policy`);
- stress: the same without `--ftrace` (the stress runner alone), for reference;
- run-parallel: `--parallel-threads T --iterations I` in .venvs/bench-run-parallel-<py>.

The sides run interleaved (one untimed warm-up each, then `--repeat` rounds, the first side
rotating), every run is checked (exit code 0, exactly 202 passed), and medians are compared.
Goal: ours / run-parallel <= 2x.

    python3 benches/bench_suite_overhead.py [--python 3.12 ...] [--repeat 5] [--threads 8]
        [--iterations 25] [--variant 'tuned=--ftrace-policy yield_probability=0.05']
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_runner as br  # noqa: E402  (the suite, the peer venv and the checked runs)

GOAL = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", choices=br.INTERPRETERS)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per side (default 5)")
    parser.add_argument("--threads", type=int, default=br.THREADS)
    parser.add_argument("--iterations", type=int, default=br.ITERATIONS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME=ARGS",
        help="ours again with extra options, as a side of its own (repeatable)",
    )
    parser.add_argument("--no-stress", action="store_true", help="skip the side without --ftrace")
    args = parser.parse_args(argv)
    tags = args.python or [t for t in br.INTERPRETERS if (br.VENVS / t / "bin/python").exists()]

    work = Path(tempfile.mkdtemp(prefix="ftrace-suite-"))
    suite = work / "suite"
    suite.mkdir()
    br.PYCACHE = work / "pycache"
    expected = br.write_suite(suite)
    t, i = args.threads, args.iterations
    executions = t * i
    stress = ["--threads", str(t), "--iterations", str(i)]
    ftrace = ["--ftrace", "--seed", str(args.seed), *stress]
    print(
        f"suite: {expected} tests; {t} threads x {i} iterations; median of {args.repeat} "
        f"interleaved runs per side; pytest-ftrace {br._revision()}"
    )
    print(f"load average at start: {br._load()}; {os.cpu_count()} CPUs", flush=True)
    began = time.perf_counter()
    rows = []
    try:
        for tag in tags:
            ours_python = br.VENVS / tag / "bin" / "python"
            info = br._describe(ours_python)
            peer_python = br._venv_python(br.ensure_peer_venv(tag, info))
            gil = "GIL off" if not info["gil"] else "GIL on"
            name = f"{tag} ({info['python']}, {gil})"
            load_before = br._load()
            print(f"[{name}] load: {load_before}", flush=True)
            sides = [br.Side("ours", ours_python, ftrace, "passed", tag, executions)]
            for variant in args.variant or ():
                label, _, extra = variant.partition("=")
                sides.append(
                    br.Side(
                        label, ours_python, ftrace + shlex.split(extra), "passed", tag, executions
                    )
                )
            if not args.no_stress:
                sides.append(br.Side("stress", ours_python, stress, "passed", tag, executions))
            peer_args = ["--parallel-threads", str(t), "--iterations", str(i)]
            peer = br.Side("run-parallel", peer_python, peer_args, "passed", tag, executions)
            sides.append(peer)
            br.interleaved(sides, suite, expected, args.repeat)
            p = statistics.median(peer.walls)
            pc = statistics.median(peer.cpu)
            for side in sides[:-1]:
                w = statistics.median(side.walls)
                c = statistics.median(side.cpu)
                verdict = "" if side.label == "stress" else (
                    f"<= {GOAL:.0f}x " + ("met" if w / p <= GOAL else "MISSED")
                )  # fmt: skip
                rows.append(
                    [name, side.label, f"{w:.2f}", f"{p:.2f}", f"{w / p:.2f}x",
                     f"{c / pc:.2f}x", verdict]
                )  # fmt: skip
            print(f"  done; load: {br._load()}", flush=True)
    except br.BrokenRun as exc:
        print(f"\nBROKEN RUN, not timed:\n{exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nWall time on the race-free suite, {t} threads x {i} iterations (medians)")
    header = ["interpreter", "side", "wall (s)", "run-parallel (s)", "ratio", "cpu ratio", "goal"]
    print(br._table(header, rows))
    for variant in args.variant or ():
        print(f"  {variant}")
    print(
        f"  ours: --ftrace --seed {args.seed} --threads {t} --iterations {i}; stress: the same "
        "without --ftrace;\n  cpu ratio: median child user+sys time over run-parallel's"
    )
    print(f"load average at end: {br._load()}; total {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
