"""The examples and command lines of the tools pytest-ftrace replaces (../shared/seeds in the
project's workspace: pytest-freethreaded, pytest-threaded, pytest-threadpool, pytest-forked as a
PyO3 project uses it, seamstress), transcribed with only the import line changed (issue 20).

Where a document's example leaves something out (`...` for arguments, an `async def` called
without being awaited), the transcription fills in the least that makes it run; each test says
what it filled in."""

import os
import sys
import textwrap

import pytest
from conftest import FREE_THREADED_BUILD, gil_enabled

RUN = ("-p", "no:cacheprovider")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*RUN, *args, timeout=180)


COUNTER = textwrap.dedent(
    """
    import os

    def count(name):
        with open(os.path.join(os.environ["SEED_OUT"], name), "a") as f:
            f.write("x")
    """
)


def counted(pytester: pytest.Pytester, name: str) -> int:
    path = pytester.path / "out" / name
    return len(path.read_text()) if path.exists() else 0


@pytest.fixture
def out(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    folder = pytester.mkdir("out")
    monkeypatch.setenv("SEED_OUT", str(folder))
    return folder


# --- pytest-freethreaded -------------------------------------------------------------------------


def test_freethreaded_marker_example(pytester):
    """The README's marker, with its own keyword `executions`."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.freethreaded(threads=10, executions=10)
        def test_my_threaded_code():
            pass
        """
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=1)


def test_freethreaded_marker_runs_threads_times_executions(pytester, out):
    pytester.makepyfile(
        COUNTER
        + textwrap.dedent(
            """
    import pytest

    @pytest.mark.freethreaded(threads=10, executions=10)
    def test_my_threaded_code(num_parallel_threads, num_iterations):
        assert (num_parallel_threads, num_iterations) == (10, 10)
        count("marked")

    def test_other():
        count("other")
    """
        )
    )
    # "Then on the command-line set the threads and executions to 1": the marker still wins.
    run(pytester, "--threads", "1", "--executions", "1").assert_outcomes(passed=2)
    assert counted(pytester, "marked") == 100
    assert counted(pytester, "other") == 1


def test_freethreaded_marker_refuses_both_spellings(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.freethreaded(threads=2, executions=2, iterations=3)
        def test_x():
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*give executions or iterations, not both*"])


def test_freethreaded_command_lines(pytester):
    pytester.makepyfile("def test_ok(): pass")
    run(pytester, "--threads", "1", "--executions", "1").assert_outcomes(passed=1)
    run(pytester, "-vvvv", "--log-level=DEBUG").assert_outcomes(passed=1)
    result = run(pytester, "--require-gil-disabled")
    if FREE_THREADED_BUILD and not gil_enabled():
        result.assert_outcomes(passed=1)
    else:  # accepted, and refuses this build
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*--require-gil-disabled: this is a GIL build*"])


def test_freethreaded_defaults_come_back_with_addopts(pytester, out):
    """pytest-freethreaded ran every test 10 threads x 20 rounds with no option; the README
    shows the addopts line that does the same here."""
    pytester.makeini("[pytest]\naddopts = --threads 10 --iterations 20\n")
    pytester.makepyfile(COUNTER + "\ndef test_each():\n    count('each')\n")
    run(pytester).assert_outcomes(passed=1)
    assert counted(pytester, "each") == 200


# --- pytest-threaded -----------------------------------------------------------------------------

THREADED_EXAMPLE = """
import pytest
from pytest_ftrace import concurrent_test, concurrent_function_fixture, generate_tests

@pytest.fixture(scope="function")
@concurrent_function_fixture
def my_fixture():
    yield {"value": 42}

@concurrent_test
def my_test(my_fixture):
    print(f"Value: {my_fixture['value']}")

generate_tests(globals())
"""


def test_threaded_example(pytester):
    pytester.makepyfile(test_usage=THREADED_EXAMPLE)
    result = run(pytester, "-v", "-rP")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["test_usage.py::test_my_test PASSED*", "*_ test_my_test _*", "*Captured stdout call*"]
    )
    result.stdout.fnmatch_lines(["Value: 42"])
    # One test selected by its id.
    result = run(pytester, "-v", "test_usage.py::test_my_test")
    result.assert_outcomes(passed=1)


