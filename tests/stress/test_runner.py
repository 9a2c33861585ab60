"""The stress runner: threads, rounds, outcomes and fixtures, in real pytest sessions."""

import os
import sys

import pytest

RUN = ("-p", "no:cacheprovider")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args, timeout=120)


def test_body_runs_in_threads_at_once(pytester):
    # Four threads must meet at a barrier inside the body: only a concurrent run passes.
    pytester.makepyfile(
        """
        import threading
        meet = threading.Barrier(4, timeout=10)
        def test_meet():
            meet.wait()
        """
    )
    run(pytester, "--threads", "4", "--iterations", "3").assert_outcomes(passed=1)
    # On one thread the same test cannot pass.
    pytester.makepyfile(
        """
        import threading
        meet = threading.Barrier(4, timeout=0.5)
        def test_meet():
            meet.wait()
        """
    )
    run(pytester).assert_outcomes(failed=1)


def test_every_thread_runs_every_round(pytester):
    pytester.makepyfile(
        """
        import pytest, threading
        seen = []
        lock = threading.Lock()
        def test_record(thread_index, iteration_index, num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (3, 5)
            with lock:
                seen.append((thread_index, iteration_index, threading.get_ident()))

        @pytest.mark.thread_unsafe
        def test_check():
            pairs = sorted((t, i) for t, i, _ in seen)
            assert pairs == [(t, i) for t in range(3) for i in range(5)]
            assert len({ident for _, _, ident in seen}) == 3
        """
    )
    run(pytester, "--threads", "3", "--iterations", "5").assert_outcomes(passed=2)


def test_rounds_start_together(pytester):
    # No thread may start round i+1 before every thread has started round i.
    pytester.makepyfile(
        """
        import threading, time
        started = {}
        lock = threading.Lock()
        def test_round(thread_index, iteration_index):
            with lock:
                started.setdefault(iteration_index, set()).add(thread_index)
                if iteration_index > 0:
                    assert started[iteration_index - 1] == {0, 1, 2}, started
            if thread_index == 0:
                time.sleep(0.02)  # the slow thread holds everybody's next round back
        """
    )
    run(pytester, "--threads", "3", "--iterations", "4").assert_outcomes(passed=1)


def test_concurrency_error_groups_failures(pytester):
    pytester.makepyfile(
        """
        def helper(thread_index):
            if thread_index == 1:
                raise KeyError("missing")
        def test_mixed(thread_index, iteration_index):
            helper(thread_index)
            assert thread_index != 2, "thread two is broken"
        """
    )
    result = run(pytester, "--threads", "4", "--iterations", "3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "ConcurrencyError: 6 of 12 executions failed (4 threads x 3 iterations)",
            "failing: threads 1-2; iterations 0-2",
            "distinct failures: 2",
            "[[]1[]] KeyError at test_concurrency_error_groups_failures.py:3 - 3 times "
            "(thread 1; iterations 0-2)",
            "first seen in thread 1, iteration 0:",
            "*in helper*",
            "KeyError: 'missing'",
            "[[]2[]] AssertionError at test_concurrency_error_groups_failures.py:6 - 3 times "
            "(thread 2; iterations 0-2)",
            "AssertionError: thread two is broken",
        ]
    )
    # The plugin's own frames are not shown.
    assert "pytest_ftrace" not in result.stdout.str()
    assert "run_in_threads" not in result.stdout.str()


def test_same_failure_everywhere_reads_like_a_plain_failure(pytester):
    pytester.makepyfile(
        """
        def test_broken():
            assert 1 + 1 == 3
        """
    )
    result = run(pytester, "--threads", "2", "--iterations", "3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["E       assert (1 + 1) == 3", "*failed the same way in all 6 executions*"]
    )
    assert "ConcurrencyError" not in result.stdout.str()


@pytest.mark.parametrize(
    "code",
    ["sys.exit(3)", "raise SystemExit", "raise BaseException('odd')", "pytest.fail('one thread')"],
)
def test_thread_that_exits_never_hangs_the_others(pytester, code):
    pytester.makepyfile(
        f"""
        import os, sys
        import pytest
        def test_exits(thread_index):
            if thread_index == 1:
                {code}
        def test_after():
            pass
        """
    )
    result = run(pytester, "--threads", "3", "--iterations", "4")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["ConcurrencyError: 4 of 12 executions failed*"])


def test_keyboard_interrupt_in_a_thread_stops_the_session(pytester):
    pytester.makepyfile(
        test_k="""
        def test_interrupt(thread_index):
            if thread_index == 0:
                raise KeyboardInterrupt
        def test_never_runs():
            pass
        """
    )
    result = run(pytester, "--threads", "3", "--iterations", "2")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*! KeyboardInterrupt !*", "*test_k*.py:3: KeyboardInterrupt"])
    result.stdout.fnmatch_lines(["*= no tests ran in *"])


