"""--ftrace-isolate: run tests in a child process so an interpreter crash fails only that test.

(Placeholder: the options and the runner land with issue 7.)
"""

from __future__ import annotations


def add_options(group, parser, pluginmanager) -> None:
    """Register --ftrace-isolate and its ini key."""


def configure(config) -> None:
    """Register the isolating runner when --ftrace-isolate is given."""
