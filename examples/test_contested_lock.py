"""Code that must give up when someone else holds the lock, tested with the lock really held.

`run_thread(lock)` makes another thread take `lock` and keep it for the whole `with` block;
`run_process(...)` does the same from another process. The `with` tests make their own lock, so
they also pass when pytest-ftrace runs them in several threads at once; the decorated test
shares one account between its threads, whose helpers then take turns holding it.
"""

import os
import tempfile
import threading

import pytest

from pytest_ftrace import ThreadConfig, run_process, run_thread
from pytest_ftrace.helpers import process_context

try:
    import fcntl
except ImportError:  # Windows has no flock
    fcntl = None


def try_acquire(lock, timeout):
    """Take `lock` within `timeout` seconds. True when taken (the caller must release it)."""
    return lock.acquire(timeout=timeout)


class Account:
    """A balance that `try_deposit` updates only when it can take the lock in time."""

    def __init__(self):
        self.lock = threading.Lock()
        self.balance = 0

    def try_deposit(self, amount, timeout=0.1):
        if not try_acquire(self.lock, timeout):
            return False
        try:
            self.balance += amount
            return True
        finally:
            self.lock.release()


def test_try_acquire_gives_up_while_another_thread_holds_the_lock():
    lock = threading.Lock()
    with run_thread(lock):
        assert not try_acquire(lock, timeout=0.1)
    assert try_acquire(lock, timeout=0.1)  # let go once the block is over
    lock.release()


def test_deposit_is_refused_while_the_account_is_busy():
    account = Account()
    with run_thread(account.lock):
        assert account.try_deposit(10) is False
        assert account.balance == 0
    assert account.try_deposit(10) is True
    assert account.balance == 10


class HalfwayTransfer(ThreadConfig):
    """Another thread in the middle of a transfer out of `account`: it holds the lock and has
    taken the money out, but has not yet finished."""

    def __init__(self, account, amount):
        self.account = account
        self.amount = amount

    def set_up_thread(self):
        self.account.lock.acquire()
        self.account.balance -= self.amount

    def tear_down_thread(self):
        self.account.balance += self.amount
        self.account.lock.release()


SHARED = Account()


@run_thread(HalfwayTransfer(SHARED, 50))
def test_deposit_is_refused_during_a_transfer():
    assert SHARED.try_deposit(10) is False


def test_try_acquire_gives_up_while_another_process_holds_the_lock():
    lock = process_context().Lock()  # shared with the child: from the helper's context
    with run_process(lock):
        assert not try_acquire(lock, timeout=0.1)
    assert try_acquire(lock, timeout=0.1)
    lock.release()


class FileLock:
    """An exclusive `flock` on a file; picklable, so another process can hold it."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def try_lock(self):
        """Lock without waiting: True when locked, False when someone else has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True


@pytest.mark.skipif(fcntl is None, reason="needs fcntl.flock")
def test_file_lock_is_refused_while_another_process_holds_it():
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lockfile")
        with run_process(FileLock(path)):
            assert not FileLock(path).try_lock()
        mine = FileLock(path)
        assert mine.try_lock()
        mine.__exit__(None, None, None)
