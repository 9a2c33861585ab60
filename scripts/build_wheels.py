#!/usr/bin/env python3
"""Build the wheels users install: manylinux x86_64 for CPython 3.12, 3.13 and 3.13t.

Uses maturin (`maturin build --release --compatibility manylinux2014 --zig`): zig links against
an old glibc, so the wheels are manylinux2014 (glibc 2.17) without a docker image. maturin,
ziglang and auditwheel come from PyPI into a venv of their own (.venvs/wheel-tools). Each wheel
is checked with `auditwheel show` (its platform tag must be manylinux). Needs a Rust toolchain.

aarch64 and macOS wheels need a Rust target of their own (`rustup target add
aarch64-unknown-linux-gnu`, or a Mac); pass `--target aarch64-unknown-linux-gnu` where that
target is installed.

usage: python3 scripts/build_wheels.py [--python 3.12 ...] [--out dist] [--target TRIPLE]
Then scripts/check_wheels.py installs each wheel into a fresh venv without Rust and runs the
examples.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

from test_all import NAMES, ROOT, find_interpreter, run

TOOLS = ROOT / ".venvs" / "wheel-tools"
TOOL_PACKAGES = ["maturin>=1.8,<2", "ziglang", "auditwheel"]


def tools() -> Path:
    """The venv with maturin, zig and auditwheel (made once)."""
    bin_dir = TOOLS / "bin"
    if not (bin_dir / "maturin").exists() or not (bin_dir / "auditwheel").exists():
        if not (bin_dir / "python").exists():
            venv.create(TOOLS, with_pip=True)
        rc = run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *TOOL_PACKAGES])
        if rc != 0:
            raise SystemExit("build_wheels: could not install maturin, ziglang and auditwheel")
    return bin_dir


def build(name: str, python: str, out: Path, target: str | None, bin_dir: Path) -> Path | None:
    before = set(out.glob("*.whl"))
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / f"wheel-{name}"))
    # maturin finds zig as `python -m ziglang` of the interpreter running it: put ours first
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        str(bin_dir / "maturin"),
        "build",
        "--release",
        "--compatibility",
        "manylinux2014",
        "--zig",
        "--interpreter",
        python,
        "--out",
        str(out),
    ]
    if target:
        cmd += ["--target", target]
    if run(cmd, env=env) != 0:
        return None
    made = sorted(set(out.glob("*.whl")) - before, key=lambda p: p.stat().st_mtime)
    if not made:  # rebuilt with the same name: the newest one
        made = sorted(out.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    return made[-1] if made else None


def audit(wheel: Path, bin_dir: Path) -> str:
    """auditwheel's verdict: the platform tag the wheel is consistent with."""
    out = subprocess.run(
        [str(bin_dir / "auditwheel"), "show", str(wheel)], capture_output=True, text=True
    )
    text = " ".join((out.stdout + out.stderr).split())
    print(text, flush=True)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append", choices=NAMES, help="only these interpreters")
    ap.add_argument("--out", default=str(ROOT / "dist"), help="where the wheels go (dist/)")
    ap.add_argument("--target", help="a Rust target triple other than this machine's")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = tools()
    failed = False
    for name in args.python or NAMES:
        python = find_interpreter(name)
        if python is None:
            print(f"build_wheels: {name}: SKIPPED (no python{name} found)", flush=True)
            failed = True
            continue
        wheel = build(name, python, out, args.target, bin_dir)
        if wheel is None:
            print(f"build_wheels: {name}: FAILED", flush=True)
            failed = True
            continue
        verdict = audit(wheel, bin_dir)
        if "manylinux" not in verdict or "is consistent with the following platform tag" not in (
            verdict
        ):
            print(f"build_wheels: {name}: {wheel.name} is not manylinux compliant", flush=True)
            failed = True
            continue
        print(f"build_wheels: {name}: {wheel}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
