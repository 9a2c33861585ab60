"""The fault suite: each fault fails only its own test, named with its id and the ftrace seed,
and no result of another test is lost.

Every session runs in a subprocess with a timeout (a safety bound: a fault that hung the
session would fail the test instead of hanging the suite). Each test file has a passing test
after the faulty one, and the test asserts that it passed.
"""

import shutil
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import only_free_threaded

SEED = "4242"
# The stress runner's own watchdog and reports: chaos mode (exact mode has its own scheduler).
FTRACE = ("--ftrace", "--ftrace-mode", "chaos", "--seed", SEED)
RUN = ("-p", "no:cacheprovider", "--junitxml=out.xml")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args, timeout=120)


def cases(pytester: pytest.Pytester) -> dict[str, dict]:
    """junitxml test cases by name: outcome, message and properties."""
    suite = ET.parse(pytester.path / "out.xml").getroot().find("testsuite")
    found = {}
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "") + (node.text or "")
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        found[case.get("name")] = {"outcome": outcome, "message": message, "props": props}
    return found


def assert_only_fault_failed(pytester, fault: str, outcome: str = "failure") -> dict:
    found = cases(pytester)
    assert found["test_before"]["outcome"] == "passed"
    assert found["test_after"]["outcome"] == "passed"
    assert found[fault]["outcome"] == outcome, found[fault]
    assert found[fault]["props"].get("ftrace_seed") == SEED, found[fault]
    return found[fault]


DEADLOCK = """
    import threading
    first_lock, second_lock = threading.Lock(), threading.Lock()
    both_hold_one = threading.Barrier(2)

    def test_before():
        pass

    def test_deadlock(thread_index):
        mine, theirs = (first_lock, second_lock) if thread_index == 0 else (second_lock, first_lock)
        with mine:
            both_hold_one.wait()
            with theirs:
                pass

    def test_after():
        pass
"""


def test_deadlock_between_two_locks(pytester):
    pytester.makepyfile(test_dl=DEADLOCK)
    result = run(pytester, *FTRACE, "--threads", "2", "--ftrace-timeout", "1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_deadlock _*",
            "*did not finish within 1s (--ftrace-timeout); 2 of 2 still running*",
            "Thread ftrace-0 (most recent call last):",
            "*with theirs:*",
            "Thread ftrace-1 (most recent call last):",
            "*with theirs:*",
            "leaked threads: ftrace-0, ftrace-1 *",
            f"ftrace: seed={SEED} test-seed=* mode=chaos; first failure in thread *, iteration 0",
            f"replay: pytest 'test_dl.py::test_deadlock' --ftrace* --seed {SEED} "
            "--ftrace-replay t2i0",
        ]
    )
    result.stdout.fnmatch_lines(["*ftrace: leaked threads*", "test_dl.py::test_deadlock: thread*"])
    assert_only_fault_failed(pytester, "test_deadlock")


HANG = """
    import threading, time

    def test_before():
        pass

    def test_hangs(thread_index):
        if thread_index == 1:
            # A helper that never finishes, and is not a daemon: shutdown would wait for it.
            helper = threading.Thread(target=threading.Event().wait, name="helper", daemon=False)
            helper.start()
            helper.join()

    def test_after():
        pass
"""


