"""Issue 3: wall time of the stress runner against pytest-run-parallel, and collection time
against plain pytest.

For each interpreter (3.12, 3.13, 3.13t; those whose venv exists under .venvs/):
- run a generated race-free suite of ~200 small tests with `--threads 8 --iterations 25` in
  our venv (.venvs/<py>) and with `--parallel-threads 8 --iterations 25` in a separate venv
  holding pytest-run-parallel 0.10.0 (.venvs/bench-run-parallel-<py>, made on first use from
  the same base interpreter, with the same pytest version as ours);
- time `--collect-only -q` with our plugin against plain pytest (`-p no:ftrace`), same venv,
  and plain pytest against itself (the noise floor).

The two sides of the stress comparison run interleaved, K times each, one untimed warm-up
first. For collection, each round runs plain pytest at the same time as each of the other
three, one per CPU, and compares the pair; the median pair ratio gets a 95% interval. Every
run's outcome is checked (exit code, exactly the expected number of tests passed and nothing
else, and a counter test that fails unless the body ran threads x iterations times), so a
broken run is never timed as a fast one.

    python3 benches/bench_runner.py [--python 3.12 --python 3.13t] [--repeat 5]
        [--collect-repeat 100] [--instructions] [--collection-only] [--no-bytecode-cache] [--keep]

Collection is also shown as the fastest run, the CPU time and, with --instructions, the
instructions one run executes (valgrind; the same whatever the load): start-up costs of a few
percent drown in the wall-time noise of a shared machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import resource
import shutil
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
INTERPRETERS = ("3.12", "3.13", "3.13t")
PEER = "pytest-run-parallel"
PEER_VERSION = "0.10.0"
THREADS = 8
ITERATIONS = 25
WALL_GOAL = 1.10  # ours / run-parallel
COLLECT_GOAL = 1.05  # ours / plain pytest
RUN_TIMEOUT = 600.0
# Same for every side: no cache writes, no pytest options from the environment.
COMMON_ARGS = ["-q", "-p", "no:cacheprovider"]
DROP_ENV = (
    "PYTEST_ADDOPTS",
    "PYTEST_PLUGINS",
    "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    "PYTHON_GIL",
    "PYTHONPYCACHEPREFIX",
)


# --------------------------------------------------------------------------- the suite


def _compute_tests(count: int) -> str:
    """Pure computation on locals, in six shapes."""
    shapes = [
        """
        def test_squares_{i}():
            n = {a}
            total = 0
            for k in range(n):
                total += k * k
            assert total == (n - 1) * n * (2 * n - 1) // 6
        """,
        """
        def test_fib_{i}():
            a, b = 0, 1
            seq = [a]
            for _ in range({b}):
                a, b = b, a + b
                seq.append(a)
            assert all(seq[k] + seq[k + 1] == seq[k + 2] for k in range(len(seq) - 2))
        """,
        """
        def test_sieve_{i}():
            limit = {c}
            flags = [True] * (limit + 1)
            flags[0] = flags[1] = False
            for p in range(2, int(limit ** 0.5) + 1):
                if flags[p]:
                    flags[p * p :: p] = [False] * len(flags[p * p :: p])
            primes = [p for p, ok in enumerate(flags) if ok]
            assert all(all(p % d for d in range(2, int(p ** 0.5) + 1)) for p in primes)
        """,
        """
        def test_gcd_{i}():
            x, y = {a} * 12, {b} * 18
            a, b = x, y
            while b:
                a, b = b, a % b
            assert a == math.gcd(x, y)
            assert x * y // a == math.lcm(x, y)
        """,
        """
        def test_text_{i}():
            word = "level{i}" + "level{i}"[::-1]
            assert word == word[::-1]
            assert "".join(sorted(word)) == "".join(sorted(reversed(word)))
            assert word.upper().lower() == word
        """,
        """
        def test_collatz_{i}():
            n, steps = {c}, 0
            while n != 1:
                n = n // 2 if n % 2 == 0 else 3 * n + 1
                steps += 1
            assert 0 < steps < 1000
        """,
    ]
    parts = ["import math\n"]
    for i in range(count):
        shape = shapes[i % len(shapes)]
        parts.append(textwrap.dedent(shape).format(i=i, a=40 + i, b=15 + i % 20, c=150 + 7 * i))
    return "\n".join(parts)


def _collection_tests(count: int) -> str:
    """dict and list operations on data each test makes for itself."""
    shapes = [
        """
        def test_word_count_{i}():
            text = "the quick brown fox jumps over the lazy dog the end {i}".split()
            counts = {{}}
            for word in text:
                counts[word] = counts.get(word, 0) + 1
            assert counts["the"] == 3
            assert sum(counts.values()) == len(text)
        """,
        """
        def test_sort_dedupe_{i}():
            data = [(k * {m}) % 97 for k in range(200)]
            unique = sorted(set(data))
            assert unique == sorted(unique)
            assert len(unique) <= 97
            assert all(x in data for x in unique)
        """,
        """
        def test_invert_{i}():
            forward = {{f"k{{n}}": n * {m} for n in range(50)}}
            backward = {{v: k for k, v in forward.items()}}
            assert len(backward) == len(forward)
            assert all(forward[backward[v]] == v for v in backward)
        """,
        """
        def test_flatten_{i}():
            nested = [[j * k for k in range({m} % 7 + 3)] for j in range(30)]
            flat = [x for row in nested for x in row]
            assert len(flat) == sum(len(row) for row in nested)
            assert max(flat) == max(max(row) for row in nested)
        """,
        """
        def test_sets_{i}():
            evens = set(range(0, 200, 2))
            threes = set(range(0, 200, 3))
            assert evens & threes == set(range(0, 200, 6))
            assert len(evens | threes) == len(evens) + len(threes) - len(evens & threes)
            assert not (evens - threes) & threes
        """,
        """
        def test_group_by_{i}():
            rows = [{{"key": n % 5, "value": n * {m}}} for n in range(100)]
            groups = {{}}
            for row in rows:
                groups.setdefault(row["key"], []).append(row["value"])
            assert sorted(groups) == [0, 1, 2, 3, 4]
            assert sum(map(len, groups.values())) == len(rows)
        """,
    ]
    parts = []
    for i in range(count):
        shape = shapes[i % len(shapes)]
        parts.append(textwrap.dedent(shape).format(i=i, m=3 + i))
    return "\n".join(parts)


FIXTURE_TESTS = """
import pytest


