"""Issue 14 item 4: the cost of `fingerprint.take`, the picture of the project's module state
that the default `--ftrace-rounds snapshot` takes after every round (and `fork` in its
children). Writes a synthetic project of MODULES modules, each with GLOBALS globals of the
kinds the picture looks into (dicts and lists of a few dozen items, sets, a class with
attributes, an instance, functions with defaults and closures, an lru_cache, constants),
imports it, and times `take` with a scope that holds the project's files.

    python3 benches/bench_fingerprint.py [--python 3.12 ...] [--modules 50,200,1000]
        [--globals 30] [--repeat 200]

Prints, per interpreter and project size, the median time of one full picture (`take`, ms)
over REPEAT pictures, the number of modules in the interpreter (the scope's check runs over
all of them), the time of the start's picture (`Start`, once per test) and the median time of
the look after a round (`Start.same`) when the rounds ran the code of 3 of the modules (the
modules they reach by name are looked at too). One process per interpreter, run from its
venv under .venvs/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
INTERPRETERS = ("3.12", "3.13", "3.13t")

MODULE = """
import functools

CONSTANT_{i} = {i}
NAME_{i} = "module {i}"
TABLE_{i} = {{k: [k] * 3 for k in range(40)}}
ITEMS_{i} = list(range(60))
TAGS_{i} = {{"a", "b", "c", {i}}}


class Thing{i}:
    kind = "thing"
    registry = {{}}

    def __init__(self):
        self.value = {i}
        self.children = []


INSTANCE_{i} = Thing{i}()


def helper_{i}(x, cache={{}}):
    return cache.setdefault(x, x)


def make_counter_{i}():
    seen = []

    def count():
        seen.append(1)
        return len(seen)

    return count


COUNTER_{i} = make_counter_{i}()


@functools.lru_cache(maxsize=128)
def cached_{i}(x):
    return x * 2
"""

PROBE = r"""
import os, statistics, sys, time
sys.path.insert(0, {path!r})
from pytest_ftrace.ftrace import fingerprint

class Scope:
    def __init__(self, root):
        self.root = root
    def contains(self, file, name):
        return file.startswith(self.root)

root = {path!r}
for index in range({modules}):
    __import__(f"proj_{{index}}")
scope = Scope(root)
fingerprint.take(scope)
times = []
for _ in range({repeat}):
    t = time.perf_counter()
    fingerprint.take(scope)
    times.append(time.perf_counter() - t)
# what the rounds do: the picture of the start once, then after each round a look at the
# modules whose code ran (here: 3 of the project's, each calling into the others by name)
codes = [getattr(sys.modules[f"proj_{{i}}"], f"helper_{{i}}").__code__ for i in range(3)]
t = time.perf_counter()
start = fingerprint.Start(scope, lambda: codes)
start_ms = (time.perf_counter() - t) * 1e3
looks = []
for _ in range({repeat}):
    t = time.perf_counter()
    assert start.same()
    looks.append(time.perf_counter() - t)
print(f"{{statistics.median(times) * 1e3:.3f}} {{len(sys.modules)}} {{start_ms:.3f}} "
      f"{{statistics.median(looks) * 1e3:.3f}}")
"""


def write_project(where: Path, modules: int, globs: int) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for index in range(modules):
        body = MODULE.format(i=index)
        extra = "".join(f"EXTRA_{index}_{g} = {{'n': {g}}}\n" for g in range(max(0, globs - 12)))
        (where / f"proj_{index}.py").write_text(body + extra)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", choices=INTERPRETERS)
    parser.add_argument("--modules", default="50,200,1000")
    parser.add_argument("--globals", type=int, default=30, dest="globs")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    tags = args.python or [t for t in INTERPRETERS if (VENVS / t / "bin/python").exists()]
    sizes = [int(n) for n in args.modules.split(",")]
    print(f"fingerprint.take: median of {args.repeat} pictures; {args.globs} globals a module")
    print(
        f"{'python':<8}{'modules':>9}{'take (ms)':>11}{'sys.modules':>13}"
        f"{'Start (ms)':>12}{'same (ms)':>11}"
    )
    with tempfile.TemporaryDirectory(prefix="ftrace-fingerprint-") as tmp:
        for modules in sizes:
            project = Path(tmp) / f"p{modules}"
            write_project(project, modules, args.globs)
            for tag in tags:
                python = VENVS / tag / "bin/python"
                code = PROBE.format(path=str(project), modules=modules, repeat=args.repeat)
                out = subprocess.run(
                    [str(python), "-c", code], capture_output=True, text=True, check=False
                )
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                ms, loaded, start, same = out.stdout.split()
                print(
                    f"{tag:<8}{modules:>9}{float(ms):>11.3f}{int(loaded):>13}"
                    f"{float(start):>12.3f}{float(same):>11.3f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
