"""Where the object of each hooked access is, for the budget's "anything shared?" signal
(rust/shared.rs; `--ftrace-budget`, ftrace/budget.py).

For each hooked instruction of a code object: the index in the frame's `localsplus` of the
object it works on (an attribute's owner, a subscript's or slice's container, `in`'s right-hand
side: a stack slot found from the stack depth at that instruction; a closure cell: its slot), or
the global name it reads or writes; and whether it writes. Computed once per code object with
the flow analysis of genpoints.py, on the interpreters whose frame layout the extension reads
(3.12, 3.13); elsewhere there is no signal, and no test stops early.

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import threading
import weakref

from pytest_ftrace.ftrace.genpoints import ITER_POINTS, _n_localsplus, instructions, stack_depths

# Whether the signal exists on this interpreter.
AVAILABLE = ITER_POINTS

# rust/shared.rs: how an entry finds its object, and its flags.
HOW_LOCAL = 0
HOW_GLOBAL = 1
WRITE = 0x10
METHOD = 0x20
READS = 0x40  # a method that only reads a builtin container (on one, the load is a read)

# Methods that never change the builtin container (list, dict, set, frozenset, tuple, str,
# bytes, bytearray) they are loaded from. On any other type the name means nothing: a class's
# `get` may write.
READ_ONLY_METHODS = frozenset(
    {
        "get", "keys", "values", "items", "copy", "count", "index", "find", "rfind",
        "startswith", "endswith", "issubset", "issuperset", "isdisjoint", "union",
        "intersection", "difference", "symmetric_difference", "__contains__", "__len__",
        "__getitem__", "__iter__", "__reversed__", "join", "split", "strip", "format",
        "lower", "upper", "replace", "encode", "decode", "hex",
    }
)  # fmt: skip

# opname -> (position of the object below the top of the stack (1 = top), writes, method bit)
_STACK = {
    "LOAD_ATTR": (1, False, True),
    "STORE_ATTR": (1, True, False),
    "DELETE_ATTR": (1, True, False),
    "LOAD_SUPER_ATTR": (1, False, True),
    "BINARY_SUBSCR": (2, False, False),
    "STORE_SUBSCR": (2, True, False),
    "DELETE_SUBSCR": (2, True, False),
    "BINARY_SLICE": (3, False, False),
    "STORE_SLICE": (3, True, False),
    "CONTAINS_OP": (1, False, False),
}
_CELL = {"LOAD_DEREF": False, "STORE_DEREF": True, "DELETE_DEREF": True}
_GLOBAL = {"LOAD_GLOBAL": False, "STORE_GLOBAL": True, "DELETE_GLOBAL": True}

_ENTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def access_entries(code) -> list[tuple[int, int, int, int]] | None:
    """[(offset, how | flags, localsplus index, id of the global's name)] for the hooked
    accesses of `code`; None when the bytecode cannot be analysed (every access of it then
    counts as shared)."""
    with _LOCK:
        if code in _ENTRIES:
            return _ENTRIES[code]
    found = _entries(code)
    with _LOCK:
        _ENTRIES[code] = found
    return found


def _entries(code) -> list[tuple[int, int, int, int]] | None:
    if not AVAILABLE:
        return None
    try:
        depths = stack_depths(code)
    except (ValueError, KeyError, TypeError):
        return None
    base = _n_localsplus(code)
    names = code.co_names
    nlocals = base
    out = []
    for ins in instructions(code):
        name = ins.opname
        if name in _STACK:
            below, writes, method_bit = _STACK[name]
            depth = depths.get(ins.offset)
            if depth is None or not below <= depth <= code.co_stacksize:
                continue  # unreachable: never runs
            how = HOW_LOCAL | (WRITE if writes else 0)
            if method_bit and ins.arg is not None and ins.arg & 1:
                how |= METHOD
                shift = 2 if name == "LOAD_SUPER_ATTR" else 1
                index = ins.arg >> shift
                if 0 <= index < len(code.co_names) and code.co_names[index] in READ_ONLY_METHODS:
                    how |= READS
            out.append((ins.offset, how, base + depth - below, 0))
        elif name in _CELL:
            if ins.arg is None or not 0 <= ins.arg < nlocals:
                return None
            out.append((ins.offset, HOW_LOCAL | (WRITE if _CELL[name] else 0), ins.arg, 0))
        elif name in _GLOBAL:
            index = ins.arg >> 1 if name == "LOAD_GLOBAL" else ins.arg
            if index is None or not 0 <= index < len(names):
                return None
            how = HOW_GLOBAL | (WRITE if _GLOBAL[name] else 0)
            out.append((ins.offset, how, 0, id(names[index])))
    return out
