"""Per-thread capture of stdout, stderr, log records and warnings for the threadpool runner.

pytest captures output by replacing `sys.stdout` and `sys.stderr` for the whole process, and log
records with handlers on the root logger; both would mix the output of tests that run at the same
time. While a wave of tests runs, the runner puts `RoutingStream`s in place of `sys.stdout` and
`sys.stderr` and one `LogRouter` on the root logger. Each looks up the test that the writing
thread is running (`current()`) and hands the text or record to that test's `Sink`. Writes from
threads that run no test (the main thread, threads a test started) go where they went before.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from collections.abc import Iterator

_local = threading.local()


def current():
    """The context of the test this thread is running (set by the runner), or None."""
    return getattr(_local, "context", None)


def set_current(context) -> None:
    _local.context = context


class Sink:
    """Where one test's output goes: a stack of (stdout, stderr) buffers.

    The bottom layer is the test's own capture, shown in its report (None with `-s`: the text
    goes to the terminal as it is written); `capsys` pushes a layer while it is active.
    """

    def __init__(self, capturing: bool) -> None:
        self._lock = threading.Lock()
        self.layers: list[list[io.StringIO] | None] = [
            [io.StringIO(), io.StringIO()] if capturing else None
        ]
        self.passthrough = 0  # > 0 inside capsys.disabled()

    def write(self, index: int, text: str) -> bool:
        """Store `text` (index 0: stdout, 1: stderr); False when it should go to the terminal."""
        with self._lock:
            layer = self.layers[-1]
            if layer is None or self.passthrough:
                return False
            layer[index].write(text)
            return True

    def take(self, depth: int = 0) -> tuple[str, str]:
        """Return and clear the text of the bottom layer (depth 0) or a pushed one."""
        with self._lock:
            layer = self.layers[depth]
            if layer is None:
                return "", ""
            out, err = layer[0].getvalue(), layer[1].getvalue()
            self.layers[depth] = [io.StringIO(), io.StringIO()]
            return out, err

    def settle(self) -> None:
        """At the end of a phase, text that capsys did not read joins the test's own capture
        (pytest shows it in the report of that phase)."""
        with self._lock:
            bottom = self.layers[0]
            for layer in self.layers[1:]:
                if layer is None:
                    continue
                out, err = layer[0].getvalue(), layer[1].getvalue()
                layer[0], layer[1] = io.StringIO(), io.StringIO()
                if bottom is not None:
                    bottom[0].write(out)
                    bottom[1].write(err)
                else:
                    _write_through(0, out)
                    _write_through(1, err)

    def push(self) -> int:
        with self._lock:
            self.layers.append([io.StringIO(), io.StringIO()])
            return len(self.layers) - 1

    def pop(self, depth: int) -> None:
        """Drop a pushed layer; text nobody read moves to the layer below (as with pytest)."""
        with self._lock:
            layer = self.layers.pop(depth)
            below = self.layers[depth - 1]
        if layer is None:
            return
        out, err = layer[0].getvalue(), layer[1].getvalue()
        if below is not None:
            with self._lock:
                below[0].write(out)
                below[1].write(err)
        else:
            _write_through(0, out)
            _write_through(1, err)


_originals: list = [None, None]


def _write_through(index: int, text: str) -> None:
    stream = _originals[index]
    if text and stream is not None:
        stream.write(text)
        stream.flush()


class RoutingStream(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr: each thread writes to its own test's sink."""

    def __init__(self, original, index: int) -> None:
        self._original = original
        self._index = index

    def _sink(self) -> Sink | None:
        context = current()
        return None if context is None else context.sink

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        sink = self._sink()
        if sink is None or not sink.write(self._index, text):
            return self._original.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        sink = self._sink()
        if sink is None or sink.passthrough or sink.layers[-1] is None:
            self._original.flush()

    def isatty(self) -> bool:
        sink = self._sink()
        if sink is not None and not sink.passthrough and sink.layers[-1] is not None:
            return False
        return self._original.isatty()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        """The stand-in is ours, the stream under it is not: closing or collecting the stand-in
        neither closes nor flushes the original (which its owner may have closed already)."""

    @property
    def encoding(self):
        return getattr(self._original, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._original, "errors", "strict")

    @property
    def buffer(self):
        return _BinaryRouting(self)

    def fileno(self) -> int:
        return self._original.fileno()

    def __getattr__(self, name: str):
        return getattr(self._original, name)


class _BinaryRouting(io.RawIOBase):
    """`sys.stdout.buffer` of a RoutingStream: bytes are decoded and routed as text."""

    def __init__(self, text: RoutingStream) -> None:
        self._text = text

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._text.write(bytes(data).decode(self._text.encoding or "utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        self._text.flush()


@contextlib.contextmanager
def routed_streams(sys_module) -> Iterator[None]:
    """Put RoutingStreams in place of sys.stdout and sys.stderr for the duration."""
    out, err = sys_module.stdout, sys_module.stderr
    _originals[:] = [out, err]
    sys_module.stdout = RoutingStream(out, 0)
    sys_module.stderr = RoutingStream(err, 1)
    try:
        yield
    finally:
        if isinstance(sys_module.stdout, RoutingStream):
            sys_module.stdout = out
        if isinstance(sys_module.stderr, RoutingStream):
            sys_module.stderr = err


class LogRouter(logging.Handler):
    """One root-logger handler that passes each record to the handlers of the writing test."""

    def emit(self, record: logging.LogRecord) -> None:
        context = current()
        if context is None:
            return
        for handler in list(context.log_handlers):
            if record.levelno >= handler.level:
                handler.handle(record)


@contextlib.contextmanager
def routed_logs(level: int | None) -> Iterator[None]:
    root = logging.getLogger()
    router = LogRouter()
    attached = [root]
    root.addHandler(router)
    for logger in list(root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and not logger.propagate:
            logger.addHandler(router)
            attached.append(logger)
    original_level = root.level
    if level is not None:
        root.setLevel(min(original_level, level))
    try:
        yield
    finally:
        if level is not None:
            root.setLevel(original_level)
        for logger in attached:
            logger.removeHandler(router)


def route_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning while a wave runs: keep the warning with the test that raised it."""
    record = warnings.WarningMessage(message, category, filename, lineno, file, line)
    context = current()
    if context is not None:
        context.warnings.append(record)
    else:
        stray_warnings.append(record)


stray_warnings: list[warnings.WarningMessage] = []