@pytest.fixture
def numbers():
    return list(range(100))


@pytest.fixture
def table(numbers):
    return {n: n * n for n in numbers}


@pytest.fixture
def resource():
    handle = {"open": True, "items": tuple(range(10))}
    yield handle
    handle["open"] = False


@pytest.fixture
def config():
    return {"name": "bench", "size": 10, "tags": ("a", "b")}
"""


def _fixture_tests(count: int) -> str:
    shapes = [
        """
        def test_numbers_{i}(numbers):
            assert sum(x for x in numbers if x % {m} == 0) >= 0
            assert len(numbers) == 100
        """,
        """
        def test_table_{i}(table, numbers):
            assert all(table[n] == n * n for n in numbers[:{m}])
        """,
        """
        def test_resource_{i}(resource):
            assert resource["open"]
            assert sum(resource["items"]) == 45
        """,
        """
        def test_config_{i}(config, numbers):
            local = dict(config, size=config["size"] + {m})
            assert local["size"] > config["size"]
            assert len(numbers) == 100
        """,
    ]
    parts = [FIXTURE_TESTS]
    for i in range(count):
        parts.append(textwrap.dedent(shapes[i % len(shapes)]).format(i=i, m=2 + i % 9))
    return "\n".join(parts)


PARAM_TESTS = """
import pytest


@pytest.mark.parametrize("n", range(12))
def test_power_of_two(n):
    value = 1 << n
    assert value & (value - 1) == 0
    assert bin(value).count("1") == 1


@pytest.mark.parametrize("word", ["alpha", "beta", "gamma", "delta", "epsilon", "zeta",
                                  "eta", "theta", "iota", "kappa"])
