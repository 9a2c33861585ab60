"""Timed waits in exact mode next to threads the test starts and threads it does not manage:
the virtual clock ends the wait with the earliest deadline first, whatever kind of wait it is
(pytest_ftrace/ftrace/coop.py `_block`/`_patient_block`, rust/sched/core.rs)."""

from __future__ import annotations

import pytest

TAKING_TURNS = """
import threading

from pytest_ftrace import ThreadConfig, run_thread


class Holder(ThreadConfig):
    # Another thread holding a lock shared by every test thread, until the body is over.
    def __init__(self, lock):
        self.lock = lock

    def set_up_thread(self):
        self.lock.acquire()

    def tear_down_thread(self):
        self.lock.release()


SHARED = threading.Lock()


@run_thread(Holder(SHARED))
def test_helpers_take_turns():
    assert SHARED.acquire(timeout=0.1) is False


PLAIN = threading.Lock()


def test_started_threads_take_turns():
    entered = threading.Event()
    leave = threading.Event()

    def hold():
        with PLAIN:
            entered.set()
            leave.wait()

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(timeout=30), "the thread did not get the lock in 30 s"
    assert PLAIN.acquire(timeout=0.1) is False
    leave.set()
    t.join()
"""


@pytest.mark.parametrize("seed", ["1", "2207571496", "3"])
def test_threads_the_test_starts_take_turns_on_a_shared_lock_in_time(pytester, seed):
    # Each test thread starts a thread that takes a lock all of them share: those threads
    # take turns, each test thread waiting up to 30 s for its own while another one waits
    # 0.1 s for the lock. The 0.1 s waits end first, every time: a thread just started is
    # the round's, not a thread outside it, and a 30 s wait never times out before them.
    pytester.makepyfile(TAKING_TURNS)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--ftrace", "--threads", "4", "--iterations", "60",
        "--seed", seed,
    )  # fmt: skip
    out = result.stdout.str()
    assert "HelperTimeout" not in out, out
    result.assert_outcomes(passed=2)


PATIENT = """
import _thread
import threading
import time

import pytest


@pytest.fixture
def quiet_outsider():
    # A thread exact mode does not manage, waiting on a real lock until the test is over:
    # a timed wait of the test might be ended by it, so it waits for it patiently.
    gate = _thread.allocate_lock()
    gate.acquire()
    t = threading.Thread(target=gate.acquire, name="quiet-outsider", daemon=True)
    t.start()
    yield
    gate.release()
    t.join()


def test_the_shorter_wait_ends_first(quiet_outsider):
    log = []
    busy = threading.Lock()
    busy.acquire()

    def sleeper():
        time.sleep(30)
        log.append("slept 30 s")

    t = threading.Thread(target=sleeper)
    t.start()
    assert busy.acquire(timeout=0.1) is False
    log.append("gave up after 0.1 s")
    t.join()
    assert log == ["gave up after 0.1 s", "slept 30 s"]
"""


def test_a_patient_wait_times_out_before_a_longer_timed_wait(pytester):
    # While a thread outside the round is alive, a timed lock wait waits patiently (that
    # thread might end it); the 30 s sleep of another thread of the round must not end on
    # the virtual clock before the 0.1 s wait has.
    pytester.makepyfile(PATIENT)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--ftrace", "--threads", "2", "--iterations", "3",
        "--seed", "5",
    )  # fmt: skip
    result.assert_outcomes(passed=1)


OUTSIDE = """
import threading

from pytest_ftrace.ftrace import coop


def test_a_started_thread_is_not_outside_the_round():
    go = threading.Event()
    t = threading.Thread(target=go.wait)
    t.start()
    outside = coop._outside_threads(coop._CURRENT)  # attached to the core or not yet
    go.set()
    t.join()
    assert t not in outside
"""


def test_a_thread_the_test_starts_is_never_outside_the_round(pytester):
    # A thread a managed thread starts is the round's from its start, before it attached
    # to the core: a timed wait meanwhile must not take it for a thread outside the round
    # (which would make the wait patient, off the virtual clock's order).
    pytester.makepyfile(OUTSIDE)
    # a process of its own: it reads exact mode's runtime, which earlier in-process sessions
    # of this test run leave behind
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--ftrace", "--threads", "4", "--iterations", "40",
        "--seed", "7", timeout=600,
    )  # fmt: skip
    result.assert_outcomes(passed=1)
