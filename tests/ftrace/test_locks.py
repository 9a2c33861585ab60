"""Schedulable locks from the start of an exact-mode session (pytest_ftrace/locks.py,
rust/locks.rs): primitives made anywhere (module level, class attributes, fixtures of every
scope, libraries) are scheduled, outside a round they behave as the real ones, and no user
object is changed."""

from __future__ import annotations

import sys
import threading

import pytest

from pytest_ftrace import _native

RUN = ("--ftrace", "--threads", "4", "--iterations", "20", "--ftrace-timeout", "120")


def clean(result) -> str:
    """The run's output, checked for what a correct test must never show."""
    out = result.stdout.str()
    assert "not exact" not in out, out
    assert "unmanaged blocking" not in out, out
    assert "DeadlockError" not in out, out
    assert "cannot notify" not in out, out
    return out


MODULE_LEVEL = """
import queue
import threading

JOBS = queue.Queue()
READY = threading.Event()
SLOTS = threading.BoundedSemaphore(2)
COND = threading.Condition()
STATE = {"n": 0, "turn": 0}

def test_queue_made_at_import(thread_index):
    JOBS.put(thread_index)
    got = JOBS.get(timeout=30)
    assert got in range(4)
    JOBS.task_done()

def test_event_made_at_import(thread_index):
    if thread_index == 0:
        READY.set()
    assert READY.wait(timeout=30)

def test_bounded_semaphore_made_at_import():
    with SLOTS:
        with COND:
            STATE["n"] += 1
            assert STATE["n"] <= 2
        with COND:
            STATE["n"] -= 1

def test_condition_made_at_import(thread_index, iteration_index):
    # Threads take turns in index order: each waits on the module-level condition.
    with COND:
        assert COND.wait_for(lambda: STATE["turn"] % 4 == thread_index, timeout=30)
        STATE["turn"] += 1
        COND.notify_all()
"""


def test_primitives_made_at_import_never_fail_nor_stall(pytester):
    pytester.makepyfile(MODULE_LEVEL)
    result = pytester.runpytest(*RUN, "--seed", "2")
    result.assert_outcomes(passed=4)
    clean(result)


CLASS_ATTRIBUTE = """
import threading

class Memo:
    _lock = threading.Lock()
    _value = None

    @classmethod
    def get(cls):
        if cls._value is None:
            with cls._lock:
                if cls._value is None:
                    cls._value = object()
        return cls._value

class Counter:
    lock = threading.RLock()
    n = 0

SEEN = {}

def test_double_checked_locking(iteration_index):
    SEEN.setdefault(iteration_index, set()).add(id(Memo.get()))
    assert len(SEEN[iteration_index]) == 1

def test_class_attribute_rlock():
    with Counter.lock:
        with Counter.lock:
            before = Counter.n
            Counter.n = before + 1
"""


def test_a_class_attribute_lock_is_scheduled(pytester):
    pytester.makepyfile(CLASS_ATTRIBUTE)
    result = pytester.runpytest(*RUN, "--seed", "3", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    clean(result)


FIXTURES = """
import queue
import threading

import pytest

@pytest.fixture(scope="session")
def session_lock():
    return threading.Lock()

@pytest.fixture(scope="module")
def module_queue():
    return queue.Queue()

@pytest.fixture
def function_state():
    return {"lock": threading.RLock(), "cond": threading.Condition(), "n": 0}

def test_fixture_locks(session_lock, module_queue, function_state, thread_index):
    with session_lock:
        module_queue.put(thread_index)
    assert module_queue.get(timeout=30) in range(4)
    with function_state["lock"]:
        with function_state["cond"]:
            function_state["n"] += 1
            function_state["cond"].notify_all()
"""


def test_locks_made_in_fixtures_of_every_scope_are_scheduled(pytester):
    pytester.makepyfile(FIXTURES)
    result = pytester.runpytest(*RUN, "--seed", "4")
    result.assert_outcomes(passed=1)
    clean(result)


WRONG_LOCKING = """
import threading

class Account:
    lock = threading.Lock()

    def __init__(self):
        self.balance = 0

ROUNDS = {}

def test_lock_held_for_the_read_only(iteration_index, num_parallel_threads):
    acct, done = ROUNDS.setdefault(iteration_index, (Account(), []))
    with Account.lock:
        seen = acct.balance
    acct.balance = seen + 1  # the write is outside the lock
    done.append(1)
    if len(done) == num_parallel_threads:
        assert acct.balance == num_parallel_threads, f"lost update: {acct.balance}"
"""


def test_a_racy_test_using_a_lock_wrongly_still_fails(pytester):
    pytester.makepyfile(WRONG_LOCKING)
    result = pytester.runpytest(*RUN, "--seed", "1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lost update*"])
    assert "not exact" not in result.stdout.str()