def test_pytest_exit_in_a_thread_stops_the_session(pytester):
    pytester.makepyfile(
        """
        import pytest
        def test_exit(thread_index):
            if thread_index == 1:
                pytest.exit("enough", returncode=7)
        def test_never_runs():
            pass
        """
    )
    result = run(pytester, "--threads", "2")
    assert result.ret == 7
    result.stdout.fnmatch_lines(["*Exit: enough*"])


def test_skip_in_one_thread_never_hides_a_failure(pytester):
    pytester.makepyfile(
        """
        import pytest
        def test_skip_and_fail(thread_index):
            if thread_index == 0:
                pytest.skip("only thread zero skips")
            if thread_index == 1:
                pytest.xfail("thread one xfails")
            assert thread_index != 2
        def test_skip_everywhere():
            pytest.skip("nothing to do")
        def test_skip_some(thread_index):
            if thread_index == 0:
                pytest.skip("thread zero skips")
        def test_xfail_some(thread_index):
            if thread_index == 1:
                pytest.xfail("known race")
        """
    )
    result = run(pytester, "--threads", "3", "-rsx")
    result.assert_outcomes(failed=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["ConcurrencyError: 1 of 3 executions failed*"])


def test_warning_turned_error_fails_the_test(pytester):
    pytester.makepyfile(
        """
        import warnings
        def test_warns(thread_index):
            if thread_index == 1:
                warnings.warn("deprecated", DeprecationWarning)
        """
    )
    result = run(pytester, "--threads", "3", "-W", "error::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*DeprecationWarning: deprecated*"])


def test_function_fixtures_are_per_thread_and_broader_ones_shared(pytester):
    pytester.makepyfile(
        """
        import threading, pytest
        made, torn, shared_ids = [], [], []
        lock = threading.Lock()

        @pytest.fixture(scope="module")
        def shared():
            return object()

        @pytest.fixture
        def base():
            return {"thread": threading.get_ident()}

        @pytest.fixture
        def resource(base, shared):
            value = {"made_in": threading.get_ident(), "base": base}
            with lock:
                made.append(value)
            yield value
            with lock:
                torn.append(value)

        def test_uses(resource, shared, thread_index):
            # Made in this very thread, with this thread's own dependency.
            assert resource["made_in"] == threading.get_ident()
            assert resource["base"]["thread"] == threading.get_ident()
            resource.setdefault("owner", thread_index)
            assert resource["owner"] == thread_index
            with lock:
                shared_ids.append(id(shared))

        @pytest.mark.thread_unsafe
        def test_check():
            # Built in each of the 4 threads, and nowhere else (not on the main thread).
            assert len(made) == 4
            assert len(torn) == 4
            assert len({id(v) for v in made}) == 4
            assert len(set(shared_ids)) == 1
        """
    )
    run(pytester, "--threads", "4", "--iterations", "2").assert_outcomes(passed=2)


def test_fixture_error_in_a_thread_is_reported(pytester):
    pytester.makepyfile(
        """
        import pytest, threading
        calls = []
        @pytest.fixture
        def flaky():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("third set-up fails")
            return 1
        def test_it(flaky):
            pass
        """
    )
    result = run(pytester, "--threads", "3")
    # Built in the set-up phase, in the worker threads: pytest reports a set-up error.
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_it*",
            "E*RuntimeError: third set-up fails",
            "*per-thread fixture set-up in thread *",
        ]
    )


def test_thread_unsafe_fixtures_run_on_one_thread(pytester):
    pytester.makeini(
        """
        [pytest]
        thread_unsafe_fixtures = my_global_state
        """
    )
    pytester.makeconftest(
        """
        import pytest
        @pytest.fixture
        def my_global_state():
            return 1
        """
    )
    pytester.makepyfile(
        """
        import pytest
        def test_capsys(capsys, num_parallel_threads):
            assert num_parallel_threads == 1
        def test_monkeypatch(monkeypatch, num_parallel_threads):
            assert num_parallel_threads == 1
        def test_custom(my_global_state, num_parallel_threads):
            assert num_parallel_threads == 1
        @pytest.mark.thread_unsafe(reason="touches the cwd")
        def test_marked(num_parallel_threads):
            assert num_parallel_threads == 1
        def test_threaded(num_parallel_threads):
            assert num_parallel_threads == 4
        """
    )
    result = run(pytester, "--threads", "4", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "*ftrace: tests run on one thread*",
            "*test_capsys: uses thread-unsafe fixture 'capsys'",
            "*test_monkeypatch: uses thread-unsafe fixture 'monkeypatch'",
            "*test_custom: uses thread-unsafe fixture 'my_global_state'",
            "*test_marked: marked thread_unsafe: touches the cwd",
        ]
    )
    assert "test_threaded: " not in result.stdout.str()


