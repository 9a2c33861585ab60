"""Explained failures and race reports (`--ftrace-races`): the conflicts the native core's
happens-before tracking found in a round (rust/hb.rs), classified and shown with the location,
both threads, file:line of each access and its source line.

Classes, most telling first:
- lost update: a thread read a location, another thread wrote it, then the first one wrote it
  from what it had read (both read before either wrote);
- check-then-act: as a lost update, but what the first thread read only decided whether to
  write (`if key not in d: d[key] = ...`, `if self.x is None: self.x = ...`);
- torn read: a thread saw one of two writes another thread made to one object, not the other;
- use after delete: an access after another thread deleted the location;
- data race: a write and another thread's read or write that nothing orders.

PYTEST_DONT_REWRITE: plugin code, imported as is.
"""

from __future__ import annotations

import linecache
import os
import textwrap

from pytest_ftrace import _native

MODES = ("off", "report", "fail")
DEFAULT = "report"
SHOWN = 4  # conflicts explained per round; the rest are counted
_WIDTH = 88

_ORDER = {
    "lost update": 0,
    "check-then-act": 1,
    "torn read": 2,
    "use after delete": 3,
    "data race": 4,
}
_WHAT = {
    "lost update": "both threads read it before either wrote it, so one update overwrote the other",
    "check-then-act": "a thread checked it, another thread changed it, and the first one "
    "acted on its stale check",
    "torn read": "a thread saw one of two related writes of another thread, not the other",
    "use after delete": "a thread used it after another thread deleted it",
    "data race": "a write and another thread's access that no lock, queue, or thread "
    "start/join orders",
}
_VERB = {"read": "read", "write": "wrote", "delete": "deleted"}


class DataRaceError(AssertionError):
    """A conflict in a test that passed, under --ftrace-races=fail."""


def enabled(config) -> bool:
    return getattr(config.option, "ftrace_races", DEFAULT) != "off"


def start() -> None:
    """Track accesses in exact mode from now on."""
    _native.races_enable(True)


def round_conflicts(run_id: int) -> dict[int, list[dict]]:
    """{round: conflicts} of a finished run (the current round is closed first)."""
    _native.races_finish()
    return {i: _native.races_conflicts(run_id, i) for i in _native.races_rounds(run_id)}


def forget(run_id: int) -> None:
    _native.races_finish()
    _native.races_forget(run_id)


def classify(conflict: dict, others: list[dict]) -> str:
    read = conflict.get("read")
    first, second = conflict["first"], conflict["second"]
    if read is not None:
        return "check-then-act" if read[5] else "lost update"
    if first[4] == "delete" and second[4] != "delete":
        return "use after delete"
    if conflict["kind"] == "attribute" and _torn(conflict, others):
        return "torn read"
    return "data race"


def _torn(conflict: dict, others: list[dict]) -> bool:
    """A write then another thread's read on one attribute, and a read before another
    thread's write on another attribute of the same kind of object."""
    first, second = conflict["first"], conflict["second"]
    reader_saw = first[4] == "write" and second[4] == "read"
    reader_missed = first[4] == "read" and second[4] == "write"
    if not (reader_saw or reader_missed):
        return False
    for other in others:
        if other is conflict or other["kind"] != "attribute":
            continue
        if other["owner"] != conflict["owner"] or other["key"] == conflict["key"]:
            continue
        a, b = other["first"], other["second"]
        # (conflicts are kept once per pair of lines: the threads may differ between the two)
        if reader_saw and (a[4], b[4]) == ("read", "write"):
            return True
        if reader_missed and (a[4], b[4]) == ("write", "read"):
            return True
    return False


def location(conflict: dict) -> str:
    """`Counter.value`, `cache['k']`, `module.NAME`, `items (the whole list)`."""
    kind, owner, key = conflict["kind"], conflict["owner"], conflict["key"]
    if kind in ("attribute", "global"):
        return f"{owner}.{key}"
    if kind == "cell":
        return f"{key} (a closure variable)"
    from pytest_ftrace.ftrace.accesses import owner_text

    _tid, _seq, code, offset, *_rest = conflict["second"]
    text = owner_text(code, offset) if code is not None else None
    text = text or owner
    if kind == "container":
        return f"{text} (the whole {owner})"
    return f"{text}[{key}]"


def _line(code, offset: int) -> int | None:
    found = None
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
        if start <= offset:
            found = line
    return found


def site(access) -> tuple[str, str]:
    """('file.py:12', 'the source line') of an access."""
    _tid, _seq, code, offset, *_rest = access
    if code is None:
        return "?", ""
    line = _line(code, offset)
    path = code.co_filename
    try:
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            path = rel
    except ValueError:
        pass
    source = linecache.getline(code.co_filename, line).strip() if line else ""
    return f"{path}:{line}", source


def _access_line(access, tail: str = "") -> str:
    where, source = site(access)
    verb = _VERB.get(access[4], access[4])
    text = f"      thread {access[0]} {verb:<7} {where}"
    if source:
        text += f"   {source}"
    return text + tail


