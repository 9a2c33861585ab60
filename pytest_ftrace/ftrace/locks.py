"""Schedulable locks from the start of an exact-mode session.

Under `--ftrace` in exact mode, `threading.Lock`, `threading.RLock` and
`threading._allocate_lock` make the native locks of `rust/locks.rs` from before the test
modules (and the code they import) are collected until the session ends: every lock made
meanwhile, wherever it is kept (module globals, class attributes, fixtures of every scope,
objects inside libraries), is one exact mode can schedule. `Condition`, `Event`,
`Semaphore`, `BoundedSemaphore`, `Barrier`, `queue.Queue` and `concurrent.futures` are pure
Python on top of those names, so theirs are too. `queue.SimpleQueue` (C, with a lock of its
own) is the standard library's pure-Python version for the same reason.

Outside a round, and in threads exact mode does not manage, the native locks behave as the
real ones (`acquire(blocking, timeout)`, `locked()`, `_is_owned`, `_release_save`,
`_acquire_restore`, `_recursion_count`, `_at_fork_reinit`, errors and messages). No object
that exists when they are installed is changed: a lock made before is a real one.

`install` and `uninstall` nest (pytester runs sessions inside a session).

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import queue
import threading

from pytest_ftrace import _native

Lock = _native.lock
RLock = _native.RLock
allocate_lock = _native.allocate_lock

_PATCHES = (
    (threading, "Lock", Lock),
    (threading, "_allocate_lock", allocate_lock),
    (threading, "RLock", RLock),
    (queue, "SimpleQueue", getattr(queue, "_PySimpleQueue", queue.SimpleQueue)),
)
_saved: list[list[tuple[object, str, object]]] = []


def install() -> None:
    """Make the threading names produce schedulable locks (until the matching uninstall)."""
    saved = []
    for owner, name, replacement in _PATCHES:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)
    _saved.append(saved)


def uninstall() -> None:
    """Undo the innermost install."""
    if not _saved:
        return
    for owner, name, original in reversed(_saved.pop()):
        setattr(owner, name, original)


def installed() -> bool:
    return bool(_saved)


def blocked_for_good(waited: list, others: list) -> bool:
    """Whether the threads a test started and left running, once its workers are done, are
    blocked for good (the stress runner's `Hooks.settled`): each one waits for a native lock
    that no release has let go on since, and those the test would wait for (`waited`, not
    daemon) wait without a timeout. None of them can wake another and the workers are done:
    only a thread outside the test can (a fixture's teardown stopping an actor), so the test
    does not wait for them, as it would not without the plugin. (In a round, the core ends
    the round the same way: a thread the test started that is blocked when the workers are
    done leaves it.)"""
    untimed = set(_native.native_waiters(True))
    waiting = set(_native.native_waiters())
    return all(t.ident in untimed for t in waited) and all(t.ident in waiting for t in others)


def patched_names() -> list[str]:
    """The names the session patches (for documentation and tests)."""
    return [f"{owner.__name__}.{name}" for owner, name, _replacement in _PATCHES]
