"""Issue 14: real libraries' own test suites under plain pytest, `--ftrace` (exact and chaos
mode) and pytest-run-parallel, at the same threads x iterations, in the same run.

For each interpreter and library (tenacity, pybreaker, boltons, pykka, cachetools, blinker):

- the library's sources with its tests: the sdist from PyPI (`pip download --no-binary :all:`)
  where it ships its tests, or a checkout given with `--source NAME=PATH` where it does not
  (pybreaker 1.4.1: its tests are only in the git tag). PATH is a source tree, or a git
  directory whose tag is exported (`NAME=GITDIR@TAG` picks another tag). Sources are unpacked
  under .venvs/bench-real/src/, never into the repository.
- two venvs, made on first use and kept while their recipe is the same:
  .venvs/bench-real-<lib>-<py>-ftrace (our plugin, built from this tree as a wheel, plus the
  library and its test dependencies) and .venvs/bench-real-<lib>-<py>-run-parallel
  (pytest-run-parallel instead of ours; same pytest version). They are apart because both
  plugins define `--iterations`.
- the sides, one after the other (never two suites at once): `plain` (plain pytest,
  `-p no:ftrace`), `exact` (`--ftrace --threads T --iterations I`, the default mode), `chaos`
  (the same with `--ftrace-mode chaos`), `one-thread` (exact mode with `--threads 1`, the same
  iterations) and `run-parallel` (`--parallel-threads T --iterations I`). Every run is bounded
  by `--timeout` (the whole process group is killed and the run reported as TIMEOUT, with the
  counts seen so far) and the ftrace runs also by `--ftrace-timeout` (per test).

Every run is rooted in the library's tree (`--rootdir`, and `-c` its own pytest configuration
or an empty one). Results come from each run's junitxml. The table per interpreter gives tests,
passed, failed, errors, skipped, "only here" (failing on this side, not under plain pytest nor
pytest-run-parallel), wall time and its ratio to plain pytest and to pytest-run-parallel; below
it, the most common failure kinds of each side (the exception line of each distinct failure),
and for exact and chaos those of the "only here" tests.

With the `one-thread` side, a second table splits each library's failures under exact (and
chaos) mode into those that also fail with `--threads 1` (the test fails on one thread too:
round-to-round state, a test that is not repeatable, or a failure of its own) and those that do
not: the concurrency-only failures, each listed with its failure kind, to be classified as a real
race in the library, state the test itself shares between its threads, or a plugin artefact.

    python3 benches/bench_real_suites.py [--python 3.12 ...] [--library pykka ...]
        [--sides plain,exact,chaos,one-thread,run-parallel] [--timeout 1200]
        [--ftrace-timeout 120]
        [--threads 4] [--iterations 5] [--source pybreaker=PATH[@TAG]] [--keep-logs DIR]
        [--report DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

import bench_runner as br  # noqa: E402  (peer name/version, env rules, table, revision, load)
from test_all import find_interpreter  # noqa: E402

ROOT = br.ROOT
VENVS = br.VENVS
CACHE = VENVS / "bench-real"
SIDES = ("plain", "exact", "chaos", "one-thread", "run-parallel")
REPORTER = "bench_real_reporter"  # real_suites_plugin/bench_real_reporter.py
RECIPE_VERSION = 1  # bump to remake every venv


@dataclass(frozen=True)
class Library:
    name: str
    version: str
    deps: tuple[str, ...]  # test dependencies, installed beside the library
    tests: tuple[str, ...] = ("tests",)
    git_tag: str | None = None  # set when the sdist has no tests: --source is needed
    repo: str = ""  # where a checkout comes from (for the message)
    args: tuple[str, ...] = ()  # extra pytest arguments for every side


LIBRARIES = {
    lib.name: lib
    for lib in (
        Library("tenacity", "9.2.1", ("tornado>=6.0",)),
        Library(
            "pybreaker",
            "1.4.1",
            # redis 8.2.0 fails 24 of pybreaker 1.4.1's tests with no plugin at all
            ("mock", "tornado", "redis==8.1.0", "fakeredis"),
            git_tag="v1.4.1",
            repo="danielfm/pybreaker",
        ),
        Library("boltons", "26.2.0", ()),
        Library("pykka", "4.5.0", ("pytest-mock",)),
        Library("cachetools", "8.0.3", ()),
        # blinker turns warnings into errors; pytest-asyncio warns at start when its loop scope
        # is unset (blinker 1.9.0 predates that warning)
        Library(
            "blinker",
            "1.9.0",
            ("pytest-asyncio",),
            args=("-o", "asyncio_default_fixture_loop_scope=function"),
        ),
    )
}


class Unavailable(Exception):
    """A library's sources or venv cannot be had; the library is skipped with this message."""


