"""Loaded by bench_real_suites.py into every suite run (`-p bench_real_reporter`): writes each
failed report to $BENCH_REAL_REPORTS (one JSON object a line) as it happens, so a run stopped
by the bench's timeout, which writes no junitxml, still says why its tests failed."""

import json
import os

_PATH = os.environ.get("BENCH_REAL_REPORTS")


def pytest_runtest_logreport(report):
    if _PATH and report.failed:
        line = {"nodeid": report.nodeid, "when": report.when, "text": report.longreprtext}
        with open(_PATH, "a") as out:
            out.write(json.dumps(line) + "\n")
