#!/usr/bin/env python3
"""Run the whole test suite on every supported interpreter present: 3.12, 3.13 and 3.13t.

For each interpreter: a venv under .venvs/<name>, the extension built into it (maturin, with a
CARGO_TARGET_DIR of its own so pyo3 is not rebuilt on every switch), then pytest. Also runs
`cargo test` for the pure-Rust logic, and the linters (ruff, cargo fmt, cargo clippy).

An interpreter that is not found is reported as SKIPPED; with CI=true (or --strict) that is a
failure. pytest's exit code 5 (no tests collected) is a failure.

With --wheels (as CI runs it) it also builds the wheels and checks each one in a fresh venv
without Rust (scripts/build_wheels.py and scripts/check_wheels.py).

usage: python3 scripts/test_all.py [--python 3.12 ...] [--no-lint] [--strict] [--wheels]
                                   [-- PYTEST-ARGS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["3.12", "3.13", "3.13t"]


def find_interpreter(name: str) -> str | None:
    """Path of a python for `name` ('3.13t' means free-threaded), or None."""
    env = os.environ.get("FTRACE_PYTHON_" + name.replace(".", "").upper())
    candidates = [env] if env else []
    exe = "python" + name
    candidates.append(shutil.which(exe))
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    if pyenv_root.is_dir():
        for version in sorted(pyenv_root.glob("versions/*"), reverse=True):
            candidates.append(str(version / "bin" / exe))
    if name.endswith("t"):
        ft = ROOT.parent / "shared" / "tools" / "ft-python"
        built = ft.exists() and subprocess.run([str(ft), "--check"], capture_output=True)
        if built and built.returncode == 0:
            candidates.append(
                subprocess.run([str(ft)], capture_output=True, text=True).stdout.strip()
            )
        candidates.append(f"/opt/cpython-{name}/bin/{exe}")
    for cand in candidates:
        if cand and Path(cand).exists() and _matches(cand, name):
            return cand
    return None


def _matches(python: str, name: str) -> bool:
    probe = (
        "import sys, sysconfig;"
        "ft = bool(sysconfig.get_config_var('Py_GIL_DISABLED'));"
        "print('%d.%d%s' % (sys.version_info[0], sys.version_info[1], 't' if ft else ''))"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == name


def run(cmd: list[str], **kw) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw).returncode


def prepare(name: str, python: str) -> tuple[Path, dict]:
    venv = ROOT / ".venvs" / name
    bin_python = venv / "bin" / "python"
    if not bin_python.exists():
        if run([python, "-m", "venv", str(venv)]) != 0:
            raise RuntimeError(f"cannot create a venv for {name}")
        run([str(bin_python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / f"py{name}"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    rc = run([str(bin_python), "-m", "pip", "install", "-q", "-e", ".[test]"], env=env)
    if rc != 0:
        raise RuntimeError(f"building the extension for {name} failed")
    return bin_python, env


def wheels(names: list[str]) -> str:
    """Build the wheels into dist/test_all/ and check them; the step's status."""
    out = ROOT / "dist" / "test_all"
    if out.exists():
        shutil.rmtree(out)
    chosen = [f"--python={name}" for name in names]
    rc = run([sys.executable, "scripts/build_wheels.py", *chosen, "--out", str(out)])
    if rc != 0:
        return "FAILED: building the wheels"
    built = sorted(str(wheel) for wheel in out.glob("*.whl"))
    rc = run([sys.executable, "scripts/check_wheels.py", *built])
    return "passed" if rc == 0 else "FAILED: checking the wheels"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append", choices=NAMES, help="only these interpreters")
    ap.add_argument("--no-lint", action="store_true", help="skip ruff, cargo fmt and clippy")
    ap.add_argument("--no-cargo", action="store_true", help="skip cargo test")
    ap.add_argument("--strict", action="store_true", help="a missing interpreter is a failure")
    ap.add_argument(
        "--wheels",
        action="store_true",
        help="also build the manylinux wheels and check each in a fresh venv without cargo "
        "(scripts/build_wheels.py, scripts/check_wheels.py; about 3 minutes, fetches maturin, "
        "ziglang and auditwheel from PyPI once; checks the committed tree)",
    )
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = ap.parse_args()
    strict = args.strict or os.environ.get("CI", "").lower() in ("1", "true", "yes")
    results: list[tuple[str, str, float]] = []

    for name in args.python or NAMES:
        start = time.monotonic()
        python = find_interpreter(name)
        if python is None:
            print(f"\n=== {name}: SKIPPED (no python{name} found)", flush=True)
            results.append((name, "SKIPPED: interpreter not found", 0.0))
            continue
        print(f"\n=== {name}: {python}", flush=True)
        try:
            bin_python, env = prepare(name, python)
        except RuntimeError as exc:
            results.append((name, f"FAILED: {exc}", time.monotonic() - start))
            continue
        rc = run(
            [str(bin_python), "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args], env=env
        )
        status = {0: "passed", 5: "FAILED: no tests collected"}.get(rc, f"FAILED: pytest exit {rc}")
        results.append((f"pytest {name}", status, time.monotonic() - start))

    if args.wheels:
        start = time.monotonic()
        results.append(("wheels", wheels(args.python or NAMES), time.monotonic() - start))

    if not args.no_cargo:
        start = time.monotonic()
        env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "cargo-test"))
        rc = run(["cargo", "test", "--quiet"], env=env)
        results.append(("cargo test", "passed" if rc == 0 else "FAILED", time.monotonic() - start))

    if not args.no_lint:
        venv_bins = sorted((ROOT / ".venvs").glob("*/bin/ruff"))
        ruff = str(venv_bins[0]) if venv_bins else shutil.which("ruff")
        lints = [
            ("ruff", [ruff, "check", "."] if ruff else None),
            ("cargo fmt", ["cargo", "fmt", "--check"]),
            (
                "cargo clippy",
                ["cargo", "clippy", "--quiet", "--all-targets", "--", "-D", "warnings"],
            ),
        ]
        for label, cmd in lints:
            if cmd is None:
                results.append((label, "FAILED: not installed", 0.0))
                continue
            env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / "cargo-test"))
            rc = run(cmd, env=env)
            results.append((label, "passed" if rc == 0 else "FAILED", 0.0))

    print("\nsummary")
    failed = False
    for label, status, secs in results:
        print(f"  {label:<14} {status:<40} {secs:7.1f}s")
        failed |= status.startswith("FAILED") or (strict and status.startswith("SKIPPED"))
    print("result: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
