"""Building from source without Rust: the build backend stops with one line instead of fetching
a toolchain (build_backend/pytest_ftrace_build.py). The whole `pip install <clone>` is checked
by scripts/check_wheels.py, which needs maturin from PyPI."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [
    "get_requires_for_build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "prepare_metadata_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "build_wheel",
    "build_editable",
    "build_sdist",
]


def no_cargo_env() -> dict:
    dirs = [str(Path(sys.executable).parent)]
    dirs += [d for d in ("/usr/bin", "/bin") if not Path(d, "cargo").exists()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUST", "MATURIN"))}
    env["PATH"] = os.pathsep.join(dirs)
    return env


def call_hook(hook: str, args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'build_backend')!r})\n"
        "import pytest_ftrace_build as backend\n"
        f"print(backend.{hook}({args}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_pyproject_uses_the_checking_backend_and_ships_it_in_the_sdist():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    system = config["build-system"]
    assert system["build-backend"] == "pytest_ftrace_build"
    assert system["backend-path"] == ["build_backend"]
    assert (ROOT / "build_backend" / "pytest_ftrace_build.py").is_file()
    includes = config["tool"]["maturin"]["include"]
    assert {"path": "build_backend/*.py", "format": "sdist"} in includes


@pytest.mark.parametrize("hook", HOOKS)
def test_without_cargo_every_hook_stops_with_one_line(hook, tmp_path):
    env = no_cargo_env()
    args = "" if hook.startswith("get_requires") else "'.'"  # no settings / a directory
    out = call_hook(hook, args, env, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("pytest-ftrace: building from source needs a Rust toolchain")
    assert "pip install pytest-ftrace" in lines[0]
    assert out.stdout == ""  # nothing asked for, nothing fetched


def test_the_backend_tells_maturin_not_to_fetch_rust(tmp_path):
    code = (
        f"import sys, os; sys.path.insert(0, {str(ROOT / 'build_backend')!r})\n"
        "import pytest_ftrace_build\n"
        "print(os.environ.get('MATURIN_NO_INSTALL_RUST'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=no_cargo_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "1", out.stderr


def test_with_cargo_the_requirements_are_maturins_without_a_toolchain(tmp_path):
    pytest.importorskip("maturin")
    cargo = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo")) / "bin"
    env = no_cargo_env()
    env["PATH"] = f"{cargo}{os.pathsep}{env['PATH']}"
    if not (cargo / "cargo").exists():
        pytest.skip("no cargo in CARGO_HOME")
    out = call_hook("get_requires_for_build_wheel", "", env, ROOT)
    assert out.returncode == 0, out.stderr
    assert "puccinialin" not in out.stdout