@pytest.mark.parametrize(
    "isolate", ["", "test", "module"], ids=["inline", "per-test", "per-module"]
)
def test_hanging_test_with_a_non_daemon_thread_does_not_hang_the_exit(pytester, isolate):
    pytester.makepyfile(test_hang=HANG)
    args = (*FTRACE, "--threads", "2", "--ftrace-timeout", "1")
    result = run(pytester, *args, *([f"--ftrace-isolate={isolate}"] if isolate else []))
    # What must happen, whichever bound ends the test: only it fails, the session ends.
    result.assert_outcomes(passed=2, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert_only_fault_failed(pytester, "test_hangs")
    out = result.stdout.str()
    if isolate and "timed out: test_hang.py::test_hangs" in out:
        # Under --ftrace-isolate the whole test also has a backstop bound (3 x the timeout
        # + 2s): on a machine stalled long enough it can end the child before the runner's
        # report is out. Then the child's stacks say where the test was.
        result.stdout.fnmatch_lines(
            [
                "timed out: test_hang.py::test_hangs did not finish within *",
                '*File "*test_hang.py", line 11 in test_hangs',
            ]
        )
        return
    result.stdout.fnmatch_lines(
        [
            "*did not finish within 1s (--ftrace-timeout); 1 of 2 still running*",
            "Thread ftrace-1 (most recent call last):",
            "*helper.join()*",
            "Thread helper, started by the test, not daemon (most recent call last):",
            "leaked threads: ftrace-1, helper were still running when the test was given up "
            "(helper not daemon); if they still are at the end of the session, the process "
            "exits with os._exit instead of waiting for them.",
            f"ftrace: seed={SEED} *",
            f"replay: pytest 'test_hang.py::test_hangs' --ftrace* --seed {SEED} "
            "--ftrace-replay t2i*",
        ]
    )
    if isolate:  # the child left them running: the main process names them all the same
        summary = [
            "*ftrace: leaked threads*",
            "test_hang.py::test_hangs: thread ftrace-1 (daemon) was still running when the test "
            "was done",
            "test_hang.py::test_hangs: thread helper (not daemon) was still running when*",
            f"their test process exited without waiting for them (os._exit), once its {isolate} "
            "was done",
        ]
    else:
        summary = [
            "*ftrace: leaked threads*",
            "test_hang.py::test_hangs: thread helper (not daemon) is still running",
            "the process exits without waiting for them*",
        ]
    result.stdout.fnmatch_lines([*summary, "*1 failed, 2 passed*"])


HELD_BY_A_FIXTURE = """
    import threading
    import pytest

    @pytest.fixture(scope="module")
    def busy():
        lock, ready = threading.Lock(), threading.Event()

        def keep_it():
            with lock:
                ready.set()
                threading.Event().wait()

        threading.Thread(target=keep_it, name="keeper", daemon=True).start()
        ready.wait()
        return lock

    def test_before():
        pass

    def test_waits(busy):
        with busy:
            pass

    def test_after():
        pass
"""


def test_hang_shows_the_thread_that_was_running_before_the_test(pytester):
    # The stuck threads wait for a lock that a module fixture's thread holds: that thread's
    # stack is what says why, so the report has it too (every thread, as faulthandler would).
    pytester.makepyfile(test_keeper=HELD_BY_A_FIXTURE)
    result = run(pytester, *FTRACE, "--threads", "2", "--ftrace-timeout", "1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*did not finish within 1s (--ftrace-timeout); 2 of 2 still running*",
            "Thread ftrace-0 (most recent call last):",
            "*with busy:*",
            "Thread ftrace-1 (most recent call last):",
            "*with busy:*",
            "Thread keeper, running since before the test, daemon (most recent call last):",
            "*in keep_it",
            "*threading.Event().wait()*",
            f"replay: pytest 'test_keeper.py::test_waits' --ftrace* --seed {SEED} *",
        ]
    )
    assert "Thread MainThread" not in result.stdout.str()  # the one waiting for the others
    assert_only_fault_failed(pytester, "test_waits")


def test_hanging_test_on_one_thread_under_isolation(pytester):
    # A hang the per-phase bound cannot interrupt (the test blocks the timer signal, as C code
    # holding the GIL would keep it from running): the isolated child's own bound ends it.
    pytester.makepyfile(
        test_sleepy="""
        import signal, time
        def test_before():
            pass
        def test_sleeps():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            print("going to sleep")
            time.sleep(600)
        def test_after():
            pass
        """
    )
    # --ftrace-timeout from the ini, to show that it is honoured there too.
    pytester.makeini("[pytest]\nftrace_timeout = 0.5\n")
    args = (*FTRACE, "--threads", "1", "--iterations", "1")
    result = run(pytester, *args, "--ftrace-isolate")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "timed out: test_sleepy.py::test_sleeps did not finish within 3.5s *stopped during "
            "call",
            "test: test_sleepy.py::test_sleeps",
            f"ftrace: seed={SEED} mode=chaos",
            f"replay: pytest 'test_sleepy.py::test_sleeps' --ftrace* --seed {SEED} "
            "--ftrace-isolate",
            "Timeout (0:00:03*)!",
            '*File "*test_sleepy.py", line 7 in test_sleeps',
            "*Captured stdout call*",
            "going to sleep",
        ]
    )
    assert_only_fault_failed(pytester, "test_sleeps")


