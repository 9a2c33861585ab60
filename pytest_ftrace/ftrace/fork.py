"""Forked rounds (exact mode, `--ftrace-rounds fork` and `fork-each`; the default, `snapshot`,
uses the same children after a round that changed the module state: snapshot.py): every round
of a test, every replay run and every shrink attempt runs in a child process forked at the
start of the test's call phase, so each one starts from the test's starting state. A
first-fill race (a module-level cache filled on first use) then gets every round, not only the
first; a replay starts from the state the original round had.

The parent process never runs the test's body in the call phase: it forks a child, which runs
rounds in one threaded run (its workers and their fixtures live for all its rounds, as in one
process) and, as each round ends, sends that round's results through a pipe; the child goes on
to the next round only while the round left the project's module state as it found it
(fingerprint.py), so a test that keeps no state pays one fork, and a round that changed the
state ends its child: the next round starts in a new one (--ftrace-rounds fork-each: always).
The parent merges what the children send back (plain data) into the run's Outcome and the
mode's records, so that the report, the lanes, shrinking and the replay line are as they are
for rounds run in this process:

- the failures, each exception pickled (by reference to its class) with the frames the report
  shows; in the parent it gets a traceback again, made of stand-in frames with the original
  file, line, function name and first line, so pytest and the report print what they would;
- exact mode's round record (decisions, steps, exactness), the steps as text, the step at
  which each thread's body ended, the threads the test started, blocking waits, unmanaged
  blocking and the plugin's own errors;
- the statistics counters and the round's duration;
- the round's happens-before conflicts (--ftrace-races: explanations, the 'data races'
  section, --ftrace-races fail), each access's code object marshalled;
- the budget's state (rounds by budget: its start, rounds, why it stopped and its "anything
  shared?" signal, taken as the child's last round ends); the next child goes on from it;
- what the scheduler learned from the rounds (the longest round's steps, `handoff`): the next
  child's rounds are made with it, as the same rounds in one process would be;
- the round's output: what went to a stream pytest captures in memory (--capture=sys,
  tee-sys) and the log records pytest's logging plugin caught; output to a file descriptor
  (the default --capture=fd, or none) is written by the child itself.

Rounds run in this process instead (as before) when fork cannot be used safely or would change
what the test sees: no os.fork; under --ftrace-isolate (the test is in a child already);
chaos mode; another thread of the process is running (a fixture's server thread would not be
in the child); a thread is still inside the native core.

A child is one fork of the parent, which never runs rounds itself: gc is frozen around the fork
on a build with the GIL so that the child's collections do not copy every page it inherited
(not on a free-threaded build, where that costs more than it saves: `ready_to_fork`), the
records it inherited are kept alive there (freeing them would write to their pages), and the
child ends with os._exit (no atexit handlers, no finalization, threads it leaves are gone with
it).

Explore mode's executions are rounds like these: the mode's state (its search tree,
`forked_state`) goes to the child with the request and comes back with each message, so the
tree the parent keeps is the one the next execution starts from (modes/explore.py).

`in_child(work, timeout)` (one call in a child, its result back) and `in_child_stream` (messages
as the child goes) are the building blocks for anything else that must start from the test's
starting state (a shrink attempt here).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import TestSession
    from pytest_ftrace.report import Failure, Outcome
    from pytest_ftrace.stress.runner import ThreadedRun

# How much longer than the run's own timeout the parent waits for a child to answer (the
# child's supervisor reports a hang itself; this is a backstop for a child stuck in C).
GRACE_SECONDS = 30.0


class RoundCrashed(Exception):
    """A forked round's process ended without sending its results (a crash in C, os._exit,
    a signal), or did not answer in time."""


class ChildError(Exception):
    """The plugin's own machinery failed in a forked round's process (its traceback text)."""


def rounds_setting(config, mode: str | None = None) -> str:
    """--ftrace-rounds (ini ftrace_rounds): snapshot, fork, fork-each or process (the default,
    options.DEFAULT_ROUNDS, is snapshot in exact and explore mode: every round and execution
    starts from the test's starting state, at the cost of one idle fork per test while they
    keep the module state, and none for a test whose rounds cannot change it: settled.py)."""
    import pytest

    from pytest_ftrace import options

    value = config.option.ftrace_rounds
    if value is None:
        raw = str(options.ini_value(config, "ftrace_rounds") or "").strip()
        if raw and raw not in options.ROUNDS_WHERE:
            raise pytest.UsageError(
                f"ini key ftrace_rounds: snapshot, fork, fork-each or process, not {raw!r}"
            )
        value = raw or ("snapshot" if mode == "explore" else options.DEFAULT_ROUNDS)
    return value


def reason_not_to_fork(item, test: TestSession) -> str | None:
    """Why this test's rounds run in this process, or None: they are forked."""
    if test.session.rounds == "process":
        return "--ftrace-rounds process"
    if not hasattr(os, "fork"):
        return "os.fork is not available"
    if test.mode not in ("exact", "explore"):
        return "chaos mode runs its rounds in this process"
    from pytest_ftrace.stress import runner

    if runner.ROUND_LISTENER is not None:
        return "the test runs in an --ftrace-isolate child already"
    from pytest_ftrace import _native

    if _native.threads_inside():
        return "a thread of an earlier test is still inside the native core"
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        names = ", ".join(t.name for t in others[:3]) + (", ..." if len(others) > 3 else "")
        return f"other threads are running ({names}): a forked round would not have them"
    return None