def test_word(word):
    letters = sorted(word)
    assert len(letters) == len(word)
    assert word.capitalize()[0].isupper()


@pytest.mark.parametrize("a,b", [(a, b) for a in range(1, 5) for b in range(1, 4)])
def test_divmod(a, b):
    q, r = divmod(a * 7, b)
    assert q * b + r == a * 7


@pytest.mark.parametrize("size", [1, 5, 10, 50, 100, 500])
def test_reverse(size):
    data = list(range(size))
    assert list(reversed(data))[::-1] == data
"""  # 12 + 10 + 12 + 6 = 40 tests

CLASS_TESTS = """
class TestStack:
    def test_push_pop(self):
        stack = []
        for n in range(50):
            stack.append(n)
        assert [stack.pop() for _ in range(50)] == list(range(49, -1, -1))

    def test_peek(self):
        stack = [1, 2, 3]
        assert stack[-1] == 3 and len(stack) == 3

    def test_empty(self):
        assert not []

    def test_extend(self):
        stack = list(range(10))
        stack.extend(range(10, 20))
        assert stack == list(range(20))

    def test_slice(self):
        stack = list(range(30))
        assert stack[10:20] == list(range(10, 20))

    def test_count(self):
        stack = [n % 3 for n in range(30)]
        assert stack.count(0) == 10

    def test_index(self):
        stack = list("abcdef")
        assert stack.index("d") == 3

    def test_insert(self):
        stack = [1, 3]
        stack.insert(1, 2)
        assert stack == [1, 2, 3]

    def test_sort_key(self):
        stack = ["ccc", "a", "bb"]
        assert sorted(stack, key=len) == ["a", "bb", "ccc"]

    def test_remove(self):
        stack = [1, 2, 3, 2]
        stack.remove(2)
        assert stack == [1, 3, 2]


class TestMapping:
    LIMIT = 40

    def test_get_default(self):
        assert {}.get("x", 5) == 5

    def test_setdefault(self):
        mapping = {}
        mapping.setdefault("k", []).append(1)
        assert mapping == {"k": [1]}

    def test_update(self):
        mapping = dict.fromkeys(range(self.LIMIT), 0)
        mapping.update({n: n for n in range(10)})
        assert sum(mapping.values()) == 45

    def test_pop(self):
        mapping = {"a": 1, "b": 2}
        assert mapping.pop("a") == 1 and mapping == {"b": 2}

    def test_items(self):
        mapping = {n: str(n) for n in range(self.LIMIT)}
        assert all(str(k) == v for k, v in mapping.items())

    def test_merge(self):
        assert {"a": 1} | {"b": 2} == {"a": 1, "b": 2}

    def test_keys_order(self):
        mapping = {}
        for key in "zyx":
            mapping[key] = key
        assert list(mapping) == ["z", "y", "x"]

    def test_comprehension(self):
        mapping = {n: n * n for n in range(self.LIMIT) if n % 2}
        assert len(mapping) == self.LIMIT // 2

    def test_nested(self):
        mapping = {"outer": {"inner": [1, 2, 3]}}
        assert mapping["outer"]["inner"][-1] == 3

    def test_equality(self):
        assert dict(a=1, b=2) == {"b": 2, "a": 1}
"""  # 20 tests

MODULE_FIXTURE_TESTS = """
import pytest


@pytest.fixture(scope="module")
def catalogue():
    return {f"item{n}": {"price": n * 3, "tags": frozenset({"x", f"t{n % 4}"})} for n in range(60)}