def test_threaded_tests_run_concurrently_with_their_own_fixtures_and_output(pytester):
    """Three tests that each wait for the other two: they pass only if they run at the same
    time. Each gets its own function-scoped fixture value, and shows its own output."""
    pytester.makepyfile(
        test_usage="""
        import threading
        import pytest
        from pytest_ftrace import concurrent_test, concurrent_function_fixture, generate_tests

        barrier = threading.Barrier(3, timeout=60)
        seen = []

        @pytest.fixture(scope="function")
        @concurrent_function_fixture
        def my_fixture():
            value = {"value": 42}
            seen.append(value)
            yield value
            assert value["used_by"]  # torn down after its own test

        def body(name, fixture):
            assert "used_by" not in fixture  # not another test's value
            fixture["used_by"] = name
            print(f"output of {name}")
            barrier.wait()

        @concurrent_test
        def first(my_fixture):
            body("first", my_fixture)

        @concurrent_test
        def second(my_fixture):
            body("second", my_fixture)

        @concurrent_test
        def third(my_fixture):
            body("third", my_fixture)

        def test_plain():
            pass

        generate_tests(globals())

        def test_after():
            assert len(seen) == 3 and len({id(v) for v in seen}) == 3
        """
    )
    result = run(pytester, "-v", "-rP")
    result.assert_outcomes(passed=5)
    text = result.stdout.str()
    for name in ("first", "second", "third"):
        head = text.index(f"_ test_{name} _")
        section = text[head : head + 300]
        assert f"output of {name}" in section
        for other in {"first", "second", "third"} - {name}:
            assert f"output of {other}" not in section