# --------------------------------------------------------------------------- sources


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise Unavailable(
            f"$ {' '.join(map(str, cmd))}\n{(proc.stdout + proc.stderr).strip()[-3000:]}"
        )
    return proc


def _has_tests(tree: Path, lib: Library) -> bool:
    return all((tree / t).exists() for t in lib.tests)


def source_tree(lib: Library, given: str | None, pip_python: Path) -> Path:
    """A directory holding the library's sources and its tests."""
    if given:
        path, _, tag = given.partition("@")
        src = Path(path).expanduser().resolve()
        is_git = (
            src.is_dir()
            and subprocess.run(
                ["git", "--git-dir", str(src), "rev-parse", "--git-dir"], capture_output=True
            ).returncode
            == 0
            and not _has_tests(src, lib)
        )
        if is_git:
            tag = tag or lib.git_tag or f"v{lib.version}"
            dest = CACHE / "src" / f"{lib.name}-{tag}"
            if not _has_tests(dest, lib):
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                archive = subprocess.run(
                    ["git", "--git-dir", str(src), "archive", "--format=tar", tag],
                    capture_output=True,
                )
                if archive.returncode != 0:
                    raise Unavailable(
                        f"--source {lib.name}={given}: `git archive {tag}` failed: "
                        + archive.stderr.decode(errors="replace").strip()
                    )
                with tempfile.TemporaryFile() as tmp:
                    tmp.write(archive.stdout)
                    tmp.seek(0)
                    with tarfile.open(fileobj=tmp) as tar:
                        tar.extractall(dest, filter="data")
            return dest
        if not _has_tests(src, lib):
            raise Unavailable(
                f"--source {lib.name}={given}: neither a source tree with "
                f"{', '.join(lib.tests)} nor a git directory"
            )
        return src
    if lib.git_tag:
        raise Unavailable(
            f"{lib.name} {lib.version}'s sdist has no tests: they are in the git tag "
            f"{lib.git_tag} of the {lib.repo} repository on GitHub. Give a checkout of that tag "
            f"or the repository's git directory (the tag is exported):\n"
            f"    --source {lib.name}=PATH/TO/CHECKOUT   or   --source {lib.name}=PATH/TO/.git"
        )
    dest = CACHE / "src" / f"{lib.name}-{lib.version}"
    if _has_tests(dest, lib):
        return dest
    with tempfile.TemporaryDirectory(prefix="bench-real-sdist-") as tmp:
        _run(
            [pip_python, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-binary", ":all:", "--no-deps", "-d", tmp, f"{lib.name}=={lib.version}"]
        )  # fmt: skip
        (archive,) = Path(tmp).iterdir()
        shutil.rmtree(dest, ignore_errors=True)
        unpack = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            tar.extractall(unpack, filter="data")
        (top,) = unpack.iterdir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(top), dest)
    if not _has_tests(dest, lib):
        raise Unavailable(f"{lib.name} {lib.version}'s sdist has no {', '.join(lib.tests)}")
    return dest


# --------------------------------------------------------------------------- venvs


def plugin_wheel(tag: str, base: str) -> Path:
    """This tree's plugin built once per interpreter as a wheel (extension included)."""
    out = CACHE / "wheels" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    builder = VENVS / "bench-real-build" / tag
    if not (builder / "bin" / "python").exists():
        _run([base, "-m", "venv", builder])
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / f"py{tag}"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    print(f"  building the plugin's wheel for {tag} (CARGO_TARGET_DIR=target/py{tag})", flush=True)
    _run([builder / "bin" / "python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT],
         env=env)  # fmt: skip
    (wheel,) = out.glob("pytest_ftrace-*.whl")
    return wheel


def _version(python: Path, dist: str) -> str | None:
    code = (
        "import importlib.metadata as m, sys\n"
        "try: print(m.version(sys.argv[1]))\n"
        "except m.PackageNotFoundError: print('')"
    )
    out = subprocess.run([str(python), "-c", code, dist], capture_output=True, text=True)
    return out.stdout.strip() or None


def ensure_venv(venv: Path, base: str, recipe: list[str], always: list[str] = ()) -> Path:
    """A venv holding `recipe` (pip requirements); remade when the recipe changes. `always` is
    reinstalled every time (our wheel: the tree may have changed)."""
    python = venv / "bin" / "python"
    stamp = venv / "bench-real.json"
    want = {"version": RECIPE_VERSION, "base": base, "recipe": recipe}
    fresh = not (python.exists() and stamp.exists() and json.loads(stamp.read_text()) == want)
    if fresh:
        print(f"  making {venv.relative_to(ROOT)}", flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        _run([base, "-m", "venv", venv])
        _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *recipe,
              *always])  # fmt: skip
        stamp.write_text(json.dumps(want))
    elif always:
        _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--force-reinstall", "--no-deps", *always])  # fmt: skip
    return python