"""


def _module_fixture_tests(count: int) -> str:
    parts = [MODULE_FIXTURE_TESTS]
    for i in range(count):
        parts.append(
            textwrap.dedent(
                """
                def test_catalogue_{i}(catalogue):
                    item = catalogue["item{i}"]
                    assert item["price"] == {price}
                    assert "x" in item["tags"]
                    assert sum(1 for v in catalogue.values() if "t{t}" in v["tags"]) == 15
                """
            ).format(i=i, price=i * 3, t=i % 4)
        )
    return "\n".join(parts)


COUNTER_TESTS = '''
"""Proves the body ran threads x iterations times: each execution appends a byte to a file
(a file, not a module-level counter: with --ftrace each round runs in a forked child, which
starts from the test's starting state, so a counter in memory would not add up across rounds).
"""

import os

# a new file for every run (the bench names it), else one beside this module
_FILE = os.environ.get("BENCH_COUNT_FILE") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "executions.count"
)


def test_count_executions():
    fd = os.open(_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def test_counted_all_executions():
    expected = int(os.environ.get("BENCH_EXPECTED_EXECUTIONS", "1"))
    count = os.path.getsize(_FILE) if os.path.exists(_FILE) else 0
    assert count == expected, f"the body ran {count} times, expected {expected}"
'''


def write_suite(directory: Path) -> int:
    """Write the suite; returns the number of tests pytest will collect."""
    files = {
        "pytest.ini": "[pytest]\n",  # pins the rootdir: no ini from outside applies
        "test_compute.py": _compute_tests(60),
        "test_collections.py": _collection_tests(50),
        "test_fixtures.py": _fixture_tests(20),
        "test_params.py": PARAM_TESTS,
        "test_classes.py": CLASS_TESTS,
        "test_module_fixture.py": _module_fixture_tests(10),
        "test_zz_counter.py": COUNTER_TESTS,
    }
    for name, text in files.items():
        (directory / name).write_text(text.lstrip("\n"))
    return 60 + 50 + 20 + 40 + 20 + 10 + 2


# --------------------------------------------------------------------------- venvs


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _describe(python: Path) -> dict:
    """Versions of what a venv's interpreter sees (pytest and both plugins)."""
    code = textwrap.dedent(
        """
        import importlib.metadata as md, json, sys, sysconfig
        def version(name):
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                return None
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        print(json.dumps({
            "python": sys.version.split()[0],
            "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
            "gil": gil,
            "pytest": version("pytest"),
            "ftrace": version("pytest-ftrace"),
            "run_parallel": version("pytest-run-parallel"),
        }))
        """
    )
    out = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True, env=_env(1)
    )
    return json.loads(out.stdout)


def _base_interpreter(venv: Path) -> str:
    """The interpreter a venv was made from, read from its pyvenv.cfg."""
    cfg = {}
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            cfg[key.strip()] = value.strip()
    if cfg.get("executable"):
        return cfg["executable"]
    home = Path(cfg["home"])
    name = "python" + venv.name  # .venvs/3.13t -> python3.13t
    return str(home / name)


def ensure_peer_venv(tag: str, ours: dict) -> Path:
    """.venvs/bench-run-parallel-<tag>, with pytest-run-parallel and our pytest version."""
    venv = VENVS / f"bench-run-parallel-{tag}"
    python = _venv_python(venv)
    if python.exists():
        info = _describe(python)
        if info["run_parallel"] == PEER_VERSION and info["pytest"] == ours["pytest"]:
            return venv
    print(f"  making {venv.relative_to(ROOT)} ({PEER}=={PEER_VERSION}, pytest=={ours['pytest']})")
    base = _base_interpreter(VENVS / tag)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"pytest=={ours['pytest']}", f"{PEER}=={PEER_VERSION}"],
        check=True,
    )  # fmt: skip
    return venv


# --------------------------------------------------------------------------- runs

SUMMARY = re.compile(r"^=*\s*(?P<counts>.*?)\s+in\s+(?P<seconds>[\d.]+)s(?:\s+\(.*\))?\s*=*$")
COUNT = re.compile(r"(\d+) (\w+)")


# Where the runs keep bytecode (set by main): a private PYTHONPYCACHEPREFIX per interpreter, so
# the plugin's modules and the suite are compiled once, as on a user's machine, even where
# PYTHONDONTWRITEBYTECODE is set, and nothing is written beside the sources. None: no bytecode
# is written, every run compiles every module that has no .pyc already (--no-bytecode-cache).
PYCACHE: Path | None = None


_RUNS = 0
_COUNTS: Path | None = None