NO_SURGERY = """
import threading

LOCK = threading.Lock()
LOCK_ID = id(LOCK)

class Holder:
    cond = threading.Condition()

COND_ID = id(Holder.cond)
LOCK_OF_COND = id(Holder.cond._lock)

def test_objects_stay_the_users():
    assert id(LOCK) == LOCK_ID
    assert id(Holder.cond) == COND_ID
    assert id(Holder.cond._lock) == LOCK_OF_COND
    with LOCK:
        pass
"""


def test_the_users_objects_are_never_replaced(pytester):
    pytester.makepyfile(NO_SURGERY)
    result = pytester.runpytest("--ftrace", "--threads", "2", "--iterations", "3", "--seed", "1")
    result.assert_outcomes(passed=1)


def test_factories_are_installed_for_the_session_and_undone_after(pytester):
    before = (threading.Lock, threading.RLock, threading._allocate_lock)
    pytester.makeconftest(
        """
import threading
CONFTEST_LOCK = threading.Lock()
"""
    )
    pytester.makepyfile(
        """
import queue
import threading
import conftest

MODULE_LOCK = threading.Lock()

def test_kinds():
    kinds = {type(MODULE_LOCK).__module__, type(conftest.CONFTEST_LOCK).__module__}
    assert kinds == {"pytest_ftrace._native"}, kinds
    assert type(threading.RLock()).__module__ == "pytest_ftrace._native"
    assert type(queue.Queue().mutex).__module__ == "pytest_ftrace._native"
    assert type(threading.Condition()._lock).__module__ == "pytest_ftrace._native"
"""
    )
    result = pytester.runpytest_inprocess("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)
    assert (threading.Lock, threading.RLock, threading._allocate_lock) == before
    chaos = pytester.runpytest_inprocess("--ftrace", "--ftrace-mode", "chaos", "--seed", "1")
    chaos.assert_outcomes(failed=1)  # chaos mode keeps the real locks


# -- the native locks outside a round behave as the real ones --------------------------------


def kinds():
    return [
        pytest.param((_native.lock, threading._allocate_lock), id="Lock"),
        pytest.param((_native.RLock, threading.RLock), id="RLock"),
    ]


def outcome(call):
    try:
        return ("ok", call())
    except Exception as exc:  # noqa: BLE001 - compared with the real lock's
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("pair", kinds())
def test_native_locks_raise_what_the_real_ones_raise(pair):
    ours, real = pair
    cases = [
        lambda lk: lk.release(),
        lambda lk: lk.acquire(False, 1),
        lambda lk: lk.acquire(True, -2),
        lambda lk: lk.acquire(True, 1e300),
        lambda lk: lk.acquire("yes"),
        lambda lk: lk.acquire(True, 0),
    ]
    for case in cases:
        assert outcome(lambda case=case: case(ours())) == outcome(lambda case=case: case(real()))


@pytest.mark.parametrize("pair", kinds())
def test_native_locks_acquire_release_and_time_out_like_the_real_ones(pair):
    ours, _real = pair
    lock = ours()
    assert lock.acquire() is True
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.01)))
    t.start()
    t.join()
    assert got == [False]
    assert lock.acquire(False) is (ours is _native.RLock)  # reentrant only for RLock
    lock.release()
    if ours is _native.RLock:
        lock.release()
    with lock:
        assert "locked" in repr(lock)
    assert repr(lock).startswith("<unlocked _thread.")
    lock._at_fork_reinit()


def test_native_rlock_has_what_condition_needs():
    lock = _native.RLock()
    assert not lock._is_owned()
    lock.acquire()
    lock.acquire()
    assert lock._is_owned() and lock._recursion_count() == 2
    state = lock._release_save()
    assert state == (2, threading.get_ident())
    assert lock._recursion_count() == 0
    lock._acquire_restore(state)
    assert lock._recursion_count() == 2
    lock.release()
    lock.release()
    with pytest.raises(RuntimeError, match="cannot release un-acquired lock"):
        lock._release_save()
    cond = threading.Condition(lock)
    with cond:
        assert not cond.wait(0.001)