# --------------------------------------------------------------------------- runs


@dataclass
class Result:
    library: str
    side: str
    status: str = ""  # "ok" (exit 0), "exit N", "TIMEOUT", "skipped: ..."
    tests: int | None = None
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    wall: float | None = None
    partial: bool = False  # counts seen before a timeout, from the -v lines
    outcomes: dict[str, str] = field(default_factory=dict)  # test -> passed/failed/errors/skipped
    test_kinds: dict[str, list[str]] = field(default_factory=dict)  # test -> its failure kinds
    log: Path | None = None
    stopped_in: str | None = None  # a TIMEOUT's last test started

    @property
    def kinds(self) -> collections.Counter:
        """Failure kinds, each counted once per test it appears in."""
        return collections.Counter(k for ks in self.test_kinds.values() for k in set(ks))

    def count(self) -> None:
        counts = collections.Counter(self.outcomes.values())
        self.passed, self.failed = counts["passed"], counts["failed"]
        self.errors, self.skipped = counts["errors"], counts["skipped"]


VERBOSE = re.compile(r"^(\S+::\S*).*? (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
STARTED = re.compile(r"^\S+\.py::\S+")
COLLECTED = re.compile(r"collected (\d+) items?")
ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
LONG_NUMBER = re.compile(r"\b\d{7,}\b")  # ids, timestamps: they would split one kind in many


DISTINCT = re.compile(r"^\[\d+\] (?P<what>.*?)(?: - \d+ times?\b.*)?$")


def _shorten(kind: str) -> str:
    kind = LONG_NUMBER.sub("N", ADDRESS.sub("0x...", kind.strip()))
    return kind if len(kind) <= 110 else kind[:107] + "..."


def _kinds(element: ET.Element) -> list[str]:
    return kinds_of(element.text or "", element.get("message") or element.tag)


def kinds_of(text: str, message: str = "") -> list[str]:
    """What went wrong, one line per distinct failure. A ConcurrencyError report lists its
    distinct failures as `[k] Type at file:line - N times`, each followed by a traceback: the
    kind is the exception line that ends the block's last traceback. Any other report: its
    first `E   ` line, else its message."""
    lines = text.splitlines()
    blocks: list[list[str]] = []
    for line in lines:
        if DISTINCT.match(line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    kinds = []
    for block in blocks:
        kind, in_traceback = None, False
        for line in block[1:]:
            if line.startswith("Traceback (most recent call last):"):
                in_traceback = True
            elif in_traceback and line and not line[0].isspace():
                kind, in_traceback = line, False
        kinds.append(_shorten(kind or DISTINCT.match(block[0])["what"]))
    if kinds:
        return kinds
    for line in lines:
        if line.startswith("E   ") and line[4:].strip():
            return [_shorten(line[4:])]
    message = (message or text).strip() or "(no report)"
    return [_shorten(message.splitlines()[0])]


def _node(verbose_id: str) -> str:
    """tests/test_x.py::Cls::test_y -> tests.test_x.Cls::test_y, the junitxml's naming."""
    parts = verbose_id.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]) + "::" + parts[-1]


def parse_junit(path: Path, result: Result) -> None:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    seen = result.outcomes
    for suite in suites:
        for case in suite.iter("testcase"):
            node = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    # an error at teardown of a failed test counts as the failure only
                    if outcome == "passed" or child.tag == "failure":
                        outcome = "failed" if child.tag == "failure" else "errors"
                    result.test_kinds.setdefault(node, []).extend(_kinds(child))
                elif child.tag == "skipped" and outcome == "passed":
                    outcome = "skipped"
            seen[node] = outcome
    result.count()


