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
    "concurrent_function_fixture": "pytest_ftrace.helpers.threaded",
    "concurrent_test": "pytest_ftrace.helpers.threaded",
    "generate_tests": "pytest_ftrace.helpers.threaded",
}

__all__ = list(_LAZY)

# Set when this copy of the package has no built extension (a source tree: `python -m pytest` in
# a clone puts the clone first on sys.path) and the installed copy stands in for it (a note for
# the report header), or when there is none to stand in (`_PROBLEM`: the plugin turns it into a
# usage error, and `from pytest_ftrace import _native` into an ImportError of one line).
_STAND_IN: str | None = None
_PROBLEM: str | None = None


def _find_extension() -> None:
    """Hand the package over to an installed copy when this one has no `_native` extension.

    Costs one directory listing when the extension is here (the usual case). The installed copy
    is used whole (its Python modules with its extension, built together), and only when it is
    the version this source tree is; otherwise the error says what to run."""
    global _STAND_IN, _PROBLEM
    import os
    from importlib.machinery import EXTENSION_SUFFIXES

    here = os.path.dirname(os.path.abspath(__file__))
    names = {"_native" + suffix for suffix in EXTENSION_SUFFIXES}
    try:
        if names.intersection(os.listdir(here)):
            return
    except OSError:
        return
    import sys

    tree = os.path.dirname(here)
    wanted = _source_version(tree)
    seen = {here}
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), __name__)
        if candidate in seen or not os.path.isdir(candidate):
            continue
        seen.add(candidate)
        try:
            if not names.intersection(os.listdir(candidate)):
                continue
        except OSError:
            continue
        found = _installed_version(os.path.dirname(candidate))
        if wanted is not None and found is not None and found != wanted:
            _PROBLEM = (
                f"pytest-ftrace: the source tree {tree} (version {wanted}) has no built extension, "
                f"and the installed copy at {candidate} is version {found}; "
                f"reinstall from this tree (pip install {tree}) or build it in place "
                "(python3 scripts/test_all.py)"
            )
            return
        __path__[:] = [candidate]
        _STAND_IN = (
            f"source tree {tree} has no built extension: using the installed copy at {candidate}"
        )
        return
    _PROBLEM = (
        f"pytest-ftrace: the package at {here} has no built extension (_native) and no installed "
        f"copy was found on sys.path; install it (pip install {tree}) or build it in place "
        "(python3 scripts/test_all.py)"
    )


def _source_version(tree: str) -> str | None:
    """The version in the source tree's pyproject.toml, or None outside a source tree."""
    import re

    try:
        with open(f"{tree}/pyproject.toml", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else None


def _installed_version(entry: str) -> str | None:
    """The version of the copy installed in sys.path entry `entry`: its dist-info, or the
    pyproject.toml beside it (an editable install, whose entry is a source tree)."""
    import os

    prefix = "pytest_ftrace-"
    try:
        for name in os.listdir(entry):
            if name.startswith(prefix) and name.endswith(".dist-info"):
                return name[len(prefix) : -len(".dist-info")]
    except OSError:
        return None
    return _source_version(entry)


_find_extension()


def __getattr__(name: str):
    if name == "_native" and _PROBLEM is not None:
        raise ImportError(_PROBLEM)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_ftrace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
