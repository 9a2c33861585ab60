"""A cheap picture of the project's module-level state, so that a forked round's process can
tell whether the round it ran left that state as it found it (ftrace/fork.py: then the same
process runs the next round too, which saves a fork; otherwise the next round gets a fresh
child).

The picture is taken in the modules of the test's scope (the project's code and its tests):
each global's identity, and for what it refers to, one level further: the length and the items'
identities of the built-in containers (dict, list, set, deque, bytearray and their subclasses,
read through the built-in slots, never a method of the user's class), the attributes of classes
and of plain instances (their `__dict__`, read through the built-in descriptor), the mutable
default arguments and closure cells of functions, and the size of `functools.lru_cache`
caches; plus which of the scope's modules are imported. Filling a module-level cache,
registering in a module-level registry, setting a class attribute or a singleton, counting in a
global: each changes the picture. A logger's own bookkeeping is left out (`quiet`: its level
cache fills at the first log call), or every test that logs would change it in every round.

It is a check, not a proof: a change deeper than that (an item's attribute inside a module-level
dict, state kept in C) leaves the picture as it was, and the next round then sees it, as rounds
run in the test's process do. Nothing here calls the user's code or changes an object.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import collections
import functools
import sys
import types

# How many items of one container are looked at one by one (beyond that, its length only).
ITEMS = 256

_CONTAINERS = (dict, list, set, collections.deque, bytearray)
_SIZES = {
    dict: dict.__len__,
    list: list.__len__,
    set: set.__len__,
    collections.deque: collections.deque.__len__,
    bytearray: bytearray.__len__,
}
_SKIP = (types.ModuleType, types.BuiltinFunctionType, str, bytes, int, float, complex, bool)
_DICT_OF_TYPE = type.__dict__["__dict__"]
_DICT_OF_MODULE = types.ModuleType.__dict__["__dict__"]
_LRU = getattr(functools, "_lru_cache_wrapper", None)


# (scope, the modules looked at, the names of those in scope): while no module is imported or
# removed, the next call reads the answer from here instead of asking the scope about each
# of the interpreter's modules again.
_LAST: list = [None, None, ()]


def scope_modules(scope) -> list[tuple[str, types.ModuleType]]:
    """The imported modules of the test's scope."""
    modules = sys.modules
    last_scope, last_modules, names = _LAST
    if last_scope is scope and last_modules == modules:  # the same names, the same objects
        return [(name, modules[name]) for name in names]
    out = []
    for name, module in list(modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and scope.contains(file, name):
            out.append((name, module))
    _LAST[:] = [scope, dict(modules), tuple(name for name, _ in out)]
    return out


def take(scope) -> tuple:
    """The picture of the scope's module state now."""
    modules = scope_modules(scope)
    parts: list = [tuple(name for name, _ in modules)]
    for _name, module in modules:
        parts.extend(_module_parts(module))
    return tuple(parts)


def _module_parts(module) -> list:
    namespace = _DICT_OF_MODULE.__get__(module)
    return [
        (key, id(value), _shape(value, 1))
        for key, value in list(namespace.items())
        if not (key.startswith("__") and key.endswith("__"))  # the import system's
    ]


class Start:
    """The picture of the test's starting state, module by module, to compare after each round
    only the modules the rounds can have changed (`same`): those whose code ran in the rounds
    (exact mode arms each code object of the scope at its first start: `codes()` lists them)
    and the scope's modules those reach by a module-level name (`import pkg.config` then
    `pkg.config.CACHE[k] = v`). A module of the scope imported by the rounds changes the
    picture too. The cost of a look is then that of the modules the test works with, not of
    the whole project's (benches/README.md "Forked rounds": bench_fingerprint.py)."""

    def __init__(self, scope, codes):
        self.scope = scope
        self.codes = codes  # () -> the code objects of the scope that ran (in order of arming)
        modules = scope_modules(scope)
        self.names = frozenset(name for name, _ in modules)
        self.count = len(sys.modules)
        self.known = frozenset(sys.modules)  # every module's name at the start
        self.parts = {name: _module_parts(module) for name, module in modules}
        self.by_file = {getattr(module, "__file__", None): name for name, module in modules}
        self.touched: set[str] = set()
        self.seen = 0  # codes looked at

    def _touch(self, name: str | None) -> None:
        if name is None or name in self.touched:
            return
        self.touched.add(name)
        module = sys.modules.get(name)
        if module is None:
            return
        for value in list(_DICT_OF_MODULE.__get__(module).values()):
            if isinstance(value, types.ModuleType):
                other = getattr(value, "__name__", None)
                if other in self.names and other not in self.touched:
                    self.touched.add(other)  # one level: what it reaches by name

    def _same_modules(self) -> bool:
        """Whether the scope's modules are those of the start, when the interpreter's modules
        are not (the plugin's own imports in a forked child, a library's lazy import): only
        the names that are new since the start are asked of the scope. Reading every module's
        `__file__` again would write to (and, in a forked child, copy) the pages of every
        module object."""
        modules = sys.modules
        if any(name not in modules for name in self.names):
            return False
        for name in modules.keys() - self.known:
            module = modules.get(name)
            file = getattr(module, "__file__", None)
            if isinstance(file, str) and self.scope.contains(file, name):
                return False
        return True

    def same(self) -> bool:
        """Whether the module state is as at the start, as far as the picture sees."""
        if len(sys.modules) != self.count and not self._same_modules():
            return False
        codes = self.codes()
        for code in codes[self.seen :]:
            self._touch(self.by_file.get(code.co_filename))
        self.seen = len(codes)
        for name in self.touched:
            module = sys.modules.get(name)
            if module is None or _module_parts(module) != self.parts[name]:
                return False
        return True


def _size(value) -> int | None:
    for kind, size in _SIZES.items():
        if isinstance(value, kind):
            return size(value)
    return None


def _items(value) -> tuple:
    """The identities of a container's first ITEMS items (keys and values for a dict)."""
    try:
        if isinstance(value, dict):
            out = []
            for key, item in dict.items(value):
                out.append(id(key))
                out.append(id(item))
                if len(out) >= 2 * ITEMS:
                    break
            return tuple(out)
        if isinstance(value, (list, collections.deque)):
            return tuple(id(item) for item, _ in zip(value, range(ITEMS), strict=False))
        if isinstance(value, set):
            return tuple(sorted(id(item) for item, _ in zip(value, range(ITEMS), strict=False)))
        if isinstance(value, bytearray):
            return (hash(bytes(value[:ITEMS])),)
    except RuntimeError:  # changed while read (a thread left running): a picture of its own
        return ("changing",)
    return ()


def _own_dict(value) -> dict | None:
    """An instance's `__dict__` through the built-in descriptor of its class, or None (slots,
    or a class that defines `__dict__` itself)."""
    for klass in type(value).__mro__:
        descriptor = _DICT_OF_TYPE.__get__(klass).get("__dict__")
        if descriptor is None:
            continue
        if type(descriptor).__name__ != "getset_descriptor":
            return None
        try:
            found = descriptor.__get__(value)
        except Exception:  # noqa: BLE001 - no instance dict after all
            return None
        return found if isinstance(found, dict) else None
    return None


def quiet(value) -> bool:
    """Whether `value` is an object whose own bookkeeping is not the project's state: a
    `logging.Logger` (its level cache fills at the first log call of each level)."""
    logging = sys.modules.get("logging")
    return logging is not None and isinstance(value, (logging.Logger, logging.PlaceHolder))


def _shape(value, depth: int):
    """What `value` holds, `depth` levels in: identities and sizes, no user code."""
    if isinstance(value, _SKIP) or value is None or quiet(value):
        return None
    size = _size(value)
    if size is not None:
        items = _items(value)
        if depth > 0 and isinstance(value, dict):
            nested = tuple(
                _size(item)
                for item, _ in zip(dict.values(value), range(ITEMS), strict=False)
                if isinstance(item, _CONTAINERS)
            )
            return (size, items, nested)
        return (size, items)
    if _LRU is not None and isinstance(value, _LRU):
        try:
            return ("lru", value.cache_info().currsize)
        except Exception:  # noqa: BLE001
            return ("lru", None)
    if isinstance(value, types.FunctionType):
        held = list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())
        for cell in value.__closure__ or ():
            try:
                held.append(cell.cell_contents)
            except ValueError:  # an empty cell
                held.append(None)
        return tuple((id(item), _size(item)) for item in held) if held else None
    if isinstance(value, type):
        namespace = _DICT_OF_TYPE.__get__(value)
    else:
        namespace = _own_dict(value)
    if namespace is None or depth <= 0:
        return None
    return tuple(
        (key, id(item), _shape(item, depth - 1) if isinstance(item, _CONTAINERS) else None)
        for key, item in list(namespace.items())[:ITEMS]
    )
