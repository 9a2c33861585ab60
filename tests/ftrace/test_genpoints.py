"""Scheduling points beyond shared-state accesses (issue 17): generators, iteration over shared
containers, code generated at run time; real pytest sessions with the default --ftrace options."""

from __future__ import annotations

import re

import pytest

from pytest_ftrace.ftrace import genpoints

SEEDS = ["11", "12", "13"]

RACY = '''
import collections
import threading

ROUNDS = {}
GUARD = threading.Lock()


def per_round(name, iteration, factory):
    with GUARD:
        key = (name, iteration)
        if key not in ROUNDS:
            ROUNDS[key] = factory()
        return ROUNDS[key]


def both(first, second):
    """Run two functions in two threads; re-raise the first error."""
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def tickets():
    n = 0
    while True:
        n += 1
        yield n


def test_generator_shared_by_the_round(iteration_index):
    gen = per_round("gen", iteration_index, tickets)
    for _ in range(5):
        next(gen)  # ValueError: generator already executing


def test_generator_expression_shared_by_two_threads():
    squares = (i * i for i in range(100))

    def take():
        for _ in range(10):
            next(squares)

    both(take, take)


def test_dict_iterated_while_another_thread_adds():
    table = {name: len(name) for name in ("a", "bb", "ccc", "dddd")}

    def reader():
        count = 0
        for _name in table:
            count += 1

    def writer():
        for i in range(4):
            table["x" * (i + 5)] = i + 5

    both(reader, writer)


def test_set_iterated_while_another_thread_adds():
    seen = {1, 2, 3, 4, 5}

    def reader():
        odd = 0
        for v in seen:
            odd += v % 2

    def writer():
        for v in range(10, 14):
            seen.add(v)

    both(reader, writer)


def test_list_iterated_while_another_thread_inserts_in_front():
    queue = [1, 2, 3, 4, 5, 6]

    def reader():
        got = []
        for v in queue:
            got += [v]
        assert len(got) == len(set(got)), f"an element was seen twice: {got}"

    def writer():
        for v in range(100, 103):
            queue.insert(0, v)

    both(reader, writer)


def test_deque_iterated_while_another_thread_appends():
    window = collections.deque([1, 2, 3, 4])

    def reader():
        total = 0
        for v in window:
            total += v

    def writer():
        for v in range(3):
            window.append(v)

    both(reader, writer)


SOURCE = """
class Tally:
    def __init__(self):
        self.count = 0

    def bump(self):
        count = self.count
        self.count = count + 1
"""


def test_generated_code_read_modify_write():
    namespace = {}
    exec(compile(SOURCE, "<generated tally>", "exec"), namespace)
    tally = namespace["Tally"]()

    def work():
        for _ in range(3):
            tally.bump()

    both(work, work)
    assert tally.count == 6, f"lost update: {tally.count}"


class Peak:
    def __init__(self):
        self.top = -1

    def offer(self, v):
        if v > self.top:
            self.top = v


def test_non_atomic_max(iteration_index, thread_index):
    peak = per_round("peak", iteration_index, Peak)
    for i in range(30):
        v = i * 10 + thread_index
        peak.offer(v)
        assert peak.top >= v, f"the max lost {v}: {peak.top}"
'''

