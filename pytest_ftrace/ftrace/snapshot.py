"""Rounds from a snapshot (`--ftrace-rounds snapshot`, the default): every round
starts from the test's starting state, at about the cost of one idle fork per test, and none
for a test whose rounds cannot change the module state (settled.py, told before round 0: its
rounds all run here, as with `--ftrace-rounds process`).

At the start of the test's call phase this process forks a *snapshot*: a child that starts no
thread and runs nothing; it only waits, holding the test's starting state. The rounds run here,
in this process, as with `--ftrace-rounds process`, while each one leaves the project's module
state as the test found it (`fingerprint.Start.same` after every round: the modules the
rounds can have changed, compared with the picture of the start): most tests change no module
state, so they pay that fork and nothing else, and the snapshot is told to exit at the end
of the test (reaped later, without waiting for it). When a round changes the state, the
rounds after it (and, later, every shrink attempt) run from the snapshot: it forks a child
per request, exactly as `--ftrace-rounds fork` forks from this process (fork.py: the child
runs rounds while they keep the state, then ends; its results come here through a pipe,
relayed by the snapshot). Explore mode's executions go the same way (its search tree goes to
each child with the request and comes back: modes/explore.py). Round 0 runs here on the
test's starting state, so a first-fill race (a module-level cache filled on first use) gets
every round, and a replay starts from the state the original round had.

State left for the tests after this one: the changes of the rounds that ran in this process,
i.e. of the rounds up to and including the first one that changed the module state (with
`process`: every round's changes; with `fork`: none).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import TestSession
    from pytest_ftrace.report import Outcome
    from pytest_ftrace.stress.runner import ThreadedRun

# Snapshots told to exit, not reaped yet (reaped without waiting when the next one is made).
_EXITING: list[int] = []


class Snapshot:
    """A waiting child of this process that holds the test's starting state and forks a child
    for each request (`stream`)."""

    def __init__(self, test: TestSession, run: ThreadedRun, picture, board):
        import gc
        import warnings

        from pytest_ftrace import _native
        from pytest_ftrace.ftrace import fork

        _reap(block=False)
        control_r, self._control = os.pipe()
        self._results, results_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # or the snapshot's children would write it again
            except Exception:  # noqa: BLE001, S110
                pass
        # what a child of the snapshot needs, imported here once, not in every child
        import marshal  # noqa: F401
        import pickle  # noqa: F401
        import select  # noqa: F401
        import signal  # noqa: F401
        import traceback  # noqa: F401

        # frozen only with the GIL (fork.ready_to_fork; on a free-threaded build it starts one
        # thread first instead, so that no child redoes the interpreter's first-thread work)
        freeze = fork.ready_to_fork()
        if freeze:
            gc.freeze()
        collecting = gc.isenabled()
        instrumentation = test.session.instrumentation
        # what is armed after this, the snapshot arms too before its first child (_rearm)
        self._mark: tuple[int, int] | None = instrumentation.mark()
        parent = os.getpid()
        _native.fork_prepare()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        finally:
            if os.getpid() == parent:
                _native.fork_parent()
                if freeze:
                    gc.unfreeze()
        if pid == 0:  # the snapshot: never returns
            code = 70
            try:
                # no _native.fork_child(): the snapshot runs nothing, so it needs no watcher
                # thread of the core (that would wake it all the time); each child it forks
                # starts its own when its request has come (_Ahead)
                os.close(self._control)
                os.close(self._results)
                # its objects stay frozen (with the GIL) and it collects nothing: it only forks
                # (_Ahead), and neither freezes nor unfreezes around a fork (on a free-threaded
                # build each walks the whole heap and writes to every page of it)
                gc.disable()
                _serve(test, run, picture, board, control_r, results_w, collecting)
                code = 0
            finally:
                os._exit(code)
        os.close(control_r)
        os.close(results_w)
        self.pid = pid
        self.alive = True
        self.children = 0
        self.armed = 0  # code objects the snapshot armed before its first child (_rearm)
        self._instrumentation = instrumentation

    def stream(self, command: tuple, timeout: float, receive) -> tuple:
        """Run `command` (("rounds", first, budget state, the mode's state) or ("schedule",
        decisions)) in a child of the snapshot; its messages come to `receive` as they are
        sent; returns its answer as fork.in_child_stream does."""
        from pytest_ftrace.ftrace import fork

        if not self.alive:
            return ("crash", "the snapshot of the test's starting state is gone")
        if self._mark is not None:
            answer = self._rearm()
            if answer is not None:
                return answer
        try:
            fork.write_frame(self._control, command)
        except OSError as exc:
            self.alive = False
            return ("crash", f"the snapshot of the test's starting state is gone ({exc})")
        self.children += 1
        answer = None

        def take(message) -> None:
            nonlocal answer
            kind, data = message
            if kind == "message":
                if receive is not None:
                    receive(data)
            else:
                answer = data

        # the snapshot's own deadline kills a stuck child; this one is a backstop for it
        ended = fork.read_frames(
            self._results, timeout + fork.GRACE_SECONDS, take, lambda: answer is not None
        )
        if answer is not None:
            return answer
        self.alive = False
        self.close()  # (killed: it did not answer)
        return ("crash", f"the snapshot of the test's starting state {ended}")

    def _rearm(self) -> tuple | None:
        """Before the snapshot's first child: the code this process armed since the fork
        (round 0's, and the rounds' after it that ran here), armed in the snapshot too, so
        that its children start with it armed and each child's round arms only what is new
        to it. On a free-threaded build arming stops the world: in a child that is a pause of
        its threads in every round's first lines (benches/README "Threads let run free at
        their start"); in the snapshot, which has one thread, it is done once. None when
        done; the answer to return when the snapshot failed."""
        from pytest_ftrace.ftrace import fork

        mark, self._mark = self._mark, None
        keys, decided = self._instrumentation.armed_since(mark)
        if not keys and not decided:
            return None
        got: list = []
        try:
            fork.write_frame(self._control, ("arm", keys, decided))
            ended = fork.read_frames(
                self._results, fork.GRACE_SECONDS + 60.0, got.append, lambda: bool(got)
            )
        except OSError as exc:
            self.alive = False
            return ("crash", f"the snapshot of the test's starting state is gone ({exc})")
        if got and got[0][0] == "answer" and got[0][1][0] == "ok":
            self.armed = got[0][1][1]
            return None
        if got:
            return got[0][1]
        self.alive = False
        self.close()
        return ("crash", f"the snapshot of the test's starting state {ended}")

    def close(self) -> None:
        """Tell the snapshot to exit; it is reaped later (no waiting here)."""
        for fd in (self._control, self._results):
            try:
                os.close(fd)  # end of input: the snapshot exits
            except OSError:
                pass
        self._control = self._results = -1
        if self.pid and not self.alive:  # it did not answer: it goes now
            import signal

            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.pid:
            _EXITING.append(self.pid)
            self.pid = 0
        _reap(block=False)


def _reap(block: bool) -> None:
    for pid in list(_EXITING):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _EXITING.remove(pid)


def _serve(test, run, picture, board, control: int, results: int, collecting: bool) -> None:
    """In the snapshot: each request read from `control` runs in a child forked from here; its
    messages and its answer go to `results`. Ends at the end of `control`.

    The child of the next request is forked ahead, as soon as the one before it has its
    request (`_Ahead`): it waits, idle, for its request on a pipe of its own, so the fork is
    not on the way between a request and its execution (the snapshot does not change: a child
    forked ahead starts from the state a later fork would)."""
    from pytest_ftrace.ftrace import fork

    def relay(data) -> None:
        fork.write_frame(results, ("message", data))

    requests: list = []
    ahead = _Ahead(
        lambda command, send: _command(test, run, picture, board, command, send),
        (control, results),
        collecting,
    )
    try:
        while True:
            requests.clear()
            ended = fork.read_frames(control, None, requests.append, lambda: bool(requests))
            if not requests:
                return  # the test is over (or its process is gone)
            command = requests[0]
            if command[0] == "arm":  # before the first child (Snapshot._rearm)
                try:
                    armed = test.session.instrumentation.arm_again(command[1], command[2])
                    answer = ("ok", armed)
                except Exception:  # noqa: BLE001 - the test's process reports it
                    import traceback

                    answer = ("error", traceback.format_exc())
                fork.write_frame(results, ("answer", answer))
                continue
            if command[0] == "rounds":
                timeout, receive = run.timeout + fork.GRACE_SECONDS, relay
            elif command[0] == "schedule":
                timeout, receive = command[2], None
            else:
                fork.write_frame(
                    results, ("answer", ("error", f"unknown request {command[0]!r} ({ended})"))
                )
                continue
            answer = ahead.run(command, timeout, receive)
            fork.write_frame(results, ("answer", answer))
    finally:
        ahead.close()
        fork.reap(block=True)


def _command(test, run, picture, board, command, send):
    """In a child of the snapshot: the work of one request."""
    from pytest_ftrace.ftrace import fork

    if command[0] == "rounds":
        _, first, budget, state = command
        return fork._child_rounds(test, run, first, picture, send, board, budget, state)
    _, decisions, _timeout = command
    return _schedule(test, decisions)


class _Ahead:
    """The snapshot's child for the next request, forked before that request comes."""

    def __init__(self, work, inherited: tuple[int, ...], collecting: bool):
        self.work = work  # (command, send) -> the answer's data, in the child
        self.inherited = inherited  # the snapshot's own pipes: closed in its children
        self.collecting = collecting  # whether the test's process collects garbage
        self.child: tuple[int, int, int] | None = None  # pid, request pipe, results pipe

    def run(self, command, timeout: float, receive) -> tuple:
        """`command` in the child forked ahead (forked now if there is none), then the next
        one forked ahead while it runs; its answer as fork.in_child_stream gives it."""
        from pytest_ftrace.ftrace import fork

        if self.child is None:
            self.child = self._fork()
        pid, request, answers = self.child
        self.child = None
        try:
            fork.write_frame(request, command)
        except OSError:
            pass  # it is gone: _collect says how
        os.close(request)
        try:
            self.child = self._fork()  # the next one, while this one runs
        except OSError:
            self.child = None
        try:
            return fork._collect(pid, answers, timeout, receive, wait=False)
        finally:
            os.close(answers)

    def _fork(self) -> tuple[int, int, int]:
        import gc
        import warnings

        from pytest_ftrace import _native
        from pytest_ftrace.ftrace import fork

        fork.reap()
        request_r, request_w = os.pipe()
        answers_r, answers_w = os.pipe()
        parent = os.getpid()
        _native.fork_prepare()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        finally:
            if os.getpid() == parent:
                _native.fork_parent()
        if pid == 0:  # the child: waits for its request, runs it, never returns
            code = 70
            try:
                os.close(request_w)
                os.close(answers_r)
                for fd in self.inherited:
                    os.close(fd)
                fork.REAP.clear()
                got: list = []
                fork.read_frames(request_r, None, got.append, lambda: bool(got))
                if got:  # (none: the snapshot ended before it had a request for it)
                    if self.collecting:
                        gc.enable()  # the test's process collected: so does the test here
                    _native.fork_child()
                    fork._child_main(lambda send: self.work(got[0], send), answers_w)
                code = 0
            finally:
                os._exit(code)
        os.close(request_r)
        os.close(answers_w)
        return pid, request_w, answers_r

    def close(self) -> None:
        """The child forked ahead ends (the end of its request pipe) and is reaped later."""
        from pytest_ftrace.ftrace import fork

        if self.child is not None:
            pid, request, answers = self.child
            self.child = None
            for fd in (request, answers):
                os.close(fd)
            fork.REAP.append(pid)


