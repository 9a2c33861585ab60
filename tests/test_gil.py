"""On a free-threaded build, a module that turns the GIL back on is named, against its test."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import only_free_threaded

C_SOURCE = r"""
#include <Python.h>
/* No Py_mod_gil slot: importing this on a free-threaded build re-enables the GIL. */
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "gilly", NULL, 0, NULL};
PyMODINIT_FUNC PyInit_gilly(void) { return PyModuleDef_Init(&def); }
"""


def build_gil_extension(directory: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the GIL-enabling extension")
    src = directory / "gilly.c"
    src.write_text(C_SOURCE)
    target = directory / ("gilly" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [cc, "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(target)], check=True
    )


@only_free_threaded
def test_gil_reenabled_by_a_test_is_reported(pytester):
    build_gil_extension(pytester.path)
    pytester.makepyfile(
        """
        import sys
        def test_before():
            assert not sys._is_gil_enabled()
        def test_imports_it():
            import gilly
        def test_after():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            "*ftrace: GIL re-enabled*",
            "*test_imports_it: the GIL was re-enabled during *test_imports_it; "
            "modules imported then: 'gilly'*",
        ]
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "ignore", "--require-gil-disabled"
    )
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED *test_imports_it*"])


@only_free_threaded
def test_gil_reenabled_at_collection_is_a_collection_error(pytester):
    build_gil_extension(pytester.path)
    pytester.makepyfile(
        test_imports="""
        import gilly
        def test_ok():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "ignore", "--require-gil-disabled"
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting test_imports.py*", "*'gilly'*"])


def test_no_gil_report_on_a_plain_session(pytester):
    pytester.makepyfile("import json\ndef test_ok(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "GIL re-enabled" not in result.stdout.str()
    assert sys.version_info >= (3, 12)
