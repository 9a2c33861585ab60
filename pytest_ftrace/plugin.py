"""The pytest plugin: a thin layer of hooks over the modules of this package."""

from __future__ import annotations

import pytest

from pytest_ftrace import _native, gil, threadpool


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("ftrace", "thread-safety testing (pytest-ftrace)")
    group.addoption(
        "--ftrace",
        action="store_true",
        default=False,
        help="inject seeded yields and delays at shared-state accesses so races fail every run",
    )
    threadpool.add_options(group, parser, pluginmanager)


def pytest_configure(config: pytest.Config) -> None:
    threadpool.configure(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = _native.build_info()
    return [f"ftrace: native {info['version']} (pyo3 {info['pyo3']}), GIL {gil.state()}"]