@pytest.mark.parametrize("isolate", ["", "--ftrace-isolate"], ids=["inline", "isolated"])
def test_hanging_test_on_one_thread_is_bounded_by_the_timeout(pytester, isolate):
    # On one thread there is no stress runner: --ftrace-timeout bounds the call all the same,
    # with or without isolation, and the session goes on.
    pytester.makepyfile(
        test_sleepy="""
        import time
        def test_before():
            pass
        def test_sleeps():
            time.sleep(600)
        def test_after():
            pass
        """
    )
    args = (*FTRACE, "--threads", "1", "--iterations", "1", "--ftrace-timeout", "0.5")
    result = run(pytester, *args, *([isolate] if isolate else []))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Hang: the test's call did not finish within 0.5s (--ftrace-timeout)*",
            "*Thread MainThread (not daemon), the stuck one (most recent call last):",
            "*time.sleep(600)",
        ]
    )
    assert_only_fault_failed(pytester, "test_sleeps")


SEGFAULT = """
    import ctypes

    def test_before():
        pass

    def test_segfault(thread_index):
        if thread_index == 0:
            ctypes.string_at(0)

    def test_after():
        pass
"""


@pytest.mark.parametrize("mode", ["test", "module"])
def test_segfault_under_isolation(pytester, mode):
    pytester.makepyfile(test_segv=SEGFAULT)
    args = (*FTRACE, "--threads", "2", f"--ftrace-isolate={mode}")
    result = run(pytester, *args)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_segfault _*",
            "crashed: the test process was killed by SIGSEGV (Segmentation fault) during call",
            "test: test_segv.py::test_segfault",
            "in the threaded run (2 threads), round 0 had started",
            f"ftrace: seed={SEED} mode=chaos",
            f"replay: pytest 'test_segv.py::test_segfault' --ftrace* --seed {SEED} "
            "--ftrace-replay t2i0 --ftrace-isolate",
            "Fatal Python error: Segmentation fault",
            "Current thread * (most recent call first):",
            "*in string_at",
            '*File "*test_segv.py", line 8 in test_segfault',
        ]
    )
    result.stdout.fnmatch_lines(["FAILED test_segv.py::test_segfault - crashed: *"])
    if sys.platform == "linux" or shutil.which("gdb"):  # native stacks: the core's, or gdb's
        result.stdout.fnmatch_lines(
            ["Native stacks (*, most recent call first):", "Thread * (*", "*string_at*"]
        )
    fault = assert_only_fault_failed(pytester, "test_segfault")
    assert fault["props"]["ftrace_crash"] == "SIGSEGV"


def test_os_exit_under_isolation(pytester):
    pytester.makepyfile(
        test_exits="""
        import os

        def test_before():
            pass

        def test_exits(thread_index):
            if thread_index == 1:
                os._exit(17)

        def test_after():
            pass
        """
    )
    result = run(pytester, *FTRACE, "--threads", "2", "--ftrace-isolate")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process exited with status 17 during call*",
            "test: test_exits.py::test_exits",
            f"ftrace: seed={SEED} mode=chaos",
        ]
    )
    fault = assert_only_fault_failed(pytester, "test_exits")
    assert fault["props"]["ftrace_crash"] == "exit status 17"


@pytest.mark.parametrize("isolate", [(), ("--ftrace-isolate",)], ids=["inline", "isolated"])
def test_system_exit_in_a_worker_thread(pytester, isolate):
    pytester.makepyfile(
        test_sysexit="""
        import sys

        def test_before():
            pass

        def test_exits(thread_index):
            if thread_index == 1:
                sys.exit(3)

        def test_after():
            pass
        """
    )
    result = run(pytester, *FTRACE, "--threads", "2", *isolate)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_exits _*",
            "ConcurrencyError: *executions failed (2 threads x * iterations)*",
            "[[]1[]] SystemExit at test_sysexit.py:8 *",
            f"ftrace: seed={SEED} *",
            f"replay: pytest 'test_sysexit.py::test_exits' --ftrace* --seed {SEED} "
            "--ftrace-replay*",
        ]
    )
    assert_only_fault_failed(pytester, "test_exits")


