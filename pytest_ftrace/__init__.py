"""pytest-ftrace: make thread-safety bugs fail every run, and replay the interleaving
that broke a test."""

from pytest_ftrace import _native

__version__ = _native.__version__

from pytest_ftrace.helpers import (  # noqa: E402
    ProcessConfig,
    TaskConfig,
    ThreadConfig,
    run_process,
    run_task,
    run_thread,
)
from pytest_ftrace.threadpool import not_parallelizable, parallelizable  # noqa: E402

__all__ = [
    "__version__",
    "ProcessConfig",
    "TaskConfig",
    "ThreadConfig",
    "not_parallelizable",
    "parallelizable",
    "run_process",
    "run_task",
    "run_thread",
]