def parse_partial(log: Path, result: Result) -> None:
    """Counts from pytest -v's progress lines: what had finished when the run was stopped; the
    failure kinds from the reports bench_real_reporter wrote as they came."""
    outcomes = result.outcomes
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        if STARTED.match(line):
            result.stopped_in = line.split()[0]
        match = VERBOSE.match(line)
        if match:
            node, word = match.groups()
            node = _node(node)
            if word == "ERROR" and outcomes.get(node) not in (None, "passed"):
                continue
            outcomes[node] = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed",
                              "ERROR": "errors"}.get(word, "skipped")  # fmt: skip
    reports = log.with_suffix(".jsonl")
    if reports.exists():
        for line in reports.read_text(errors="replace").splitlines():
            report = json.loads(line)
            node = _node(report["nodeid"])
            outcomes.setdefault(node, "failed" if report["when"] == "call" else "errors")
            result.test_kinds.setdefault(node, []).extend(kinds_of(report["text"]))
    result.count()
    result.partial = True


def _pytest_config(tree: Path) -> Path | None:
    """The tree's own pytest configuration file, if it has one."""
    for name, marker in (("pytest.ini", ""), ("pyproject.toml", "[tool.pytest.ini_options]"),
                         ("tox.ini", "[pytest]"), ("setup.cfg", "[tool:pytest]")):  # fmt: skip
        path = tree / name
        if path.is_file() and marker in path.read_text(errors="replace"):
            return path
    return None


def config_args(tree: Path) -> list[str]:
    """Root the run in the library's tree: without this, a tree with no pytest configuration
    of its own (pybreaker, pykka) under .venvs/ would take this repository's pyproject.toml as
    its configuration and the repository as its rootdir."""
    config = _pytest_config(tree)
    if config is None:
        config = CACHE / "empty-pytest.ini"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("[pytest]\n")
    return ["--rootdir", str(tree), "-c", str(config)]


def run_side(
    result: Result, python: Path, args: list[str], tree: Path, lib: Library, timeout: float,
    logs: Path,
) -> None:  # fmt: skip
    tag = f"{result.library}-{result.side}"
    junit = logs / f"{tag}.xml"
    log = logs / f"{tag}.log"
    junit.unlink(missing_ok=True)
    log.with_suffix(".jsonl").unlink(missing_ok=True)
    cmd = [str(python), "-m", "pytest", "-v", "-p", "no:cacheprovider", "--color=no",
           "-o", "addopts=", *config_args(tree), f"--junitxml={junit}", "-p", REPORTER,
           *lib.args, *args, *lib.tests]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in br.DROP_ENV}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode goes to a private prefix, not the sources
    env["PYTHONPYCACHEPREFIX"] = str(CACHE / "pycache" / python.parent.parent.name)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "real_suites_plugin"),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    env["BENCH_REAL_REPORTS"] = str(log.with_suffix(".jsonl"))
    result.log = log
    with log.open("w") as out:
        out.write("$ cd " + str(tree) + " && " + " ".join(cmd) + "\n")
        out.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tree, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group only
            proc.wait()
            rc = None
        result.wall = time.perf_counter() - started
    collected = COLLECTED.findall(log.read_text(errors="replace"))
    result.tests = int(collected[-1]) if collected else None
    if rc is None:
        result.status = "TIMEOUT"
        parse_partial(log, result)
        return
    result.status = "ok" if rc == 0 else f"exit {rc}"
    if junit.exists():
        parse_junit(junit, result)
    else:
        parse_partial(log, result)
    if result.tests is None:
        result.tests = result.passed + result.failed + result.errors + result.skipped


def side_args(side: str, args) -> list[str]:
    t, i = str(args.threads), str(args.iterations)
    ftrace = ["--ftrace", "--seed", str(args.seed), "--threads", t, "--iterations", i,
              "--ftrace-timeout", str(args.ftrace_timeout)]  # fmt: skip
    return {
        "plain": ["-p", "no:ftrace"],
        "exact": ftrace,
        "chaos": [*ftrace, "--ftrace-mode", "chaos"],
        "one-thread": [*ftrace[:4], "1", *ftrace[5:]],
        "run-parallel": ["--parallel-threads", t, "--iterations", i],
    }[side]


# --------------------------------------------------------------------------- report


