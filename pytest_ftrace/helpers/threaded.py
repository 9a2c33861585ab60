"""pytest-threaded's API: `concurrent_test`, `concurrent_function_fixture`, `generate_tests`.

    @pytest.fixture(scope="function")
    @concurrent_function_fixture
    def my_fixture():
        yield {"value": 42}

    @concurrent_test
    def my_test(my_fixture):
        print(f"Value: {my_fixture['value']}")

    generate_tests(globals())

`generate_tests(namespace)` puts a test function `test_<name>` into the module's namespace for
each function decorated with `concurrent_test` in it. The generated tests are ordinary pytest
tests with the signature of the decorated function (so their fixtures are resolved by pytest),
marked `ftrace_concurrent`: they run concurrently with each other in the thread pool of
`--threadpool` (turned on for them when it is not given, with as many workers as
`concurrent.futures.ThreadPoolExecutor` has by default), each with its own function-scoped
fixtures, its own report and its own captured output. Selecting one by its id
(`pytest test_x.py::test_my_test`) runs that one alone.

Fixtures of a wider scope are set up once, before the tests start, and shared; function-scoped
fixtures need no decorator here (`concurrent_function_fixture` returns the function as it is).

Imported on first use of one of the names (pytest_ftrace/__init__.py).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

__all__ = ["concurrent_function_fixture", "concurrent_test", "generate_tests"]

# The functions decorated with concurrent_test (a weak set: the decorator leaves them as they
# are, and does not keep them alive).
_CONCURRENT: weakref.WeakSet = weakref.WeakSet()


def concurrent_test(func: Callable) -> Callable:
    """Mark `func` as a test that generate_tests turns into a concurrent test. The function is
    returned unchanged."""
    if not callable(func):
        raise TypeError(f"concurrent_test decorates a function, not {func!r}")
    _CONCURRENT.add(func)
    return func


def concurrent_function_fixture(func: Callable) -> Callable:
    """pytest-threaded needed this under `@pytest.fixture(scope="function")` so that each
    concurrent test got its own value; the thread pool sets up function-scoped fixtures per test
    already, so the function is returned unchanged."""
    return func


def _test_name(name: str) -> str:
    return name if name.startswith("test") else f"test_{name}"


def _make_test(func: Callable, name: str, module: str | None) -> Callable:
    """A test function that calls `func`, with its signature (for pytest's fixtures)."""
    if inspect.iscoroutinefunction(func):
        raise TypeError(
            f"concurrent_test {func.__qualname__} is a coroutine function; the thread pool runs "
            "plain functions (call asyncio.run inside it)"
        )

    @functools.wraps(func)
    def test(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return func(*args, **kwargs)

    test.__name__ = name
    test.__qualname__ = name
    if module is not None:
        test.__module__ = module
    # wraps copied func's __dict__, marks included, into the new function's own dict: marking
    # it here leaves func's marks as they were.
    return pytest.mark.ftrace_concurrent(test)


def generate_tests(namespace: MutableMapping[str, Any]) -> list[str]:
    """Add a test `test_<name>` to `namespace` (a module's `globals()`) for each function in it
    decorated with concurrent_test; a decorated function whose name starts with `test` is
    replaced by its test. Returns the names of the tests."""
    if not isinstance(namespace, MutableMapping):
        raise TypeError(f"generate_tests takes a module's globals(), not {type(namespace)!r}")
    module = namespace.get("__name__")
    made = []
    for name, value in list(namespace.items()):
        if not callable(value):
            continue
        try:
            concurrent = value in _CONCURRENT
        except TypeError:  # not weakly referenceable: not one of ours
            continue
        if not concurrent:
            continue
        test_name = _test_name(name)
        namespace[test_name] = _make_test(value, test_name, module)
        made.append(test_name)
    return made
