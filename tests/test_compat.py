"""Working together with pytest's own options and with the peer plugins."""

import os
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

RACY = """
import threading
meet = threading.Barrier(2, timeout=10)
state = {"n": 0}

def test_fails_in_one(thread_index):
    assert thread_index != 1, "thread one disagrees"

def test_passes():
    meet.wait()

def test_also_fails(thread_index):
    assert thread_index == 0
"""


def run(pytester, *args):
    return pytester.runpytest_subprocess(*args, timeout=120)


def test_keyword_selection_and_exitfirst(pytester):
    pytester.makepyfile(RACY)
    result = run(pytester, "-p", "no:cacheprovider", "--threads", "2", "-k", "passes")
    result.assert_outcomes(passed=1, deselected=2)
    result = run(pytester, "-p", "no:cacheprovider", "--threads", "2", "-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])


def test_last_failed(pytester):
    pytester.makepyfile(RACY)
    run(pytester, "--threads", "2").assert_outcomes(failed=2, passed=1)
    result = run(pytester, "--threads", "2", "--lf")
    result.assert_outcomes(failed=2, passed=0)
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 2 failures*"])


def test_junitxml_has_each_test_once_with_the_error_text(pytester):
    pytester.makepyfile(RACY)
    run(pytester, "-p", "no:cacheprovider", "--threads", "2", "--junitxml=out.xml")
    root = ET.parse(pytester.path / "out.xml").getroot()
    cases = root.findall(".//testcase")
    assert sorted(c.get("name") for c in cases) == [
        "test_also_fails",
        "test_fails_in_one",
        "test_passes",
    ]
    failing = {c.get("name"): c.find("failure") for c in cases}
    assert failing["test_passes"] is None
    text = failing["test_fails_in_one"].text
    assert "ConcurrencyError: 1 of 2 executions failed" in text
    assert "AssertionError: thread one disagrees" in text


def test_plugin_disabled(pytester):
    pytester.makepyfile(
        """
        def test_plain(thread_index):
            pass
        """
    )
    result = run(pytester, "-p", "no:ftrace")
    result.assert_outcomes(errors=1)  # the thread-aware fixtures come with the plugin
    result.stdout.fnmatch_lines(["*fixture 'thread_index' not found*"])


# --- the real peer plugins, installed beside ours in a venv -------------------------------


def make_peer_venv(tmp: Path, package: str, *more: str) -> Path:
    """A venv that sees this interpreter's packages (ours included) plus the peer from PyPI."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir also reads the .pth files there (our editable install is one).
    Path(purelib, "_ftrace_parent.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", package, *more]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run(install + ["--ignore-requires-python"], env=env, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install {package} from PyPI: {done.stderr.decode()[-300:]}")
    return python


PEER_TEST = """
import threading
import pytest
meet = threading.Barrier(3, timeout=10)

def test_ours(num_parallel_threads):
    assert num_parallel_threads == 3
    meet.wait()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "package, plugin, ours, theirs",
    [
        (
            "pytest-run-parallel==0.10.0",
            "run-parallel",
            ["--ftrace-threads", "3", "--executions", "2"],
            ["--parallel-threads", "2", "--iterations", "2"],
        ),
        pytest.param(
            "pytest-freethreaded==0.1.0",
            "freethreaded",
            ["--ftrace-threads", "3", "--ftrace-iterations", "2", "--parallel-threads", "3"],
            ["--threads", "2", "--iterations", "2"],
            marks=pytest.mark.skipif(
                sys.version_info < (3, 13),
                reason="pytest-freethreaded itself fails on 3.12 (calls sys._is_gil_enabled)",
            ),
        ),
    ],
)
def test_installed_beside_a_peer(pytester, tmp_path, package, plugin, ours, theirs):
    python = make_peer_venv(tmp_path, package)
    pytester.makepyfile(PEER_TEST)

    def pytest_in_venv(*args):
        return subprocess.run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    # Both plugins load: pytest works, both option groups are there.
    helped = pytest_in_venv("--help")
    assert helped.returncode == 0, helped.stderr
    assert "--ftrace-threads" in helped.stdout
    assert theirs[0] in helped.stdout
    # Our canonical names drive our runner (the peer is left at its defaults of 1 / few).
    if plugin == "run-parallel":
        done = pytest_in_venv(*ours)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 passed" in done.stdout
    # The peer keeps its own names: our runner is not involved in its run.
    peer_test = pytester.path / "test_peer_only.py"
    peer_test.write_text("def test_plain():\n    pass\n")
    done = pytest_in_venv(str(peer_test), *theirs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ftrace: threads=1 iterations=1" in done.stdout


XDIST_RACE = """
class Counter:
    def __init__(self):
        self.n = 0

COUNTER = Counter()

def test_lost_update(num_parallel_threads, thread_index):
    before = COUNTER.n
    for _ in range(200):
        COUNTER.n += 1
    assert COUNTER.n - before == 200, "another thread moved the counter"

def test_fine():
    pass
"""


@pytest.mark.slow
def test_xdist_workers_use_the_session_seed(pytester, tmp_path):
    python = make_peer_venv(tmp_path, "pytest-xdist==3.8.0", "execnet==2.1.1")
    pytester.makepyfile(test_race=XDIST_RACE)

    def pytest_in_venv(*args):
        return subprocess.run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", "--ftrace", *args],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    import re

    distributed = pytest_in_venv("-n", "2")  # random session seed, chosen by the controller
    assert "1 failed, 1 passed" in distributed.stdout, distributed.stdout + distributed.stderr
    seed = re.search(r"^ftrace: seed=(\d+)", distributed.stdout, re.M).group(1)
    test_seed = re.search(r"test-seed=(\d+)", distributed.stdout).group(1)
    assert f"--seed {seed} --ftrace-replay" in distributed.stdout
    # The same test, alone and without xdist, with the controller's seed: the same test seed.
    alone = pytest_in_venv("test_race.py::test_lost_update", "--seed", seed)
    assert "1 failed" in alone.stdout, alone.stdout
    assert re.search(r"test-seed=(\d+)", alone.stdout).group(1) == test_seed


@pytest.mark.slow
def test_threads_of_both_plugins_at_once_are_a_usage_error(pytester, tmp_path):
    """With pytest-run-parallel installed, our threads and its --parallel-threads would run each
    test nested in both; that combination is refused, wherever our count comes from."""
    python = make_peer_venv(tmp_path, "pytest-run-parallel==0.10.0")
    pytester.makepyfile("def test_fails():\n    assert False\n")

    def pytest_in_venv(*args):
        return subprocess.run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    for args in (
        ["--threads", "4", "--parallel-threads", "3"],
        ["--ftrace-threads", "2", "--parallel-threads", "auto"],
        ["--ftrace", "--parallel-threads", "2"],  # --ftrace's default of 4 threads
    ):
        done = pytest_in_venv(*args)
        assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
        assert "would run each test nested in both plugins' threads" in done.stderr
        assert "INTERNALERROR" not in done.stdout + done.stderr
    # one plugin's threads at a time is fine
    for args in (["--threads", "4"], ["--parallel-threads", "3"], ["--threads", "1"]):
        done = pytest_in_venv(*args)
        assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
