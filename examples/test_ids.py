"""Two id generators: one hands out every id once, one sometimes twice.

Run alone, both tests pass. Run with threads, the racy one hands the same id to two threads;
pytest-ftrace makes that happen on every run.
"""

import threading

import pytest


class RacyIdGenerator:
    def __init__(self):
        self.next_id = 0

    def new_id(self):
        current = self.next_id  # two threads can read the same value here...
        self.next_id = current + 1  # ...and both store current + 1
        return current


class LockedIdGenerator:
    def __init__(self):
        self.next_id = 0
        self._lock = threading.Lock()

    def new_id(self):
        with self._lock:
            current = self.next_id
            self.next_id = current + 1
            return current


@pytest.fixture(scope="module")
def racy():
    return RacyIdGenerator(), set()


@pytest.fixture(scope="module")
def locked():
    return LockedIdGenerator(), set()


def test_racy_ids_are_unique(racy):
    generator, issued = racy
    for _ in range(200):
        new = generator.new_id()
        assert new not in issued, f"id {new} was handed out twice"
        issued.add(new)


def test_locked_ids_are_unique(locked):
    generator, issued = locked
    for _ in range(200):
        new = generator.new_id()
        assert new not in issued, f"id {new} was handed out twice"
        issued.add(new)
