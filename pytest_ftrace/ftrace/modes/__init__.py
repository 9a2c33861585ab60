"""The run modes of --ftrace. Each mode is one class implementing `RunMode`, in a module of
this package, found by `mode_class`; `ftrace.session.TestSession` holds one mode object per test
and never asks which mode it is. Adding a mode is adding a module and its line in `mode_class`
(and its name in `options.MODES`).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.instrument import TestRun
    from pytest_ftrace.ftrace.session import FtraceSession, TestSession
    from pytest_ftrace.report import Failure, Outcome
    from pytest_ftrace.stress.runner import Hooks


class RunMode(Protocol):
    """What a mode does for one test's threaded run.

    - When the test starts: the constructor, `(test)`, sets up the mode's native run; `traced`
      is the instrumentation run it made (seeds, hooked code, statistics).
    - Around the run: `activate` / `deactivate`.
    - When a round starts and ends (and a thread enters or leaves it): the calls in `hooks()`,
      which the stress runner makes in every worker thread.
    - At the end of the test: `test_end(outcome)` adds what the mode saw (internal errors of
      its machinery, rounds it could not control) and `stats()` its statistics.
    - For a failure: `failure_report(outcome, first)` adds the mode's part of the report
      (recorded schedule, shrinking, lanes) and returns the token parts (cache key, k) of the
      replay line; `replay_note()` says how a replay ran.
    """

    traced: TestRun
    stat_keys: tuple[str, ...]  # the statistics kept as the test's user properties

    def hooks(self) -> Hooks: ...

    def activate(self, watchdog: bool = True) -> None: ...  # False: start no thread

    def deactivate(self) -> None: ...

    def test_end(self, outcome: Outcome) -> None: ...

    def stats(self) -> dict: ...

    def failure_report(self, outcome: Outcome, first: Failure) -> tuple[str | None, int | None]: ...

    def replay_note(self) -> str: ...


class ModeClass(Protocol):
    """The class of a mode: what it adds to the session header, how it starts a test, and
    whether it counts its rounds itself (`own_budget`: --ftrace-budget does not apply)."""

    own_budget: bool

    def __call__(self, test: TestSession) -> RunMode: ...

    @staticmethod
    def header(session: FtraceSession) -> str: ...


def mode_class(name: str) -> ModeClass:
    """The class of the mode `name` (its module is imported only when the mode runs)."""
    if name == "exact":
        from pytest_ftrace.ftrace.modes import exact as module
    elif name == "chaos":
        from pytest_ftrace.ftrace.modes import chaos as module
    elif name == "explore":
        from pytest_ftrace.ftrace.modes import explore as module
    else:
        raise ValueError(f"unknown --ftrace-mode {name!r}")
    return module.MODE
