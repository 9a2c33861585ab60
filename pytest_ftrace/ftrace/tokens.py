"""--ftrace's seeds, replay tokens and cache records, and how the options that choose them are
read: pure functions over option values and the pytest cache, shared by the session and the
run modes.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass

import pytest

from pytest_ftrace import options
from pytest_ftrace.options import DEFAULT_MODE, DEFAULT_SWITCH_BUDGET, MODES

CACHE_KEY = "ftrace/seed"
REPLAY_KEY = "ftrace/replay/"  # + hash: one failing round's decision list (exact mode)
LAST_KEY = "ftrace/replay/last"

MODE = DEFAULT_MODE  # kept for importers of the old constant
_TOKEN = re.compile(r"^t([0-9]+)i([0-9]+)(?:k([0-9]+))?(?:x([0-9a-f]{6,40}))?$")
_SCHEDULER = re.compile(r"^(random|mix|pct|aligned)([0-9]*)$")


def parse_seed_option(value) -> int | str:
    text = value.strip() if isinstance(value, str) else value
    if text in ("last", "random"):
        return text
    try:
        return options.check_whole(text, "--seed", 0, options.U64)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "--seed must be a whole number between 0 and 2**64-1, 'last' or 'random', "
            f"not {value!r}"
        ) from None


def usable_seed(value) -> int | None:
    """A seed read from the cache, or None where it is not one (a corrupt cache)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= options.U64:
        return None
    return value


def policy_keys() -> dict:
    from pytest_ftrace import _native

    return dict(_native.policy_defaults())


# The bounds of the policy's numbers: probabilities and shares are 0..1; a delay is at most a
# second (each hooked access may take one).
POLICY_MAX = {"max_spin_ns": 10**9, "max_sleep_us": 10**6}


def parse_policy_item(value: str) -> tuple[str, float]:
    key, sep, raw = str(value).partition("=")
    key = key.strip()
    defaults = policy_keys()
    if not sep or key not in defaults:
        raise argparse.ArgumentTypeError(
            f"--ftrace-policy takes KEY=VALUE with KEY one of {', '.join(defaults)}, not {value!r}"
        )
    what = f"--ftrace-policy {key}"
    if isinstance(defaults[key], int):
        number = options.check_whole(raw, what, 0, POLICY_MAX.get(key, options.U32))
    else:
        number = options.check_real(raw, what, 0.0, 1.0)
    return key, number


def resolve_policy(config: pytest.Config) -> dict:
    """ini lines first, then the command line; each later KEY wins."""
    policy: dict = {}
    for line in options.ini_value(config, "ftrace_policy") or ():
        try:
            key, number = parse_policy_item(line)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"ini key ftrace_policy: {exc}") from None
        policy[key] = number
    policy.update(config.option.ftrace_policy or ())
    return policy


def parse_scheduler(value: str) -> tuple[str, int]:
    """random, mix[B] (hand-over budget per round, default DEFAULT_SWITCH_BUDGET), pct[D]
    (depth, default 3) or aligned[P] (stay percent, default 50)."""
    match = _SCHEDULER.match(str(value).strip())
    if not match or (match.group(1) == "random" and match.group(2)):
        raise argparse.ArgumentTypeError(
            "--ftrace-scheduler takes random, mix, mix<hand-overs per round> (e.g. mix48), pct, "
            "pct<depth> (e.g. pct3), aligned or aligned<stay percent> (e.g. aligned50), "
            f"not {value!r}"
        )
    name = match.group(1)
    defaults = {"aligned": 50, "mix": DEFAULT_SWITCH_BUDGET, "pct": 3}
    # mix: hand-overs per round (u32 in the core); pct: depth (each level is a change point
    # the scheduler draws and keeps); aligned: a percentage
    low, high, what = {
        "mix": (1, options.U32, "--ftrace-scheduler mix budget"),
        "pct": (1, PCT_MAX_DEPTH, "--ftrace-scheduler pct depth"),
        "aligned": (0, 100, "--ftrace-scheduler aligned stay percent"),
    }.get(name, (0, 0, "--ftrace-scheduler"))
    param = options.check_whole(match.group(2) or str(defaults.get(name, 0)), what, low, high)
    return name, param


PCT_MAX_DEPTH = 1000


@dataclass(frozen=True)
class Token:
    threads: int
    iteration: int
    key: str | None = None  # exact mode: cache key suffix of the decision list
    # exact mode: the round's step estimate, which its scheduler was made with; a replay
    # from the seed (no decision list in the cache) needs it to make the same choices
    k: int | None = None

    def __str__(self) -> str:
        k = f"k{self.k}" if self.k is not None else ""
        return f"t{self.threads}i{self.iteration}{k}" + (f"x{self.key}" if self.key else "")


LAST = "last"