SAFE = '''
import collections
import threading

ROUNDS = {}
GUARD = threading.Lock()


def per_round(name, iteration, factory):
    with GUARD:
        key = (name, iteration)
        if key not in ROUNDS:
            ROUNDS[key] = factory()
        return ROUNDS[key]


def both(first, second):
    errors = []

    def run(fn):
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def tickets():
    n = 0
    while True:
        n += 1
        yield n


class Locked:
    def __init__(self, it):
        self.it = it
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            return next(self.it)


def test_generator_shared_by_the_round(iteration_index):
    gen = per_round("gen", iteration_index, lambda: Locked(tickets()))
    for _ in range(5):
        gen.take()


def test_containers_iterated_under_a_lock():
    lock = threading.Lock()
    table = {name: len(name) for name in ("a", "bb", "ccc")}
    seen = {1, 2, 3}
    queue = [1, 2, 3, 4]
    window = collections.deque([1, 2, 3])

    def reader():
        with lock:
            for name in table:
                pass
            for v in seen:
                pass
            got = [v for v in queue]
            assert len(got) == len(set(got))
            for v in window:
                pass

    def writer():
        for i in range(3):
            with lock:
                table["x" * (i + 5)] = i
                seen.add(10 + i)
                queue.insert(0, 100 + i)
                window.append(i)

    both(reader, writer)


SOURCE = """
import threading

class Tally:
    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def bump(self):
        with self.lock:
            count = self.count
            self.count = count + 1
"""


def test_generated_code_read_modify_write():
    namespace = {}
    exec(compile(SOURCE, "<generated tally>", "exec"), namespace)
    tally = namespace["Tally"]()

    def work():
        for _ in range(3):
            tally.bump()

    both(work, work)
    assert tally.count == 6


class Peak:
    def __init__(self):
        self.top = -1
        self.lock = threading.Lock()

    def offer(self, v):
        with self.lock:
            if v > self.top:
                self.top = v


def test_non_atomic_max(iteration_index, thread_index):
    peak = per_round("peak", iteration_index, Peak)
    for i in range(30):
        v = i * 10 + thread_index
        peak.offer(v)
        assert peak.top >= v
'''

RACY_TESTS = re.findall(r"^def (test_\w+)", RACY, re.M)


