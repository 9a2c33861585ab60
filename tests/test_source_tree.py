"""`python -m pytest` from a source tree whose pytest_ftrace/ has no built extension (a fresh
clone): the installed copy stands in for it, or pytest stops with one line saying what to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import pytest_ftrace
from pytest_ftrace import _native

PACKAGE = Path(pytest_ftrace.__file__).parent
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _fresh_tree(root: Path, version: str = "0.1.0") -> Path:
    """A copy of the package's Python files (no extension) with a pyproject.toml, as a clone."""
    tree = root / "clone"
    (tree / "pytest_ftrace").mkdir(parents=True)
    for source in PACKAGE.glob("*.py"):
        shutil.copy(source, tree / "pytest_ftrace" / source.name)
    (tree / "pyproject.toml").write_text(
        f'[project]\nname = "pytest-ftrace"\nversion = "{version}"\n'
    )
    (tree / "examples").mkdir()
    shutil.copy(EXAMPLES / "test_ids.py", tree / "examples" / "test_ids.py")
    return tree


def _pytest(tree: Path, *args: str, python_args: tuple[str, ...] = (), env=None):
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTEST_ADDOPTS"] = ""
    return subprocess.run(
        [sys.executable, *python_args, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=tree,
        capture_output=True,
        text=True,
        env=env,
    )


def test_the_installed_copy_stands_in_for_a_tree_without_extension(tmp_path: Path):
    tree = _fresh_tree(tmp_path, _native.__version__)
    out = _pytest(tree, "examples/test_ids.py", "--ftrace", "-q", "-rN")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "INTERNALERROR" not in out.stdout + out.stderr
    assert "1 failed, 1 passed" in out.stdout
    assert "replay:" in out.stdout
    head = _pytest(tree, "examples/test_ids.py", "--co")
    assert f"source tree {tree} has no built extension: using the installed copy at" in head.stdout


def test_an_installed_copy_of_another_version_is_not_used(tmp_path: Path):
    tree = _fresh_tree(tmp_path, "0.0.0-other")
    out = _pytest(tree, "examples/test_ids.py", "--ftrace")
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert "INTERNALERROR" not in out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, out.stderr
    assert "version 0.0.0-other" in errors[0] and "pip install" in errors[0]


def test_no_installed_copy_is_a_one_line_usage_error(tmp_path: Path):
    """Without site (-S) the installed copy is out of sight: only the library directory with
    pytest itself (and the package's entry point metadata) is on sys.path."""
    purelib = sysconfig.get_paths()["purelib"]
    if (Path(purelib) / "pytest_ftrace").is_dir():
        pytest.skip("the package is installed in site-packages itself (not editable)")
    tree = _fresh_tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=purelib)
    out = _pytest(tree, "examples/test_ids.py", python_args=("-S",), env=env)
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert "INTERNALERROR" not in out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, out.stderr
    assert "has no built extension (_native)" in errors[0]
    assert "pip install" in errors[0] and "scripts/test_all.py" in errors[0]
    code = "from pytest_ftrace import _native"
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tree, capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("ImportError: pytest-ftrace: the package")
