#!/usr/bin/env python3
"""Install pytest-ftrace into a fresh venv and show it at work on examples/.

Uses the newest supported interpreter it finds (3.13t, 3.13, then 3.12; or --python), makes
.venvs/demo-<name>, installs the package (building the extension), and runs pytest on examples/
twice: plainly, then with the plugin's options. Extra arguments go to the second pytest run.
"""

from __future__ import annotations

import argparse
import sys

from test_all import NAMES, ROOT, find_interpreter, run

DEMO_ARGS = ["examples/", "-v", "-p", "no:cacheprovider"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", choices=NAMES, help="interpreter to use")
    ap.add_argument("pytest_args", nargs="*", help="extra arguments for the plugin run")
    args = ap.parse_args()
    for name in [args.python] if args.python else reversed(NAMES):
        python = find_interpreter(name)
        if python:
            break
    else:
        print("demo: no CPython 3.12+ found (see README: bringing a Python)")
        return 2
    venv = ROOT / ".venvs" / f"demo-{name}"
    bin_python = venv / "bin" / "python"
    if not bin_python.exists() and run([python, "-m", "venv", str(venv)]) != 0:
        return 2
    if run([str(bin_python), "-m", "pip", "install", "-q", "."]) != 0:
        return 2
    print(f"\n### examples/ with plain pytest ({name}): all pass on one thread", flush=True)
    run([str(bin_python), "-m", "pytest", *DEMO_ARGS, "-p", "no:ftrace"])
    print(f"\n### examples/ with pytest-ftrace ({name})", flush=True)
    return run([str(bin_python), "-m", "pytest", *DEMO_ARGS, *args.pytest_args])


if __name__ == "__main__":
    sys.exit(main())