def outcomes(result) -> dict[str, str]:
    found = {}
    for line in result.stdout.lines:
        m = re.match(r"^\S+::(test_\w+) (PASSED|FAILED|ERROR)", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


# The programs above keep each round's objects in module dicts keyed by round (made for rounds
# in one process): every round changes the module state, so under rounds from a snapshot each
# one would pay a fork. These tests are about the points in generators and generated code, not
# about where rounds run (test_fork.py, test_snapshot.py): the rounds stay in this process.
ROUNDS_HERE = ("--ftrace", "--ftrace-rounds", "process")


@pytest.mark.parametrize("seed", SEEDS)
def test_racy_shapes_fail_with_default_options(pytester, seed):
    pytester.makepyfile(test_racy=RACY)
    result = pytester.runpytest(*ROUNDS_HERE, "--seed", seed, "-v", "-p", "no:cacheprovider")
    got = outcomes(result)
    assert len(RACY_TESTS) == 8
    missed = [name for name in RACY_TESTS if got.get(name) != "FAILED"]
    assert not missed, result.stdout.str()
    out = result.stdout.str()
    assert "generator already executing" in out
    assert "dictionary changed size during iteration" in out
    assert "Set changed size during iteration" in out
    assert "deque mutated during iteration" in out
    assert "an element was seen twice" in out
    assert "lost update" in out
    assert "the max lost" in out


@pytest.mark.parametrize("seed", SEEDS)
def test_safe_twins_pass(pytester, seed):
    pytester.makepyfile(test_safe=SAFE)
    result = pytester.runpytest(*ROUNDS_HERE, "--seed", seed, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_exclude_leaves_generated_code_out(pytester):
    # Without points inside the generated method its read-modify-write is never split.
    pytester.makepyfile(test_racy=RACY)
    result = pytester.runpytest(
        "--ftrace",
        "--seed",
        "11",
        "--ftrace-exclude",
        "<generated*",
        "-p",
        "no:cacheprovider",
        "-k",
        "generated_code",
    )
    result.assert_outcomes(passed=1)


def test_generated_code_started_from_unhooked_code_is_left_out(pytester):
    # The generated code is first run by the standard library (functools.reduce calls it), not
    # by hooked code: it gets no points, so the split read-modify-write is never seen.
    pytester.makepyfile(
        test_gen="""
        import functools
        import threading

        SOURCE = "def add(box, _):\\n    n = box['n']\\n    box['n'] = n + 1\\n    return box\\n"

        def test_generated_from_the_stdlib():
            namespace = {}
            exec(compile(SOURCE, "<generated add>", "exec"), namespace)
            box = {"n": 0}
            threads = [
                threading.Thread(target=functools.reduce, args=(namespace["add"], range(3), box))
                for _ in range(2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert box["n"] == 6
        """
    )
    result = pytester.runpytest("--ftrace", "--seed", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


STATS = """
import threading

def test_loops_and_generators():
    table = {i: i for i in range(5)}
    for _ in range(3):
        for k in table:
            pass
    gen = (i for i in range(4))
    for _ in gen:
        pass

def test_range_loop_only():
    total = 0
    for i in range(200):
        total += i
    assert total
"""


def stats_rows(result) -> dict[str, dict[str, int]]:
    lines = result.stdout.lines
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("executions"))
    names = re.findall(r"[a-z0-9-]+(?: us)?", lines[header])
    rows = {}
    for line in lines[header + 1 :]:
        parts = line.split()
        if len(parts) != len(names) or "::" not in parts[-1]:
            break
        rows[parts[-1].split("::")[-1]] = dict(zip(names[:-1], map(float, parts[:-1]), strict=True))
    return rows


@pytest.mark.parametrize("mode", ["exact", "chaos"])
def test_verbose_stats_count_points_by_kind(pytester, mode):
    pytester.makepyfile(test_stats=STATS)
    result = pytester.runpytest(
        "--ftrace", "--ftrace-mode", mode, "--seed", "1", "-v", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
    rows = stats_rows(result)
    loops, plain = rows["test_loops_and_generators"], rows["test_range_loop_only"]
    if genpoints.ITER_POINTS:
        # 3 loops over a 5-key dict (5 steps each and the last one), per execution.
        assert loops["iter"] == loops["executions"] * 3 * 6
    # The generator expression yields 4 times (a yield, and a resumption after it).
    assert loops["gen"] >= loops["executions"] * 4
    assert plain["iter"] == 0 and plain["gen"] == 0 and plain["gen-code"] == 0


def test_stack_depths_agree_with_the_compiler():
    # Every code object of a few stdlib modules: a consistent flow, within co_stacksize.
    import ast
    import dis
    import inspect
    import json.decoder
    import types

    def walk(code):
        yield code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from walk(const)

    checked = 0
    for module in (json.decoder, ast, dis, inspect):
        top = compile(inspect.getsource(module), module.__file__, "exec")
        for code in walk(top):
            depths = genpoints.stack_depths(code)
            assert max(depths.values()) <= code.co_stacksize, code
            checked += 1
            for _offset, slot in genpoints.iter_slots(code):
                assert slot < genpoints._n_localsplus(code) + code.co_stacksize
    assert checked > 100


NESTED = """
def test_nested_shapes():
    items = [1, 2, 3]
    seen = {1, 2}
    with open(__file__) as fh:
        try:
            for a in items:
                for b in seen:
                    pass
            raise KeyError(a)
        except KeyError:
            pass
    squares = [x * x for x in items]
    assert sum(v for v in seen) == 3
    for key, value in {1: 2}.items():
        pass
    for line in fh if False else ():
        pass
"""


@pytest.mark.skipif(not genpoints.ITER_POINTS, reason="no iteration points on this interpreter")
def test_iteration_points_find_the_iterator_in_every_loop_shape(pytester):
    # Every step over a container is counted, in loops nested in try and with blocks, in a
    # comprehension, a generator expression (its iterator is an argument) and over items().
    pytester.makepyfile(test_nested=NESTED)
    result = pytester.runpytest(
        "--ftrace", "--seed", "1", "--threads", "1", "--iterations", "2", "-v",
        "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    row = stats_rows(result)["test_nested_shapes"]
    # items: 4 steps, seen: 3 steps for each of 3 items, the comprehension 4, the generator
    # expression 3, items() 2; the loop over a tuple is not a point.
    assert row["iter"] == row["executions"] * (4 + 9 + 4 + 3 + 2)


def test_a_hooked_code_object_is_decoded_once(monkeypatch):
    """Its loop slots, its accesses and its access slots are analysed one after the other when
    a code object gets hooked: `dis` decodes it once for the three."""
    import dis

    from pytest_ftrace.ftrace import accesses, sharing

    source = "def f(d, items):\n    for k in items:\n        d[k] = d.get(k, 0) + 1\n"
    namespace: dict = {}
    exec(compile(source, "<decoded once>", "exec"), namespace)
    code = namespace["f"].__code__
    calls = []
    real = dis.get_instructions

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(dis, "get_instructions", counting)
    slots = genpoints.iter_slots(code)
    table, _texts = accesses.specs(code)
    entries = sharing.access_entries(code)
    assert calls == [code]
    assert table  # the analyses still found what they look for
    if genpoints.ITER_POINTS:
        assert slots and entries