def test_threaded_failure_is_reported_against_its_test(pytester):
    pytester.makepyfile(
        test_usage="""
        from pytest_ftrace import concurrent_test, generate_tests

        @concurrent_test
        def good():
            print("good output")

        @concurrent_test
        def bad():
            print("bad output")
            assert 1 + 1 == 3

        generate_tests(globals())
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_bad _*", "*assert (1 + 1) == 3*", "*bad output*"])
    assert "good output" not in result.stdout.str()


def test_threaded_tests_leave_parallelizable_markers_inert_without_threadpool(pytester):
    """The pool that generate_tests turns on runs only its tests concurrently: pytest-threadpool's
    markers still need --threadpool (without it a run is sequential, as that plugin says)."""
    pytester.makepyfile(
        test_usage="""
        import threading
        from pytest_ftrace import concurrent_test, generate_tests, parallelizable

        alone = threading.Barrier(2, timeout=1)

        @parallelizable("children")
        class TestMarked:
            # Run one after the other, each waits alone at the barrier and it breaks.
            def test_a(self):
                try:
                    alone.wait()
                except threading.BrokenBarrierError:
                    return
                raise AssertionError("ran concurrently with test_b")

            def test_b(self):
                try:
                    alone.wait()
                except threading.BrokenBarrierError:
                    return
                raise AssertionError("ran concurrently with test_a")

        together = threading.Barrier(2, timeout=60)

        @concurrent_test
        def first():
            together.wait()

        @concurrent_test
        def second():
            together.wait()

        generate_tests(globals())
        """
    )
    run(pytester, "-v").assert_outcomes(passed=4)


# --- pytest-threadpool ---------------------------------------------------------------------------


def test_threadpool_example(pytester):
    pytester.makepyfile(
        test_usage="""
        from pytest_ftrace import parallelizable, not_parallelizable
        import pytest
        @parallelizable("children") # all nested tests run in parallel
        class TestMyFeature:
            def test_a(self): ...
            def test_b(self): ...
        @parallelizable("parameters") # parametrized variants run in parallel
        @pytest.mark.parametrize("x", [1, 2, 3])
        def test_with_params(x): ...
        @parallelizable("all") # children + parameters combined
        class TestEverything:
            @pytest.mark.parametrize("n", [1, 2])
            def test_param(self, n): ...
            def test_plain(self): ...
        @not_parallelizable # opt out of inherited parallelism
        def test_must_be_sequential(): ...
        """
    )
    run(pytester, "--threadpool", "auto").assert_outcomes(passed=9)
    run(pytester, "--threadpool", "8").assert_outcomes(passed=9)
    run(pytester).assert_outcomes(passed=9)


def test_threadpool_shared_state_example(pytester):
    pytester.makepyfile(
        test_shared="""
        import threading
        import pytest
        class SharedState:
            lock = threading.Lock() # not pickleable
            event = threading.Event() # not pickleable
            results = {}
        @pytest.mark.parallelizable("children")
        class TestGroupA:
            def test_a1(self):
                with SharedState.lock:
                    SharedState.results["a1"] = True
            def test_a2(self):
                with SharedState.lock:
                    SharedState.results["a2"] = True
        @pytest.mark.parallelizable("children")
        class TestGroupB:
            def test_b1(self):
                SharedState.event.set()
                with SharedState.lock:
                    SharedState.results["b1"] = True
            def test_b2(self):
                assert SharedState.event.wait(timeout=10)
                with SharedState.lock:
                    SharedState.results["b2"] = True
        """
    )
    run(pytester, "--threadpool", "auto").assert_outcomes(passed=4)
    run(pytester).assert_outcomes(passed=4)


# --- pytest-forked (a PyO3 project's set-up) -----------------------------------------------------

FORKED_TESTS = """
import os

MAIN = int(os.environ["SEED_MAIN_PID"])

def test_in_a_child():
    assert os.getpid() != MAIN

def test_crash_fails_only_this_test():
    os._exit(3)
"""


@pytest.fixture
def forked_layout(pytester, monkeypatch):
    """tests/python/ as in the document; the tests know the pid of the pytest process."""
    pytester.mkdir("tests")
    pytester.mkdir("tests/python")
    (pytester.path / "tests/python/test_binding.py").write_text(FORKED_TESTS)
    return monkeypatch


def _main_pid_from(pytester, monkeypatch, args, ini: str = ""):
    # The pytest process's pid is not known before it starts: a conftest puts it in the
    # environment at configure time.
    pytester.makeconftest(
        "import os\ndef pytest_configure(config):\n"
        "    os.environ['SEED_MAIN_PID'] = str(os.getpid())\n"
    )
    if ini:
        pytester.makeini(ini)
    return run(pytester, *args)


@pytest.mark.parametrize(
    "args",
    [
        ("tests/python/", "-v", "--forked"),
        ("tests/python/", "-v", "--forked", "--forked-subprocess"),
        ("--ftrace-isolate", "tests/python/", "-v"),
        ("-v", "--ftrace-isolate", "tests/python/"),
        ("--ftrace-isolate", "module", "tests/python/"),
        ("--ftrace-isolate=module", "tests/python/"),
    ],
)
def test_forked_command_lines(pytester, forked_layout, args):
    result = _main_pid_from(pytester, forked_layout, args)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*exited with status 3 during call*"])


def test_forked_addopts(pytester, forked_layout):
    """The document's pytest.ini, its comment line included."""
    ini = "[pytest]\naddopts = \n    --forked\n    # ... other options\n"
    result = _main_pid_from(pytester, forked_layout, ("tests/python/", "-v"), ini=ini)
    result.assert_outcomes(passed=1, failed=1)


def test_forked_marker_isolates_only_the_marked_tests(pytester, out):
    """pytest-forked's marker: the marked test runs in a child, the others in the pytest
    process; fixtures the main process set up stay set up, and are torn down once, there."""
    pytester.makepyfile(
        COUNTER
        + textwrap.dedent(
            """
    import os
    import pytest

    MAIN = os.getpid()

    @pytest.fixture(scope="module")
    def resource():
        count("module set-up")
        yield
        count("module tear-down")

    def test_before(resource):
        assert os.getpid() == MAIN

    @pytest.mark.forked
    def test_marked(resource):
        assert os.getpid() != MAIN

    @pytest.mark.forked
    def test_marked_crash():
        os._exit(5)

    def test_after(resource):
        assert os.getpid() == MAIN
    """
        )
    )
    result = run(pytester, "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*exited with status 5 during call*"])
    assert counted(pytester, "module set-up") == 1
    assert counted(pytester, "module tear-down") == 1


