"""Seeded yields and delays at shared-state accesses (`--ftrace`): the sys.monitoring side.

The native extension answers the events (`_native.on_instruction`: a seeded generator per
thread decides to continue, yield or delay, with the interpreter released). This module
decides which code gets events and when:

- One sys.monitoring tool id per `Instrumentation`, taken among the free ones (never one a
  debugger, coverage.py or a profiler holds) and given back by `close()`.
- While a test run is active, PY_START/PY_RESUME events are on for all code. The first time
  a code object starts in an activation, its scope is checked (by file and module name): an
  in-scope code object gets INSTRUCTION events of its own (`set_local_events`); every code
  object then gets `DISABLE` for PY_START, so this costs one callback per code object per
  activation. Out-of-scope code (pytest, the standard library, installed packages but the
  project's own, this plugin) never gets INSTRUCTION events.
- In in-scope code, every instruction that is not a shared-state access (see
  `HOOKED_OPNAMES`) gets `DISABLE` at its first event. CPython forgets a `DISABLE` when the
  tool's events are switched off and on, so each activation re-learns this, once per offset.
- `deactivate()` switches every event off again, so nothing fires between tests, and closes
  the test's exact-mode core: a thread the test left running never waits in it again.
- At interpreter exit (atexit, before the interpreter finalizes), every core is closed and the
  threads still inside the native core are waited for, so that none of them takes the
  interpreter back in a Rust frame while it finalizes (CPython ends such a daemon thread with
  `pthread_exit`, and unwinding through Rust aborts the process).

`sys.monitoring.restart_events()` is never called: it would reset the other tools too.

PYTEST_DONT_REWRITE: plugin code, imported as is (assertion rewriting costs startup).
"""

from __future__ import annotations

import _thread
import atexit
import fnmatch
import opcode
import os
import sys
import sysconfig
from collections.abc import Iterable

from pytest_ftrace import _native
from pytest_ftrace.ftrace import genpoints, sharing

mon = sys.monitoring
E = mon.events

TOOL_NAME = "pytest-ftrace"
# Tool ids in the order we try them. 3 and 4 have no owner by convention, 5 is reserved for
# optimizers (unused by CPython so far); 2 (profilers), 0 (debuggers) and 1 (coverage.py) come
# last, so a profiler, debugger or coverage started after us is the least likely to be blocked.
PREFERRED_TOOL_IDS = (4, 3, 5, 2, 0, 1)

# Instructions that read or write state another thread may share: attributes (a LOAD_ATTR
# that loads a method is also the point just before a container method is called), globals,
# subscripts and slices, closure cells, `in` tests, and `super()` attributes.
HOOKED_OPNAMES = (
    "LOAD_ATTR",
    "STORE_ATTR",
    "DELETE_ATTR",
    "LOAD_SUPER_ATTR",
    "LOAD_GLOBAL",
    "STORE_GLOBAL",
    "DELETE_GLOBAL",
    "BINARY_SUBSCR",  # 3.12, 3.13 (3.14: BINARY_OP with NB_SUBSCR, below)
    "STORE_SUBSCR",
    "DELETE_SUBSCR",
    "BINARY_SLICE",
    "STORE_SLICE",
    "LOAD_DEREF",
    "STORE_DEREF",
    "DELETE_DEREF",
    "CONTAINS_OP",
)

# How long, at most, exit waits for the threads inside the native core to come back.
EXIT_GRACE_SECONDS = 2.0


def _arm(tool_id: int, code) -> None:
    """INSTRUCTION events for `code`, told to exact mode's watcher as the interpreter's own
    pause. On a free-threaded build `set_local_events` stops the world: it waits until every
    other thread that holds its thread state reaches a safe point, which on a loaded machine
    can take tens of milliseconds (a thread that the OS does not run, a long call in C), while
    the arming thread sleeps. That thread is usually the one with the turn, at the first
    line of the test's body in a forked child (code is armed again in every child): the
    watcher took it for a thread blocked in C and let the round run free, "unmanaged blocking
    at the start of the thread". The watcher does not count that time, as it does not count
    a collection's (`gc_event`)."""
    _native.gc_event("start", None)
    try:
        mon.set_local_events(tool_id, code, E.INSTRUCTION)
    finally:
        _native.gc_event("stop", None)


