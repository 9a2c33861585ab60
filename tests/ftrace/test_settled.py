"""`--ftrace-rounds snapshot` made cheap (issue 14 item 4, issue 17): a test whose rounds cannot
change the module state gets no snapshot, so no fork (ftrace/settled.py tells it before round
0); one whose rounds do change it still gets every round from the starting state, at a round
count that does not depend on the machine's load (ftrace/budget.py `by_count`)."""

from __future__ import annotations

import os
import re
import sys
import textwrap
import types

import pytest

from pytest_ftrace.ftrace import settled

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# Module sources whose state a round can change: each must make the snapshot.
CHANGING = {
    "a module-level dict": "CACHE = {}\n",
    "a global rebound": """
        VALUE = None
        def fill():
            global VALUE
            VALUE = 1
    """,
    "a class attribute set in a classmethod": """
        class Config:
            loaded = None
            @classmethod
            def load(cls):
                if cls.loaded is None:
                    cls.loaded = object()
    """,
    "a class attribute set by name": """
        class Config:
            loaded = None
        def load():
            Config.loaded = object()
    """,
    "a class attribute counted through type(self)": """
        class Counter:
            made = 0
            def __init__(self):
                type(self).made += 1
    """,
    "a class attribute set through __class__": """
        class Counter:
            made = 0
            def bump(self):
                self.__class__.made = 1
    """,
    "a module-level object with attributes": """
        class Registry:
            def __init__(self):
                self.first = None
        REGISTRY = Registry()
    """,
    "an lru_cache": """
        import functools
        @functools.lru_cache(maxsize=None)
        def square(x):
            return x * x
    """,
    "a closure rebinding its cell": """
        def make():
            value = None
            def get():
                nonlocal value
                if value is None:
                    value = object()
                return value
            return get
        get = make()
    """,
    "a mutable default argument": """
        def remember(x, seen=[]):
            seen.append(x)
    """,
    "setattr": """
        import sys
        def publish():
            setattr(sys.modules[__name__], "PUBLISHED", 1)
    """,
    "an attribute of another module": """
        import email
        def configure():
            email.CONFIGURED = True
    """,
}

