"""The options that shape an `--ftrace` run's schedule: what a replay line carries, what is kept
in the pytest cache with a failing round, and what a replay compares with its own.

A failing round is replayed from the seed and the token (threads, round, step estimate, key of the
decision list), but what the round does also depends on the code that is hooked
(`--ftrace-include`, `--ftrace-exclude`, the project's packages), on the mode, exact mode's
scheduler, the injection policy and a fixed iteration count (the `num_iterations` fixture; none
when the rounds run by budget, the default). The
replay line names each of them that is not at its default, whatever set it (command line, ini
file or PYTEST_ADDOPTS), so that the line alone re-runs the round. The same values are recorded
under `ftrace/options/<key>`, the key made from the test, the seed and the token: a replay that
runs with other values says which differ (its round may then not come back).

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import hashlib
import shlex

from pytest_ftrace.options import (
    DEFAULT_MODE,
    DEFAULT_ROUNDS,
    DEFAULT_SWITCH_BUDGET,
    ROUNDS_WHERE,
)

OPTIONS_KEY = "ftrace/options/"  # + key: the options of one recorded failure
FIELDS = ("mode", "scheduler", "policy", "include", "exclude", "iterations", "rounds", "project")


def scheduler_text(scheduler) -> str:
    name, param = scheduler
    return name if name == "random" else f"{name}{param}"


def run_options(session, iterations: int | None) -> dict:
    """The schedule-shaping options of an FtraceSession, as plain JSON values (and
    `--ftrace-races fail`, which makes a passing racy round a failure to see again)."""
    opts = {
        "mode": session.mode,
        "scheduler": scheduler_text(session.scheduler) if session.mode == "exact" else None,
        "policy": {str(k): v for k, v in sorted(session.policy.items())},
        "include": sorted(set(session.include)),
        "exclude": sorted(set(session.exclude)),
        "iterations": iterations,
        "rounds": (
            getattr(session, "rounds", DEFAULT_ROUNDS)
            if session.mode in ("exact", "explore")  # where the rounds start from
            else None
        ),
        "project": list(session.project_packages),
    }
    if session.mode == "exact" and getattr(session, "races", None) == "fail":
        opts["races"] = "fail"
    return opts


def command_line(opts: dict) -> list[str]:
    """The options (after `--ftrace`) that make a run's schedule-shaping options these. Values
    of the wrong type (a corrupt cache record) are left out."""
    out: list[str] = []
    mode = opts.get("mode", DEFAULT_MODE)
    if isinstance(mode, str) and mode != DEFAULT_MODE:
        out += ["--ftrace-mode", shlex.quote(mode)]
    scheduler = opts.get("scheduler")
    if isinstance(scheduler, str) and scheduler != f"mix{DEFAULT_SWITCH_BUDGET}":
        out += ["--ftrace-scheduler", shlex.quote(scheduler)]
    policy = opts.get("policy")
    for key, value in policy.items() if isinstance(policy, dict) else ():
        out += ["--ftrace-policy", shlex.quote(f"{key}={value}")]
    for field in ("include", "exclude"):
        globs = opts.get(field)
        for glob in globs if isinstance(globs, list) else ():
            if isinstance(glob, str):
                out += [f"--ftrace-{field}", shlex.quote(glob)]
    iterations = opts.get("iterations")  # None: rounds by budget (the default)
    if isinstance(iterations, int) and not isinstance(iterations, bool):
        out += ["--ftrace-iterations", str(iterations)]
    rounds = opts.get("rounds")
    default_rounds = "snapshot" if mode == "explore" else DEFAULT_ROUNDS  # fork.rounds_setting
    if rounds in ROUNDS_WHERE and rounds != default_rounds:
        out += ["--ftrace-rounds", rounds]
    if opts.get("races") == "fail":
        out += ["--ftrace-races", "fail"]
    return out


def record_key(nodeid: str, seed: int, token) -> str:
    return hashlib.sha1(f"{nodeid}|{seed}|{token}".encode()).hexdigest()[:12]


def differences(recorded, current: dict) -> list[str] | None:
    """What differs between the recorded options and this run's, one phrase each; None where
    the record is not one this plugin writes."""
    if not isinstance(recorded, dict):
        return None
    out = []
    for field in FIELDS:
        if field not in recorded:
            continue
        was, now = recorded[field], current.get(field)
        if field in ("include", "exclude", "project"):
            if not isinstance(was, list):
                return None
            same = set(map(str, was)) == set(map(str, now or ()))
        elif field in ("scheduler", "rounds") and (was is None or now is None):
            same = True  # one of them ran in chaos mode: the mode differs already
        else:
            same = was == now
        if not same:
            out.append(f"{_name(field)} {_shown(field, was)} (this run: {_shown(field, now)})")
    return out


def _name(field: str) -> str:
    if field == "project":
        return "the project's packages were"
    return f"--ftrace-{field} was"


def _shown(field: str, value) -> str:
    if field == "policy":
        items = value.items() if isinstance(value, dict) else ()
        return " ".join(f"{k}={v}" for k, v in items) or "the default"
    if isinstance(value, list):
        return ", ".join(shlex.quote(str(v)) for v in value) or "none"
    return "the default" if value is None else str(value)
