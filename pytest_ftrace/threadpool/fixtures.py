"""capsys and capsysbinary for tests that run in threadpool workers.

Registered as a plugin only with --threadpool. pytest's own capsys replaces `sys.stdout` for the
whole process, and pytest allows one at a time; these versions capture the writes of the test's
own thread instead. In a test that runs the usual way they hand over to pytest's fixture.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from pytest_ftrace.threadpool import capture

try:
    from _pytest.capture import CaptureResult
except ImportError:  # pragma: no cover - older or newer pytest
    from collections import namedtuple

    CaptureResult = namedtuple("CaptureResult", ["out", "err"])  # type: ignore[misc]


class WorkerCapture:
    """The object capsys and capsysbinary give to a test that runs in a worker thread."""

    def __init__(self, sink: capture.Sink, binary: bool) -> None:
        self._sink = sink
        self._binary = binary
        self._depth = sink.push()

    def readouterr(self):
        """Return and forget what this test wrote to stdout and stderr since the last call."""
        out, err = self._sink.take(self._depth)
        if self._binary:
            return CaptureResult(out.encode(), err.encode())
        return CaptureResult(out, err)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Let this test's writes reach the terminal for the duration."""
        self._sink.passthrough += 1
        try:
            yield
        finally:
            self._sink.passthrough -= 1

    def close(self) -> None:
        self._sink.pop(self._depth)


def _capture(request: pytest.FixtureRequest, name: str, binary: bool):
    context = capture.current()
    if context is None or not context.worker:
        yield request.getfixturevalue(name)  # pytest's own fixture, one level up
        return
    worker_capture = WorkerCapture(context.sink, binary)
    try:
        yield worker_capture
    finally:
        worker_capture.close()


@pytest.fixture
def capsys(request: pytest.FixtureRequest):
    yield from _capture(request, "capsys", binary=False)


@pytest.fixture
def capsysbinary(request: pytest.FixtureRequest):
    yield from _capture(request, "capsysbinary", binary=True)
