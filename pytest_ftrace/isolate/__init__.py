"""--ftrace-isolate: run tests in a child process so an interpreter crash fails only that test.

This module holds the option's validation and the entry the hooks call (`configure`,
`configure_marked`). The option itself is registered in options.py, and this module is imported
only when it is given; the runner is in isolate.runner, imported only when isolation is on.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os

import pytest

from pytest_ftrace.options import ISOLATE_MODES as MODES
from pytest_ftrace.options import ISOLATE_OFF as _OFF


def parse_mode(value: str) -> str:
    """test, module, or off."""
    mode = str(value).strip().lower()
    if mode in MODES:
        return mode
    if mode in _OFF:
        return "off"
    import argparse

    hint = ""
    text = str(value).strip()
    if "/" in mode or mode.endswith(".py") or "::" in mode or os.path.exists(text):
        hint = " (to run a path, write --ftrace-isolate=test PATH or --ftrace-isolate PATH)"
    raise argparse.ArgumentTypeError(
        f"--ftrace-isolate takes test, module or off, not {value!r}{hint}"
    )


parse_mode.__name__ = "--ftrace-isolate"


def _checked(value: str, where: str) -> str:
    import argparse

    try:
        return parse_mode(value)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"{where}{exc}") from None


def resolve_mode(config: pytest.Config) -> str | None:
    """The isolation mode of the whole session: --ftrace-isolate > --forked > ini; None: off."""
    value = config.getoption("ftrace_isolate", None)
    if value is not None:
        mode = _checked(value, "")
        return None if mode == "off" else mode
    if config.getoption("ftrace_forked", False) or config.getoption(
        "ftrace_forked_subprocess", False
    ):
        return "test"
    try:
        raw = config.getini("ftrace_isolate")
    except ValueError:
        raw = ""
    if not raw:
        return None
    mode = _checked(raw, "ini key ftrace_isolate: ")
    return None if mode == "off" else mode


def refuse_with_threadpool(config: pytest.Config) -> None:
    """--threadpool is on (from the command line or an ini key): with isolation on as well,
    from any source, that is a usage error (a worker thread cannot fork a child per test)."""
    if resolve_mode(config) is None:
        return
    isolate = (
        "--ftrace-isolate" if config.option.ftrace_isolate is not None else "ini ftrace_isolate"
    )
    if config.option.ftrace_threadpool is not None:
        pool = "--threadpool"
    else:
        from pytest_ftrace import options

        given = options.ini_value(config, "ftrace_threadpool") is not None
        pool = "ini ftrace_threadpool" if given else "ini threadpool"
    raise pytest.UsageError(
        f"--ftrace-isolate and --threadpool cannot be combined ({isolate} with {pool})"
    )


def configure(config: pytest.Config) -> None:
    """Register the isolating runner (called when --ftrace-isolate, --forked or the ini key is
    given)."""
    mode = resolve_mode(config)
    if mode is None or config.getoption("collectonly", False):
        return
    if not hasattr(os, "fork"):
        raise pytest.UsageError("--ftrace-isolate needs os.fork (Linux, macOS or another POSIX)")
    from pytest_ftrace.isolate.runner import Isolator

    config.pluginmanager.register(Isolator(config, mode), "ftrace-isolate")


def configure_marked(config: pytest.Config) -> None:
    """Isolate the tests marked `forked` (pytest-forked's marker), each in a child of its own;
    the other tests run in the main process. Called at collection, when the first such test is
    found. Nothing to do when the whole session is isolated already, or isolation is off."""
    manager = config.pluginmanager
    if manager.has_plugin("ftrace-isolate") or config.getoption("collectonly", False):
        return
    value = config.getoption("ftrace_isolate", None)
    if value is not None and _checked(value, "") == "off":
        return
    if not hasattr(os, "fork"):
        return  # as without a plugin that knows the marker: the tests run in this process
    from pytest_ftrace.isolate.runner import Isolator

    manager.register(Isolator(config, "test", only_marked=True), "ftrace-isolate")