def release_native(grace: float = EXIT_GRACE_SECONDS) -> int:
    """Close every native core for good and wait (up to `grace` seconds, the interpreter
    released) until no thread is inside one; returns how many still are."""
    import time

    inside = _native.release_all()
    deadline = time.monotonic() + grace
    while inside and time.monotonic() < deadline:
        time.sleep(0.002)
        inside = _native.threads_inside()
    return inside


def wait_native_idle(grace: float) -> int:
    """Wait (up to `grace` seconds) until no thread is inside the native core."""
    import time

    inside = _native.threads_inside()
    deadline = time.monotonic() + grace
    while inside and time.monotonic() < deadline:
        time.sleep(0.002)
        inside = _native.threads_inside()
    return inside


atexit.register(release_native)

# Native table entries (rust/opcodes.rs).
_ALWAYS = 0x100
_ONLY_ARG = 0x200

# Modules never instrumented, whatever include says: hooking them would perturb the test
# machinery itself (and this plugin's own code must never inject into itself).
NEVER_MODULES = ("pytest_ftrace", "pytest", "_pytest", "pluggy")


def hooked_opcodes() -> dict[str, tuple[int, int | None]]:
    """The hooked instructions of the running interpreter: name -> (opcode, required arg).

    Opcode numbers differ between 3.12, 3.13 and 3.14, so they come from `opcode.opmap`.
    The argument is None except for 3.14's `BINARY_OP` hooked only with `NB_SUBSCR`.
    """
    found: dict[str, tuple[int, int | None]] = {}
    for name in HOOKED_OPNAMES:
        op = opcode.opmap.get(name)
        if op is not None and op < 256:  # pseudo-instructions are numbered from 256
            found[name] = (op, None)
    if "BINARY_SUBSCR" not in found:
        nb_ops = [name for name, _sym in getattr(opcode, "_nb_ops", ())]
        if "NB_SUBSCR" in nb_ops and "BINARY_OP" in opcode.opmap:
            found["BINARY_OP"] = (opcode.opmap["BINARY_OP"], nb_ops.index("NB_SUBSCR"))
    return found


def opcode_table() -> list[int]:
    """The 256-entry table the extension filters instructions with: the shared-state
    accesses, and the generator and iteration points of `pytest_ftrace.ftrace.genpoints`."""
    from pytest_ftrace.ftrace import genpoints

    table = [0] * 256
    for op, arg in hooked_opcodes().values():
        table[op] = _ALWAYS if arg is None else _ONLY_ARG | arg
    for op, entry in genpoints.table_entries().items():
        table[op] = entry
    return table


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    return _norm(os.path.dirname(file)) if file else None


class Scope:
    """Which code is instrumented, by the file and module a code object belongs to.

    Default: code whose file lies under `rootdir`, except the standard library, installed
    packages (site-packages, dist-packages, anything under the interpreter's prefixes), and
    the modules in NEVER_MODULES. `packages` (the project's import packages, see
    project_scope.py) are in with all their submodules wherever their files are, as are
    modules matching the `include` globs (fnmatch on module names, e.g. "mypkg.*");
    `exclude` globs remove modules. NEVER_MODULES are out whatever the globs say.
    """

    def __init__(
        self,
        rootdir: str,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        packages: Iterable[str] = (),
    ):
        self.rootdir = _norm(str(rootdir))
        self.rootdir_real = _norm(os.path.realpath(self.rootdir))
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.packages = tuple(packages)
        paths = sysconfig.get_paths()
        excluded = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
        for prefix in {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}:
            # An interpreter installed above the project (rootdir inside the prefix) would
            # exclude everything: leave such a prefix to the finer paths above.
            if not _under(self.rootdir, _norm(prefix)):
                excluded.add(prefix)
        for name in NEVER_MODULES:
            directory = _package_dir(name)
            if directory:
                excluded.add(directory)
        self.excluded_dirs = tuple(sorted({_norm(p) for p in excluded}))
        self._cache: dict[tuple[str, str | None], bool] = {}

    def contains(self, filename: str, module: str | None) -> bool:
        key = (filename, module)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._decide(filename, module)
        return hit

    def _decide(self, filename: str, module: str | None) -> bool:
        if module is not None:
            if any(module == n or module.startswith(n + ".") for n in NEVER_MODULES):
                return False
            if any(fnmatch.fnmatchcase(module, p) for p in self.exclude):
                return False
            if any(fnmatch.fnmatchcase(module, p) for p in self.include) or any(
                module == n or module.startswith(n + ".") for n in self.packages
            ):
                return not self._in_plugin(filename)
        if not filename or filename.startswith("<") or not os.path.isabs(filename):
            return False  # <string>, <frozen ...>, exec'd code: no file of the project
        path = _norm(filename)
        real = _norm(os.path.realpath(filename))
        if not (_under(path, self.rootdir) or _under(real, self.rootdir_real)):
            return False
        parts = set(path.split(os.sep)) | set(real.split(os.sep))
        if "site-packages" in parts or "dist-packages" in parts:
            return False
        return not any(_under(path, d) or _under(real, d) for d in self.excluded_dirs)

    def _in_plugin(self, filename: str) -> bool:
        directory = _package_dir("pytest_ftrace")
        return bool(directory and filename and _under(_norm(filename), directory))


