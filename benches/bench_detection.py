"""Issue 4, detection: how many runs of each corpus test fail, for us and for the peers.

For each interpreter (3.12, 3.13, 3.13t; those whose venv exists under .venvs/) and each run
1..R, every test in benches/corpus/ is run by:

- ours: `pytest --ftrace --seed S` in .venvs/<py> (defaults; a distinct seed per run), plus
  any `--variant NAME=ARGS` (ours again with extra options, e.g. a tuned policy);
- pytest-run-parallel: `--parallel-threads 8 --iterations 25` in .venvs/bench-run-parallel-<py>;
- pytest-freethreaded: its defaults (10 threads, 200 iterations) in
  .venvs/bench-freethreaded-<py>, on 3.13 and newer only (it calls sys._is_gil_enabled).

Each peer lives in its own venv (they define the same options as ours); the venvs are made on
first use from the same base interpreter, with the same pytest version as ours. A run is one
pytest process per corpus file, except that test_shared_generator gets a process of its own:
on a free-threaded build two threads in one generator can crash the interpreter. If a process
dies anyway (a signal, or no outcome for a test), the test it was running counts as failed and
is marked "*" in the table (crash), or "+" (hang: the process timed out), and the tests after
it run again in a fresh process. The tools and runs are interleaved, so load on the machine
falls on all of them alike.

    python3 benches/bench_detection.py [--runs 20] [--quick] [--python 3.12 ...]
        [--tool ours --tool run-parallel --tool freethreaded]
        [--variant 'tuned=--threads 8 --ftrace-policy yield_probability=0.05']
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benches" / "corpus"
VENVS = ROOT / ".venvs"
INTERPRETERS = ("3.12", "3.13", "3.13t")
ISOLATED = ("test_shared_generator",)  # one process each: may crash a free-threaded build
COMMON_ARGS = ["-v", "-p", "no:cacheprovider", "--color=no"]
DROP_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTHON_GIL")
PROCESS_TIMEOUT = 300.0
GOAL = 0.95

RUN_PARALLEL = ("pytest-run-parallel", "0.10.0")
FREETHREADED = ("pytest-freethreaded", "0.1.0")
MODE = re.compile(r"^ftrace: seed=\S+ mode=(\w+)", re.M)
MODES_SEEN: dict[str, set] = {}  # tool label -> modes its --ftrace headers named
OUTCOME = re.compile(
    r"^(?P<node>\S+::\S+)\s+(?:PARALLEL\s+)?(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b"
)


@dataclass
class Tool:
    name: str  # column label
    python: Path
    args: list[str]
    seeded: bool = False  # pass --seed <run seed>


@dataclass
class Tally:
    failed: int = 0
    crashed: int = 0
    hung: int = 0
    runs: int = 0

    def cell(self) -> str:
        mark = (f" *{self.crashed}" if self.crashed else "") + (
            f" +{self.hung}" if self.hung else ""
        )
        return f"{self.failed}{mark}"


@dataclass
class Results:
    runs: int
    # results[interpreter][tool][nodeid] -> Tally
    table: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def tally(self, tag: str, tool: str, node: str) -> Tally:
        return self.table.setdefault(tag, {}).setdefault(tool, {}).setdefault(node, Tally())


# --------------------------------------------------------------------------- the corpus


def collect(python: Path) -> dict[str, list[str]]:
    """Node ids per corpus file, in run order (plain pytest, plugin off)."""
    proc = subprocess.run(
        [str(python), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-p", "no:ftrace", str(CORPUS.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, env=env(), check=True,
    )  # fmt: skip
    files: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        if "::" in line:
            files.setdefault(line.split("::")[0], []).append(line.strip())
    return files


def groups(files: dict[str, list[str]]) -> list[list[str]]:
    """One group per process: each file, with the isolated tests split off."""
    out = []
    for nodes in files.values():
        rest = [n for n in nodes if n.split("::")[-1] not in ISOLATED]
        out.append(rest)
        out.extend([n] for n in nodes if n.split("::")[-1] in ISOLATED)
    return [g for g in out if g]


def is_racy(node: str) -> bool:
    return "test_racy.py" in node


# --------------------------------------------------------------------------- venvs


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    out["PYTHONUNBUFFERED"] = "1"
    out["PYTHONFAULTHANDLER"] = "1"
    return out


def describe(python: Path) -> dict:
    code = textwrap.dedent(
        """
        import importlib.metadata as md, json, sys, sysconfig
        def version(name):
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return None
        print(json.dumps({
            "python": sys.version.split()[0],
            "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
            "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
            "pytest": version("pytest"),
            "ftrace": version("pytest-ftrace"),
            "run_parallel": version("pytest-run-parallel"),
            "freethreaded": version("pytest-freethreaded"),
        }))
        """
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def base_interpreter(venv: Path) -> str:
    cfg = {}
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            cfg[key.strip()] = value.strip()
    if cfg.get("executable"):
        return cfg["executable"]
    return str(Path(cfg["home"]) / ("python" + venv.name))


def ensure_peer(tag: str, peer: tuple[str, str], key: str, prefix: str, pytest: str) -> Path:
    """.venvs/<prefix>-<tag> holding the peer and our pytest version (made on first use)."""
    venv = VENVS / f"{prefix}-{tag}"
    python = venv / "bin" / "python"
    if python.exists():
        info = describe(python)
        if info[key] == peer[1] and info["pytest"] == pytest and info["ftrace"] is None:
            return python
    print(f"  making {venv.relative_to(ROOT)} ({peer[0]}=={peer[1]}, pytest=={pytest})")
    base = base_interpreter(VENVS / tag)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"pytest=={pytest}", f"{peer[0]}=={peer[1]}"],
        check=True,
    )  # fmt: skip
    return python


# --------------------------------------------------------------------------- runs


def run_group(tool: Tool, nodes: list[str], seed: int) -> dict[str, str]:
    """Outcome per node id: 'passed', 'failed', 'crashed' or 'hung'."""
    outcomes: dict[str, str] = {}
    pending = list(nodes)
    while pending:
        cmd = [str(tool.python), "-m", "pytest", *COMMON_ARGS, *tool.args]
        if tool.seeded:
            cmd += ["--seed", str(seed)]
        cmd += pending
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, env=env(), timeout=PROCESS_TIMEOUT
            )
            stdout, died = proc.stdout, proc.returncode < 0 or proc.returncode > 2
            kind = "crashed"
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
            died, kind = True, "hung"
        MODES_SEEN.setdefault(tool.name, set()).update(MODE.findall(stdout))
        seen = {}
        for line in stdout.splitlines():
            m = OUTCOME.match(line)
            if m and m["node"] in pending:
                # run-parallel reports a failure in the threads as an ERROR of the call
                seen[m["node"]] = "passed" if m["outcome"] in ("PASSED", "SKIPPED") else "failed"
                if m["outcome"] in ("XFAIL", "XPASS"):
                    seen[m["node"]] = "failed"
        outcomes.update(seen)
        rest = [n for n in pending if n not in seen]
        if not rest:
            break
        if not died:
            raise RuntimeError(
                f"no outcome for {rest[0]} (exit code {proc.returncode}):\n$ {shlex.join(cmd)}\n"
                + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            )
        outcomes[rest[0]] = kind
        pending = rest[1:]
    return outcomes


def one_run(tag: str, tool: Tool, run: int, seed: int, plan: list[list[str]]):
    outcomes: dict[str, str] = {}
    started = time.perf_counter()
    for nodes in plan:
        outcomes.update(run_group(tool, nodes, seed))
    return tag, tool.name, run, outcomes, time.perf_counter() - started


def tools_for(tag: str, args, info: dict) -> list[Tool]:
    ours = VENVS / tag / "bin" / "python"
    tools = []
    if "ours" in args.tool:
        tools.append(Tool("ours", ours, ["--ftrace"], seeded=True))
        for variant in args.variant or ():
            name, _, extra = variant.partition("=")
            tools.append(Tool(name, ours, ["--ftrace", *shlex.split(extra)], seeded=True))
    if "run-parallel" in args.tool:
        python = ensure_peer(
            tag, RUN_PARALLEL, "run_parallel", "bench-run-parallel", info["pytest"]
        )
        tools.append(
            Tool("run-parallel", python, ["--parallel-threads", "8", "--iterations", "25"])
        )
    if "freethreaded" in args.tool and tag != "3.12":
        python = ensure_peer(
            tag, FREETHREADED, "freethreaded", "bench-freethreaded", info["pytest"]
        )
        tools.append(Tool("freethreaded", python, []))
    return tools


# --------------------------------------------------------------------------- report


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


SHORT = {"ours": "ours", "run-parallel": "rp", "freethreaded": "ft"}


def report(results: Results, nodes: list[str]) -> str:
    columns = [(tag, tool) for tag, tools in results.table.items() for tool in tools]
    header = ["test"] + [f"{tag} {SHORT.get(tool, tool)}" for tag, tool in columns]
    rows = []
    for node in nodes:
        name = node.split("::")[-1].removeprefix("test_")
        if node == next((n for n in nodes if not is_racy(n)), None):
            rows.append(["-- safe twins --"] + [""] * len(columns))
        row = [name]
        for tag, tool in columns:
            t = results.table[tag][tool].get(node)
            row.append(t.cell() if t else "-")
        rows.append(row)
    out = [f"Runs failed out of {results.runs}, per test (racy first, then safe twins)", ""]
    out.append(table(header, rows))
    out.append("")
    out.append('  "20 *7": 20 runs failed, 7 of them because the interpreter crashed (a signal);')
    out.append('  "+N": N runs where the process hung past the timeout; both count as failed')
    out.append("  ours = pytest --ftrace --seed <run> (defaults); rp = pytest-run-parallel")
    out.append("  --parallel-threads 8 --iterations 25; ft = pytest-freethreaded (defaults: 10")
    out.append("  threads, 200 iterations; needs 3.13+)")
    out.append("")
    header = ["interpreter", "tool", "racy >= 95%", "min racy", "mean racy", "safe failed runs"]
    rows = []
    for tag, tool in columns:
        tallies = results.table[tag][tool]
        racy = [tallies[n].failed for n in nodes if is_racy(n) and n in tallies]
        safe = [tallies[n].failed for n in nodes if not is_racy(n) and n in tallies]
        r = results.runs
        if not racy:
            rows.append([tag, tool, "-", "-", "-", f"{sum(safe)} (of {r * len(safe)})"])
            continue
        rows.append(
            [
                tag,
                tool,
                f"{sum(f >= GOAL * r for f in racy)}/{len(racy)}",
                f"{min(racy)}/{r} ({100 * min(racy) / r:.0f}%)",
                f"{100 * sum(racy) / (r * len(racy)):.0f}%",
                f"{sum(safe)} (of {r * len(safe)})",
            ]
        )
    out.append("Summary per interpreter (goal for ours: every racy test >= 95%, no safe failure)")
    out.append("")
    out.append(table(header, rows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per test and tool (20)")
    parser.add_argument("--quick", action="store_true", help="5 runs (unless --runs is given)")
    parser.add_argument("--python", action="append", choices=INTERPRETERS)
    parser.add_argument(
        "--tool",
        action="append",
        choices=("ours", "run-parallel", "freethreaded"),
        help="tools to run (repeatable; default all three)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME=ARGS",
        help="ours again with extra pytest options, as a column of its own (repeatable)",
    )
    parser.add_argument("--seed-base", type=int, default=1, help="run k uses --seed base+k")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--json", type=Path, help="also write the tallies here")
    parser.add_argument(
        "-k",
        dest="select",
        action="append",
        help="only corpus tests whose name contains this (repeatable: any of them)",
    )
    args = parser.parse_args(argv)
    if args.quick and "--runs" not in (argv or sys.argv):
        args.runs = 5
    args.tool = args.tool or ["ours", "run-parallel", "freethreaded"]
    tags = args.python or [t for t in INTERPRETERS if (VENVS / t / "bin" / "python").exists()]

    began = time.perf_counter()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"runs: {args.runs} per test and tool; "
        f"seeds {args.seed_base}..{args.seed_base + args.runs - 1}"
    )
    print(f"load average at start: {load}; {os.cpu_count()} CPUs; jobs: {args.jobs}", flush=True)
    results = Results(args.runs)
    nodes: list[str] = []
    jobs = []
    for tag in tags:
        python = VENVS / tag / "bin" / "python"
        info = describe(python)
        files = collect(python)
        if args.select:
            files = {
                f: [n for n in ns if any(k in n for k in args.select)] for f, ns in files.items()
            }
        plan = groups(files)
        nodes = nodes or [n for ns in files.values() for n in ns]
        tools = tools_for(tag, args, info)
        gil = "GIL on" if info["gil"] else "GIL off"
        results.info[tag] = f"{info['python']}, {gil}, pytest {info['pytest']}"
        print(f"[{tag}] {results.info[tag]}; tools: {', '.join(t.name for t in tools)}")
        for tool in tools:
            for node in nodes:
                results.tally(tag, tool.name, node)
        for run in range(args.runs):
            for tool in tools:
                jobs.append((tag, tool, run, args.seed_base + run, plan))

    done = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for tag, tool, _run, outcomes, seconds in pool.map(lambda j: one_run(*j), jobs):
            results.seconds.setdefault(f"{tag} {tool}", []).append(seconds)
            for node, outcome in outcomes.items():
                t = results.tally(tag, tool, node)
                t.runs += 1
                if outcome != "passed":
                    t.failed += 1
                    t.crashed += outcome == "crashed"
                    t.hung += outcome == "hung"
            done += 1
            if done % max(1, len(jobs) // 10) == 0:
                print(f"  {done}/{len(jobs)} runs done", flush=True)

    print()
    for tag, text in results.info.items():
        print(f"{tag}: {text}")
    print()
    print(report(results, nodes))
    print()
    for name, modes in MODES_SEEN.items():
        if modes:
            print(f"  {name}: --ftrace mode(s) in the headers: {', '.join(sorted(modes))}")
    for key, values in results.seconds.items():
        print(f"  {key}: {sum(values) / len(values):.1f}s per run (all groups)")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at end: {load}; total {time.perf_counter() - began:.0f}s")
    if args.json:
        data = {
            "runs": results.runs,
            "info": results.info,
            "table": {
                tag: {tool: {n: vars(t) for n, t in ts.items()} for tool, ts in tools.items()}
                for tag, tools in results.table.items()
            },
        }
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
