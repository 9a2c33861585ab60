"""The package, the extension and the plugin registration, on every interpreter."""

import subprocess
import sys
import sysconfig

import pytest
from conftest import FREE_THREADED_BUILD, only_free_threaded

import pytest_ftrace
from pytest_ftrace import _native


def test_extension_is_loaded_from_the_package():
    assert _native.__name__ == "pytest_ftrace._native"
    assert _native.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))
    assert pytest_ftrace.__version__ == _native.__version__


def test_extension_build_matches_interpreter():
    info = _native.build_info()
    assert info["free_threaded_build"] is FREE_THREADED_BUILD
    assert info["pyo3"] == "0.28"


@only_free_threaded
def test_importing_plugin_keeps_gil_disabled():
    code = (
        "import sys\n"
        "assert not sys._is_gil_enabled(), 'GIL enabled before import'\n"
        "import pytest_ftrace, pytest_ftrace._native, pytest_ftrace.plugin\n"
        "print(sys._is_gil_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@only_free_threaded
def test_pytest_session_with_plugin_keeps_gil_disabled(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import sys
        def test_gil():
            import pytest_ftrace._native
            assert not sys._is_gil_enabled()
        """
    )
    result = pytester.runpytest_subprocess("-p", "ftrace")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ftrace: *GIL disabled, native *"])


def test_help_shows_ftrace_group(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["thread-safety testing (pytest-ftrace):", "  --ftrace*"])


def test_header_names_the_extension(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok(): pass")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ftrace: *, GIL *, native * (pyo3 0.28)"])


def test_no_ftrace_disables_the_plugin(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok(): pass")
    result = pytester.runpytest_subprocess("-p", "no:ftrace")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("ftrace: *")
    result = pytester.runpytest_subprocess("-p", "no:ftrace", "--ftrace")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unrecognized arguments: --ftrace*"])


def test_plugin_modules_skip_the_rewriting_hook_and_tests_keep_it(pytester: pytest.Pytester):
    """The plugin's modules load with Python's own loader (pytest's assertion-rewriting hook
    costs start-up time on every run), while the tests' asserts are still rewritten."""
    pytester.makepyfile(
        """
        import sys
        from _pytest.assertion.rewrite import AssertionRewritingHook

        def test_loaders():
            # pytest itself loads the package and the entry module, before the plugin runs
            loaded = [
                name for name in sys.modules
                if name.startswith("pytest_ftrace.")
                and name not in ("pytest_ftrace.plugin", "pytest_ftrace._native")
            ]
            assert {"pytest_ftrace.hooks", "pytest_ftrace.options"} <= set(loaded)
            through_hook = [
                name for name in loaded
                if isinstance(sys.modules[name].__loader__, AssertionRewritingHook)
            ]
            assert through_hook == []

        def test_rewritten():
            value = 1
            assert value + 1 == 3
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["E       assert (1 + 1) == 3"])


_LOADED_PROBE = """
import json, os, sys

def test_probe():
    names = sorted(n for n in sys.modules if n.startswith("pytest_ftrace."))
    with open(os.environ["FTRACE_PROBE_OUT"], "w") as f:
        json.dump(names, f)
"""


def _loaded_modules(pytester: pytest.Pytester, *args: str) -> set[str]:
    import json

    out = pytester.path / "loaded.json"
    pytester.makepyfile(test_probe=_LOADED_PROBE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTRACE_PROBE_OUT", str(out))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)
    assert result.ret == 0, result.stdout.str()
    return set(json.loads(out.read_text()))


@pytest.mark.parametrize(
    "args, needed",
    [
        ((), set()),
        (("--ftrace", "--ftrace-seed", "5"), {"pytest_ftrace.ftrace"}),
        (("--threadpool", "2"), {"pytest_ftrace.threadpool"}),
        (("--ftrace-isolate",), {"pytest_ftrace.isolate"}),
        (("--ftrace-isolate=off",), {"pytest_ftrace.isolate"}),
        (("--forked",), {"pytest_ftrace.isolate"}),
    ],
)
def test_feature_modules_load_only_in_the_runs_that_use_them(pytester, args, needed):
    """Every pytest run imports the plugin: --ftrace, --threadpool and --ftrace-isolate have
    their options registered without importing their modules (start-up time, issue 3)."""
    features = {"pytest_ftrace.ftrace", "pytest_ftrace.threadpool", "pytest_ftrace.isolate"}
    loaded = _loaded_modules(pytester, *args)
    assert {"pytest_ftrace.hooks", "pytest_ftrace.options"} <= loaded
    assert loaded & features == needed
