"""Exact mode's virtual clock and free runs (issue 14, items 2 and 3).

- `install` puts the native stand-ins of `time.time`, `time.monotonic`,
  `time.perf_counter` (and their `_ns` variants) and `time.sleep` in the `time` module when a
  session with `--ftrace` is configured, before the test modules are imported, so
  `from time import monotonic` in user code gets them too; `uninstall` puts the real ones
  back when the session ends (pytester sessions nest: the outermost one restores). No user
  object is touched.
- `queue` and `threading` were imported before the plugin, and each took its own name for
  the real `monotonic` (`queue.time`, `threading._time`): the deadline of a
  `Queue.get(timeout=...)`, `Condition.wait_for`, `Semaphore.acquire(timeout=...)` or
  `Barrier.wait` is reckoned with it. Those two names get the stand-in too (and the real one
  back at the end), so such a wait in a managed thread ends in virtual time: the lock wait
  inside it times out on the virtual clock, and the loop around it reads the same clock.
- `datetime.datetime.now()` and `utcnow()` read the wall clock in C, not through
  `time.time`: `install` puts stand-ins of them on the C type itself (rust/vdatetime.rs), so
  the class stays the one class it is (`type()`, `isinstance`, pickling, `repr`, arithmetic
  unchanged) and a `from datetime import datetime` done before the plugin loaded gets them
  too. `date.today()` and `datetime.today()` call `time.time` and need nothing more.
  `time.localtime()`, `gmtime()`, `ctime()`, `asctime()` and `strftime(fmt)` with no time
  given read the real clock in C: they give whole seconds for display, and are left real.
- In a managed thread of a round they read and advance the round's one virtual clock in the
  native core (rust/clock.rs, rust/sched/core.rs), the same one the timeouts of the
  cooperative primitives use: a sleep of 0.25 s is 0.25 s on every clock, and the real time
  scheduling takes does not count. Everywhere else (other threads, pytest, outside rounds)
  they return what the real functions return.
- `name_free_run` words the reason of a round that a thread made not exact by running
  outside the schedule (it blocked in C while others were scheduled: see rust/sched/watch.rs).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import datetime
import queue
import threading
import time

# The standard library's own names for the real monotonic clock (see the module docstring).
_CLOCK_NAMES = ((queue, "time"), (threading, "_time"))


def install() -> None:
    """Put the stand-ins in `time` for this session (nested sessions count; the state lives
    in the native module, which pytester sessions do not import again)."""
    import gc

    from pytest_ftrace import _native

    _native.install_clock(time)
    real_monotonic = _native.real_clock("monotonic")
    for module, name in _CLOCK_NAMES:
        if getattr(module, name, None) is real_monotonic:
            setattr(module, name, time.monotonic)
    _native.install_datetime_clock(datetime.datetime)
    if _native.gc_event not in gc.callbacks:  # the watcher tells a collection from C
        gc.callbacks.append(_native.gc_event)


def uninstall() -> None:
    """This session ends: the last one puts the real functions back (a name someone else
    replaced meanwhile is left alone)."""
    import gc

    from pytest_ftrace import _native

    _native.uninstall_datetime_clock(datetime.datetime)
    ours = time.monotonic
    if _native.uninstall_clock(time):
        real_monotonic = _native.real_clock("monotonic")
        for module, name in _CLOCK_NAMES:
            if getattr(module, name, None) is ours and ours is not real_monotonic:
                setattr(module, name, real_monotonic)
        try:
            gc.callbacks.remove(_native.gc_event)
        except ValueError:
            pass


def real(name: str):
    """The real `time.<name>` (for the plugin's own measurements in managed threads)."""
    from pytest_ftrace import _native

    return _native.real_clock(name) or getattr(time, name)
