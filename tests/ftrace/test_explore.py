"""--ftrace-mode explore end to end: real pytest sessions on small test files, and the step
classifier its partial-order reduction rests on."""

from __future__ import annotations

import os
import re
import shlex
import sys

import pytest

RACY = """
import threading

class Counter:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

# Each round's state made before the rounds (as far as the budget goes): the rounds leave the
# module state as they found it, so they all run in the test's process.
STATES = {name: [{"c": Counter(), "done": []} for _ in range(20000)] for name in ("racy", "locked")}

def shared(name, iteration):
    return STATES[name][iteration]

def test_racy(iteration_index, num_parallel_threads):
    state = shared("racy", iteration_index)
    c = state["c"]
    value = c.n
    c.n = value + 1
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert c.n == num_parallel_threads, f"lost update: {c.n}"

def test_locked(iteration_index, num_parallel_threads):
    state = shared("locked", iteration_index)
    c = state["c"]
    with c.lock:
        value = c.n
        c.n = value + 1
        state["done"].append(1)
        if len(state["done"]) == num_parallel_threads:
            assert c.n == num_parallel_threads, f"lost update: {c.n}"
"""

BIG = """
ROUNDS = {}

class Box:
    def __init__(self):
        self.n = 0

def test_many_steps(iteration_index):
    box = ROUNDS.setdefault(iteration_index, Box())
    for _ in range(30):
        box.n = box.n + 1
"""

DISJOINT = """
class Box:
    def __init__(self):
        self.a = 0
        self.b = 0

BOX = Box()  # made once: the rounds go on counting

def test_disjoint(thread_index):
    box = BOX
    if thread_index == 0:
        for _ in range(8):
            box.a = box.a + 1
    else:
        for _ in range(8):
            box.b = box.b + 1
"""

ORDERS = """
import threading

class Bank:
    def __init__(self):
        self.lock = threading.Lock()
        self.log = []
        self.done = 0

STATES = [Bank() for _ in range(5000)]
SEEN = set()

def test_order(iteration_index, thread_index):
    bank = STATES[iteration_index]
    for _ in range(3):
        with bank.lock:
            bank.log.append(thread_index)
    with bank.lock:
        bank.done += 1
        if bank.done == 2:
            SEEN.add(tuple(bank.log))
"""

ORDERS_CONFTEST = """
def pytest_sessionfinish(session):
    import test_orders_of_locked_sections as module
    print("DISTINCT ORDERS", len(module.SEEN))
"""

THREE = """
import threading

class Bank:
    def __init__(self):
        self.lock = threading.Lock()
        self.a = 100
        self.b = 100

STATES = [Bank() for _ in range(5000)]

def test_three(iteration_index, thread_index):
    bank = STATES[iteration_index]
    for _ in range(3):
        with bank.lock:
            bank.a -= 1
            bank.b += 1
"""

SOUND = """
import threading

class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.entries = []
        self.done = 0
        self.n = 0

STATES = [Log() for _ in range(5000)]

def test_needs_an_order(iteration_index, thread_index):
    log = STATES[iteration_index]
    for _ in range(2):
        with log.lock:
            log.entries.append(thread_index)
    with log.lock:
        log.done += 1
        if log.done == 2:
            assert log.entries != [0, 1, 0, 1], "the order 0 1 0 1"

def test_lost_update_between_sections(iteration_index, thread_index):
    log = STATES[iteration_index]
    with log.lock:
        log.entries.append(thread_index)
    value = log.n
    log.n = value + 1
    with log.lock:
        log.done += 1
        if log.done == 2:
            assert log.n == 2, f"lost update: {log.n}"
"""

OWN_LISTS = """
STATES = [([], []) for _ in range(5000)]

def test_own_lists(iteration_index, thread_index):
    pair = STATES[iteration_index]
    mine = pair[thread_index]
    for i in range(6):
        mine.append(i)
        mine.pop()
        mine.append(i)
"""

PROVEN = re.compile(
    r"ftrace explore: (\S+): no failure in all (\d+) interleavings of \d+ threads within "
    r"(\d+) preemptions? \((\d+) executions?, pruned from at least (\d+)\)"
)


def explore(pytester, *args):
    return pytester.runpytest(
        "--ftrace", "--ftrace-mode", "explore", "--threads", "2", "--ftrace-timeout", "120", *args
    )


def proven(result) -> dict[str, tuple[int, int, int, int]]:
    found = {}
    for line in result.stdout.lines:
        m = PROVEN.search(line)
        if m:
            found[m.group(1).split("::")[-1]] = tuple(int(g) for g in m.groups()[1:])
    return found


def replay_args(result) -> list[str]:
    lines = [line for line in result.stdout.lines if "replay: pytest " in line]
    assert lines, result.stdout.str()
    return shlex.split(lines[0].split("replay: pytest ", 1)[1])


