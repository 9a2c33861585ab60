"""The --ftrace-isolate runner: each test (or module) in a forked child process.

The main process collects as usual, then runs no test itself: it forks a child (once per test,
or once per module with `--ftrace-isolate=module`, and again after a crash) and tells it which
test to run next. The child runs pytest's own runtest protocol for the test and sends each
phase's report back, serialised with pytest_report_to_serializable, as soon as it is made; the
main process logs them through the item's pytest_runtest_logreport, so the terminal, junitxml,
-x and --lf see what they would see without isolation.

When the child dies before the test is done (a signal, os._exit, a crash in an extension), the
main process reports the phase that was running as failed, with the signal, the Python stack of
every thread (faulthandler, written by the child to a file the main process reads), the output
captured so far and, under --ftrace, the seed and the round a threaded run was in (the child
writes it to memory shared with the main process); then it forks a new child for the next test.
Every thread's native stack comes from the child itself (pytest_ftrace.isolate.stacks: the
core's handlers write them on a fatal signal, or when the main process asks a child over its
whole-test bound); with gdb on PATH the child is also held at a fatal signal (see _hold), and
gdb reads them when the core gave none. The child's warnings and the plugin's own records
(tests run on one thread, GIL events, --ftrace statistics) come back with each test's last
message.
Under isolation --ftrace-timeout also bounds each test as a whole (three times the value and
WHOLE_TEST_GRACE seconds: each phase has its own bound of one timeout, which speaks first;
this one catches what those cannot interrupt): the child dumps its stacks and exits (with
native stacks on, it waits after its dump until the main process has taken them and ends it).

Imported only when --ftrace-isolate is on (see isolate.configure).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import sys

import pytest

_HEADER = 4  # bytes of a frame's length prefix


class _Closed(Exception):
    """The other side of the pipe went away."""


def _send(fd: int, message) -> None:
    import pickle

    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = len(data).to_bytes(_HEADER, "big") + data
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _read_exact(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            raise _Closed
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int):
    import pickle

    size = int.from_bytes(_read_exact(fd, _HEADER), "big")
    return pickle.loads(_read_exact(fd, size))


class _Child:
    """A forked child that runs the tests of one group, one at a time, on request."""

    def __init__(self, pid: int, commands: int, messages: int, group: list, start: int):
        self.pid = pid
        self.commands = commands  # parent writes
        self.messages = messages  # parent reads
        self.group = group
        self.start = start
        self.status: int | None = None
        self.wakeups = -1  # parent reads: signal numbers the child's signal handlers saw

    def reap(self, timeout: float) -> int:
        """Wait for the child to end (SIGKILL after timeout); its wait status."""
        if self.status is not None:
            self.close()
            return self.status
        import time

        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() >= deadline:
                import signal

                os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
                break
            time.sleep(0.005)
        self.status = status
        self.close()
        return status

    def close(self) -> None:
        """Close the pipes to the child (it sees the end of its commands and exits)."""
        for fd in (self.commands, self.messages, self.wakeups):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.commands = self.messages = self.wakeups = -1


class Isolator:
    """Runs each test in a forked child and logs the reports it sends back."""

    def __init__(self, config: pytest.Config, mode: str, only_marked: bool = False):
        # What every child needs, imported once here rather than in each child (where, without
        # cached bytecode, each import would be compiled again).
        import faulthandler  # noqa: F401
        import pickle  # noqa: F401
        import select  # noqa: F401

        from _pytest import runner as _pytest_runner  # noqa: F401

        from pytest_ftrace.stress import runner  # noqa: F401

        self.config = config
        self.mode = mode
        # Only the tests marked `forked` (pytest-forked's marker) run in a child; the others run
        # here, so the main process keeps its fixtures set up between them (see _run_marked).
        self.only_marked = only_marked
        self.main_pid = os.getpid()
        self.child: _Child | None = None
        self.groups: dict[int, tuple[list, int]] | None = None  # id(item) -> (group, position)
        self.fault_fd: int | None = None
        self.retired: list[_Child] = []  # children done with their group, not reaped yet
        self.progress = None  # shared memory: (threads, round) of the child's threaded run
        self.forks = 0
        self.crashes = 0
        self.between: list[tuple[str, str]] = []  # (next test, how) for children lost idle
        self.leaked: list[tuple[str, str, bool]] = []  # (test, thread, daemon) left in children
        # Native stacks: written by the child itself (the core's handlers, see native_stacks),
        # and with gdb on PATH a child that gets a fatal signal is held (see _hold) until they
        # are taken, by gdb if the core gave none. FTRACE_NATIVE_STACKS chooses (0: none).
        from pytest_ftrace.isolate import stacks as native_stacks

        self.core_stacks, use_gdb = native_stacks.sources()
        self.gdb = None
        if use_gdb:
            import shutil

            self.gdb = shutil.which("gdb")
        self.stacks_fd: int | None = None  # where the child's core writes its native stacks
        self.stuck = native_stacks.StuckDump()  # watches that writing, per child
        self.native: str | None = None
        self.native_source = native_stacks.GDB_LABEL
        self.held_signal: int | None = None

    # The main process -------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> str:
        if self.only_marked:
            return "ftrace: isolate=marked (each test marked forked in a forked child process)"
        return f"ftrace: isolate={self.mode} (each {self.mode} in a forked child process)"

    def _group_items(self, session: pytest.Session) -> None:
        groups: dict[int, tuple[list, int]] = {}
        current: list = []
        key = object()
        for item in session.items:
            item_key = item.path if self.mode == "module" else id(item)
            if item_key != key or not current:
                current = []
                key = item_key
            groups[id(item)] = (current, len(current))
            current.append(item)
        self.groups = groups

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        if self.only_marked:
            if item.get_closest_marker("forked") is None:
                return None  # runs here, the usual way
            where = ([item], 0)
        else:
            if self.groups is None:
                self._group_items(item.session)
            where = self.groups.get(id(item))  # type: ignore[union-attr]
        if where is None:  # an item not in session.items (another plugin runs it): one of its own
            where = ([item], 0)
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        reports, stop = self._run(item, *where)
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        if self.only_marked and stop is None:
            self._teardown_here(item, nextitem)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if stop is not None:
            self._stop_child()
            if stop[0] == "interrupt":
                raise KeyboardInterrupt(f"in {item.nodeid}, at {stop[1]} (isolated test process)")
            pytest.exit(stop[1], returncode=stop[2])
        return True

    def _teardown_here(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """After a marked test ran in a child: tear down here what this process set up for the
        tests before it and the next test does not need (as pytest's teardown of the marked
        test would have done here); an error in it is reported as the marked test's."""
        from _pytest.runner import CallInfo

        state = item.session._setupstate
        call = CallInfo.from_call(lambda: state.teardown_exact(nextitem), "teardown")
        if call.excinfo is not None:
            report = item.ihook.pytest_runtest_makereport(item=item, call=call)
            item.ihook.pytest_runtest_logreport(report=report)

    def _run(self, item: pytest.Item, group: list, position: int):
        """Run one test in the child; its reports and how the session must stop, if it must."""
        child = self.child
        if child is not None and (child.group is not group or child.status is not None):
            self._stop_child()
            child = None
        if child is not None and not self._alive(child, item):
            child = None
        import time

        _clear_progress(self.progress)
        started = time.time()
        received: list = []
        stop = None
        bound = _whole_test_bound(self.config)
        try:
            if child is None:
                child = self.child = self._fork(group, position)
            _send(child.commands, ("run", position))
            while True:
                message = self._next_message(child, bound + 30.0)
                kind = message[0]
                if kind == "report":
                    received.append(
                        self.config.hook.pytest_report_from_serializable(
                            config=self.config, data=message[1]
                        )
                    )
                elif kind == "done":
                    _merge_extras(self.config, message[1])
                    self.leaked.extend(message[1].get("leaked", ()))
                    if position == len(group) - 1:  # the child exits by itself: reap it later
                        self._retire(child)
                    break
                elif kind in ("interrupt", "exit"):
                    stop = message
                    break
                elif kind == "error":  # the child's own machinery failed: a crash, in effect
                    raise _Closed(message[1])
        except KeyboardInterrupt:
            # A terminal's Ctrl-C reaches the child too; a signal to this process alone did not.
            import signal

            try:
                os.kill(child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            self._stop_child(grace=2.0)
            raise
        except (SystemExit, pytest.exit.Exception):
            self._stop_child(grace=2.0)
            raise
        except (_Closed, OSError) as exc:
            detail = exc.args[0] if isinstance(exc, _Closed) and exc.args else None
            received.extend(self._crashed(item, child, received, started, detail))
        except BaseException as exc:  # noqa: BLE001 - reported against the test
            # Raised in this process while it waited for the child: by another plugin's signal
            # handler (pytest-timeout's SIGALRM raises Failed in whatever runs), or by this
            # module. It is about the test that is running: stop its child, with its stacks
            # dumped (faulthandler handles SIGABRT), and fail the test; the session goes on.
            if child is None:
                raise
            import signal
            import traceback

            try:
                os.kill(child.pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
            what = "".join(traceback.format_exception_only(exc)).strip()
            headline = (
                f"interrupted: {item.nodeid} was stopped during {{phase}}: the main process, "
                "waiting for its test process, got an exception (from another plugin's signal "
                f"handler, such as pytest-timeout's, or from pytest-ftrace itself): {what}"
            )
            received.extend(self._crashed(item, child, received, started, None, headline))
        return received, stop

    def _alive(self, child: _Child, item: pytest.Item) -> bool:
        """Whether a module's child, idle between tests, is still there (if not: noted)."""
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if not pid:
            return True
        child.status = status
        child.close()
        self.child = None
        self.between.append((item.nodeid, _status_name(status)))
        return False

    def _next_message(self, child: _Child, timeout: float):
        import select
        import time

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # even the child's own watchdog did not end it
                import signal

                try:
                    os.kill(child.pid, signal.SIGABRT)
                except ProcessLookupError:
                    pass
                raise _Closed(
                    f"no word from the test process in {timeout:g}s; stopped with SIGABRT"
                )
            polls = self.gdb or self.core_stacks
            wait = min(remaining, _HOLD_POLL) if polls else remaining
            watched = [child.messages] + ([child.wakeups] if child.wakeups >= 0 else [])
            ready, _, _ = select.select(watched, [], [], wait)
            if child.messages in ready:
                return _receive(child.messages)
            signalled = None
            if ready:  # a signal went to one of the child's Python-level handlers
                data = os.read(child.wakeups, 256)
                if not data:  # closed over there (the child is ending): stop watching it
                    os.close(child.wakeups)
                    child.wakeups = -1
                signalled = next((n for n in data if n in _held_numbers()), None)
            if self.core_stacks:
                self._catch_timed_out(child)
                if self.stuck.check(child.pid, self.stacks_fd):
                    import signal

                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    raise _Closed(
                        "its dump of native stacks got stuck, and the process did not end; "
                        "stopped with SIGKILL"
                    )
            if self.gdb:
                self._catch_held(child, signalled)

    def _catch_timed_out(self, child: _Child) -> None:
        """A child over its whole-test bound: faulthandler has written its Python stacks and the
        child waits (see _child_main); ask it for its native stacks, then end it."""
        if self.fault_fd is None or not os.fstat(self.fault_fd).st_size:
            return
        if not os.pread(self.fault_fd, 40, 0).lstrip().startswith(b"Timeout ("):
            return
        _settle(self.fault_fd)
        from pytest_ftrace.isolate import stacks as native_stacks

        native_stacks.request(child.pid, self.stacks_fd, wait=_STACKS_WAIT)
        if not self._core_native() and self.gdb:  # no thread could answer (signals blocked?)
            self.native = _native_stacks(self.gdb, child.pid)
            self.native_source = native_stacks.GDB_LABEL
        import signal

        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise _Closed(None)

    def _catch_held(self, child: _Child, signalled: int | None) -> None:
        """A child held after a fatal signal (see _hold): take its native stacks, then end it.

        Noticed by faulthandler's dump appearing, or by the signal reaching the holding handler
        (signalled: its number), which also covers a test that turned faulthandler off."""
        if self.fault_fd is None:
            return
        if signalled is None and not os.fstat(self.fault_fd).st_size:
            return
        # faulthandler writes its dump before the signal goes on to the holding handler: wait
        # for the dump to be complete.
        _settle(self.fault_fd)
        head = os.pread(self.fault_fd, 200, 0).decode("utf-8", "replace")
        number = _fatal_signal(head) or signalled
        if number not in _held_numbers():  # SIGABRT and the like are not held: it ends itself
            return
        from pytest_ftrace.isolate import stacks as native_stacks

        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:  # it did not wait for us
            child.status = status
            raise _Closed(None)
        if not (self.core_stacks and self._core_native()):
            self.native = _native_stacks(self.gdb, child.pid)
            self.native_source = native_stacks.GDB_LABEL
        self.held_signal = number
        import signal

        os.kill(child.pid, signal.SIGKILL)
        raise _Closed(None)

    def _core_native(self) -> bool:
        """Take the stacks the child's core wrote, if it wrote any: whether it did."""
        from pytest_ftrace.isolate import stacks as native_stacks

        if self.stacks_fd is None:
            return False
        text, frames = native_stacks.read(self.stacks_fd)
        if text:
            self.native = text
            self.native_source = native_stacks.CORE_LABEL
        return frames

    def _fork(self, group: list, position: int) -> _Child:
        import gc
        import warnings

        if self.progress is None:
            import mmap

            self.progress = mmap.mmap(-1, _PROGRESS_SIZE)  # anonymous and shared with children
        if self.fault_fd is None:
            import tempfile

            handle, path = tempfile.mkstemp(prefix="ftrace-fault-")
            os.unlink(path)
            self.fault_fd = handle
        os.ftruncate(self.fault_fd, 0)
        if self.core_stacks:
            from pytest_ftrace.isolate import stacks as native_stacks

            if self.stacks_fd is None:
                import tempfile

                handle, path = tempfile.mkstemp(prefix="ftrace-stacks-")
                os.unlink(path)
                self.stacks_fd = handle
            os.ftruncate(self.stacks_fd, 0)
            self.stuck = native_stacks.StuckDump()
        commands_r, commands_w = os.pipe()
        messages_r, messages_w = os.pipe()
        wakeups_r, wakeups_w = os.pipe() if self.gdb else (-1, -1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110
                pass
        # Keep the child's collector off the objects it inherits: a full collection there would
        # touch, and so copy, every page of the main process. (The main process unfreezes.)
        gc.freeze()
        try:
            with warnings.catch_warnings():
                # 3.12+ warns when forking with threads; the main process only waits meanwhile.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        finally:
            if os.getpid() == self.main_pid:
                gc.unfreeze()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.close(commands_w)
                os.close(messages_r)
                if wakeups_r >= 0:
                    os.close(wakeups_r)
                code = _child_main(
                    self.config,
                    group,
                    commands_r,
                    messages_w,
                    self.fault_fd,
                    self.progress,
                    hold=wakeups_w if self.gdb else None,
                    own_part=self.only_marked,
                    stacks=self.stacks_fd,
                )
            finally:
                os._exit(code)
        os.close(commands_r)
        os.close(messages_w)
        if wakeups_w >= 0:
            os.close(wakeups_w)
        self.forks += 1
        child = _Child(pid, commands_w, messages_r, group, position)
        child.wakeups = wakeups_r
        return child

    def _retire(self, child: _Child) -> None:
        child.close()
        self.child = None
        self.retired.append(child)
        self._reap_retired(block=False)

    def _reap_retired(self, block: bool) -> None:
        """Collect the children that finished their group (blocking: wait, then SIGKILL)."""
        waiting = []
        for child in self.retired:
            if block:
                child.reap(5.0)
            elif not os.waitpid(child.pid, os.WNOHANG)[0]:
                waiting.append(child)
        self.retired = waiting

    def _stop_child(self, grace: float = 5.0) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        if child.status is not None:
            child.close()
            return
        try:
            _send(child.commands, ("quit",))
        except OSError:
            pass
        child.reap(grace)

    def _crashed(
        self, item, child: _Child, received: list, started: float, detail, headline=None
    ) -> list:
        """Reports for the rest of a test whose child died: the phase running, then teardown.
        `headline`: the first line of the message instead of the crash's (with {phase})."""
        import time

        status = child.reap(5.0)
        if self.native is None and self.core_stacks:
            self._core_native()
        native, self.native = self.native, None
        if self.held_signal is not None:
            # Held, then killed by us: report the signal it got (a wait status of a process
            # killed by signal N is N).
            status, self.held_signal = self.held_signal, None
        self.child = None
        self.crashes += 1
        stopped = time.time()
        done = {report.when: report for report in received}
        setup = done.get("setup")
        if setup is None:
            phase = "setup"
        elif setup.passed and "call" not in done and not self.config.option.setuponly:
            phase = "call"
        else:
            phase = "teardown"
        faults = b""
        if self.fault_fd is not None:
            faults = os.pread(self.fault_fd, 1 << 20, 0)
        text = faults.decode("utf-8", "replace")
        message = _crash_message(
            self.config, item, status, phase, text, detail, _read_progress(self.progress)
        )
        if headline is not None:
            message = headline.format(phase=phase) + "\n" + message.partition("\n")[2]
        if native:
            message += f"\n\nNative stacks ({self.native_source}, most recent call first):\n"
            message += native
        sections = _captured_now(self.config, phase)
        from _pytest.reports import TestReport

        keywords = {name: 1 for name in item.keywords}
        properties = list(item.user_properties) + [("ftrace_crash", _status_name(status))]
        session = _ftrace_session(self.config)
        if session is not None:
            properties.append(("ftrace_seed", session.seed))
        reports = [
            TestReport(
                item.nodeid,
                item.location,
                keywords,
                "failed",
                message,
                phase,
                sections,
                stopped - started,
                started,
                stopped,
                properties,
            )
        ]
        if phase != "teardown":  # junitxml takes a test's properties from its teardown report
            reports.append(
                TestReport(
                    item.nodeid,
                    item.location,
                    keywords,
                    "passed",
                    None,
                    "teardown",
                    user_properties=properties,
                )
            )
        return reports

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self) -> None:
        self._stop_child()
        self._reap_retired(block=True)

    def pytest_unconfigure(self) -> None:
        self._stop_child(grace=1.0)
        if self.fault_fd is not None:
            os.close(self.fault_fd)
            self.fault_fd = None
        if self.stacks_fd is not None:
            os.close(self.stacks_fd)
            self.stacks_fd = None

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for nodeid, how in self.between:
            terminalreporter.line(
                f"ftrace: the test process of a module ended ({how}) between tests, before "
                f"{nodeid}: something an earlier test left running? A new one took over."
            )
        if self.leaked:
            terminalreporter.section("ftrace: leaked threads", sep="-", yellow=True)
            for nodeid, name, daemon in self.leaked:
                kind = "daemon" if daemon else "not daemon"
                terminalreporter.line(
                    f"{nodeid}: thread {name} ({kind}) was still running when the test was done"
                )
            terminalreporter.line(
                "their test process exited without waiting for them (os._exit), once its "
                f"{self.mode} was done"
            )
        if self.crashes:
            terminalreporter.section("ftrace: isolated crashes", sep="-", red=True)
            terminalreporter.line(
                f"{self.crashes} test process(es) of {self.forks} died before their test was "
                "done; each crash failed only its test (see above)"
            )


_PROGRESS_SIZE = 8


def _clear_progress(progress) -> None:
    if progress is not None:
        progress[0:_PROGRESS_SIZE] = bytes(_PROGRESS_SIZE)


def _read_progress(progress) -> tuple[int, int] | None:
    """(threads, round) of the last round a threaded run started, or None."""
    if progress is None:
        return None
    threads = int.from_bytes(progress[0:4], "little")
    if not threads:
        return None
    return threads, int.from_bytes(progress[4:8], "little")


def _progress_listener(progress):
    """In the child: the runner's round listener, writing to the shared memory."""

    def started(threads: int, iteration: int) -> None:
        if int.from_bytes(progress[4:8], "little") <= iteration:
            progress[0:8] = threads.to_bytes(4, "little") + iteration.to_bytes(4, "little")

    return started


WHOLE_TEST_GRACE = 2.0


def _whole_test_bound(config: pytest.Config) -> float:
    from pytest_ftrace.state import STATE_KEY

    state = config.stash.get(STATE_KEY, None)
    timeout = state.settings.timeout if state is not None else 300.0
    # Set-up, call and tear-down are each bounded by one timeout, and the threaded runner
    # takes a little longer than its timeout to report: this bound is only a backstop.
    return 3 * timeout + WHOLE_TEST_GRACE


def _status_name(status: int) -> str:
    if os.WIFSIGNALED(status):
        import signal

        number = os.WTERMSIG(status)
        try:
            return signal.Signals(number).name
        except ValueError:
            return f"signal {number}"
    return f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else str(status)


def _crash_message(config, item, status: int, phase: str, faults: str, detail, progress) -> str:
    lines = []
    if faults.lstrip().startswith("Timeout ("):
        bound = _whole_test_bound(config)
        lines.append(
            f"timed out: {item.nodeid} did not finish within {bound:g}s (3 x --ftrace-timeout + "
            f"{WHOLE_TEST_GRACE:g}s, "
            f"the bound on a whole test under --ftrace-isolate); stopped during {phase}"
        )
    elif os.WIFSIGNALED(status):
        import signal

        number = os.WTERMSIG(status)
        try:
            described = f"{signal.Signals(number).name} ({signal.strsignal(number)})"
        except ValueError:
            described = f"signal {number}"
        lines.append(f"crashed: the test process was killed by {described} during {phase}")
    elif os.WIFEXITED(status):
        lines.append(
            f"crashed: the test process exited with status {os.WEXITSTATUS(status)} during "
            f"{phase}, before the test was done (os._exit, or exit from native code?)"
        )
    else:
        lines.append(f"crashed: the test process ended (wait status {status}) during {phase}")
    lines.append(f"test: {item.nodeid}")
    if detail:
        lines.append(str(detail))
    if progress is not None:
        threads, iteration = progress
        lines.append(f"in the threaded run ({threads} threads), round {iteration} had started")
    session = _ftrace_session(config)
    if session is not None:
        nodeid = "'" + item.nodeid.replace("'", "'\"'\"'") + "'"
        token = session.replay
        if token is None and progress is not None:
            token = f"t{progress[0]}i{progress[1]}"
        replay = f" --ftrace-replay {token}" if token is not None else ""
        from pytest_ftrace.ftrace import session as ftrace

        mode = getattr(session, "mode", None)
        named = f" --ftrace-mode {mode}" if mode and mode != ftrace.DEFAULT_MODE else ""
        try:  # every option that shapes the schedule; the mode alone if they cannot be read
            named = session.replay_options()
        except Exception:
            pass
        lines.append(f"ftrace: seed={session.seed}" + (f" mode={mode}" if mode else ""))
        lines.append(
            f"replay: pytest {nodeid} --ftrace{named} --seed {session.seed}{replay} "
            "--ftrace-isolate"
        )
    faults = _trim_stacks(faults.strip())
    if faults:
        lines.append("")
        lines.append(
            "Python stacks when the test process ended (faulthandler, most recent call first):"
        )
        lines.append(faults)
    else:
        lines.append("(no Python stacks: the process ended without a fatal-error dump)")
    return "\n".join(lines)


_MACHINERY = ("/pluggy/", "/_pytest/", "/pytest/__main__.py", "<frozen runpy>", __file__)


def _trim_stacks(text: str) -> str:
    """faulthandler's dump without the frames of pytest, pluggy and this module."""
    lines = []
    hidden = 0
    for line in text.splitlines():
        if line.startswith("  File ") and any(part in line for part in _MACHINERY):
            hidden += 1
            continue
        if hidden:
            lines.append(f"  ... {hidden} frame(s) of pytest and pytest-ftrace hidden")
            hidden = 0
        lines.append(line)
    if hidden:
        lines.append(f"  ... {hidden} frame(s) of pytest and pytest-ftrace hidden")
    return "\n".join(lines)


def _ftrace_session(config):
    from pytest_ftrace.ftrace import session as ftrace

    return config.stash.get(ftrace.SESSION_KEY, None)


def _captured_now(config, phase: str) -> list[tuple[str, str]]:
    """What the crashed phase wrote to the captured stdout/stderr (fd capture shares the file)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None or not capman.is_globally_capturing():
        return []
    try:
        out, err = capman.read_global_capture()
    except Exception:  # noqa: BLE001 - a capture we cannot read is just not shown
        return []
    sections = []
    if out:
        sections.append((f"Captured stdout {phase}", out))
    if err:
        sections.append((f"Captured stderr {phase}", err))
    return sections


# -- what the child sends back besides reports ------------------------------------------------


def _extras_mark(config) -> tuple:
    from pytest_ftrace.state import LEAKED, STATE_KEY

    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return (0, 0, 0, 0, len(LEAKED))
    ft = state.ftrace
    return (
        len(state.single),
        len(state.gil.events),
        len(ft.stats) if ft is not None else 0,
        len(ft.replays) if ft is not None else 0,
        len(LEAKED),
    )


def _extras_since(config, mark: tuple) -> dict:
    from pytest_ftrace.state import LEAKED, STATE_KEY

    # Threads the watchdog gave up on in this test that are still running: the child's exit
    # ends them, and the main process names them in its summary.
    leaked = [
        (nodeid, thread.name, thread.daemon)
        for nodeid, thread in LEAKED[mark[4] :]
        if thread.is_alive()
    ]
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return {"leaked": leaked}
    ft = state.ftrace
    return {
        "leaked": leaked,
        "single": state.single[mark[0] :],
        "gil": state.gil.events[mark[1] :],
        "stats": ft.stats[mark[2] :] if ft is not None else [],
        "replays": ft.replays[mark[3] :] if ft is not None else [],
    }


def _warning_data(caught) -> tuple:
    """A caught warning as plain data; the category by reference when it can be pickled."""
    import pickle

    category = caught.category
    try:
        pickle.dumps(category)
    except Exception:  # noqa: BLE001 - a class defined where pickle cannot find it
        category = None
    return (str(caught.message), category, caught.category.__name__, caught.filename, caught.lineno)


def _reissue_warnings(extras: dict) -> None:
    """Issue the child's warnings here, inside pytest's recording of this test's warnings."""
    import warnings

    for message, category, name, filename, lineno in extras.get("warnings", ()):
        if category is None:
            category, message = UserWarning, f"{name}: {message}"
        try:
            warnings.warn_explicit(message, category, filename, lineno)
        except Warning:  # turned into an error here; the child already applied the filters
            pass


def _merge_extras(config, extras: dict) -> None:
    from pytest_ftrace.state import STATE_KEY

    _reissue_warnings(extras)
    state = config.stash.get(STATE_KEY, None)
    if state is None or not extras:
        return
    state.single.extend(extras.get("single", ()))
    if extras.get("gil"):
        state.gil.events.extend(extras["gil"])
    if state.ftrace is not None:
        state.ftrace.stats.extend(extras.get("stats", ()))
        state.ftrace.replays.extend(extras.get("replays", ()))


# -- the child --------------------------------------------------------------------------------


class _ChildReporter:
    """In the child: sends each phase's report to the main process as soon as it is made."""

    def __init__(self, config: pytest.Config, fd: int):
        self.config = config
        self.fd = fd

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        _send(self.fd, ("report", data))
        return report


_HOLD_POLL = 0.25  # seconds between looks at the fault file while a test runs (native stacks)
_STACKS_WAIT = 10.0  # seconds a timed-out child has to write its native stacks


def _settle(fd: int) -> None:
    """Wait (up to a second) for a file that is being written to stop growing."""
    import time

    size, settled = -1, time.monotonic() + 1.0
    while time.monotonic() < settled:
        now = os.fstat(fd).st_size
        if now == size:
            break
        size = now
        time.sleep(0.05)


_HELD_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
_FATAL_ERRORS = {
    "Segmentation fault": "SIGSEGV",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
    "Aborted": "SIGABRT",
}


def _hold(wakeups: int) -> None:
    """In the child: after faulthandler's dump, a fatal signal goes on to Python's own C-level
    handler, which only notes it and returns; the faulting instruction faults again, and so the
    thread stays where it crashed, with its native stack intact, until the main process has
    taken the stacks with gdb and killed it. (faulthandler passes the signal on to the handler
    that was there before it: this one.) The Python-level function runs only if another thread
    gets to run Python code: it waits there for the end."""
    import signal

    def wait_for_the_end(signum, frame):  # pragma: no cover - runs in a doomed process
        import time

        while True:
            time.sleep(60)

    for name in _HELD_SIGNALS:
        signal.signal(getattr(signal, name), wait_for_the_end)
    # The C-level handler also writes the signal's number here, from the faulting thread: the
    # main process learns of the crash even when faulthandler has been turned off.
    os.set_blocking(wakeups, False)
    signal.set_wakeup_fd(wakeups, warn_on_full_buffer=False)


def _wait_for_the_end() -> None:  # pragma: no cover - runs in a doomed process
    import time

    while True:
        time.sleep(60)


def _held_numbers() -> frozenset[int]:
    import signal

    return frozenset(int(getattr(signal, name)) for name in _HELD_SIGNALS)


def _fatal_signal(head: str) -> int | None:
    """The signal number that faulthandler's dump names in its first line, if any."""
    first = head.lstrip().partition("\n")[0]
    prefix = "Fatal Python error: "
    if not first.startswith(prefix):
        return None
    name = _FATAL_ERRORS.get(first[len(prefix) :].strip())
    if name is None:
        return None
    import signal

    return int(getattr(signal, name))


def _native_stacks(gdb: str, pid: int) -> str:
    """Every thread's native stack, from gdb attached to the process, trimmed for reading."""
    import subprocess

    command = [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 25"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(gdb did not give the stacks: {exc})"
    import re

    threads: list[list[str]] = []
    for line in done.stdout.splitlines():
        if re.match(r"Thread \d+ \(", line):
            threads.append([line])
        elif line.startswith("#") and threads:
            threads[-1].append("  " + _short_frame(line))
    lines = []
    for thread in threads:
        if any("faulthandler_thread" in frame for frame in thread):
            continue  # the watchdog thread of the whole-test bound
        lines.extend(("", *thread))
    if not lines:
        return f"(gdb did not give the stacks: {done.stderr.strip()[-300:]})"
    return "\n".join(lines).strip("\n")


def _short_frame(line: str) -> str:
    """'#3  0x7f.. in func (a=1, b=...) at file.c:12' -> '#3  func at file.c:12'."""
    import re

    line = re.sub(r"^(#\d+\s+)0x[0-9a-f]+ in ", r"\1", line)
    start = line.find(" (")
    if start < 0:
        return line
    depth = 0
    for index in range(start + 1, len(line)):
        if line[index] == "(":
            depth += 1
        elif line[index] == ")":
            depth -= 1
            if depth == 0:
                return line[:start] + line[index + 1 :]
    return line


def _where(exc: BaseException) -> str:
    """file:line where an exception was raised, relative to the working directory if inside."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "<unknown>"
    path = frames[-1].filename
    try:
        relative = os.path.relpath(path)
        path = path if relative.startswith("..") else relative
    except ValueError:
        pass
    return f"{path}:{frames[-1].lineno}"


def _child_main(
    config: pytest.Config,
    group: list,
    commands: int,
    messages: int,
    fault: int,
    progress,
    hold: int | None,
    own_part: bool = False,
    stacks: int | None = None,
):
    """Run the tests the main process asks for, until it says quit; the exit code.

    own_part: the main process goes on using what it had set up before the fork (it runs the
    unmarked tests itself), so the test's teardown here undoes only what was set up here.
    stacks: where the core writes native stacks (see native_stacks), or None."""
    import faulthandler
    import warnings

    from pytest_ftrace.stress import runner

    # Enabled already (pytest's faulthandler plugin): off first, so that enabling it again
    # installs its handlers, with what is there then (the holding ones) to pass signals on to.
    faulthandler.disable()
    if hold is not None:
        _hold(hold)
    if stacks is not None:
        from pytest_ftrace.isolate import stacks as native_stacks

        native_stacks.install(stacks, outer=False)
    faulthandler.enable(file=fault, all_threads=True)
    if stacks is not None:
        native_stacks.install(stacks, outer=True)
    runner.ROUND_LISTENER = _progress_listener(progress)
    config.pluginmanager.register(_ChildReporter(config, messages), "ftrace-isolate-child")
    from _pytest.runner import runtestprotocol

    if own_part:
        _teardown_own_part_only(group[0].session._setupstate)
    bound = _whole_test_bound(config)
    while True:
        try:
            command = _receive(commands)
        except _Closed:
            return 0
        if command[0] != "run":
            break
        position = command[1]
        item = group[position]
        nextitem = group[position + 1] if position + 1 < len(group) else None
        mark = _extras_mark(config)
        # With native stacks, the child waits after the dump: the main process takes them, then
        # ends it (see Isolator._catch_timed_out).
        faulthandler.dump_traceback_later(bound, exit=stacks is None, file=fault)
        caught: list = []
        try:
            # The main process records the test's warnings around its runtest protocol; here
            # they are caught (under the same filters) and sent back to be issued there again.
            with warnings.catch_warnings(record=True) as caught:
                runtestprotocol(item, nextitem=nextitem, log=False)
        except KeyboardInterrupt as exc:
            _send(messages, ("interrupt", _where(exc)))
            return 0
        except pytest.exit.Exception as exc:
            _send(messages, ("exit", exc.msg, exc.returncode))
            return 0
        except BaseException as exc:  # noqa: BLE001 - reported by the main process as a crash
            import traceback

            _send(messages, ("error", "".join(traceback.format_exception(exc))))
            return 1
        finally:
            faulthandler.cancel_dump_traceback_later()
            if stacks is not None and os.fstat(fault).st_size:
                _wait_for_the_end()  # the bound was over just as the test ended
        extras = _extras_since(config, mark)
        extras["warnings"] = [_warning_data(w) for w in caught]
        _send(messages, ("done", extras))
        if nextitem is None:  # the group is done, and torn down: nothing left to wait for
            return 0
    # Quit before the group's end (-x, or the session stopping): tear down what is set up.
    try:
        group[0].session._setupstate.teardown_exact(None)
    except BaseException:  # noqa: BLE001, S110 - nobody is left to report it to
        pass
    return 0


def _teardown_own_part_only(state) -> None:
    """Make this child's SetupState tear down only what was set up in the child: the nodes it
    pushed, and the finalizers it added to the nodes it inherited (fixtures of a wider scope
    first used by the test). The main process still holds the rest, and tears it down there.

    The child's own SetupState is changed (its teardown_exact replaced): the child is
    disposable, and runs one test."""
    inherited = {node: len(finalizers) for node, (finalizers, _) in state.stack.items()}

    def teardown_exact(nextitem) -> None:
        errors: list[BaseException] = []
        while state.stack:
            node, (finalizers, _) = next(reversed(state.stack.items()))
            keep = inherited.get(node)
            if keep is None:
                state.stack.popitem()
                keep = 0
            own = finalizers[keep:]
            del finalizers[keep:]
            for finalizer in reversed(own):
                try:
                    finalizer()
                except BaseException as exc:  # noqa: BLE001 - raised below, as pytest does
                    errors.append(exc)
            if node in inherited:
                # Nodes below it were inherited too: only their added finalizers are ours.
                for lower, (lower_finalizers, _) in reversed(list(state.stack.items())):
                    if lower is node:
                        continue
                    extra = lower_finalizers[inherited[lower] :]
                    del lower_finalizers[inherited[lower] :]
                    for finalizer in reversed(extra):
                        try:
                            finalizer()
                        except BaseException as exc:  # noqa: BLE001
                            errors.append(exc)
                break
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise BaseExceptionGroup("errors during test teardown", errors[::-1])

    state.teardown_exact = teardown_exact
