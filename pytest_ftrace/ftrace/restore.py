"""Explore mode's executions in process after one that changed the module state: the few
module-level places an execution wrote, put back as they were at the test's start.

Every execution must start from the test's starting state (modes/explore.py). Once one leaves
the module state changed (`fingerprint.Start.same` says no), the rounds after it run in
children forked from the snapshot (snapshot.py), each at tens of in-process executions' cost.
Most such changes are of one shape: a module-level name rebound (`HITS += 1`), a module-level
built-in container filled (`_slots[key] = made`, `CACHE.setdefault(k, v)`), a class attribute
set (`Shared.count += 1`). `Kept` takes, before the first round, a copy of those places as the
test found them: each scope module's namespace, the contents of each module-level container
of an exact built-in type, the namespace of each module-level class whose metaclass is `type`.
Between two rounds (at the round barrier: every worker waits there, no code of the test runs)
`put_back` writes the start's bindings and contents back into the places whose picture
differs, through the built-in types' own methods; the picture is then taken again, and only
when it is the start's do the next executions run here. Otherwise (a change deeper than a
module's names, a container's items or a class's attributes, a container of a user's type, a
key whose comparison could run user code) they are forked, as before.

Why this is as sound as the picture: the executions after it start from a state the picture
cannot tell from the start's, which is the test that already decides whether a forked child
runs the next execution too (fork.py) and whether the rounds stay in this process at all
(snapshot.py). What is put back is the module state the test found; the objects an execution
made and left in those places are dropped from them (they go on living while something else
holds them, as in the forked child that made them they would have). Nothing is changed in a
round, nothing of the user's is called (no `__eq__`, `__hash__` or `__setattr__` of the user's:
keys must be of exact built-in types), and only explore mode does it (its executions are the
plugin's rounds; exact mode's rounds keep the state as they leave it). After the test, the
module state is the one the test started from, as far as these places go (forked rounds leave
that of the first execution instead).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import collections
import types

from pytest_ftrace.ftrace import fingerprint

# Containers whose contents are kept (exact types only: a subclass may hold more state).
_KINDS = (dict, list, set, collections.deque, bytearray)
# Keys (and set items) whose hash and comparison are the built-in types' own.
_PLAIN = (str, int, float, bytes, bool, type(None))
_DICT_OF_TYPE = type.__dict__["__dict__"]
_DICT_OF_MODULE = types.ModuleType.__dict__["__dict__"]


def _plain(key, depth: int = 0) -> bool:
    kind = type(key)
    if kind in _PLAIN:
        return True
    if kind is tuple and depth < 4:
        return all(_plain(item, depth + 1) for item in key)
    return False


def _copy(value):
    """A copy of an exact built-in container's contents, or None when it is not kept."""
    kind = type(value)
    if kind not in _KINDS:
        return None
    try:
        if kind is dict:
            return dict.copy(value)
        if kind is list:
            return list.copy(value)
        if kind is set:
            return set.copy(value)
        if kind is collections.deque:
            return list(value)  # iterates the deque's own items, no user code
        return bytes(value)
    except RuntimeError:  # changed while copied (a thread left running)
        return None


def _fill(value, kept) -> bool:
    """Write `kept` back into `value` (the same container object), through its type's own
    methods; False when a key is not plain (its hash or comparison could be the user's)."""
    kind = type(value)
    if kind is dict:
        if not all(_plain(key) for key in dict.keys(value)):
            return False
        dict.clear(value)
        dict.update(value, kept)
    elif kind is list:
        list.__setitem__(value, slice(None), kept)
    elif kind is set:
        if not all(_plain(item) for item in set.union(value, kept)):
            return False
        set.clear(value)
        set.update(value, kept)
    elif kind is collections.deque:
        collections.deque.clear(value)
        collections.deque.extend(value, kept)
    elif kind is bytearray:
        bytearray.__setitem__(value, slice(None), kept)
    else:
        return False
    return True


def _same_items(value, kept) -> bool:
    """Whether a container holds the kept items (identities), without calling user code."""
    kind = type(value)
    if kind is dict:
        if dict.__len__(value) != len(kept):
            return False
        for key, item in dict.items(value):
            if not _plain(key) or key not in kept or kept[key] is not item:
                return False
        return True
    if kind is set:
        return set.__len__(value) == len(kept) and all(
            _plain(item) and item in kept for item in value
        )
    if kind is bytearray:
        return bytes(value) == kept
    items = list(value)
    return len(items) == len(kept) and all(a is b for a, b in zip(items, kept, strict=True))


class Kept:
    """The places of the scope's modules that `put_back` can write back, as at the start."""

    def __init__(self, start: fingerprint.Start):
        self.start = start
        self.modules: dict[str, tuple] = {}  # name -> (module, namespace copy, contents)
        self.put = 0  # rounds after which something was written back
        for name, module in fingerprint.scope_modules(start.scope):
            namespace = _DICT_OF_MODULE.__get__(module)
            names = dict.copy(namespace)
            contents: dict[int, tuple] = {}  # id -> (object, its contents or namespace)
            for value in names.values():
                self._keep(value, contents)
            self.modules[name] = (module, names, contents)

    @staticmethod
    def _keep(value, contents: dict) -> None:
        if id(value) in contents or isinstance(value, fingerprint._SKIP) or value is None:
            return
        kept = _copy(value)
        if kept is not None:
            contents[id(value)] = (value, kept)
        elif isinstance(value, type) and type(value) is type:
            contents[id(value)] = (value, dict(_DICT_OF_TYPE.__get__(value)))

    def put_back(self) -> bool:
        """Write the start's bindings and contents back where they differ (between rounds,
        the test's code not running); True when the picture is then the start's."""
        wrote = False
        for name in list(self.start.touched):
            found = self.modules.get(name)
            if found is None:
                return False  # a module imported since the start: not kept
            module, names, contents = found
            if fingerprint._module_parts(module) == self.start.parts.get(name):
                continue
            namespace = _DICT_OF_MODULE.__get__(module)
            if dict.keys(namespace) != dict.keys(names) or any(
                namespace[key] is not value for key, value in names.items()
            ):
                for key in [k for k in dict.keys(namespace) if k not in names]:
                    if key.startswith("__") and key.endswith("__"):
                        return False  # the import system's: not ours to drop
                    dict.__delitem__(namespace, key)
                for key, value in names.items():
                    if dict.get(namespace, key, namespace) is not value:
                        dict.__setitem__(namespace, key, value)
                wrote = True
            for value, kept in contents.values():
                if isinstance(value, type):
                    if not self._class_back(value, kept):
                        return False
                    continue
                if not _same_items(value, kept):
                    if not _fill(value, kept):
                        return False
                    wrote = True
        if wrote:
            self.put += 1
        return self.start.same()

    @staticmethod
    def _class_back(cls, kept: dict) -> bool:
        """A class's attributes as at the start (type's own setattr: the metaclass is type)."""
        now = _DICT_OF_TYPE.__get__(cls)
        for key in [k for k in now if k not in kept]:
            if key.startswith("__") and key.endswith("__"):
                return False
            type.__delattr__(cls, key)
        for key, value in kept.items():
            if now.get(key, now) is not value:
                if key.startswith("__") and key.endswith("__"):
                    return False  # the class's machinery (its __dict__, __weakref__, ...)
                type.__setattr__(cls, key, value)
        return True
