"""What a threaded run of one test comes to: passed, skipped, xfailed, or which executions
failed and how, as a ConcurrencyError a maintainer can act on.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import pytest

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class ConcurrencyError(Exception):
    """Some executions of a test's body failed when run in several threads at once."""

    def __init__(self, message: str, failures: list[Failure] | None = None):
        super().__init__(message)
        self.failures = failures or []


class FtraceInternalError(Exception):
    """An exception from pytest-ftrace's own machinery while a test ran (a hook of a worker
    thread, a wait, the scheduler, a report). It fails the test it happened in: a verdict the
    plugin could not reach is never a pass."""


def internal_error(where: str, exc: BaseException) -> FtraceInternalError:
    """`exc`, raised by the plugin's machinery in `where`, as the failure of the test, with its
    whole traceback (the plugin's frames included: they are the point here)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
    error = FtraceInternalError(
        f"internal error of pytest-ftrace in {where}: {type(exc).__name__}: {exc}\n"
        f"(please report it; the test's result is unknown, so it fails)\n{text}"
    )
    return error


@dataclass
class Failure:
    thread: int | None  # None: outside any thread's executions (e.g. a hang)
    iteration: int | None  # None: in the thread's fixture set-up or tear-down
    exc: BaseException
    phase: str = "call"  # call, setup (per-thread fixtures), teardown, internal (the plugin's)


@dataclass
class Outcome:
    threads: int
    iterations: int
    failures: list[Failure] = field(default_factory=list)
    skipped: list[Failure] = field(default_factory=list)
    xfailed: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def executions(self) -> int:
        return self.threads * self.iterations


def _hidden(tb: TracebackType) -> bool:
    frame = tb.tb_frame
    if frame.f_locals.get("__tracebackhide__") or frame.f_globals.get("__tracebackhide__"):
        return True
    # the plugin's own frames, in any of its packages (stress/, ftrace/, ...)
    return os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def visible_frames(tb: TracebackType | None) -> list[tuple]:
    frames = []
    while tb is not None:
        if not _hidden(tb):
            frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    return frames


def location(exc: BaseException) -> str:
    """file:line of the innermost visible frame, relative to the working directory."""
    frames = visible_frames(exc.__traceback__)
    if not frames:
        return "<unknown>"
    frame, lineno = frames[-1]
    return f"{_relative(frame.f_code.co_filename)}:{lineno}"


def _relative(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def format_traceback(exc: BaseException) -> str:
    """The exception with its traceback, without the plugin's own frames."""
    stack = traceback.StackSummary.extract(
        ((frame, lineno) for frame, lineno in visible_frames(exc.__traceback__)),
        capture_locals=False,
    )
    for entry in stack:
        entry.filename = _relative(entry.filename)
    lines = ["Traceback (most recent call last):\n", *stack.format()] if stack else []
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip("\n")


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "__main__") or module.startswith(("_pytest", "pytest")):
        name = cls.__qualname__
        return {"Failed": "pytest.fail", "Exit": "pytest.exit"}.get(name, name)
    return f"{module}.{cls.__qualname__}"


def ranges(numbers: Iterable[int]) -> str:
    """'0-3, 5, 7-8' for [0, 1, 2, 3, 5, 7, 8]."""
    values = sorted(set(numbers))
    parts = []
    start = prev = None
    for n in values:
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = n
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)


def _where(failures: list[Failure]) -> str:
    threads = [f.thread for f in failures if f.thread is not None]
    iterations = [f.iteration for f in failures if f.iteration is not None]
    phases = sorted({f.phase for f in failures if f.phase not in ("call", "internal")})
    parts = []
    if threads:
        parts.append(("thread " if len(set(threads)) == 1 else "threads ") + ranges(threads))
    if iterations:
        word = "iteration " if len(set(iterations)) == 1 else "iterations "
        parts.append(word + ranges(iterations))
    if phases:
        parts.append("in per-thread fixture " + "/".join(phases))
    if any(f.phase == "internal" for f in failures):
        parts.append("in pytest-ftrace's own machinery")
    return "; ".join(parts)


