"""What each hooked instruction of a code object accesses, for happens-before tracking
(`--ftrace-races`, rust/hb.rs).

A hooked instruction's event says only where it is (code object, offset). Which object it
touches is on the value stack, out of the hook's reach; but where that object came from is in
the bytecode: `self.value += 1` loads `self` (a local) before its `LOAD_ATTR value`, `d[key]`
loads `d` and `key` before its `BINARY_SUBSCR`. A forward walk over each basic block with a
symbolic stack finds, for every access, the access's operation and the source of its object
(a local or cell variable, a global, or one attribute of one of those) and of its key (a
constant or a local). The native side looks those up in the running frame at the access.

Three accesses are not the hooked instruction's own (rust/hb.rs names the spec keys):
- a loop's step over a container (`for k in d`, at its `FOR_ITER`) reads the container's
  contents, step by step of one iteration;
- `len(x)` and `next(g)` (an EXTRA spec at the load of the builtin) read the container's
  contents or resume the generator, at the call;
- a container's truth test (`if items:`, `while dq:`), which is no point, reads its contents:
  a BEFORE spec at the first point after the test, on the path where the test held (or
  failed) straight to that point with no other way in.

An access whose object comes from anything else (a call's result, a deeper expression) is not
tracked. A cell variable itself (`nonlocal x; x += 1`) is a location on CPython 3.12 and 3.13,
where the native side finds the cell in the frame (checking the layout first).

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import dis
import sys

from pytest_ftrace.ftrace.genpoints import instructions as decoded

# Operations (rust/hb.rs).
READ, WRITE, DELETE, METHOD, ITER = 0, 1, 2, 3, 4
# Spec keys besides the offset (rust/hb.rs): a second access of the instruction, and an
# access made since the last point by an instruction that is none.
EXTRA, BEFORE = 1 << 31, 1 << 30
# The hooked instructions (pytest_ftrace.ftrace.instrument.HOOKED_OPNAMES, and the loop steps
# of pytest_ftrace.ftrace.genpoints): where a BEFORE spec can wait.
_POINTS = {
    "LOAD_ATTR",
    "STORE_ATTR",
    "DELETE_ATTR",
    "LOAD_SUPER_ATTR",
    "LOAD_GLOBAL",
    "STORE_GLOBAL",
    "DELETE_GLOBAL",
    "BINARY_SUBSCR",
    "STORE_SUBSCR",
    "DELETE_SUBSCR",
    "BINARY_SLICE",
    "STORE_SLICE",
    "LOAD_DEREF",
    "STORE_DEREF",
    "DELETE_DEREF",
    "CONTAINS_OP",
    "FOR_ITER",
}
# Builtins whose call reads the container or resumes the generator of its one argument.
_BUILTIN_CALLS = {"len": "__len__", "next": "__next__"}
# Owner sources.
LOCAL, GLOBAL, GLOBALS, CELL = 1, 2, 3, 4
# Where the native side can read a cell variable's cell (rust/hb.rs, frame_cell).
_CELLS = sys.version_info[:2] in ((3, 12), (3, 13))
# Key sources.
KEY_ATTR, KEY_CONST, KEY_LOCAL, KEY_NONE = 0, 1, 2, 3

_LOAD_LOCAL = {
    "LOAD_FAST",
    "LOAD_FAST_CHECK",
    "LOAD_FAST_AND_CLEAR",
    "LOAD_DEREF",
    "LOAD_FAST_BORROW",
}
_NO_STACK = {"NOP", "RESUME", "EXTENDED_ARG", "CACHE", "KW_NAMES", "NOT_TAKEN", "PRECALL"}
# What may come between a read and the conditional jump that makes it a check.
_CHECK_PATH = {
    "LOAD_CONST",
    "LOAD_FAST",
    "LOAD_FAST_CHECK",
    "LOAD_FAST_BORROW",
    "LOAD_DEREF",
    "LOAD_GLOBAL",
    "LOAD_SMALL_INT",
    "COMPARE_OP",
    "IS_OP",
    "CONTAINS_OP",
    "TO_BOOL",
    "UNARY_NOT",
    "COPY",
    "CACHE",
    "EXTENDED_ARG",
    "NOT_TAKEN",
}
_UNKNOWN = None


def _const(ins):
    return ("const", ins.argval)


def _is_check(instructions: list, index: int) -> bool:
    """Whether the value the instruction at `index` reads only decides a branch: compared or
    tested, then a conditional jump (`if x.a is None:`, `if k not in d:`)."""
    for ins in instructions[index + 1 : index + 6]:
        if ins.opname.startswith("POP_JUMP_IF") or ins.opname.startswith("JUMP_IF_"):
            return True
        if ins.opname not in _CHECK_PATH:
            return False
    return False


def is_checked_call(code, offset: int) -> bool:
    """Whether the call at `offset` of `code` returns a value that only decides a branch."""
    try:
        instructions = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    except Exception:  # noqa: BLE001 - undecodable: no
        return False
    # (the frame's last instruction may be given as the call's last inline cache entry)
    at = max((i for i, ins in enumerate(instructions) if ins.offset <= offset), default=None)
    if at is None:
        return False
    return instructions[at].opname.startswith("CALL") and _is_check(instructions, at)


def _owner(source) -> tuple[int, str, str | None] | None:
    """(owner kind, name, attribute or None) for a symbolic stack entry."""
    if source is None:
        return None
    kind = source[0]
    if kind == "local":
        return (LOCAL, source[1], None)
    if kind == "global":
        return (GLOBAL, source[1], None)
    if kind == "attr" and source[1] is not None and source[1][0] in ("local", "global"):
        base = _owner(source[1])
        return (base[0], base[1], source[2]) if base else None
    return None


def _key(source) -> tuple[int, object]:
    if source is None:
        return (KEY_NONE, None)
    if source[0] == "const":
        return (KEY_CONST, source[1])
    if source[0] == "local":
        return (KEY_LOCAL, source[1])
    return (KEY_NONE, None)


def _first_arg(instructions: list, index: int):
    """The source of the first argument of the method loaded at `index`, when it is a plain
    constant or local (and is the whole argument)."""
    after = instructions[index + 1 : index + 3]
    if not after:
        return None
    first = after[0]
    follow = after[1].opname if len(after) > 1 else ""
    simple_next = follow.startswith(
        ("CALL", "LOAD_CONST", "LOAD_FAST", "KW_NAMES", "LOAD_SMALL", "PUSH_NULL", "LOAD_GLOBAL")
    )
    if first.opname == "LOAD_FAST_LOAD_FAST":
        return ("local", first.argval[0])
    if not simple_next:
        return None
    if first.opname in ("LOAD_CONST", "LOAD_SMALL_INT"):
        return _const(first)
    if first.opname in _LOAD_LOCAL:
        return ("local", first.argval)
    return None


def _plain_source(instructions: list, index: int):
    """The source of the value the instruction at `index` pushes when it is a plain local or
    global, or one attribute of one (`items`, `self.items`), else None."""
    if index < 0:
        return None
    ins = instructions[index]
    if ins.opname in _LOAD_LOCAL:
        return ("local", ins.argval)
    if ins.opname == "LOAD_GLOBAL" and not (ins.arg or 0) & 1:
        return ("global", ins.argval)
    if ins.opname == "LOAD_ATTR" and not (ins.arg or 0) & 1:
        base = _plain_source(instructions, index - 1)
        if base is not None and base[0] in ("local", "global"):
            return ("attr", base, ins.argval)
    return None


def _builtin_call(instructions: list, index: int):
    """For `len(x)` / `next(x)` loaded at `index`: (method, source of x, call's index)."""
    ins = instructions[index]
    method = _BUILTIN_CALLS.get(ins.argval)
    if method is None or not (ins.arg or 0) & 1:
        return None
    for end in (index + 2, index + 3):  # `len(x)`, `len(x.attr)`
        if end < len(instructions):
            call = instructions[end]
            if call.opname == "CALL" and call.arg == 1:
                source = _plain_source(instructions, end - 1)
                if source is not None and (end == index + 2 or source[0] == "attr"):
                    return method, source, end
    return None


def _truth_test(instructions: list, index: int):
    """The source of the value the conditional jump at `index` tests for truth (`if items:`,
    `if not self.queue:`), when it is a plain variable or attribute."""
    j = index - 1
    while j >= 0 and instructions[j].opname in ("TO_BOOL", "UNARY_NOT", "NOT_TAKEN"):
        j -= 1
    return _plain_source(instructions, j)


_NO_FALL_THROUGH = ("JUMP_FORWARD", "JUMP_BACKWARD", "RETURN", "RAISE", "RERAISE")


def _next_point(instructions: list, start: int, name: str, sole: bool = False) -> int | None:
    """The index of the first point from the instruction at `start` on its straight path:
    no other way in (a jump target; `sole`: the start is one, reached from one jump only), no
    call (whose points would come first), no store of `name` (the tested variable)."""
    for k in range(start, min(len(instructions), start + 12)):
        ins = instructions[k]
        if ins.is_jump_target and not (sole and k == start):
            return None
        if ins.opname in _POINTS:
            return k
        if ins.opname.startswith(("JUMP", "POP_JUMP", "RETURN", "RAISE", "RERAISE", "CALL")):
            return None
        if ins.opname.startswith(("YIELD", "SEND", "FOR_ITER", "END_FOR")):
            return None
        if ins.opname.startswith(("STORE_", "DELETE_")) and ins.argval == name:
            return None
    return None


def specs(code) -> tuple[dict, dict]:
    """({offset: spec}, {offset: owner text}) for the accesses of `code` (see rust/hb.rs for a
    spec's items)."""
    out: dict[int, tuple] = {}
    texts: dict[int, str] = {}
    instructions = list(decoded(code))
    stack: list = []
    calls: list[tuple[int, int]] = []  # (offset of a method load, stack depth under it)

    def pop():
        return stack.pop() if stack else _UNKNOWN

    def add(ins, op, owner, key, check=False, method=None, text=""):
        where = _owner(owner)
        if where is None:
            return
        kind, name, attr = where
        key_kind, key_value = key
        out[ins.offset] = (op, check, kind, name, attr, key_kind, key_value, method, None)
        texts[ins.offset] = text or _text(owner)

    def add_at(key: int, op, source, check, method=None, at=None):
        where = _owner(source)
        if where is None or key in out:
            return
        kind, name, attr = where
        out[key] = (op, check, kind, name, attr, KEY_NONE, None, method, at)
        texts[key] = _text(source)

    sources: dict[int, int] = {}  # jump target offset -> jumps to it
    for ins in instructions:
        if ins.opcode in dis.hasjrel or ins.opcode in dis.hasjabs:
            sources[ins.argval] = sources.get(ins.argval, 0) + 1
    at_offset = {ins.offset: i for i, ins in enumerate(instructions)}

    for index, ins in enumerate(instructions):
        if _truth_jump(ins.opname):
            source = _truth_test(instructions, index)
            if source is not None:
                tested = source[1] if source[0] != "attr" else source[1][1]
                paths = [_next_point(instructions, index + 1, tested)]
                target = at_offset.get(ins.argval)
                if (
                    target is not None
                    and sources.get(ins.argval) == 1
                    and instructions[target - 1].opname.startswith(_NO_FALL_THROUGH)
                ):
                    paths.append(_next_point(instructions, target, tested, sole=True))
                for point in paths:
                    if point is not None:
                        key = instructions[point].offset | BEFORE
                        add_at(key, READ, source, True, at=ins.offset)
                if any(p is not None for p in paths):
                    texts[ins.offset] = _text(source)
        elif ins.opname == "GET_ITER":
            for k in range(index + 1, min(len(instructions), index + 6)):
                if instructions[k].opname == "FOR_ITER":
                    add_at(instructions[k].offset, ITER, stack[-1] if stack else None, False)
                    break
        elif ins.opname == "LOAD_GLOBAL":
            found = _builtin_call(instructions, index)
            if found is not None:
                method, source, call = found
                check = _is_check(instructions, call)
                key = ins.offset | EXTRA
                add_at(key, METHOD, source, check, method, instructions[call].offset)
        name = ins.opname
        if ins.is_jump_target:
            stack = []
            calls = []
        if name in _NO_STACK:
            continue
        if name in ("LOAD_DEREF", "STORE_DEREF", "DELETE_DEREF") and _CELLS:
            # The cell variable itself (`nonlocal x`): its cell, by its index in the locals.
            op = {"LOAD_DEREF": READ, "STORE_DEREF": WRITE}.get(name, DELETE)
            check = op == READ and _is_check(instructions, index)
            out[ins.offset] = (op, check, CELL, ins.argval, None, KEY_CONST, ins.arg, None, None)
            texts[ins.offset] = ins.argval
        if name in _LOAD_LOCAL:
            stack.append(("local", ins.argval))
        elif name == "LOAD_FAST_LOAD_FAST":
            stack.extend(("local", n) for n in ins.argval)
        elif name in ("LOAD_CONST", "LOAD_SMALL_INT"):
            stack.append(_const(ins))
        elif name == "LOAD_GLOBAL":
            if (ins.arg or 0) & 1:
                stack.append(_UNKNOWN)
            out[ins.offset] = (
                READ,
                _is_check(instructions, index),
                GLOBALS,
                ins.argval,
                None,
                KEY_ATTR,
                ins.argval,
                None,
                None,
            )
            texts[ins.offset] = ins.argval
            stack.append(("global", ins.argval))
        elif name in ("STORE_GLOBAL", "DELETE_GLOBAL"):
            if name == "STORE_GLOBAL":
                pop()
            op = WRITE if name == "STORE_GLOBAL" else DELETE
            out[ins.offset] = (
                op,
                False,
                GLOBALS,
                ins.argval,
                None,
                KEY_ATTR,
                ins.argval,
                None,
                None,
            )
            texts[ins.offset] = ins.argval
        elif name == "LOAD_ATTR":
            owner = pop()
            if (ins.arg or 0) & 1:  # a method: (method, self) or (NULL, bound)
                add(
                    ins,
                    METHOD,
                    owner,
                    _key(_first_arg(instructions, index)),
                    method=ins.argval,
                )
                calls.append((ins.offset, len(stack)))
                stack.extend((_UNKNOWN, _UNKNOWN))
            else:
                add(ins, READ, owner, (KEY_ATTR, ins.argval), _is_check(instructions, index))
                stack.append(("attr", owner, ins.argval))
        elif name in ("STORE_ATTR", "DELETE_ATTR"):
            owner = pop()
            if name == "STORE_ATTR":
                pop()
            add(ins, WRITE if name == "STORE_ATTR" else DELETE, owner, (KEY_ATTR, ins.argval))
        elif name == "BINARY_SUBSCR":
            key, owner = pop(), pop()
            add(ins, READ, owner, _key(key), _is_check(instructions, index))
            stack.append(_UNKNOWN)
        elif name in ("STORE_SUBSCR", "DELETE_SUBSCR"):
            key, owner = pop(), pop()
            if name == "STORE_SUBSCR":
                pop()
            add(ins, WRITE if name == "STORE_SUBSCR" else DELETE, owner, _key(key))
        elif name == "CONTAINS_OP":
            owner, key = pop(), pop()
            add(ins, READ, owner, _key(key), True)
            stack.append(_UNKNOWN)
        elif name == "COPY":
            n = ins.arg or 1
            stack.append(stack[-n] if len(stack) >= n else _UNKNOWN)
        elif name == "SWAP":
            n = ins.arg or 2
            if len(stack) >= n:
                stack[-1], stack[-n] = stack[-n], stack[-1]
            else:
                stack = []
        elif name == "STORE_FAST_LOAD_FAST":
            pop()
            stack.append(("local", ins.argval[1]))
        elif name in ("LOAD_NAME", "PUSH_NULL", "LOAD_CLOSURE", "FOR_ITER", "LOAD_ASSERTION_ERROR"):
            stack.append(_UNKNOWN)
        elif name == "UNPACK_SEQUENCE":
            pop()
            stack.extend([_UNKNOWN] * (ins.arg or 0))
        else:
            pops, pushes = _effect(ins)
            if name in ("CALL", "CALL_KW") and calls and calls[-1][1] == len(stack) - (pops or 0):
                load = calls.pop()[0]
                if load in out:  # the method's container operation happens here
                    out[load] = (*out[load][:8], ins.offset)
            if pops is None:
                # Unknown to this walk: keep the depth, forget every source.
                try:
                    effect = dis.stack_effect(ins.opcode, ins.arg, jump=False)
                except (ValueError, TypeError):
                    effect = 0
                stack = [_UNKNOWN] * max(0, len(stack) + effect)
            else:
                for _ in range(pops):
                    pop()
                stack.extend([_UNKNOWN] * pushes)
        if name.startswith(("RETURN", "RAISE", "RERAISE", "JUMP")) and "IF" not in name:
            stack = []
    return out, texts


def _truth_jump(opname: str) -> bool:
    """A conditional jump on a value's truth."""
    return opname in ("POP_JUMP_IF_FALSE", "POP_JUMP_IF_TRUE")


def _effect(ins) -> tuple[int | None, int]:
    """(pops, pushes) of the common instructions the walk does not follow by name."""
    name, arg = ins.opname, ins.arg or 0
    if name in ("BINARY_OP", "COMPARE_OP", "IS_OP", "BINARY_SLICE"):
        return (3 if name == "BINARY_SLICE" else 2), 1
    if name.startswith(("UNARY_", "TO_BOOL", "GET_ITER", "FORMAT_", "CONVERT_VALUE")):
        return 1, 1
    if name.startswith("DELETE_"):
        return 0, 0
    if name.startswith(("STORE_", "POP_JUMP")) or name in ("POP_TOP", "END_FOR"):
        return (2 if name == "STORE_FAST_STORE_FAST" else 1), 0
    if name == "CALL":
        return arg + 2, 1
    if name == "CALL_KW":
        return arg + 3, 1
    if name.startswith("BUILD_") and name != "BUILD_SLICE":
        return arg, 1
    return None, 0


def _text(source) -> str:
    if source is None:
        return "?"
    if source[0] in ("local", "global"):
        return source[1]
    if source[0] == "attr":
        return f"{_text(source[1])}.{source[2]}"
    return "?"


_TEXTS: dict[int, tuple[object, dict[int, str]]] = {}


def register(code) -> None:
    """Give the native core the accesses of `code` (once per code object)."""
    from pytest_ftrace import _native

    if _native.races_has_specs(code):
        return
    try:
        table, texts = specs(code)
    except Exception:  # noqa: BLE001 - an undecodable code object: its accesses go untracked
        table, texts = {}, {}
    _TEXTS[id(code)] = (code, texts)
    _native.races_specs(code, table)


def owner_text(code, offset: int) -> str | None:
    """The expression the access at `offset` of `code` reaches its object by (`self.cache`)."""
    entry = _TEXTS.get(id(code))
    if entry is None or entry[0] is not code:
        # not decoded here (this module was imported afresh since: pytester's sessions)
        try:
            entry = _TEXTS[id(code)] = (code, specs(code)[1])
        except Exception:  # noqa: BLE001 - undecodable: the caller names the type instead
            return None
    return entry[1].get(offset)
