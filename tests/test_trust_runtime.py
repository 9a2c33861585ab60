"""Verdicts that can be trusted at run time (issue 13): an error of the plugin's own machinery
fails its test, a hang fails only its test and slows no other, every phase of a test is
bounded, a test's own threads finish their work, and the process never aborts at exit.

Every session runs in a subprocess (a fault that hung or aborted it must fail the test, not
the suite), and the tests assert on what happened, never on how long it took.
"""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

RUN = ("-p", "no:cacheprovider", "--junitxml=out.xml")
EXACT = ("--ftrace", "--seed", "7")
CHAOS = ("--ftrace", "--ftrace-mode", "chaos", "--seed", "7")
PLAIN = ("--threads", "4")
MODES = {"exact": EXACT, "chaos": CHAOS, "plain": PLAIN}


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args, timeout=300)


def cases(pytester: pytest.Pytester) -> dict[str, tuple[str, str]]:
    """junitxml test cases by name: (outcome, message and text)."""
    suite = ET.parse(pytester.path / "out.xml").getroot().find("testsuite")
    found = {}
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, (node.get("message") or "") + (node.text or "")
                break
        found[case.get("name")] = (outcome, message)
    return found


# -- 1. an error of the plugin's machinery fails the test ------------------------------------

# Each fault is injected by a conftest that replaces one piece of the machinery with one that
# raises; the test's own body always passes, so only the injected error can fail it.
FAULTS = {
    "exact round_start": (
        EXACT,
        "pytest_ftrace.ftrace.coop.ExactTest",
        "round_start",
        "round_start of thread",
    ),
    "exact round_end": (EXACT, "pytest_ftrace.ftrace.coop.ExactTest", "round_end", "round_end"),
    "exact thread_exit": (
        EXACT,
        "pytest_ftrace.ftrace.coop.ExactTest",
        "thread_exit",
        "thread_exit",
    ),
    "chaos round_start": (
        CHAOS,
        "pytest_ftrace.ftrace.instrument.TestRun",
        "round_start",
        "round_start of thread",
    ),
    "chaos thread_enter": (
        CHAOS,
        "pytest_ftrace.ftrace.instrument.TestRun",
        "thread_enter",
        "thread_enter",
    ),
    "plain fixtures": (
        PLAIN,
        "pytest_ftrace.stress.fixtures.ThreadFixtures",
        "teardown",
        "of thread",
    ),
    "plain barrier": (PLAIN, "pytest_ftrace.stress.runner.ThreadedRun", "_wait", "of thread"),
    "the report": (
        EXACT,
        "pytest_ftrace.ftrace.session.TestSession",
        "finish",
        "the --ftrace report",
    ),
    "activation": (
        EXACT,
        "pytest_ftrace.ftrace.modes.exact.ExactMode",
        "activate",
        "activating --ftrace",
    ),
}

# faults in these are raised the first time: they are called once per test, not per thread
ONCE_PER_TEST = ("pytest_ftrace.ftrace.session.", "pytest_ftrace.ftrace.modes.")

INJECT = """
import importlib
import os
import threading

def pytest_configure(config):
    module, _, cls = {owner!r}.rpartition(".")
    owner = getattr(importlib.import_module(module), cls)
    original = getattr(owner, {name!r})
    lock = threading.Lock()
    # counted in a file: exact mode runs each round in a forked child, where a list would
    # start from the parent's (empty) one every round
    calls = os.path.join(str(config.rootpath), "injected-calls")

    def broken(*args, **kwargs):
        with lock:
            with open(calls, "a+") as seen:
                seen.write("1")
                seen.seek(0)
                now = len(seen.read()) == {nth}
        if now:  # a worker's: not the first call, in the middle of the machinery's work
            raise RuntimeError("injected fault in the machinery")
        return original(*args, **kwargs)

    setattr(owner, {name!r}, broken)
"""


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_error_of_the_machinery_fails_the_test_as_an_internal_error(pytester, fault):
    args, owner, name, where = FAULTS[fault]
    nth = 1 if owner.startswith(ONCE_PER_TEST) else 2  # once per test, or per thread
    pytester.makeconftest(INJECT.format(owner=owner, name=name, nth=nth))
    pytester.makepyfile(
        test_ok="""
        def test_ok():
            pass
        """
    )
    result = run(pytester, *args, "--iterations", "3", "-W", "error::pytest.PytestWarning")
    found = cases(pytester)
    assert found["test_ok"][0] in ("failure", "error"), found
    message = found["test_ok"][1]
    assert "internal error of pytest-ftrace in" in message, message
    assert where in message, message
    assert "RuntimeError: injected fault in the machinery" in message, message
    assert "Traceback (most recent call last)" in message, message
    assert "PytestUnhandledThreadExceptionWarning" not in result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_an_internal_error_does_not_stop_the_next_test(pytester):
    pytester.makeconftest(
        INJECT.format(owner="pytest_ftrace.ftrace.coop.ExactTest", name="round_end", nth=2)
    )
    pytester.makepyfile(
        test_two="""
        def test_first():
            pass

        def test_second():
            pass
        """
    )
    run(pytester, *EXACT, "--threads", "2", "--iterations", "2")
    found = cases(pytester)
    assert found["test_first"][0] == "failure", found
    assert found["test_second"][0] == "passed", found


