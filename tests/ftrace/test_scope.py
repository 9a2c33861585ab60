"""--ftrace's default scope (the project the rootdir belongs to, wherever it is installed) and
replay lines that carry every option shaping the schedule."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ftrace.ftrace.project_scope import find_project

# A library whose race is inside its own code: `add` reads and writes `self.n` with no lock. The
# test's own code has no access between the two, so the race shows only when the library's code
# is hooked.
LIBRARY = """
class Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        for _ in range(k):
            self.n += 1
"""

TEST = """
import threading

import {module}

COUNTER = {module}.Counter()
LOCK = threading.Lock()
DONE = []


def test_lost_update(num_parallel_threads, iteration_index):
    COUNTER.add(20)
    with LOCK:
        DONE.append(iteration_index)
        finished = DONE.count(iteration_index) == num_parallel_threads
        if finished:  # the round leaves the module state as it found it: no fork a round
            DONE.clear()
    if finished:
        total, COUNTER.n = COUNTER.n, 0
        assert total == 20 * num_parallel_threads, f"lost {{20 * num_parallel_threads - total}}"
"""

PYPROJECT = """
[project]
name = "racy-lib"
version = "0.1"

[tool.setuptools.packages.find]
where = ["src"]
"""


def site_dir(pytester: pytest.Pytester) -> Path:
    """A site-packages directory outside the rootdir, as a venv made by tox or nox has."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = pytester.path.parent / f"{pytester.path.name}-venv" / "lib" / version / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    return site


def install_copy(pytester: pytest.Pytester, package: str, source: str) -> Path:
    """`package` installed (a plain copy, not editable) into site_dir, on sys.path."""
    site = site_dir(pytester)
    (site / package).mkdir(exist_ok=True)
    (site / package / "__init__.py").write_text(textwrap.dedent(source))
    pytester.syspathinsert(site)
    return site / package


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """The racy-lib project (src layout) with its tests, tested against an installed copy."""
    pytester.makefile(".toml", pyproject=PYPROJECT)
    (pytester.path / "src" / "racylib").mkdir(parents=True)
    # the copy under src/ is not what the tests import (it is not on sys.path); a race found
    # is the installed copy's
    (pytester.path / "src" / "racylib" / "__init__.py").write_text(LIBRARY)
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_counter.py").write_text(TEST.format(module="racylib"))
    install_copy(pytester, "racylib", LIBRARY)
    return pytester


def replay_args(result) -> list[str]:
    lines = [line for line in result.stdout.lines if "replay: pytest " in line]
    assert lines, result.stdout.str()
    return shlex.split(lines[0].split("replay: pytest ", 1)[1])


def test_installed_project_race_found_without_include_and_replays(project):
    plain = project.runpytest("tests")
    plain.assert_outcomes(passed=1)
    result = project.runpytest("tests", "--ftrace", "--seed", "3", "--ftrace-iterations", "10")
    result.assert_outcomes(failed=1)
    installed = site_dir(project) / "racylib"
    result.stdout.fnmatch_lines(
        [
            "ftrace: hooked: the test modules and other code under the rootdir; project racy-lib "
            f"(pyproject.toml): racylib from {installed}",
            "*AssertionError: lost *",
        ]
    )
    args = replay_args(result)
    assert "--ftrace-include" not in args
    assert args[args.index("--ftrace-iterations") + 1] == "10"
    replay = project.runpytest(*args)
    replay.assert_outcomes(failed=1)
    replay.stdout.fnmatch_lines(["*AssertionError: lost *", "*reproduced 10/10*"])
    assert "other options than the recorded" not in replay.stdout.str()


BACKEND = """
import base64, hashlib, os, zipfile

DIST = "racy_lib-0.1"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    name = DIST + "-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        def add(arcname, data):
            wheel.writestr(arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{arcname},sha256={digest.decode()},{len(data)}")

        for directory, _, files in os.walk(src):
            for file in sorted(files):
                if file.endswith(".py"):
                    full = os.path.join(directory, file)
                    with open(full, "rb") as f:
                        add(os.path.relpath(full, src).replace(os.sep, "/"), f.read())
        info = DIST + ".dist-info/"
        add(info + "METADATA", b"Metadata-Version: 2.1\\nName: racy-lib\\nVersion: 0.1\\n")
        add(info + "WHEEL", b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n")
        records.append(info + "RECORD,,")
        wheel.writestr(info + "RECORD", "\\n".join(records) + "\\n")
    return name
"""


