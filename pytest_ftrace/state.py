"""Session-wide state that every part of the plugin may read: the configured sessions, the
stash key of each session's state, and the threads a watchdog gave up on.

This module imports nothing of the plugin, so importing it never makes a cycle. hooks.py
imports it when the plugin loads, so one copy serves every session in the process (pytester's
in-process runs included: their sessions nest inside the outer one).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_ftrace.ftrace.session import FtraceSession
    from pytest_ftrace.options import Settings

# The sessions configured in this process, innermost last (pytester runs nest them).
ACTIVE_CONFIGS: list[pytest.Config] = []

# (test node id, thread) for every thread a watchdog gave up on in this process.
LEAKED: list[tuple[str, threading.Thread]] = []


class SessionState:
    """What the hooks keep for one session."""

    def __init__(self, settings: Settings, peers: set[str], gil_watch: Any):
        self.settings = settings
        self.peers = peers
        self.single: list[tuple[str, str]] = []  # (nodeid, reason) of tests run on one thread
        self.gil = gil_watch
        self.ftrace: FtraceSession | None = None
        self.enabled: set[str] = set()  # feature markers seen at collection


STATE_KEY = pytest.StashKey[SessionState]()


def leaked_alive() -> list[tuple[str, threading.Thread]]:
    """The leaked threads that are still running."""
    return [(nodeid, thread) for nodeid, thread in LEAKED if thread.is_alive()]


def guard_sessions() -> None:
    """Register a SessionGuard in each configured session that has none (called when a thread
    leaks: the sessions that enclose a pytester run need one too)."""
    for config in ACTIVE_CONFIGS:
        if not config.pluginmanager.has_plugin("ftrace-guard"):
            config.pluginmanager.register(SessionGuard(config), "ftrace-guard")


class SessionGuard:
    """Reports leaked threads at the end of the session, and does not wait for them: a process
    that still has them at shutdown ends with os._exit once everything is reported."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_terminal_summary(self, terminalreporter) -> None:
        alive = leaked_alive()
        if not alive:
            return
        terminalreporter.section("ftrace: leaked threads", sep="-", yellow=True)
        for nodeid, thread in alive:
            kind = "daemon" if thread.daemon else "not daemon"
            terminalreporter.line(f"{nodeid}: thread {thread.name} ({kind}) is still running")
        terminalreporter.line(
            "the process exits without waiting for them (os._exit, after the reports are written)"
        )

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        # An enclosing session (pytester) is still running while this one is in the list too.
        nested = any(other is not config for other in ACTIVE_CONFIGS)
        if not leaked_alive() or nested:
            return
        # A leaked thread may never finish: interpreter shutdown would wait for it (not daemon)
        # or run while it still holds locks (daemon). Everything is reported by now.
        session = config.pluginmanager.get_plugin("session")
        status = getattr(session, "exitstatus", 1)
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream must not stop the exit
                pass
        os._exit(int(status))
