"""run_thread, run_process and run_task: the object is really held over there while the body
runs, let go and joined afterwards, and what goes wrong over there shows up here."""

import asyncio
import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from pytest_ftrace.helpers import (
    HelperTimeout,
    ProcessConfig,
    ProcessHelperError,
    RemoteTraceback,
    TaskConfig,
    ThreadConfig,
    process_context,
    run_process,
    run_task,
    run_thread,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def is_held(lock) -> bool:
    """True when `lock` cannot be taken here within a short while (and leaves it as it was)."""
    if lock.acquire(timeout=0.05):
        lock.release()
        return False
    return True


class Recorder:
    """A context manager that notes which thread entered and left it, and what it returned."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        self.calls.append(("enter", threading.get_ident()))
        return "entered value"

    def __exit__(self, *exc_info):
        self.calls.append(("exit", threading.get_ident()))


class FailingExit:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        raise OSError("exit broke")


class Gate(ThreadConfig):
    """A set-up (or tear-down) that waits until the test opens the gate."""

    def __init__(self, where="set-up"):
        self.where = where
        self.gate = threading.Event()
        self.calls = []

    def set_up_thread(self):
        self.calls.append("set-up")
        if self.where == "set-up":
            self.gate.wait(30)

    def tear_down_thread(self):
        self.calls.append("tear-down")
        if self.where == "tear-down":
            self.gate.wait(30)


# --- threads -------------------------------------------------------------------------------------


def test_thread_holds_the_lock_while_the_body_runs_and_lets_go_after():
    lock = threading.Lock()
    with run_thread(lock) as held:
        assert held.thread.is_alive()
        assert held.thread.ident != threading.get_ident()
        assert held.thread.daemon
        assert not lock.acquire(timeout=0.05)
        assert lock.locked()
    assert not held.thread.is_alive()  # joined
    assert lock.acquire(timeout=0.05)
    lock.release()


def test_thread_value_is_what_enter_returned_and_both_ends_ran_over_there():
    recorder = Recorder()
    with run_thread(recorder) as held:
        assert held.value == "entered value"
        assert recorder.calls == [("enter", held.thread.ident)]
    assert recorder.calls == [("enter", held.thread.ident), ("exit", held.thread.ident)]
    assert held.thread.ident != threading.get_ident()


def test_thread_decorator_holds_the_lock_on_every_call():
    lock = threading.Lock()
    seen = []

    @run_thread(lock)
    def body(x, *, y):
        """The docstring."""
        seen.append(is_held(lock))
        return x + y

    assert body(1, y=2) == 3
    assert body(3, y=4) == 7  # a fresh helper per call: the second one holds it again
    assert seen == [True, True]
    assert not is_held(lock)
    assert body.__name__ == "body"
    assert body.__doc__ == "The docstring."


MODULE_LOCK = threading.Lock()


@pytest.mark.thread_unsafe(reason="every thread would contend for MODULE_LOCK")
@run_thread(MODULE_LOCK)
def test_thread_decorator_on_a_test_keeps_its_fixtures(tmp_path):
    assert tmp_path.is_dir()
    assert is_held(MODULE_LOCK)


def test_thread_decorator_on_an_async_function():
    lock = threading.Lock()

    @run_thread(lock)
    async def body():
        await asyncio.sleep(0)
        return is_held(lock)

    assert asyncio.run(body()) is True
    assert not is_held(lock)


def test_thread_config_runs_set_up_and_tear_down_in_the_other_thread():
    where = {}

    class Config(ThreadConfig):
        def set_up_thread(self):
            where["set-up"] = threading.get_ident()
            return 42

        def tear_down_thread(self):
            where["tear-down"] = threading.get_ident()

    with run_thread(Config()) as held:
        assert held.value == 42
        assert where == {"set-up": held.thread.ident}
    assert where == {"set-up": held.thread.ident, "tear-down": held.thread.ident}
    assert held.thread.ident != threading.get_ident()


def test_thread_set_up_error_surfaces_with_its_traceback():
    class Config(ThreadConfig):
        def set_up_thread(self):
            raise ValueError("set-up broke")

    helper = run_thread(Config())
    ran = []
    with pytest.raises(ValueError, match="set-up broke") as excinfo:
        with helper:
            ran.append("body")
    assert ran == []
    text = formatted(excinfo.value)
    assert 'raise ValueError("set-up broke")' in text
    assert "in set_up_thread" in text
    assert helper.thread.name in text  # the note says where it came from
    assert not helper.thread.is_alive()


def test_thread_tear_down_error_surfaces_with_its_traceback():
    class Config(ThreadConfig):
        def tear_down_thread(self):
            raise KeyError("tear-down broke")

    ran = []
    with pytest.raises(KeyError, match="tear-down broke") as excinfo:
        with run_thread(Config()):
            ran.append("body")
    assert ran == ["body"]
    text = formatted(excinfo.value)
    assert 'raise KeyError("tear-down broke")' in text
    assert "in tear_down_thread" in text


def test_thread_exit_error_of_a_context_manager_surfaces():
    with pytest.raises(OSError, match="exit broke") as excinfo:
        with run_thread(FailingExit()):
            pass
    assert 'raise OSError("exit broke")' in formatted(excinfo.value)


def test_tear_down_error_keeps_the_body_error_as_its_context():
    with pytest.raises(OSError, match="exit broke") as excinfo:
        with run_thread(FailingExit()):
            raise LookupError("body broke")
    assert isinstance(excinfo.value.__context__, LookupError)


def test_thread_set_up_that_never_returns_times_out_and_lets_go_if_it_ever_does():
    config = Gate("set-up")
    helper = run_thread(config, timeout=0.5)
    with pytest.raises(HelperTimeout) as excinfo:
        with helper:
            pytest.fail("the body must not run")
    # Raised while the set-up was still waiting at its gate (not after it gave up by itself).
    assert not config.gate.is_set() and config.calls == ["set-up"]
    message = str(excinfo.value)
    assert "run_thread(<" in message and "Gate object" in message
    assert "set_up_thread did not return within the timeout of 0.5s" in message
    assert "self.gate.wait(30)" in message  # the stuck thread's stack
    assert isinstance(excinfo.value, TimeoutError)
    assert helper.thread.daemon and helper.thread.is_alive()
    config.gate.set()  # the set-up returns at last: the thread leaves at once
    helper.thread.join(5)
    assert not helper.thread.is_alive()
    assert config.calls == ["set-up", "tear-down"]


def test_thread_tear_down_that_never_returns_times_out():
    config = Gate("tear-down")
    helper = run_thread(config, timeout=0.5)
    with pytest.raises(HelperTimeout, match="tear_down_thread did not return within"):
        with helper:
            pass
    config.gate.set()
    helper.thread.join(5)
    assert config.calls == ["set-up", "tear-down"]


def test_one_helper_serves_one_with_block_at_a_time():
    helper = run_thread(threading.Lock())
    with helper:
        with pytest.raises(RuntimeError, match="already in use"):
            helper.__enter__()
    with helper:  # and again once it is over
        assert helper.thread.is_alive()


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="takes a context manager or a ThreadConfig"):
        run_thread(object())
    with pytest.raises(TypeError, match="takes a context manager or a ProcessConfig"):
        run_process(ThreadConfig())
    with pytest.raises(TypeError, match="TaskConfig instance, not int"):
        run_task(3)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        run_thread(threading.Lock(), timeout=0)


# --- processes -----------------------------------------------------------------------------------


class FileLock:
    """An exclusive flock on a file, as a (picklable) context manager."""

    def __init__(self, path):
        self.path = str(path)
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def own_folder(tmp_path):
    """A folder of this thread's own (tmp_path is shared when the test runs in threads)."""
    folder = tmp_path / f"thread-{threading.get_ident()}"
    folder.mkdir()
    return folder


def file_is_locked(path) -> bool:
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class PidFiles(ProcessConfig):
    def __init__(self, folder):
        self.folder = folder

    def set_up_process(self):
        (self.folder / "set-up").write_text(str(os.getpid()))

    def tear_down_process(self):
        (self.folder / "tear-down").write_text(str(os.getpid()))


class FailsInProcess(ProcessConfig):
    def __init__(self, where):
        self.where = where

    def set_up_process(self):
        if self.where == "set-up":
            raise ValueError(f"process {self.where} broke")

    def tear_down_process(self):
        if self.where == "tear-down":
            raise ValueError(f"process {self.where} broke")


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class RaisesUnpicklable(ProcessConfig):
    def set_up_process(self):
        raise Unpicklable(1, 2)


class SleepsInProcess(ProcessConfig):
    def set_up_process(self):
        time.sleep(60)


def test_process_holds_a_multiprocessing_lock_while_the_body_runs():
    lock = process_context().Lock()
    with run_process(lock) as held:
        assert held.pid is not None and held.pid != os.getpid()
        assert held.process.is_alive()
        assert not lock.acquire(timeout=0.05)
    assert held.process.exitcode == 0  # joined
    assert lock.acquire(timeout=0.05)
    lock.release()


@pytest.mark.skipif(fcntl is None, reason="needs fcntl.flock")
def test_process_holds_a_file_lock_while_the_body_runs(tmp_path):
    path = own_folder(tmp_path) / "lockfile"
    with run_process(FileLock(path)):
        assert file_is_locked(path)
    assert not file_is_locked(path)


def test_process_config_runs_set_up_and_tear_down_in_the_child(tmp_path):
    folder = own_folder(tmp_path)
    with run_process(PidFiles(folder)) as held:
        assert (folder / "set-up").read_text() == str(held.pid)
        assert not (folder / "tear-down").exists()
    assert (folder / "tear-down").read_text() == str(held.pid)
    assert held.pid != os.getpid()


def test_process_decorator_holds_the_lock_on_every_call():
    lock = process_context().Lock()

    @run_process(lock, timeout=30)
    def body():
        return is_held(lock)

    assert body() is True
    assert body() is True
    assert not is_held(lock)


@pytest.mark.parametrize("where", ["set-up", "tear-down"])
def test_process_error_surfaces_with_the_remote_traceback(where):
    helper = run_process(FailsInProcess(where))
    with pytest.raises(ValueError, match=f"process {where} broke") as excinfo:
        with helper:
            pass
    cause = excinfo.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    step = "set_up_process" if where == "set-up" else "tear_down_process"
    assert f"in {step}" in str(cause)
    assert 'raise ValueError(f"process {self.where} broke")' in str(cause)
    assert f"in process {helper.pid}" in formatted(excinfo.value)
    assert helper.process.exitcode is not None


def test_process_error_that_cannot_be_pickled_keeps_its_type_name_and_message():
    with pytest.raises(ProcessHelperError, match=r"test_helpers\.Unpicklable: 1/2") as excinfo:
        with run_process(RaisesUnpicklable()):
            pass
    assert "raise Unpicklable(1, 2)" in str(excinfo.value.__cause__)


def test_process_set_up_that_never_returns_times_out_and_is_terminated():
    helper = run_process(SleepsInProcess(), timeout=0.5)
    with pytest.raises(HelperTimeout, match=r"did not return within the timeout of 0\.5s"):
        with helper:
            pytest.fail("the body must not run")
    # Ended by a signal (terminated while its set-up slept), not by returning from it.
    assert helper.process.exitcode is not None and helper.process.exitcode < 0


def test_process_object_must_be_picklable():
    with pytest.raises(TypeError, match="pickle") as excinfo:
        with run_process(threading.Lock(), context="forkserver"):
            pass
    assert any("process_context()" in note for note in excinfo.value.__notes__)


# --- tasks ---------------------------------------------------------------------------------------


def test_task_holds_an_asyncio_lock_while_the_body_awaits():
    async def main():
        lock = asyncio.Lock()
        async with run_task(lock) as held:
            assert held.task is not asyncio.current_task()
            assert not held.task.done()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(lock.acquire(), 0.05)
            assert lock.locked()
        assert held.task.done()
        await asyncio.wait_for(lock.acquire(), 0.05)
        lock.release()

    asyncio.run(main())


def test_task_config_runs_set_up_and_tear_down_in_the_other_task():
    where = {}

    class Config(TaskConfig):
        async def set_up_task(self):
            await asyncio.sleep(0)
            where["set-up"] = asyncio.current_task()
            return "ready"

        def tear_down_task(self):  # a plain method will do as well
            where["tear-down"] = asyncio.current_task()

    async def main():
        async with run_task(Config()) as held:
            assert held.value == "ready"
            assert where == {"set-up": held.task}
        assert where == {"set-up": held.task, "tear-down": held.task}
        assert held.task is not asyncio.current_task()

    asyncio.run(main())


def test_task_decorator_and_a_plain_context_manager():
    recorder = Recorder()

    @run_task(recorder)
    async def body(x):
        return x, list(recorder.calls)

    result, calls_inside = asyncio.run(body(5))
    assert result == 5
    assert [name for name, _ in calls_inside] == ["enter"]
    assert [name for name, _ in recorder.calls] == ["enter", "exit"]


@pytest.mark.parametrize("where", ["set-up", "tear-down"])
def test_task_error_surfaces_with_its_traceback(where):
    class Config(TaskConfig):
        async def set_up_task(self):
            if where == "set-up":
                raise ValueError("task set-up broke")

        async def tear_down_task(self):
            if where == "tear-down":
                raise ValueError("task tear-down broke")

    async def main():
        async with run_task(Config()):
            pass

    with pytest.raises(ValueError, match=f"task {where} broke") as excinfo:
        asyncio.run(main())
    text = formatted(excinfo.value)
    assert f'raise ValueError("task {where} broke")' in text
    assert "in set_up_task" in text if where == "set-up" else "in tear_down_task" in text


def test_task_set_up_that_never_returns_times_out_and_is_cancelled():
    async def main():
        class Config(TaskConfig):
            async def set_up_task(self):
                await asyncio.sleep(60)  # returns, should the timeout not work: the test fails

        helper = run_task(Config(), timeout=0.5)
        with pytest.raises(HelperTimeout) as excinfo:
            async with helper:
                pytest.fail("the body must not run")
        assert helper.task.cancelled()
        return str(excinfo.value)

    message = asyncio.run(main())
    assert "set_up_task did not return within the timeout of 0.5s" in message
    assert "was cancelled" in message and "set_up_task" in message


# --- as pytest shows it --------------------------------------------------------------------------


def test_pytest_report_shows_the_line_that_failed_over_there(pytester):
    pytester.makepyfile(
        """
        from pytest_ftrace.helpers import ThreadConfig, run_thread

        class Broken(ThreadConfig):
            def set_up_thread(self):
                raise RuntimeError("cannot set up " + "here")

        def test_it():
            with run_thread(Broken()):
                pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*with run_thread(Broken()):*",
            '*raise RuntimeError("cannot set up " + "here")*',
            "E*RuntimeError: cannot set up here",
        ]
    )


@pytest.mark.skipif(sys.platform == "win32", reason="slow to spawn there")
def test_pytest_report_shows_the_remote_traceback_of_a_process(pytester):
    pytester.makepyfile(
        """
        from pytest_ftrace.helpers import ProcessConfig, run_process

        class Broken(ProcessConfig):
            def set_up_process(self):
                raise RuntimeError("cannot set up " + "there")

        def test_it():
            with run_process(Broken()):
                pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*RemoteTraceback*",
            '*raise RuntimeError("cannot set up " + "there")*',
            "*direct cause*",
            "E*RuntimeError: cannot set up there",
        ]
    )