def _env(expected_executions: int, tag: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env["BENCH_EXPECTED_EXECUTIONS"] = str(expected_executions)
    global _RUNS, _COUNTS
    _RUNS += 1  # the executions counted in a file of the run's own (COUNTER_TESTS)
    if _COUNTS is None:
        _COUNTS = Path(tempfile.mkdtemp(prefix="ftrace-bench-counts-"))
        atexit.register(shutil.rmtree, _COUNTS, True)
    env["BENCH_COUNT_FILE"] = str(_COUNTS / f"run-{_RUNS}")
    if PYCACHE is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE / (tag or "default"))
    return env


@dataclass
class Side:
    label: str
    python: Path
    args: list[str]
    expect: str  # "passed" for a run, "collected" for --collect-only
    tag: str
    executions: int = 1
    walls: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)  # pytest's own "in X.XXs"
    cpu: list[float] = field(default_factory=list)  # user + system seconds of the child

    def command(self, suite: Path) -> list[str]:
        return [str(self.python), "-m", "pytest", *COMMON_ARGS, *self.args, str(suite)]


class BrokenRun(Exception):
    pass


def _check(side: Side, proc: subprocess.CompletedProcess, expected: int) -> float:
    """pytest's own session time, once the run is known to be whole and green."""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    match = SUMMARY.match(lines[-1]) if lines else None
    problem = None
    if proc.returncode != 0:
        problem = f"exit code {proc.returncode}"
    elif match is None:
        problem = "no summary line"
    else:
        counts = {word: int(n) for n, word in COUNT.findall(match["counts"])}
        counts.pop("warning", None)
        counts.pop("warnings", None)
        key = "tests" if side.expect == "collected" else "passed"
        if side.expect == "collected":
            counts.pop("collected", None)
            counts = {"tests" if k == "test" else k: v for k, v in counts.items()}
        if counts != {key: expected}:
            problem = f"expected {expected} {side.expect}, got {match['counts']!r}"
    if problem:
        tail = "\n".join(proc.stdout.splitlines()[-30:] + proc.stderr.splitlines()[-10:])
        raise BrokenRun(f"{side.label}: {problem}\n$ {' '.join(side.command(Path('.')))}\n{tail}")
    return float(match["seconds"])


def run_once(side: Side, suite: Path, expected: int, record: bool) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        side.command(suite),
        cwd=suite,
        capture_output=True,
        text=True,
        env=_env(side.executions, side.tag),
        timeout=RUN_TIMEOUT,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    inner = _check(side, proc, expected)
    if record:
        side.walls.append(wall)
        side.inner.append(inner)
        side.cpu.append(cpu)
    return wall


def instructions(side: Side, suite: Path, expected: int) -> int:
    """Instructions the run executes, counted by valgrind (hash seed fixed): the same on every
    run whatever the load, so a few percent of start-up cost shows up exactly."""
    env = _env(side.executions, side.tag)
    env["PYTHONHASHSEED"] = "0"
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
        + side.command(suite),
        cwd=suite,
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
    )
    _check(side, proc, expected)
    match = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if match is None:
        raise BrokenRun(f"{side.label}: no instruction count from valgrind\n{proc.stderr[-2000:]}")
    return int(match[1].replace(",", ""))


def interleaved(sides: list[Side], suite: Path, expected: int, repeat: int) -> None:
    """One untimed warm-up each, then `repeat` rounds; the side that goes first rotates."""
    for side in sides:
        run_once(side, suite, expected, record=False)
    for k in range(repeat):
        order = sides[k % len(sides) :] + sides[: k % len(sides)]
        for side in order:
            run_once(side, suite, expected, record=True)


