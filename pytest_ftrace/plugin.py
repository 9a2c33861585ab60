"""The pytest plugin: a thin layer of hooks over the modules of this package."""

from __future__ import annotations

import sys

import pytest

from pytest_ftrace import _native


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ftrace", "thread-safety testing (pytest-ftrace)")
    group.addoption(
        "--ftrace",
        action="store_true",
        default=False,
        help="inject seeded yields and delays at shared-state accesses so races fail every run",
    )


def gil_state() -> str:
    """'disabled', 'enabled' or 'enabled (free-threaded build)' for the running interpreter."""
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    if is_enabled is None:
        return "enabled"
    if is_enabled():
        if _free_threaded_build():
            return "enabled (free-threaded build, GIL re-enabled)"
        return "enabled"
    return "disabled"


def _free_threaded_build() -> bool:
    import sysconfig

    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = _native.build_info()
    return [f"ftrace: native {info['version']} (pyo3 {info['pyo3']}), GIL {gil_state()}"]