@pytest.mark.thread_unsafe(reason="counts the process's threads")
def test_helpers_leave_no_threads_behind():
    before = set(threading.enumerate())
    with run_thread(threading.Lock()):
        pass
    with contextlib.suppress(OSError):
        with run_thread(FailingExit()):
            pass
    assert set(threading.enumerate()) == before


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_contested_lock.py"


@pytest.mark.parametrize(
    "args",
    [(), ("--threads", "2", "--iterations", "2"), ("--ftrace-isolate=module", "--threads", "2")],
    ids=["plain", "threads", "isolated"],
)
def test_contested_lock_example_passes(pytester, args):
    # The README's example: each of its tests asserts that the lock is really held over there
    # during the block and free after it, so a helper that did not hold (or did not let go)
    # fails it, as does a decorated or threaded run that shared one helper between threads.
    pytester.makepyfile(test_contested_lock=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", *args, timeout=120)
    expected = 5 if fcntl is not None else 4
    result.assert_outcomes(passed=expected, skipped=5 - expected)
    result.stdout.fnmatch_lines(
        [
            "*test_deposit_is_refused_during_a_transfer PASSED*",
            "*test_try_acquire_gives_up_while_another_process_holds_the_lock PASSED*",
        ]
    )


def test_the_package_exports_the_helpers():
    import pytest_ftrace
    from pytest_ftrace import helpers

    for name in ("run_thread", "run_process", "run_task", "ThreadConfig", "ProcessConfig"):
        assert getattr(pytest_ftrace, name) is getattr(helpers, name)
    assert pytest_ftrace.TaskConfig is helpers.TaskConfig


def test_a_set_up_that_never_returns_fails_only_its_test_in_a_threaded_session(pytester):
    # Under the stress runner each thread gets its own helper; each one's timeout ends the
    # wait, the stuck set-up is named with its stack, and the next test runs.
    pytester.makepyfile(
        test_stuck="""
        import threading
        from pytest_ftrace.helpers import ThreadConfig, run_thread

        class NeverReady(ThreadConfig):
            def set_up_thread(self):
                threading.Event().wait()

        def test_stuck():
            with run_thread(NeverReady(), timeout=0.5):
                pass

        def test_after():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--threads", "2", "--ftrace-timeout", "60", timeout=120
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*HelperTimeout: run_thread(<test_stuck.NeverReady object at *>): set_up_thread did "
            "not return within the timeout of 0.5s*",
            "*threading.Event().wait()*",
            "*(failed the same way in all 2 executions: 2 threads x 1 iteration)*",
            "FAILED test_stuck.py::test_stuck*",
        ]
    )
