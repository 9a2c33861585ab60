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


def patched_names() -> list[str]:
    """The names the session patches (for documentation and tests)."""
    return [f"{owner.__name__}.{name}" for owner, name, _replacement in _PATCHES]