def save(path: Path, name: str, results: list[Result]) -> None:
    """What the tables need besides the logs: status and wall time of each run."""
    rows = [
        {"library": r.library, "side": r.side, "status": r.status, "wall": r.wall,
         "log": str(r.log) if r.log else None}
        for r in results
    ]  # fmt: skip
    path.write_text(json.dumps({"name": name, "results": rows}, indent=1))


def load(path: Path) -> tuple[str, list[Result]]:
    """An earlier run's results, its junitxml and logs parsed again (the logs are found beside
    results.json, so the directory may have moved)."""
    data = json.loads(path.read_text())
    results = []
    for row in data["results"]:
        r = Result(row["library"], row["side"], status=row["status"], wall=row["wall"])
        results.append(r)
        if not row["log"]:
            continue
        r.log = path.parent / Path(row["log"]).name
        junit = r.log.with_suffix(".xml")
        if r.status != "TIMEOUT" and junit.exists():
            parse_junit(junit, r)
        else:
            parse_partial(r.log, r)
        collected = COLLECTED.findall(r.log.read_text(errors="replace"))
        r.tests = int(collected[-1]) if collected else r.passed + r.failed + r.errors + r.skipped
    return data["name"], results


def _cell_wall(r: Result) -> str:
    if r.wall is None:
        return "-"
    return f"{r.wall:.1f}" + (" (TIMEOUT)" if r.status == "TIMEOUT" else "")


def _ratio(r: Result, base: Result | None) -> str:
    if r.wall is None or base is None or base.wall is None or base is r:
        return "-" if base is not r or r.wall is None else "1.00x"
    mark = ">" if r.status == "TIMEOUT" else ""
    return f"{mark}{r.wall / base.wall:.2f}x"


def _only_here_tests(r: Result, sides: dict[str, Result]) -> list[str]:
    """Tests failing on side r that passed or were skipped under plain and run-parallel (those
    of the two that ran and reported this test)."""
    others = [sides[s] for s in ("plain", "run-parallel") if s in sides and sides[s] is not r]
    fine = ("passed", "skipped")
    return [
        test
        for test, outcome in r.outcomes.items()
        if outcome not in fine and all(o.outcomes.get(test, "passed") in fine for o in others)
    ]


def _only_here(r: Result, sides: dict[str, Result]) -> str:
    if r.side == "plain" or r.wall is None:
        return "-"
    return str(len(_only_here_tests(r, sides)))


def _fail(outcome: str | None) -> bool:
    return outcome not in (None, "passed", "skipped")


def concurrency_split(results: list[Result]) -> str | None:
    """Per library, the failures of exact and chaos mode split by whether the test also fails
    with one thread (the `one-thread` side); the concurrency-only ones listed with their kinds.
    None when no one-thread side ran."""
    by_lib: dict[str, dict[str, Result]] = collections.defaultdict(dict)
    for r in results:
        by_lib[r.library][r.side] = r
    if not any("one-thread" in sides for sides in by_lib.values()):
        return None
    header = ["library", "side", "failed", "also with 1 thread", "only with threads",
              "not run on 1 thread", "1 thread"]  # fmt: skip
    rows, listed = [], []
    for lib, sides in by_lib.items():
        one = sides.get("one-thread")
        if one is None or one.wall is None or one.status.startswith("skipped"):
            continue
        for side in ("exact", "chaos"):
            r = sides.get(side)
            if r is None or r.wall is None or r.status.startswith("skipped"):
                continue
            failing = sorted(t for t, o in r.outcomes.items() if _fail(o))
            # a test the one-thread side did not reach (it was stopped) is neither
            also = [t for t in failing if _fail(one.outcomes.get(t))]
            only = [t for t in failing if one.outcomes.get(t) in ("passed", "skipped")]
            unseen = [t for t in failing if t not in one.outcomes]
            star = "*" if r.partial or one.partial else ""
            counts = [str(len(also)), str(len(only)), str(len(unseen))]
            one_side = f"{one.failed + one.errors} failed ({one.status})"
            rows.append([lib, side, f"{len(failing)}{star}", *counts, one_side])
            for test in only:
                kinds = sorted(set(r.test_kinds.get(test, ["(no report)"])))
                listed.append(f"  {lib} / {side}: {test}\n      " + "\n      ".join(kinds))
    out = [
        "Failures under threads split by whether they also fail with --threads 1",
        br._table(header, rows),
    ]
    if listed:
        out.append("Concurrency-only failures (fail with threads, pass with --threads 1):")
        out.extend(listed)
    return "\n".join(out)


