"""--ftrace-isolate: tests run in forked children, and the main process reports as usual."""

import os
import shlex
import shutil
import xml.etree.ElementTree as ET

import pytest

RUN = ("-p", "no:cacheprovider")


def run(pytester: pytest.Pytester, *args: str, cache: bool = False) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*(() if cache else RUN), *args, timeout=120)


PIDS = """
    import os, pathlib
    def record(name):
        with open("pids", "a") as f:
            f.write(f"{name} {os.getpid()}\\n")
"""


def pids(pytester) -> dict[str, int]:
    lines = (pytester.path / "pids").read_text().split("\n")
    return {name: int(pid) for name, pid in (line.split() for line in lines if line)}


def test_each_test_runs_in_its_own_child(pytester):
    pytester.makeconftest(PIDS)
    pytester.makepyfile(
        """
        import pytest
        from conftest import record
        def test_a():
            record("a")
        def test_b():
            record("b")
        def test_fails():
            record("fails")
            assert 1 == 2
        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass
        @pytest.mark.xfail(reason="known")
        def test_xfails():
            assert 0
        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")
        def test_setup_error(broken):
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=2, failed=1, skipped=1, xfailed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "ftrace: isolate=test (each test in a forked child process)",
            "*RuntimeError: fixture broke*",
            "*assert 1 == 2*",
        ]
    )
    seen = pids(pytester)
    assert len(set(seen.values())) == 3
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_module_mode_shares_a_child_and_module_fixtures(pytester):
    pytester.makeconftest(PIDS)
    common = """
        import pytest
        from conftest import record
        @pytest.fixture(scope="module")
        def resource():
            record("setup-{name}")
            yield
            record("teardown-{name}")
        def test_1(resource):
            record("1-{name}")
        def test_2(resource):
            record("2-{name}")
        def test_3(resource):
            record("3-{name}")
        """
    pytester.makepyfile(test_m=common.format(name="m"), test_n=common.format(name="n"))
    result = run(pytester, "--ftrace-isolate=module")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["ftrace: isolate=module*"])
    order = [line.split()[0] for line in (pytester.path / "pids").read_text().splitlines()]
    assert order == [
        *("setup-m", "1-m", "2-m", "3-m", "teardown-m"),
        *("setup-n", "1-n", "2-n", "3-n", "teardown-n"),
    ]
    seen = pids(pytester)
    assert seen["1-m"] == seen["3-m"] != seen["1-n"] == seen["3-n"]
    assert os.getpid() not in seen.values()

    # Per test, the module fixture comes with each test's child.
    (pytester.path / "pids").unlink()
    run(pytester, "--ftrace-isolate=test", "test_m.py").assert_outcomes(passed=3)
    order = [line.split()[0] for line in (pytester.path / "pids").read_text().splitlines()]
    assert order.count("setup-m") == 3
    assert order.count("teardown-m") == 3


def test_module_mode_restarts_after_a_crash(pytester):
    pytester.makeconftest(PIDS)
    pytester.makepyfile(
        """
        import os, pytest
        from conftest import record
        @pytest.fixture(scope="module")
        def resource():
            record("setup")
            return 1
        def test_1(resource):
            record("1")
        def test_dies(resource):
            os._exit(9)
        def test_3(resource):
            record("3")
        def test_4(resource):
            record("4")
        """
    )
    result = run(pytester, "--ftrace-isolate=module")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        ["*test_dies*", "crashed: the test process exited with status 9 during call*"]
    )
    order = [line.split()[0] for line in (pytester.path / "pids").read_text().splitlines()]
    assert order == ["setup", "1", "setup", "3", "4"]
    seen = pids(pytester)
    assert seen["1"] != seen["3"] == seen["4"]


def test_crash_in_setup_and_teardown_is_reported_against_the_test(pytester):
    pytester.makepyfile(
        """
        import os, signal, pytest
        @pytest.fixture
        def aborts_in_setup():
            os.abort()
        @pytest.fixture
        def dies_in_teardown():
            yield
            os.kill(os.getpid(), signal.SIGKILL)
        def test_setup_crash(aborts_in_setup):
            pass
        def test_teardown_crash(dies_in_teardown):
            pass
        def test_fine():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate", "-rA")
    # The teardown crash makes that test pass its call and error in teardown, as pytest would.
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_setup_crash*",
            "crashed: the test process was killed by SIGABRT (Aborted) during setup",
            "*aborts_in_setup*",
            "*ERROR at teardown of test_teardown_crash*",
            "crashed: the test process was killed by SIGKILL (Killed) during teardown",
        ]
    )
    result.stdout.fnmatch_lines(["PASSED *test_fine*"])


