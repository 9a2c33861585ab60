#!/usr/bin/env python3
"""Install pytest-ftrace into a fresh venv and show it at work on examples/.

Uses the newest supported interpreter it finds (3.13t, 3.13, then 3.12; or --python), makes
.venvs/demo-<name>, installs the package (building the extension), and runs pytest twice: on
examples/ without the plugin (everything passes on one thread), then on examples/test_ids.py
with `--ftrace` (the racy id generator fails, with its seed, schedule and replay line; its
locked twin passes). Extra arguments go to the second run. Exits 0 when the second run fails
exactly the racy test, as it should.

pytest runs as `python -P -m pytest`: -P keeps the current directory (this source tree, whose
pytest_ftrace/ may have no built extension) off sys.path, so the runs use the package just
installed into the venv.
"""

from __future__ import annotations

import argparse
import os
import sys

from test_all import NAMES, ROOT, find_interpreter, run

DEMO_ARGS = ["examples/", "-v", "-p", "no:cacheprovider"]
RACE_ARGS = ["examples/test_ids.py", "-v", "-p", "no:cacheprovider", "--ftrace"]


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
    # The same target directory as scripts/test_all.py uses for this interpreter: a build made
    # by either is reused by the other.
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target" / f"py{name}"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if run([str(bin_python), "-m", "pip", "install", "-q", "."], env=env) != 0:
        return 2
    pytest = [str(bin_python), "-P", "-m", "pytest"]
    print(f"\n### examples/ with plain pytest ({name}): all pass on one thread", flush=True)
    run([*pytest, *DEMO_ARGS, "-p", "no:ftrace"])
    print(f"\n### examples/test_ids.py with pytest-ftrace --ftrace ({name})", flush=True)
    rc = run([*pytest, *RACE_ARGS, *args.pytest_args])
    if rc == 1:
        print("\ndemo: --ftrace made the racy id generator fail, and its locked twin passed.")
        return 0
    print(f"\ndemo: expected the racy test to fail (pytest exit 1), got exit {rc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
