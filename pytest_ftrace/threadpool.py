"""--threadpool N|auto: run distinct tests concurrently in worker threads of one process."""

from __future__ import annotations

import pytest


def add_options(group, parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the threadpool options and ini keys (called from plugin.pytest_addoption)."""


def configure(config: pytest.Config) -> None:
    """Validate the options and register the threadpool runner (called from pytest_configure)."""