def test_pip_installed_project_race_found_without_include(pytester):
    """The project built into a wheel and installed by pip (not editable) into a site-packages
    directory outside the rootdir; its tests import that copy."""
    pytester.makefile(
        ".toml",
        pyproject=PYPROJECT
        + '\n[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["_build"]\n',
    )
    (pytester.path / "_build").mkdir()
    (pytester.path / "_build" / "backend.py").write_text(BACKEND)
    (pytester.path / "src" / "racylib").mkdir(parents=True)
    (pytester.path / "src" / "racylib" / "__init__.py").write_text(LIBRARY)
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_counter.py").write_text(TEST.format(module="racylib"))
    site = site_dir(pytester)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(pytester.path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if pip.returncode != 0 and "No module named pip" in pip.stderr:
        pytest.skip("no pip in this environment")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / "racylib" / "__init__.py").is_file()
    assert (site / "racy_lib-0.1.dist-info" / "RECORD").is_file()
    pytester.syspathinsert(site)
    result = pytester.runpytest("tests", "--ftrace", "--seed", "5", "--ftrace-iterations", "10")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"ftrace: hooked: *racylib from {site / 'racylib'}"])
    replay = pytester.runpytest(*replay_args(result))
    replay.assert_outcomes(failed=1)
    replay.stdout.fnmatch_lines(["*AssertionError: lost *", "*reproduced 10/10*"])


def test_exclude_takes_the_project_out(project):
    result = project.runpytest("tests", "--ftrace", "--seed", "3", "--ftrace-exclude", "racylib*")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*racylib (excluded by --ftrace-exclude)*"])


def test_the_plugin_itself_is_never_hooked(pytester):
    pytester.makefile(".toml", pyproject='[project]\nname = "pytest-ftrace"\n')
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ftrace: hooked: *pytest_ftrace (never: the test machinery)"])


def test_include_is_carried_by_the_replay_line_and_a_replay_without_it_says_so(pytester):
    # The race is in a library that is not the project: only --ftrace-include hooks it.
    pytester.makefile(".toml", pyproject='[project]\nname = "consumer"\n')
    install_copy(pytester, "otherlib", LIBRARY)
    pytester.makepyfile(test_counter=TEST.format(module="otherlib"))
    without = pytester.runpytest("--ftrace", "--seed", "3", "--ftrace-iterations", "10")
    without.assert_outcomes(passed=1)
    result = pytester.runpytest(
        "--ftrace", "--seed", "3", "--ftrace-iterations", "10", "--ftrace-include", "otherlib*"
    )
    result.assert_outcomes(failed=1)
    args = replay_args(result)
    assert args[args.index("--ftrace-include") + 1] == "otherlib*"
    replay = pytester.runpytest(*args)
    replay.assert_outcomes(failed=1)
    replay.stdout.fnmatch_lines(["*reproduced 10/10*"])
    assert "other options than the recorded" not in replay.stdout.str()

    at = args.index("--ftrace-include")
    dropped = args[:at] + args[at + 2 :]
    differ = pytester.runpytest(*dropped)
    text = " ".join(differ.stdout.str().split())
    assert "runs with other options than the recorded failure" in text, text
    assert "--ftrace-include was 'otherlib*' (this run: none)" in text, text


# Fails in every thread but the first, whatever the schedule: a replay line in every mode.
ALWAYS = """
def test_fails(thread_index):
    assert thread_index == 0
"""


@pytest.mark.parametrize(
    "given",
    [
        ["--ftrace-mode", "chaos", "--ftrace-policy", "yield_probability=0.5"],
        ["--ftrace-scheduler", "pct2"],
        ["--ftrace-exclude", "nothing_like_this*"],
        ["--ftrace-iterations", "7"],
    ],
)
def test_replay_line_names_every_schedule_shaping_option(pytester, given):
    pytester.makefile(".toml", pyproject='[project]\nname = "consumer"\n')
    pytester.makepyfile(ALWAYS)
    result = pytester.runpytest("--ftrace", "--seed", "3", *given)
    args = replay_args(result)
    line = " ".join(args)
    assert " ".join(given) in line, line
    # and the replay, run with those options, reports no difference
    replay = pytester.runpytest(*args)
    assert "other options than the recorded" not in replay.stdout.str()
    # while one without them does
    stripped = [a for a in args if a not in given]
    other = pytester.runpytest(*stripped)
    assert "other options than the recorded" in " ".join(other.stdout.str().split())