def report(name: str, results: list[Result], top: int) -> str:
    header = ["library", "side", "status", "tests", "passed", "failed", "errors", "skipped",
              "only here", "wall (s)", "/ plain", "/ run-parallel"]  # fmt: skip
    rows = []
    by_lib: dict[str, dict[str, Result]] = collections.defaultdict(dict)
    for r in results:
        by_lib[r.library][r.side] = r
    for lib, sides in by_lib.items():
        for side, r in sides.items():
            if r.status.startswith("skipped"):
                rows.append([lib, side, r.status, *["-"] * 9])
                continue
            star = "*" if r.partial else ""
            rows.append(
                [lib, side, r.status, "-" if r.tests is None else str(r.tests),
                 f"{r.passed}{star}", f"{r.failed}{star}", f"{r.errors}{star}",
                 f"{r.skipped}{star}", _only_here(r, sides), _cell_wall(r),
                 _ratio(r, sides.get("plain")),
                 _ratio(r, sides.get("run-parallel"))]
            )  # fmt: skip
    out = [f"{name}", br._table(header, rows)]
    if any(r.partial for r in results):
        out.append("  * counted from the -v lines printed before the run stopped (no junitxml)")
    out.append(
        "  only here: tests that failed or errored on this side but passed (or were skipped) "
        "under plain pytest\n  and pytest-run-parallel: the failures the peer does not show"
    )
    out.append("\nMost common failure kinds (exception line of each distinct failure; n tests)")
    if not any(r.kinds or r.status == "TIMEOUT" for r in results):
        out.append("  (none)")
    for lib, sides in by_lib.items():
        for side, r in sides.items():
            if not r.kinds and r.status not in ("TIMEOUT",):
                continue
            out.append(f"  {lib} / {side}:")
            for kind, n in r.kinds.most_common(top):
                out.append(f"    {n:4d} x {kind}")
            if len(r.kinds) > top:
                rest = sum(r.kinds.values()) - sum(n for _, n in r.kinds.most_common(top))
                out.append(
                    f"         and {len(r.kinds) - top} other kinds ({rest} test-kind pairs)"
                )
            if r.side in ("exact", "chaos") and _only_here_tests(r, sides):
                only = _only_here_tests(r, sides)
                kinds = collections.Counter(
                    k for t in only for k in set(r.test_kinds.get(t, ["(no report)"]))
                )
                out.append(f"    of which in the {len(only)} tests that fail only here:")
                for kind, n in kinds.most_common(top):
                    out.append(f"    {n:4d} x {kind}")
            if r.status == "TIMEOUT":
                out.append(
                    f"    run stopped after {r.wall:.0f}s, in {r.stopped_in or '?'} (log: {r.log})"
                )
    split = concurrency_split(results)
    if split is not None:
        out.append("\n" + split)
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise argparse.ArgumentTypeError(f"sides are {', '.join(SIDES)}; got {text!r}")
    return sides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", choices=br.INTERPRETERS,
                        help="interpreter (repeatable; default 3.12)")  # fmt: skip
    parser.add_argument("--library", action="append", choices=sorted(LIBRARIES),
                        help="library (repeatable; default all)")  # fmt: skip
    parser.add_argument("--sides", type=_sides, default=list(SIDES),
                        help=f"comma-separated, from {','.join(SIDES)} (default all)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds one suite run may take (default 1200)")  # fmt: skip
    parser.add_argument("--ftrace-timeout", type=float, default=120.0,
                        help="--ftrace-timeout of the ftrace sides (default 120)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1, help="--seed of the ftrace sides")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH[@TAG]",
                        help="a library's source tree, or git dir (+ tag), when its sdist has "
                        "no tests (pybreaker)")  # fmt: skip
    parser.add_argument("--top", type=int, default=3, help="failure kinds shown per side")
    parser.add_argument("--keep-logs", type=Path, help="write each run's log and junitxml here")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="run nothing: print the tables of an earlier run's --keep-logs DIR "
                        "(the junitxml and logs are parsed again)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.report:
        for path in sorted(args.report.glob("*/results.json")):
            print(report(*load(path), args.top) + "\n")
        return 0
    sources: dict[str, str] = {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or name not in LIBRARIES or not path:
            parser.error(f"--source: expected NAME=PATH with NAME in {sorted(LIBRARIES)}")
        sources[name] = path
    tags = args.python or ["3.12"]
    libs = [LIBRARIES[n] for n in (args.library or LIBRARIES)]
    logs = args.keep_logs or Path(tempfile.mkdtemp(prefix="bench-real-logs-"))
    logs.mkdir(parents=True, exist_ok=True)

    print(
        f"pytest-ftrace {br._revision()}; {args.threads} threads x {args.iterations} iterations; "
        f"sides {','.join(args.sides)}; per-run timeout {args.timeout:g}s, --ftrace-timeout "
        f"{args.ftrace_timeout:g}s; logs in {logs}"
    )
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {br._load()}; "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    began = time.perf_counter()
    tables = []
    for tag in tags:
        base = find_interpreter(tag)
        if base is None:
            print(f"\n=== {tag}: SKIPPED (no python{tag} found)")
            continue
        print(f"\n=== {tag}: {base}", flush=True)
        info = br._describe(Path(base))
        name = f"{tag} ({info['python']}, GIL {'on' if info['gil'] else 'off'})"
        results: list[Result] = []
        try:
            ours = {"plain", "exact", "chaos", "one-thread"} & set(args.sides)
            wheel = plugin_wheel(tag, base) if ours else None
        except Unavailable as exc:
            print(f"  cannot build the plugin:\n{exc}")
            return 1
        ours_pytest = None
        if (VENVS / tag / "bin" / "python").exists():
            ours_pytest = _version(VENVS / tag / "bin" / "python", "pytest")
        pythons: dict[str, Path] = {}
        for lib in libs:
            print(f"[{tag} {lib.name} {lib.version}] load {br._load()}", flush=True)
            tag_logs = logs / tag
            tag_logs.mkdir(exist_ok=True)
            try:
                venv_base = VENVS / f"bench-real-{lib.name}-{tag}"
                pip_python = Path(base)
                tree = source_tree(lib, sources.get(lib.name), pip_python)
                pytest_req = [f"pytest=={ours_pytest}"] if ours_pytest else ["pytest"]
                common = [*pytest_req, str(tree), *lib.deps]
                if wheel is not None:
                    pythons["ftrace"] = ensure_venv(
                        Path(f"{venv_base}-ftrace"), base, common, [str(wheel)]
                    )
                if "run-parallel" in args.sides:
                    # the same pytest as ours: the dev venv's, else what the ftrace venv got
                    # (kept out of the next library's recipe, which must not change per run)
                    same = ours_pytest or (
                        _version(pythons["ftrace"], "pytest") if wheel is not None else None
                    )
                    pin = [f"pytest=={same}"] if same else ["pytest"]
                    pythons["run-parallel"] = ensure_venv(
                        Path(f"{venv_base}-run-parallel"), base,
                        [*pin, str(tree), *lib.deps, f"{br.PEER}=={br.PEER_VERSION}"],
                    )  # fmt: skip
            except Unavailable as exc:
                print(f"  skipped: {exc}", flush=True)
                for side in args.sides:
                    results.append(Result(lib.name, side, status="skipped: no sources/venv"))
                continue
            for side in args.sides:
                python = pythons["run-parallel" if side == "run-parallel" else "ftrace"]
                result = Result(lib.name, side)
                run_side(result, python, side_args(side, args), tree, lib, args.timeout, tag_logs)
                print(
                    f"  {side:<12} {result.status:<8} {result.wall:7.1f}s  tests {result.tests}  "
                    f"passed {result.passed} failed {result.failed} errors {result.errors}  "
                    f"load {br._load()}",
                    flush=True,
                )
                results.append(result)
                save(tag_logs / "results.json", name, results)
        tables.append(report(name, results, args.top))
        print("\n" + tables[-1], flush=True)

    print("\n\n" + "\n\n".join(tables))
    print(
        f"\nexact: --ftrace --seed {args.seed} --threads {args.threads} --iterations "
        f"{args.iterations} --ftrace-timeout {args.ftrace_timeout:g}; chaos: the same with "
        f"--ftrace-mode chaos; one-thread: exact with --threads 1;\n"
        f"run-parallel: {br.PEER} {br.PEER_VERSION} --parallel-threads "
        f"{args.threads} --iterations {args.iterations}; plain: -p no:ftrace"
    )
    print(f"load average at end: {br._load()}; total {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
