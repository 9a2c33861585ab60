"""The pytest plugin: a thin layer of hooks over the modules of this package."""

from __future__ import annotations

import pytest

from pytest_ftrace import _native, gil, options, threadpool


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("ftrace", "thread-safety testing (pytest-ftrace)")
    group.addoption(
        "--ftrace",
        action="store_true",
        default=False,
        help="inject seeded yields and delays at shared-state accesses so races fail every run",
    )
    opt = options
    opt.add_option(
        group,
        parser,
        pluginmanager,
        "--ftrace-threads",
        aliases=("--threads", "--parallel-threads"),
        dest="ftrace_threads",
        type=opt.positive_int_or_auto("--threads"),
        default=None,
        metavar="N|auto",
        help="run each test body in N threads at once (auto: usable CPUs). ini: ftrace_threads",
    )
    opt.add_option(
        group,
        parser,
        pluginmanager,
        "--ftrace-iterations",
        aliases=("--iterations", "--executions"),
        dest="ftrace_iterations",
        type=opt.positive_int("--iterations"),
        default=None,
        metavar="M",
        help="rounds per test; each thread runs the body once per round. ini: ftrace_iterations",
    )
    opt.add_option(
        group,
        parser,
        pluginmanager,
        "--ftrace-require-gil-disabled",
        aliases=("--require-gil-disabled",),
        dest="ftrace_require_gil_disabled",
        action="store_true",
        default=None,
        help="refuse a build whose GIL is on, and fail the run if a module re-enables it. "
        "ini: ftrace_require_gil_disabled",
    )
    opt.add_option(
        group,
        parser,
        pluginmanager,
        "--ftrace-timeout",
        dest="ftrace_timeout",
        type=opt.positive_float("--ftrace-timeout"),
        default=None,
        metavar="SECONDS",
        help="bound each test's threaded execution; on expiry the test fails with every "
        f"thread's stack (default {opt.DEFAULT_TIMEOUT:g}). ini: ftrace_timeout",
    )
    parser.addini("ftrace_threads", "threads per test (N or auto)", default="")
    parser.addini("ftrace_iterations", "rounds per test", default="")
    parser.addini("ftrace_require_gil_disabled", "refuse a GIL-enabled build", type="bool")
    parser.addini("ftrace_timeout", "seconds a test's threaded execution may take", default="")
    opt.add_ini(
        parser,
        pluginmanager,
        "thread_unsafe_fixtures",
        "fixtures that make a test run on one thread (added to the built-in list)",
        type="linelist",
        default=[],
    )
    threadpool.add_options(group, parser, pluginmanager)


def pytest_configure(config: pytest.Config) -> None:
    threadpool.configure(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = _native.build_info()
    return [f"ftrace: native {info['version']} (pyo3 {info['pyo3']}), GIL {gil.state()}"]