def ranked(conflicts: list[dict]) -> list[tuple[str, dict]]:
    """(class, conflict), most telling first, one per location (its most telling one)."""
    best: dict[int, tuple[str, dict]] = {}
    for c in conflicts:
        kind = classify(c, conflicts)
        had = best.get(c["location"])
        if had is None or _ORDER[kind] < _ORDER[had[0]]:
            best[c["location"]] = (kind, c)
    return sorted(best.values(), key=lambda kc: (_ORDER[kc[0]], kc[1]["second"][1]))


def explain(conflicts: list[dict], iteration: int, shown: int = SHOWN) -> str:
    """The conflicts of round `iteration`, explained."""
    found = ranked(conflicts)
    lines = textwrap.wrap(
        f"conflicts in round {iteration} (accesses of two threads to one location, at least "
        "one a write, that no lock, queue, thread start/join or atomic container operation "
        "orders):",
        _WIDTH,
    )
    for index, (kind, c) in enumerate(found[:shown], 1):
        lines.extend(
            textwrap.wrap(
                f"[{index}] {kind} on {location(c)}: {_WHAT[kind]}",
                _WIDTH,
                initial_indent="  ",
                subsequent_indent="      ",
            )
        )
        read = c.get("read")
        if read is not None:
            lines.append(_access_line(read))
            lines.append(_access_line(c["first"]))
            lines.append(
                _access_line(
                    c["second"], f"   <- from what it read before thread {c['first'][0]}'s write"
                )
            )
        else:
            lines.append(_access_line(c["first"]))
            lines.append(_access_line(c["second"]))
    if len(found) > shown:
        lines.append(f"  ({len(found) - shown} more conflicts in this round not shown)")
    return "\n".join(lines)


def marked_steps(conflicts: list[dict]) -> set[tuple[int, int, int]]:
    """(thread, id(code), offset) of every conflicting access, for the lanes."""
    out = set()
    for c in conflicts:
        for access in (c["first"], c["second"], c.get("read")):
            if access is not None and access[2] is not None:
                out.add((access[0], id(access[2]), access[3]))
    return out


def count(per_round: dict[int, list[dict]]) -> int:
    """Distinct conflicts (by class and location) over the rounds."""
    seen = set()
    for conflicts in per_round.values():
        for kind, c in ranked(conflicts):
            seen.add((kind, location(c)))
    return len(seen)


def summary(tr, reports: list[tuple[str, int, str]]) -> None:
    """The 'data races' section: conflicts seen in tests that passed."""
    total = sum(n for _nodeid, n, _text in reports)
    tests = len(reports)
    tr.section(
        f"data races: {total} in {tests} test{'s' if tests != 1 else ''}", sep="-", yellow=True
    )
    for nodeid, _n, text in reports:
        tr.line(f"{nodeid} passed, but:")
        for line in text.splitlines():
            tr.line(line)


def passing_test(test, run_id: int, outcome, forked=None) -> dict[int, list[dict]]:
    """At the end of an exact-mode test: its conflicts by round (with those of `forked`
    rounds, sent back by their processes). When it passed, they go to the 'data races'
    section (report) or fail it (fail), explained."""
    from pytest_ftrace.report import Failure

    per_round = round_conflicts(run_id)
    forget(run_id)
    per_round.update(forked or {})
    if outcome.failures or not per_round:
        return per_round
    # A lone unordered read or write of one location is atomic in CPython (free-threaded
    # builds too): a passing test is reported for what it can break, not for that.
    harmful = {
        i: [c for kind, c in ranked(conflicts) if kind != "data race"]
        for i, conflicts in per_round.items()
    }
    harmful = {i: found for i, found in harmful.items() if found}
    if not harmful:
        return per_round
    iteration = min(harmful)
    n = count(harmful)
    rounds = len(harmful)
    text = explain(harmful[iteration], iteration)
    if rounds > 1:
        text += f"\n  (conflicts in {rounds} of the test's rounds; the first is shown)"
    if test.session.races == "fail":
        # one failure per racy round (a replay counts the rounds that race again)
        for i in sorted(harmful):
            shown = text if i == iteration else explain(harmful[i], i)
            error = DataRaceError(
                f"{n} data race{'s' if n != 1 else ''} (--ftrace-races=fail), although every "
                f"assertion held:\n{shown}"
            )
            thread = ranked(harmful[i])[0][1]["second"][0]
            outcome.failures.append(Failure(thread, i, error))
    else:
        test.session.race_reports.append((test.item.nodeid, n, text))
    return per_round


def failing_round(outcome, first, per_round: dict[int, list[dict]]) -> None:
    """The conflicts that led to a failure of round `first.iteration`, as the first note of the
    exact-mode report."""
    if isinstance(first.exc, DataRaceError):
        return  # the failure is the explanation
    conflicts = per_round.get(first.iteration)
    if conflicts:
        outcome.notes.append(explain(conflicts, first.iteration))
        return
    earlier = [i for i in per_round if i < first.iteration]
    if earlier:
        i = max(earlier)
        outcome.notes.append(
            f"no conflict in round {first.iteration} itself; the last round before it with "
            f"conflicts:\n{explain(per_round[i], i)}"
        )
        return
    # none seen: nothing is said (a failure that is not an interleaving's)