def _schedule(test, decisions):
    """In a child of the snapshot: one round following `decisions` (a shrink attempt), as
    fork.schedule_in_child's work does, after leaving the rounds' activation (the parent
    makes its attempts after the rounds)."""
    from pytest_ftrace.ftrace import fork

    test.run.deactivate()
    body = test.item.obj.ftrace_body
    return fork.pack_schedule(test.run._run_schedule_here(body, decisions))


def run_rounds(test: TestSession, run: ThreadedRun) -> Outcome:
    """The test's rounds: here while they keep the module state, then from the snapshot."""
    import mmap

    from pytest_ftrace.ftrace import fingerprint, fork, settled
    from pytest_ftrace.stress import oneshot, runner

    instrumentation = test.session.instrumentation
    picture = fingerprint.Start(instrumentation.scope, instrumentation.armed_code)
    if not settled.can_change(picture):
        return _rounds_here(test, run)  # nothing to come back to: no snapshot, no fork
    board = mmap.mmap(-1, fork._HEADER)
    snapshot = Snapshot(test, run, picture, board)
    test.snapshot = snapshot
    test.children = 0
    hooks = run.hooks
    over = hooks.round_over
    changed: list[int] = []

    def round_over(iteration: int) -> bool:
        go_on = over(iteration) if over is not None else True
        if not picture.same():
            changed.append(iteration)
            return False  # the next rounds start from the snapshot
        return go_on

    mode = test.run
    hooks.round_over = round_over
    try:
        mode.exact.start_watchdog()
        try:
            outcome = oneshot.run(run)
        finally:
            mode.exact._stop.set()
            if mode.exact._watchdog is not None:
                mode.exact._watchdog.join(5)
                mode.exact._watchdog = None
    finally:
        hooks.round_over = over
    if not changed or changed[0] + 1 >= run.iterations:
        return outcome
    if run.watch is not None and run.watch.reason is not None:
        return outcome  # the test runs on one thread instead
    if any(isinstance(f.exc, runner.Hang) or f.phase == "internal" for f in outcome.failures):
        return outcome  # as in this process: a hung or broken run stops there
    if test.budget is not None and test.budget.reason is not None:
        return outcome
    more = run.hooks.more_rounds  # a mode that ends its rounds itself (explore)
    if more is not None and not more(changed[0] + 1, len(outcome.failures)):
        return outcome
    outcome.notes[:] = [n for n in outcome.notes if "did not run" not in n]
    outcome.iterations = run.iterations
    _pause_budget(test.budget)
    test.forked = True
    run.watch = None  # the one-thread watch is this process's
    return fork.forked_rounds(test, run, picture, board, changed[0] + 1, outcome, snapshot)


def _rounds_here(test: TestSession, run: ThreadedRun) -> Outcome:
    """The rounds of a test that cannot change the module state (settled.py): all in this
    process, as with `--ftrace-rounds process`."""
    from pytest_ftrace.stress import oneshot

    exact = test.run.exact
    exact.start_watchdog()
    try:
        return oneshot.run(run)
    finally:
        exact._stop.set()
        if exact._watchdog is not None:
            exact._watchdog.join(5)
            exact._watchdog = None


def _pause_budget(budget) -> None:
    """Before the rounds go on in the snapshot's children: the signal seen here so far is
    kept in the budget, and this process stops watching."""
    if budget is None:
        return
    budget.by_count()  # the forks to come are not charged to it (budget.py)
    if budget.tracking:
        from pytest_ftrace import _native

        why = _native.shared_take()
        if why is not None:
            budget.shared = why
    budget.stop_tracking()
