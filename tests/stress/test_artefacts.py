"""--threads on real suites: no failure the plugin causes (issue 15, "artefacts seen").

One probe per artefact, each run under `--threads 4 --iterations 5`: per-thread tmp_path,
function fixtures built once per worker thread and nowhere else, one unittest TestCase instance
per thread, and the process-wide facilities (mock.patch, warnings capture, ...) that make a test
run once on one thread. A test that really shares state still fails."""

import textwrap

import pytest

RUN = ("-p", "no:cacheprovider")
STRESS = ("--threads", "4", "--iterations", "5")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *STRESS, *args, timeout=120)


# A test that runs after the probes (marked thread_unsafe: on the main thread, once) and checks
# what they recorded.
CHECK = """
@pytest.mark.thread_unsafe
def test_zz_check():
    check()
"""


def checked(source: str) -> str:
    return textwrap.dedent(source) + CHECK


def test_tmp_path_per_thread_and_round(pytester):
    pytester.makepyfile(
        checked(
            """
        import os, threading, pytest
        seen = []
        lock = threading.Lock()

        def test_files(tmp_path, tmpdir, thread_index, iteration_index):
            # boltons' atomic save: a file made exclusively, then renamed
            part = tmp_path / "output.bin.part"
            with open(part, "x") as f:
                f.write("data")
            os.replace(part, tmp_path / "output.bin")
            assert sorted(os.listdir(tmp_path)) == ["output.bin"]
            assert str(tmpdir) == str(tmp_path)
            with lock:
                seen.append((thread_index, iteration_index, tmp_path))

        @pytest.fixture
        def config_file(tmp_path):
            path = tmp_path / "config.ini"
            path.write_text("x")
            return path

        kept = []

        def test_fixture_and_test_share_it(config_file, tmp_path, thread_index):
            # a fixture of the thread uses tmp_path: the thread keeps that one directory
            assert config_file.parent == tmp_path
            with lock:
                kept.append((thread_index, tmp_path))

        def check():
            assert len(seen) == 20
            assert len({path for _, _, path in seen}) == 20
            for thread, iteration, path in seen:
                assert f"_t{thread}_r{iteration}_" in path.name, path
            assert len(kept) == 20 and len({path for _, path in kept}) == 4
        """
        )
    )
    run(pytester).assert_outcomes(passed=3)


def test_function_fixture_built_once_per_thread(pytester):
    pytester.makepyfile(
        checked(
            """
        import collections, threading, pytest
        built = []
        torn = []
        shared = []
        lock = threading.Lock()

        @pytest.fixture(scope="module")
        def server():
            shared.append(threading.current_thread().name)
            return object()

        @pytest.fixture
        def base(server):
            with lock:
                built.append(("base", threading.current_thread().name))
            return object()

        @pytest.fixture
        def actor(base):
            # pykka: an actor per test; the test expects to see exactly one
            with lock:
                built.append(("actor", threading.current_thread().name))
            yield object()
            with lock:
                torn.append(("actor", threading.current_thread().name))

        def test_actor(actor, base, thread_index):
            assert threading.current_thread().name == f"ftrace-{thread_index}"

        def check():
            workers = sorted(f"ftrace-{k}" for k in range(4))
            for name in ("base", "actor"):
                threads = [t for n, t in built if n == name]
                assert sorted(threads) == workers, (name, built)
            assert sorted(t for _, t in torn) == workers
            assert shared == ["MainThread"]
        """
        )
    )
    run(pytester).assert_outcomes(passed=2)


def test_fixture_errors_are_setup_and_teardown_errors(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("cannot set up")

        @pytest.fixture
        def broken_teardown():
            yield 1
            raise RuntimeError("cannot tear down")

        def test_setup(broken):
            pass

        def test_teardown(broken_teardown):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_setup*",
            "*RuntimeError: cannot set up",
            "*ERROR at teardown of test_teardown*",
            "*RuntimeError: cannot tear down",
        ]
    )


