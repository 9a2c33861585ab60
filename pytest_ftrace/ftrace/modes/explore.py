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
terminal summary: "no failure in all N interleavings of T threads within B preemptions (M
executions, pruned from at least K)", or, when the budget ran out first, how far the search got.

Every execution starts from the test's starting state, as exact mode's rounds do
(ftrace/snapshot.py, the default `--ftrace-rounds snapshot`): they run in this process while
each leaves the project's module state as it found it (most tests: nothing to pay but one idle
fork per test); once one changes it, each execution runs in a child forked from the snapshot
of the starting state. The child gets the search tree with its request (`forked_state`: the
whole tree, whose prefix is the schedule it follows), runs the execution, which advances the
tree there exactly as here (its steps, their accesses, its races, the next branch), and sends
it back with the round's outcome; this process goes on from that tree. So a first-fill race (a
module-level cache filled on first use) is there in every execution, not only the first, and
an execution follows its prefix instead of diverging from it on the state earlier ones left.
A forked execution costs several in-process ones (benches/README.md). With `--ftrace-rounds
process` every execution runs here and sees the state the ones before it left: a test whose
steps then differ from round to round for the same schedule makes the search diverge, which
the summary line says.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import _thread
import sys
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
        "MAKE_FUNCTION SET_FUNCTION_ATTRIBUTE END_FOR POP_ITER NOT_TAKEN GET_ITER KW_NAMES"
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
    # A loop's step is a point only over a container's iterator (rust/iterpoints.rs): it
    # reads the container and advances the iterator, which another thread may share; the
    # iterator is on the frame's stack, out of reach here, so it is any container's items.
    "FOR_ITER": (_WRITE, "item"),
}
# Builtins whose call changes nothing shared: those that read no container's items, and
# those that read them (their step reads "item").
_PURE_SCALAR = frozenset(
    "range isinstance issubclass id type int float bool str abs hash callable iter enumerate "
    "zip reversed divmod round chr ord object".split()
)
# A call's callable sits below its arguments and a NULL (3.12: NULL, callable; 3.13:
# callable, NULL): how far below the top of the stack, past N arguments, is N + this.
_NULL_BELOW = sys.version_info < (3, 13)
_CALLABLE_SLOT = 1 if _NULL_BELOW else 2
# Builtins whose iterators give new exact tuples (their items unpacked run no code).
_TUPLE_ITERATORS = frozenset(("enumerate", "zip"))
_PURE_ITEMS = frozenset("len min max sum sorted any all list tuple set frozenset dict".split())
# Methods of the built-in containers that run no code of the items' (no comparison): whether
# each writes the container's items (else it reads them). A call of one is a step on "item".
_CONTAINER_METHODS = {
    dict: {
        **dict.fromkeys("get keys values items copy".split(), False),
        **dict.fromkeys("setdefault pop popitem update clear".split(), True),
    },
    list: {
        "copy": False,
        **dict.fromkeys("append extend insert pop clear reverse".split(), True),
    },
    set: {
        **dict.fromkeys("copy issubset issuperset isdisjoint".split(), False),
        **dict.fromkeys("add discard pop clear update".split(), True),
    },
}
# Methods of the built-in sequences that compare their items with the argument (`==`): a
# read of the items that runs no code of theirs when the argument and every item are of these
# exact types (`Classifier._compares_natively`).
_COMPARING = frozenset(("count", "index"))
_NATIVE_EQ = (int, str, bytes, float, bool)
# Types whose attributes are their type's (no instance dict, the type not changeable).
_FIXED_ATTRS = (list, dict, set, frozenset, tuple)
# The most items `_compares_natively` looks at (a longer sequence: opaque).
_COMPARE_LIMIT = 1000
# Instructions that push one value and read nothing shared (the key of a subscript).
_PLAIN_LOADS = frozenset(
    "LOAD_FAST LOAD_FAST_CHECK LOAD_FAST_BORROW LOAD_CONST LOAD_SMALL_INT".split()
)


_FUNCTION = type(lambda: None)
_LOCAL_LOADS = frozenset(
    "LOAD_FAST LOAD_FAST_CHECK LOAD_FAST_BORROW LOAD_FAST_LOAD_FAST LOAD_CONST".split()
)
# Instructions that push a local's value (what `_value_at` finds in the frame is what they
# pushed: no other thread rebinds a frame's locals).
_OWN_LOADS = frozenset(
    "LOAD_FAST LOAD_FAST_CHECK LOAD_FAST_BORROW LOAD_FAST_LOAD_FAST STORE_FAST_LOAD_FAST".split()
)
# Instructions whose pushed value is computed (no object loaded from the frame).
_COMPUTED = frozenset(
    "BINARY_OP BINARY_SUBSCR COMPARE_OP BUILD_TUPLE BUILD_LIST BUILD_SET BUILD_STRING CALL".split()
)


def _two(kind: int, key: str, writes: bool, other: str) -> tuple[int, str]:
    """The access of a step that does `kind` on `key` and reads or writes `other` too: 2 or
    1 on one key, 3 (both written) or 6 (the first read, the second written); two reads of two
    keys are opaque (no such access)."""
    if other == key:
        return (_WRITE if writes else kind), key
    if kind == _WRITE and writes:
        if other.startswith("lock:"):
            return 0, ""  # (3 is a release of that lock: no acquire would race with it)
        return 3, f"{key}\0{other}"
    if kind == _WRITE:
        return 6, f"{other}\0{key}"
    if writes:
        return 6, f"{key}\0{other}"
    return 0, ""


def _is_module(obj) -> bool:
    return type(obj) is type(sys)


def _pure_function(function) -> bool:
    """Functions whose call reads and changes nothing shared: the calling thread's id, and the
    constructors of the standard library's locks, synchronisation objects and containers
    (the new object is the caller's own: what it does to it is keyed by that object)."""
    import threading

    if function is threading.get_ident or function is _thread.get_ident:
        return True
    try:
        return function in _new_objects()
    except TypeError:  # unhashable: none of them
        return False


_NEW_OBJECTS: frozenset | None = None


def _new_objects() -> frozenset:
    """The constructors `_pure_function` takes (threading's, as patched or not, queue's,
    collections'), found once."""
    global _NEW_OBJECTS
    if _NEW_OBJECTS is None:
        import collections
        import queue
        import threading

        from pytest_ftrace import _native

        found = {_native.lock, _native.RLock, _thread.allocate_lock, _thread.RLock}
        found.update(
            getattr(threading, name)
            for name in "Lock RLock Condition Event Semaphore BoundedSemaphore Barrier".split()
        )
        found.update((queue.Queue, queue.LifoQueue, queue.PriorityQueue, queue.SimpleQueue))
        found.update((collections.deque, collections.OrderedDict, collections.defaultdict))
        _NEW_OBJECTS = frozenset(found)
    return _NEW_OBJECTS


def _deque_type():
    import collections

    return collections.deque


_CONTAINER_DEQUE = dict.fromkeys(
    "append appendleft pop popleft extend extendleft clear rotate".split(), True
)
# Native table entries (rust/opcodes.rs)
_ALWAYS, _ONLY_ARG, _KIND_ITERATION = 0x100, 0x200, 0x2000
# The most instructions a step's classification follows before it calls the step opaque.
_SCAN_LIMIT = 400


_CO_OPTIMIZED = 0x1