def test_a_lock_held_by_another_thread_is_released_from_there():
    lock = _native.lock()
    lock.acquire()
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    assert not lock.locked()


@pytest.mark.skipif(sys.version_info < (3, 13), reason="threading.Lock is a type from 3.13")
def test_isinstance_against_threading_lock_keeps_working_in_a_session(pytester):
    pytester.makepyfile(
        """
import threading
MADE = threading.Lock()

def test_isinstance():
    assert isinstance(MADE, threading.Lock)
    assert isinstance(threading.Lock(), threading.Lock)
"""
    )
    result = pytester.runpytest("--ftrace", "--seed", "1")
    result.assert_outcomes(passed=1)


# -- threads the test starts, and honest exactness ------------------------------------------------

STARTED_THREADS = """
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

POOL = ThreadPoolExecutor(2)  # made at import, shared by every round, never shut down

def test_executor_in_the_test():
    with ThreadPoolExecutor(2) as ex:
        assert sorted(ex.map(lambda x: x * 2, range(4))) == [0, 2, 4, 6]

def test_module_level_executor():
    assert POOL.submit(lambda: 7).result(timeout=30) == 7

def test_actor_left_running(thread_index):
    inbox, outbox = queue.Queue(), queue.Queue()
    def actor():
        while True:  # never stopped: blocked for good once the round is over
            outbox.put(inbox.get() + 1)
    threading.Thread(target=actor, daemon=True).start()
    inbox.put(thread_index)
    assert outbox.get() == thread_index + 1
"""


def test_threads_the_test_starts_are_scheduled_and_may_outlive_the_round(pytester):
    # In a process of its own: the threads it leaves must not outlive it here.
    pytester.makepyfile(STARTED_THREADS)
    result = pytester.runpytest_subprocess(*RUN, "--seed", "5")
    result.assert_outcomes(passed=3)
    clean(result)


SLOW_SERVER = """
import queue
import threading
import time

import pytest

@pytest.fixture
def server():
    requests = queue.Queue()
    def serve():
        while True:
            reply, n = requests.get()
            if reply is None:
                return
            time.sleep(0.3)  # longer than the scheduler waits for a wake from outside
            reply.put(n * 10)
    t = threading.Thread(target=serve, name="slow-server", daemon=True)
    t.start()
    yield requests
    requests.put((None, None))
    t.join()

def test_ask_the_server(server, thread_index):
    reply = queue.Queue()
    server.put((reply, thread_index))
    assert reply.get() == thread_index * 10
"""


def test_waiting_for_a_thread_outside_the_round_is_no_deadlock(pytester):
    # The server thread (started by a fixture) is not managed: while it works, every managed
    # thread waits, which is no deadlock; the round goes on free and says why.
    pytester.makepyfile(SLOW_SERVER)
    result = pytester.runpytest("--ftrace", "--threads", "2", "--iterations", "2", "--seed", "1")
    result.assert_outcomes(passed=1, warnings=1)
    out = result.stdout.str()
    assert "DeadlockError" not in out
    result.stdout.fnmatch_lines(["*round 0 was not exact*'slow-server'*"])


NOT_EXACT_FAILURE = """
import os
import time

PIPE = os.pipe()

def test_pipe_then_fail(thread_index):
    if thread_index == 0:
        assert os.read(PIPE[0], 1) == b"x"  # blocks in C: the round cannot stay exact
    else:
        time.sleep(0.01)
        os.write(PIPE[1], b"x")
    assert thread_index == 5, "always fails"
"""


def test_a_replay_of_a_round_that_was_not_exact_says_so_and_names_the_call(pytester):
    pytester.makepyfile(NOT_EXACT_FAILURE)
    first = pytester.runpytest("--ftrace", "--threads", "2", "--iterations", "1", "--seed", "1")
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(
        ["*round 0 was not exact (unmanaged blocking at *.py:8*): the replay line*"]
    )
    line = next(x for x in first.stdout.lines if "replay: pytest " in x)
    args = line.split("replay: pytest ", 1)[1].split()
    args = [a.strip("'") for a in args]
    again = pytester.runpytest(*args, "--ftrace-replay-runs", "2")
    again.assert_outcomes(failed=1)
    out = again.stdout.str()
    again.stdout.fnmatch_lines(
        ["*replay: reproduced in */2 runs*not an exact reproduction*unmanaged blocking at*.py:8*"]
    )
    assert "following the recorded schedule)" not in out