class NoFreeToolId(RuntimeError):
    """Every sys.monitoring tool id is taken (by debuggers, coverage, profilers)."""


def _claim_tool_id(preferred: Iterable[int]) -> int:
    for tool in preferred:
        if mon.get_tool(tool) is not None:
            continue
        try:
            mon.use_tool_id(tool, TOOL_NAME)
        except ValueError:  # taken between the check and the claim
            continue
        return tool
    owners = ", ".join(f"{t}={mon.get_tool(t)!r}" for t in range(6))
    raise NoFreeToolId(
        "pytest-ftrace: no free sys.monitoring tool id for --ftrace; ids in use: "
        f"{owners}. Run without one of the other tools (debugger, coverage, profiler) "
        "or without --ftrace."
    )


class Instrumentation:
    """The --ftrace machinery of one pytest session: a tool id, a scope, a session seed."""

    def __init__(
        self,
        session_seed: int,
        rootdir: str,
        include: list[str],
        exclude: list[str],
        *,
        tool_ids: Iterable[int] = PREFERRED_TOOL_IDS,
        packages: Iterable[str] = (),
        **policy,
    ):
        """`policy`: keyword arguments of `_native.Run` (yield_probability, ...), checked now.
        `packages`: the project's import packages, in scope wherever they are installed."""
        _native.Run(0, **policy)  # validate the policy before claiming anything
        self.session_seed = session_seed
        self.scope = Scope(rootdir, include, exclude, packages)
        self.policy = dict(policy)
        # A real lock (exact mode makes threading.Lock schedulable): the plugin's own.
        self._lock = _thread.allocate_lock()
        self._armed: dict[int, object] = {}  # id(code) -> code, with INSTRUCTION events on
        self.generated = 0  # generated code objects armed in this activation
        # Where each access's object is, for the budget's signal (off when no test runs by
        # budget: the analysis costs at the first call of every hooked code object)
        self.access_slots = True
        self.races = False  # exact mode tracks accesses (--ftrace-races): decode each code
        self._active: TestRun | None = None
        _native.set_hooked_opcodes(opcode_table())
        genpoints.install()
        self.tool_id = _claim_tool_id(tool_ids)
        self._closed = False
        try:
            mon.register_callback(self.tool_id, E.INSTRUCTION, _native.on_instruction)
            mon.register_callback(self.tool_id, E.PY_START, self._on_start)
            mon.register_callback(self.tool_id, E.PY_RESUME, self._on_start)
        except BaseException:
            self.close()
            raise

    def start_test(self, nodeid: str, **exact) -> TestRun:
        """A run for one test, seeded with derive_seed(session_seed, "test", nodeid).

        `exact`: keyword arguments of `_native.Run` for exact mode (mode="exact", scheduler,
        pct_depth, stay_percent, switch_budget, sched_k, replay)."""
        if self._closed:
            raise RuntimeError("Instrumentation is closed")
        seed = _native.derive_seed(self.session_seed, "test", nodeid)
        return TestRun(self, nodeid, _native.Run(seed, **self.policy, **exact))

    def close(self) -> None:
        """Switch every event off and give the tool id back. Idempotent."""
        if self._closed:
            return
        if self._active is not None:
            self._active.deactivate()
        self._disarm()
        for event in (E.INSTRUCTION, E.PY_START, E.PY_RESUME):
            mon.register_callback(self.tool_id, event, None)
        mon.free_tool_id(self.tool_id)
        self._closed = True
        # Every test's core was closed when it ended; the threads released then are back in
        # Python within one wait slice.
        wait_native_idle(1.0)

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- activation --------------------------------------------------------------------

    def _activate(self, run: TestRun) -> None:
        if self._closed:
            raise RuntimeError("Instrumentation is closed")
        with self._lock:
            if self._active is run:
                return
            if self._active is not None:
                raise RuntimeError(f"test run {self._active.nodeid!r} is still active")
            run._native.activate()  # raises if another Instrumentation's run is active
            self._active = run
            self.generated = 0
            mon.set_events(self.tool_id, E.PY_START | E.PY_RESUME)

    def _deactivate(self, run: TestRun) -> None:
        with self._lock:
            if self._active is not run:
                return
            self._active = None
            run.generated_code = self.generated
            mon.set_events(self.tool_id, 0)
            self._disarm_locked()
            run._native.deactivate()
            run._native.sched_close()

    def _disarm(self) -> None:
        with self._lock:
            mon.set_events(self.tool_id, 0)
            self._disarm_locked()

    def _disarm_locked(self) -> None:
        for code in self._armed.values():
            mon.set_local_events(self.tool_id, code, 0)
        self._armed.clear()
        _native.clear_iter_slots()
        _native.clear_access_slots()
        _native.shared_track(False)  # no record outlives its test (ftrace/budget.py)

    def _on_start(self, code, _offset):
        """PY_START/PY_RESUME: give in-scope code INSTRUCTION events, then go quiet."""
        if id(code) not in self._armed:
            frame = sys._getframe(1)
            mine = frame.f_code is code
            module = frame.f_globals.get("__name__") if mine else None
            generated = False
            if self.scope.contains(code.co_filename, module):
                pass
            elif (
                mine
                and genpoints.is_generated(code.co_filename)
                and frame.f_back is not None
                and id(frame.f_back.f_code) in self._armed
                and generated_in_scope(code.co_filename, module, self.scope)
            ):
                generated = True  # compiled at run time, started from hooked code
            else:
                return mon.DISABLE
            self._hook(code, generated)
        return mon.DISABLE

    def _hook(self, code, generated: bool = False) -> bool:
        """Give `code` INSTRUCTION events (with its loop and access slots) while a test run is
        active; whether it was armed now."""
        slots = genpoints.iter_slots(code)
        access_slots = None
        if self.access_slots and sharing.AVAILABLE:
            access_slots = sharing.access_entries(code)
        if self.races:
            from pytest_ftrace.ftrace import accesses

            accesses.register(code)
        with self._lock:
            if self._active is None or id(code) in self._armed:
                return False
            # the loop slots first: a thread already running this code (free-threaded
            # builds) may step a loop as soon as the events are on, and a step with no
            # slot known switches that loop's events off for good
            if slots:
                _native.set_iter_slots(code, slots)
            if access_slots:  # where each access's object is (the budget's signal)
                _native.set_access_slots(code, access_slots)
            _arm(self.tool_id, code)
            self._armed[id(code)] = code
            self.generated += generated
        return True

    def armed_since(self, mark: tuple[int, int]) -> tuple[list, list]:
        """What was armed, and decided about the scope, after `mark` (`mark()`), as plain data
        for a process forked at `mark` (a test's snapshot, snapshot.py): the keys of the
        armed code objects that are not generated (`code_key`) and the scope's new answers."""
        armed_at, decided_at = mark
        with self._lock:
            codes = list(self._armed.values())[armed_at:]
        decided = list(self.scope._cache.items())[decided_at:]
        return [code_key(c) for c in codes if not genpoints.is_generated(c.co_filename)], decided

    def mark(self) -> tuple[int, int]:
        """Where `armed_since` counts from."""
        with self._lock:
            return len(self._armed), len(self.scope._cache)

    def arm_again(self, keys: list, decided: list) -> int:
        """In a process forked before another armed them (a test's snapshot): arm the code
        objects with these keys, found in the scope's modules (`find_code`), so that the
        processes forked from here start with them armed, as the code was where round 0 ran;
        take the scope's answers `decided` there too. Code not found is armed at its first
        start, as always. Returns how many were armed."""
        for key, verdict in decided:
            self.scope._cache.setdefault(key, verdict)
        armed = 0
        for code in find_code(keys, self.scope):
            armed += self._hook(code)
        return armed

    def armed_code(self) -> list:
        """Code objects that have INSTRUCTION events now (for tests and diagnostics)."""
        with self._lock:
            return list(self._armed.values())


