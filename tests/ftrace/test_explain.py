"""Every failing exact-mode round is explained (issue 18): the conflicts of shapes that no hooked
instruction reads directly (a container's truth test or len(), a loop over a container, a
generator resumed by two threads), torn reads, shapes not in the corpus, and lanes cut to the
steps that matter. Real pytest sessions on small test files."""

from __future__ import annotations

import re

import pytest


def exact(pytester, *args):
    # The files here keep each round's objects in a module dict keyed by round (SHARED), made
    # for rounds in one process: under the default (snapshot) every round would pay a fork.
    # Forked rounds' explanations: test_fork_results.py; their schedules: test_fork.py.
    return pytester.runpytest(
        "--ftrace",
        "--ftrace-mode",
        "exact",
        "--ftrace-rounds",
        "process",
        "--ftrace-timeout",
        "120",
        "--threads",
        "2",
        "--ftrace-shrink",
        "0",
        "-p",
        "no:cacheprovider",
        *args,
    )


def _line(source: str, marker: str) -> int:
    return next(i for i, line in enumerate(source.lstrip("\n").splitlines(), 1) if marker in line)


SHARED = """
import collections
import threading

ROUNDS = {}
LOCK = threading.Lock()

def shared(iteration_index, factory):
    with LOCK:
        if iteration_index not in ROUNDS:
            ROUNDS[iteration_index] = factory()
        return ROUNDS[iteration_index]
"""

