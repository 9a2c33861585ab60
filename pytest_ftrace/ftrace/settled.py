"""Whether a test's rounds can change the project's module state at all, told before round 0
from the start picture (fingerprint.Start) and the code of the scope, without running anything:
a test whose rounds cannot change it needs no snapshot (snapshot.py), so it pays no fork.

The state the picture looks at can change in a round only through
- an object that holds state at module level: a built-in container, an object with an instance
  `__dict__` (a singleton, a registry, a logger), a `functools.lru_cache`, a function whose
  default arguments or closure hold such an object, a class whose attributes do;
- code that rebinds a global (`global x; x = ...`), sets or deletes an attribute of a module, a
  class or a module-level object (`Cls.x = ...`, `cls.x = ...` in a classmethod,
  `type(self).x = ...`, `self.__class__.x = ...`, `pkg.config.x = ...`, `setattr`,
  `__dict__`, `globals()`), or imports a module not imported yet.

The scope's modules are looked at: every non-dunder global, one level into classes, and the code
of its functions and methods (with the code nested in them). Any such object or code makes the
answer "can change" (the snapshot is made, as before). It is a prediction on the safe side,
not a proof (an alias of a class in a local, `for klass in ...: klass.x = ...`, escapes it), as
the picture itself is a check, not a proof. Nothing here calls the user's code or changes an
object; each code object is read once per session.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import dis
import enum
import sys
import types

from pytest_ftrace.ftrace import fingerprint

# names whose load in a round's code may change module state whatever they are applied to
_CHANGERS = frozenset(
    {
        "setattr",
        "delattr",
        "globals",
        "vars",
        "exec",
        "eval",
        "__import__",
        "import_module",
        "__setattr__",
        "__delattr__",
        "__dict__",
        "__class__",
        "__globals__",
        "__defaults__",
        "__kwdefaults__",
        "reload",
    }
)
# the usual name of a classmethod's (or a metaclass method's) first argument
_CLASS_ARGS = frozenset({"cls", "klass", "mcs", "mcls", "metacls", "kls"})
_STORES = frozenset({"STORE_ATTR", "DELETE_ATTR"})
_GLOBAL_STORES = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_ATTR", "LOAD_METHOD"})
# what the object of an attribute store may be loaded by without it being module state
_LOCAL_LOADS = frozenset(
    {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_FAST_LOAD_FAST"}
)
_INERT = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    tuple,  # the picture does not look into tuples and frozensets
    frozenset,
    range,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
)

_ENUM_META = enum.EnumMeta
_CODE_HOLDERS = (types.FunctionType, staticmethod, classmethod, property)

# {code: whether it can change module state}, for the session (code objects are kept alive)
_CODES: dict = {}
# {module name: (its picture parts, verdict)}: a module whose globals are as last time keeps it
_MODULES: dict = {}


def can_change(start: fingerprint.Start) -> bool:
    """Whether the rounds of a test can change the module state `start` pictured."""
    try:
        for name, parts in start.parts.items():
            last = _MODULES.get(name)
            if last is not None and last[0] is parts:
                verdict = last[1]
            elif last is not None and last[0] == parts:
                verdict = last[1]
                _MODULES[name] = (parts, verdict)
            else:
                module = sys.modules.get(name)
                verdict = module is None or _module_can_change(module, start.by_file)
                _MODULES[name] = (parts, verdict)
            if verdict:
                return True
    except Exception:  # noqa: BLE001 - an odd object: on the safe side
        return True
    return False


def _module_can_change(module, files) -> bool:
    namespace = fingerprint._DICT_OF_MODULE.__get__(module)
    for key, value in list(namespace.items()):
        if key.startswith("__") and key.endswith("__"):
            continue
        if _value_can_change(value, 2, files):
            return True
    return False


def _value_can_change(value, depth: int, files) -> bool:
    if isinstance(value, _INERT):
        return False
    if isinstance(value, fingerprint._CONTAINERS):
        return True
    if fingerprint._LRU is not None and isinstance(value, fingerprint._LRU):
        return True
    if isinstance(value, types.FunctionType):
        return _function_can_change(value, files)
    if isinstance(value, (staticmethod, classmethod)):
        return _value_can_change(value.__func__, depth, files)
    if isinstance(value, property):
        return any(
            _value_can_change(f, depth, files) for f in (value.fget, value.fset, value.fdel) if f
        )
    if isinstance(value, type):
        if depth <= 0:
            return True
        # (an enum's tables of members are made with the class and do not change)
        enum = isinstance(value, _ENUM_META)
        namespace = fingerprint._DICT_OF_TYPE.__get__(value)
        for key, item in list(namespace.items()):
            if key.startswith("__") and key.endswith("__") and not isinstance(item, _CODE_HOLDERS):
                continue  # the class's own machinery: annotations, dataclass fields, slots
            if enum and (isinstance(item, fingerprint._CONTAINERS) or isinstance(item, value)):
                continue
            if isinstance(item, _CODE_HOLDERS):
                # the picture does not look into a class's functions: their code only
                if _member_can_change(item, files):
                    return True
            elif _value_can_change(item, depth - 1, files):
                return True
        return False
    if fingerprint.quiet(value):
        return False
    if fingerprint._own_dict(value) is not None:
        # an object with attributes of its own; pytest's (fixture definitions, marks) keep
        # theirs during a test
        module = getattr(type(value), "__module__", "") or ""
        return not module.startswith(("_pytest", "pytest"))
    if isinstance(value, types.MethodType):
        return True  # a bound method: its object may be anything
    # anything else (a lock, an object with slots, an object of C): its state is not pictured
    return False


def _function_can_change(function, files) -> bool:
    held = list(function.__defaults__ or ()) + list((function.__kwdefaults__ or {}).values())
    for cell in function.__closure__ or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell (filled later)
            return True
    for item in held:
        if _value_can_change(item, 0, files):
            return True
    code = function.__code__
    if code.co_filename not in files:
        return False  # code outside the scope does not run under exact mode's eyes
    if function.__closure__ and _rebinds_cells(code):
        return True
    return _code_can_change(code)


def _member_can_change(member, files) -> bool:
    """Whether the code of a class's function (method, static or class method, property)
    can change module state."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    functions = (
        (member.fget, member.fset, member.fdel) if isinstance(member, property) else (member,)
    )
    for function in functions:
        code = getattr(function, "__code__", None)
        if code is not None and code.co_filename in files and _code_can_change(code):
            return True
    return False


