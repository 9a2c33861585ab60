"""The user's objects live as long under --ftrace as without it: an object whose last
reference goes dies at once (its weak references' callbacks run, `__del__` runs), in a round
as outside one. Found with boltons 26.2.0's `test_min_id_map` (`MinIDMap` frees an id from a
weak reference's callback), which fails in every exact-mode execution. Real pytest sessions on
small test files."""

from __future__ import annotations

import pytest

DIES_AT_ONCE = """
import weakref

class Box:
    def __init__(self, value):
        self.value = value  # an attribute store: a location the race tracking records

def test_dies_with_its_last_reference():
    died = []
    refs = []
    for i in range(5):
        box = Box(i)
        refs.append(weakref.ref(box, lambda ref, i=i: died.append(i)))
        del box
        assert died == list(range(i + 1)), "an object outlived its last reference"
"""


@pytest.mark.parametrize("mode", ["chaos", "exact-no-races"])
def test_an_object_dies_with_its_last_reference(pytester, mode):
    pytester.makepyfile(test_box=DIES_AT_ONCE)
    extra = ["--ftrace-races", "off"] if mode == "exact-no-races" else ["--ftrace-mode", mode]
    result = pytester.runpytest("--ftrace", "--threads", "2", "--iterations", "2", *extra)
    result.assert_outcomes(passed=1)


def test_an_object_dies_with_its_last_reference_under_race_tracking(pytester):
    pytester.makepyfile(test_box=DIES_AT_ONCE)
    result = pytester.runpytest("--ftrace", "--threads", "2", "--iterations", "2")
    result.assert_outcomes(passed=1)


CONTAINERS_DIE = """
import weakref

class Box:
    pass

def watch(died, i):
    box = Box()
    return box, weakref.ref(box, lambda ref: died.append(i))

def test_a_list_does_not_outlive_its_last_reference():
    died = []
    refs = []
    for i in range(5):
        box, ref = watch(died, i)
        refs.append(ref)
        items = []
        items.append(box)  # a list method, a subscript, `in`: locations on the list
        assert items[0] is box and box in items
        del box, items
        assert died == list(range(i + 1)), "a list outlived its last reference"

def test_a_dict_does_not_outlive_its_last_reference():
    died = []
    refs = []
    for i in range(5):
        box, ref = watch(died, i)
        refs.append(ref)
        table = {}
        table["k"] = box
        assert table.get("k") is box and "k" in table
        del box, table
        assert died == list(range(i + 1)), "a dict outlived its last reference"

def test_a_loop_left_early_does_not_keep_its_list():
    died = []
    refs = []
    for i in range(5):
        box, ref = watch(died, i)
        refs.append(ref)
        items = [box, 1]
        for item in items:
            break  # the loop's iterator still holds the list when it goes
        del item, box, items
        assert died == list(range(i + 1)), "a loop's iterator outlived the loop"

def collected(box):
    out = []
    out.append((box, 1))  # the list a function returns, dropped by its caller
    return out

def test_a_returned_list_dropped_by_the_caller():
    died = []
    refs = []
    for i in range(5):
        box, ref = watch(died, i)
        refs.append(ref)
        collected(box)
        del box
        assert died == list(range(i + 1)), "a returned list outlived its last reference"

def test_a_closure_cell_does_not_outlive_its_function():
    died = []
    refs = []

    def keeper(box):
        def peek():
            nonlocal box
            box = box  # reads and writes the cell
            return box
        return peek

    for i in range(5):
        box, ref = watch(died, i)
        refs.append(ref)
        peek = keeper(box)
        del box
        assert peek() is not None
        del peek
        assert died == list(range(i + 1)), "a closure cell outlived its function"
"""


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--iterations", "2"], id="race-tracking"),
        # rounds by budget: the sharing signal tracks the first rounds' accesses too
        pytest.param(["--ftrace-races", "off"], id="sharing-signal"),
        pytest.param([], id="both"),
    ],
)
def test_containers_die_with_their_last_reference(pytester, extra):
    pytester.makepyfile(test_containers=CONTAINERS_DIE)
    result = pytester.runpytest("--ftrace", "--threads", "2", *extra)
    result.assert_outcomes(passed=5)
