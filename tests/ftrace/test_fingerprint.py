"""The picture of the project's module state (ftrace/fingerprint.py) that lets a forked round's
process run the next round too: every usual way a round keeps state changes it, reading does
not, and taking it calls none of the user's code."""

from __future__ import annotations

import functools
import sys
import types

import pytest

from pytest_ftrace.ftrace import fingerprint


class OnlyThis:
    """A scope of one module name."""

    def __init__(self, name: str):
        self.name = name

    def contains(self, _filename: str, module: str | None) -> bool:
        return module == self.name


class Registry:
    def __init__(self):
        self.topics = {}
        self.count = 0


class Singleton:
    instance = None


class Hostile:
    """Every method of the user's that a careless picture could call fails the test."""

    def __len__(self):
        raise AssertionError("__len__ called")

    def __eq__(self, other):
        raise AssertionError("__eq__ called")

    __hash__ = object.__hash__

    def __getattr__(self, name):
        raise AssertionError(f"__getattr__({name}) called")

    @property
    def value(self):
        raise AssertionError("property called")


class HostileDict(dict):
    def __len__(self):
        raise AssertionError("__len__ called")

    def items(self):
        raise AssertionError("items called")


@pytest.fixture
def module():
    name = "ftrace_fingerprint_probe"
    probe = types.ModuleType(name)
    probe.__file__ = f"/nowhere/{name}.py"
    sys.modules[name] = probe
    try:
        yield probe
    finally:
        del sys.modules[name]


def _changes(module, setup, change) -> bool:
    scope = OnlyThis(module.__name__)
    setup(vars(module))
    before = fingerprint.take(scope)
    change(vars(module))
    return fingerprint.take(scope) != before


def _cached(x):
    return x * 2


def _closure():
    seen = []

    def add(x):
        seen.append(x)

    return add


def _default(x, _memo={}):  # noqa: B006 - the classic first-fill cache under test
    _memo[x] = x


KEPT = {
    "a dict filled": (lambda g: g.update(cache={}), lambda g: g["cache"].update(a=1)),
    "a value replaced in a dict": (
        lambda g: g.update(cache={"a": [1]}),
        lambda g: g["cache"].update(a=[1]),
    ),
    "a list appended to": (lambda g: g.update(seen=[]), lambda g: g["seen"].append(1)),
    "a set added to": (lambda g: g.update(ids=set()), lambda g: g["ids"].add(3)),
    "a global counted": (lambda g: g.update(count=0), lambda g: g.update(count=1)),
    "a global bound": (lambda g: None, lambda g: g.update(late=object())),
    "a class attribute set": (
        lambda g: g.update(Singleton=type("S", (), {"instance": None})),
        lambda g: setattr(g["Singleton"], "instance", object()),
    ),
    "an attribute of a module-level object": (
        lambda g: g.update(registry=Registry()),
        lambda g: setattr(g["registry"], "count", 5),
    ),
    "a container held by a module-level object": (
        lambda g: g.update(registry=Registry()),
        lambda g: g["registry"].topics.update(news=[]),
    ),
    "a list inside a module-level dict": (
        lambda g: g.update(topics={"news": []}),
        lambda g: g["topics"]["news"].append(1),
    ),
    "an lru_cache filled": (
        lambda g: g.update(cached=functools.lru_cache(maxsize=None)(_cached)),
        lambda g: g["cached"](3),
    ),
    "a mutable default filled": (
        lambda g: g.update(remember=types.FunctionType(_default.__code__, {}, "r", ({},))),
        lambda g: g["remember"](1),
    ),
    "a closure's list appended to": (
        lambda g: g.update(add=_closure()),
        lambda g: g["add"](1),
    ),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_state_a_round_keeps_changes_the_picture(module, case):
    setup, change = KEPT[case]
    assert _changes(module, setup, change)


def test_reading_leaves_the_picture_as_it_was(module):
    def setup(g):
        g.update(cache={"a": 1}, seen=[1, 2], registry=Registry(), count=3)

    def read(g):
        assert g["cache"]["a"] == 1
        assert len(g["seen"]) == 2
        assert g["registry"].count == 0

    assert not _changes(module, setup, read)


def test_a_new_module_of_the_scope_changes_the_picture(module):
    scope = OnlyThis(module.__name__)
    del sys.modules[module.__name__]
    try:
        before = fingerprint.take(scope)
    finally:
        sys.modules[module.__name__] = module
    assert fingerprint.take(scope) != before


def test_the_picture_calls_none_of_the_users_code(module):
    def setup(g):
        g.update(thing=Hostile(), table=HostileDict(a=Hostile()), kind=Hostile)

    def change(g):
        dict.__setitem__(g["table"], "b", 1)

    assert _changes(module, setup, change)


class _CountedFile(types.ModuleType):
    """A module that counts the reads of its `__file__`."""

    reads = 0

    @property
    def __file__(self):
        type(self).reads += 1
        return "/nowhere/ftrace_fingerprint_counted.py"


def test_a_new_module_outside_the_scope_is_the_only_one_asked_about(module):
    """After an import, `Start.same` asks the scope about the new modules only: reading every
    module's `__file__` again writes to every module object's page (in a forked child, a copy
    of each)."""
    counted = _CountedFile("ftrace_fingerprint_counted")
    sys.modules[counted.__name__] = counted
    late = "ftrace_fingerprint_late"
    try:
        start = fingerprint.Start(OnlyThis(module.__name__), list)
        _CountedFile.reads = 0
        sys.modules[late] = types.ModuleType(late)  # not in the scope
        assert start.same()
        assert _CountedFile.reads == 0
        sys.modules[module.__name__ + "_new"] = sys.modules.pop(late)
        assert start.same()  # still not the scope's: its name only is new
        del sys.modules[module.__name__ + "_new"], sys.modules[module.__name__]
        assert not start.same()  # a module of the scope is gone
    finally:
        sys.modules[module.__name__] = module
        for name in (counted.__name__, late, module.__name__ + "_new"):
            sys.modules.pop(name, None)
