"""Explore mode: every interleaving of a test's threads within a preemption bound, one round
per execution, leaving out those that only reorder independent steps.

The threads run one at a time as in exact mode (the same native core and scheduling points);
the core's explore policy (rust/sched/explore.rs) searches the schedule tree depth first and
decides each round's schedule: the branches a round's races call for, within --ftrace-bound
preemptions, with source sets and sleep sets over each step's access (rust/accesses.rs: a name
read or written, or opaque). Rounds go on until the tree is done, a round fails, or the budget
(--ftrace-explore-rounds, --ftrace-explore-seconds) runs out.

A failure is reported as exact mode reports it (its decision list kept in the cache, shrunk,
drawn as lanes), with a replay line that follows the list. A pass says what was proven, in the
terminal summary: "no failure in all N interleavings within B preemptions (M executions, pruned
from at least K)", or, when the budget ran out first, how far the search got.

Rounds run in this process, not forked: a forked round costs several in-process rounds
(benches/README.md), and the search needs the rounds' schedules back in the core that holds
the tree. Each round therefore sees the state the rounds before it left, as in exact mode; a
test whose steps differ from round to round for the same schedule makes the search diverge,
which the summary line says.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from pytest_ftrace import options
from pytest_ftrace.ftrace.modes.exact import EXACT_STATS, ExactMode, native_options

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import FtraceSession, TestSession
    from pytest_ftrace.report import Outcome
    from pytest_ftrace.stress.runner import Hooks

EXPLORE_STATS = (*EXACT_STATS, "interleavings", "pruned", "explore_done")

# Instructions that touch nothing shared (locals, constants, the stack, comparisons, building
# new objects, the end of a loop); any instruction not named here makes a step opaque.
_SAFE = frozenset(
    (
        "CACHE NOP RESUME EXTENDED_ARG LOAD_FAST LOAD_FAST_CHECK LOAD_FAST_AND_CLEAR "
        "LOAD_FAST_LOAD_FAST LOAD_FAST_BORROW LOAD_FAST_BORROW_LOAD_FAST_BORROW STORE_FAST "
        "STORE_FAST_LOAD_FAST STORE_FAST_STORE_FAST DELETE_FAST LOAD_CONST LOAD_SMALL_INT "
        "POP_TOP PUSH_NULL COPY SWAP COMPARE_OP IS_OP UNARY_NEGATIVE UNARY_NOT UNARY_INVERT "
        "TO_BOOL BUILD_TUPLE BUILD_LIST BUILD_SET BUILD_MAP BUILD_CONST_KEY_MAP BUILD_STRING "
        "BUILD_SLICE FORMAT_SIMPLE FORMAT_WITH_SPEC FORMAT_VALUE CONVERT_VALUE LOAD_CLOSURE "
        "MAKE_CELL COPY_FREE_VARS LOAD_ASSERTION_ERROR LIST_APPEND SET_ADD MAP_ADD "
        "MAKE_FUNCTION SET_FUNCTION_ATTRIBUTE END_FOR POP_ITER NOT_TAKEN GET_ITER"
    ).split()
)
_JUMPS = frozenset(
    "JUMP JUMP_NO_INTERRUPT JUMP_FORWARD JUMP_BACKWARD JUMP_BACKWARD_NO_INTERRUPT".split()
)
_BRANCHES = frozenset(
    "POP_JUMP_IF_FALSE POP_JUMP_IF_TRUE POP_JUMP_IF_NONE POP_JUMP_IF_NOT_NONE FOR_ITER".split()
)
_RETURNS = frozenset(("RETURN_VALUE", "RETURN_CONST"))
# name -> (read or write, key family) of the instruction a step starts at
_READ, _WRITE = 1, 2
_ACCESSES = {
    "LOAD_ATTR": (_READ, "attr"),
    "LOAD_METHOD": (_READ, "attr"),
    "STORE_ATTR": (_WRITE, "attr"),
    "DELETE_ATTR": (_WRITE, "attr"),
    "LOAD_GLOBAL": (_READ, "global"),
    "LOAD_NAME": (_READ, "global"),
    "LOAD_FROM_DICT_OR_GLOBALS": (_READ, "global"),
    "STORE_GLOBAL": (_WRITE, "global"),
    "DELETE_GLOBAL": (_WRITE, "global"),
    "STORE_NAME": (_WRITE, "global"),
    "DELETE_NAME": (_WRITE, "global"),
    "LOAD_DEREF": (_READ, "cell"),
    "LOAD_CLASSDEREF": (_READ, "cell"),
    "LOAD_FROM_DICT_OR_DEREF": (_READ, "cell"),
    "STORE_DEREF": (_WRITE, "cell"),
    "DELETE_DEREF": (_WRITE, "cell"),
    "BINARY_SUBSCR": (_READ, "item"),
    "BINARY_SLICE": (_READ, "item"),
    "CONTAINS_OP": (_READ, "item"),
    "STORE_SUBSCR": (_WRITE, "item"),
    "DELETE_SUBSCR": (_WRITE, "item"),
    "STORE_SLICE": (_WRITE, "item"),
}
# Builtins whose call changes nothing shared: those that read no container's items, and
# those that read them (their step reads "item").
_PURE_SCALAR = frozenset(
    "range isinstance issubclass id type int float bool str abs hash callable iter enumerate "
    "zip reversed divmod round chr ord".split()
)
_PURE_ITEMS = frozenset("len min max sum sorted any all list tuple set frozenset dict".split())
# Native table entries (rust/opcodes.rs)
_ALWAYS, _ONLY_ARG, _KIND_ITERATION = 0x100, 0x200, 0x2000
# The most instructions a step's classification follows before it calls the step opaque.
_SCAN_LIMIT = 400


class Classifier:
    """What the step from a scheduling point does: (0 opaque | 1 read | 2 write, key).

    A step runs from the hooked instruction at its point to the next one the thread reaches.
    It reads or writes one key when its first instruction is a name access (an attribute, a
    global or a closure cell, keyed by its name: two objects' attributes of one name share a
    key) or an item access ("item": every container's items share one key), and every path from
    there to the next hooked instruction runs only instructions of `_SAFE`, jumps and binary
    operators (an in-place one makes the step a write: it may mutate the value). A call, a
    return (except from the test's own body, which ends the thread's round) or any other
    instruction makes it opaque: dependent on every other step.

    Called by the native core with the interpreter held, from the thread that reached the
    point; it must not take a lock (threading's locks are schedulable in exact mode)."""

    def __init__(self, bodies=()):
        import opcode

        from pytest_ftrace import _native

        self.hooked = _native.hooked_opcodes()
        self.bodies = {id(code) for code in bodies}
        self._keep = list(bodies)
        self.codes: dict[int, tuple[object, dict]] = {}
        nb_ops = [name for name, _sym in getattr(opcode, "_nb_ops", ())]
        self.inplace_from = next(
            (i for i, name in enumerate(nb_ops) if name.startswith("NB_INPLACE")), 0
        )

    def __call__(self, code, offset: int) -> tuple[int, str]:
        try:
            return self.classify(code, offset)
        except Exception:  # noqa: BLE001 - an unknown step is opaque, never an error
            return 0, ""

    def _instructions(self, code) -> dict:
        found = self.codes.get(id(code))
        if found is None or found[0] is not code:
            import dis

            listed = list(dis.get_instructions(code))
            by_offset = {}
            for index, ins in enumerate(listed):
                following = listed[index + 1].offset if index + 1 < len(listed) else None
                by_offset[ins.offset] = (ins, following)
            found = (code, by_offset)
            self.codes[id(code)] = found
        return found[1]

    def _point(self, ins) -> str | None:
        """'always' / 'maybe' (a loop step, a point for some iterators) / None."""
        entry = self.hooked[ins.opcode] if ins.opcode < len(self.hooked) else 0
        mode = entry & 0x0F00
        if mode == _ALWAYS or (mode == _ONLY_ARG and ins.arg == entry & 0xFF):
            return "maybe" if entry & 0xF000 == _KIND_ITERATION else "always"
        return None

    def classify(self, code, offset: int) -> tuple[int, str]:
        instructions = self._instructions(code)
        first, following = instructions[offset]
        what = _ACCESSES.get(first.opname)
        if what is None:
            return 0, ""
        kind, family = what
        key = family if family == "item" else f"{family}:{first.argval}"
        pure = None  # the builtin this step calls, if it loads one
        if first.opname == "LOAD_GLOBAL" and first.argval in _PURE_SCALAR | _PURE_ITEMS:
            if self._builtin(code, first.argval):
                pure = first.argval
        found = self._scan(instructions, following, id(code) in self.bodies, pure)
        if found is None:
            return 0, ""
        writes, called = found
        if called is not None and called in _PURE_ITEMS:
            key = "item"  # what the builtin reads; nothing writes the builtin's name
        return (_WRITE if writes else kind), key

    def start_safe(self, code) -> bool:
        """Whether the start of `code` (a test's body) up to its first point is safe."""
        try:
            instructions = self._instructions(code)
            first = min(instructions)
            found = self._scan(instructions, first, True, None)
        except Exception:  # noqa: BLE001 - unknown: not safe
            return False
        return found is not None and not found[0]

    def _scan(self, instructions, start, is_body: bool, pure):
        """Follow every path from offset `start` to the next points: None when one runs an
        opaque instruction, else (whether an in-place operator ran, the pure builtin called)."""
        writes = False
        called = None
        todo = [start]
        seen: set[int] = set()
        while todo:
            at = todo.pop()
            if at is None:
                return None  # ran off the end: cannot happen in valid code
            if at in seen:
                continue
            seen.add(at)
            if len(seen) > _SCAN_LIMIT:
                return None
            ins, after = instructions[at]
            point = self._point(ins)
            if point == "always":
                continue  # the step ends at this point
            name = ins.opname
            if name in _SAFE:
                todo.append(after)
            elif name == "BINARY_OP":
                if ins.arg is None or ins.arg >= self.inplace_from:
                    writes = True
                todo.append(after)
            elif name in _JUMPS:
                todo.append(ins.argval)
            elif name in _BRANCHES or point == "maybe":
                todo.extend((after, ins.argval))
            elif name in _RETURNS and is_body:
                continue  # the test's body returns: the thread's round ends
            elif name == "CALL" and pure is not None and called is None:
                called = pure  # the builtin the step loaded (the first call on every path)
                todo.append(after)
            else:
                return None
        return writes, called

    @staticmethod
    def _builtin(code, name: str) -> bool:
        """Whether global `name` is the builtin in the frame running `code` (the caller's)."""
        import sys

        frame = sys._getframe(1)
        for _ in range(6):
            if frame is None or frame.f_code is code:
                break
            frame = frame.f_back
        if frame is None or frame.f_code is not code:
            return False
        return name not in frame.f_globals


def explore_settings(config) -> tuple[int, int, float]:
    """--ftrace-bound, --ftrace-explore-rounds, --ftrace-explore-seconds (or their defaults)."""
    opt = config.option
    bound = getattr(opt, "ftrace_bound", None)
    rounds = getattr(opt, "ftrace_explore_rounds", None)
    seconds = getattr(opt, "ftrace_explore_seconds", None)
    return (
        options.DEFAULT_BOUND if bound is None else bound,
        options.DEFAULT_EXPLORE_ROUNDS if rounds is None else rounds,
        options.DEFAULT_EXPLORE_SECONDS if seconds is None else seconds,
    )


class ExploreMode(ExactMode):
    stat_keys = EXPLORE_STATS

    def __init__(self, test: TestSession):
        self.bound, self.max_rounds, self.max_seconds = explore_settings(test.item.config)
        self.exploring = test.replay is None  # a replay follows the recorded schedule
        if self.exploring:
            test.iterations = self.max_rounds  # the rounds stop when the search is done
        self.started: float | None = None
        self.stopped_by: str | None = None  # what ended the search before its end
        self.decided: dict[int, bool] = {}
        self.decide_lock = threading.Lock()
        super().__init__(test)

    def native_options(self, session: FtraceSession, nodeid: str, replay) -> dict:
        if not self.exploring:
            return native_options(session, nodeid, replay)
        from pytest_ftrace import _native

        original = getattr(self.test.item.obj, "ftrace_body", (self.test.item.obj, True))[0]
        body = getattr(getattr(original, "__func__", original), "__code__", None)
        classifier = Classifier([body] if body is not None else [])
        safe = body is not None and classifier.start_safe(body)
        _native.set_access_classifier(classifier, safe)
        return {"mode": "exact", "scheduler": "explore", "explore_bound": self.bound}

    @staticmethod
    def header(session: FtraceSession) -> str:
        bound, rounds, seconds = explore_settings(session.config)
        return f" bound={bound} budget={rounds} rounds/{seconds:g}s"

    def hooks(self) -> Hooks:
        hooks = super().hooks()
        if self.exploring:
            hooks.more_rounds = self.more_rounds
        return hooks

    def activate(self, watchdog: bool = True) -> None:
        self.started = time.monotonic()
        super().activate(watchdog)

    def deactivate(self) -> None:
        try:
            super().deactivate()
        finally:
            if self.exploring:
                from pytest_ftrace import _native

                _native.set_access_classifier(None)

    def progress(self) -> dict | None:
        return self.traced._native.explore_progress()

    def more_rounds(self, iteration: int, failures: int) -> bool:
        """Whether round `iteration` runs: decided once per round (every worker asks after
        the round barrier, when the rounds before it have ended), the same for all."""
        with self.decide_lock:
            found = self.decided.get(iteration)
            if found is None:
                found = self._more(failures)
                self.decided[iteration] = found
            return found

    def _more(self, failures: int) -> bool:
        if failures:
            return False  # reported like exact mode's: the first failing execution
        progress = self.progress()
        if progress is None or progress["done"]:
            return False
        if self.started is not None and time.monotonic() - self.started >= self.max_seconds:
            self.stopped_by = f"the --ftrace-explore-seconds budget ({self.max_seconds:g} s)"
            return False
        return True

    def stats(self) -> dict:
        stats = super().stats()
        progress = self.progress() if self.exploring else None
        if progress is not None:
            stats["interleavings"] = progress["executions"] - progress["redundant"]
            stats["pruned"] = progress["pruned"]
            stats["explore_done"] = progress["done"]
        return stats

    def test_end(self, outcome: Outcome) -> None:
        super().test_end(outcome)
        if not self.exploring:
            return
        progress = self.progress()
        if progress is None:
            return
        executions = progress["executions"]
        outcome.iterations = max(1, executions)  # the rounds that ran, not the budget
        if outcome.failures:
            return
        line = self.verdict(progress)
        self.test.session.explored.append((self.test.item.nodeid, line))
        outcome.notes.append(f"ftrace explore: {line}")

    def verdict(self, progress: dict) -> str:
        """What the search proved (or how far it got)."""
        executions = progress["executions"]
        interleavings = executions - progress["redundant"]
        bound = progress["bound"]
        within = f"within {bound} preemption{'s' if bound != 1 else ''}"
        counts = (
            f"{executions} execution{'s' if executions != 1 else ''}, pruned from at least "
            f"{executions + progress['pruned']}"
        )
        if progress["done"] and not progress["divergences"]:
            return f"no failure in all {interleavings} interleavings {within} ({counts})"
        if progress["done"]:
            return (
                f"no failure in {interleavings} interleavings {within} ({counts}), but not a "
                f"proof: {progress['divergences']} round(s) could not follow their schedule "
                "(the test takes another path for the same schedule from round to round)"
            )
        why = self.stopped_by or f"the --ftrace-explore-rounds budget ({self.max_rounds})"
        return (
            f"no failure in {interleavings} interleavings {within} ({counts}); stopped by "
            f"{why} with {progress['pending']} branch(es) known and not run: the search did "
            "not finish, so this is not a proof (raise the budget or lower --ftrace-bound)"
        )


MODE = ExploreMode