def group_failures(failures: list[Failure]) -> list[tuple[str, list[Failure]]]:
    """Distinct failures by exception type and location, biggest group first."""
    groups: dict[str, list[Failure]] = {}
    ordered = sorted(
        failures, key=lambda f: (f.iteration if f.iteration is not None else -1, f.thread or 0)
    )
    for failure in ordered:
        key = f"{_type_name(failure.exc)} at {location(failure.exc)}"
        groups.setdefault(key, []).append(failure)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def concurrency_message(outcome: Outcome) -> str:
    failures = outcome.failures
    groups = group_failures(failures)
    in_calls = [f for f in failures if f.phase == "call"]
    head = (
        f"{len(in_calls)} of {outcome.executions} executions failed "
        f"({_plural(outcome.threads, 'thread')} x {_plural(outcome.iterations, 'iteration')})"
    )
    lines = [head]
    internal = sum(1 for f in failures if f.phase == "internal")
    others = len(failures) - len(in_calls) - internal
    if others:
        lines[0] += f", and {_plural(others, 'per-thread fixture error')}"
    if internal:
        lines[0] = (
            f"{_plural(internal, 'internal error')} of pytest-ftrace (the test's result is "
            f"unknown, so it fails); {lines[0]}"
        )
    lines.append(f"failing: {_where(failures)}")
    lines.append(f"distinct failures: {len(groups)}")
    for index, (key, members) in enumerate(groups, 1):
        first = members[0]
        lines.append("")
        lines.append(f"[{index}] {key} - {_plural(len(members), 'time')} ({_where(members)})")
        lines.append(f"first seen in {_describe(first)}:")
        lines.append(format_traceback(first.exc))
    lines.extend(outcome.notes)
    return "\n".join(lines)


def _describe(failure: Failure) -> str:
    if failure.thread is None:
        return "the supervising thread"
    if failure.phase == "internal":
        where = f", iteration {failure.iteration}" if failure.iteration is not None else ""
        return f"thread {failure.thread}{where}, in pytest-ftrace's machinery"
    if failure.iteration is None:
        return f"thread {failure.thread}, fixture {failure.phase}"
    return f"thread {failure.thread}, iteration {failure.iteration}"


def raise_outcome(outcome: Outcome) -> None:
    """Turn the collected outcome into what pytest expects from a test call."""
    __tracebackhide__ = True
    failures = outcome.failures
    if failures and all(f.phase == "internal" for f in failures):
        # Only the plugin failed: say that first, not as a concurrency problem of the test.
        exc = failures[0].exc
        if len(failures) > 1:
            exc.add_note(f"({len(failures)} internal errors in all; the first is shown)")
        for note in outcome.notes:
            exc.add_note(note)
        raise exc
    if failures:
        groups = group_failures(failures)
        every_call_failed = (
            len(groups) == 1
            and len(failures) == outcome.executions
            and all(f.phase == "call" for f in failures)
        )
        if every_call_failed:
            # Not a concurrency problem: show it as a plain failure, plus the count.
            exc = failures[0].exc
            if outcome.executions > 1:
                exc.add_note(
                    f"(failed the same way in all {outcome.executions} executions: "
                    f"{_plural(outcome.threads, 'thread')} x "
                    f"{_plural(outcome.iterations, 'iteration')})"
                )
            for note in outcome.notes:
                exc.add_note(note)
            raise exc
        every_setup_failed = (
            len(groups) == 1
            and len(failures) == outcome.threads
            and all(f.phase == "setup" for f in failures)
        )
        if every_setup_failed:
            # A set-up (a unittest setUp) that fails in every thread: a plain failure too.
            exc = failures[0].exc
            exc.add_note(f"(failed the same way in the set-up of all {outcome.threads} threads)")
            raise exc
        raise ConcurrencyError(concurrency_message(outcome), failures)
    if outcome.xfailed:
        raise outcome.xfailed[0].exc
    if outcome.skipped:
        raise outcome.skipped[0].exc


OUTCOME_SKIP = pytest.skip.Exception
OUTCOME_XFAIL = pytest.xfail.Exception


def terminal_width(config: pytest.Config) -> int:
    """The width the report is written in (pytest's terminal writer; 80 when it has none)."""
    try:
        return int(config.get_terminal_writer().fullwidth)
    except Exception:
        return 80


def wrap(text: str, config: pytest.Config) -> str:
    """`text` wrapped to the report's width, continuation lines indented."""
    import textwrap

    return "\n".join(textwrap.wrap(text, terminal_width(config), subsequent_indent="  "))