def test_forked_marker_fixture_first_used_in_the_child_is_torn_down_there(pytester, out):
    pytester.makepyfile(
        COUNTER
        + textwrap.dedent(
            """
    import os
    import pytest

    @pytest.fixture(scope="session")
    def shared():
        count("set-up " + str(os.getpid()))
        yield
        count("tear-down " + str(os.getpid()))

    def test_plain():
        pass

    @pytest.mark.forked
    def test_marked(shared):
        pass

    def test_after(shared):
        pass
    """
        )
    )
    run(pytester).assert_outcomes(passed=3)
    names = sorted(path.name for path in (pytester.path / "out").iterdir())
    # set up and torn down in the child, then set up and torn down again in the main process
    assert len(names) == 4
    pids = {name.split()[1] for name in names}
    assert len(pids) == 2


# --- seamstress ----------------------------------------------------------------------------------

PAY_INDIVIDUAL_THREADING = """
import threading

def _pay_individual() -> None:
    # The actual implementation of pay_individual
    ...

class AlreadyPayingIndividual(Exception):
    pass

PAY_INDIVIDUAL_LOCK = threading.Lock()

def pay_individual() -> None:
    lock_acquired = PAY_INDIVIDUAL_LOCK.acquire(blocking=False)

    if not lock_acquired:
        raise AlreadyPayingIndividual

    _pay_individual()

    PAY_INDIVIDUAL_LOCK.release()
"""


def test_seamstress_thread_examples(pytester):
    """The contested-lock examples (`...` arguments left out): ThreadConfig, the decorator, a
    plain context manager, and the lock itself."""
    pytester.makepyfile(pay_individual=PAY_INDIVIDUAL_THREADING)
    pytester.makepyfile(
        test_pay_individual="""
        import types
        import unittest

        import pytest_ftrace as seamstress

        import pay_individual

        class PayIndividualLockHogger(seamstress.ThreadConfig):
            def set_up_thread(self) -> None:
                pay_individual.PAY_INDIVIDUAL_LOCK.acquire()

            def tear_down_thread(self) -> None:
                pay_individual.PAY_INDIVIDUAL_LOCK.release()

        class PlainHogger:
            def __enter__(self) -> None:
                pay_individual.PAY_INDIVIDUAL_LOCK.acquire()

            def __exit__(
                self,
                exception_type: type[BaseException] | None,
                exception_value: BaseException | None,
                exception_traceback: types.TracebackType | None,
            ) -> None:
                pay_individual.PAY_INDIVIDUAL_LOCK.release()

        class TestPayIndividual(unittest.TestCase):
            def test_raises_if_multiple_threads_try_to_pay_individuals(self) -> None:
                with seamstress.run_thread(PayIndividualLockHogger()):
                    with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                        pay_individual.pay_individual()

            @seamstress.run_thread(PayIndividualLockHogger())
            def test_decorated(self) -> None:
                with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                    pay_individual.pay_individual()

            def test_plain_context_manager(self) -> None:
                with seamstress.run_thread(PlainHogger()):
                    with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                        pay_individual.pay_individual()

            def test_the_lock_itself(self) -> None:
                with seamstress.run_thread(pay_individual.PAY_INDIVIDUAL_LOCK):
                    with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                        pay_individual.pay_individual()

            def test_free_afterwards(self) -> None:
                pay_individual.pay_individual()
        """
    )
    run(pytester).assert_outcomes(passed=5)


# multiprocessing's Lock.acquire spells the keyword `block`.
PAY_INDIVIDUAL_PROCESS = (
    PAY_INDIVIDUAL_THREADING.replace("import threading", "import multiprocessing")
    .replace("threading.Lock()", "multiprocessing.Lock()")
    .replace("acquire(blocking=False)", "acquire(block=False)")
)

