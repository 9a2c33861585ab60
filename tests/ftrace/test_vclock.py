"""Exact mode's virtual clock and its free runs (issue 14, items 2 and 3): real pytest sessions
on small test files. Nothing here measures wall time: the tests assert on what the clocks
said inside the rounds and on what the report says about each round."""

from __future__ import annotations

import re
import time

import pytest


def exact(pytester, *args):
    return pytester.runpytest(
        "--ftrace", "--ftrace-mode", "exact", "--ftrace-timeout", "120", *args
    )


def not_exact_notes(result) -> list[str]:
    return [line for line in result.stdout.lines if "was not exact" in line]


SLEEPS = """
import time
from time import monotonic, perf_counter, perf_counter_ns, time as wall

def test_sleep_is_seen_on_every_clock(thread_index):
    before = (monotonic(), wall(), perf_counter(), time.monotonic_ns(), perf_counter_ns())
    time.sleep(0.25)
    after = (monotonic(), wall(), perf_counter(), time.monotonic_ns(), perf_counter_ns())
    assert after[0] - before[0] >= 0.25
    assert after[1] - before[1] >= 0.25
    assert after[2] - before[2] >= 0.25
    assert after[3] - before[3] >= 250_000_000
    assert after[4] - before[4] >= 250_000_000

def test_sleep_bound_at_import_is_virtual_too(thread_index):
    from time import sleep
    start = time.perf_counter()
    sleep(0.5)
    assert time.perf_counter() - start >= 0.5
"""


def test_a_sleep_is_seen_on_every_clock(pytester):
    pytester.makepyfile(SLEEPS)
    result = exact(pytester, "--seed", "1", "--threads", "3", "--iterations", "3")
    result.assert_outcomes(passed=2)
    assert not not_exact_notes(result)


TIMEOUTS = """
import threading
import time

def test_timed_waits_advance_the_clock(thread_index):
    event = threading.Event()
    cond = threading.Condition()
    lock = threading.Lock()
    start = time.monotonic()
    assert not event.wait(0.2)
    assert time.monotonic() - start >= 0.2
    start = time.monotonic()
    with cond:
        assert not cond.wait(0.3)
    assert time.monotonic() - start >= 0.3
    lock.acquire()
    start = time.perf_counter()
    assert not lock.acquire(timeout=0.4)
    assert time.perf_counter() - start >= 0.4
    lock.release()
"""


def test_a_timed_wait_that_times_out_advances_the_clock_by_its_timeout(pytester):
    pytester.makepyfile(TIMEOUTS)
    result = exact(pytester, "--seed", "2", "--threads", "2", "--iterations", "3")
    result.assert_outcomes(passed=1)
    assert not not_exact_notes(result)


WINDOW = """
import threading
import time

ROUNDS = {}
GUARD = threading.Lock()

def shared(iteration):
    with GUARD:
        return ROUNDS.setdefault(iteration, (threading.Event(), threading.Event()))

def test_window(iteration_index, thread_index):
    started, done = shared(iteration_index)
    if thread_index == 0:
        start = time.monotonic()
        started.set()
        done.wait()
        # A 10 ms window: the other thread's work took real time, not virtual time.
        assert time.monotonic() - start < 0.01
    else:
        started.wait()
        total = 0
        for i in range(3_000_000):  # ~0.1 s of real time, no virtual time
            total += i
        done.set()
"""


def test_a_short_time_window_does_not_expire_because_scheduling_took_real_time(pytester):
    pytester.makepyfile(WINDOW)
    result = exact(pytester, "--seed", "3", "--threads", "2", "--iterations", "4")
    result.assert_outcomes(passed=1)


MONOTONIC_ACROSS_ROUNDS = """
import time

SEEN = []

def test_rounds(iteration_index, thread_index):
    now = time.monotonic()
    assert now >= max(SEEN, default=0.0), "the clock went back from one round to the next"
    time.sleep(30)
    SEEN.append(time.monotonic())
"""


def test_the_clock_never_goes_back_from_round_to_round(pytester):
    pytester.makepyfile(MONOTONIC_ACROSS_ROUNDS)
    result = exact(pytester, "--seed", "4", "--threads", "2", "--iterations", "4")
    result.assert_outcomes(passed=1)


REAL_OUTSIDE = """
import threading
import time

import pytest

def sandwich():
    a = time.monotonic_ns()
    b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    c = time.monotonic_ns()
    return a <= b <= c

@pytest.fixture
def outside():
    assert sandwich()  # the fixture runs on pytest's thread, outside the rounds
    yield
    assert sandwich()

def test_clocks(outside, thread_index):
    time.sleep(100)  # the virtual clock is now well ahead of the real one
    assert not sandwich()
    seen = []
    helper = threading.Thread(target=lambda: seen.append(time.time()))
    helper.start()
    helper.join()
    assert seen[0] > time.time_ns() / 1e9 - 1e3  # started in the round: virtual time too
"""