@pytest.mark.parametrize("isolate", [(), ("--ftrace-isolate",)], ids=["inline", "isolated"])
def test_keyboard_interrupt_in_a_worker_thread(pytester, isolate):
    # As without threads, KeyboardInterrupt stops the session: the results before it are kept
    # and reported, the interrupted test is named, and the process ends (no hang).
    pytester.makepyfile(
        test_kbd="""
        def test_before():
            pass

        def test_interrupts(thread_index):
            if thread_index == 1:
                raise KeyboardInterrupt

        def test_after():
            pass
        """
    )
    result = run(pytester, *FTRACE, "--threads", "2", "-v", *isolate)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            f"ftrace: seed={SEED} mode=chaos",
            "test_kbd.py::test_before PASSED*",
            "test_kbd.py::test_interrupts *",
            "*KeyboardInterrupt*",
            "*test_kbd.py:6*",
            "*1 passed*",
        ]
    )
    found = cases(pytester)
    assert found["test_before"]["outcome"] == "passed"
    assert "test_after" not in found


@only_free_threaded
@pytest.mark.parametrize("isolate", [(), ("--ftrace-isolate",)], ids=["inline", "isolated"])
def test_import_that_reenables_the_gil(pytester, isolate):
    from test_gil import build_gil_extension

    build_gil_extension(pytester.path)
    pytester.makepyfile(
        test_gil_fault="""
        import sys

        def test_before():
            assert not sys._is_gil_enabled()

        def test_imports_gilly(thread_index):
            import gilly

        def test_after():
            pass
        """
    )
    args = (*FTRACE, "--threads", "2", "--require-gil-disabled", "-W", "ignore")
    result = run(pytester, *args, *isolate)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_imports_gilly _*",
            "*the GIL was re-enabled during test_gil_fault.py::test_imports_gilly; "
            "modules imported then: 'gilly'*",
        ]
    )
    result.stdout.fnmatch_lines(["*ftrace: GIL re-enabled*", "test_gil_fault.py::test_imports*"])
    assert_only_fault_failed(pytester, "test_imports_gilly")


@only_free_threaded
def test_gil_reenabled_in_one_isolated_test_stays_there(pytester):
    from test_gil import build_gil_extension

    build_gil_extension(pytester.path)
    pytester.makepyfile(
        test_gil_fault="""
        import sys

        def test_imports_gilly():
            import gilly
            assert sys._is_gil_enabled()

        def test_after():
            assert not sys._is_gil_enabled()
        """
    )
    result = run(pytester, "--ftrace-isolate", "-W", "ignore")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*ftrace: GIL re-enabled*", "test_gil_fault.py::test_imports*"])