PROCESS_TEST = """
import threading
import unittest

import pytest_ftrace as seamstress

import pay_individual

{extra}

class PayIndividualLockHogger(seamstress.ProcessConfig):
    def set_up_process(self) -> None:
        pay_individual.PAY_INDIVIDUAL_LOCK.acquire()

    def tear_down_process(self) -> None:
        pay_individual.PAY_INDIVIDUAL_LOCK.release()

class TestPayIndividual(unittest.TestCase):
    def test_raises_if_multiple_processes_try_to_pay_individuals(self) -> None:
        with seamstress.run_process(PayIndividualLockHogger()):
            with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                pay_individual.pay_individual()

    def test_free_afterwards(self) -> None:
        pay_individual.pay_individual()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the default on Linux")
def test_seamstress_process_example_with_a_module_level_lock(pytester):
    """ "If pay_individual used multiprocessing.Lock, the above test would be the same, but would
    use seamstress.run_process and seamstress.ProcessConfig instead." """
    pytester.makepyfile(pay_individual=PAY_INDIVIDUAL_PROCESS)
    pytester.makepyfile(test_pay_individual=PROCESS_TEST.format(extra=""))
    run(pytester).assert_outcomes(passed=2)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
@pytest.mark.parametrize("warnings", [(), ("-W", "error::DeprecationWarning")])
def test_seamstress_process_example_in_a_threaded_process_has_no_fork_warning(pytester, warnings):
    """Python 3.12+ warns when a process with threads forks; the helper's own fork is not the
    user's concern: no warning in the summary, and no failure under -W error."""
    pytester.makepyfile(pay_individual=PAY_INDIVIDUAL_PROCESS)
    extra = (
        "stop = threading.Event()\n"
        "threading.Thread(target=stop.wait, daemon=True).start()  # a second thread"
    )
    pytester.makepyfile(test_pay_individual=PROCESS_TEST.format(extra=extra))
    result = run(pytester, *warnings)
    result.assert_outcomes(passed=2)
    assert "DeprecationWarning" not in result.stdout.str()
    assert "warnings summary" not in result.stdout.str()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the default on Linux")
@pytest.mark.parametrize("mode", ["exact", "chaos"])
def test_seamstress_process_example_under_ftrace(pytester, mode):
    """The forked child leaves --ftrace's hooks behind: its scheduler would wait there for the
    threads of the round, which the child does not have."""
    pytester.makepyfile(pay_individual=PAY_INDIVIDUAL_PROCESS)
    pytester.makepyfile(test_pay_individual=PROCESS_TEST.format(extra=""))
    args = ("--ftrace", "--ftrace-mode", mode, "--threads", "2", "--iterations", "2")
    include = ("--ftrace-include", "pay_individual", "--ftrace-include", "test_pay_individual")
    # (Only the test that holds the lock: two threads calling pay_individual at once make it
    # raise, as it is written to.)
    result = run(pytester, *args, *include, "--ftrace-timeout", "120", "-k", "raises")
    result.assert_outcomes(passed=1)


def test_seamstress_process_explicit_context_still_works(pytester):
    pytester.makepyfile(
        test_ctx="""
        import pytest_ftrace as seamstress
        from pytest_ftrace.helpers import process_context

        def test_forkserver_or_spawn():
            method = "forkserver" if "forkserver" in __import__(
                "multiprocessing").get_all_start_methods() else "spawn"
            lock = process_context(method).Lock()
            with seamstress.run_process(lock, context=method) as held:
                assert held.process is not None
                assert not lock.acquire(timeout=0.05)
            assert lock.acquire(timeout=5)
        """
    )
    run(pytester).assert_outcomes(passed=1)


PAY_INDIVIDUAL_ASYNC = """
import asyncio

async def _pay_individual() -> None:
    # The actual implementation of pay_individual
    ...

class AlreadyPayingIndividual(Exception):
    pass

PAY_INDIVIDUAL_LOCK = asyncio.Lock()

async def pay_individual() -> None:
    try:
        async with asyncio.timeout(0.1):
            await PAY_INDIVIDUAL_LOCK.acquire()
    except asyncio.TimeoutError as e:
        raise AlreadyPayingIndividual from e

    await _pay_individual()

    PAY_INDIVIDUAL_LOCK.release()
"""