_CHOSEN = (
    "--ftrace-rounds process",
    "chaos mode runs its rounds in this process",
)


def note_in_process(outcome: Outcome, reason: str) -> None:
    """Say, with a failure, that exact mode's rounds ran in this process when fork was meant."""
    if reason not in _CHOSEN:
        outcome.notes.append(
            f"ftrace: the rounds ran in this process ({reason}), so each round saw the state "
            "the rounds before it left"
        )


# -- exceptions as data ---------------------------------------------------------------------------


def pack_exc(exc: BaseException, depth: int = 0) -> dict:
    """`exc` as plain data: pickled (or its type's name and message when it cannot be), the
    frames the report shows, and its cause or context (a few levels)."""
    import pickle

    from pytest_ftrace.report import _hidden

    try:
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # noqa: S301 - our own data, checked to come back here
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its name and text
        blob = None
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        if not _hidden(tb):
            code = tb.tb_frame.f_code
            frames.append(
                (
                    code.co_filename,
                    tb.tb_lineno,
                    code.co_name,
                    code.co_qualname,
                    code.co_firstlineno,
                    _positions(code, tb.tb_lasti),
                )
            )
        tb = tb.tb_next
    cls = type(exc)
    data = {
        "pickled": blob,
        "module": cls.__module__,
        "qualname": cls.__qualname__,
        "base": "exception" if isinstance(exc, Exception) else "base",
        "text": _text(exc),
        "notes": list(getattr(exc, "__notes__", ()) or ()),
        "frames": frames,
        "cause": None,
        "context": None,
        "suppress": exc.__suppress_context__,
    }
    if depth < 5:
        if exc.__cause__ is not None:
            data["cause"] = pack_exc(exc.__cause__, depth + 1)
        elif exc.__context__ is not None and not exc.__suppress_context__:
            data["context"] = pack_exc(exc.__context__, depth + 1)
    return data


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<{type(exc).__name__}: str() failed>"


_STAND_INS: dict[tuple[str, str, str], type] = {}


def unpack_exc(data: dict) -> BaseException:
    """The exception `pack_exc` described, with a traceback of stand-in frames."""
    import pickle

    exc = None
    if data["pickled"] is not None:
        try:
            exc = pickle.loads(data["pickled"])  # noqa: S301 - sent by our own child
        except Exception:  # noqa: BLE001 - its class is gone here: a stand-in below
            exc = None
    if not isinstance(exc, BaseException):
        key = (data["module"], data["qualname"], data["base"])
        cls = _STAND_INS.get(key)
        if cls is None:
            base = Exception if data["base"] == "exception" else BaseException
            cls = type(data["qualname"].rpartition(".")[2], (base,), {})
            cls.__module__, cls.__qualname__ = data["module"], data["qualname"]
            _STAND_INS[key] = cls
        exc = cls(data["text"])
        if data["notes"]:
            exc.__notes__ = list(data["notes"])
    if data["cause"] is not None:
        exc.__cause__ = unpack_exc(data["cause"])
    elif data["context"] is not None:
        exc.__context__ = unpack_exc(data["context"])
    exc.__suppress_context__ = data["suppress"]
    return exc.with_traceback(_traceback(data["frames"]))


class _Raise(BaseException):  # noqa: N818 - raised only to make a frame
    pass