@only_free_threaded
def test_generator_next_from_threads_crash_fails_only_that_test(pytester):
    # Measured for issue 7: two threads calling next() on one generator at once can segfault
    # CPython 3.13t. Whether it crashes in a given run is up to the scheduler; what must hold
    # is that the session survives it and reports every test.
    pytester.makepyfile(
        test_gen="""
        def numbers():
            n = 0
            while True:
                n += 1
                yield n

        def test_before():
            pass

        def test_next_from_threads():
            global shared
            shared = numbers()
            for _ in range(200000):
                try:
                    next(shared)
                except ValueError:  # generator already executing
                    pass

        def test_after():
            pass
        """
    )
    args = ("--ftrace-isolate", *FTRACE, "--threads", "8", "--iterations", "3")
    result = run(pytester, *args)
    found = cases(pytester)
    assert sorted(found) == ["test_after", "test_before", "test_next_from_threads"]
    assert found["test_before"]["outcome"] == found["test_after"]["outcome"] == "passed"
    fault = found["test_next_from_threads"]
    if fault["outcome"] != "passed":  # it crashed (every run on 3.13.5t, here)
        assert "crashed: the test process was killed by SIG" in fault["message"], fault
        assert "test: test_gen.py::test_next_from_threads" in fault["message"]
        assert f"ftrace: seed={SEED}" in fault["message"]
        assert fault["props"]["ftrace_seed"] == SEED
        assert fault["props"]["ftrace_crash"].startswith("SIG")
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(
            [
                "in the threaded run (8 threads), round * had started",
                f"replay: pytest 'test_gen.py::test_next_from_threads' --ftrace* --seed {SEED} "
                "--ftrace-replay t8i* --ftrace-isolate",
            ]
        )


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (("--ftrace-isolate=bogus",), "", "*--ftrace-isolate takes test, module or off*"),
        (("--ftrace-timeout", "0"), "", "*--ftrace-timeout must be > 0, not 0*"),
        (("--ftrace-timeout", "-2"), "", "*--ftrace-timeout must be > 0*"),
        (("--ftrace-timeout", "soon"), "", "*--ftrace-timeout must be a number, not 'soon'*"),
        ((), "ftrace_timeout = 0", "*ini key ftrace_timeout*must be > 0*"),
        ((), "ftrace_isolate = always", "*ini key ftrace_isolate*'always'*"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, ini, message):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_ok(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "passed" not in result.stdout.str()


def test_junitxml_is_complete_when_several_tests_crash(pytester):
    pytester.makepyfile(
        test_many="""
        import ctypes, os, signal, pytest

        def test_before():
            pass

        def test_segfault():
            ctypes.string_at(0)

        def test_abort():
            os.abort()

        def test_ordinary_failure():
            assert 1 == 2

        @pytest.mark.skip(reason="not this one")
        def test_skipped():
            pass

        def test_killed():
            os.kill(os.getpid(), signal.SIGKILL)

        def test_after():
            pass
        """
    )
    result = run(pytester, *FTRACE, "--ftrace-isolate=module")
    result.assert_outcomes(passed=2, failed=4, skipped=1)
    found = cases(pytester)
    assert sorted(found) == sorted(
        [
            "test_before",
            "test_segfault",
            "test_abort",
            "test_ordinary_failure",
            "test_skipped",
            "test_killed",
            "test_after",
        ]
    )
    outcomes = {name: case["outcome"] for name, case in found.items()}
    assert outcomes == {
        "test_before": "passed",
        "test_segfault": "failure",
        "test_abort": "failure",
        "test_ordinary_failure": "failure",
        "test_skipped": "skipped",
        "test_killed": "failure",
        "test_after": "passed",
    }
    assert found["test_segfault"]["props"]["ftrace_crash"] == "SIGSEGV"
    assert found["test_abort"]["props"]["ftrace_crash"] == "SIGABRT"
    assert found["test_killed"]["props"]["ftrace_crash"] == "SIGKILL"
    for name in ("test_segfault", "test_abort", "test_killed"):
        assert f"test: test_many.py::{name}" in found[name]["message"]
        assert f"ftrace: seed={SEED}" in found[name]["message"]
    result.stdout.fnmatch_lines(["*3 test process(es) of 4 died*"])


def test_a_nested_session_with_leaked_threads_does_not_end_the_outer_process(pytester):
    # pytester's in-process run: the leaked (daemon) worker is still waiting when the inner
    # session ends, but this process is still running the outer session, so no os._exit.
    # The worker waits (in C, where nothing interrupts it) until this test lets it go, so it
    # is still there at the end of the inner session however slow the machine is.
    import sys
    import threading

    release = sys._ftrace_test_release = threading.Event()
    pytester.makepyfile(
        test_inner="""
        import sys
        def test_waits(thread_index):
            if thread_index == 0:
                sys._ftrace_test_release.wait(120)
        """
    )
    try:
        result = pytester.runpytest_inprocess(
            # 2 s: starting the workers (set-up, bounded too) must fit in it on a loaded
            # free-threaded build
            "-p",
            "no:cacheprovider",
            "--threads",
            "2",
            "--ftrace-timeout",
            "2",
        )
    finally:
        release.set()
    del sys._ftrace_test_release
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*ftrace: leaked threads*", "*test_waits: thread ftrace-0*"])
    # Let the leaked worker finish, so that this (outer) session has nothing left running.
    from pytest_ftrace import state

    for _, thread in state.leaked_alive():
        thread.join(10)