def test_ini_options_are_carried_too(pytester):
    pytester.makeini("[pytest]\nftrace_scheduler = pct2\nftrace_exclude = nothing_like_this*\n")
    pytester.makepyfile(ALWAYS)
    result = pytester.runpytest("--ftrace", "--seed", "3")
    line = " ".join(replay_args(result))
    assert "--ftrace-scheduler pct2" in line
    assert "--ftrace-exclude nothing_like_this*" in line


def test_replay_last_takes_the_recorded_options(pytester):
    pytester.makefile(".toml", pyproject='[project]\nname = "consumer"\n')
    install_copy(pytester, "otherlib", LIBRARY)
    pytester.makepyfile(test_counter=TEST.format(module="otherlib"))
    result = pytester.runpytest(
        "--ftrace", "--seed", "3", "--ftrace-iterations", "10", "--ftrace-include", "otherlib*"
    )
    result.assert_outcomes(failed=1)
    replay = pytester.runpytest("--ftrace", "--ftrace-replay", "last", "--ftrace-iterations", "10")
    replay.assert_outcomes(failed=1)
    replay.stdout.fnmatch_lines(["*reproduced 10/10*"])
    assert "other options than the recorded" not in replay.stdout.str()


# ---- reading the project ----------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.mark.parametrize(
    ("files", "name", "packages"),
    [
        # src layout, nothing declared
        ({"pyproject.toml": "[project]\nname='a-b'\n", "src/a_b/__init__.py": ""}, "a-b", ["a_b"]),
        # flat layout: the package of the project's name
        (
            {"pyproject.toml": "[project]\nname='Foo.Bar'\n", "foo_bar/__init__.py": ""},
            "Foo.Bar",
            ["foo_bar"],
        ),
        # setuptools: explicit packages and modules
        (
            {
                "pyproject.toml": """
                [project]
                name = "x"
                [tool.setuptools]
                packages = ["alpha", "alpha.sub"]
                py-modules = ["beta"]
                """
            },
            "x",
            ["alpha", "beta"],
        ),
        # setuptools find with include/exclude
        (
            {
                "pyproject.toml": """
                [project]
                name = "x"
                [tool.setuptools.packages.find]
                where = ["lib"]
                include = ["good*"]
                """,
                "lib/good/__init__.py": "",
                "lib/bad/__init__.py": "",
            },
            "x",
            ["good"],
        ),
        # hatch
        (
            {
                "pyproject.toml": """
                [project]
                name = "h"
                [tool.hatch.build.targets.wheel]
                packages = ["src/hpkg"]
                """
            },
            "h",
            ["hpkg"],
        ),
        # maturin
        (
            {
                "pyproject.toml": """
                [project]
                name = "m"
                [tool.maturin]
                module-name = "mpkg._native"
                """
            },
            "m",
            ["mpkg"],
        ),
        # poetry
        (
            {
                "pyproject.toml": """
                [tool.poetry]
                name = "p"
                packages = [{include = "ppkg", from = "src"}]
                """
            },
            "p",
            ["ppkg"],
        ),
        # flit
        (
            {"pyproject.toml": "[project]\nname='f'\n[tool.flit.module]\nname='fpkg'\n"},
            "f",
            ["fpkg"],
        ),
        # setup.cfg with find:
        (
            {
                "setup.cfg": """
                [metadata]
                name = cfgproj
                [options]
                package_dir =
                    =src
                packages = find:
                py_modules = single
                [options.packages.find]
                where = src
                exclude = tests*
                """,
                "src/cfgpkg/__init__.py": "",
                "src/tests/__init__.py": "",
            },
            "cfgproj",
            ["cfgpkg", "single"],
        ),
        # setup.py, read statically (never run: it would raise)
        (
            {
                "setup.py": """
                from setuptools import setup, find_packages
                raise SystemExit("never executed")
                setup(name="spy", packages=find_packages(where="src", exclude=["tests"]))
                """,
                "src/spkg/__init__.py": "",
                "src/spkg/sub/__init__.py": "",
            },
            "spy",
            ["spkg"],
        ),
        # pyproject names the project, setup.py declares the packages
        (
            {
                "pyproject.toml": "[project]\nname='both'\ndynamic=['version']\n",
                "setup.py": "import setuptools\nsetuptools.setup(packages=['bothpkg'])\n",
            },
            "both",
            ["bothpkg"],
        ),
    ],
)
def test_project_packages_are_read_statically(tmp_path, files, name, packages):
    found = find_project(str(write(tmp_path, files)))
    assert found is not None
    assert (found.name, list(found.packages)) == (name, packages)


