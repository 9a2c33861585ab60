"""Native stacks of an isolated test process, written by the process itself (rust/stacks.rs).

Under --ftrace-isolate the child installs the core's handlers (install_inner before
faulthandler.enable, install_outer after it): on a fatal signal the thread that got it writes
every thread's native stack to a file the main process reads, then the signal goes on to
faulthandler and ends the process as before. For a test over its whole-test bound the main
process asks for them (request) before it ends the child.

FTRACE_NATIVE_STACKS picks where native stacks come from: unset or 1 (the core's, and gdb when
the core gave nothing and gdb is on PATH), core (the core's only), gdb (gdb's only), 0 (none).

Imported only when --ftrace-isolate is on.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os

CORE_LABEL = "pytest-ftrace core, taken in the test process"
GDB_LABEL = "gdb"


def sources() -> tuple[bool, bool]:
    """(use the core's stacks, use gdb) as FTRACE_NATIVE_STACKS says; the core's only where the
    core supports them (Linux)."""
    setting = os.environ.get("FTRACE_NATIVE_STACKS", "1").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return False, False
    return (setting != "gdb" and available()), setting != "core"


def available() -> bool:
    from pytest_ftrace import _native

    return hasattr(_native, "stacks_install")


def install(fd: int, outer: bool) -> None:
    """In the child: the core's handlers (outer: after faulthandler.enable)."""
    from pytest_ftrace import _native

    _native.stacks_install(fd, outer)


def _end() -> str:
    from pytest_ftrace import _native

    return _native.STACKS_END


def complete(fd: int) -> bool:
    """Whether the dump in the file is finished (its last line is the end mark)."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 200, max(0, size - 200)).decode("utf-8", "replace")
    return tail.rstrip("\n").endswith(_end())


class StuckDump:
    """Watches a child's dump of its stacks after a fatal signal: one that stops growing for
    STUCK_WAIT seconds is stuck (resolving symbols allocates, and the crash may have happened
    inside the allocator, with its lock held). Then the child is sent the dump signal, which
    makes the fatal signal go on (faulthandler, then the default action); `check` says True
    once even that did not end the child in STUCK_WAIT more."""

    STUCK_WAIT = 5.0

    def __init__(self) -> None:
        self.size = -1
        self.since = 0.0
        self.rescued = False

    def check(self, pid: int, fd: int) -> bool:
        import time

        size = os.fstat(fd).st_size
        if not size or complete(fd):
            self.size = -1
            return False
        now = time.monotonic()
        if size != self.size:
            self.size, self.since = size, now
            return False
        if now - self.since < self.STUCK_WAIT:
            return False
        if self.rescued:
            return True
        from pytest_ftrace import _native

        try:
            os.kill(pid, _native.stacks_signal())
        except ProcessLookupError:
            pass
        self.rescued, self.since = True, now
        return False


def request(pid: int, fd: int, wait: float) -> bool:
    """Ask the child for its stacks (the dump signal) and wait up to `wait` seconds for them;
    whether they are complete. The child is not reaped here."""
    import time

    from pytest_ftrace import _native

    try:
        os.kill(pid, _native.stacks_signal())
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait
    while not complete(fd):
        if time.monotonic() >= deadline:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return complete(fd)
        time.sleep(0.02)
    return True


def read(fd: int) -> tuple[str, bool]:
    """The stacks in the file, per thread as the gdb ones are shown ('' if none), and whether
    they have any frame."""
    from pytest_ftrace import _native

    text = os.pread(fd, 1 << 20, 0).decode("utf-8", "replace")
    text = text.removeprefix(_native.STACKS_STARTED).strip("\n")
    frames = any(line.startswith("  #") for line in text.splitlines())
    end = _end()
    if text.endswith(end):
        return text[: -len(end)].strip("\n"), frames
    if not text and not os.fstat(fd).st_size:
        return "", False
    if not frames:
        return (
            "(the test process started writing them but got stuck, and was ended: most likely "
            "it had crashed or hung inside the memory allocator, which the symbol lookup needs)"
        ), False
    return (
        text + "\n(the dump stopped before its end: the process died or hung while writing it)",
        frames,
    )