def parse_token(value) -> Token | str:
    """A replay token, its numbers checked against what the native core takes: threads
    1..MAX_THREADS, the round and the step estimate k in the u64 range."""
    text = value.strip() if isinstance(value, str) else value
    if text == LAST:
        return LAST
    match = _TOKEN.match(text) if isinstance(text, str) else None
    if not match:
        raise argparse.ArgumentTypeError(
            "--ftrace-replay takes the token of a replay: line, such as t8i3, or 'last', "
            f"not {value!r}"
        )
    what = f"--ftrace-replay {text}:"
    threads = options.check_whole(match.group(1), f"{what} threads", 1, options.MAX_THREADS)
    iteration = options.check_whole(match.group(2), f"{what} round", 0, options.U64)
    k = None
    if match.group(3) is not None:
        k = options.check_whole(match.group(3), f"{what} step estimate k", 0, options.U64)
    return Token(threads, iteration, match.group(4), k)


def resolve_mode(config: pytest.Config) -> str:
    mode = config.option.ftrace_mode
    if mode is None:
        raw = str(options.ini_value(config, "ftrace_mode") or "").strip()
        if raw and raw not in MODES:
            raise pytest.UsageError(f"ini key ftrace_mode: {', '.join(MODES)}; not {raw!r}")
        mode = raw or DEFAULT_MODE
    return mode


def resolve_scheduler(config: pytest.Config) -> tuple[str, int]:
    value = config.option.ftrace_scheduler
    if value is None:
        raw = str(options.ini_value(config, "ftrace_scheduler") or "").strip()
        try:
            value = parse_scheduler(raw) if raw else ("mix", DEFAULT_SWITCH_BUDGET)
        except argparse.ArgumentTypeError as exc:
            raise pytest.UsageError(f"ini key ftrace_scheduler: {exc}") from None
    return value


def session_seed(config: pytest.Config, notes: list[str] | None = None) -> int:
    """The session seed, resolved once: xdist controller's, option, ini, or a fresh one.
    `--seed last` with a corrupt cache entry goes on with a fresh seed, noted in `notes`."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "ftrace_seed" in workerinput:
        return int(workerinput["ftrace_seed"])
    value = config.option.ftrace_seed
    if value is None:
        raw = options.ini_value(config, "ftrace_seed")
        if raw is not None:
            try:
                value = parse_seed_option(raw)
            except argparse.ArgumentTypeError as exc:
                raise pytest.UsageError(f"ini key ftrace_seed: {exc}") from None
    if value is None or value == "random":
        return random.Random().getrandbits(32)
    if value == "last":
        cache = getattr(config, "cache", None)
        last = cache.get(CACHE_KEY, None) if cache is not None else None
        if last is None:
            raise pytest.UsageError(
                "--seed last: no previous seed in the pytest cache (run once with --ftrace first, "
                "and keep the cache provider enabled)"
            )
        seed = usable_seed(last)
        if seed is None:
            seed = random.Random().getrandbits(32)
            if notes is not None:
                notes.append(
                    f"ftrace: --seed last has nothing usable: the pytest cache's {CACHE_KEY} "
                    f"holds {_shown(last)}, not a seed (cached value ignored); this run uses "
                    f"a fresh seed, {seed}"
                )
        return seed
    return int(value)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def last_failure(cache) -> tuple[str, Token, int, str]:
    """`--ftrace-replay last`: (nodeid, token, seed, mode) of the failure the cache recorded.
    A missing record is a usage error; an unusable one raises CorruptCache (ignored, noted)."""
    last = cache.get(LAST_KEY, None) if cache is not None else None
    if not last:
        raise pytest.UsageError(
            "--ftrace-replay last: no failure recorded in the pytest cache (run with "
            "--ftrace first, and keep the cache provider enabled)"
        )
    problem = None
    if not isinstance(last, dict):
        problem = "is not a record"
    elif not isinstance(last.get("nodeid"), str) or not last["nodeid"]:
        problem = "names no test (nodeid)"
    elif usable_seed(last.get("seed")) is None:
        problem = f"has no usable seed ({_shown(last.get('seed'))})"
    elif last.get("mode", DEFAULT_MODE) not in MODES:
        problem = f"has an unknown mode {_shown(last.get('mode'))}"
    else:
        try:
            token = parse_token(last.get("token"))
        except argparse.ArgumentTypeError:
            token = None
        if not isinstance(token, Token):
            problem = f"has an unusable token {_shown(last.get('token'))}"
    if problem is not None:
        raise CorruptCache(
            f"ftrace: --ftrace-replay last has nothing usable: the pytest cache's {LAST_KEY} "
            f"{problem} (cached value ignored); this run replays nothing"
        )
    return last["nodeid"], token, last["seed"], last.get("mode", DEFAULT_MODE)


class CorruptCache(Exception):
    """A cache entry the plugin wrote, holding something it would not have written."""


def cached_schedule(stored, nodeid: str) -> tuple[list[int] | None, str | None]:
    """A round's decision list from the cache, for `nodeid`: (list, None), or (None, why it
    was ignored) where the entry is there but unusable."""
    if stored is None:
        return None, None
    if not isinstance(stored, dict) or not isinstance(stored.get("decisions"), list):
        return None, "the cached schedule is not one (cached value ignored)"
    if stored.get("nodeid") != nodeid:
        return None, None  # another test's: this one is rescheduled from the seed
    decisions = stored["decisions"]
    # thread ids: the core's are u32 (threads the test starts get ids of their own)
    if not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= options.U32 for d in decisions
    ):
        return (
            None,
            "the cached schedule holds values that are not thread ids (cached value ignored)",
        )
    return decisions, None
