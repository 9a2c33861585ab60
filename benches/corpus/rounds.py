"""Shared state for the corpus, fresh in every round.

Each runner (ours, pytest-run-parallel, pytest-freethreaded) calls a test body in several
threads at once. `slot(name, factory)` gives every thread's j-th call of test `name` the same
object, made once: in a barrier-synchronised runner all threads of round j share it, so the race
is fresh in every round and no test needs to know the thread count.
"""

import threading

_local = threading.local()
_slots: dict = {}


def slot(name, factory):
    counts = _local.__dict__.setdefault("counts", {})
    index = counts.get(name, 0)
    counts[name] = index + 1
    key = (name, index)
    found = _slots.get(key)
    if found is None:
        found = _slots.setdefault(key, factory())
    return found
