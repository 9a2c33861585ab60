"""Command-line options and ini keys, and how their values are parsed and resolved.

Some names we would like (`--threads`, `--iterations`, ...) are also defined by peer plugins.
pytest cannot hold two options of one name, so such a name is registered only when no installed
plugin has taken it; every option also has an `--ftrace-` spelling that is always there.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os

import pytest

DEFAULT_TIMEOUT = 300.0

# Names that installed peer plugins (by pytest11 entry-point name) define themselves.
PEER_NAMES: dict[str, frozenset[str]] = {
    "run-parallel": frozenset({"--parallel-threads", "--iterations", "thread_unsafe_fixtures"}),
    "freethreaded": frozenset({"--threads", "--iterations", "--require-gil-disabled"}),
    "threadpool": frozenset({"--threadpool", "threadpool"}),
}


# The distribution each peer plugin comes in.
PEER_DISTRIBUTIONS = {
    "run-parallel": "pytest-run-parallel",
    "freethreaded": "pytest-freethreaded",
    "threadpool": "pytest-threadpool",
}


@functools.cache
def installed_peers() -> frozenset[str]:
    """Entry-point names of the installed peer plugins, once per process (pytester runs many
    sessions in one). Each peer's distribution is looked up by name, which reads no file
    unless it is installed: reading every distribution's entry points would cost each pytest
    run time in proportion to the size of the environment."""
    found = set()
    for peer in PEER_NAMES:
        name = PEER_DISTRIBUTIONS[peer]  # every peer needs its distribution's name here
        try:
            dist = importlib.metadata.distribution(name)
            eps = dist.entry_points
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken distribution must not break option parsing
            continue
        if any(ep.group == "pytest11" and ep.name == peer for ep in eps):
            found.add(peer)
    return frozenset(found)


def active_peers(pluginmanager: pytest.PytestPluginManager) -> set[str]:
    """Peer plugins that are installed (or registered) and not disabled with -p no:NAME."""
    found = {name for name in installed_peers() if not pluginmanager.is_blocked(name)}
    for name in PEER_NAMES:
        if pluginmanager.has_plugin(name):
            found.add(name)
    return found


# The names defined on the last parser seen: (parser, its option and ini count then, names).
# add_option and add_ini keep it up to date, so registering our options reads the parser's
# options once, not once per option.
_DEFINED: list = [None, -1, frozenset()]


def _size(parser: pytest.Parser) -> int:
    groups = [parser._anonymous, *parser._groups]
    return sum(len(group.options) for group in groups) + len(parser._inidict)


def _defined(parser: pytest.Parser) -> set[str]:
    size = _size(parser)
    if _DEFINED[0] is not parser or _DEFINED[1] != size:
        names: set[str] = set(parser._inidict)
        for group in [parser._anonymous, *parser._groups]:
            for option in group.options:
                names.update(option.names())
        _DEFINED[:] = [parser, size, names]
    return _DEFINED[2]


def _defined_now(parser: pytest.Parser, names) -> None:
    """Record names we have just registered on the parser."""
    if _DEFINED[0] is parser:
        _DEFINED[2].update(names)
        _DEFINED[1] = _size(parser)


def taken_names(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> set[str]:
    """Option and ini names we must not register: already defined, or owned by a peer."""
    taken = set(_defined(parser))
    for peer in active_peers(pluginmanager):
        taken |= PEER_NAMES[peer]
    return taken


def positive_int_or_auto(what: str):
    """An argparse type: a whole number >= 1, or 'auto' (the usable CPUs)."""

    def parse(value: str) -> int:
        value = str(value).strip()
        if value == "auto":
            return usable_cpus()
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a whole number >= 1 or 'auto', not {value!r}"
            ) from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, not {number}")
        return number

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def positive_int(what: str):
    def parse(value: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a whole number >= 1, not {value!r}"
            ) from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, not {number}")
        return number

    parse.__name__ = what
    return parse


def positive_float(what: str):
    def parse(value: str) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {value!r}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, not {value}")
        return number

    parse.__name__ = what
    return parse


def usable_cpus() -> int:
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def add_option(group, parser, pluginmanager, canonical: str, aliases=(), **kwargs) -> None:
    """Register `canonical` plus each alias that no other plugin has taken."""
    taken = taken_names(parser, pluginmanager)
    names = [canonical] + [a for a in aliases if a not in taken]
    group.addoption(*names, **kwargs)
    _defined_now(parser, names)


def add_ini(parser, pluginmanager, name: str, help: str, **kwargs) -> None:
    if name not in taken_names(parser, pluginmanager):
        parser.addini(name, help, **kwargs)
        _defined_now(parser, (name,))


def ini_value(config: pytest.Config, name: str):
    """The ini value, or None where it is unset or the key is unknown."""
    try:
        value = config.getini(name)
    except ValueError:
        return None
    if value in ("", [], None):
        return None
    return value


def resolve(config: pytest.Config, dest: str, ini: str, parse, default):
    """Command line > ini > default. A bad ini value is a usage error naming the key."""
    value = getattr(config.option, dest, None)
    if value is not None:
        return value
    raw = ini_value(config, ini)
    if raw is None:
        return default
    try:
        return parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"ini key {ini}: {exc}") from None


class Settings:
    """The session-wide settings of the stress runner, after option > ini > default.

    A plain class, not a dataclass: making a dataclass costs startup time on every pytest run.
    """

    __slots__ = (
        "threads",
        "iterations",
        "require_gil_disabled",
        "thread_unsafe_fixtures",
        "timeout",
    )

    def __init__(
        self,
        threads: int,
        iterations: int,
        require_gil_disabled: bool,
        thread_unsafe_fixtures: frozenset[str],
        timeout: float,
    ):
        self.threads = threads
        self.iterations = iterations
        self.require_gil_disabled = require_gil_disabled
        self.thread_unsafe_fixtures = thread_unsafe_fixtures
        self.timeout = timeout

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Settings({fields})"