# name -> (test body after SHARED, class, location (`?*?`: anything), line markers of the
# accesses named (a list: one of these groups))
CASES = {
    "deque_truth_test": (
        """
def test_it(iteration_index):
    queues = shared(iteration_index, lambda: [collections.deque([i]) for i in range(20)])
    for dq in queues:
        if dq:  # LINE-A
            dq.popleft()  # LINE-B
""",
        "check-then-act",
        "dq (the whole deque)",
        ("LINE-A", "LINE-B"),
    ),
    "length_check_then_pop": (
        """
def test_it(iteration_index):
    items = shared(iteration_index, lambda: list(range(3)))
    for _ in range(3):
        if len(items) > 0:  # LINE-A
            items.pop()  # LINE-B
""",
        "check-then-act",
        "items (the whole list)",
        ("LINE-A", "LINE-B"),
    ),
    "shared_generator": (
        """
def numbers():
    n = 0
    while True:
        n += 1
        yield n

def test_it(iteration_index):
    gen = shared(iteration_index, numbers)
    for _ in range(20):
        next(gen)  # LINE-A
""",
        "generator resumed by two threads",
        "gen (generator)",
        ("LINE-A",),
    ),
    "iterate_while_insert": (
        """
def test_it(iteration_index):
    d = shared(iteration_index, lambda: {i: i for i in range(10)})
    me = threading.get_ident()
    for i in range(5):
        for key in d:  # LINE-A
            pass
        d[(me, i)] = i  # LINE-B
""",
        "mutated during iteration",
        "d (the whole dict)",
        ("LINE-A", "LINE-B"),
    ),
    "iterate_while_remove": (
        """
def test_it(iteration_index):
    s = shared(iteration_index, lambda: set(range(40)))
    for i in range(5):
        for x in s:  # LINE-A
            pass
        s.pop()  # LINE-B
""",
        "mutated during iteration",
        "s (the whole set)",
        ("LINE-A", "LINE-B"),
    ),
    "torn_pair": (
        """
class Range:
    def __init__(self):
        self.lo = 0
        self.hi = 0

    def set(self, v):
        self.lo = v  # LINE-A
        self.hi = v  # LINE-B

    def get(self):
        return self.lo, self.hi  # LINE-C

def test_it(iteration_index):
    r = shared(iteration_index, Range)
    me = threading.get_ident()
    for _ in range(10):
        r.set(me)
        lo, hi = r.get()
        assert lo == hi, "torn"
""",
        "torn read",
        "Range.lo and .hi",
        ("LINE-A", "LINE-B", "LINE-C"),
    ),
    # held out: shapes the corpus does not have
    "setdefault_then_increment": (
        """
def test_it(iteration_index):
    d = shared(iteration_index, dict)
    last = 0
    for _ in range(10):
        box = d.setdefault("hits", [0])
        box[0] += 1  # LINE-A
        assert box[0] > last, "an increment was lost"
        last = box[0]
""",
        "lost update",
        "box[0]",
        ("LINE-A",),
    ),
    "env_wrapper_check_then_act": (
        """
class Env:
    def __init__(self):
        self._data = {}

    def get(self, key):
        return self._data.get(key)  # LINE-A

    def set(self, key, value):
        self._data[key] = value  # LINE-B

def test_it(iteration_index):
    env = shared(iteration_index, Env)
    me = threading.get_ident()
    if env.get("OWNER") is None:
        env.set("OWNER", me)
        assert env.get("OWNER") == me, "another thread took it in between"
""",
        "check-then-act",
        "self._data['OWNER']",
        ("LINE-A", "LINE-B"),
    ),
    "lazy_class_attribute": (
        """
class Registry:
    _table = None

    @classmethod
    def table(cls):
        if cls._table is None:  # LINE-A
            cls._table = []  # LINE-B
        return cls._table

def test_it(iteration_index):
    reg = shared(iteration_index, lambda: type("R", (Registry,), {}))
    mine = reg.table()
    mine.append(1)
    assert mine is reg.table(), "a second thread replaced the table"
""",
        "check-then-act",
        "R._table",
        ("LINE-A", "LINE-B"),
    ),
    "closure_counter": (
        """
def make_counter():
    n = 0

    def inc():
        nonlocal n
        n += 1  # LINE-A
        return n

    return inc

def test_it(iteration_index):
    inc = shared(iteration_index, make_counter)
    seen = shared(-1 - iteration_index, set)
    for _ in range(10):
        v = inc()
        assert v not in seen, "handed out twice"
        seen.add(v)
""",
        "lost update",
        "n (a closure variable)",
        ("LINE-A",),
    ),
    "property_read_modify_write": (
        """
class Meter:
    def __init__(self):
        self._v = 0

    @property
    def v(self):
        return self._v  # LINE-B

    @v.setter
    def v(self, x):
        self._v = x  # LINE-C

def test_it(iteration_index):
    m = shared(iteration_index, Meter)
    last = 0
    for _ in range(10):
        m.v += 1  # LINE-A
        assert m.v > last, "an increment was lost"
        last = m.v
""",
        "lost update",
        "Meter.?*?v",  # the property at the caller, or its storage in the getter and setter
        [("LINE-A",), ("LINE-B", "LINE-C")],
    ),
    "double_registration_in_a_set": (
        """
def test_it(iteration_index):
    seen = shared(iteration_index, set)
    order = shared(-1 - iteration_index, list)
    for name in ("a", "b", "c"):
        if name not in seen:  # LINE-A
            seen.add(name)  # LINE-B
            order.append(name)
    assert len(order) == len(set(order)), "registered twice"
""",
        "check-then-act",
        "seen[?*?]",
        ("LINE-A", "LINE-B"),
    ),
    "shared_collections_counter": (
        """
def test_it(iteration_index):
    cnt = shared(iteration_index, collections.Counter)
    last = 0
    for _ in range(10):
        cnt["x"] += 1  # LINE-A
        assert cnt["x"] > last, "an increment was lost"
        last = cnt["x"]
""",
        "lost update",
        "cnt['x']",
        ("LINE-A",),
    ),
}