def test_the_racy_counter_fails_and_its_replay_line_reproduces_it(pytester):
    pytester.makepyfile(RACY)
    result = explore(pytester, "--seed", "1", "-k", "test_racy")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "ftrace: seed=1 mode=explore bound=2 *",
            "*AssertionError: lost update: 1*",
            "*replay: pytest '*::test_racy' --ftrace --ftrace-mode explore --seed 1 "
            "--ftrace-replay t2i*x*",
        ]
    )
    args = replay_args(result)
    for _ in range(2):
        again = pytester.runpytest(*args)
        again.assert_outcomes(failed=1)
        again.stdout.fnmatch_lines(
            ["*replay: reproduced in 10/10 runs of round * (seed 1, mode explore, following*"]
        )


def test_the_locked_twin_passes_and_says_what_was_proven(pytester):
    pytester.makepyfile(RACY)
    result = explore(pytester, "--seed", "1", "-k", "test_locked")
    result.assert_outcomes(passed=1)
    found = proven(result)
    assert "test_locked" in found, result.stdout.str()
    interleavings, bound, executions, unreduced = found["test_locked"]
    assert bound == 2
    assert 1 < interleavings <= executions <= unreduced
    # the same search on every run: the count is a property of the test, not of the seed
    again = explore(pytester, "--seed", "2", "-k", "test_locked")
    assert proven(again)["test_locked"] == found["test_locked"]


def test_the_bound_limits_the_preemptions_explored(pytester):
    pytester.makepyfile(RACY)
    # the lost update needs a preemption: within none, every interleaving passes
    none = explore(pytester, "--seed", "1", "-k", "test_racy", "--ftrace-bound", "0")
    none.assert_outcomes(passed=1)
    interleavings, bound, _executions, _ = proven(none)["test_racy"]
    assert bound == 0
    assert interleavings >= 1
    one = explore(
        pytester, "--seed", "1", "-k", "test_racy", "--ftrace-bound", "1", "-p", "no:cacheprovider"
    )
    one.assert_outcomes(failed=1)
    # and a larger bound explores more of the locked twin
    small = proven(explore(pytester, "--seed", "1", "-k", "test_locked", "--ftrace-bound", "1"))
    large = proven(
        explore(
            pytester,
            *("--seed", "1", "-k", "test_locked", "--ftrace-bound", "3"),
            # a loaded free-threaded run needs more than the default 60 s
            *("--ftrace-explore-seconds", "900", "--ftrace-timeout", "1000"),
        )
    )
    assert small["test_locked"][0] < large["test_locked"][0]


def test_explore_runs_two_threads_unless_told_and_says_how_many(pytester):
    pytester.makepyfile(RACY)
    # no --threads: explore's own default (two), not --ftrace's four
    # (a small bound and budget: the thread count is what is checked, finished or not)
    small = ("--seed", "1", "-k", "test_locked", "--ftrace-bound", "1")
    small += ("--ftrace-explore-rounds", "50")
    plain = pytester.runpytest("--ftrace", "--ftrace-mode", "explore", *small)
    plain.assert_outcomes(passed=1)
    plain.stdout.fnmatch_lines(["*test_locked: no failure in * interleavings of 2 threads *"])
    # the ini spelling of the mode too
    pytester.makeini("[pytest]\nftrace_mode = explore\n")
    ini = pytester.runpytest("--ftrace", *small)
    ini.stdout.fnmatch_lines(["*test_locked: no failure in * interleavings of 2 threads *"])
    # --threads is taken as given
    three = pytester.runpytest("--ftrace", "--ftrace-mode", "explore", *small, "--threads", "3")
    three.assert_outcomes(passed=1)
    three.stdout.fnmatch_lines(["*test_locked: no failure in * interleavings of 3 threads *"])


PRIVATE = """
import threading

class Token:
    pass

def test_private_dict():
    local = {"n": 0}
    for _ in range(4):
        local["n"] += 1
    assert local["n"] == 4

def test_private_objects():
    me = threading.get_ident()
    made = []
    for _ in range(3):
        made.append((Token(), object(), me))
    assert len(made) == 3
"""

SHARED_ITEMS = """
ROUNDS = {}

class Claim:
    def __init__(self, state):
        seen = state["n"]  # a constructor's code is part of the steps around it
        state["n"] = seen + 1

def test_shared_dict(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(iteration_index, {"d": {"n": 0}, "done": []})
    d = state["d"]
    d["n"] += 1
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert d["n"] == num_parallel_threads, f"lost update: {d['n']}"

def test_shared_in_constructor(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(("c", iteration_index), {"n": 0, "done": []})
    Claim(state)
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert state["n"] == num_parallel_threads, f"lost update: {state['n']}"
"""


