"""Threads that outlive a round, in exact mode (issue 14): actor-like threads serving requests
from a queue, started by the test or by a fixture, left blocked for good when the round ends;
and timed waits (a future that never completes) that end in virtual time, not real time.

Each run is given a short --ftrace-timeout: without the mechanism, these shapes hang until it
(a test waiting for its non-daemon actors, a timed wait counted in real time) or fail with a
DeadlockError (a timed wait while an actor outside the round is busy)."""

from __future__ import annotations

RUN = ("--ftrace", "--threads", "4", "--iterations", "5", "--seed", "3", "--ftrace-timeout", "60")

ACTOR = """
import queue
import threading


class Actor:
    \"\"\"Serves requests from its inbox until it is told to stop; a request with None as
    its number gets no reply.\"\"\"

    def __init__(self, daemon=None, forward=None):
        self.inbox = queue.Queue()
        self.forward = forward
        self.thread = threading.Thread(target=self._loop, daemon=daemon)
        self.thread.start()

    def _loop(self):
        while True:
            message = self.inbox.get()
            if message is None:
                return
            reply, n = message
            if n is None:
                continue
            if self.forward is not None:
                n = self.forward.ask(n)
            reply.put(n + 1)

    def ask(self, n, timeout=None):
        reply = queue.Queue()
        self.inbox.put((reply, n))
        return reply.get(timeout=timeout)

    def stop(self):
        self.inbox.put(None)
"""

STARTED_BY_THE_TEST = """
from unittest import mock

import pytest

from actor import Actor

STARTED = []


@pytest.fixture
def stop_all():
    yield
    while True:  # as pykka's ActorRegistry.stop_all: after the test, not in it
        try:  # each thread's tear-down pops (a check, then a pop, would race)
            actor = STARTED.pop()
        except IndexError:
            break
        actor.stop()


def test_actors_the_fixture_stops(stop_all, thread_index):
    # not daemon, as pykka's actors: the test must not wait for them at its end
    back = Actor()
    front = Actor(forward=back)
    STARTED.extend([front, back])
    assert front.ask(thread_index) == thread_index + 2
    assert back.ask(thread_index) == thread_index + 1


@pytest.mark.usefixtures("stop_all")  # as pykka's: torn down by pytest, after the run
def test_actor_with_a_patched_class():
    # mock.patch in a round: the test runs again on one thread (the one-thread fallback),
    # which does not wait for the actor either
    with mock.patch.object(Actor, "ask", Actor.ask):
        a = Actor()
        STARTED.append(a)
        assert a.ask(1) == 2


def test_daemon_actors_never_stopped(thread_index):
    front = Actor(daemon=True, forward=Actor(daemon=True))
    assert [front.ask(thread_index + k) for k in range(3)] == [
        thread_index + k + 2 for k in range(3)
    ]
"""


def _clean(result) -> str:
    out = result.stdout.str()
    for bad in ("not exact", "DeadlockError", "Hang", "leaked threads", "unmanaged blocking"):
        assert bad not in out, out
    return out


def test_actors_the_test_starts_are_not_waited_for_once_blocked_for_good(pytester):
    # In a process of its own: the daemon actors it leaves must not outlive it here.
    pytester.makepyfile(actor=ACTOR, test_started=STARTED_BY_THE_TEST)
    result = pytester.runpytest_subprocess(*RUN, "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=3)
    _clean(result)
    result.stdout.fnmatch_lines(["*test_actor_with_a_patched_class*mock.patch*"])


MODULE_FIXTURE = """
import queue

import pytest

from actor import Actor


@pytest.fixture(scope="module")
def actor():
    # started before any round: exact mode never schedules it
    a = Actor()
    yield a
    a.stop()
    a.thread.join()


def test_ask(actor, thread_index):
    assert actor.ask(thread_index, timeout=3600) == thread_index + 1


def test_a_request_it_drops_times_out(actor, thread_index):
    assert actor.ask(thread_index) == thread_index + 1
    # the other threads' requests may keep the actor busy when this wait starts: a wake may
    # come from it, so the wait is no deadlock; once it is idle, an hour passes virtually
    with pytest.raises(queue.Empty):
        actor.ask(None, timeout=3600)
"""


def test_an_actor_of_a_module_fixture_serves_the_rounds_and_timed_waits_end(pytester):
    pytester.makepyfile(actor=ACTOR, test_module_actor=MODULE_FIXTURE)
    result = pytester.runpytest_subprocess(*RUN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "DeadlockError" not in out, out
    assert "Hang" not in out, out


FUTURE = """
import queue
import threading
import time

import pytest


def test_a_future_that_never_completes(thread_index):
    future = queue.Queue()  # nobody ever puts a result
    with pytest.raises(queue.Empty):
        future.get(timeout=3600)


def test_timed_waits_of_the_other_primitives():
    cond = threading.Condition()
    with cond:
        assert cond.wait_for(lambda: False, timeout=3600) is False
    assert threading.Semaphore(0).acquire(timeout=3600) is False
    with pytest.raises(threading.BrokenBarrierError):
        threading.Barrier(2).wait(timeout=3600)


def test_the_wait_took_its_timeout_on_the_virtual_clock(thread_index):
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        queue.Queue().get(timeout=3600)
    assert time.monotonic() - start >= 3600
"""


def test_a_timed_wait_on_a_future_that_never_completes_ends_in_virtual_time(pytester):
    pytester.makepyfile(test_future=FUTURE)
    result = pytester.runpytest(*RUN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    _clean(result)


LEFTOVER = """
import queue
import threading
import time

import pytest


def _poll():
    while True:  # a leftover of an earlier test: a server polling its socket, say
        time.sleep(0.01)


threading.Thread(target=_poll, daemon=True).start()


def test_a_future_that_never_completes(thread_index):
    with pytest.raises(queue.Empty):
        queue.Queue().get(timeout=3600)
"""


def test_an_idle_thread_outside_the_round_does_not_make_timed_waits_real(pytester):
    # A thread nobody manages that only polls (uses next to no CPU time) cannot be what
    # ends the wait: the wait ends on the virtual clock, not after an hour of real time.
    pytester.makepyfile(test_leftover=LEFTOVER)
    result = pytester.runpytest_subprocess(*RUN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    _clean(result)
