"""Threads a test starts and leaves blocked for good, in runs whose locks the plugin does not
see (chaos mode, a plain --threads run): the runner asks the kernel (`stress/blocked.py`)
whether they are, as exact mode asks its own locks. Without it such a test waited for its
non-daemon threads until --ftrace-timeout (a `Hang`), while plain pytest goes on to the
fixture teardown that stops them (pykka's `ActorRegistry.stop_all()`)."""

import sys

import pytest

from pytest_ftrace.stress import blocked

RUN = ("-p", "no:cacheprovider", "--threads", "4", "--iterations", "3", "--ftrace-timeout", "60")
MODES = {
    "plain": (),
    "chaos": ("--ftrace", "--ftrace-mode", "chaos", "--seed", "1"),
}

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or blocked._futex_call() is None,
    reason="the kernel's view of a thread is read from /proc (Linux, x86_64 or aarch64)",
)

LEFT_WAITING = """
import queue
import threading

import pytest

STARTED = []


class Actor:
    def __init__(self):
        self.inbox = queue.Queue()
        self.thread = threading.Thread(target=self._loop)  # not daemon, as pykka's actors
        self.thread.start()

    def _loop(self):
        while self.inbox.get() is not None:  # no timeout: only a message ends the wait
            pass

    def stop(self):
        self.inbox.put(None)


@pytest.fixture
def stop_all():
    yield
    while True:  # each thread's teardown pops: a check, then a pop, would race
        try:
            actor = STARTED.pop()
        except IndexError:
            break
        actor.stop()
        actor.thread.join()


@pytest.mark.usefixtures("stop_all")
def test_left():
    actor = Actor()
    STARTED.append(actor)
    actor.inbox.put("hello")
"""


@linux_only
@pytest.mark.parametrize("mode", sorted(MODES))
def test_threads_left_in_an_untimed_wait_are_not_waited_for(pytester, mode):
    pytester.makepyfile(test_left=LEFT_WAITING)
    result = pytester.runpytest_subprocess(*RUN, *MODES[mode], timeout=300)
    out = result.stdout.str()
    assert "Hang" not in out and "did not finish" not in out, out
    result.assert_outcomes(passed=1)


ENDS_BY_ITSELF = """
import threading
import time

import pytest

ENDED = []


@pytest.fixture
def check():
    yield
    # the runner waited for the thread before the teardown: it ended by itself
    assert len(ENDED) == {n}, ENDED


def _timed():
    stop = threading.Event()
    for _ in range(20):
        stop.wait(0.01)  # a timed wait ends by itself: not blocked for good
    ENDED.append("timed")


def _sleeps():
    time.sleep(0.2)
    ENDED.append("slept")


@pytest.mark.usefixtures("check")
def test_waits(thread_index, iteration_index):
    if thread_index == 0 and iteration_index == 0:
        threading.Thread(target=_timed).start()
        threading.Thread(target=_sleeps).start()
"""


@linux_only
@pytest.mark.parametrize("mode", sorted(MODES))
def test_threads_in_timed_waits_or_sleeps_are_waited_for(pytester, mode):
    pytester.makepyfile(test_ends=ENDS_BY_ITSELF.format(n=2))
    result = pytester.runpytest_subprocess(*RUN, *MODES[mode], timeout=300)
    result.assert_outcomes(passed=1)


def test_only_a_futex_wait_without_a_timeout_counts():
    untimed = "202 0x7f28a8000ba0 0x189 0x0 0x0 0x0 0xffffffff 0x7f28af81ca80 0x7f28afaa3f16"
    timed = "202 0x7f28a0000ba0 0x89 0x0 0x7f28af01bb20 0x0 0xffffffff 0x7f28af01ba70 0x7f2"
    sleep = "230 0x1 0x1 0x7f28ae81ac00 0x0 0x0 0x7f28b02561f8 0x7f28ae81abc0 0x7f28afaed545"
    assert blocked._untimed_futex_wait(untimed, 202)
    assert not blocked._untimed_futex_wait(timed, 202)
    assert not blocked._untimed_futex_wait(sleep, 202)
    assert not blocked._untimed_futex_wait("running", 202)
    assert not blocked._untimed_futex_wait("", 202)
