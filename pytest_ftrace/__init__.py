"""pytest-ftrace: make thread-safety bugs fail every run, and replay the interleaving
that broke a test."""

from pytest_ftrace import _native

__version__ = _native.__version__

__all__ = ["__version__"]
