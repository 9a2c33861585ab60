"""Whether the threads a test started and left running are blocked for good, read from the
kernel: the stress runner's `Hooks.settled` for runs whose locks the plugin does not see
(chaos mode, a plain `--threads` run). Exact mode asks its own native locks instead
(`ftrace/locks.py`, `blocked_for_good`).

A thread the test waits for (not daemon) counts as blocked for good when it sleeps in a
`futex` wait without a timeout: a lock, `Condition`, `Event` or `queue.Queue` wait with no
timeout (CPython waits on a semaphore: `sem_wait`, a futex wait with no timeout, on 3.12,
3.13 and the free-threaded build alike). A wait with a timeout ends by itself and a wait for
the GIL is a timed one, so neither counts. The other threads the test left (daemon) only have
to be asleep in the kernel. Each look must find every thread as the look before found it (the
same system call line, the same CPU time): the runner asks twice a poll apart, so three
identical looks are needed, and a thread that moved between them is not blocked.

Linux only (`/proc/self/task/<tid>/stat` and `syscall`); elsewhere, or when a file cannot be
read, the answer is False and the runner waits for the threads as before.

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import sys
import threading

_FUTEX = {"x86_64": 202, "aarch64": 98}


def _futex_call() -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    import platform

    return _FUTEX.get(platform.machine())


def _look(thread: threading.Thread) -> tuple[str, int, str] | None:
    """(state letter, CPU ticks, system call line) of a live thread; None: unreadable."""
    native = getattr(thread, "native_id", None)
    if not native:
        return None
    try:
        with open(f"/proc/self/task/{native}/stat") as f:
            stat = f.read()
        with open(f"/proc/self/task/{native}/syscall") as f:
            syscall = f.read().strip()
        fields = stat[stat.rindex(")") + 1 :].split()
        return fields[0], int(fields[11]) + int(fields[12]), syscall
    except (OSError, ValueError, IndexError):
        return None


def _untimed_futex_wait(syscall: str, futex: int) -> bool:
    """A `syscall` line of a futex wait with no timeout (its fourth argument is NULL)."""
    fields = syscall.split()
    try:
        return len(fields) > 4 and int(fields[0]) == futex and int(fields[4], 16) == 0
    except ValueError:
        return False


class KernelView:
    """`settled(waited, others)` for the runner: one per wait (it keeps the last look)."""

    def __init__(self) -> None:
        self._futex = _futex_call()
        self._last: dict[int, tuple[str, int, str]] | None = None

    def __call__(self, waited: list, others: list) -> bool:
        if self._futex is None:
            return False
        now: dict[int, tuple[str, int, str]] = {}
        blocked = True
        for thread in [*waited, *others]:
            seen = _look(thread)
            if seen is None:
                self._last = None
                return False
            now[id(thread)] = seen
            asleep = seen[0] in ("S", "D")
            if thread in waited:
                asleep = asleep and _untimed_futex_wait(seen[2], self._futex)
            blocked = blocked and asleep
        last, self._last = self._last, now
        return blocked and now == last
