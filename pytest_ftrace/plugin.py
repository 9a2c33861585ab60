"""The pytest plugin (the pytest11 entry point). The hooks are in hooks.py.

pytest loads this module, and every module of an installed plugin's package, through its
assertion-rewriting import hook. The hook reads its own cached copy of each module, which costs
start-up time in proportion to the module's size, on every pytest run. So this module stays
small, and it takes the package out of the hook before anything else is imported: every module
here says PYTEST_DONT_REWRITE, so the hook would load them unchanged anyway.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""


def _skip_assertion_rewriting() -> None:
    """Let Python's own loader import the rest of the package. The hook's attributes are
    private; where they are missing, the modules just go through the hook, as before."""
    import sys

    for finder in sys.meta_path:
        marked = getattr(finder, "_must_rewrite", None)
        if isinstance(marked, set) and __package__ in marked:
            marked.discard(__package__)
            cache = getattr(finder, "_marked_for_rewrite_cache", None)
            if isinstance(cache, dict):
                cache.clear()


_skip_assertion_rewriting()


def _check_extension() -> None:
    """A package without its built extension is a usage error of one line (what happened, what
    to run), raised while pytest loads its plugins, instead of an INTERNALERROR later."""
    import pytest_ftrace

    if pytest_ftrace._PROBLEM is not None:
        import pytest

        raise pytest.UsageError(pytest_ftrace._PROBLEM)


_check_extension()

from pytest_ftrace.hooks import (  # noqa: E402, F401 - pytest finds hooks and fixtures here
    iteration_index,
    num_iterations,
    num_parallel_threads,
    pytest_addoption,
    pytest_configure,
    pytest_load_initial_conftests,
    pytest_make_collect_report,
    pytest_report_header,
    pytest_runtest_call,
    pytest_runtest_makereport,
    pytest_runtest_setup,
    pytest_terminal_summary,
    thread_index,
)

# pytest looks at every name here for hooks and fixtures, twice per session: keep only those.
del _skip_assertion_rewriting, _check_extension
