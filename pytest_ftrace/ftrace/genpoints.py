"""Scheduling points beyond shared-state accesses (exact mode, `--ftrace`): generators,
iteration over containers, and code generated at run time.

- Generators and coroutines: a `yield` (also each step of `yield from` / `await`) is a point,
  hooked through the opcode table (rust/opcodes.rs: `YIELD_VALUE` is in the table with the
  generator kind). While a thread stands there the generator is still executing, so another
  thread's `next()` meets "generator already executing", and the code around the resumption
  runs after another thread's turn. The table can also make the first instruction after a
  resumption a point (`RESUME_POINTS`), off: it doubles the points of every generator step
  (most generators are local: `sum(x for x in ...)`) and finds nothing the yield does not.
- Iteration: a `FOR_ITER` step is a point when the iterator it advances is a dict, list, set or
  deque iterator. The native callback reads the iterator from the frame's value stack; where it
  lies there (the stack depth at that `FOR_ITER`) is computed here once per code object, by a
  flow analysis of the bytecode, and handed to the extension with `_native.set_iter_slots`.
  Only on interpreters whose frame layout the extension knows (3.12, 3.13); elsewhere loops are
  no points.
- Generated code: a code object whose file name is `<...>` (exec/compile of generated source,
  as dataclasses, attrs and namedtuple do), started from hooked code, is hooked too, unless an
  `--ftrace-exclude` glob matches its module or its file name.

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import dis
import sys
import threading
import weakref

# Whether the first instruction after a generator resumed is a point too (see above).
RESUME_POINTS = False

# The interpreters whose frame layout rust/iterpoints.rs reads (`_PyInterpreterFrame`).
ITER_POINTS = sys.version_info[:2] in ((3, 12), (3, 13))

# Instructions after which the next one in bytecode order is never reached by falling through.
_NO_FALLTHROUGH = frozenset(
    {
        "JUMP_FORWARD",
        "JUMP_BACKWARD",
        "JUMP_BACKWARD_NO_INTERRUPT",
        "JUMP",
        "JUMP_NO_INTERRUPT",
        "RETURN_VALUE",
        "RETURN_CONST",
        "RAISE_VARARGS",
        "RERAISE",
    }
)
_JUMPS = frozenset(getattr(dis, "hasjump", ())) | frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
_FOR_ITER = dis.opmap.get("FOR_ITER")


class _Inconsistent(Exception):
    pass


def _n_localsplus(code) -> int:
    """Slots before the value stack in the frame (`co_nlocalsplus`): locals, cells (a cell
    that is also an argument shares the argument's slot) and free variables."""
    varnames = code.co_varnames
    cells = [c for c in code.co_cellvars if c not in varnames]
    return len(varnames) + len(cells) + len(code.co_freevars)


# The last code object decoded and its instructions: a code object that gets hooked is decoded
# by up to three analyses in a row (its loop slots here, its accesses in accesses.py, its access
# slots in sharing.py), and `dis` was most of their time. A weak reference: no code object is
# kept alive for this.
_LAST_DECODED: tuple = (None, ())


def instructions(code) -> tuple:
    """The instructions of `code` (`dis.get_instructions`, no inline caches), decoded once for
    the analyses that follow one another on one code object."""
    global _LAST_DECODED
    ref, instrs = _LAST_DECODED
    if ref is not None and ref() is code:
        return instrs
    instrs = tuple(i for i in dis.get_instructions(code) if i.opname != "CACHE")
    try:
        _LAST_DECODED = (weakref.ref(code), instrs)
    except TypeError:  # not weakly referenceable: decoded again next time
        pass
    return instrs


def stack_depths(code) -> dict[int, int]:
    """Offset -> number of values on the stack when the instruction there starts, for every
    instruction reachable from the start or an exception handler. Raises ValueError when the
    bytecode does not flow consistently (then nothing of this code object is trusted)."""
    instrs = instructions(code)
    index = {ins.offset: i for i, ins in enumerate(instrs)}
    work: list[tuple[int, int]] = [(0, 0)]
    parse = getattr(dis, "_parse_exception_table", None)
    if parse is None:
        raise ValueError("no exception table parser")
    for entry in parse(code):
        # A handler starts with the entry's depth, plus lasti when asked, plus the exception.
        work.append((index[entry.target], entry.depth + (1 if entry.lasti else 0) + 1))
    depth: dict[int, int] = {}
    while work:
        i, d = work.pop()
        while i < len(instrs):
            ins = instrs[i]
            seen = depth.get(ins.offset)
            if seen is not None:
                if seen != d:
                    raise ValueError(f"stack depth {seen} and {d} at offset {ins.offset}")
                break
            if d < 0:
                raise ValueError(f"negative stack depth at offset {ins.offset}")
            depth[ins.offset] = d
            arg = ins.arg if ins.opcode >= dis.HAVE_ARGUMENT else None
            if ins.opcode in _JUMPS:
                target = index.get(ins.argval)
                if target is None:
                    raise ValueError(f"jump to {ins.argval!r} at offset {ins.offset}")
                work.append((target, d + dis.stack_effect(ins.opcode, arg, jump=True)))
            if ins.opname in _NO_FALLTHROUGH:
                break
            if ins.opname == "RETURN_GENERATOR":
                d += 1  # 3.12's stack_effect says 0; the POP_TOP after it pops one
            else:
                d += dis.stack_effect(ins.opcode, arg, jump=False)
            i += 1
    return depth


# code object -> its iter_slots(), computed once (code objects are armed again in every test).
_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def iter_slots(code) -> list[tuple[int, int]]:
    """[(offset of a FOR_ITER, index in the frame's `localsplus` of the iterator it advances)].
    Empty when this interpreter has no iteration points or the analysis fails."""
    with _SLOTS_LOCK:
        found = _SLOTS.get(code)
    if found is None:
        found = _iter_slots(code)
        with _SLOTS_LOCK:
            _SLOTS[code] = found
    return found


def _iter_slots(code) -> list[tuple[int, int]]:
    if not ITER_POINTS or _FOR_ITER is None or _FOR_ITER not in code.co_code[::2]:
        return []
    try:
        depths = stack_depths(code)
    except (ValueError, KeyError, TypeError):
        return []
    base = _n_localsplus(code)
    out = []
    for ins in instructions(code):
        if ins.opcode == _FOR_ITER:
            d = depths.get(ins.offset)
            if d is not None and 1 <= d <= code.co_stacksize:
                out.append((ins.offset, base + d - 1))
    return out


def iterator_types() -> list[type]:
    """The iterator types whose steps are points: dicts (keys, values, items, both
    directions), lists (both directions), sets and deques (both directions)."""
    import collections

    d = {0: 0}
    q = collections.deque()
    return [
        type(iter(d)),
        type(iter(d.values())),
        type(iter(d.items())),
        type(reversed(d)),
        type(reversed(d.values())),
        type(reversed(d.items())),
        type(iter([])),
        type(reversed([])),
        type(iter(set())),
        type(iter(q)),
        type(reversed(q)),
    ]


def quiet_iterator_types() -> list[type]:
    """Iterators whose loops stop being checked at their first step (for `range`)."""
    return [type(iter(range(1))), type(iter(range(2**70)))]


# Native table entries (rust/opcodes.rs).
_ALWAYS = 0x100
_RESUME_MARK = 0x400
_KIND_GENERATOR = 0x1000
_KIND_ITERATION = 0x2000


def table_entries() -> dict[int, int]:
    """Opcode -> native table entry for the generator and iteration points."""
    out = {}
    if "YIELD_VALUE" in dis.opmap:
        out[dis.opmap["YIELD_VALUE"]] = _ALWAYS | _KIND_GENERATOR
    if RESUME_POINTS and "RESUME" in dis.opmap:
        out[dis.opmap["RESUME"]] = _RESUME_MARK
    if ITER_POINTS and _FOR_ITER is not None:
        out[_FOR_ITER] = _ALWAYS | _KIND_ITERATION
    return out


def install() -> None:
    """Give the extension the iterator types it checks loops with."""
    from pytest_ftrace import _native

    _native.set_iter_types(iterator_types(), quiet_iterator_types())


def is_generated(filename: str) -> bool:
    """A file name of code compiled at run time: `<...>`, except frozen modules."""
    return (
        filename.startswith("<") and filename.endswith(">") and not filename.startswith("<frozen ")
    )
