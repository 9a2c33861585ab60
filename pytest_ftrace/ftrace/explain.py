"""Explained failures and race reports (`--ftrace-races`): the conflicts the native core's
happens-before tracking found in a round (rust/hb.rs), classified and shown with the location,
both threads, file:line of each access and its source line.

Classes, most telling first:
- lost update: a thread read a location, another thread wrote it, then the first one wrote it
  from what it had read (both read before either wrote);
- check-then-act: as a lost update, but what the first thread read only decided whether to
  write (`if key not in d: d[key] = ...`, `if self.x is None: self.x = ...`);
- mutated during iteration: a thread's loop over a container went on after another thread
  inserted or removed an item since the loop's previous step;
- generator resumed by two threads: `next(g)` / `g.send(v)` of one generator in two threads
  that nothing orders (one of them meets "generator already executing");
- torn read: a thread saw one of two writes another thread made to one object, not the other
  (or halves of two threads' writes);
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
    "mutated during iteration": 2,
    "generator resumed by two threads": 3,
    "torn read": 4,
    "use after delete": 5,
    "data race": 6,
}
RESUME_KEY = "<resume>"  # rust/hb.rs: the key of a generator's resumptions
_WHAT = {
    "lost update": "both threads read it before either wrote it, so one update overwrote the other",
    "check-then-act": "a thread checked it, another thread changed it, and the first one "
    "acted on its stale check",
    "mutated during iteration": "a thread's loop over it went on after another thread "
    "inserted or removed an item (dict, set and deque loops raise, list loops skip or repeat "
    "items)",
    "generator resumed by two threads": "two threads resumed it with nothing ordering them "
    "(one of them meets 'generator already executing', or their steps interleave)",
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


def _iteration(access) -> bool:
    return access is not None and len(access) > 7 and bool(access[7])


def classify(conflict: dict, others: list[dict]) -> str:
    read = conflict.get("read")
    first, second = conflict["first"], conflict["second"]
    if read is not None and _iteration(read) and _iteration(second):
        return "mutated during iteration"
    if read is not None:
        checked = read[5] or (read[2] is not second[2] and _checked_by_caller(read))
        return "check-then-act" if checked else "lost update"
    if conflict["kind"] == "attribute" and conflict["key"] == RESUME_KEY:
        return "generator resumed by two threads"
    if first[4] == "delete" and second[4] != "delete":
        return "use after delete"
    if conflict["kind"] == "attribute" and _torn(conflict, others):
        return "torn read"
    return "data race"


def _checked_by_caller(read) -> bool:
    """Whether the read was made in a helper whose caller only tested its result
    (`if env.get(k) is None:`): the call it was made under is followed by a branch."""
    if len(read) < 10 or read[8] is None:
        return False
    from pytest_ftrace.ftrace.accesses import is_checked_call

    return is_checked_call(read[8], read[9])


def _torn(conflict: dict, others: list[dict]) -> bool:
    return torn_partner(conflict, others) is not None


def torn_partner(conflict: dict, others: list[dict]) -> dict | None:
    """The conflict on another attribute of the same kind of object that makes `conflict` a
    torn read: a write then another thread's read on one attribute, and a read before another
    thread's write on the other (the reader saw one write, not the other); or the reader saw
    the writes of two different threads on the two attributes (halves of two updates)."""
    first, second = conflict["first"], conflict["second"]
    reader_saw = first[4] == "write" and second[4] == "read"
    reader_missed = first[4] == "read" and second[4] == "write"
    if not (reader_saw or reader_missed):
        return None
    mixed = None
    for other in others:
        if other is conflict or other["kind"] != "attribute":
            continue
        if other["owner"] != conflict["owner"] or other["key"] == conflict["key"]:
            continue
        if RESUME_KEY in (other["key"], conflict["key"]):
            continue
        a, b = other["first"], other["second"]
        # (conflicts are kept once per pair of lines: the threads may differ between the two)
        if reader_saw and (a[4], b[4]) == ("read", "write"):
            return other
        if reader_missed and (a[4], b[4]) == ("write", "read"):
            return other
        if (
            reader_saw
            and (a[4], b[4]) == ("write", "read")
            and b[0] == second[0]
            and a[0] != first[0]
            and b[2] is second[2]
            and mixed is None
        ):
            mixed = other  # one reader, the two attributes written last by two threads
    return mixed


def location(conflict: dict) -> str:
    """`Counter.value`, `cache['k']`, `module.NAME`, `items (the whole list)`."""
    kind, owner, key = conflict["kind"], conflict["owner"], conflict["key"]
    if kind == "attribute" and key == RESUME_KEY:
        text = _owner_text(conflict["second"], extra=True) or _owner_text(conflict["second"])
        return f"{text or 'a'} ({owner})"
    if kind in ("attribute", "global"):
        return f"{owner}.{key}"
    if kind == "cell":
        return f"{key} (a closure variable)"
    second = conflict["second"]
    text = _owner_text(second, extra=True) or _owner_text(second) or owner
    if kind == "container":
        return f"{text} (the whole {owner})"
    return f"{text}[{key}]"


def _owner_text(access, extra: bool = False) -> str | None:
    """The expression an access reaches its object by; `extra`: the object of the builtin
    called there (`len(items)`, `next(gen)`)."""
    from pytest_ftrace.ftrace.accesses import EXTRA, owner_text

    _tid, _seq, code, offset, *_rest = access
    if code is None:
        return None
    return owner_text(code, offset | EXTRA if extra else offset)


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


def _access_line(access, tail: str = "", verb: str | None = None) -> str:
    where, source = site(access)
    verb = verb or _VERB.get(access[4], access[4])
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
    found = sorted(best.values(), key=lambda kc: (_ORDER[kc[0]], kc[1]["second"][1]))
    # a torn read is shown once, by the first of its two attributes
    partners = set()
    out = []
    for kind, c in found:
        if kind == "torn read":
            if c["location"] in partners:
                continue
            partner = torn_partner(c, conflicts)
            if partner is not None:
                partners.add(partner["location"])
        out.append((kind, c))
    return out


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
        partner = torn_partner(c, conflicts) if kind == "torn read" else None
        where = location(c)
        if partner is not None:
            where += f" and .{partner['key']}"
        lines.extend(
            textwrap.wrap(
                f"[{index}] {kind} on {where}: {_WHAT[kind]}",
                _WIDTH,
                initial_indent="  ",
                subsequent_indent="      ",
            )
        )
        read = c.get("read")
        if kind == "generator resumed by two threads":
            lines.append(_access_line(c["first"], verb="resumed"))
            lines.append(_access_line(c["second"], verb="resumed"))
        elif kind == "mutated during iteration":
            lines.append(_access_line(read, "   (a loop step)"))
            lines.append(_access_line(c["first"]))
            went_on = f"   <- the same loop went on after thread {c['first'][0]}'s change"
            lines.append(_access_line(c["second"], went_on))
        elif partner is not None:
            # the writes and reads of the two attributes, in the order they happened
            accesses = {(a[0], a[1]): a for a in (c["first"], c["second"], *_pair(partner))}
            for access in sorted(accesses.values(), key=lambda a: a[1]):
                lines.append(_access_line(access, f"   ({_attr(c, partner, access)})"))
        elif read is not None:
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


def _pair(conflict: dict) -> tuple:
    return conflict["first"], conflict["second"]


def _attr(c: dict, partner: dict, access) -> str:
    """The attribute an access of a torn read touches."""
    which = c if any(access is a for a in _pair(c)) else partner
    return f".{which['key']}"


def marked_steps(conflicts: list[dict]) -> set[tuple[int, int, int]]:
    """(thread, id(code), offset) of every conflicting access, for the lanes."""
    out = set()
    for c in conflicts:
        for access in (c["first"], c["second"], c.get("read")):
            if access is not None and access[2] is not None:
                out.add((access[0], id(access[2]), access[3]))
    return out


def marked_at(conflicts: list[dict], steps: list, cut: int | None = None) -> set[int]:
    """The indices in `steps` ((thread, code, offset) of a round's points) of the conflicting
    accesses of the conflicts explained, for the lanes: for each, the last step of its second
    access's thread at that instruction before the cut, then the first access's (and the
    stale read's) last step before that."""
    steps = steps[:cut] if cut is not None else steps
    out: set[int] = set()

    def last(access, before: int) -> int | None:
        if access is None or access[2] is None:
            return None
        near = None  # an access made by no point (a truth test) is marked at the next one
        for i in range(min(before, len(steps)) - 1, -1, -1):
            tid, code, offset = steps[i]
            if tid == access[0] and code is access[2]:
                if offset == access[3]:
                    return i
                if near is None and access[3] < offset <= access[3] + 48:
                    near = i
        return near

    for _kind, c in ranked(conflicts)[:SHOWN]:
        at = last(c["second"], len(steps))
        if at is None:
            continue
        out.add(at)
        first = last(c["first"], at)
        if first is not None:
            out.add(first)
            read = last(c.get("read"), first)
            if read is not None:
                out.add(read)
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