def _rebinds_cells(code) -> bool:
    free = set(code.co_freevars)
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("STORE_DEREF", "DELETE_DEREF") and instruction.argval in free:
            return True
    return False


def _code_can_change(code) -> bool:
    known = _CODES.get(code)
    if known is not None:
        return known
    _CODES[code] = True  # (recursion: on the safe side until known)
    verdict = _scan(code)
    _CODES[code] = verdict
    return verdict


def _scan(code) -> bool:
    previous: list = []
    for instruction in dis.get_instructions(code):
        op = instruction.opname
        if op in _GLOBAL_STORES:
            return True
        if op in _LOADS and instruction.argval in _CHANGERS:
            return True
        if op == "IMPORT_NAME" and instruction.argval not in sys.modules:
            return True
        if op in _STORES and not _local_object(previous, code):
            return True
        previous.append(instruction)
        if len(previous) > 64:
            del previous[0]
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and _code_can_change(const):
            return True
    return False


def _local_object(previous: list, code) -> bool:
    """Whether the object of the attribute store after `previous` is a local variable (or an
    attribute chain from one) that is not a classmethod's class."""
    i = len(previous) - 1
    if i >= 1 and previous[i].opname == "SWAP":  # obj.x += ...: COPY 1, LOAD_ATTR x, ..., SWAP
        while i >= 1 and not (
            previous[i].opname == "LOAD_ATTR" and previous[i - 1].opname == "COPY"
        ):
            i -= 1
        if i < 1:
            return False
        i -= 2
    while i >= 0 and previous[i].opname in ("LOAD_ATTR", "CACHE", "EXTENDED_ARG"):
        i -= 1  # a chain: self.a.b = ...
    if i < 0:
        return False
    base = previous[i]
    if base.opname not in _LOCAL_LOADS:
        return False
    name = base.argval[-1] if isinstance(base.argval, tuple) else base.argval
    return name not in _CLASS_ARGS
