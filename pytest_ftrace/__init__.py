"""pytest-ftrace: make thread-safety bugs fail every run, and replay the interleaving
that broke a test.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

# The helpers and the threadpool markers are imported on first use: pytest imports this package
# for every session (the plugin lives in it), and most sessions need neither.
_LAZY = {
    "__version__": "pytest_ftrace._native",
    "ProcessConfig": "pytest_ftrace.helpers",
    "TaskConfig": "pytest_ftrace.helpers",
    "ThreadConfig": "pytest_ftrace.helpers",
    "run_process": "pytest_ftrace.helpers",
    "run_task": "pytest_ftrace.helpers",
    "run_thread": "pytest_ftrace.helpers",
    "not_parallelizable": "pytest_ftrace.threadpool",
    "parallelizable": "pytest_ftrace.threadpool",
    "concurrent_function_fixture": "pytest_ftrace.threaded",
    "concurrent_test": "pytest_ftrace.threaded",
    "generate_tests": "pytest_ftrace.threaded",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_ftrace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