def run_pair(first: Side, second: Side, suite: Path, expected: int) -> tuple[float, float]:
    """Run the two at the same time, one per CPU, so that both see the machine as it is
    then; returns (first's wall, second's wall) and records walls and CPU times.

    Run one after the other, the same command on this machine takes from 0.35 s to 0.65 s
    of CPU time, as the host's speed changes within seconds: the ratio of two sequential
    runs moves by +-15%. Two runs side by side share those changes."""
    procs, outputs = [], []
    started = time.perf_counter()
    for side in (first, second):
        out = tempfile.TemporaryFile("w+")
        outputs.append(out)
        procs.append(
            subprocess.Popen(
                side.command(suite),
                cwd=suite,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(side.executions, side.tag),
            )
        )
    times: dict[int, tuple[float, float, int]] = {}
    while len(times) < 2:
        pid, status, usage = os.wait4(-1, 0)
        if pid in (procs[0].pid, procs[1].pid):
            wall = time.perf_counter() - started
            times[pid] = (wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status))
    walls = []
    for side, proc, out in zip((first, second), procs, outputs, strict=True):
        wall, cpu, code = times[proc.pid]
        proc.returncode = code
        out.seek(0)
        text = out.read()
        out.close()
        done = subprocess.CompletedProcess(proc.args, code, text, "")
        side.inner.append(_check(side, done, expected))
        side.walls.append(wall)
        side.cpu.append(cpu)
        walls.append(wall)
    return walls[0], walls[1]


def paired_rounds(base: Side, others: list[Side], suite: Path, expected: int, repeat: int):
    """`repeat` rounds; each runs base beside every other side once, in a shuffled order and
    with either one started first (seeded: every run of the benchmark makes the same
    choices). Returns, per other side, the list of its wall / base's wall, pair by pair."""
    rng = random.Random(20261201)
    ratios: dict[str, list[float]] = {side.label: [] for side in others}
    cpu_ratios: dict[str, list[float]] = {side.label: [] for side in others}
    for side in others:  # warm-up: bytecode written, files in the page cache
        run_pair(base, side, suite, expected)
    for side in [base, *others]:
        side.walls.clear()
        side.inner.clear()
        side.cpu.clear()
    for _ in range(repeat):
        order = list(others)
        rng.shuffle(order)
        for side in order:
            if rng.random() < 0.5:
                base_wall, wall = run_pair(base, side, suite, expected)
            else:
                wall, base_wall = run_pair(side, base, suite, expected)
            ratios[side.label].append(wall / base_wall)
            cpu_ratios[side.label].append(side.cpu[-1] / base.cpu[-1])
    return ratios, cpu_ratios


# --------------------------------------------------------------------------- report


def _revision() -> str:
    """The commit measured, and whether the plugin's files differ from it (editable install)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pytest_ftrace", "rust"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown (no git)"
    return f"{head or 'unknown'}" + (
        " + uncommitted changes in pytest_ftrace/ or rust/" if dirty else ""
    )


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _pair(ours: float, peer: float) -> str:
    return f"{ours:.2f} / {peer:.2f} = {ours / peer:.2f}x"


def _median_ci(values: list[float]) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free 95% confidence interval for the median, from
    the order statistics (the binomial count of values under the median, normal-approximated)."""
    ordered = sorted(values)
    n = len(ordered)
    half = 1.96 * n**0.5 / 2
    low = max(0, int(n / 2 - half))
    high = min(n - 1, int(n / 2 + half + 0.999))
    return statistics.median(ordered), ordered[low], ordered[high]


def _ci(value: tuple[float, float, float]) -> str:
    median, low, high = value
    return f"{median:.3f}x [{low:.3f}-{high:.3f}]"


def _ratio3(values) -> str:
    """'1.021x, 1.034x' for (ours, ours+opts, plain)."""
    ours, opts, plain = values
    return f"{ours / plain:.3f}x, {opts / plain:.3f}x"