@pytest.mark.skipif(not hasattr(time, "CLOCK_MONOTONIC"), reason="needs clock_gettime")
def test_pytest_and_threads_outside_rounds_keep_real_time(pytester):
    pytester.makepyfile(REAL_OUTSIDE)
    real = time.monotonic
    result = exact(pytester, "-p", "no:randomly", "--seed", "5", "--threads", "2")
    result.assert_outcomes(passed=1)
    assert time.monotonic is real  # the session put the real function back


def test_outside_a_session_the_stand_ins_return_what_the_real_functions_do():
    from pytest_ftrace.ftrace import vclock

    names = ("monotonic_ns", "perf_counter_ns", "time_ns")
    vclock.install()
    try:
        stand_ins = {name: getattr(time, name) for name in names}
    finally:
        vclock.uninstall()
    for name in names:
        real = getattr(time, name)
        assert stand_ins[name] is not real
        a, b, c = real(), stand_ins[name](), real()
        assert a <= b <= c, name
    assert isinstance(stand_ins["time_ns"](), int)


SOCKET_SERVER = """
import socket
import threading

def serve(listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            data = conn.recv(100)
            if data == b"stop":
                return
            conn.sendall(data.upper())

def ask(port, word):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(word)
        return conn.recv(100)

def test_echo(thread_index):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    server = threading.Thread(target=serve, args=(listener,))
    server.start()
    try:
        for word in (b"ab", b"cd", b"ef"):
            assert ask(port, word) == word.upper()
    finally:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"stop")
        server.join()
        listener.close()

def serve_forever(listener):
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

def test_daemon_server_never_stopped(thread_index):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    threading.Thread(target=serve_forever, args=(listener,), daemon=True).start()
    for word in (b"ab", b"cd"):
        assert ask(port, word) == word.upper()
"""


def test_a_socket_server_the_test_starts_is_served(pytester):
    pytester.makepyfile(SOCKET_SERVER)
    result = exact(pytester, "--seed", "6", "--threads", "2", "--iterations", "3")
    result.assert_outcomes(passed=2)
    notes = not_exact_notes(result)
    # No round was let go (the old one-second watchdog); a round that is not exact says
    # which call ran outside the scheduler.
    assert not any("ran free from there" in note for note in notes), notes
    site = re.compile(
        r"unmanaged blocking at test_a_socket_server_the_test_starts_is_served\.py:\d+ \(.+\)"
    )
    for note in notes:
        assert site.search(note), note


C_BLOCKING = """
import _thread
import os
import select
import time

# A lock the scheduler cannot see (in a tuple: no stand-in is put in for it).
REAL = (_thread.allocate_lock(),)
PIPES = {}

def test_real_lock(thread_index):
    with REAL[0]:
        time.sleep(0.001)  # a scheduling point while it is held: the other one blocks in C

def test_select(iteration_index, thread_index):
    r, w = PIPES.setdefault(iteration_index, os.pipe())
    if thread_index == 0:
        ready, _, _ = select.select([r], [], [])
        assert ready == [r]
        assert os.read(r, 1) == b"x"
    else:
        time.sleep(0.002)
        os.write(w, b"x")
"""


def test_blocking_in_c_is_handed_over_without_letting_the_round_go(pytester):
    pytester.makepyfile(C_BLOCKING)
    result = exact(pytester, "--seed", "7", "--threads", "2", "--iterations", "5")
    result.assert_outcomes(passed=2)
    notes = not_exact_notes(result)
    assert not any("ran free from there" in note for note in notes), notes
    name = "test_blocking_in_c_is_handed_over_without_letting_the_round_go.py"
    for note in notes:
        assert f"unmanaged blocking at {name}:" in note, note
        assert any(f"{name}:{line} " in note for line in (11, 17)), note


C_TIMEOUTS = """
import asyncio
import os
import select
import time

def test_poll_until_the_clock_says(thread_index):
    r, w = os.pipe()
    deadline = time.monotonic() + 0.02
    polls = 0
    while polls < 200:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        select.select([r], [], [], left)  # waits in C with a timeout: real time passes
        polls += 1
    os.close(r)
    os.close(w)
    assert polls < 200, "the wait in C took no time on the clock"

def test_asyncio_sleep(thread_index):
    async def main():
        for _ in range(3):
            await asyncio.sleep(0.02)
        return time.monotonic()

    start = time.monotonic()
    assert asyncio.run(main()) - start >= 0.06
"""


def test_real_time_waited_in_c_counts_on_the_clock(pytester):
    """A loop that waits in C with a timeout until the clock says it is time (asyncio's
    event loop does) ends: the time the thread waited in the kernel counts."""
    pytester.makepyfile(C_TIMEOUTS)
    result = exact(pytester, "--seed", "8", "--threads", "2", "--iterations", "3")
    result.assert_outcomes(passed=2)