def test_thread_private_steps_are_independent(pytester):
    # `d[k] += 1` copies its container on the stack: the step is on that dict's items, not on
    # every container's; a constructor with no code of its own, object() and get_ident()
    # touch nothing shared. Each thread's steps are its own: one interleaving stands for all.
    pytester.makepyfile(PRIVATE)
    result = explore(pytester, "--seed", "1")
    result.assert_outcomes(passed=2)
    found = proven(result)
    assert found["test_private_dict"][0] == 1, result.stdout.str()
    assert found["test_private_objects"][0] == 1, result.stdout.str()


def test_races_on_copied_containers_and_in_constructors_are_found(pytester):
    # the soundness side of the test above: the same shapes on shared objects fail
    pytester.makepyfile(SHARED_ITEMS)
    result = explore(pytester, "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    assert result.stdout.str().count("lost update: 1") >= 2, result.stdout.str()


OWN_OBJECTS = """
import threading

class Box:
    def __init__(self, n):
        self.n = n  # the new object's attribute: no other thread's `n`
        self.lock = threading.Lock()  # a new lock: nothing shared

def fill(kind, box):
    made = kind() if box.n else None  # a factory passed in, called through a local
    made["k"] = box
    return made

def test_own_objects():
    total = 0
    for i in range(3):
        box = Box(i)
        box.n += 1
        box.n = box.n * 2
        total += box.n
        fill(dict, box)
    assert total == 12

class Registry:
    def __init__(self):
        self.items = {}

    def add(self, i):
        # the container is loaded before a call among the arguments runs the constructor's
        # steps: the call is on the object the load found
        return self.items.setdefault(i, Box(i))

def test_own_registry():
    registry = Registry()
    for i in range(3):
        box = registry.add(i)
        box.n += 1
    assert len(registry.items) == 3
"""

PUBLISHED = """
ROUNDS = {}

class Cell:
    def __init__(self, home):
        self.n = 0
        self.n = home.setdefault("cell", self).n  # publishes itself (the first one wins)

def test_published_in_constructor(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(iteration_index, {"home": {}, "done": []})
    Cell(state["home"])
    cell = state["home"]["cell"]
    value = cell.n  # the same object in every thread: a lost update
    cell.n = value + 1
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert cell.n == num_parallel_threads, f"lost update: {cell.n}"

class Holder:
    pass

HOLDER = Holder()

class Box:
    def __init__(self, n):
        self.n = n

class Registry:
    def __init__(self):
        self.items = {}

REGISTRIES = [Registry() for _ in range(20000)]

def test_first_claim_past_a_constructor(iteration_index, num_parallel_threads):
    registry = REGISTRIES[iteration_index]
    state = ROUNDS.setdefault(("r", iteration_index), {"first": [], "done": []})
    if "k" not in registry.items:
        state["first"].append(1)
    registry.items.setdefault("k", Box(1))  # a write of the shared items, past a call
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert len(state["first"]) == 1, f"claimed first {len(state['first'])} times"

def test_published_through_an_attribute(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(("a", iteration_index), {"done": []})
    if getattr(HOLDER, "round", None) != iteration_index:
        HOLDER.box = Holder()  # each thread may make one; the one left is shared
        HOLDER.box.n = 0
        HOLDER.round = iteration_index
    box = HOLDER.box
    value = box.n
    box.n = value + 1
    state["done"].append(box)
    if len(state["done"]) == num_parallel_threads and state["done"][0] is box:
        assert box.n == num_parallel_threads, f"lost update: {box.n}"
"""


def test_objects_a_thread_made_and_kept_are_its_own(pytester):
    # Attributes are keyed per object: the steps on objects each thread made in the round and
    # kept to itself (a constructor's `self.n = ...`, its own new lock, a factory passed in)
    # depend on no other thread's step, so one interleaving stands for all; before, every
    # object's `n` was one key and the constructor's lock an opaque call.
    pytester.makepyfile(OWN_OBJECTS)
    result = explore(pytester, "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    found = proven(result)
    assert found["test_own_objects"][0] == 1, result.stdout.str()
    assert found["test_own_registry"][0] == 1, result.stdout.str()


def test_a_lost_update_on_an_object_published_by_its_constructor_is_found(pytester):
    # the soundness side: an object a constructor publishes (`self` stored in a shared dict),
    # or that another thread reaches through a shared attribute, is keyed as the same object
    # in every thread, whoever made it
    pytester.makepyfile(PUBLISHED)
    result = explore(pytester, "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    assert result.stdout.str().count("lost update: 1") >= 2, result.stdout.str()
    assert "claimed first 2 times" in result.stdout.str()


SYNC = """
import queue
import threading

QUEUES = [queue.Queue() for _ in range(2 * 5000)]
EVENTS = [threading.Event() for _ in range(2 * 5000)]
ROUNDS = {}

class Box:
    def __init__(self):
        self.n = 0

def test_own_queues_and_events(iteration_index, thread_index):
    q = QUEUES[2 * iteration_index + thread_index]
    ev = EVENTS[2 * iteration_index + thread_index]
    for i in range(3):
        q.put(i)
        assert q.get(timeout=5) == i
    ev.set()
    assert ev.wait(timeout=5)

def test_racy_around_a_queue(iteration_index, num_parallel_threads):
    state = ROUNDS.setdefault(iteration_index, {"box": Box(), "q": queue.Queue(), "done": []})
    box, q = state["box"], state["q"]
    value = box.n
    q.put(value)
    box.n = value + 1
    state["done"].append(1)
    if len(state["done"]) == num_parallel_threads:
        assert box.n == num_parallel_threads, f"lost update: {box.n}"
"""


def test_queue_and_event_operations_depend_only_on_their_object(pytester):
    # each thread's own queue and event: their operations (under each object's own lock) are
    # independent of the other thread's, not opaque; a race around a queue operation is found
    pytester.makepyfile(SYNC)
    result = explore(pytester, "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    assert proven(result)["test_own_queues_and_events"][0] == 1, result.stdout.str()
    assert "lost update: 1" in result.stdout.str()


def test_a_condition_is_keyed_by_its_lock():
    import queue
    import threading

    from pytest_ftrace import _native

    c = _classifier()
    lock = _native.lock()
    assert c._sync_key(threading.Condition(lock)) == c.lock_key(lock)
    # outside a session threading's names make real locks: nothing exact mode schedules
    assert c._sync_key(queue.Queue()) is None
    assert c._sync_key(threading.Condition(threading.RLock())) is None
    assert c._sync_key(object()) is None


def test_steps_on_other_names_are_not_reordered(pytester):
    pytester.makepyfile(DISJOINT)
    result = explore(pytester, "--seed", "1", "--ftrace-bound", "3")
    result.assert_outcomes(passed=1)
    interleavings, _bound, executions, unreduced = proven(result)["test_disjoint"]
    # the two loops touch different names: reordering them changes nothing, so one
    # interleaving stands for all of them (one execution in each pass, bounds 0 to 3)
    assert interleavings == 1, result.stdout.str()
    assert executions == 4
    assert unreduced > executions


def test_every_order_of_locked_sections_within_the_bound_runs(pytester):
    # Two threads, three locked sections each. An order of the sections in k runs of one
    # thread's sections makes k - 1 switches, of which the one after the second-to-last run (the
    # end of a thread) costs no preemption: k - 2 preemptions. Runs of 2: AAABBB, BBBAAA; of 3
    # (one preemption): A^a B^3 A^(3-a), a = 1, 2, and the same from B; of 4 (two): A B A B
    # with both threads split in two, 2 x 2 ways, from either thread.
    pytester.makepyfile(test_orders_of_locked_sections=ORDERS)
    pytester.makeconftest(ORDERS_CONFTEST)
    expected = {0: 2, 1: 2 + 4, 2: 2 + 4 + 8}
    for bound, count in expected.items():
        # the orders are gathered in module state, across executions: in the test's process
        result = explore(
            pytester,
            "--seed",
            "1",
            "--ftrace-bound",
            str(bound),
            "-s",
            "--ftrace-rounds",
            "process",
        )
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*DISTINCT ORDERS {count}"])


def test_locked_sections_take_one_interleaving_per_order(pytester):
    # Two threads, three locked sections each, nothing shared outside them: the orders of the
    # sections are the interleavings (the hand count of the test above: 2, 6 and 14 within
    # 0, 1 and 2 preemptions). The steps before a thread's first acquire and after a release
    # touch nothing another thread writes, and an acquire that finds the lock taken does
    # nothing, so no other reordering counts.
    pytester.makepyfile(test_three_sections=THREE)
    for bound, count in {0: 2, 1: 6, 2: 14}.items():
        result = explore(pytester, "--seed", "1", "--ftrace-bound", str(bound))
        result.assert_outcomes(passed=1)
        interleavings, got, _executions, _ = proven(result)["test_three"]
        assert (got, interleavings) == (bound, count), result.stdout.str()


def test_a_race_needing_an_order_of_locked_sections_is_found(pytester):
    # the failing order (one section of each thread, then the second of each) needs two
    # preemptions: the search within 2 must reach it
    pytester.makepyfile(SOUND)
    result = explore(pytester, "--seed", "1", "--ftrace-shrink", "0", "-k", "test_needs_an_order")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the order 0 1 0 1*"])
    within_one = explore(
        pytester, "--seed", "1", "--ftrace-bound", "1", "-k", "test_needs_an_order"
    )
    within_one.assert_outcomes(passed=1)


def test_a_lost_update_between_locked_sections_is_found(pytester):
    pytester.makepyfile(SOUND)
    result = explore(
        pytester, "--seed", "1", "--ftrace-shrink", "0", "-k", "test_lost_update_between"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: lost update: 1*"])


def test_method_calls_on_each_threads_own_list_are_not_reordered(pytester):
    # append and pop of a list work on that list's items: two threads' own lists are apart
    pytester.makepyfile(OWN_LISTS)
    result = explore(pytester, "--seed", "1")
    result.assert_outcomes(passed=1)
    interleavings, _bound, _executions, _ = proven(result)["test_own_lists"]
    assert interleavings == 1, result.stdout.str()


VISITS_CONFTEST = """
from pytest_ftrace import _native

def pytest_sessionstart(session):
    _native.explore_visit_counts(True)  # zeroed; each templated answer checked with Python's

def pytest_terminal_summary(terminalreporter):
    template, python, checked, differed = _native.explore_visit_counts(False)
    print(f"VISITS template={template} python={python} checked={checked} differed={differed}")
"""


def test_steps_that_depend_on_their_objects_are_answered_natively_as_python_would(pytester):
    # A step on a container's items, a `with` block on a lock, a container's method or a
    # return into the callers is described at every visit: the core answers it from what the
    # classifier found the first time (its lookups in the frames, numbered afresh), asking
    # Python only for a new shape. Each such answer is checked here against Python's own.
    pytester.makepyfile(
        test_shapes_locked=THREE,
        test_shapes_orders=ORDERS.replace("SEEN.add", "SEEN.discard"),
        test_shapes_lists=OWN_LISTS,
        test_shapes_private=PRIVATE,
        test_shapes_sync=SYNC,
        test_shapes_items=SHARED_ITEMS,
    )
    pytester.makeconftest(VISITS_CONFTEST)
    result = explore(pytester, "--seed", "1", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=3)
    m = re.search(
        r"VISITS template=(\d+) python=(\d+) checked=(\d+) differed=(\d+)", result.stdout.str()
    )
    assert m, result.stdout.str()
    template, python, checked, differed = (int(g) for g in m.groups())
    assert differed == 0, result.stdout.str()
    assert checked == template
    # most visits are answered without Python: it is asked once per location and shape
    assert template > 10 * python, (template, python)


LOCK_STEPS_CONFTEST = r"""
from pytest_ftrace import _native
from pytest_ftrace.ftrace.modes import explore

CALLS = []
CHECK = bool(int(__import__("os").environ.get("CHECK", "0")))
if not CHECK:
    # made outside the test's files (exec'd code is not hooked): a counting lock_step
    SPACE = {"CALLS": CALLS, "step": explore.Classifier.lock_step}
    exec(
        "def lock_step(self, *args, **kwargs):\n"
        "    CALLS.append(1)\n"
        "    return step(self, *args, **kwargs)\n",
        SPACE,
    )
    explore.Classifier.lock_step = SPACE["lock_step"]

def pytest_sessionstart(session):
    _native.explore_visit_counts(CHECK)

def pytest_terminal_summary(terminalreporter):
    template, python, checked, differed = _native.explore_visit_counts(False)
    print(f"LOCKSTEPS python={len(CALLS)} checked={checked} differed={differed}")

def pytest_unconfigure(config):
    if not CHECK:  # the next in-process session's classifier is the plugin's own
        explore.Classifier.lock_step = SPACE["step"]
"""

LOCKS_AT_DEPTH = """
import threading

class Bank:
    def __init__(self):
        self.lock = threading.Lock()
        self.rlock = threading.RLock()
        self.a = 100
        self.b = 100

STATES = [Bank() for _ in range(5000)]

def move(bank):
    with bank.lock:
        bank.a -= 1
    bank.b += 0  # after the release: the step returns into the caller

def test_locks(iteration_index, thread_index):
    bank = STATES[iteration_index]
    for _ in range(2):
        move(bank)
        with bank.rlock:
            with bank.rlock:
                bank.b += 1
        bank.lock.acquire()
        bank.a += 1
        bank.lock.release()
"""


def test_lock_operations_steps_are_answered_in_the_core_as_python_would(pytester, monkeypatch):
    # A lock operation's point and its step (the caller's code after the acquire or release)
    # are made in the core: Python's lock_step is not asked at each operation, only, with the
    # check on, to compare every native answer with its own.
    pytester.makepyfile(test_lock_steps=THREE, test_lock_depth=LOCKS_AT_DEPTH)
    pytester.makeconftest(LOCK_STEPS_CONFTEST)
    pattern = r"LOCKSTEPS python=(\d+) checked=(\d+) differed=(\d+)"
    result = explore(pytester, "--seed", "1", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    m = re.search(pattern, result.stdout.str())
    assert m, result.stdout.str()
    assert int(m.group(1)) == 0, result.stdout.str()
    monkeypatch.setenv("CHECK", "1")
    checked = explore(pytester, "--seed", "1", "-s", "-p", "no:cacheprovider")
    checked.assert_outcomes(passed=2)
    assert proven(checked) == proven(result)
    m = re.search(pattern, checked.stdout.str())
    assert m, checked.stdout.str()
    _calls, compared, differed = (int(g) for g in m.groups())
    assert compared > 0 and differed == 0, checked.stdout.str()


def test_a_test_too_big_for_the_budget_says_how_far_it_got(pytester):
    pytester.makepyfile(BIG)
    result = explore(pytester, "--seed", "1", "--ftrace-explore-rounds", "7")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    m = re.search(
        r"ftrace explore: \S+::test_many_steps: no failure in (\d+) interleavings of 2 threads "
        r"within \d preemptions?.*\(7 executions, pruned from at least \d+\); stopped by the "
        r"--ftrace-explore-rounds budget \(7\) with (\d+) branch\(es\) known and not run: the "
        r"search within 2 did not finish, so this is not a proof",
        " ".join(out.split()),
    )
    assert m, out
    assert int(m.group(2)) > 0
    assert "no failure in all" not in out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--ftrace-bound", "-1"], "--ftrace-bound"),
        (["--ftrace-bound", "two"], "--ftrace-bound"),
        (["--ftrace-bound", "1001"], "--ftrace-bound"),
        (["--ftrace-explore-rounds", "0"], "--ftrace-explore-rounds"),
        (["--ftrace-explore-seconds", "-3"], "--ftrace-explore-seconds"),
        (["--ftrace-mode", "explores"], "--ftrace-mode"),
    ],
)
def test_bad_values_are_usage_errors(pytester, args, named):
    pytester.makepyfile(RACY)
    result = pytester.runpytest("--ftrace", "--ftrace-mode", "explore", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if named in line and "error" in line]
    assert len(errors) == 1, result.stderr.str()
    assert "INTERNALERROR" not in result.stderr.str() + result.stdout.str()


def test_a_bad_ini_mode_names_the_modes(pytester):
    pytester.makepyfile(RACY)
    pytester.makeini("[pytest]\nftrace_mode = explores\n")
    result = pytester.runpytest("--ftrace")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini key ftrace_mode: chaos, exact, explore; not 'explores'*"])


# -- executions from the test's starting state ----------------------------------------------

# A module-level cache filled on first use (check, fill, publish): only an execution that finds
# it empty can race, so every execution must start from the state the test started with.
FIRST_FILL = """
import os
import threading

_CACHE = {}
_LOADS = []
_LOCK = threading.Lock()
FILLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fills.txt")


def load(name):
    if name not in _CACHE:
        profile = {"name": name}
        _LOADS.append(name)
        _CACHE[name] = profile
    return _CACHE[name]


def load_locked(name):
    with _LOCK:
        if name not in _CACHE:
            profile = {"name": name}
            _LOADS.append(name)
            _CACHE[name] = profile
            with open(FILLS, "a") as out:  # outside module state: seen by the test below
                out.write("fill\\n")
        return _CACHE[name]


def test_first_fill():
    assert load("default")["name"] == "default"
    assert len(_LOADS) == 1, f"the profile was loaded {len(_LOADS)} times"


def test_first_fill_locked():
    assert load_locked("default")["name"] == "default"
    assert len(_LOADS) == 1, f"the profile was loaded {len(_LOADS)} times"
"""

# Every execution leaves marks in module state, and the steps a thread takes depend on the
# marks: the same for the same schedule from the starting state, but run on the state earlier
# executions left, an execution takes another path than its schedule was made for.
MARKS = """
class Box:
    def __init__(self):
        self.n = 0


MARKS = []
BOX = Box()


def test_marks(thread_index):
    MARKS.append(thread_index)
    box = BOX
    for _ in range(len(MARKS) // 2 % 3):
        box.n = box.n + 1
"""


def explore_apart(pytester, *args):
    # a process of its own: a thread another test of this process left running would keep
    # the executions in the test's process
    return pytester.runpytest_subprocess(
        "--ftrace",
        "--ftrace-mode",
        "explore",
        "--threads",
        "2",
        "--ftrace-timeout",
        "120",
        *args,
        timeout=600,
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_first_fill_race_in_module_state_is_found_and_replays_from_the_start(pytester):
    pytester.makepyfile(test_fill=FIRST_FILL)
    result = explore_apart(pytester, "--seed", "1", "-k", "test_first_fill and not locked")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the profile was loaded 2 times*"])
    args = replay_args(result)
    again = pytester.runpytest_subprocess(*args, "--ftrace-timeout", "120", timeout=600)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(
        ["*replay: reproduced in 10/10 runs of round * (seed 1, mode explore, following*"]
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_the_first_fills_locked_twin_is_proven(pytester):
    pytester.makepyfile(test_fill=FIRST_FILL)
    result = explore_apart(
        pytester, "--seed", "1", "-k", "test_first_fill_locked", "--ftrace-bound", "1"
    )
    result.assert_outcomes(passed=1)
    interleavings, bound, executions, _unreduced = proven(result)["test_first_fill_locked"]
    assert bound == 1
    assert 1 < interleavings <= executions
    assert "not a proof" not in result.stdout.str()
    # every execution started from the empty cache and filled it (in the test's process only
    # the first one would have; an execution run again because it ran free fills it again)
    fills = (pytester.path / "fills.txt").read_text().split()
    assert len(fills) >= executions


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_executions_that_each_change_module_state_still_make_a_proof(pytester):
    pytester.makepyfile(test_marks=MARKS)
    result = explore_apart(pytester, "--seed", "1", "--ftrace-bound", "1")
    result.assert_outcomes(passed=1)
    assert "not a proof" not in result.stdout.str()
    interleavings, _bound, executions, _unreduced = proven(result)["test_marks"]
    assert 1 < interleavings <= executions  # the read and the write of box.n race
    # in the test's process each execution sees the marks of those before it: the search
    # diverges, and says so
    here = explore_apart(
        pytester, "--seed", "1", "--ftrace-bound", "1", "--ftrace-rounds", "process"
    )
    here.assert_outcomes(passed=1)
    assert "not a proof" in " ".join(here.stdout.str().split())


# -- the step classifier --------------------------------------------------------------------


def _classifier(*bodies):
    from pytest_ftrace.ftrace.instrument import opcode_table
    from pytest_ftrace.ftrace.modes.explore import Classifier

    c = Classifier([b.__code__ for b in bodies])
    c.hooked = opcode_table()
    return c


def _static(c):
    """The classifier's answers without the flag saying whether they depend on callers."""

    def answer(code, offset):
        kind, key, _dynamic = c(code, offset)
        return kind, key

    answer.start_safe = c.start_safe
    return answer


def _at(func, opname, argval=None, nth=0):
    import dis

    found = [
        i.offset
        for i in dis.get_instructions(func)
        if i.opname == opname and (argval is None or i.argval == argval)
    ]
    return found[nth]


def _read_then_write(box):
    value = box.n
    box.n = value + 1


def _in_place(box):
    box.items += [1]


def _calls(box):
    method = box.method
    method()


def _loop(box):
    for _ in range(3):
        box.n = box.n + 1


def _getter(box):
    return box.n


def test_a_step_reads_or_writes_the_name_it_starts_at():
    c = _classifier(_loop)
    c = _static(c)
    code = _read_then_write.__code__
    assert c(code, _at(_read_then_write, "LOAD_ATTR", "n")) == (1, "attr:n")
    # the store ends in a return from a function that is not the test's body: opaque
    assert c(code, _at(_read_then_write, "STORE_ATTR", "n")) == (0, "")
    # an in-place operator may mutate what it read
    assert c(_in_place.__code__, _at(_in_place, "LOAD_ATTR", "items")) == (2, "attr:items")
    # a call after the read: opaque
    assert c(_calls.__code__, _at(_calls, "LOAD_ATTR", "method")) == (0, "")
    # the loop's store goes back to the next read or out of the body: a write
    assert c(_loop.__code__, _at(_loop, "STORE_ATTR", "n")) == (2, "attr:n")
    # a helper's read is followed by a return to code the classifier cannot see
    assert c(_getter.__code__, _at(_getter, "LOAD_ATTR", "n")) == (0, "")
    # not an access at all, or a bad offset: opaque, never an error
    assert c(code, 0) == (0, "")
    assert c(code, 10**6) == (0, "")


def _over_items(items):
    total = 0
    for x in items:
        total += x
    return total


def test_a_loop_step_over_a_container_is_on_any_containers_items():
    # a loop's step is a point only over a container's iterator: it reads the container
    # and advances an iterator another thread may share (a write); the iterator is on the
    # frame's stack, so its container is not known: any container's items, not opaque
    c = _static(_classifier(_over_items))
    code = _over_items.__code__
    assert c(code, _at(_over_items, "FOR_ITER")) == (2, "item")


def _with_len(c, items):
    import sys

    size = len(items)  # a builtin that changes nothing: its step reads items
    code = sys._getframe().f_code
    return size, c(code, _at(_with_len, "LOAD_GLOBAL", "len"))


def _with_shadowed(c, items):
    import sys

    size = sorted(items)
    code = sys._getframe().f_code
    return size, c(code, _at(_with_shadowed, "LOAD_GLOBAL", "sorted"))


def sorted(items):  # noqa: A001 - shadows the builtin on purpose
    return list(items)


def test_a_call_of_a_builtin_that_changes_nothing_keeps_the_step_a_read():
    c = _static(_classifier())
    # len(items): a read of that list's items (keyed by the list, not every container's)
    size, (kind, key) = _with_len(c, [1, 2])
    assert (size, kind) == (2, 1)
    assert key.startswith("item:")
    # a module's own function of that name is not the builtin: opaque
    assert _with_shadowed(c, [2, 1])[1] == (0, "")


def _augmented(c, d, other):
    import sys

    d["n"] += 1
    other["n"] += 1
    code = sys._getframe().f_code
    return [
        c(code, _at(_augmented, op, nth=nth))
        for nth in (0, 1)
        for op in ("BINARY_SUBSCR", "STORE_SUBSCR")
    ]


def test_an_augmented_subscript_is_keyed_by_its_container():
    # `d["n"] += 1` loads d once and copies it (COPY): found by following the stack back
    c = _static(_classifier())
    first, first_store, second, second_store = _augmented(c, {"n": 0}, {"n": 0})
    assert first[0] == first_store[0] == 2  # read-modify-write: both steps write
    assert first[1] == first_store[1] != "item"
    assert second[1] == second_store[1] != first[1]


def _starts_plain(box):
    x = 1
    box.n = x


def _starts_with_a_call(callback):
    callback()


def test_a_body_that_starts_with_nothing_shared_has_a_safe_first_step():
    c = _classifier(_starts_plain, _starts_with_a_call)
    assert c.start_safe(_starts_plain.__code__)
    assert not c.start_safe(_starts_with_a_call.__code__)


def _locked_section(c, lock, box, answers):
    for _ in range(3):
        found = c.lock_step(sys._getframe(), lock)
        box.n = found
        answers.append(found)


def test_a_lock_operations_step_is_followed_once_per_call_site():
    # the code after a lock operation's call, up to its next point, is scanned the first time
    # only: a lock is taken at every visit of its `with` block
    import types

    from pytest_ftrace import _native

    c = _classifier(_locked_section)
    scans = []
    scan = c._scan
    c._scan = lambda *args: scans.append(args[1]) or scan(*args)
    answers = []
    _locked_section(c, _native.lock(), types.SimpleNamespace(), answers)
    assert answers[0][0] == 4 and len(set(answers)) == 1, answers
    assert len(scans) == 1, scans


ENUMERATED = """
import threading

class Box:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

STATES = [[Box() for _ in range(3)] for _ in range(5000)]
RACY = [([Box() for _ in range(3)], []) for _ in range(5000)]

def test_enumerated_locked(iteration_index, thread_index):
    boxes = STATES[iteration_index]
    for i, box in enumerate(boxes):
        with box.lock:
            box.n += i

def test_enumerated_racy(iteration_index, num_parallel_threads):
    boxes, done = RACY[iteration_index]
    for i, box in zip(range(3), boxes):
        with box.lock:
            seen = box.n
        with box.lock:
            box.n = seen + 1
    with boxes[0].lock:
        done.append(1)
        if len(done) == num_parallel_threads:
            assert [box.n for box in boxes] == [2, 2, 2], "lost update"
"""


def test_unpacking_an_enumerated_loops_tuples_is_not_opaque(pytester):
    # `for i, x in enumerate(xs)` (or zip) unpacks a new exact tuple: no code runs and
    # nothing shared is touched, so the step through it keeps its access (it was opaque,
    # a conflict with every step of the other thread)
    pytester.makepyfile(ENUMERATED)
    result = explore(pytester, "--seed", "1", "-k", "test_enumerated_locked")
    result.assert_outcomes(passed=1)
    interleavings, _bound, _executions, _ = proven(result)["test_enumerated_locked"]
    # the orders of the three boxes' locked sections: each box's two sections race, the
    # boxes are apart
    assert interleavings <= 20, result.stdout.str()


def test_a_lost_update_in_an_enumerated_loop_is_still_found(pytester):
    pytester.makepyfile(ENUMERATED)
    result = explore(pytester, "--seed", "1", "--ftrace-shrink", "0", "-k", "test_enumerated_racy")
    result.assert_outcomes(failed=1)


COUNTED = """
import threading

class Memo:
    def __init__(self):
        self.lock = threading.Lock()
        self.computed = []

STATES = [Memo() for _ in range(5000)]
RACY = [([], []) for _ in range(5000)]

def test_counted_locked(iteration_index, thread_index):
    memo = STATES[iteration_index]
    for i in range(3):
        with memo.lock:
            if i not in memo.computed:
                memo.computed.append(i)
        assert memo.computed.count(i) == 1

def test_counted_racy(iteration_index, num_parallel_threads):
    items, done = RACY[iteration_index]
    if items.count(7) == 0:
        items.append(7)
    done.append(1)
    if len(done) == num_parallel_threads:
        assert items.count(7) == 1, "added twice"
"""


def test_counting_a_lists_plain_items_is_a_read_of_them(pytester):
    # `items.count(x)` (and index) compares items with ==: with the argument and every item
    # of a built-in scalar type no code of theirs runs, so it is a read of the list's items;
    # the load of a list's method (`m = items.count`, as assertion rewriting does) touches
    # nothing shared
    pytester.makepyfile(COUNTED)
    result = explore(pytester, "--seed", "1", "-k", "test_counted_locked")
    result.assert_outcomes(passed=1)
    interleavings, _bound, _executions, _ = proven(result)["test_counted_locked"]
    assert interleavings <= 150, result.stdout.str()


def test_a_check_then_act_on_a_count_is_still_found(pytester):
    pytester.makepyfile(COUNTED)
    result = explore(pytester, "--seed", "1", "--ftrace-shrink", "0", "-k", "test_counted_racy")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*added twice*"])