def _conflict_block(out: str) -> str:
    start = out.index("conflicts in round")
    return out[start : out.index("schedule of round", start)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_failing_round_names_the_classified_conflict_with_its_lines(pytester, name):
    body, kind, where, markers = CASES[name]
    source = SHARED + body
    pytester.makepyfile(test_case=source)
    result = exact(pytester, "--seed", "1")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "conflicts in round" in out, out
    block = _conflict_block(out)
    first = block.split("\n  [2]", 1)[0]  # the most telling conflict comes first
    assert re.search(r"\[1\] " + re.escape(kind) + " on ", first), block
    pattern = re.escape(where).replace(r"\?\*\?", ".*")
    assert re.search(rf"\[1\] {re.escape(kind)} on {pattern}:", first), block
    groups = markers if isinstance(markers, list) else [markers]
    assert any(
        all(f"test_case.py:{_line(source, marker)} " in first for marker in group)
        for group in groups
    ), (markers, block)
    # the replay line stays last
    notes = [line for line in result.stdout.lines if line.startswith(("replay:", "conflicts in"))]
    assert notes[-1].startswith("replay: pytest"), out


SAFE_TWINS = """
def numbers():
    n = 0
    while True:
        n += 1
        yield n

def test_truth_test_under_a_lock(iteration_index):
    guard = shared(("truth-lock", iteration_index), threading.Lock)
    queues = shared(("truth", iteration_index), lambda: [collections.deque([i]) for i in range(10)])
    for dq in queues:
        with guard:
            if dq and len(dq) > 0:
                dq.popleft()

def test_generator_under_a_lock(iteration_index):
    guard = shared(("gen-lock", iteration_index), threading.Lock)
    gen = shared(("gen", iteration_index), numbers)
    for _ in range(10):
        with guard:
            next(gen)

def test_iteration_under_a_lock(iteration_index):
    guard = shared(("iter-lock", iteration_index), threading.Lock)
    d = shared(("iter", iteration_index), lambda: {i: i for i in range(10)})
    me = threading.get_ident()
    for i in range(5):
        with guard:
            for key in d:
                pass
        with guard:
            d[(me, i)] = i

def test_private_containers_and_generators():
    mine = collections.deque(range(5))
    while mine:
        mine.popleft()
    gen = numbers()
    for _ in range(5):
        next(gen)
    d = {i: i for i in range(5)}
    for key in d:
        pass
    d["new"] = 1
"""


def test_the_safe_twins_report_no_race(pytester):
    pytester.makepyfile(test_safe=SHARED + SAFE_TWINS)
    result = exact(pytester, "--seed", "1", "--ftrace-races", "fail")
    result.assert_outcomes(passed=4)
    assert "data race" not in result.stdout.str()
    assert "conflicts in round" not in result.stdout.str()


LONG_LANES = (
    SHARED
    + """
def test_it(iteration_index):
    queues = shared(iteration_index, lambda: [collections.deque([i]) for i in range(40)])
    for dq in queues:
        if dq:
            dq.popleft()
"""
)


def test_the_lanes_show_the_steps_that_matter_and_v_shows_all(pytester):
    pytester.makepyfile(test_lanes=LONG_LANES)
    result = exact(pytester, "--seed", "1", "--threads", "4")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    lanes = out[out.index("schedule of round") : out.index("replay: pytest")]
    assert re.search(r"^  \.\.\. \d+ steps not shown$", lanes, re.M), lanes
    assert "only the rows around the conflicting accesses are shown" in lanes
    assert "*: the run makes one of the conflicting accesses" in lanes
    act = _line(LONG_LANES, "dq.popleft()")
    marked = [line for line in lanes.splitlines() if re.match(r"\s+\d+\s.*\* ", line)]
    assert any(f"line {act} call .popleft" in line for line in marked), lanes
    rows = [line for line in lanes.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(rows) < 48, lanes

    verbose = exact(pytester, "--seed", "1", "--threads", "4", "-v")
    verbose.assert_outcomes(failed=1)
    out = verbose.stdout.str()
    lanes = out[out.index("schedule of round") : out.index("replay: pytest")]
    assert "steps not shown\n" not in lanes.replace("steps, not shown", "")
    assert "only the rows around" not in lanes