class TestRun:
    """One test under --ftrace. Worker threads call thread_enter / round_start / thread_exit;
    threads that do not (threads the test starts itself) get streams of their own too."""

    __test__ = False  # not a pytest test class

    def __init__(self, instrumentation: Instrumentation, nodeid: str, native: _native.Run):
        self._inst = instrumentation
        self._native = native
        self.nodeid = nodeid
        self.seed: int = native.seed
        self.generated_code = 0
        # Counters of the rounds run in forked processes (ftrace/fork.py), added to stats()
        self.forked: dict[str, int] = {}

    def activate(self) -> None:
        """Events on: hooked accesses in in-scope code now inject, on every thread."""
        self._inst._activate(self)

    def deactivate(self) -> None:
        """Events off (idempotent)."""
        self._inst._deactivate(self)

    def thread_enter(self, thread_index: int) -> None:
        self._native.thread_enter(thread_index)

    def round_start(self, iteration: int) -> None:
        self._native.round_start(iteration)

    def thread_exit(self) -> None:
        self._native.thread_exit()

    def record_round(self, seconds: float) -> None:
        self._native.record_round(seconds)

    def stats(self) -> dict:
        """threads, foreign_threads, executions (bodies run), rounds, hooked (of which
        generator_points and iteration_points), generated_code (code objects compiled at run
        time that were hooked), yields, delays, delay_ns, round_p50_us, round_p99_us,
        round_max_us; with the counters of rounds run in forked processes added."""
        stats = self._native.stats()
        active = self._inst._active is self
        stats["generated_code"] = self._inst.generated if active else self.generated_code
        for key, value in self.forked.items():
            stats[key] = stats.get(key, 0) + value
        return stats

    def __enter__(self) -> TestRun:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()


