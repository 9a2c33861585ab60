"""Which tests of a session may run at the same time: markers, groups and waves.

The rules are documented in `pytest_ftrace.threadpool`. This module turns the collected items
into a plan: a list of steps, each either one test run the usual way or a *wave* of tests that
workers run concurrently.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pytest

MARK = "parallelizable"
NOT_MARK = "not_parallelizable"
CONCURRENT_MARK = "ftrace_concurrent"  # put on the tests generate_tests makes
SCOPES = ("children", "parameters", "all")
DEFAULT_SCOPES = ("none", *SCOPES)

# Fixtures that act on the whole process (file descriptors 1 and 2), so a test that uses one
# cannot share the process with other running tests; it runs on its own, in order.
PROCESS_WIDE_FIXTURES = frozenset({"capfd", "capfdbinary", "capteesys"})


# Plain classes, not dataclasses: this module is imported at start-up, and making a dataclass
# costs a few hundred microseconds.


class Decision(NamedTuple):
    """The effective marker of one test: its scope and the node that carries it."""

    scope: str | None  # None: run sequentially
    level: str  # "function", "class", "module", "package", "concurrent", "default", "unmarked"
    # or "not_parallelizable"
    where: str  # node id (or package name) the marker was found on


class Wave:
    """Consecutive tests with one parent and one set of shared fixture values."""

    __slots__ = ("items",)

    def __init__(self, items: list[pytest.Item] | None = None) -> None:
        self.items = items if items is not None else []


class Step:
    """One test run the usual way (`item`), or a wave of tests run by workers (`wave`)."""

    __slots__ = ("item", "wave")

    def __init__(self, item: pytest.Item | None = None, wave: Wave | None = None) -> None:
        self.item = item
        self.wave = wave


def _marks_of(obj) -> list:
    raw = getattr(obj, "pytestmark", [])
    if not isinstance(raw, list | tuple):
        raw = [raw]
    return [getattr(m, "mark", m) for m in raw]


def _scope_of(mark, where: str) -> str:
    if mark.kwargs.keys() - {"scope"} or len(mark.args) > 1:
        raise pytest.UsageError(
            f"{where}: parallelizable() takes one scope, one of {', '.join(SCOPES)}; "
            f"got args={mark.args!r} kwargs={mark.kwargs!r}"
        )
    scope = mark.args[0] if mark.args else mark.kwargs.get("scope", "all")
    if scope not in SCOPES:
        raise pytest.UsageError(
            f"{where}: unknown parallelizable scope {scope!r}; use one of {', '.join(SCOPES)}"
        )
    return scope


def _levels(item: pytest.Item) -> Iterable[tuple[str, str, list]]:
    """(level, where, marks) from the most specific level to the least specific."""
    chain = item.listchain()
    yield "function", item.nodeid, list(item.own_markers)
    for node in reversed(chain[:-1]):
        if isinstance(node, pytest.Class):
            yield "class", node.nodeid, list(node.own_markers)
        elif isinstance(node, pytest.Module):
            yield "module", node.nodeid, list(node.own_markers)
    module = getattr(item, "module", None)
    name = getattr(module, "__name__", "") or ""
    parts = name.split(".")[:-1]
    # Packages: their __init__.py pytestmark, innermost package first.
    for end in range(len(parts), 0, -1):
        package = sys.modules.get(".".join(parts[:end]))
        if package is not None and getattr(package, "__path__", None) is not None:
            yield "package", package.__name__, _marks_of(package)


def decide(item: pytest.Item, default_scope: str) -> Decision:
    """The effective parallelizable marker of `item` (see the rules in threadpool.py)."""
    levels = list(_levels(item))
    for _level, where, marks in levels:
        if any(m.name == NOT_MARK for m in marks):
            return Decision(None, "not_parallelizable", where)
    if any(m.name == CONCURRENT_MARK for m in item.own_markers):
        # Made by generate_tests: concurrent with the module's other generated tests.
        parent = item.getparent(pytest.Module)
        return Decision("children", "concurrent", parent.nodeid if parent else "")
    for level, where, marks in levels:
        for mark in marks:
            if mark.name == MARK:
                return Decision(_scope_of(mark, where), level, where)
    if default_scope != "none":
        return Decision(default_scope, "default", "")
    return Decision(None, "unmarked", "")


def runs_alone_reason(item: pytest.Item) -> str | None:
    """Why a test that is marked parallelizable must still run on its own, or None."""
    if not isinstance(item, pytest.Function) or type(item).__name__ == "TestCaseFunction":
        return "not a plain test function"
    used = PROCESS_WIDE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used:
        return f"uses {', '.join(sorted(used))}"
    if item.get_closest_marker("forked") is not None:
        return "marked forked (runs in a child process)"
    if item.get_closest_marker("filterwarnings") is not None:
        return "has a filterwarnings mark (warning filters are process-wide)"
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        definitions = item._fixtureinfo.name2fixturedefs
        for name in callspec.params:
            found, scope = definitions.get(name), callspec._arg2scope.get(name)
            if found and scope is not None and found[-1]._scope is not scope:
                return f"parametrizes fixture {name!r} with another scope ({scope.value})"
    return None


def group_key(item: pytest.Item, decision: Decision) -> tuple | None:
    """Consecutive tests with equal, non-None keys may run concurrently."""
    if decision.scope is None or runs_alone_reason(item) is not None:
        return None
    parametrized = getattr(item, "callspec", None) is not None
    variants = ("parameters", getattr(item, "cls", None), item.parent, item.originalname)
    if decision.level == "function":
        # A function's children are its parametrized variants, whatever the scope.
        return variants if parametrized else None
    if decision.scope == "parameters":
        return variants if parametrized else None
    return ("children", decision.level, decision.where)


def _shared_params(item: pytest.Item) -> tuple:
    """Parameters of fixtures wider than function scope: a change means new shared values."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return ()
    scopes = getattr(callspec, "_arg2scope", {})
    out = []
    for name, index in sorted(callspec.indices.items()):
        scope = scopes.get(name)
        if scope is not None and getattr(scope, "value", "function") != "function":
            out.append((name, index))
    return tuple(out)


def plan(
    items: Sequence[pytest.Item], default_scope: str, decisions: dict | None = None
) -> list[Step]:
    """The steps of the session; `decisions` are those `validate` returned, where known."""
    decisions = decisions or {}
    steps: list[Step] = []
    previous_group: tuple | None = None
    previous_wave: tuple | None = None
    for item in items:
        decision = decisions.get(item)
        if decision is None:
            decision = decide(item, default_scope)
        key = group_key(item, decision)
        if key is None:
            steps.append(Step(item=item))
            previous_group = previous_wave = None
            continue
        wave_key = (item.parent, _shared_params(item))
        if key == previous_group and wave_key == previous_wave and steps[-1].wave is not None:
            steps[-1].wave.items.append(item)
        else:
            steps.append(Step(wave=Wave([item])))
        previous_group, previous_wave = key, wave_key
    # A wave of one test gains nothing from a worker: run it the usual way.
    return [Step(item=s.wave.items[0]) if s.wave and len(s.wave.items) == 1 else s for s in steps]


def validate(items: Sequence[pytest.Item], default_scope: str) -> dict:
    """Each test's decision; a UsageError names the first bad parallelizable marker."""
    return {item: decide(item, default_scope) for item in items}