# -- 2. one hang fails only its test and slows no other ---------------------------------------

SPINNING = """
import threading

SPINNERS = []

def test_spins():
    SPINNERS.append(threading.current_thread())
    x = 0
    while True:
        x += 1
"""

AFTER = """
import test_a_spin

def test_spinners_were_stopped():
    # The spinning workers were given up on: they must stop, not take the CPU (and on a GIL
    # build the interpreter) from every test after them.
    for thread in test_a_spin.SPINNERS:
        thread.join(60)
    assert test_a_spin.SPINNERS
    assert not [t.name for t in test_a_spin.SPINNERS if t.is_alive()]
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_a_spinning_test_fails_alone_and_its_threads_stop(pytester, mode):
    pytester.makepyfile(test_a_spin=SPINNING)
    passing = "\n".join(
        f"def test_pass_{i}(thread_index):\n    assert thread_index >= 0\n" for i in range(20)
    )
    pytester.makepyfile(test_b_many=passing, test_c_after=AFTER)
    # exact mode forks each round by default: the spinners would be in a child that is gone
    # (tests/ftrace/test_fork.py has that case); here, the threads given up on in this process
    rounds = ("--ftrace-rounds", "process") if mode == "exact" else ()
    result = run(pytester, *MODES[mode], *rounds, "--ftrace-timeout", "2")
    found = cases(pytester)
    failed = sorted(name for name, (outcome, _) in found.items() if outcome != "passed")
    assert failed == ["test_spins"], {name: found[name] for name in failed}
    result.stdout.fnmatch_lines(["*did not finish within 2s (--ftrace-timeout)*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


# -- 3. every phase of a test is bounded --------------------------------------------------------

PHASES = """
import time
import pytest

@pytest.fixture
def stuck_setup():
    time.sleep(10**6)

@pytest.fixture
def stuck_teardown():
    yield
    time.sleep(10**6)

def test_before():
    pass

def test_setup_hangs(stuck_setup):
    pass

def test_teardown_hangs(stuck_teardown):
    pass

def test_after():
    pass
"""


@pytest.mark.parametrize(
    "args",
    [("--threads", "2"), ("--ftrace", "--ftrace-rounds", "process"), ("--threads", "1")],
    ids=["threads", "ftrace", "one-thread"],
)
def test_a_hanging_fixture_fails_its_test_and_the_session_goes_on(pytester, args):
    pytester.makepyfile(test_phases=PHASES)
    result = run(pytester, *args, "--ftrace-timeout", "2")
    found = cases(pytester)
    assert found["test_before"][0] == "passed", found
    assert found["test_after"][0] == "passed", found
    assert found["test_setup_hangs"][0] == "error", found
    assert (
        "the test's setup did not finish within 2s (--ftrace-timeout)"
        in (found["test_setup_hangs"][1])
    )
    assert "time.sleep(10**6)" in found["test_setup_hangs"][1]  # the stuck thread's stack
    # pytest reports an error in teardown as one more entry for the same test
    assert "the test's teardown did not finish within 2s" in result.stdout.str()
    assert result.ret == pytest.ExitCode.TESTS_FAILED


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forked rounds need os.fork")
def test_a_hanging_fixture_of_forked_rounds_fails_its_test_outside_the_rounds(pytester):
    """Forked rounds (--ftrace-rounds fork) set the per-thread fixtures up and tear them down
    in the round's process, in the call phase: a hang there fails the test, says where, and
    blames no round (no replay line)."""
    pytester.makepyfile(test_phases=PHASES)
    result = run(pytester, "--ftrace", "--ftrace-rounds", "fork", "--ftrace-timeout", "2")
    found = cases(pytester)
    assert found["test_before"][0] == "passed", found
    assert found["test_after"][0] == "passed", found
    for name, step in (("test_setup_hangs", "set-up"), ("test_teardown_hangs", "tear-down")):
        outcome, text = found[name]
        assert outcome == "failure", found
        assert re.search(rf"in their per-thread fixtures' \w+ {step}", text), text
        assert "time.sleep(10**6)" in text  # the stuck thread's stack
        assert "the failure was outside the rounds" in text
        assert "replay:" not in text
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_an_alarm_of_someone_else_that_is_due_first_is_left_alone(pytester):
    # The test's own SIGALRM comes first: the phase bound must neither swallow it nor leave
    # it disarmed.
    pytester.makepyfile(
        test_alarm="""
        import signal, time

        def test_own_alarm():
            fired = []
            signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            for _ in range(200):
                if fired:
                    break
                time.sleep(0.05)
            assert fired
        """
    )
    run(pytester, "--ftrace-timeout", "30").assert_outcomes(passed=1)


# -- 4. no abort at exit --------------------------------------------------------------------------

EXIT_CASES = {
    "sleeping thread": """
        import threading, time

        def test_starts_a_sleeper():
            threading.Thread(target=time.sleep, args=(2,)).start()
        """,
    "thread blocked on a lock": """
        import threading

        def test_leaves_a_waiter():
            lock = threading.Lock()
            lock.acquire()
            threading.Thread(target=lock.acquire, daemon=True).start()
        """,
}


@pytest.mark.parametrize("case", list(EXIT_CASES))
@pytest.mark.parametrize("seed", ["1", "2", "3", "4"])
def test_the_process_never_aborts_at_exit(pytester, case, seed):
    pytester.makepyfile(test_exit=EXIT_CASES[case])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--ftrace", "--seed", seed],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout + done.stderr
    assert "FATAL" not in out, out
    assert done.returncode in (0, 1), out  # a verdict, never a signal (SIGABRT: -6 or 134)
    assert " passed" in out or " failed" in out, out


# -- 5. a test's own threads finish their work ---------------------------------------------------

OWN_THREADS = """
import os, threading, time