def _verdict(ratio: float, goal: float) -> str:
    return f"<= {goal:.2f}x " + ("met" if ratio <= goal else "MISSED")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-+-".join("-" * w for w in widths)]
    for row in rows:
        out.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    global PYCACHE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--python",
        action="append",
        choices=INTERPRETERS,
        help="interpreter to measure (repeatable; default: each whose .venvs/<py> exists)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed runs per side of the stress runs (default 5)"
    )
    parser.add_argument(
        "--collect-repeat",
        type=int,
        default=100,
        help="rounds of the collection comparison, one timed run per side each (default 100; "
        "a run takes well under a second, and a 5%% goal needs many to stand out of the noise)",
    )
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="write no .pyc: every run compiles the plugin and the suite (as with "
        "PYTHONDONTWRITEBYTECODE=1)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count the instructions of one collection run per side under valgrind "
        "(about 20 s a run): a ratio that does not move with the machine's load",
    )
    parser.add_argument(
        "--collection-only", action="store_true", help="measure collection only (no stress runs)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated suite")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.collect_repeat < 1:
        parser.error("--repeat and --collect-repeat must be >= 1")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind on PATH")
    tags = args.python or [t for t in INTERPRETERS if _venv_python(VENVS / t).exists()]
    if not tags:
        print("no venv under .venvs/ for 3.12, 3.13 or 3.13t; run scripts/test_all.py first")
        return 2

    work = Path(tempfile.mkdtemp(prefix="ftrace-bench-"))
    suite = work / "suite"
    suite.mkdir()
    PYCACHE = None if args.no_bytecode_cache else work / "pycache"
    expected = write_suite(suite)
    executions = THREADS * ITERATIONS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    start_load = _load()
    began = time.perf_counter()
    bytecode = "off (every run compiles)" if PYCACHE is None else f"cached in {PYCACHE}"
    print(
        f"suite: {expected} tests in {suite}; {THREADS} threads x {ITERATIONS} iterations; "
        f"median of {args.repeat} interleaved runs per side (collection: "
        f"{args.collect_repeat}), after 1 warm-up each; "
        f"bytecode {bytecode}"
    )
    print(f"machine: {cpus} usable CPUs, load average (1/5/15 min) at start: {start_load}")
    print(f"pytest-ftrace: {_revision()}")

    stress = ["--threads", str(THREADS), "--iterations", str(ITERATIONS)]
    peer_stress = ["--parallel-threads", str(THREADS), "--iterations", str(ITERATIONS)]
    wall_rows, collect_rows, inner_rows, load_rows, notes = [], [], [], [], []
    collect_other_rows: list[list[str]] = []
    try:
        for tag in tags:
            ours_python = _venv_python(VENVS / tag)
            if not ours_python.exists():
                notes.append(f"{tag}: no venv at .venvs/{tag}; skipped")
                continue
            ours_info = _describe(ours_python)
            if ours_info["ftrace"] is None or ours_info["run_parallel"] is not None:
                notes.append(f"{tag}: .venvs/{tag} must hold pytest-ftrace and not {PEER}")
                continue
            peer_python = _venv_python(ensure_peer_venv(tag, ours_info))
            peer_info = _describe(peer_python)
            if peer_info["ftrace"] is not None:
                notes.append(f"{tag}: the {PEER} venv also holds pytest-ftrace; skipped")
                continue
            gil = "GIL off" if not ours_info["gil"] else "GIL on"
            name = f"{tag} ({ours_info['python']}, {gil})"
            load_before = _load()
            print(f"\n[{name}] pytest {ours_info['pytest']}; load: {load_before}", flush=True)

            if not args.collection_only:
                ours = Side("ours", ours_python, stress, "passed", tag, executions)
                peer = Side(PEER, peer_python, peer_stress, "passed", tag, executions)
                interleaved([ours, peer], suite, expected, args.repeat)
                a, b = _median(ours.walls), _median(peer.walls)
                wall_rows.append(
                    [name, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x", _verdict(a / b, WALL_GOAL)]
                )
                inner_rows.append(
                    [
                        name,
                        _pair(min(ours.walls), min(peer.walls)),
                        _pair(_median(ours.cpu), _median(peer.cpu)),
                        _pair(_median(ours.inner), _median(peer.inner)),
                        f"{_spread(ours.walls)} / {_spread(peer.walls)}",
                    ]
                )
            load_runs = _load()
            print(f"  runs done; load: {load_runs}", flush=True)

            collect = ["--collect-only"]
            plain = Side("plain", ours_python, [*collect, "-p", "no:ftrace"], "collected", tag)
            # The same command again: how far two runs of one thing differ on this machine now.
            again = Side("plain again", ours_python, plain.args, "collected", tag)
            ours_c = Side("ours", ours_python, collect, "collected", tag)
            ours_cs = Side("ours+opts", ours_python, [*collect, *stress], "collected", tag)
            ratios, cpu_ratios = paired_rounds(
                plain, [again, ours_c, ours_cs], suite, expected, args.collect_repeat
            )
            rc, rcs = _median_ci(ratios["ours"]), _median_ci(ratios["ours+opts"])
            aa = _median_ci(ratios["plain again"])
            worse = max(rc[0], rcs[0])
            collect_rows.append(
                [
                    name,
                    f"{_median(plain.walls):.3f}",
                    f"{_median(ours_c.walls):.3f}",
                    f"{_median(ours_cs.walls):.3f}",
                    _ci(rc),
                    _ci(rcs),
                    _ci(aa),
                    _verdict(worse, COLLECT_GOAL)
                    + ("" if max(rc[2], rcs[2]) <= COLLECT_GOAL else " (CI reaches over)"),
                ]
            )
            collect_other_rows.append(
                [
                    name,
                    _ratio3(min(c.walls) for c in (ours_c, ours_cs, plain)),
                    f"{_median(cpu_ratios['ours']):.3f}x, {_median(cpu_ratios['ours+opts']):.3f}x",
                    f"{_median(cpu_ratios['plain again']):.3f}x",
                ]
            )
            if args.instructions:
                counts = [instructions(c, suite, expected) for c in (ours_c, ours_cs, plain)]
                collect_other_rows[-1].append(f"{counts[2] / 1e6:.0f}M; {_ratio3(counts)}")
            load_after = _load()
            load_rows.append([name, load_before, load_runs, load_after])
            print(f"  collection done; load: {load_after}", flush=True)
    except BrokenRun as exc:
        print(f"\nBROKEN RUN, not timed:\n{exc}")
        return 1
    finally:
        if args.keep:
            print(f"suite kept in {suite}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    if wall_rows:
        print(
            f"\nWall time, --threads {THREADS} --iterations {ITERATIONS} (median of {args.repeat})"
        )
        print(_table(["interpreter", "ours (s)", f"{PEER} (s)", "ratio", "goal"], wall_rows))
        print(
            "\nThe same runs seen other ways (ours / run-parallel = ratio); less sensitive to load:"
        )
        header = ["interpreter", "fastest wall", "cpu user+sys", "pytest session", "wall range"]
        print(_table(header, inner_rows))
        print(
            "  fastest wall: min of the runs; cpu: median of the child's user+system time;\n"
            "  pytest session: median of pytest's own 'in X.XXs' (no interpreter start-up)"
        )
    print(f"\nCollection, --collect-only -q ({args.collect_repeat} rounds)")
    header = ["interpreter", "plain (s)", "ours (s)", "ours+opts (s)", "ours / plain"]
    header += ["ours+opts / plain", "plain again / plain", "goal"]
    print(_table(header, collect_rows))
    print(
        "  plain: -p no:ftrace; ours: plugin on, no options; ours+opts: plugin on with\n"
        f"  --threads {THREADS} --iterations {ITERATIONS}; plain again: plain once more (the\n"
        "  noise floor). Each round runs plain beside each of the other three, at the same\n"
        "  time on the two CPUs; a ratio is the median over the rounds of the pair's own\n"
        "  ratio, with a 95% confidence interval for that median in brackets. Times: medians.\n"
        "  Goal judged on the worse median."
    )
    print("\nThe same collection runs seen other ways (ours / plain, ours+opts / plain):")
    header = ["interpreter", "fastest wall", "cpu user+sys (paired)", "cpu, plain again"]
    if args.instructions:
        header.append("instructions (plain; ratios)")
    print(_table(header, collect_other_rows))
    print("\nLoad average (1/5/15 min)")
    print(_table(["interpreter", "before", "after runs", "after collection"], load_rows))
    for note in notes:
        print(f"note: {note}")
    print(
        f"\nload average at start: {start_load}; at end: {_load()}; {cpus} usable CPUs; "
        f"total {time.perf_counter() - began:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