def test_seamstress_task_example_in_a_plain_with(pytester):
    """The run_task example: a synchronous test method enters run_task with `with`. (The
    document calls the async pay_individual without running it, which cannot raise: the
    transcription runs it with asyncio.run.)"""
    pytester.makepyfile(pay_individual=PAY_INDIVIDUAL_ASYNC)
    pytester.makepyfile(
        test_pay_individual="""
        import asyncio
        import unittest

        import pytest_ftrace as seamstress

        import pay_individual

        class PayIndividualLockHogger(seamstress.TaskConfig):
            async def set_up_task(self) -> None:
                await pay_individual.PAY_INDIVIDUAL_LOCK.acquire()

            async def tear_down_task(self) -> None:
                pay_individual.PAY_INDIVIDUAL_LOCK.release()

        class TestPayIndividual(unittest.IsolatedAsyncioTestCase):
            def test_raises_if_multiple_tasks_try_to_pay_individuals(self) -> None:
                with seamstress.run_task(PayIndividualLockHogger()):
                    with self.assertRaises(pay_individual.AlreadyPayingIndividual):
                        asyncio.run(pay_individual.pay_individual())

            def test_free_afterwards(self) -> None:
                asyncio.run(pay_individual.pay_individual())

            async def test_async_with_still_works(self) -> None:
                async with seamstress.run_task(PayIndividualLockHogger()):
                    assert pay_individual.PAY_INDIVIDUAL_LOCK.locked()
                assert not pay_individual.PAY_INDIVIDUAL_LOCK.locked()
        """
    )
    run(pytester, "-W", "error::RuntimeWarning").assert_outcomes(passed=3)


def test_seamstress_task_plain_with_inside_a_running_loop_says_async_with(pytester):
    pytester.makepyfile(
        test_loop="""
        import asyncio
        import pytest
        import pytest_ftrace as seamstress

        def test_inside_a_loop():
            async def main():
                with pytest.raises(RuntimeError, match="use `async with`"):
                    with seamstress.run_task(asyncio.Lock()):
                        pass
            asyncio.run(main())

        def test_decorated_plain_function():
            lock = asyncio.Lock()

            @seamstress.run_task(lock)
            def body():
                return lock.locked()

            assert body() is True
            assert not lock.locked()
        """
    )
    run(pytester).assert_outcomes(passed=2)


@pytest.mark.slow
def test_forked_stays_pytest_forked_while_it_is_installed(pytester, tmp_path):
    """With pytest-forked installed, --forked and the forked marker are its own: both plugins
    load, and our isolation takes no part in its runs."""
    import subprocess

    from test_compat import make_peer_venv

    python = make_peer_venv(tmp_path, "pytest-forked==1.6.0", "py==1.11.0")  # it needs py.process
    pytester.makepyfile(
        test_forked="""
        import os
        import pytest

        MAIN = os.getpid()

        @pytest.mark.forked
        def test_marked():
            assert os.getpid() != MAIN

        def test_plain():
            pass
        """
    )

    def pytest_in_venv(*args):
        return subprocess.run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    helped = pytest_in_venv("--help")
    assert helped.returncode == 0, helped.stderr
    assert "--ftrace-forked" in helped.stdout and "--forked " in helped.stdout
    # (pytest-forked 1.6.0 cannot send its reports back under pytest 9: its forked test fails
    # the same way without our plugin. What counts here is that ours takes no part.)
    for args in ((), ("--forked",)):
        done = pytest_in_venv(*args)
        alone = pytest_in_venv("-p", "no:ftrace", *args)
        assert "ftrace: isolate" not in done.stdout
        assert done.returncode == alone.returncode, done.stdout + done.stderr
        assert (
            done.stdout.splitlines()[-1].split(" in ")[0]
            == (alone.stdout.splitlines()[-1].split(" in ")[0])
        )
    # Ours is still there under its own name.
    done = pytest_in_venv("--ftrace-forked")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ftrace: isolate=test" in done.stdout