def _positions(code, lasti: int):
    """(line, end line, column, end column) of the instruction at `lasti`, or None."""
    try:
        return next(iter(list(code.co_positions())[lasti // 2 :]), None)
    except Exception:  # noqa: BLE001
        return None


def _traceback(frames: list[tuple]):
    tb = None
    for frame in reversed(frames):
        try:
            tb = _stand_in_frame(*frame, tb)
        except Exception:  # noqa: BLE001, S112 - a frame we cannot stand in for is left out
            continue
    return tb


def _raise(*_args):
    raise _Raise


def _stand_in_frame(filename, lineno, name, qualname, first, positions, tb_next):
    """A traceback entry whose frame runs code of `filename` (so its source is read from
    there), at `lineno`, in a function `name` that starts at line `first`, its instruction at
    the same columns as the original one (pytest underlines them)."""
    import types

    lineno = max(1, lineno)
    first = max(1, min(first, lineno))
    _line, end_line, column, end_column = positions or (None, None, None, None)
    span = None
    if end_line == lineno and column is not None and end_column is not None:
        span = end_column - column
    if span is not None and span >= 4:
        expression = "_e(" + " " * (span - 4) + ")"  # a call as wide as the original
    elif span is not None and span >= 1:
        expression = ("u", "_u", "_uu")[span - 1]  # an unknown name: a NameError
    else:
        expression = "_e(\n)"  # over two lines: nothing to underline
    module_level = name == "<module>"
    if module_level:
        source = "\n" * (lineno - 1) + expression + "\n"
    elif lineno == first:
        source = "\n" * (first - 1) + "def _f(): " + expression + "\n"
    else:
        indent = " " * max(1, column or 0)
        source = (
            "\n" * (first - 1) + "def _f():\n" + "\n" * (lineno - first - 1) + indent + expression
        ) + "\n"
    code = compile(source, filename, "exec", dont_inherit=True)
    if not module_level:
        code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    code = code.replace(co_name=name, co_qualname=qualname)
    namespace = {"_e": _raise, "__name__": "__ftrace_forked__"}
    try:
        if module_level:
            exec(code, namespace)  # noqa: S102 - our own two lines, to get a frame
        else:
            types.FunctionType(code, namespace)()
    except BaseException as raised:  # noqa: BLE001 - _Raise, or the NameError of a name
        entry = raised.__traceback__
    while entry is not None and entry.tb_frame.f_code is not code:
        entry = entry.tb_next
    return types.TracebackType(tb_next, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)


def pack_failure(failure: Failure) -> tuple:
    return (failure.thread, failure.iteration, pack_exc(failure.exc), failure.phase)


def unpack_failure(data: tuple) -> Failure:
    from pytest_ftrace.report import Failure

    thread, iteration, exc, phase = data
    return Failure(thread, iteration, unpack_exc(exc), phase)


def pack_steps(steps) -> list | None:
    """A round's steps with each code object's access as text (the lanes need nothing more)."""
    if steps is None:
        return None
    from pytest_ftrace.ftrace.coop import describe_step

    return [(tid, describe_step(code, offset), offset) for tid, code, offset in steps]


# -- output ---------------------------------------------------------------------------------------


def _output_mark() -> dict:
    """Where the in-memory streams and pytest's log handlers are now (in the child, at its
    start): what is added after this is the round's output."""
    import logging

    streams = []
    for stream in (sys.stdout, sys.stderr):
        getvalue = getattr(stream, "getvalue", None)
        streams.append(len(getvalue()) if getvalue is not None else None)
    handlers = []
    for handler in logging.getLogger().handlers:
        records = getattr(handler, "records", None)
        stream = getattr(handler, "stream", None)
        getvalue = getattr(stream, "getvalue", None)
        handlers.append(
            (
                len(records) if isinstance(records, list) else None,
                len(getvalue()) if getvalue is not None else None,
            )
        )
    return {"streams": streams, "handlers": handlers}


def _output_since(mark: dict) -> dict:
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a stream we cannot flush keeps its text
            pass
    texts = []
    for stream, at in zip((sys.stdout, sys.stderr), mark["streams"], strict=True):
        getvalue = getattr(stream, "getvalue", None)
        texts.append(getvalue()[at:] if at is not None and getvalue is not None else "")
    handlers = []
    for handler, (records_at, text_at) in zip(
        logging.getLogger().handlers, mark["handlers"], strict=False
    ):
        records = []
        if records_at is not None:
            for record in handler.records[records_at:]:
                record = logging.makeLogRecord(record.__dict__)
                record.msg, record.args = record.getMessage(), None
                if record.exc_info:
                    record.exc_text = record.exc_text or logging.Formatter().formatException(
                        record.exc_info
                    )
                    record.exc_info = None
                records.append(record.__dict__)
        text = ""
        if text_at is not None:
            text = handler.stream.getvalue()[text_at:]
        handlers.append((records, text))
    return {"streams": texts, "handlers": handlers}


def _replay_output(output: dict) -> None:
    """In the parent: the child's round output, where the parent's own would have gone."""
    import io
    import logging

    for stream, text in zip((sys.stdout, sys.stderr), output["streams"], strict=True):
        if not text:
            continue
        if type(stream).__name__ == "TeeCaptureIO":  # the child wrote its copy to the terminal
            io.TextIOWrapper.write(stream, text)
        else:
            stream.write(text)
    for handler, (records, text) in zip(
        logging.getLogger().handlers, output["handlers"], strict=False
    ):
        if records and isinstance(getattr(handler, "records", None), list):
            handler.records.extend(logging.makeLogRecord(r) for r in records)
        if text:
            handler.stream.write(text)


# -- one child ------------------------------------------------------------------------------------


_THREAD_STARTED = False


def ready_to_fork() -> bool:
    """Before a fork: whether to freeze gc around it (True on a build with the GIL).

    With the GIL, `gc.freeze` and `gc.unfreeze` move the heap to the permanent generation and
    back (two list splices), and the child's collections skip what it inherited: they would
    otherwise write to every object's gc header, so copy every page. On a free-threaded build
    both walk the whole heap and set or clear a bit in every object: the unfreeze after the
    fork writes to every page the child still shares, so this process copied its heap once per
    fork (9 ms a fork on 3.13t, benches/README "Forked rounds on 3.13t"); no freeze there.

    Also, on a free-threaded build: the first thread other than the main one makes the
    interpreter immortalise every object that uses deferred reference counting (functions,
    code, modules...: a walk of the heap that writes to each), once per process. A child
    forked before any thread started does it again when its first worker starts, so every
    child copied the whole heap; here it is done once, before the first fork, by one thread
    that ends at once (which the first round's workers would have done anyway)."""
    from pytest_ftrace import gil

    global _THREAD_STARTED
    if not gil.FREE_THREADED_BUILD:
        return True
    if not _THREAD_STARTED:
        import _thread

        _thread.start_joinable_thread(int).join()  # (3.13+, as every free-threaded build)
        _THREAD_STARTED = True
    return False


def in_child(work, timeout: float) -> tuple:
    """Run `work()` in a forked child; ("ok", its result) - which must pickle - or ("error",
    traceback text of an exception of `work`) or ("crash", what happened)."""
    return in_child_stream(lambda _send: work(), timeout, None)


# Children that sent their answer and are not reaped yet (a snapshot's: snapshot.py).
REAP: list[int] = []


def reap(block: bool = False) -> None:
    """Reap the children in REAP (without waiting for them unless `block`)."""
    for pid in list(REAP):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            REAP.remove(pid)


def in_child_stream(work, timeout: float, receive) -> tuple:
    """Run `work(send)` in a forked child: each `send(data)` there (data that pickles) comes
    here as `receive(data)` while the child goes on, so that what it did before a crash or a
    hang is not lost; `timeout` is counted from the fork and again from each message. Returns
    ("ok", the result of `work`), ("error", traceback text of an exception of `work`) or
    ("crash", what happened)."""
    import gc
    import warnings

    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # or the child would write what this process buffered again
        except Exception:  # noqa: BLE001, S110
            pass
    from pytest_ftrace import _native

    freeze = ready_to_fork()
    if freeze:
        gc.freeze()
    parent = os.getpid()
    _native.fork_prepare()  # the core's watcher thread holds no lock across the fork
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            pid = os.fork()
    finally:
        if os.getpid() == parent:
            _native.fork_parent()
            if freeze:
                gc.unfreeze()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            _native.fork_child()
            os.close(read_fd)
            _child_main(work, write_fd)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        return _collect(pid, read_fd, timeout, receive)
    finally:
        os.close(read_fd)


_HEADER = 8  # a message is its length (8 bytes, big-endian) and its pickle


def write_frame(fd: int, message) -> None:
    """`message` (which must pickle) as one frame on `fd`: its length, then its pickle."""
    import pickle

    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(_HEADER, "big") + data)
    while view:
        view = view[os.write(fd, view) :]


def read_frames(fd: int, timeout: float | None, take, done) -> str:
    """Read frames from `fd`, each unpickled to `take(message)`, until `done()` (then "done"),
    the end of the input ("ended") or `timeout` seconds without a frame (None: no limit)."""
    import pickle
    import select
    import time

    buffer = bytearray()
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"did not answer within {timeout:g}s"
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return "ended"
        buffer += chunk
        while len(buffer) >= _HEADER and not done():
            size = int.from_bytes(buffer[:_HEADER], "big")
            if len(buffer) < _HEADER + size:
                break
            frame = bytes(buffer[_HEADER : _HEADER + size])
            del buffer[: _HEADER + size]
            take(pickle.loads(frame))  # noqa: S301 - our own process's
            if deadline is not None:
                deadline = time.monotonic() + timeout
    return "done"


def _child_main(work, fd: int) -> None:
    """In the child: `work(send)`, each message and then its end written to `fd`. A message
    that does not pickle ends the work with that error."""
    import pickle
    import traceback

    def write(message) -> None:
        write_frame(fd, message)

    try:
        message = ("ok", work(lambda data: write(("message", data))))
        pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # it pickles, or an error
    except BaseException as exc:  # noqa: BLE001 - sent to the parent, which reports it
        message = ("error", "".join(traceback.format_exception(exc)))
    write(message)


def _collect(pid: int, fd: int, timeout: float, receive, wait: bool = True) -> tuple:
    """The child's messages to `receive` and its answer; with `wait` False the answer is
    returned as soon as it came (the child is then ending: it is reaped later, REAP)."""
    import pickle
    import select
    import signal
    import time

    buffer = bytearray()
    final = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("crash", f"its process did not answer within {timeout:g}s; killed")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= _HEADER:
                size = int.from_bytes(buffer[:_HEADER], "big")
                if len(buffer) < _HEADER + size:
                    break
                frame = bytes(buffer[_HEADER : _HEADER + size])
                del buffer[: _HEADER + size]
                try:
                    message = pickle.loads(frame)  # noqa: S301 - our own child's
                except Exception as exc:  # noqa: BLE001
                    message = ("error", f"a message of its process could not be read: {exc!r}")
                if message[0] == "message":
                    if receive is not None:
                        receive(message[1])
                    deadline = time.monotonic() + timeout
                elif final is None:
                    final = message
                    if not wait:
                        REAP.append(pid)
                        return final
    except BaseException:  # Ctrl-C, an alarm: the child goes, what stops us goes on
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise
    _, status = os.waitpid(pid, 0)
    if final is not None:
        return final
    return ("crash", f"its process ended ({_status(status)}) without sending its results")


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        import signal

        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


# -- the rounds of a test -------------------------------------------------------------------------


def run_rounds(test: TestSession, run: ThreadedRun) -> Outcome:
    """Every round of `run` in a child forked from here; the merged outcome. Raises what stops
    the session (Ctrl-C, pytest.exit) as the in-process run does.

    With --ftrace-rounds fork a child whose round left the project's module
    state as it found it (ftrace/fingerprint.py) runs the next round too, so that a test that
    keeps no state pays about one fork, not one per round; a round that changed it ends its
    child, and the next round starts in a new one. With fork-each every round gets a child.

    The mode is active in this process meanwhile (activated once for all the rounds, as for
    rounds run here, with `watchdog=False`: no thread is started here); each child inherits
    the activation (the instrumentation's events, the patched names) and starts its own
    watchdog. This process only waits, in the plugin's code, which is never instrumented."""

    from pytest_ftrace.ftrace import fingerprint  # noqa: F401 - here, not in every child

    test.forked = True
    picture = _warm(test) if test.session.rounds == "fork" else None
    # Shared with the children: the number of the round after the last one that ended there,
    # so that a crash is blamed on the round it happened in without a message per round.
    board = mmap.mmap(-1, _HEADER)
    return forked_rounds(test, run, picture, board)


def forked_rounds(
    test: TestSession, run: ThreadedRun, picture, board, start=0, outcome=None, snapshot=None
) -> Outcome:
    """The rounds from `start` on in forked children (of this process, or of `snapshot`),
    merged into `outcome` (a new one when None)."""
    from pytest_ftrace.report import Failure, Outcome, internal_error
    from pytest_ftrace.stress import runner

    if outcome is None:
        outcome = Outcome(run.threads, run.iterations)
    iteration = start
    retries = RERUNS
    more = run.hooks.more_rounds  # a mode that decides when its rounds end (explore)
    while iteration < run.iterations:
        if more is not None and iteration and not more(iteration, len(outcome.failures)):
            break
        got: list[dict] = []
        first = iteration
        board[:] = first.to_bytes(_HEADER, "big")
        if snapshot is not None:
            answer = snapshot.stream(
                ("rounds", first, _budget_state(test.budget), handoff(test)),
                run.timeout + GRACE_SECONDS,
                got.append,
            )
        else:
            answer = in_child_stream(
                lambda send, i=first: _child_rounds(test, run, i, picture, send, board),
                run.timeout + GRACE_SECONDS,
                got.append,
            )
        test.children += 1
        if answer[0] == "ok" and retries and _ran_free(got) and test.run.forked_state():
            retries -= 1  # explore: the same execution again, from the same tree (see _ran_free)
            from pytest_ftrace import _native

            for data in got:  # what its watcher learned is kept
                state = (data.get("mode") or {}).get("state")
                if state is not None:
                    _native.learn_interpreter_waits(state["waits"])
            continue
        over = False
        for data in got:
            _replay_output(data["output"])
            _reissue_warnings(data["warnings"])
            if data["stop"] is not None:
                raise unpack_exc(data["stop"])
            if data["internal"] is not None:
                step, exc = data["internal"]
                raise internal_error(step, unpack_exc(exc))
            _absorb(test, data)
            for name in ("failures", "skipped", "xfailed"):
                getattr(outcome, name).extend(unpack_failure(f) for f in data[name])
            outcome.notes.extend(data["notes"])
            if data["round"] is not None:
                iteration = data["round"] + 1
            hang = [f for f in outcome.failures if isinstance(f.exc, runner.Hang)]
            if hang or any(f.phase == "internal" for f in outcome.failures):
                stuck = hang[0].iteration if hang and hang[0].iteration is not None else None
                _did_not_run(
                    outcome,
                    iteration if stuck is None else stuck,
                    run.iterations,
                    run.go_on is not None,
                )
                over = True  # as in this process: a hung or broken run stops there
                break
        if over:
            break
        if answer[0] == "crash":
            iteration = max(iteration, int.from_bytes(board[:], "big"))
            outcome.failures.append(
                Failure(None, iteration, RoundCrashed(f"round {iteration}: {answer[1]}"), "call")
            )
            _did_not_run(outcome, iteration, run.iterations, run.go_on is not None)
            break
        if test.budget is not None and test.budget.reason is not None:
            outcome.iterations = test.budget.rounds  # rounds by budget: the rounds that ran
            break
        if answer[0] == "error" or iteration == first:
            why = answer[1] if answer[0] == "error" else "it ended without running a round"
            error = internal_error(f"the forked process of round {iteration}", ChildError(why))
            outcome.failures.append(Failure(None, iteration, error, "internal"))
            break
    return outcome


# How many times in a test a forked explore execution that ran free is run again.
RERUNS = 20


def _ran_free(got: list[dict]) -> bool:
    """Whether a child's rounds include one that was not exact, not for a deadlock: a thread
    waited where the watcher could not tell a wait for the interpreter from one in C (a fresh
    child's threads, under load) and the round ran free from there. An explore execution is
    the tree's prefix from the test's starting state: run again, it is the same execution, and
    the tree goes on from the one that was exact (the parent took nothing of these rounds)."""
    for data in got:
        records = (data.get("mode") or {}).get("records") or {}
        for record, _steps in records.values():
            if record is not None and not record["exact"] and not record["deadlock"]:
                return True
    return False


def _warm(test: TestSession):
    """Decide here, once, what every child would decide again: which modules are in scope
    (the children inherit the answers); and the picture of the project's module state every
    child starts from."""
    from pytest_ftrace.ftrace import fingerprint

    instrumentation = test.session.instrumentation
    return fingerprint.Start(instrumentation.scope, instrumentation.armed_code)


def _did_not_run(outcome: Outcome, iteration: int, iterations: int, budget: bool = False) -> None:
    if budget:  # rounds by budget: no count was promised; these are the rounds that ran
        outcome.iterations = iteration + 1
    elif iteration < iterations - 2:
        outcome.notes.append(f"iterations {iteration + 1}-{iterations - 1} did not run")
    elif iteration == iterations - 2:
        outcome.notes.append(f"iteration {iteration + 1} did not run")


def _child_rounds(
    test: TestSession,
    run: ThreadedRun,
    first: int,
    picture,
    send,
    board=None,
    budget=None,
    state=None,
) -> None:
    """In the child: the rounds from `first` on, in one threaded run (its workers and their
    fixtures live for all of them, as in the test's process). As each round ends, one worker
    sends what the parent needs of it, and the run goes on to the next round only while the
    project's module state is as `picture` says (None: never; fork-each); then the rest
    (fixtures' tear-down, a hang, the plugin's errors) goes at the end."""
    import warnings

    from pytest_ftrace.stress import runner

    mode = test.run
    _keep_records(mode)
    _fresh_records(mode)
    _resume_budget(test.budget, budget)
    _take_handoff(test, state)
    hooks = run.hooks
    ending, over = hooks.round_end, hooks.round_over
    durations: list[float] = []
    sent = _Sent(_output_mark())

    def round_end(seconds: float) -> None:
        durations.append(seconds)
        if ending is not None:
            ending(seconds)

    def round_over(iteration: int) -> bool:
        sent.finished = iteration
        if board is not None:
            board[:] = (iteration + 1).to_bytes(_HEADER, "big")
        go_on = picture is not None and picture.same()
        if not go_on or sent.news(run):  # a failure goes at once: a crash cannot lose it
            send(_results(test, run, durations, sent, caught))
        return go_on

    data: dict[str, Any] = {"stop": None, "internal": None}
    outcome = None
    step = "starting the watchdog"
    with warnings.catch_warnings(record=True) as caught:
        hooks.round_end, hooks.round_over = round_end, round_over
        run.only_round, run.first_round = None, first
        try:
            mode.exact.start_watchdog()
            try:
                step = "the threaded run"
                outcome = run.run()
            finally:
                hooks.round_end, hooks.round_over = ending, over
                step = "deactivating --ftrace"
                mode.exact._stop.set()  # the watchdog: nothing more to watch
        except runner.STOPPING as exc:
            data["stop"] = pack_exc(exc)
        except BaseException as exc:  # noqa: BLE001 - the machinery's: the parent fails the test
            data["internal"] = (step, pack_exc(exc))
        data.update(_results(test, run, durations, sent, caught))
    if outcome is not None:
        data["notes"] = [n for n in outcome.notes if "did not run" not in n]
    send(data)


class _Sent:
    """How much of the child's results went to the parent already."""

    def __init__(self, mark: dict):
        self.mark = mark
        self.failures = self.skipped = self.xfailed = 0
        self.warnings = 0
        self.blocking = 0
        self.errors = 0
        self.counted: dict = {}
        self.finished: int | None = None  # the last round that ended
        self.rounds = 0  # how many of the rounds that ended were sent

    def news(self, run) -> bool:
        outcome = getattr(run, "_outcome", None)
        return any(
            len(getattr(outcome, name, ())) > getattr(self, name)
            for name in ("failures", "skipped", "xfailed")
        )


def _results(test, run, durations, sent: _Sent, caught) -> dict:
    """What the parent has not had yet, as plain data: the rounds that ended since the last
    message (their records; the steps of those that failed), failures, output, warnings and
    counts."""
    from pytest_ftrace.ftrace import coop

    mode = test.run
    exact = mode.exact
    data: dict[str, Any] = {"round": sent.finished, "stop": None, "internal": None, "notes": []}
    outcome = getattr(run, "_outcome", None)
    failing = set()
    for name in ("failures", "skipped", "xfailed"):
        found = list(getattr(outcome, name, ()))
        new = found[getattr(sent, name) :]
        setattr(sent, name, len(found))
        data[name] = [pack_failure(f) for f in new]
        if name == "failures":
            failing = {f.iteration for f in new}
    warned = list(caught)
    data["warnings"] = [_warning_data(w) for w in warned[sent.warnings :]]
    sent.warnings = len(warned)
    data["output"] = _output_since(sent.mark)
    sent.mark = _output_mark()
    waits = len(coop._BLOCKS)
    coop._BLOCKS.clear()
    exact.internal_errors.extend(coop.INTERNAL_ERRORS)
    coop.INTERNAL_ERRORS.clear()
    rounds = sorted(exact.rounds_seen)[sent.rounds :]
    sent.rounds += len(rounds)
    stats = mode.traced.stats()
    data["mode"] = {
        # the steps are for the lanes of a failing round only: text is dear to make
        "records": {
            i: (
                _plain_record(exact.round(i)),
                pack_steps(exact.steps(i)) if i in failing else None,
            )
            for i in rounds
        },
        "exit_steps": {k: v for k, v in exact.exit_steps.items() if k[0] in rounds},
        "spawned": {k: v for k, v in exact.spawned.items() if k[0] in rounds},
        "waits": waits,
        "blocking": list(exact.blocking[sent.blocking :]),
        "internal_errors": [
            (where, pack_exc(exc)) for where, exc in exact.internal_errors[sent.errors :]
        ],
        # these rounds' counts, not this process's so far
        "stats": {k: stats.get(k, 0) - sent.counted.get(k, 0) for k in _COUNTERS},
        "durations": list(durations),
        "conflicts": _conflicts(test, rounds),
        "budget": _budget_state(test.budget),
        "state": handoff(test),  # taken after the rounds' end: the parent goes on from it
    }
    sent.blocking, sent.errors, sent.counted = (
        len(exact.blocking),
        len(exact.internal_errors),
        stats,
    )
    durations.clear()
    return data


# Stands for a code object in a conflict's access sent from a child (marshalled once apart).
_CODE_REF = "\0code"


def _conflicts(test, rounds: list[int]) -> dict | None:
    """The happens-before conflicts of `rounds` (--ftrace-races), as data: each access's code
    object is sent once per message, marshalled (the parent explains the conflicts from it)."""
    if not rounds or not test.session.instrumentation.races:
        return None
    import marshal
    import types

    from pytest_ftrace import _native

    _native.races_finish()  # the last round's conflicts are kept (between rounds: safe)
    run_id = test.traced._native.id
    codes: dict[int, bytes | None] = {}

    def ref(code):
        if id(code) not in codes:
            try:
                codes[id(code)] = marshal.dumps(code)
            except ValueError:  # a constant marshal cannot write: the access is named only
                codes[id(code)] = None
        return (_CODE_REF, id(code))

    def plain(access):
        # every code object of the access (its own, its caller's) by reference
        if access is None:
            return None
        return tuple(ref(x) if isinstance(x, types.CodeType) else x for x in access)

    per_round = {}
    for i in rounds:
        found = _native.races_conflicts(run_id, i)
        if found:
            per_round[i] = [
                {
                    **c,
                    "first": plain(c["first"]),
                    "second": plain(c["second"]),
                    "read": plain(c.get("read")),
                }
                for c in found
            ]
    return {"rounds": per_round, "codes": codes} if per_round else None


def _unpack_conflicts(test, got: dict) -> None:
    """In the parent: a child's conflicts into the mode's, their code objects made again."""
    import marshal

    codes = {}
    for key, blob in got["codes"].items():
        try:
            codes[key] = marshal.loads(blob) if blob is not None else None
        except (ValueError, EOFError, TypeError):
            codes[key] = None

    def code_of(access):
        if access is None:
            return None
        return tuple(
            codes.get(x[1]) if isinstance(x, tuple) and x[:1] == (_CODE_REF,) else x for x in access
        )

    forked = test.run.forked_conflicts
    for i, conflicts in got["rounds"].items():
        forked[i] = [
            {
                **c,
                "first": code_of(c["first"]),
                "second": code_of(c["second"]),
                "read": code_of(c["read"]),
            }
            for c in conflicts
        ]


def marked_text(conflicts: list[dict]) -> set:
    """The lanes' marks of a forked round, whose steps are text: (thread, access as text,
    offset) of every conflicting access."""
    from pytest_ftrace.ftrace.coop import describe_step

    out = set()
    for c in conflicts:
        for access in (c["first"], c["second"], c.get("read")):
            if access is not None and access[2] is not None:
                out.add((access[0], describe_step(access[2], access[3]), access[3]))
    return out


def _plain_record(record: dict | None) -> dict | None:
    """A round record that pickles: the code object of its free run as its access's text."""
    if record is None or not record.get("free_run"):
        return record
    from pytest_ftrace.ftrace.coop import describe_step

    tid, code, offset = record["free_run"]
    return {**record, "free_run": (tid, describe_step(code, offset), offset)}


# What the parent had merged when it forked: kept alive in the child, where letting it go
# would only write to (and so copy) the pages that hold it.
_KEPT: list = []


def _keep_records(mode) -> None:
    exact = mode.exact
    _KEPT.append(
        (exact.exit_steps, exact.spawned, exact.blocking, exact.internal_errors, exact.records)
    )
    _KEPT.append((exact.steps_of, exact.rounds_seen, mode.traced.forked))


def _fresh_records(mode) -> None:
    """In the child: what the parent merged of the rounds before is not this child's."""
    exact = mode.exact
    exact.exit_steps, exact.spawned, exact.blocking = {}, {}, []
    exact.internal_errors, exact.waits = [], 0
    exact.records, exact.steps_of = {}, {}
    exact.rounds_seen = set()
    mode.traced.forked = {}
    mode.forked_conflicts = {}


_COUNTERS = (
    "threads",
    "foreign_threads",
    "executions",
    "hooked",
    "generator_points",
    "iteration_points",
    "yields",
    "delays",
    "delay_ns",
)


def _absorb(test: TestSession, data: dict) -> None:
    """In the parent: a child's rounds into the mode's records and statistics."""
    got = data["mode"]
    if got is None:
        return
    exact = test.run.exact
    for iteration, (record, steps) in got["records"].items():
        if record is not None:
            exact.rounds_seen.add(iteration)
            exact.records[iteration] = record
            exact.steps_of[iteration] = steps
    exact.exit_steps.update(got["exit_steps"])
    exact.spawned.update(got["spawned"])
    exact.waits += got["waits"]
    exact.blocking.extend(got["blocking"])
    exact.internal_errors.extend((w, unpack_exc(e)) for w, e in got["internal_errors"])
    traced = test.run.traced
    for key in _COUNTERS:
        traced.forked[key] = traced.forked.get(key, 0) + got["stats"].get(key, 0)
    for seconds in got["durations"]:
        traced._native.record_round(seconds)
    if got.get("conflicts"):
        _unpack_conflicts(test, got["conflicts"])
    if got.get("budget") is not None and test.budget is not None:
        _set_budget(test.budget, got["budget"])
    _take_handoff(test, got.get("state"))


def handoff(test: TestSession) -> dict:
    """What goes with a request to a child (a child of the snapshot holds the test's starting
    state, a child of this process what this process had when it forked, not what the
    children before it learned since) and comes back with each of a child's messages: the
    mode's state (explore's search tree: `forked_state`), what the scheduler learned from the
    rounds so far (the longest round's steps, the step estimate every later round's scheduler
    is made with: without it each forked round would be scheduled as a first round, with the
    default estimate, not as the same round run in one process) and the futex words the
    core's watcher learned the interpreter's own lock waits on (without them a child's thread
    waiting for the GIL looks blocked in C until the child learns them again)."""
    from pytest_ftrace import _native

    return {
        "mode": test.run.forked_state(),
        "steps": test.run.traced._native.sched_learned(),
        "waits": _native.interpreter_waits(),
    }


def _take_handoff(test: TestSession, state: dict | None) -> None:
    if state is None:
        return
    from pytest_ftrace import _native

    _native.learn_interpreter_waits(state["waits"])
    test.run.traced._native.sched_learn(state["steps"])
    if state["mode"] is not None:
        test.run.resume_forked_state(state["mode"])


_BUDGET_FIELDS = ("started", "elapsed", "rounds", "reason", "shared", "count")


def _budget_state(budget) -> dict | None:
    """What the parent's Budget needs of a child's rounds by budget (the child's copy went on
    deciding: its start time, rounds, why it stopped and its "anything shared?" signal, taken
    now: the round that ended may be this child's last)."""
    if budget is None:
        return None
    if budget.tracking:
        from pytest_ftrace import _native

        why = _native.shared_take()
        if why is not None:
            budget.shared = why
            budget.stop_tracking()
    return {name: getattr(budget, name) for name in _BUDGET_FIELDS}


def _set_budget(budget, state: dict) -> None:
    for name in _BUDGET_FIELDS:
        setattr(budget, name, state[name])


def _resume_budget(budget, state: dict | None) -> None:
    """In a child: go on with the rounds by budget where the parent is (`state`, or as
    inherited), watching for shared accesses again while none was seen."""
    if budget is None:
        return
    if state is not None:
        _set_budget(budget, state)
    budget.tracking = False
    if budget.signal and budget.shared is None and budget.started is not None:
        from pytest_ftrace import _native

        _native.shared_track(True)
        budget.tracking = True


def _warning_data(caught) -> tuple:
    """A warning the round issued, as data; its category by reference when that pickles."""
    import pickle

    category = caught.category
    try:
        pickle.dumps(category)
    except Exception:  # noqa: BLE001 - a class defined where pickle cannot find it
        category = None
    return (str(caught.message), category, caught.category.__name__, caught.filename, caught.lineno)


def _reissue_warnings(warned: list) -> None:
    """The child's warnings, issued again here, inside pytest's recording of the test's."""
    import warnings

    for message, category, name, filename, lineno in warned:
        if category is None:
            category, message = UserWarning, f"{name}: {message}"
        try:
            warnings.warn_explicit(message, category, filename, lineno)
        except Warning:  # an error under the filters: the child raised it already
            pass


# -- a shrink attempt -----------------------------------------------------------------------------


def pack_schedule(result):
    """The result of exact mode's one round following a decision list, as data."""
    if result is None:
        return None
    where, record, steps, cut, failure, labels = result
    packed = pack_failure(failure) if failure is not None else None
    return (where, record, pack_steps(steps), cut, packed, labels)


def schedule_in_child(test, decisions, run_here, timeout: float):
    """`run_here()` (exact mode's one round following `decisions`) in a child (of the test's
    snapshot, when it has one): its result with the failure and steps as data and back, or
    None when it could not run."""

    snapshot = getattr(test, "snapshot", None)
    if snapshot is not None:  # from the test's starting state, which the snapshot holds
        answer = snapshot.stream(("schedule", decisions, timeout + GRACE_SECONDS), timeout, None)
    else:
        answer = in_child(lambda: pack_schedule(run_here()), timeout + GRACE_SECONDS)
    if answer[0] != "ok" or answer[1] is None:
        return None
    where, record, steps, cut, failure, labels = answer[1]
    return (where, record, steps, cut, unpack_failure(failure) if failure else None, labels)