def test_project_is_found_above_the_rootdir_up_to_the_repository_root(tmp_path):
    write(
        tmp_path, {"repo/pyproject.toml": "[project]\nname='up'\n", "repo/src/up/__init__.py": ""}
    )
    (tmp_path / "repo" / ".git").mkdir()
    (tmp_path / "repo" / "tests" / "unit").mkdir(parents=True)
    found = find_project(str(tmp_path / "repo" / "tests" / "unit"))
    assert (found.name, found.packages) == ("up", ("up",))
    # a pyproject.toml with only tool settings does not stop the search
    write(tmp_path, {"repo/tests/pyproject.toml": "[tool.pytest.ini_options]\n"})
    assert find_project(str(tmp_path / "repo" / "tests")).name == "up"
    # above a repository root nothing is looked for
    write(tmp_path, {"pyproject.toml": "[project]\nname='outer'\n"})
    (tmp_path / "other" / ".git").mkdir(parents=True)
    assert find_project(str(tmp_path / "other")) is None


def test_broken_project_files_are_no_project(tmp_path):
    write(tmp_path, {"pyproject.toml": "this is [ not toml", "setup.py": "def (:\n"})
    (tmp_path / ".git").mkdir()
    assert find_project(str(tmp_path)) is None


def test_a_plain_run_does_not_read_the_project(pytester):
    """The project is read by --ftrace sessions only: a plain run imports none of this."""
    pytester.makepyfile("def test_ok():\n    pass\n")
    code = (
        "import sys, pytest\n"
        "pytest.main(['-q', '-p', 'no:cacheprovider'])\n"
        "print(sorted(m for m in sys.modules if m in "
        "('pytest_ftrace.ftrace.project_scope', 'pytest_ftrace.ftrace.replay_options')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
        check=False,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_corrupt_options_record_is_ignored(pytester):
    pytester.makefile(".toml", pyproject='[project]\nname = "consumer"\n')
    pytester.makepyfile(ALWAYS)
    result = pytester.runpytest("--ftrace", "--seed", "3")
    args = replay_args(result)
    for path in (pytester.path / ".pytest_cache" / "v" / "ftrace" / "options").iterdir():
        path.write_text(json.dumps({"include": "not a list"}))
    replay = pytester.runpytest(*args)
    replay.assert_outcomes(failed=1)
    assert "other options than the recorded" not in replay.stdout.str()


TWO = """
def test_x(thread_index):
    assert thread_index == 0

def test_y():
    pass
"""


def test_replaying_another_tests_token_names_the_recorded_options(pytester):
    pytester.makepyfile(test_two=TWO)
    result = pytester.runpytest("--ftrace", "--seed", "5", "--ftrace-scheduler", "pct2")
    args = replay_args(result)
    token = args[args.index("--ftrace-replay") + 1]
    other = pytester.runpytest(
        "--ftrace", "--seed", "5", "test_two.py::test_y", "--ftrace-replay", token
    )
    assert other.ret == pytest.ExitCode.USAGE_ERROR
    other.stderr.fnmatch_lines(
        [
            "*which this run does not select; run: pytest 'test_two.py::test_x' --ftrace "
            f"--ftrace-scheduler pct2 --seed 5 --ftrace-replay {token}"
        ]
    )
    # a corrupt options record in the round's record is left out of the hint, never a crash
    key = token.split("x", 1)[1]
    path = pytester.path / ".pytest_cache" / "v" / "ftrace" / "replay" / key
    stored = json.loads(path.read_text())
    stored["options"] = {"policy": [1], "include": "x", "iterations": "ten", "mode": 3}
    path.write_text(json.dumps(stored))
    other = pytester.runpytest(
        "--ftrace", "--seed", "5", "test_two.py::test_y", "--ftrace-replay", token
    )
    assert other.ret == pytest.ExitCode.USAGE_ERROR
    other.stderr.fnmatch_lines(
        [f"*run: pytest 'test_two.py::test_x' --ftrace --seed 5 --ftrace-replay {token}"]
    )
