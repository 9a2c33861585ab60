"""Hostile input: every option, ini key, marker argument and cache file of the plugin gets edge
values (0, negative, huge, inf, nan, empty, wrong type), and each run must end in a usage error
that names what was wrong (exit 4) or run cleanly. Never an INTERNALERROR (exit 3), and never a
pass: the target test always fails, so a run that lost its verdict shows up as exit 0.

The options and ini keys are read from options.add_options and the markers from markers.py, so
a new one is covered without touching this module. Runs are in-process (pytester.runpytest):
none of these values gets as far as forking or leaking a thread.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from pytest_ftrace import markers, options
from pytest_ftrace.ftrace import session as ftrace

FAILING = "def test_fails():\n    assert False\n"

# Edge values as text (the command line, an ini file).
EDGES = ["0", "-1", "-0", "99999999999999999999", "1e400", "inf", "nan", "", "abc", "1.5"]

# ...and as Python values (markers, TOML ini files, the JSON cache).
PY_EDGES = [0, -1, 10**20, float("inf"), float("nan"), "", "abc", 1.5, True, None, [1]]

CLEAN = (pytest.ExitCode.TESTS_FAILED,)  # the target fails: a clean run says so


class _Group:
    def __init__(self, registered: list):
        self.registered = registered

    def addoption(self, *names: str, **kwargs) -> None:
        self.registered.append((names, kwargs))


class _Parser:
    """Just enough of pytest.Parser for options.add_options to register into."""

    def __init__(self):
        self.options: list[tuple[tuple[str, ...], dict]] = []
        self.inis: dict[str, dict] = {}
        self._inidict: dict = {}
        self._anonymous = SimpleNamespace(options=[])
        self._groups: list = []

    def getgroup(self, name: str, description: str = "") -> _Group:
        return _Group(self.options)

    def addini(self, name: str, help: str, **kwargs) -> None:
        self.inis[name] = kwargs


class _PluginManager:
    def is_blocked(self, name: str) -> bool:
        return False

    def has_plugin(self, name: str) -> bool:
        return False


def _registered() -> _Parser:
    parser = _Parser()
    options.add_options(parser, _PluginManager())
    return parser


PARSER = _registered()
# Options that take a value (flags have nothing to be hostile with).
VALUED = [
    (names, kwargs)
    for names, kwargs in PARSER.options
    if kwargs.get("action") not in ("store_true", "store_false", "count")
]
INI_KEYS = sorted(PARSER.inis)


def _needs_ftrace(dest: str) -> bool:
    return dest in options.FTRACE_ONLY


def _ini_needs_ftrace(key: str) -> bool:
    return key in options.FTRACE_ONLY_INI


def _values_for(names: tuple[str, ...]) -> list[str]:
    """The edge values, in the shape the option takes (KEY=VALUE, a scheduler with a number)."""
    if names[0] == "--ftrace-policy":
        return [f"{key}={edge}" for key in ftrace.policy_keys() for edge in EDGES] + ["=", "x"]
    if names[0] == "--ftrace-scheduler":
        return [f"{name}{edge}" for name in ("mix", "pct", "aligned") for edge in EDGES]
    if names[0] == "--ftrace-replay":
        return [
            f"t{a}i{b}{c}"
            for a, b, c in [
                ("0", "0", ""),
                ("99999999999999999999", "0", ""),
                ("4", "18446744073709551616", ""),
                ("4", "0", "k99999999999999999999999"),
                ("4", "0", "k0"),
                ("4", "-1", ""),
            ]
        ] + EDGES
    return EDGES


def _check(result, named: tuple[str, ...], what: str) -> None:
    """Exit 4 with a line naming one of `named`, or a clean run of the failing target."""
    output = result.stdout.str() + "\n" + result.stderr.str()
    assert result.ret != pytest.ExitCode.INTERNAL_ERROR, f"{what}: INTERNALERROR\n{output}"
    assert "INTERNALERROR" not in output, f"{what}\n{output}"
    assert result.ret != pytest.ExitCode.OK, f"{what}: the failing test passed\n{output}"
    if result.ret == pytest.ExitCode.USAGE_ERROR:
        errors = [line for line in result.stderr.lines if "error" in line.lower()]
        assert any(any(name in line for name in named) for line in errors), (
            f"{what}: the usage error does not name {named}\n{output}"
        )
        return
    assert result.ret in CLEAN, f"{what}: exit {result.ret}\n{output}"
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1 and not outcomes.get("passed"), f"{what}\n{output}"


def test_every_option_and_ini_key_is_enumerated():
    """The enumeration sees what the plugin has (so the tests below cover it)."""
    names = {name for names, _ in VALUED for name in names}
    assert {"--ftrace-timeout", "--ftrace-threads", "--ftrace-seed", "--ftrace-policy"} <= names
    assert {"ftrace_timeout", "threadpool", "ftrace_require_gil_disabled"} <= set(INI_KEYS)
    assert len(VALUED) >= 15 and len(INI_KEYS) >= 15


@pytest.mark.parametrize("names, kwargs", VALUED, ids=[names[0] for names, _ in VALUED])
def test_every_option_with_edge_values(pytester, names, kwargs):
    pytester.makepyfile(FAILING)
    base = ["-p", "no:cacheprovider"]
    if _needs_ftrace(kwargs["dest"]):
        base.append("--ftrace")
    for index, value in enumerate(_values_for(names)):
        # the canonical name and an alias, the value separate or after =, in turn
        name = names[index % 2 and -1]
        separate = index % 4 < 2
        args = [name, value] if separate else [f"{name}={value}"]
        named = names
        if separate and kwargs.get("nargs") == "?":
            # a bare flag (--ftrace-isolate) leaves a word after it that is not one of its
            # values to pytest, as a path: the usage error names that path instead
            named = (*names, f"not found: {value}")
        _check(pytester.runpytest(*base, *args), named, f"{args}")


@pytest.mark.parametrize("key", INI_KEYS)
def test_every_ini_key_with_edge_values(pytester, key):
    pytester.makepyfile(FAILING)
    base = ["-p", "no:cacheprovider"] + (["--ftrace"] if _ini_needs_ftrace(key) else [])
    values = EDGES
    if key == "ftrace_policy":
        values = [f"{name}={edge}" for name in ftrace.policy_keys() for edge in EDGES]
    elif key == "ftrace_scheduler":
        values = [f"{name}{edge}" for name in ("mix", "pct", "aligned") for edge in EDGES]
    for value in values:
        pytester.makeini(f"[pytest]\n{key} = {value}\n")
        _check(pytester.runpytest(*base), (key,), f"ini {key} = {value!r}")


@pytest.mark.parametrize("key", INI_KEYS)
def test_every_ini_key_with_wrong_toml_types(pytester, key):
    pytester.makepyfile(FAILING)
    base = ["-p", "no:cacheprovider"] + (["--ftrace"] if _ini_needs_ftrace(key) else [])
    # pytest deprecates what this feeds on purpose (non-strings for string-typed keys)
    base += ["-W", "ignore:Passing a value that is not a string"]
    for value in ("0", "-1", "true", "1.5", "[1, 2]", "[]", "{a = 1}", "1e400", "nan"):
        pytester.makefile(".toml", pyproject=f"[tool.pytest.ini_options]\n{key} = {value}\n")
        _check(pytester.runpytest(*base), (key,), f"toml {key} = {value}")


def _marker_signatures() -> list[tuple[str, tuple[str, ...]]]:
    """(name, argument names) of every marker the plugin documents."""
    lines = list(markers.MARKERS)
    for peer_lines in markers.PEER_MARKERS.values():
        lines.extend(peer_lines)
    found = []
    for line in lines:
        head = line.split(":", 1)[0]
        match = re.fullmatch(r"(\w+)(?:\((.*)\))?", head.strip())
        assert match, line
        args = tuple(
            part.split("=")[0].strip() for part in (match.group(2) or "").split(",") if part
        )
        found.append((match.group(1), args))
    return found


MARKER_SIGNATURES = _marker_signatures()


@pytest.mark.parametrize("name, args", MARKER_SIGNATURES, ids=[n for n, _ in MARKER_SIGNATURES])
@pytest.mark.parametrize("run", [["--threads", "2"], ["--threadpool", "2"], ["--ftrace"]])
def test_every_marker_argument_with_edge_values(pytester, name, args, run):
    """One module per marker: a failing test per (argument, value), keyword and positional.
    Bad arguments are collection errors (all of them reported) or usage errors; the rest
    fail."""
    tests = ["import pytest"]
    calls = [""] if not args else []
    for position, arg in enumerate(args):
        for value in PY_EDGES:
            calls.append(f"({arg}={value!r})")
            calls.append("(" + ", ".join(["None"] * position + [repr(value)]) + ")")
    calls.append("(1, 2, 3, 4)")
    calls.append("(unknown=1)")
    for index, call in enumerate(calls):
        call = call.replace("inf", 'float("inf")').replace("nan", 'float("nan")')
        tests.append(f"@pytest.mark.{name}{call}\ndef test_{index}():\n    assert False\n")
    pytester.makepyfile("\n".join(tests))
    result = pytester.runpytest("-p", "no:cacheprovider", *run)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.INTERNAL_ERROR), output
    assert "INTERNALERROR" not in output
    assert not result.parseoutcomes().get("passed"), output
    if result.ret == pytest.ExitCode.INTERRUPTED:  # collection errors: every one is named
        assert f"@pytest.mark.{name}" in output, output


# -- the cache: every file the plugin reads, holding what it would never write ---------------

CACHE_VALUES = [*PY_EDGES[:3], 2**64, -5, "abc", [1, 2], {}, 1.5, True, None]


def _write_cache(pytester, key: str, value) -> None:
    path = pytester.path / ".pytest_cache" / "v" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value) if value == value else "NaN"  # nan is not JSON, but Python reads it
    path.write_text(text)


def _cache_check(result, what: str) -> None:
    _check(result, ("--seed", "--ftrace-replay", "ftrace/"), what)


def test_the_cached_seed(pytester):
    pytester.makepyfile(FAILING)
    for value in [*CACHE_VALUES, float("nan")]:
        _write_cache(pytester, ftrace.CACHE_KEY, value)
        _cache_check(pytester.runpytest("--ftrace", "--seed", "last"), f"seed {value!r}")
        stored = json.loads((pytester.path / ".pytest_cache/v" / ftrace.CACHE_KEY).read_text())
        assert ftrace.usable_seed(stored) is not None or stored == value, stored


def test_the_cached_last_failure(pytester):
    pytester.makepyfile(FAILING)
    good = {"nodeid": "test_the_cached_last_failure.py::test_fails", "token": "t4i0", "seed": 5}
    records: list = list(CACHE_VALUES)
    for field in ("nodeid", "token", "seed", "mode"):
        for value in CACHE_VALUES:
            records.append({**good, field: value})
        records.append({k: v for k, v in good.items() if k != field})
    for record in records:
        _write_cache(pytester, ftrace.LAST_KEY, record)
        result = pytester.runpytest("--ftrace", "--ftrace-replay", "last", "--ftrace-shrink", "0")
        _cache_check(result, f"last {record!r}")


def test_the_cached_schedules(pytester):
    pytester.makepyfile(FAILING)
    first = pytester.runpytest("--ftrace", "--seed", "3", "--ftrace-shrink", "0")
    token = re.search(r"--ftrace-replay (t\S+)", first.stdout.str()).group(1)
    key = token.split("x", 1)[1]
    nodeid = "test_the_cached_schedules.py::test_fails"
    schedules: list = list(CACHE_VALUES)
    for value in CACHE_VALUES:
        schedules.append({"nodeid": nodeid, "threads": 4, "decisions": value})
        schedules.append({"nodeid": nodeid, "threads": 4, "decisions": [0, 1, value]})
        schedules.append({"nodeid": value, "threads": 4, "decisions": [0, 1]})
        schedules.append({"nodeid": nodeid, "threads": value, "decisions": [0, 1]})
    for stored in schedules:
        _write_cache(pytester, ftrace.REPLAY_KEY + key, stored)
        result = pytester.runpytest(
            "--ftrace", "--seed", "3", "--ftrace-replay", token, "--ftrace-shrink", "0"
        )
        _cache_check(result, f"schedule {stored!r}")
