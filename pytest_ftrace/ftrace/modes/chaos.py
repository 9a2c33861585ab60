"""Chaos mode: the threads run free and the instrumentation injects seeded yields and delays
at hooked accesses (the native core's policy). It finds races inside native code on
free-threaded builds, and a replay re-runs a round with the same per-thread streams.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import FtraceSession, TestSession
    from pytest_ftrace.report import Failure, Outcome
    from pytest_ftrace.stress.runner import Hooks


class ChaosMode:
    stat_keys = ("yields", "delays")
    own_budget = False  # its rounds are counted by --ftrace-budget or the count

    def __init__(self, test: TestSession):
        self.test = test
        self.traced = test.session.instrumentation.start_test(test.item.nodeid)

    @staticmethod
    def header(session: FtraceSession) -> str:
        return ""

    def hooks(self) -> Hooks:
        from pytest_ftrace.stress.runner import Hooks

        run = self.traced
        replay = self.test.replay
        if replay is None:
            round_start = run.round_start
        else:
            # Every round replays the recorded one: the same per-thread streams each time.
            iteration = replay.iteration

            def round_start(_round: int) -> None:
                run.round_start(iteration)

        return Hooks(run.thread_enter, round_start, run.record_round, run.thread_exit)

    def activate(self, watchdog: bool = True) -> None:
        self.traced.activate()

    def deactivate(self) -> None:
        self.traced.deactivate()

    def test_end(self, outcome: Outcome) -> None:
        pass

    def stats(self) -> dict:
        return self.traced.stats()

    def failure_report(self, outcome: Outcome, first: Failure) -> tuple[str | None, int | None]:
        return None, None

    def replay_note(self) -> str:
        return ""


MODE = ChaosMode