def code_key(code) -> tuple[str, int, str]:
    """What finds a code object again in a process forked before it was armed."""
    return (code.co_filename, code.co_firstlineno, code.co_qualname)


def find_code(keys: Iterable[tuple], scope) -> list:
    """The code objects with these keys (`code_key`) that the scope's modules hold: in their
    functions, in the functions and properties of their classes (and of classes in those),
    and in the code nested in those. Reads objects, calls nothing of the user's."""
    import types

    wanted = set(keys)
    if not wanted:
        return []
    files = {key[0] for key in wanted}
    found: list = []
    seen_code: set[int] = set()
    seen: set[int] = set()

    def code(c) -> None:
        if id(c) in seen_code:
            return
        seen_code.add(id(c))
        if code_key(c) in wanted:
            found.append(c)
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                code(const)

    def value(v, depth: int) -> None:
        if id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if isinstance(v, property):
            for f in (v.fget, v.fset, v.fdel):
                if f is not None:
                    value(f, depth)
            return
        if isinstance(v, types.FunctionType):
            if v.__code__.co_filename in files:
                code(v.__code__)
            wrapped = v.__dict__.get("__wrapped__") if hasattr(v, "__dict__") else None
            if wrapped is not None and depth > 0:
                value(wrapped, depth - 1)
            return
        if isinstance(v, type) and depth > 0:
            for item in list(_DICT_OF_TYPE.__get__(v).values()):
                value(item, depth - 1)

    dict_of_module = types.ModuleType.__dict__["__dict__"]
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) if isinstance(module, types.ModuleType) else None
        if not isinstance(file, str) or not scope.contains(file, name):
            continue
        for item in list(dict_of_module.__get__(module).values()):
            value(item, 2)
    return found


_DICT_OF_TYPE = type.__dict__["__dict__"]


def generated_in_scope(filename: str, module: str | None, scope) -> bool:
    """Whether generated code (started from hooked code) is hooked: not when its module is never
    hooked or excluded, or an exclude glob matches its file name."""
    if module is not None:
        if any(module == n or module.startswith(n + ".") for n in NEVER_MODULES):
            return False
        if any(fnmatch.fnmatchcase(module, p) for p in scope.exclude):
            return False
    return not any(fnmatch.fnmatchcase(filename, p) for p in scope.exclude)