def test_every_builtin_thread_unsafe_fixture_runs_on_one_thread(pytester):
    from pytest_ftrace.markers import BUILTIN_THREAD_UNSAFE

    # recwarn is on the list unless warnings are context-aware (Python 3.14+ can make them so)
    expected = ["capsys", "capfd", "capsysbinary", "capfdbinary", "monkeypatch"]
    if not getattr(sys.flags, "context_aware_warnings", False):
        expected.append("recwarn")
    assert sorted(BUILTIN_THREAD_UNSAFE) == sorted(expected)
    pytester.makepyfile(
        "".join(
            f"def test_{name}({name}, num_parallel_threads):\n"
            "    assert num_parallel_threads == 1\n"
            for name in expected
        )
        + "def test_threaded(num_parallel_threads):\n    assert num_parallel_threads == 3\n"
    )
    result = run(pytester, "--threads", "3", "-v")
    result.assert_outcomes(passed=len(expected) + 1)
    result.stdout.fnmatch_lines(
        ["*ftrace: tests run on one thread*"]
        + [f"*::test_{name}: uses thread-unsafe fixture '{name}'" for name in expected]
    )


def test_markers_and_precedence(pytester):
    pytester.makeini(
        """
        [pytest]
        ftrace_threads = 3
        ftrace_iterations = 2
        """
    )
    pytester.makepyfile(
        """
        import pytest
        def test_ini(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (3, 2)
        @pytest.mark.ftrace(threads=2, iterations=5)
        def test_ftrace_marker(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (2, 5)
        @pytest.mark.parallel_threads(5)
        @pytest.mark.iterations(4)
        def test_run_parallel_markers(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (5, 4)
        @pytest.mark.freethreaded(threads=6, iterations=1)
        def test_freethreaded_marker(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (6, 1)
        @pytest.mark.ftrace(iterations=7)
        def test_partial_marker(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (3, 7)
        """
    )
    run(pytester).assert_outcomes(passed=5)
    # The command line beats the ini file, and a marker beats the command line.
    pytester.makepyfile(
        test_cli="""
        import pytest
        def test_cli(num_parallel_threads, num_iterations):
            assert (num_parallel_threads, num_iterations) == (4, 1)
        @pytest.mark.ftrace(threads=2)
        def test_marker_wins(num_parallel_threads):
            assert num_parallel_threads == 2
        """
    )
    run(pytester, "test_cli.py", "--threads", "4", "--iterations", "1").assert_outcomes(passed=2)


def test_class_and_module_markers_apply(pytester):
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.ftrace(threads=2)
        def test_module(num_parallel_threads):
            assert num_parallel_threads == 2
        @pytest.mark.ftrace(threads=3)
        class TestGroup:
            def test_cls(self, num_parallel_threads):
                assert num_parallel_threads == 3
        """
    )
    run(pytester).assert_outcomes(passed=2)


def test_unittest_testcase(pytester):
    pytester.makepyfile(
        """
        import threading, unittest
        class Racy:
            n = 0
        meet = threading.Barrier(3, timeout=10)
        class TestCase(unittest.TestCase):
            def setUp(self):
                self.value = 1
            def test_meets(self):
                meet.wait()
                self.assertEqual(self.value, 1)
            def test_fails_in_one(self):
                if threading.current_thread().name == "ftrace-1":
                    self.fail("thread one fails")
        """
    )
    result = run(pytester, "--threads", "3", "--iterations", "2")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["ConcurrencyError: 2 of 6 executions failed*"])


def test_header_says_what_runs(pytester):
    pytester.makepyfile("def test_ok(): pass")
    result = run(pytester, "--threads", "5", "--iterations", "7")
    from conftest import FREE_THREADED_BUILD

    gil = "disabled" if FREE_THREADED_BUILD and os.environ.get("PYTHON_GIL") != "1" else "enabled"
    result.stdout.fnmatch_lines([f"ftrace: threads=5 iterations=7 timeout=300s, GIL {gil}*"])


def test_hang_is_reported_and_the_session_goes_on(pytester):
    pytester.makepyfile(
        """
        import time
        def test_hangs(thread_index):
            if thread_index == 0:
                time.sleep(60)
        def test_after():
            pass
        """
    )
    result = run(pytester, "--threads", "2", "--ftrace-timeout", "1")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*did not finish within 1s (--ftrace-timeout); 1 of 2 still running*",
            "Thread ftrace-0 (most recent call last):",
            "*time.sleep(60)*",
            "*leaked threads: ftrace-0*",
        ]
    )


def test_ctrl_c_during_a_threaded_test_stops_the_session(pytester):
    import signal
    import subprocess
    import sys
    import time

    pytester.makepyfile(
        test_slow="""
        import pathlib, time
        def test_slow(thread_index):
            pathlib.Path("started").touch()
            time.sleep(30)
        def test_next():
            pass
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--threads", "2"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A suite started in the background (`cmd &`) inherits SIGINT ignored, and Python
        # then installs no KeyboardInterrupt handler: give the child the default back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for _ in range(600):
            if (pytester.path / "started").exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    assert " passed" not in out  # test_next never ran
