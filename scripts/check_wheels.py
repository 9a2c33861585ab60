#!/usr/bin/env python3
"""Check the wheels as a user without Rust gets them.

For each wheel in dist/ (or those named): a fresh venv of the interpreter the wheel is for
(cp312, cp313, cp313t), with a PATH that holds no `cargo`; the wheel installed into it; then the
examples, in a directory outside any source tree and from inside a fresh clone of this
repository (`python -m pytest`, which puts the clone's own pytest_ftrace/, with no built
extension, first on sys.path): under --ftrace the racy id generator must fail and its locked
twin pass. Last, `pip install <clone>` with no cargo on PATH must stop at once with the line
saying that a Rust toolchain is needed, without fetching one (that step needs maturin from
PyPI; --no-source skips it).

usage: python3 scripts/check_wheels.py [--no-source] [WHEEL ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from test_all import ROOT, find_interpreter

TAGS = {"cp312": "3.12", "cp313": "3.13", "cp313t": "3.13t"}
NO_RUST_LINE = "pytest-ftrace: building from source needs a Rust toolchain"


def no_cargo_path(venv_bin: Path) -> str:
    """The venv's bin and the system directories that hold no cargo."""
    dirs = [str(venv_bin)]
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        if Path(d).is_dir() and not (Path(d) / "cargo").exists():
            dirs.append(d)
    return os.pathsep.join(dirs)


def step(label: str, cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    print(f"+ ({label}) {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def examples(python: str, cwd: Path, env: dict, where: str) -> list[str]:
    """Run the two example tests; the problems found (none: as it should be)."""
    problems = []
    for test, want in (("test_racy_ids_are_unique", 1), ("test_locked_ids_are_unique", 0)):
        cmd = [python, "-m", "pytest", f"examples/test_ids.py::{test}", "--ftrace", "-q"]
        out = step(where, [*cmd, "-p", "no:cacheprovider"], cwd, env)
        text = out.stdout + out.stderr
        if out.returncode != want or "INTERNALERROR" in text:
            problems.append(f"{where}: {test}: pytest exit {out.returncode}, wanted {want}")
            print(text[-3000:], flush=True)
        elif want == 1 and "replay: pytest " not in text:
            problems.append(f"{where}: {test}: failed without a replay line")
    return problems


def check_wheel(wheel: Path, work: Path, clone: Path) -> list[str]:
    parts = wheel.name.split("-")  # name, version, python tag, ABI tag (cp313t), platform
    name = TAGS.get(parts[3]) if len(parts) == 5 else None
    if name is None:
        return [f"{wheel.name}: not a wheel for CPython 3.12, 3.13 or 3.13t"]
    python = find_interpreter(name)
    if python is None:
        return [f"{wheel.name}: no python{name} found to install it into"]
    venv = work / f"venv-{name}"
    if subprocess.run([python, "-m", "venv", str(venv)]).returncode != 0:
        return [f"{wheel.name}: cannot make a venv"]
    bin_dir = venv / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUST"))}
    env["PATH"] = no_cargo_path(bin_dir)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PYTHONPATH", None)
    if shutil.which("cargo", path=env["PATH"]):
        return [f"{wheel.name}: cargo is still on PATH ({env['PATH']})"]
    py = str(bin_dir / "python")
    out = step(name, [py, "-m", "pip", "install", "-q", str(wheel)], work, env)
    if out.returncode != 0:
        print(out.stdout + out.stderr, flush=True)
        return [f"{wheel.name}: pip install failed"]
    outside = work / f"outside-{name}"
    shutil.copytree(ROOT / "examples", outside / "examples")
    problems = examples(py, outside, env, f"{name} outside the clone")
    problems += examples(py, clone, env, f"{name} inside a fresh clone")
    return problems


def check_source_without_rust(clone: Path, work: Path) -> list[str]:
    """pip install <clone> without cargo: the one line, no toolchain download."""
    python = find_interpreter("3.12") or sys.executable
    venv = work / "venv-source"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CARGO", "RUST"))}
    env["PATH"] = no_cargo_path(venv / "bin")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = step(
        "source", [str(venv / "bin" / "python"), "-m", "pip", "install", str(clone)], work, env
    )
    text = out.stdout + out.stderr
    problems = []
    if out.returncode == 0:
        problems.append("pip install <clone> without cargo succeeded (a toolchain was fetched?)")
    if NO_RUST_LINE not in text:
        problems.append("pip install <clone> without cargo did not say that Rust is needed")
    if "puccinialin" in text or "Rust not found, installing" in text:
        problems.append("pip install <clone> without cargo tried to fetch a Rust toolchain")
    if problems:
        print(text[-3000:], flush=True)
    else:
        print(next(line for line in text.splitlines() if NO_RUST_LINE in line).strip())
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-source", action="store_true", help="skip the pip install <clone> check")
    ap.add_argument("wheels", nargs="*", help="wheels to check (default: dist/*.whl)")
    args = ap.parse_args()
    wheels = [Path(w).resolve() for w in args.wheels] or sorted((ROOT / "dist").glob("*.whl"))
    if not wheels:
        print("check_wheels: no wheels (run scripts/build_wheels.py first)")
        return 1
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ftrace-wheels-") as tmp:
        work = Path(tmp)
        clone = work / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        for wheel in wheels:
            found = check_wheel(wheel, work, clone)
            print(f"check_wheels: {wheel.name}: {'ok' if not found else 'FAILED'}", flush=True)
            problems += found
        if not args.no_source:
            found = check_source_without_rust(clone, work)
            print(f"check_wheels: source without Rust: {'ok' if not found else 'FAILED'}")
            problems += found
    for problem in problems:
        print(f"check_wheels: {problem}")
    print("check_wheels: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