def test_writes(thread_index):
    path = os.path.join(os.environ["FTRACE_OUT"], f"written-{thread_index}")

    def work():
        time.sleep(1)
        with open(path, "w") as f:
            f.write("done")

    helper = threading.Thread(target=work)
    assert not helper.daemon  # as when started from the main thread
    helper.start()

def test_check():
    written = sorted(os.listdir(os.environ["FTRACE_OUT"]))
    assert written and all(name.startswith("written-") for name in written), written
"""


@pytest.mark.parametrize(
    "args", [("--threads", "2"), EXACT, CHAOS], ids=["threads", "exact", "chaos"]
)
def test_the_test_waits_for_the_threads_it_started(pytester, monkeypatch, args):
    out = pytester.mkdir("out")
    monkeypatch.setenv("FTRACE_OUT", str(out))
    pytester.makepyfile(test_own=OWN_THREADS)
    result = run(pytester, *args, "--iterations", "1")
    result.assert_outcomes(passed=2)
    threads = 2 if "--threads" in args else 4
    assert sorted(p.name for p in out.iterdir()) == [f"written-{k}" for k in range(threads)]


def test_an_error_of_the_machinery_in_a_thread_the_test_started_fails_the_test(pytester):
    # Exact mode runs the threads a test starts under its scheduler too: the plugin's calls
    # in them are machinery as well, and an error there fails the test, not the thread.
    pytester.makeconftest(
        """
        from pytest_ftrace.ftrace import coop as exact

        original = exact._managed

        class Broken:
            def __init__(self, run):
                self._run = run

            def __getattr__(self, name):
                return getattr(self._run, name)

            def sched_attach(self, *args):
                raise RuntimeError("injected fault in the machinery")

        def managed():
            run = original()
            return None if run is None else Broken(run)

        exact._managed = managed
        """
    )
    pytester.makepyfile(
        test_child="""
        import threading

        def test_starts_a_thread():
            child = threading.Thread(target=lambda: None)
            child.start()
            child.join()
        """
    )
    result = run(pytester, *EXACT, "--threads", "2", "--iterations", "1")
    found = cases(pytester)
    assert found["test_starts_a_thread"][0] == "failure", found
    message = found["test_starts_a_thread"][1]
    assert "internal error of pytest-ftrace in a thread the test started" in message, message
    assert "RuntimeError: injected fault in the machinery" in message, message
    assert "PytestUnhandledThreadExceptionWarning" not in result.stdout.str()


def test_pytest_timeout_keeps_its_own_bound(pytester):
    # With pytest-timeout active for the test, its signal method owns SIGALRM: the phase bound
    # is left to it (it fires first here, and its failure is the one reported).
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(
        test_slow="""
        import time
        import pytest

        @pytest.fixture
        def stuck():
            time.sleep(600)

        def test_stuck(stuck):
            pass

        def test_after():
            pass
        """
    )
    result = run(
        pytester,
        "--threads",
        "2",
        "--ftrace-timeout",
        "60",
        "--timeout",
        "1",
        "--timeout-method",
        "signal",
    )
    found = cases(pytester)
    assert found["test_after"][0] == "passed", found
    assert found["test_stuck"][0] in ("failure", "error"), found
    assert "Timeout" in found["test_stuck"][1], found
    assert "--ftrace-timeout" not in found["test_stuck"][1], found
    assert result.ret == pytest.ExitCode.TESTS_FAILED