# ...and sources whose rounds cannot change it: no snapshot.
STILL = {
    "plain functions and a lock": """
        import threading
        LOCK = threading.Lock()
        LIMIT = 10
        NAMES = ("a", "b")
        def add(a, b):
            return a + b
    """,
    "a class whose methods set their instance's attributes": """
        class Account:
            rate = 3
            def __init__(self):
                self.balance = 0
            def deposit(self, n):
                self.balance += n
                self.last = n
        def test_account(thread_index):
            account = Account()
            account.deposit(thread_index)
            account.owner = thread_index
            assert account.balance == thread_index
    """,
    "a logger, an enum and a dataclass": """
        import dataclasses
        import enum
        import logging
        log = logging.getLogger("still")
        class Colour(enum.Enum):
            RED = 1
            BLUE = 2
        @dataclasses.dataclass
        class Point:
            x: int = 0
            y: int = 0
        def test_point():
            log.debug("made %s", Point(1, 2))
            assert Colour(1) is Colour.RED
    """,
}


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"/nowhere/{name}.py"
    sys.modules[name] = module  # (dataclasses and imports look it up there)
    try:
        exec(compile(textwrap.dedent(source), module.__file__, "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize("shape", sorted(CHANGING))
def test_state_a_round_can_change_is_seen_before_round_0(shape):
    module = _module("shape_" + re.sub(r"\W", "_", shape), CHANGING[shape])
    assert settled._module_can_change(module, {module.__file__})


@pytest.mark.parametrize("shape", sorted(STILL))
def test_code_that_keeps_no_module_state_needs_no_snapshot(shape):
    module = _module("still_" + re.sub(r"\W", "_", shape), STILL[shape])
    assert not settled._module_can_change(module, {module.__file__})


def test_a_loggers_level_cache_is_not_module_state():
    import logging

    from pytest_ftrace.ftrace import fingerprint

    module = _module("still_logging", "import logging\nlog = logging.getLogger('still.cache')\n")
    before = fingerprint._module_parts(module)
    module.log.isEnabledFor(logging.INFO)  # fills its level cache
    assert fingerprint._module_parts(module) == before


def run(pytester, *args):
    return pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-rounds",
        "snapshot",
        "--ftrace-timeout",
        "120",
        "-p",
        "no:cacheprovider",
        *args,
        timeout=600,
    )


# Each fork of pytest's process leaves a line in forks.txt.
FORKS = """
import os

HERE = os.path.dirname(os.path.abspath(__file__))
os.register_at_fork(before=lambda: _note_fork(HERE))


def _note_fork(here):
    with open(os.path.join(here, "forks.txt"), "a") as out:
        out.write("fork\\n")


def test_keeps_nothing(thread_index):
    totals = {}
    for step in range(20):
        totals[step % 3] = totals.get(step % 3, 0) + step + thread_index
    assert sum(totals.values()) == 190 + 20 * thread_index
"""


def test_a_test_whose_rounds_cannot_change_module_state_is_not_forked(pytester):
    pytester.makepyfile(test_forks=FORKS)
    result = run(pytester, "--seed", "1", "--threads", "2", "--iterations", "5")
    result.assert_outcomes(passed=1)
    forks = pytester.path / "forks.txt"
    assert not forks.exists(), forks.read_text()


# Every round changes the module state: every round after the first runs in a child.
EVERY_ROUND = """
import threading

SEEN = {}
_lock = threading.Lock()


def test_keyed_by_round(iteration_index, thread_index):
    with _lock:
        SEEN.setdefault(iteration_index, []).append(thread_index)
"""


def test_rounds_in_children_stop_at_a_count_the_load_does_not_change(pytester):
    from pytest_ftrace.options import MIN_ROUNDS

    pytester.makepyfile(test_every_round=EVERY_ROUND)
    # a budget of 3 s: three times the default count, however long the forks take
    result = run(pytester, "--seed", "1", "--threads", "2", "--ftrace-budget", "3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"ftrace budget: 1 test, {3 * MIN_ROUNDS} rounds in * s; 1 ran to the budget"]
    )


# Two first-fill shapes under `snapshot`: a lazily filled class attribute and a
# first-subscriber registry. Each copy of the module is a test of its own (its schedules come
# from its name), so one session stands for many seeds.
CLASS_ATTRIBUTE = """
import itertools

_made = itertools.count()


class Settings:
    loaded = None

    @classmethod
    def get(cls):
        if cls.loaded is None:
            cls.loaded = {"serial": next(_made)}
        return cls.loaded


def test_one_settings(thread_index):
    mine = Settings.get()
    assert Settings.get() is mine, "the settings were loaded twice"
"""

FIRST_SUBSCRIBER = """
_subscribers = []
_openers = []


def subscribe(who):
    if not _subscribers:  # the first subscriber opens the channel
        _openers.append(who)
    _subscribers.append(who)


def test_one_opener(thread_index):
    subscribe(thread_index)
    assert len(_openers) == 1, f"the channel was opened {len(_openers)} times"
"""

COPIES = 20


@pytest.mark.parametrize("shape", ["class attribute", "first subscriber"])
def test_first_fill_shapes_fail_in_every_copy(pytester, shape):
    source = CLASS_ATTRIBUTE if shape == "class attribute" else FIRST_SUBSCRIBER
    pytester.makepyfile(**{f"test_fill_{i}": source for i in range(COPIES)})
    result = run(pytester, "--seed", "1", "--ftrace-shrink", "0")
    failed = result.parseoutcomes().get("failed", 0)
    assert failed >= 0.95 * COPIES, result.stdout.str()[-3000:]