def test_exitfirst_stops_and_last_failed_reruns(pytester):
    pytester.makepyfile(
        """
        def test_ok():
            pass
        def test_bad():
            assert 0
        def test_never():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate", "-x", cache=True)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    result = run(pytester, "--ftrace-isolate", "--lf", "-v", cache=True)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["run-last-failure: rerun previous 1 failure*", "*test_bad FAILED*"]
    )


def test_junitxml_stays_complete_through_a_crash(pytester):
    pytester.makepyfile(
        """
        import ctypes
        def test_before():
            print("before")
        def test_segfault():
            ctypes.string_at(0)
        def test_after():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate", "--junitxml=out.xml", "-o", "junit_logging=all")
    result.assert_outcomes(passed=2, failed=1)
    suite = ET.parse(pytester.path / "out.xml").getroot().find("testsuite")
    assert suite.get("tests") == "3"
    assert suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert sorted(cases) == ["test_after", "test_before", "test_segfault"]
    failure = cases["test_segfault"].find("failure")
    assert "SIGSEGV" in failure.get("message")
    assert "test_segfault" in failure.text
    assert "before" in cases["test_before"].find("system-out").text


def test_captured_output_is_shown(pytester):
    pytester.makepyfile(
        """
        import os, sys
        def test_prints():
            print("to stdout")
            sys.stderr.write("to stderr\\n")
        def test_prints_then_dies():
            print("last words")
            sys.stdout.flush()
            os._exit(1)
        """
    )
    result = run(pytester, "--ftrace-isolate", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_prints_then_dies*",
            "crashed: the test process exited with status 1 during call*",
            "*Captured stdout call*",
            "last words",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*test_prints*", "*Captured stdout call*", "to stdout", "*Captured stderr call*"]
    )


def test_seed_and_replay_line_with_ftrace(pytester):
    pytester.makepyfile(
        """
        import ctypes
        def test_crashes(thread_index):
            if thread_index == 1:
                ctypes.string_at(0)
        def test_after():
            pass
        """
    )
    args = ("--ftrace", "--ftrace-mode", "chaos", "--seed", "1234", "--threads", "2")
    result = run(pytester, "--ftrace-isolate", *args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGSEGV*during call",
            "test: test_seed_and_replay_line_with_ftrace.py::test_crashes",
            "ftrace: seed=1234 mode=chaos",
            "replay: pytest 'test_seed_and_replay_line_with_ftrace.py::test_crashes' "
            "--ftrace* --seed 1234 --ftrace-replay t2i0 --ftrace-isolate",
            "Current thread * (most recent call first):",
            '*File "*test_seed_and_replay_line_with_ftrace.py", line 4 in test_crashes',
        ]
    )