class _Recording:
    """The lookups of one classification (see `Classifier.answer`)."""

    __slots__ = ("ok", "probes", "objects", "numbers", "order")

    def __init__(self):
        self.ok = True
        self.probes: list[tuple] = []
        self.objects: list = []
        self.numbers: dict[int, int] = {}
        self.order: list[int] = []


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

    def __init__(self, bodies=(), scope=None):
        import opcode

        from pytest_ftrace import _native

        self.hooked = _native.hooked_opcodes()
        self.bodies = {id(code) for code in bodies}
        self._keep = list(bodies)
        self.scope = scope  # instrument.Scope: the code that has points of its own
        self._dynamic = False  # the classification under way looked at the callers
        self._dynamic_token: object | None = None
        self._callers: tuple | None = None
        # Locations whose answer depends on the callers, and the answers by call chain.
        self.dynamic_locations: set[tuple[int, int]] = set()
        self.by_chain: dict[tuple, tuple[int, str, bool]] = {}
        self._with_lock = False  # the step's BEFORE_WITH enters a schedulable lock
        self._per_object = False  # the answer depends on an object: asked at every visit
        self._frame_now: tuple | None = None  # (code, live frame) being classified
        self._released: str | None = None  # the lock the step's `with` block releases
        self._extra: tuple[bool, str] | None = None  # a container method the step calls
        self._pure_at: int | None = None  # where the step calls the builtin it loaded
        self._crossed = False  # the last _stack_source went back past a call
        self._point_at = -1  # the offset of the point whose step is being classified
        self._live_depth = 0  # the scan's depth of the live frame's code (a caller's: > 0)
        self.lock_types = (_native.lock, _native.RLock)
        # The key of a lock or of a container's items is the object's order of first use in
        # the round, not its address: each round may make its own objects, and the tree
        # compares the steps of an execution's prefix (named in an earlier round) with its
        # new ones. The numbers are the native core's (`explore_object_number`, which keeps
        # the objects until the round ends: no address is reused in it), so that the steps
        # it answers without Python (see `answer`) number them alike.
        # The objects a classification looked up in the live frames, as the native core can
        # look them up again at the next visit (`_look`): None when none is under way.
        self._recording: _Recording | None = None
        self._base = None  # the live frame being classified (depth 0 of the lookups)
        self._callers_used = False  # the answer depends on the callers' code and offsets
        self._lock_steps: dict[tuple, tuple[int, bool]] = {}
        # (live frame, offset of a method load) -> the object it found (`_remember_owner`)
        self.owners: dict[tuple[int, int], object] = {}
        self._call_in_step = False  # `_method` found the method's call in the step
        self._fixed_attr = False  # the step starts at the load of a built-in container's method
        self.codes: dict[int, tuple[object, dict]] = {}
        nb_ops = [name for name, _sym in getattr(opcode, "_nb_ops", ())]
        self.inplace_from = next(
            (i for i, name in enumerate(nb_ops) if name.startswith("NB_INPLACE")), 0
        )

    def __call__(self, code, offset: int) -> tuple[int, str, bool]:
        """(kind, key, whether the answer depends on the callers: asked at every visit)."""
        return self.answer(code, offset)[:3]

    def answer(self, code, offset: int) -> tuple[int, str, bool, tuple | None]:
        """What the native core asks: (kind, key, dynamic, template). A dynamic answer (one
        that depends on the objects the step works on, or on its callers) comes with a
        template when the core can give it again without Python at the next visits: (whether
        it depends on the callers, the lookups made in the live frames as (frame depth, 0 a
        local | 1 a global | 2 a local's instance attribute, name, attribute), the type each
        found (None: nothing or None), for each lookup the first one that found the same
        object, {number in the key: lookup}, the lookups in the order their objects were
        numbered). The core then does the lookups itself, and while their types, which ones
        found the same object and (for an answer that depends on them) the callers' code and
        offsets are as they were, its answer is this one with the objects numbered afresh
        (by first use in the round, as `object_key`): the key carries each number between
        two \x01 (the core drops them). None: ask again at every visit."""
        try:
            where = (id(code), offset)
            chain = None
            if where in self.dynamic_locations:
                chain = (where, self._chain(code))
                found = self.by_chain.get(chain)
                if found is not None:
                    return found
            self._per_object = False
            self._callers_used = False
            self._recording = _Recording()
            try:
                found = self.classify(code, offset)
                template = self._template() if found[2] else None
            finally:
                self._recording = None
                self._base = None
            found = (*found, template)
            if found[2] and not self._per_object:
                self.dynamic_locations.add(where)
                self.by_chain[chain or (where, self._chain(code))] = found
            return found
        except Exception:  # noqa: BLE001 - an unknown step is opaque, never an error
            return 0, "", False, None

    def _template(self) -> tuple | None:
        """The recorded lookups of the classification just made, as `answer` gives them."""
        rec = self._recording
        if rec is None or not rec.ok:
            return None
        types = [None if obj is None else type(obj) for obj in rec.objects]
        same = [
            next(j for j, other in enumerate(rec.objects) if other is obj) for obj in rec.objects
        ]
        return (self._callers_used, rec.probes, types, same, rec.numbers, rec.order)

    def _look(self, frame, how: int, name: str, attr: str | None = None):
        """Look an object up in live `frame` (0: its local `name`, 1: its global `name`, 2:
        the attribute `attr` in the instance dict of its local `name`), recording the lookup
        for the native core (see `answer`). None when there is nothing there."""
        if how == 1:
            found = frame.f_globals.get(name)
        else:
            found = frame.f_locals.get(name)
            if how == 2:
                found = getattr(found, "__dict__", {}).get(attr)
        rec = self._recording
        if rec is not None and rec.ok:
            depth = 0
            at = self._base
            while at is not None and at is not frame and depth < 8:
                at, depth = at.f_back, depth + 1
            # module-level code's "locals" are its globals: the core looks up a frame's
            # variables only
            if at is not frame or (how != 1 and not frame.f_code.co_flags & _CO_OPTIMIZED):
                rec.ok = False
            else:
                rec.probes.append((depth, how, name, attr))
                rec.objects.append(found)
        return found

    def _not_again(self) -> None:
        """The answer depends on more than the lookups' types: asked at every visit."""
        if self._recording is not None:
            self._recording.ok = False

    @staticmethod
    def _chain(code) -> tuple:
        """Where the frame running `code` and its callers are (a few levels up)."""
        import sys

        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        out = []
        while frame is not None and len(out) < 5:
            out.append((id(frame.f_code), frame.f_lasti))
            frame = frame.f_back
        return tuple(out)

    def _instructions(self, code) -> dict:
        found = self.codes.get(id(code))
        if found is None or found[0] is not code:
            import dis

            listed = list(dis.get_instructions(code))
            by_offset = {}
            for index, ins in enumerate(listed):
                following = listed[index + 1].offset if index + 1 < len(listed) else None
                previous = listed[index - 1].offset if index else None
                by_offset[ins.offset] = (ins, following, previous)
            found = (code, by_offset, [ins.offset for ins in listed])
            self.codes[id(code)] = found
        return found[1]

    def _after_call(self, code, lasti: int):
        """The offset a frame of `code` goes on at once the call at `lasti` returns."""
        import bisect

        self._instructions(code)
        offsets = self.codes[id(code)][2]
        index = bisect.bisect_right(offsets, lasti)
        return offsets[index] if index < len(offsets) else None

    def _point(self, ins) -> str | None:
        """'always' / 'maybe' (a loop step, a point for some iterators) / None."""
        entry = self.hooked[ins.opcode] if ins.opcode < len(self.hooked) else 0
        mode = entry & 0x0F00
        if mode == _ALWAYS or (mode == _ONLY_ARG and ins.arg == entry & 0xFF):
            return "maybe" if entry & 0xF000 == _KIND_ITERATION else "always"
        return None

    def classify(self, code, offset: int) -> tuple[int, str, bool]:
        instructions = self._instructions(code)
        first, following, _ = instructions[offset]
        what = _ACCESSES.get(first.opname)
        if what is None:
            return 0, "", False
        kind, family = what
        key = family if family == "item" else f"{family}:{first.argval}"
        frame = self._frame(code)
        self._base = frame
        self._point_at = offset
        globals_ = frame.f_globals if frame is not None else None
        pure = None  # the builtin this step calls, if it loads one
        if first.opname == "LOAD_GLOBAL" and first.argval in _PURE_SCALAR | _PURE_ITEMS:
            if globals_ is not None and first.argval not in globals_:
                pure = first.argval
        returns = "end" if id(code) in self.bodies else frame
        self._dynamic = False
        if family == "item" and frame is not None:
            key = self._items_key(instructions, offset, frame)
        self._fixed_attr = False
        if family == "attr" and frame is not None:
            key = self._attr_key(instructions, offset, frame, key)
        if first.opname == "LOAD_ATTR" and first.arg & 1 and frame is not None:
            pure = self._method(instructions, offset, frame)  # obj.method(args) in this step
            if not self._call_in_step:
                # the call that takes it comes in a later step (after a call among its
                # arguments, or past a point): keep the object it works on for that step
                self._remember_owner(instructions, offset, frame)
            if pure is not None and pure[0] == "item":
                kind, key = (_WRITE if pure[2] else _READ), pure[3]
        self._with_lock = self._enters_lock(instructions, offset, frame)
        self._frame_now, self._released = (code, frame), None
        self._extra = self._pure_at = None
        try:
            # (a loop's step goes on into the loop's body or past its end: both paths)
            start = offset if first.opname == "FOR_ITER" else following
            found = self._scan(instructions, start, returns, pure, globals_)
        finally:
            self._with_lock = False
            self._frame_now = None
        dynamic = self._dynamic
        if found is None:
            return 0, "", dynamic
        writes, called, _returned = found
        if isinstance(called, str) and called in _PURE_ITEMS:
            key = "item"  # what the builtin reads; nothing writes the builtin's name
            call = instructions[self._pure_at][0] if self._pure_at is not None else None
            if call is not None and call.arg == 1 and frame is not None:
                source = self._stack_source(instructions, self._pure_at, 1)
                if source is not None:  # len(items): the items of that container
                    self._per_object = True
                    key = self._items_of(self._value_at(instructions, source, frame))
                    dynamic = True
        kind = _WRITE if writes else kind
        extra, self._extra = self._extra, None
        if self._fixed_attr and not writes and self._released is None:
            # the load of a built-in container's method (`m = items.count`): the step is
            # the method's call if it makes it, else nothing shared
            self._fixed_attr = False
            if extra is None:
                return 5, "", dynamic
            return (_WRITE if extra[0] else _READ), extra[1], dynamic
        self._fixed_attr = False
        if self._released is not None:  # the step leaves a `with lock:` block
            if extra is not None:
                return 0, "", dynamic
            return 3, f"{key}\0{self._released}", dynamic
        if extra is None:
            return kind, key, dynamic
        return (*_two(kind, key, *extra), dynamic)

    def start_safe(self, code, globals_=None) -> bool:
        """Whether the start of `code` (a test's body) up to its first point is safe."""
        try:
            instructions = self._instructions(code)
            found = self._scan(instructions, min(instructions), "end", None, globals_)
            self._dynamic = False
        except Exception:  # noqa: BLE001 - unknown: not safe
            return False
        return found is not None and not found[0]

    def _scan(self, instructions, start, returns: str, pure, globals_, depth: int = 0):
        """Follow every path from offset `start` to the next points: None when one runs an
        opaque instruction, else (whether an in-place operator ran, the pure builtin called,
        whether a path returned). `returns`: what a return is: the end of the thread's round
        ("end"), the end of a callee ("report"), a return into the caller of this live frame
        (its code goes on after its call: the answer depends on the callers), or opaque
        (None: a caller not known here)."""
        writes = False
        called = None
        returned = False
        live = depth == self._live_depth  # the code of the live frame being classified
        todo = [(start, None)]  # (offset, the last instruction before it that was no jump)
        seen: set[int] = set()
        while todo:
            at, last = todo.pop()
            if at is None:
                return None  # ran off the end: cannot happen in valid code
            if at in seen:
                continue
            seen.add(at)
            if len(seen) > _SCAN_LIMIT:
                return None
            ins, after, _ = instructions[at]
            point = self._point(ins)
            if point == "always":
                continue  # the step ends at this point
            name = ins.opname
            if name in _JUMPS:
                todo.append((ins.argval, last))
                continue
            if name == "LOAD_ASSERTION_ERROR" and returns == "end":
                # a failing assert in the test's body: the execution fails there (the search
                # stops at it), so what the path does after that depends on no order
                returned = True
            elif (
                name in _SAFE
                or (name == "UNPACK_SEQUENCE" and last in ("BUILD_TUPLE", "BUILD_LIST"))
                or (
                    name == "UNPACK_SEQUENCE"
                    and last == "FOR_ITER"
                    and self._loop_of_tuples(instructions, at, globals_)
                )
                or (name in ("LIST_EXTEND", "SET_UPDATE") and last == "LOAD_CONST")
            ):
                # (a list or set display of constants: the new object is extended by a tuple)
                todo.append((after, name))
            elif name == "BINARY_OP":
                if ins.arg is None or ins.arg >= self.inplace_from:
                    writes = True
                todo.append((after, name))
            elif name in _BRANCHES or point == "maybe":
                todo.extend(((after, name), (ins.argval, name)))
            elif name == "BEFORE_WITH" and self._with_lock:
                continue  # the lock's own point ends the step (lock_step describes the next)
            elif name == "BEFORE_WITH" and live and self._sync_step(instructions, at):
                todo.append((after, name))  # `with cond:`: an operation on cond's lock
            elif name == "CALL" and live and self._sync_exit(instructions, at):
                todo.append((after, name))
            elif name in _RETURNS and returns in ("end", "report"):
                returned = True  # the round ends, or the callee's caller goes on
            elif name in _RETURNS and returns is not None and depth < 3:
                if not self._into_caller(returns, depth):
                    return None
            elif name in ("CALL", "CALL_KW") and isinstance(pure, tuple) and at == pure[1]:
                called = pure  # the method the step loaded
                if pure[0] == "item":
                    writes = writes or pure[2]
                    todo.append((after, name))
                    continue
                inner = self._instructions(pure[2].__code__)
                found = self._scan(
                    inner, min(inner), "report", None, pure[2].__globals__, depth + 1
                )
                if found is None:
                    return None
                writes = writes or found[0]
                if found[2]:
                    todo.append((after, name))
            elif (
                name == "CALL"
                and isinstance(pure, str)
                and called is None
                and self._calls_first(instructions, at)
            ):
                called = pure  # the builtin the step loaded (the first call on every path)
                self._pure_at = at
                todo.append((after, name))
            elif name == "CALL_KW" and live:  # 3.13: keyword names on the stack
                method = self._container_call(instructions, at)
                if method is None or self._extra not in (None, method):
                    return None
                self._extra = method
                todo.append((after, name))
            elif name == "CALL" and self._lock_exit(instructions, at):
                continue  # the release's own point ends the step
            elif name == "CALL" and depth < 3:
                callee = self._callee(instructions, at, globals_, live)
                if callee is None:
                    if self._pure_builtin_call(instructions, at, globals_):
                        todo.append((after, name))
                        continue
                    method = self._container_call(instructions, at) if live else None
                    if method is None or self._extra not in (None, method):
                        return None
                    self._extra = method  # the step's second key
                    todo.append((after, name))
                    continue
                if callee is object.__init__:  # a constructor that runs no code of its own
                    todo.append((after, name))
                    continue
                if callee.__code__.co_flags & 0x2A0:  # generator, coroutine: no code runs
                    todo.append((after, name))
                    continue
                inner = self._instructions(callee.__code__)
                found = self._scan(inner, min(inner), "report", None, callee.__globals__, depth + 1)
                if found is None:
                    return None
                writes = writes or found[0]
                if found[2]:
                    todo.append((after, name))  # it can return without a point: caller goes on
            else:
                return None
        return writes, called, returned

    def _method(self, instructions, offset: int, frame):
        """`obj.name(args)` made in the step from the method load at `offset` (its arguments
        loaded without a point or a call): ("item", call offset, writes) for a method of a
        built-in container that runs none of the items' code, ("call", call offset, function)
        for a plain Python function of the hooked scope (its code up to its points is part of
        the step); else None. The object is looked up in the live frame (a local, a global, or
        a local's attribute in its instance dict): the answer depends on it, so it is asked
        at every visit. Nothing has run since the object was loaded (the thread holds the
        turn from the point before)."""
        import dis
        import types

        at = instructions[offset][1]
        pushed = 0  # the values pushed since the method's load: its arguments
        self._call_in_step = False
        while at is not None:
            ins, following, _ = instructions[at]
            if ins.opname in ("CALL", "CALL_KW"):
                if pushed != ins.arg + (ins.opname == "CALL_KW"):
                    return None  # a call among the arguments (`d.setdefault(k, make())`)
                self._call_in_step = True
                break
            if ins.opname not in _SAFE and ins.opname not in ("BINARY_OP", "KW_NAMES"):
                return None
            arg = ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None
            pushed += dis.stack_effect(ins.opcode, arg, jump=False)
            if self._point(ins) is not None or getattr(ins, "is_jump_target", False):
                return None
            at = following
        else:
            return None
        call_at = at
        name = instructions[offset][0].argval
        owner = self._loaded(instructions, offset, frame)
        self._dynamic = self._per_object = True
        if owner is None:
            return None
        kind = type(owner)
        table = _CONTAINER_METHODS.get(kind)
        if table is None and kind.__module__ == "collections" and kind.__name__ == "deque":
            table = _CONTAINER_DEQUE
        if table is not None:
            writes = table.get(name)
            if writes is None and self._compares_natively(
                instructions, call_at, frame, owner, name
            ):
                writes = False
            if writes is None:
                return None
            return ("item", call_at, writes, self.object_key(owner, "item"))
        sync = self._sync_key(owner) if not name.startswith("_") else None
        if sync is not None:
            return ("item", call_at, True, sync)
        if self.scope is None or kind.__getattribute__ is not object.__getattribute__:
            return None
        self._not_again()  # the instance's own dict may hold the name
        if name in getattr(owner, "__dict__", ()):
            return None
        function = None
        for klass in kind.__mro__:
            if name in klass.__dict__:
                function = klass.__dict__[name]
                break
        if not isinstance(function, types.FunctionType):
            return None
        code = function.__code__
        if code.co_flags & 0x2A0 or not self.scope.contains(code.co_filename, function.__module__):
            return None
        return ("call", call_at, function)

    def _items_key(self, instructions, offset: int, frame) -> str:
        """The key of the items a subscript or `in` at `offset` works on: "item:N" for a
        built-in container found in the live frame (the instruction that loaded it, found by
        following the stack back through plain loads, copies and swaps: `d[k] += 1` loads its
        container once and copies it), else "item" (any container's items)."""
        name = instructions[offset][0].opname
        # the container's slot on the stack, counted from the top (1: the top)
        slot = {
            "CONTAINS_OP": 1,
            "BINARY_SUBSCR": 2,
            "DELETE_SUBSCR": 2,
            "STORE_SUBSCR": 2,
            "BINARY_SLICE": 3,
            "STORE_SLICE": 3,
        }.get(name)
        if slot is None:
            return "item"
        found = self._stack_source(instructions, offset, slot)
        if found is None:
            return "item"
        self._dynamic = self._per_object = True
        return self._items_of(self._value_at(instructions, found, frame))

    def _attr_key(self, instructions, offset: int, frame, key: str) -> str:
        """The key of the attribute the instruction at `offset` loads, stores or deletes:
        "attr:NAME@N" for the round's object N, found in the live frame (its owner is on top
        of the stack: followed back as a subscript's container is), else "attr:NAME" (any
        object's NAME). Keyed per object, a step on an object that only its thread holds (one
        it made in the round and has not published) depends on no other thread's step, and
        one on a shared object depends on every other thread's step on that object's name,
        whoever made it and however it was published."""
        ins, _following, previous = instructions[offset]
        before = instructions[previous][0] if previous is not None else None
        if (
            ins.opname == "LOAD_ATTR"
            and not ins.arg & 1  # a method's load (`d.get(k)`): its call is the step's key
            and before is not None
            and before.opname in _OWN_LOADS
            and not getattr(ins, "is_jump_target", False)
        ):
            # the owner is the local the instruction before pushed (3.13's
            # STORE_FAST_LOAD_FAST, LOAD_FAST_LOAD_FAST: the second name): a built-in
            # container's attribute is its type's method, which no thread can rebind (the
            # step's access is what the method's call does, if the step makes it)
            name = before.argval[1] if isinstance(before.argval, tuple) else before.argval
            self._dynamic = self._per_object = True
            if type(self._look(frame, 0, name)) in _FIXED_ATTRS:
                self._fixed_attr = True
        found = self._stack_source(instructions, offset, 1)
        # only a local's value: one loaded from a global or an attribute before this point
        # may have been rebound by another thread since (the frame would name another object)
        if found is None or instructions[found[0]][0].opname not in _OWN_LOADS:
            return key
        self._dynamic = self._per_object = True
        owner = self._value_at(instructions, found, frame)
        if owner is None:
            return key
        return f"{key}@{self.object_key(owner, 'object').partition(':')[2]}"

    def _value_at(self, instructions, found, frame):
        """The object a `_stack_source` answer pushed, looked up in live `frame` (a local, a
        global, a closure's variable, a local's attribute), or None."""
        at, which = found
        ins = instructions[at][0]
        if ins.opname == "LOAD_FAST_LOAD_FAST":
            # 3.13: two locals in one instruction, the first pushed first (deeper)
            return self._look(frame, 0, ins.argval[1 if which == 1 else 0])
        if ins.opname == "STORE_FAST_LOAD_FAST":
            return self._look(frame, 0, ins.argval[1])
        following = instructions[at][1]
        if following is None or which != 1:
            return None
        return self._loaded(instructions, following, frame)

    def _container_call(self, instructions, call_at: int):
        """The CALL at `call_at` calls a method of a built-in container loaded as a method
        (`obj.append(...)`, the load in an earlier step or this one): (writes, key of its
        items), or None. Only in the live frame being classified."""
        current = self._frame_now
        call = instructions[call_at][0]
        if current is None or current[1] is None or call.arg is None:
            return None
        if self._instructions(current[0]) is not instructions:
            return None
        args = call.arg + (call.opname == "CALL_KW")  # its keyword names' tuple on top
        found = self._stack_source(instructions, call_at, args + 2)
        load = instructions[found[0]][0] if found is not None else None
        if load is None or load.opname != "LOAD_ATTR" or not load.arg & 1 or found[1] != 2:
            # the bound method loaded first (`m = obj.name`, then `m(...)`: how pytest's
            # assertion rewriting calls one)
            found = self._stack_source(instructions, call_at, args + _CALLABLE_SLOT)
            load = instructions[found[0]][0] if found is not None else None
            if load is None or load.opname != "LOAD_ATTR" or load.arg & 1:
                return None
        source = self._stack_source(instructions, found[0], 1, self._crossed)
        self._dynamic = self._per_object = True
        if source is not None:
            owner = self._value_at(instructions, source, current[1])
        elif load.arg & 1 and (id(current[1]), found[0]) in self.owners:
            # past a call (`d.setdefault(k, make())`): the object this frame's method load
            # found when it ran, not the name's value now (not a lookup the core can repeat)
            self._not_again()
            owner = self.owners[id(current[1]), found[0]]
        else:
            return None
        table = _CONTAINER_METHODS.get(type(owner))
        if table is None and type(owner) is _deque_type():
            table = _CONTAINER_DEQUE
        writes = None if table is None else table.get(load.argval)
        if writes is None and self._compares_natively(
            instructions, call_at, current[1], owner, load.argval
        ):
            writes = False
        if writes is None:
            sync = self._sync_key(owner) if not load.argval.startswith("_") else None
            return None if sync is None else (True, sync)
        return writes, self.object_key(owner, "item")

    def _compares_natively(self, instructions, call_at: int, frame, owner, name) -> bool:
        """Whether the CALL at `call_at` of `owner.name(arg)` (`list.count`, `list.index`, ...:
        `_COMPARING`) runs no code of the items' or the argument's: a list, tuple or deque,
        one argument (a local's value, found in live `frame`) and every item of exact types
        whose `==` is the interpreter's own (`_NATIVE_EQ`). Then it is a read of the items.
        The answer depends on the items' values: asked at every visit."""
        if name not in _COMPARING or frame is None:
            return False
        if type(owner) not in (list, tuple, _deque_type()) or len(owner) > _COMPARE_LIMIT:
            return False
        call = instructions[call_at][0]
        if call.opname != "CALL" or call.arg != 1:
            return False
        found = self._stack_source(instructions, call_at, 1, True)
        if found is None:
            return False
        self._dynamic = self._per_object = True
        self._not_again()  # the items' types, not the owner's
        arg = self._value_at(instructions, found, frame)
        if arg is None or type(arg) not in _NATIVE_EQ:
            return False
        return all(type(item) in _NATIVE_EQ for item in list(owner))

    def _remember_owner(self, instructions, offset: int, frame) -> None:
        """Keep the object the method load at `offset` of live `frame` works on (found as
        `_method` finds it), for the call that takes it after a call among its arguments
        (`_container_call`); asked at every visit, so a frame's entry is its last visit's."""
        self._dynamic = self._per_object = True
        self._not_again()  # it keeps the object: no answer of the core's may skip it
        owner = self._loaded(instructions, offset, frame)
        where = (id(frame), offset)
        if owner is None:
            self.owners.pop(where, None)
        else:
            self.owners[where] = owner

    def _sync_key(self, obj) -> str | None:
        """The key of a synchronisation object of the standard library (a condition, event,
        semaphore, barrier or queue): that of the schedulable lock its methods work under, so
        that its operations depend on each other and on the lock's own (a condition made on a
        lock the test also takes directly), and on nothing else: they change only the object.
        None for anything else."""
        import queue
        import threading

        kind = type(obj)
        if kind.__module__ not in ("threading", "queue"):
            return None
        lock = None
        if isinstance(obj, threading.Condition):
            lock = obj._lock
        elif isinstance(obj, (threading.Event, threading.Semaphore, threading.Barrier)):
            lock = getattr(getattr(obj, "_cond", None), "_lock", None)
        elif isinstance(obj, queue.Queue):
            lock = obj.mutex
        if not isinstance(lock, self.lock_types):
            return None
        self._not_again()  # the key is that of an object found in this one
        return self.lock_key(lock)

    def _with_sync(self, instructions, before_with: int) -> tuple[bool, str] | None:
        """The `with` block entered at `before_with` (in the live frame being classified) is
        on a synchronisation object (`_sync_key`): (True, its key), else None."""
        current = self._frame_now
        if current is None or current[1] is None:
            return None
        if self._instructions(current[0]) is not instructions:
            return None
        source = self._stack_source(instructions, before_with, 1)
        if source is None:
            return None
        self._dynamic = self._per_object = True
        key = self._sync_key(self._value_at(instructions, source, current[1]))
        return None if key is None else (True, key)

    def _stack_source(self, instructions, offset: int, slot: int, locals_only: bool = False):
        """The instruction that pushed the value in stack slot `slot` (1: the top) as the
        instruction at `offset` starts, followed back over straight-line code (no jump target
        on the way) through loads, copies, swaps and operators: (its offset, which of its
        pushed values, 1: the last pushed), or None when it is not found so. Nothing on the
        way stores a local: the producer's local still holds the value. Past a call on the way
        (a value built for an argument) only a local's load counts: the call may have rebound
        a global or an attribute since (a method's load counts: its name is all it gives;
        `self._crossed` says whether a call was crossed). `locals_only`: only a local's load
        counts."""
        import dis

        at = offset
        crossed = locals_only  # a call on the way back
        for _ in range(40):
            if getattr(instructions[at][0], "is_jump_target", True):
                return None
            at = instructions[at][2]
            if at is None:
                return None
            ins = instructions[at][0]
            name = ins.opname
            if name == "COPY":
                slot = ins.arg if slot == 1 else slot - 1
                continue
            if name == "SWAP":
                slot = ins.arg if slot == 1 else 1 if slot == ins.arg else slot
                continue
            if name in _PLAIN_LOADS or name == "LOAD_DEREF":
                pops, pushes = 0, 1
            elif name == "LOAD_FAST_LOAD_FAST":
                pops, pushes = 0, 2
            elif name == "LOAD_GLOBAL" and not ins.arg & 1:
                pops, pushes = 0, 1
            elif name == "LOAD_GLOBAL":  # and a NULL: below it on 3.12, above on 3.13
                pops, pushes = 0, 2
                if slot == (1 if _NULL_BELOW else 2):
                    return at, 1
                if slot <= 2:
                    return None
            elif name == "LOAD_ATTR" and not ins.arg & 1:
                pops, pushes = 1, 1
            elif name == "LOAD_ATTR":  # a method and its object (2: the method, 1: the object)
                pops, pushes = 1, 2
            elif name in ("BINARY_OP", "BINARY_SUBSCR", "COMPARE_OP"):
                pops, pushes = 2, 1
            elif name == "POP_TOP":
                pops, pushes = 1, 0
            elif name in ("BUILD_TUPLE", "BUILD_LIST", "BUILD_SET", "BUILD_STRING"):
                pops, pushes = ins.arg, 1
            elif name == "CALL":
                pops, pushes = ins.arg + 2, 1
                crossed = True
            elif name == "PUSH_NULL":
                if slot == 1:
                    return None
                slot -= 1
                continue
            elif name == "KW_NAMES":
                continue
            elif name in ("STORE_FAST", "STORE_FAST_MAYBE_NULL"):
                pops, pushes = 1, 0
            elif name == "STORE_FAST_LOAD_FAST":  # 3.13: stores a local, loads another
                if slot != 1:
                    continue  # one popped, one pushed
                stored_name, loaded = ins.argval
                if loaded == stored_name:
                    continue  # the value it stored is the one it loads
                stored = self._stored(instructions, at, loaded)
                if stored is not None and stored >= self._point_at:
                    return self._stack_source(instructions, stored, 1, crossed)
                self._crossed = crossed
                return at, 1
            else:
                return None
            arg = ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None
            if dis.stack_effect(ins.opcode, arg, jump=False) != pushes - pops:
                return None  # not the effect this table has for it
            if slot <= pushes:
                if name in _COMPUTED:
                    return None  # a value computed here: no container of the frame's
                method = name == "LOAD_ATTR" and ins.arg & 1 and slot == 2
                if crossed and not method and name not in _LOCAL_LOADS:
                    return None
                if name in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"):
                    stored = self._stored(instructions, at, ins.argval)
                    if stored is not None and stored >= self._point_at:
                        # stored later in the step (assertion rewriting's temporaries): the
                        # frame does not hold the value yet, what the store takes does
                        return self._stack_source(instructions, stored, 1, crossed)
                self._crossed = crossed
                return at, slot
            slot += pops - pushes
        return None

    @staticmethod
    def _stored(instructions, at: int, name: str):
        """The STORE_FAST of local `name` that the load at `at` reads, when it is found
        going back over straight-line code (no jump target on the way), or None."""
        for _ in range(40):
            if getattr(instructions[at][0], "is_jump_target", True):
                return None
            at = instructions[at][2]
            if at is None:
                return None
            ins = instructions[at][0]
            if ins.opname == "STORE_FAST" and ins.argval == name:
                return at
            if ins.opname == "STORE_FAST_LOAD_FAST" and ins.argval[0] == name:
                return at
            if ins.opname == "STORE_FAST_STORE_FAST" and name in ins.argval:
                return None
            if ins.opname == "DELETE_FAST" and ins.argval == name:
                return None
        return None

    def _items_of(self, owner) -> str:
        """ "item:N" for a built-in container (or tuple), else "item"."""
        kind = type(owner)
        if owner is None or not (kind in _CONTAINER_METHODS or kind in (tuple, _deque_type())):
            return "item"
        return self.object_key(owner, "item")

    def _loaded(self, instructions, offset: int, frame):
        """The object the instructions right before `offset` loaded (a local, a global, a
        closure's variable, or a local's attribute from its instance dict), or None."""
        previous = instructions[offset][2]
        if previous is None:
            return None
        ins, _, before = instructions[previous]
        if ins.opname in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_DEREF"):
            return self._look(frame, 0, ins.argval)
        if ins.opname == "LOAD_GLOBAL" and not ins.arg & 1:
            return self._look(frame, 1, ins.argval)
        if ins.opname == "LOAD_ATTR" and not ins.arg & 1 and before is not None:
            holder_ins = instructions[before][0]
            missing = object()
            holder = missing
            if holder_ins.opname in ("LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"):
                if ins.argval != "__dict__":
                    return self._look(frame, 2, holder_ins.argval, ins.argval)
                holder = frame.f_locals.get(holder_ins.argval, missing)
            elif holder_ins.opname == "LOAD_GLOBAL" and not holder_ins.arg & 1:
                holder = frame.f_globals.get(holder_ins.argval, missing)
            if ins.argval == "__dict__" and type(holder) is _thread._local:
                # a thread-local object's attributes for the thread classified (the one at
                # the point): whichever such object it is, that dict is this thread's own.
                # Found without `_look`: the answer is asked of Python at every visit.
                self._dynamic = self._per_object = True
                self._not_again()
                return holder.__dict__
        return None

    def _enters_lock(self, instructions, offset: int, frame) -> bool:
        """Whether the step at `offset` loads a schedulable lock that the next instruction
        enters (`with lock:`, `with self.lock:`), looked up in the live frame."""
        following = instructions[offset][1]
        if frame is None or following is None:
            return False
        if instructions[following][0].opname != "BEFORE_WITH":
            return False
        return self._lock_loaded(instructions, offset, frame) is not None

    def _lock_exit(self, instructions, call_at: int) -> bool:
        """Whether the CALL at `call_at` ends a `with` block on a schedulable lock (the three
        None arguments of __exit__), in the frame being classified; records the lock's key."""
        current = self._frame_now
        call = instructions[call_at][0]
        if current is None or call.arg != 2:
            return False
        code, frame = current
        if frame is None or self._instructions(code) is not instructions:
            return False  # a callee's code, or a caller's other than the live one scanned
        at = instructions[call_at][2]
        for _ in range(3):  # LOAD_CONST None x 3 right before
            if at is None:
                return False
            ins, _, previous = instructions[at]
            if ins.opname != "LOAD_CONST" or ins.argval is not None:
                return False
            at = previous
        depth = 0  # the matching BEFORE_WITH, past the blocks nested in this one
        while at is not None:
            ins, following, previous = instructions[at]
            if ins.opname == "BEFORE_WITH":
                if depth == 0:
                    break
                depth -= 1
            elif ins.opname == "CALL" and ins.arg == 2 and self._exit_call(instructions, at):
                depth += 1
            at = previous
        if at is None or previous is None:
            return False
        found = self._lock_loaded(instructions, previous, frame)
        if found is None:
            return False
        self._released = self.lock_key(found)
        return True

    def _sync_step(self, instructions, before_with: int) -> bool:
        """Record the `with` block's entry at `before_with` when it is on a synchronisation
        object (`_sync_key`), as the step's second key."""
        found = self._with_sync(instructions, before_with)
        if found is None or self._extra not in (None, found):
            return False
        self._extra = found
        return True

    def _sync_exit(self, instructions, call_at: int) -> bool:
        """Record the exit of a `with` block on a synchronisation object at `call_at` (three
        None arguments), as the step's second key."""
        if instructions[call_at][0].arg != 2 or not self._exit_call(instructions, call_at):
            return False
        at = instructions[call_at][2]
        depth = 0  # the matching BEFORE_WITH, past the blocks nested in this one
        while at is not None:
            ins, _, previous = instructions[at]
            if ins.opname == "BEFORE_WITH":
                if depth == 0:
                    return self._sync_step(instructions, at)
                depth -= 1
            elif ins.opname == "CALL" and ins.arg == 2 and self._exit_call(instructions, at):
                depth += 1
            at = previous
        return False

    def _exit_call(self, instructions, at: int) -> bool:
        """Whether the CALL at `at` is a `with` block's exit (three None arguments)."""
        previous = instructions[at][2]
        for _ in range(3):
            if previous is None:
                return False
            ins, _, previous = instructions[previous]
            if ins.opname != "LOAD_CONST" or ins.argval is not None:
                return False
        return True

    def _lock_loaded(self, instructions, at: int, frame):
        """The schedulable lock the instruction at `at` loads in live `frame` (a global, or an
        attribute of a local found in its instance dict), or None."""
        ins, _, previous = instructions[at]
        found = None
        if ins.opname == "LOAD_GLOBAL":
            found = self._look(frame, 1, ins.argval)
        elif ins.opname == "LOAD_ATTR" and previous is not None and not ins.arg & 1:
            owner = instructions[previous][0]
            if owner.opname in ("LOAD_FAST", "LOAD_FAST_CHECK"):
                found = self._look(frame, 2, owner.argval, ins.argval)
        self._dynamic = self._per_object = True  # another object there may be no lock
        return found if isinstance(found, self.lock_types) else None

    def object_key(self, obj, family: str = "lock") -> str:
        """The key of a lock or of a container's items: the object's order of first use in
        the round (see `__init__`), between two \\x01 (see `answer`)."""
        from pytest_ftrace import _native

        number = _native.explore_object_number(obj)
        rec = self._recording
        if rec is not None and rec.ok:
            probe = next((i for i, other in enumerate(rec.objects) if other is obj), None)
            if probe is None:
                rec.ok = False  # an object the core cannot look up
            else:
                rec.numbers[number] = probe
                rec.order.append(probe)
        return f"{family}:\x01{number}\x01"

    def lock_key(self, lock) -> str:
        return self.object_key(lock, "lock")

    def new_round(self) -> None:
        """A round starts: its objects are numbered afresh."""
        from pytest_ftrace import _native

        _native.explore_new_round()
        self.owners = {}

    def lock_step(self, caller, lock, released: bool = False) -> tuple[int, str]:
        """The step from a lock operation's point (coop.POINT_ACCESS): `caller`'s code from
        after its call to its next points, and before it the acquire, or nothing after a
        release (which the step before the point made): a write of the lock, or nothing
        shared after a release, when that code is safe; else opaque.

        Whether that code is safe is kept per call site (and per callers' code and offsets
        when a return into them was followed), unless it looked at objects in a frame."""
        try:
            code = caller.f_code
            where = (id(code), caller.f_lasti)
            cached = self._lock_steps.get(where)
            if cached is not None and cached[0] is code:
                safe = cached[1]
                if safe is None:  # depends on the callers
                    safe = cached[2].get(self._chain_from(caller))
            else:
                safe = None
            if safe is None:
                safe = self._lock_step_safe(caller, code, where)[0]
        except Exception:  # noqa: BLE001 - unknown: opaque
            return 0, ""
        if not safe:
            return 0, ""
        if released:
            return 5, ""
        return 4, self.lock_key(lock)

    def lock_step_how(self, caller) -> tuple[bool, int]:
        """For the core's lock points (rust/lockstep.rs): whether the step from a lock
        operation's point in `caller` is safe (as `lock_step`), and what that depends on: 0
        the call site only, 1 also the chain of callers (`_chain_from`), 2 the visit (objects
        in a frame: asked again at every visit)."""
        try:
            code = caller.f_code
            return self._lock_step_safe(caller, code, (id(code), caller.f_lasti))
        except Exception:  # noqa: BLE001 - unknown: opaque, asked again
            return False, 2

    def _lock_step_safe(self, caller, code, where) -> tuple[bool, int]:
        self._dynamic_token = object()
        self._dynamic = self._per_object = self._callers_used = False
        returns = "end" if id(code) in self.bodies else caller
        found = self._scan(
            self._instructions(code),
            self._after_call(code, caller.f_lasti),
            returns,
            None,
            caller.f_globals,
        )
        safe = found is not None and not found[0]
        if not self._dynamic:
            self._lock_steps[where] = (code, safe, None)
            how = 0
        elif self._callers_used and not self._per_object:
            cached = self._lock_steps.get(where)
            if cached is None or cached[0] is not code or cached[1] is not None:
                cached = self._lock_steps[where] = (code, None, {})
            cached[2][self._chain_from(caller)] = safe
            how = 1
        else:
            how = 2
        self._dynamic = self._per_object = self._callers_used = False
        return safe, how

    @staticmethod
    def _chain_from(frame) -> tuple:
        """Where `frame` and its callers are (a few levels up)."""
        out = []
        while frame is not None and len(out) < 5:
            out.append((id(frame.f_code), frame.f_lasti))
            frame = frame.f_back
        return tuple(out)

    def _into_caller(self, frame, depth: int) -> bool:
        """A return from live `frame`: whether its caller's code, from after its call to its
        next points, is safe (once per scan and frame)."""
        self._dynamic = self._callers_used = True
        done = getattr(self, "_callers", None)
        if done is None or done[0] is not self._dynamic_token:
            done = self._callers = (self._dynamic_token, {})
        if id(frame) in done[1]:
            return done[1][id(frame)]
        caller = frame.f_back
        ok = False
        if caller is not None and self.scope is not None:
            code = caller.f_code
            module = caller.f_globals.get("__name__")
            if id(code) in self.bodies or self.scope.contains(code.co_filename, module):
                returns = "end" if id(code) in self.bodies else caller
                # the caller's code is live too: a `with lock:` block it leaves is known
                outer, self._frame_now = self._frame_now, (code, caller)
                saved = self._live_depth, self._point_at
                # its step, as far as the caller's stack goes, starts at its call
                self._live_depth, self._point_at = depth + 1, caller.f_lasti
                try:
                    found = self._scan(
                        self._instructions(code),
                        self._after_call(code, caller.f_lasti),
                        returns,
                        None,
                        caller.f_globals,
                        depth + 1,
                    )
                finally:
                    self._frame_now = outer
                    self._live_depth, self._point_at = saved
                ok = found is not None and not found[0]
        done[1][id(frame)] = ok
        return ok

    def _callee(self, instructions, call_at: int, globals_, live: bool = False):
        """The plain Python function in the hooked scope that the CALL at `call_at` calls,
        when the step loads it with LOAD_GLOBAL right before its arguments, or (`live`: the
        code of the live frame being classified) a local holds it (a factory passed in:
        `slot(name, Cls)`, asked at every visit); else None."""
        import dis

        call = instructions[call_at][0]
        if globals_ is None or self.scope is None or call.arg is None:
            return None
        if live and self._frame_now is not None and self._frame_now[1] is not None:
            found = self._stack_source(instructions, call_at, call.arg + _CALLABLE_SLOT)
            if found is not None and instructions[found[0]][0].opname in _OWN_LOADS:
                self._dynamic = self._per_object = True
                self._not_again()  # the answer depends on which function, not its type
                function = self._value_at(instructions, found, self._frame_now[1])
                return self._in_scope(function)
        need = call.arg + 2  # the callable, its self-or-NULL slot, the arguments
        depth = 0
        at = instructions[call_at][2]
        while at is not None:
            ins, _, previous = instructions[at]
            if getattr(ins, "is_jump_target", True):
                return None
            arg = ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None
            depth += dis.stack_effect(ins.opcode, arg, jump=False)
            if depth >= need:
                if depth != need or ins.opname != "LOAD_GLOBAL" or not ins.arg & 1:
                    return None
                function = globals_.get(ins.argval)
                break
            at = previous
        else:
            return None
        return self._in_scope(function)

    def _in_scope(self, function):
        """`function` when it is a plain Python function of the hooked scope, the `__init__`
        a class's call runs (`_constructor`), object.__init__ for a class that runs none;
        else None."""
        import types

        if isinstance(function, type):
            function = self._constructor(function)
            if function is object.__init__:
                return function
        if not isinstance(function, types.FunctionType):
            return None
        code = function.__code__
        if not self.scope.contains(code.co_filename, function.__module__):
            return None
        return function

    @staticmethod
    def _constructor(cls):
        """The code a call of class `cls` runs: its `__init__` when the rest is object's
        (plain metaclass, object's `__new__`): the new object is the step's own, so the
        constructor is a call of `__init__` (its points cut it as any function's);
        object.__init__ when it runs no code of its own; else None."""
        if type(cls) is not type or cls.__new__ is not object.__new__:
            return None
        init = cls.__init__
        if init is object.__init__:
            return init
        return init if isinstance(init, _FUNCTION) else None

    def _calls_first(self, instructions, call_at: int) -> bool:
        """Whether the CALL at `call_at` calls what the step's first instruction loaded (the
        builtin of a step that starts at its load: `len(x)`, not `make(dict)`)."""
        call = instructions[call_at][0]
        if call.arg is None:
            return False
        found = self._stack_source(instructions, call_at, call.arg + _CALLABLE_SLOT)
        return found is not None and found[0] == self._point_at

    def _loop_of_tuples(self, instructions, unpack_at: int, globals_) -> bool:
        """Whether the UNPACK_SEQUENCE at `unpack_at` unpacks the item of the loop just before
        it over an iterator that gives new exact tuples (`for i, x in enumerate(xs)`, `zip`):
        the loop's iterator made by a call of the builtin `enumerate` or `zip` (a global the
        module does not shadow) just before the loop. Unpacking such a tuple runs no code and
        touches nothing shared (getting the item is the loop's own step)."""
        loop_at = instructions[unpack_at][2]
        if loop_at is None or instructions[loop_at][0].opname != "FOR_ITER":
            return False
        get_iter = instructions[loop_at][2]
        while get_iter is not None and instructions[get_iter][0].opname == "EXTENDED_ARG":
            get_iter = instructions[get_iter][2]  # (the loop's long jump's)
        if get_iter is None or instructions[get_iter][0].opname != "GET_ITER":
            return False
        call_at = instructions[get_iter][2]
        call = instructions[call_at][0] if call_at is not None else None
        if call is None or call.opname != "CALL" or call.arg is None or globals_ is None:
            return False
        found = self._stack_source(instructions, call_at, call.arg + _CALLABLE_SLOT)
        if found is None:
            return False
        load = instructions[found[0]][0]
        return (
            load.opname == "LOAD_GLOBAL"
            and load.argval in _TUPLE_ITERATORS
            and load.argval not in globals_
        )

    def _pure_builtin_call(self, instructions, call_at: int, globals_) -> bool:
        """Whether the CALL at `call_at` calls a builtin of `_PURE_SCALAR` (loaded by a global
        not shadowed by the module, its result a function of its arguments, which read
        nothing shared), or a function of `_PURE_FUNCTIONS` loaded as a module's attribute."""
        call = instructions[call_at][0]
        if call.arg is None:
            return False
        found = self._stack_source(instructions, call_at, call.arg + _CALLABLE_SLOT)
        if found is None:
            return False
        ins = instructions[found[0]][0]
        if ins.opname == "LOAD_GLOBAL" and globals_ is not None and ins.argval in globals_:
            # a module's own name for a constructor of `_pure_function` (from threading
            # import Lock); the global may be rebound: asked at every visit
            self._dynamic = self._per_object = True
            self._not_again()  # the answer depends on the global's value, not its type
            return _pure_function(globals_[ins.argval])
        if ins.opname == "LOAD_GLOBAL":
            return ins.argval in _PURE_SCALAR and globals_ is not None
        if ins.opname in _OWN_LOADS:
            # a local holding a constructor of `_pure_function`, or a built-in container's
            # type called with no argument (a factory passed in: `slot(name, dict)`)
            current = self._frame_now
            if current is None or current[1] is None:
                return False
            if instructions is not self._instructions(current[0]):
                return False
            self._dynamic = self._per_object = True
            self._not_again()  # the answer depends on the local's value, not its type
            value = self._value_at(instructions, found, current[1])
            if value in (dict, list, set) and call.arg == 0:
                return True
            return _pure_function(value)
        if ins.opname == "LOAD_ATTR" and not ins.arg & 1:
            frame = self._frame_now[1] if self._frame_now is not None else None
            if frame is None or instructions is not self._instructions(self._frame_now[0]):
                return False
            source = self._stack_source(instructions, found[0], 1)  # the attribute's owner
            if source is None or source[1] != 1:
                return False
            load = instructions[source[0]][0]
            if load.opname != "LOAD_GLOBAL":
                return False
            owner = frame.f_globals.get(load.argval)
            self._dynamic = self._per_object = True  # the global may be rebound
            self._not_again()  # and the module's attribute
            function = getattr(owner, ins.argval, None) if _is_module(owner) else None
            return function is not None and _pure_function(function)
        return False

    def _frame(self, code):
        """The live frame running `code` (the caller's, up the stack), or None."""
        import sys

        self._dynamic_token = object()  # a new classification: callers not looked at yet
        frame = sys._getframe(1)
        for _ in range(40):  # the hook may call the classifier from the plugin's own code
            if frame is None or frame.f_code is code:
                break
            frame = frame.f_back
        if frame is None or frame.f_code is not code:
            return None
        return frame


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
    own_budget = True  # --ftrace-explore-rounds/-seconds, not --ftrace-budget

    def __init__(self, test: TestSession):
        self.bound, self.max_rounds, self.max_seconds = explore_settings(test.item.config)
        self.exploring = test.replay is None  # a replay follows the recorded schedule
        if self.exploring:
            test.iterations = self.max_rounds  # the rounds stop when the search is done
        self.started: float | None = None
        self.stopped_by: str | None = None  # what ended the search before its end
        self.decided: dict[int, bool] = {}
        self.decide_lock = _thread.allocate_lock()  # a real lock (threading's are scheduled)
        super().__init__(test)

    def native_options(self, session: FtraceSession, nodeid: str, replay) -> dict:
        if not self.exploring:
            return native_options(session, nodeid, replay)
        from pytest_ftrace import _native

        original = getattr(self.test.item.obj, "ftrace_body", (self.test.item.obj, True))[0]
        body = getattr(getattr(original, "__func__", original), "__code__", None)
        classifier = Classifier([body] if body is not None else [], session.instrumentation.scope)
        globals_ = getattr(getattr(original, "__func__", original), "__globals__", None)
        safe = body is not None and classifier.start_safe(body, globals_)
        self.classifier = classifier
        _native.set_access_classifier(classifier.answer, safe)
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
        if self.exploring:
            from pytest_ftrace import _native
            from pytest_ftrace.ftrace import coop

            coop.POINT_ACCESS = self.classifier.lock_step
            # the same points, made in the core (Python's lock_step is its check)
            _native.explore_lock_points(
                self.classifier.lock_step_how,
                self.classifier.lock_step,
                sorted(coop._SKIP_FILES),
                coop._HERE,
            )
        super().activate(watchdog)

    def deactivate(self) -> None:
        try:
            super().deactivate()
        finally:
            if self.exploring:
                from pytest_ftrace import _native
                from pytest_ftrace.ftrace import coop

                coop.POINT_ACCESS = None
                _native.explore_lock_points(None)
                _native.set_access_classifier(None)

    def progress(self) -> dict | None:
        return self.traced._native.explore_progress()

    def forked_state(self) -> bytes | None:
        """The search tree, for an execution in a child forked from the test's starting state
        (ftrace/fork.py, snapshot.py): it goes there with the request, the child's executions
        advance it, and it comes back with each of the child's messages (taken as its last
        round ended); this process goes on from it, so the tree here stays the one the next
        execution starts from. None for a replay (it follows its recorded schedule)."""
        return self.traced._native.explore_state() if self.exploring else None

    def resume_forked_state(self, state: bytes) -> None:
        if self.exploring:
            self.traced._native.explore_resume(state)

    def more_rounds(self, iteration: int, failures: int) -> bool:
        """Whether round `iteration` runs: decided once per round (every worker asks after
        the round barrier, when the rounds before it have ended), the same for all."""
        with self.decide_lock:
            found = self.decided.get(iteration)
            if found is None:
                found = self._more(failures)
                self.decided[iteration] = found
                if found and self.exploring:
                    self.classifier.new_round()  # the rounds before it have ended
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
            stats["interleavings"] = progress["pass_executions"]
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
        if progress.get("retried"):
            line += (
                f"; {progress['retried']} round(s) ran again: they were not exact (a thread ran "
                "outside the schedule, blocked in C or late on a loaded machine)"
            )
        self.test.session.explored.append((self.test.item.nodeid, line))
        outcome.notes.append(f"ftrace explore: {line}")

    def verdict(self, progress: dict) -> str:
        """What the search proved (or how far it got). The passes go by the bound (none, then
        at most one preemption, ...: ftrace/modes and rust/sched/explore.rs); the last one is
        the whole search within the bound asked for."""
        executions = progress["executions"]
        interleavings = progress["pass_executions"] - (
            progress["redundant"] if progress["done"] else 0
        )
        bound = progress["bound"]
        threads = self.test.threads

        def within(n: int) -> str:
            return f"within {n} preemption{'s' if n != 1 else ''}"

        counts = (
            f"{executions} execution{'s' if executions != 1 else ''}, pruned from at least "
            f"{executions + progress['pruned']}"
        )
        if progress["done"] and not progress["divergences"]:
            return (
                f"no failure in all {interleavings} interleavings of {threads} threads "
                f"{within(bound)} ({counts})"
            )
        if progress["done"]:
            return (
                f"no failure in {interleavings} interleavings of {threads} threads "
                f"{within(bound)} ({counts}), but "
                f"not a proof: {progress['divergences']} round(s) could not follow their "
                "schedule (the test takes another path for the same schedule from round to "
                "round)"
            )
        why = self.stopped_by or f"the --ftrace-explore-rounds budget ({self.max_rounds})"
        before = f" (every interleaving {within(bound - 1)} ran)" if bound else ""
        return (
            f"no failure in {interleavings} interleavings of {threads} threads "
            f"{within(bound)}{before} ({counts}); "
            f"stopped by {why} with {progress['pending']} branch(es) known and not run: the "
            f"search within {progress['target']} did not finish, so this is not a proof "
            "(raise the budget or lower --ftrace-bound)"
        )


MODE = ExploreMode