def test_unittest_instance_per_thread(pytester):
    pytester.makepyfile(
        checked(
            """
        import threading, unittest, pytest
        lock = threading.Lock()
        setups, teardowns, cleanups, instances = [], [], [], []

        class Case(unittest.TestCase):
            def setUp(self):
                # tornado's AsyncTestCase: a loop per instance, started by the test
                with lock:
                    setups.append(threading.current_thread().name)
                self.attempts = 0
                self.running = False
                self.addCleanup(self._cleanup)

            def _cleanup(self):
                with lock:
                    cleanups.append(threading.current_thread().name)

            def tearDown(self):
                with lock:
                    teardowns.append(threading.current_thread().name)

            def test_attempts(self):
                assert not self.running, "This event loop is already running"
                self.running = True
                self.attempts += 1
                with lock:
                    instances.append(id(self))
                self.running = False

        def check():
            workers = sorted(f"ftrace-{k}" for k in range(4))
            assert sorted(setups) == workers
            assert sorted(teardowns) == workers
            assert sorted(cleanups) == workers
            assert len(instances) == 20 and len(set(instances)) == 4
        """
        )
    )
    run(pytester).assert_outcomes(passed=2)


def test_unittest_failures_and_skips(pytester):
    pytester.makepyfile(
        """
        import unittest

        class Case(unittest.TestCase):
            def test_fails(self):
                self.assertEqual(1, 2)

            @unittest.skip("not here")
            def test_skipped(self):
                pass

            def test_skips(self):
                self.skipTest("later")

            @unittest.expectedFailure
            def test_expected(self):
                self.assertEqual(1, 2)

        class BrokenSetUp(unittest.TestCase):
            def setUp(self):
                raise RuntimeError("no loop")

            def tearDown(self):
                raise AssertionError("tearDown runs only after a setUp that passed")

            def test_it(self):
                pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=2, skipped=2, xfailed=1)
    # As unittest reports it: a failure of the test, with setUp's error.
    result.stdout.fnmatch_lines(["E*RuntimeError: no loop", "*set-up of all 4 threads*"])
    result.stdout.no_fnmatch_line("*tearDown runs only*")


# Each probe waits, inside the facility, until every thread of the round is inside it too
# (`meet`): run on several threads at once, the facility breaks for sure, not by chance. Run on
# one thread, there is no one else to wait for.
MEET = """
import threading
_barriers = {}
_lock = threading.Lock()

def meet(threads, key):
    with _lock:
        barrier = _barriers.setdefault((key, threads), threading.Barrier(threads, timeout=10))
    barrier.wait()
"""

MOCKED = """
import os, sys, threading, pytest
from unittest import mock

REAL_GETCWD = os.getcwd

def helper():
    return "real"

class Thing:
    def value(self):
        return "real"

@mock.patch("os.getcwd", return_value="/patched")
def test_decorator(getcwd, num_parallel_threads):
    meet(num_parallel_threads, "decorator")
    assert os.getcwd() == "/patched"

def test_context_manager(num_parallel_threads, thread_index):
    with mock.patch(f"{__name__}.helper", return_value=f"mocked {thread_index}"):
        meet(num_parallel_threads, "context")
        assert helper() == f"mocked {thread_index}"
    assert helper() == "real"

def test_object(num_parallel_threads, thread_index):
    with mock.patch.object(Thing, "value", return_value=thread_index):
        meet(num_parallel_threads, "object")
        assert Thing().value() == thread_index

@mock.patch.dict(os.environ, {"FTRACE_PROBE": "1"})
def test_dict(num_parallel_threads):
    meet(num_parallel_threads, "dict")
    assert os.environ["FTRACE_PROBE"] == "1"

def test_start_stop(num_parallel_threads, thread_index):
    patcher = mock.patch(f"{__name__}.helper", return_value=thread_index)
    patcher.start()
    try:
        meet(num_parallel_threads, "start")
        assert helper() == thread_index
    finally:
        patcher.stop()

def test_fails_on_its_own_merits():
    with mock.patch(f"{__name__}.helper", return_value="mocked"):
        assert helper() == "real"

def test_still_threaded(thread_index):
    assert threading.current_thread().name == f"ftrace-{thread_index}"

@pytest.mark.thread_unsafe
def test_zz_nothing_left_patched():
    assert os.getcwd is REAL_GETCWD
    assert helper() == "real" and Thing().value() == "real"
    assert "FTRACE_PROBE" not in os.environ
"""


def test_mock_patch_runs_on_one_thread(pytester):
    pytester.makepyfile(MEET + MOCKED)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ftrace: tests run on one thread*",
            "*::test_decorator: entered mock.patch * in a threaded round*",
            "*::test_dict: entered mock.patch.dict in a threaded round*",
        ]
    )
    result.stdout.no_fnmatch_line("*test_still_threaded: *")
    # its own failure, not a concurrency report
    result.stdout.fnmatch_lines(["*_ test_fails_on_its_own_merits _*", "E*AssertionError*"])
    result.stdout.no_fnmatch_line("*executions failed*")


def test_mock_patch_in_a_fixture_runs_on_one_thread(pytester):
    pytester.makepyfile(
        MEET
        + """
import os, threading, pytest
from unittest import mock
REAL_GETCWD = os.getcwd

@pytest.fixture
def patched_cwd():
    with mock.patch("os.getcwd", return_value="/patched") as getcwd:
        in_worker = threading.current_thread().name.startswith("ftrace-")
        meet(4 if in_worker else 1, "fixture")
        yield getcwd

def test_uses_it(patched_cwd, num_parallel_threads):
    assert os.getcwd() == "/patched"
    assert num_parallel_threads == 1

@pytest.mark.thread_unsafe
def test_zz_nothing_left_patched():
    assert os.getcwd is REAL_GETCWD
"""
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*::test_uses_it: entered mock.patch * in a threaded round*"])


WARNS = """
import threading, warnings, pytest

def old():
    warnings.warn("old", DeprecationWarning)

def test_pytest_warns(num_parallel_threads):
    with pytest.warns(DeprecationWarning):
        meet(num_parallel_threads, "warns")
        old()

def test_catch_warnings(num_parallel_threads):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meet(num_parallel_threads, "catch")
        old()
    assert [w.category for w in caught] == [DeprecationWarning]

def test_deprecated_call(num_parallel_threads):
    with pytest.deprecated_call():
        meet(num_parallel_threads, "deprecated")
        old()

def test_not_triggered():
    with pytest.warns(DeprecationWarning):
        pass
"""


@pytest.mark.skipif(
    bool(getattr(__import__("sys").flags, "context_aware_warnings", False)),
    reason="context-aware warnings are per thread",
)
def test_warnings_capture_runs_on_one_thread(pytester):
    pytester.makepyfile(MEET + WARNS)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ftrace: tests run on one thread*",
            "*::test_pytest_warns: entered warnings capture * in a threaded round*",
            "*::test_catch_warnings: entered warnings capture * in a threaded round*",
            "*::test_deprecated_call: entered warnings capture * in a threaded round*",
        ]
    )
    result.stdout.fnmatch_lines(["*DID NOT WARN*"])
    result.stdout.no_fnmatch_line("*executions failed*")


def test_other_process_wide_facilities(pytester):
    pytester.makepyfile(
        MEET
        + """
import contextlib, io, os, sys, types, pytest
state = types.SimpleNamespace(value=None)

def test_monkeypatch_context(num_parallel_threads, thread_index):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "value", thread_index)
        meet(num_parallel_threads, "monkeypatch")
        assert state.value == thread_index
    assert state.value is None

def test_redirect_stdout(num_parallel_threads, thread_index):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        meet(num_parallel_threads, "redirect")
        print(thread_index)
    assert out.getvalue() == f"{thread_index}\\n"

def test_chdir(tmp_path, num_parallel_threads, thread_index):
    mine = tmp_path / str(thread_index)
    mine.mkdir()
    with contextlib.chdir(mine):
        meet(num_parallel_threads, "chdir")
        assert os.getcwd() == str(mine)
"""
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_monkeypatch_context: entered MonkeyPatch.setattr*",
            "*::test_redirect_stdout: entered contextlib.redirect_stdout*",
            "*::test_chdir: entered contextlib.chdir*",
        ]
    )


def test_shared_state_still_fails(pytester):
    # No masking: state the test itself shares fails under --threads, whatever the probes do.
    pytester.makepyfile(
        """
        import threading
        everyone = threading.Barrier(4, timeout=30)
        claimed = {}

        def test_claim(tmp_path, thread_index, iteration_index):
            claimed.setdefault(iteration_index, thread_index)
            everyone.wait()  # every thread has tried to claim this round
            assert claimed[iteration_index] == thread_index
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*15 of 20 executions failed*"])