def test_ftrace_statistics_come_back_from_the_children(pytester):
    pytester.makepyfile(
        """
        def test_one():
            pass
        def test_two():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate", "--ftrace", "--seed", "3", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*ftrace statistics (seed 3)*", "*::test_one", "*::test_two"])


def test_pytest_exit_and_keyboard_interrupt_in_a_child_stop_the_session(pytester):
    pytester.makepyfile(
        """
        import pytest
        def test_first():
            pass
        def test_exits():
            pytest.exit("enough", returncode=7)
        def test_never():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    assert result.ret == 7
    result.stdout.fnmatch_lines(["*Exit: enough*"])
    result.assert_outcomes(passed=1)
    pytester.makepyfile(
        """
        def test_first():
            pass
        def test_interrupts():
            raise KeyboardInterrupt
        def test_never():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert "test_never" not in result.stdout.str()


def test_ini_key_and_off(pytester):
    pytester.makeconftest(PIDS)
    pytester.makeini("[pytest]\nftrace_isolate = module\n")
    pytester.makepyfile(
        """
        from conftest import record
        def test_a():
            record("a")
        def test_b():
            record("b")
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["ftrace: isolate=module*"])
    seen = pids(pytester)
    assert seen["a"] == seen["b"]
    result = run(pytester, "--ftrace-isolate=off")
    result.assert_outcomes(passed=2)
    assert "isolate=" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "ini", "message"),
    [
        (("--ftrace-isolate=bogus",), "", "*--ftrace-isolate takes test, module or off*bogus*"),
        (
            ("--ftrace-isolate=tests/test_x.py",),
            "",
            "*write --ftrace-isolate=test PATH*",
        ),
        (("--ftrace-isolate=tests",), "", "*not 'tests' (to run a path, write*"),
        # After the bare flag a word that is not a mode is a path (here: one that is not there).
        (("--ftrace-isolate", "bogus"), "", "*file or directory not found: bogus*"),
        ((), "ftrace_isolate = sometimes", "*ini key ftrace_isolate*sometimes*"),
        (("--ftrace-isolate", "--threadpool", "2"), "", "*cannot be combined*"),
    ],
)
def test_bad_values_are_usage_errors(pytester, args, ini, message):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_ok(): pass")
    pytester.mkdir("tests")  # a folder named like a word: the value names a path all the same
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@pytest.mark.parametrize(
    ("args", "ini", "env"),
    [
        (("--ftrace-isolate",), "threadpool = 2", ""),
        (("--ftrace-isolate",), "ftrace_threadpool = 2", ""),
        (("--threadpool", "2"), "ftrace_isolate = test", ""),
        ((), "ftrace_isolate = module\nftrace_threadpool = auto", ""),
        ((), "addopts = --ftrace-isolate --threadpool 2", ""),
        ((), "", "--ftrace-isolate --threadpool=2"),
        (("--ftrace-isolate",), "", "--threadpool 2"),
    ],
)
def test_isolate_with_a_threadpool_from_any_source_is_a_usage_error(
    pytester, monkeypatch, args, ini, env
):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    monkeypatch.setenv("PYTEST_ADDOPTS", env)
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.parallelizable("children")
        def test_a():
            pass
        """
    )
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    result.stderr.fnmatch_lines(["*--ftrace-isolate and --threadpool cannot be combined*"])
    # off is off: the pool runs without isolation
    result = run(pytester, "--ftrace-isolate=off", "--threadpool", "2")
    result.assert_outcomes(passed=1)


SLOW_AND_FAST = """
    import time
    def test_slow():
        time.sleep(60)
    def test_fast():
        pass
    """


@pytest.mark.parametrize("mode", ["test", "module"])
def test_a_timeout_signal_of_another_plugin_fails_only_the_test(pytester, mode):
    """pytest-timeout's SIGALRM handler raises in the main process while it waits for the
    child: the test fails with the plugin's message, the child is stopped, the session goes
    on."""
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(SLOW_AND_FAST)
    result = run(
        pytester, f"--ftrace-isolate={mode}", "--timeout", "2", "--timeout-method", "signal"
    )
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_slow*",
            "interrupted: test_*.py::test_slow was stopped during call: the main process, "
            "waiting for its test process, got an exception (from another plugin's signal "
            "handler*): Failed: Timeout (>2.0s)*",
            "*Python stacks when the test process ended*",
            "*line 3 in test_slow*",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_collect_only_forks_nothing(pytester):
    pytester.makepyfile("def test_ok(): pass")
    result = run(pytester, "--ftrace-isolate", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert "isolate=" not in result.stdout.str()


@pytest.mark.parametrize("mode", ["chaos", "exact"])
def test_crash_in_a_later_round_names_it_and_the_replay_reproduces(pytester, mode):
    from pytest_ftrace.ftrace import session as ftrace

    pytester.makepyfile(
        test_rounds="""
        import ctypes
        def test_crashes(thread_index, iteration_index):
            if thread_index == 2 and iteration_index == 3:
                ctypes.string_at(0)
        """
    )
    args = (
        "--ftrace",
        "--ftrace-mode",
        mode,
        "--seed",
        "99",
        "--threads",
        "4",
        "--iterations",
        "6",
    )
    result = run(pytester, *args, "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    named = "" if mode == ftrace.DEFAULT_MODE else f" --ftrace-mode {mode}"
    named += " --ftrace-iterations 6"  # the line carries every option that shapes the run
    replay = (
        f"replay: pytest 'test_rounds.py::test_crashes' --ftrace{named} --seed 99 "
        "--ftrace-replay t4i3"
    )
    result.stdout.fnmatch_lines(
        ["in the threaded run (4 threads), round 3 had started", replay + " --ftrace-isolate"]
    )
    # The replay line, run as printed, crashes the same way (and fails only that test).
    result = run(pytester, *shlex.split(replay)[2:], "--ftrace-isolate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*replay=t4i3*", "crashed: the test process was killed by SIGSEGV*", replay + " *"]
    )


def test_warnings_from_the_children_reach_the_summary(pytester):
    pytester.makepyfile(
        """
        import warnings
        class LocalWarning(UserWarning):
            pass
        def test_warns():
            warnings.warn("careful now", UserWarning)
        def test_local():
            warnings.warn("from here", LocalWarning)
        def test_error():
            warnings.warn("turned into an error", UserWarning)
        """
    )
    result = run(pytester, "--ftrace-isolate", "-W", "error:turned into:UserWarning")
    result.assert_outcomes(passed=2, failed=1, warnings=2)
    result.stdout.fnmatch_lines(
        ["*warnings summary*", "*::test_warns", "*UserWarning: careful now", "*LocalWarning: from*"]
    )


def test_ctrl_c_stops_the_session_and_leaves_no_child(pytester):
    import signal
    import subprocess
    import sys
    import time

    pytester.makepyfile(
        test_slow="""
        import os, pathlib, time
        def test_first():
            pass
        def test_slow():
            pathlib.Path("child").write_text(str(os.getpid()))
            time.sleep(60)
        def test_next():
            pass
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--ftrace-isolate", "-v"],
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
            if (pytester.path / "child").exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # the main process only (a terminal signals both)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    assert "test_first PASSED" in out
    assert "test_next" not in out
    child = int((pytester.path / "child").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_module_child_lost_between_tests_is_replaced(pytester):
    # test_1 leaves a thread behind that ends its process a little later, while the main process
    # is still logging test_1 (the conftest makes that take a while): test_2 gets a new child.
    pytester.makeconftest(
        """
        import time
        def pytest_runtest_logreport(report):
            if report.when == "teardown" and report.nodeid.endswith("test_1"):
                time.sleep(3)
        """
    )
    pytester.makepyfile(
        """
        import os, threading
        def test_1():
            threading.Timer(0.1, os._exit, (5,)).start()
        def test_2():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate=module")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "ftrace: the test process of a module ended (exit status 5) between tests, "
            "before *::test_2*"
        ]
    )


@pytest.mark.skipif(not shutil.which("gdb"), reason="native stacks are taken with gdb")
@pytest.mark.parametrize("native", ["gdb", "0"])
def test_native_stacks_with_gdb(pytester, monkeypatch, native):
    monkeypatch.setenv("FTRACE_NATIVE_STACKS", native)
    pytester.makepyfile(
        """
        import ctypes
        def test_segfault():
            ctypes.string_at(0)
        def test_after():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["crashed: the test process was killed by SIGSEGV (Segmentation fault) during call"]
    )
    if native == "gdb":
        result.stdout.fnmatch_lines(
            [
                "Native stacks (gdb, most recent call first):",
                "Thread 1 (Thread *",
                "  #0  *",
                "  #* string_at *",
            ]
        )
    else:
        assert "Native stacks" not in result.stdout.str()


@pytest.mark.skipif(not shutil.which("gdb"), reason="the held child is noticed for gdb")
def test_crash_with_faulthandler_turned_off_by_the_test(pytester, monkeypatch):
    # No dump to notice: the signal's arrival at the holding handler says it instead.
    monkeypatch.setenv("FTRACE_NATIVE_STACKS", "gdb")
    pytester.makepyfile(
        """
        import ctypes, faulthandler
        def test_segfault():
            faulthandler.disable()
            ctypes.string_at(0)
        def test_after():
            pass
        """
    )
    result = run(pytester, "--ftrace-isolate")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "crashed: the test process was killed by SIGSEGV (Segmentation fault) during call",
            "(no Python stacks: the process ended without a fatal-error dump)",
            "Native stacks (gdb, most recent call first):",
            "  #* string_at *",
        ]
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("mode", ["test", "module"])
def test_main_process_does_not_leak_descriptors(pytester, mode):
    # Logging runs in the main process: count its open descriptors there, as tests crash.
    pytester.makeconftest(
        """
        import os
        def pytest_runtest_logfinish(nodeid):
            with open("counts", "a") as f:
                f.write(f"{len(os.listdir('/proc/self/fd'))}\\n")
        """
    )
    pytester.makepyfile(
        """
        import ctypes, os, pytest
        @pytest.mark.parametrize("n", range(15))
        def test_some_crash(n):
            if n % 5 == 0:
                ctypes.string_at(0)
            if n % 5 in (1, 2):
                os._exit(n)
        """
    )
    result = run(pytester, f"--ftrace-isolate={mode}")
    result.assert_outcomes(passed=6, failed=9)
    counts = [int(n) for n in (pytester.path / "counts").read_text().split()]
    assert max(counts[5:]) <= max(counts[:5]), counts  # the same after 3 rounds of crashes
