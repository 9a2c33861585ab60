"""pytest_ftrace.ftrace.instrument: tool ids, scope, activation, and races made visible."""

import dis
import json
import opcode
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import _pytest.fixtures
import pytest
from conftest import FREE_THREADED_BUILD, only_free_threaded

import pytest_ftrace.ftrace.instrument as instrument
from pytest_ftrace.ftrace.instrument import HOOKED_OPNAMES, Instrumentation, Scope

mon = sys.monitoring
ROOT = Path(__file__).resolve().parents[2]
HERE = str(Path(__file__).resolve().parent)
QUIET = {"yield_probability": 0.0, "delay_probability": 0.0}


@pytest.fixture
def inst():
    i = Instrumentation(1, str(ROOT), [], [], **QUIET)
    yield i
    i.close()


# ---- in-scope helpers (this file lies under the rootdir) --------------------------------------


class Box:
    n = 0
    a = b = 0


def touch(o):
    o.a = o.b  # two hooked accesses: LOAD_ATTR b, STORE_ATTR a


def call(fn, *args):
    return fn(*args)  # no hooked access of its own


def bump(o, n):
    for _ in range(n):
        o.n += 1


# ---- the opcode filter -------------------------------------------------------------------------


def test_opcode_filter_for_this_interpreter():
    hooked = instrument.hooked_opcodes()
    for name in ["LOAD_ATTR", "STORE_ATTR", "DELETE_ATTR", "LOAD_GLOBAL", "STORE_GLOBAL"]:
        assert hooked[name] == (opcode.opmap[name], None)
    for name in ["STORE_SUBSCR", "DELETE_SUBSCR", "BINARY_SLICE", "STORE_SLICE"]:
        assert hooked[name] == (opcode.opmap[name], None)
    if sys.version_info < (3, 14):
        assert hooked["BINARY_SUBSCR"] == (opcode.opmap["BINARY_SUBSCR"], None)
        assert "BINARY_OP" not in hooked
    else:
        nb = [name for name, _ in opcode._nb_ops]
        assert hooked["BINARY_OP"] == (opcode.opmap["BINARY_OP"], nb.index("NB_SUBSCR"))
    assert set(hooked) <= set(HOOKED_OPNAMES) | {"BINARY_OP"}
    for name in ["LOAD_FAST", "STORE_FAST", "LOAD_CONST", "RETURN_VALUE", "CALL", "RESUME"]:
        assert opcode.opmap[name] not in [op for op, _ in hooked.values()]


def shared_state(o, d, lst):
    global Box
    x = o.attr
    o.attr = x
    del o.attr
    y = d[1]
    d[2] = y
    del d[3]
    z = lst[1:2]
    lst[0:1] = z
    Box = Box
    return 1 + 2 in d


def test_table_hooks_exactly_the_shared_state_instructions():
    table = instrument.opcode_table()
    code = shared_state.__code__.co_code
    hooked = []
    for ins in dis.get_instructions(shared_state):
        entry = table[code[ins.offset]]
        if entry == 0x100 or (entry and code[ins.offset + 1] == entry & 0xFF):
            hooked.append(ins.opname)
    assert {"LOAD_ATTR", "STORE_ATTR", "DELETE_ATTR", "STORE_SUBSCR", "DELETE_SUBSCR"} <= set(
        hooked
    )
    assert {"BINARY_SLICE", "STORE_SLICE", "LOAD_GLOBAL", "STORE_GLOBAL", "CONTAINS_OP"} <= set(
        hooked
    )
    assert ("BINARY_SUBSCR" in hooked) or ("BINARY_OP" in hooked)
    assert not {"LOAD_FAST", "STORE_FAST", "LOAD_CONST", "RETURN_VALUE"} & set(hooked)


# ---- scope -------------------------------------------------------------------------------------


def test_scope_default_rules():
    scope = Scope(str(ROOT))
    assert scope.contains(__file__, __name__)
    assert not scope.contains(json.__file__, "json")
    assert not scope.contains(threading.__file__, "threading")
    assert not scope.contains(pytest.__file__, "pytest")
    assert not scope.contains(_pytest.fixtures.__file__, "_pytest.fixtures")
    assert not scope.contains(instrument.__file__, "pytest_ftrace.ftrace.instrument")
    # pytest_ftrace lies under this rootdir: excluded by its directory too, whatever the name
    assert not scope.contains(instrument.__file__, None)
    venv_file = str(ROOT / ".venvs" / "x" / "lib" / "site-packages" / "pkg" / "m.py")
    assert not scope.contains(venv_file, "pkg.m")
    assert not scope.contains("<string>", "__main__")
    assert not scope.contains("relative/path.py", "m")
    assert not Scope(HERE + "/sub").contains(__file__, __name__)


def test_scope_include_and_exclude_globs():
    scope = Scope(str(ROOT), include=["json", "json.*", "pytest*"], exclude=["test_instr*"])
    assert scope.contains(json.__file__, "json")
    assert scope.contains(json.decoder.__file__, "json.decoder")
    assert not scope.contains(__file__, __name__), "excluded by glob"
    assert not scope.contains(pytest.__file__, "pytest"), "never, whatever include says"
    assert not scope.contains(instrument.__file__, "pytest_ftrace.ftrace.instrument")


# The measuring helper must not count its own accesses: compiled under a pseudo file name
# ("<...>"), it is out of scope like any code that has no file in the project.
_helpers: dict = {}
exec(
    compile(
        "def hooked_delta(run, fn, *args):\n"
        "    before = run.stats()['hooked']\n"
        "    fn(*args)\n"
        "    return run.stats()['hooked'] - before\n",
        "<test helper>",
        "exec",
    ),
    _helpers,
)
hooked_delta = _helpers["hooked_delta"]


def test_stdlib_and_pytest_frames_are_never_hooked(inst):
    run = inst.start_test("scope")
    text = "  a = 1\n  b = [x for x in range(3)]\n"
    with run:
        assert hooked_delta(run, touch, Box()) == 2
        assert hooked_delta(run, call, textwrap.dedent, text) == 0
        assert hooked_delta(run, call, json.dumps, {"a": [1, 2, {"b": None}]}) == 0
        assert hooked_delta(run, call, pytest.approx(1.0).__eq__, 1.0) == 0
        assert hooked_delta(run, touch, Box()) == 2
        armed = inst.armed_code()
    assert {c.co_name for c in armed} >= {"touch", "call"}
    assert all(c.co_filename == __file__ for c in armed), [c.co_filename for c in armed]


# ---- activation, deactivation, close, tool ids --------------------------------------------------


def test_no_events_after_deactivate(inst):
    run = inst.start_test("off")
    run.activate()
    assert hooked_delta(run, touch, Box()) == 2
    assert mon.get_local_events(inst.tool_id, touch.__code__) == mon.events.INSTRUCTION
    run.deactivate()
    assert mon.get_events(inst.tool_id) == 0
    assert mon.get_local_events(inst.tool_id, touch.__code__) == 0
    assert inst.armed_code() == []
    assert hooked_delta(run, touch, Box()) == 0
    run.deactivate()  # idempotent


def test_each_activation_rearms_in_scope_code(inst):
    # CPython forgets DISABLE when events are toggled: each activation starts over, and the
    # hooked offsets of in-scope code must be hooked again.
    run = inst.start_test("again")
    for _ in range(3):
        with run:
            assert hooked_delta(run, touch, Box()) == 2
            assert hooked_delta(run, touch, Box()) == 2
    assert run.stats()["hooked"] == 12


def test_close_frees_the_tool_id_and_stops_everything():
    inst = Instrumentation(1, str(ROOT), [], [], **QUIET)
    tool = inst.tool_id
    try:
        assert mon.get_tool(tool) == "pytest-ftrace"
        run = inst.start_test("close")
        run.activate()
        assert hooked_delta(run, touch, Box()) == 2
    finally:
        inst.close()  # deactivates the active run too
    assert mon.get_tool(tool) is None
    assert mon.get_local_events(tool, touch.__code__) == 0
    assert hooked_delta(run, touch, Box()) == 0
    inst.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        inst.start_test("after")


def test_tool_id_avoids_debugger_coverage_and_profiler_ids():
    first = Instrumentation(1, str(ROOT), [], [])
    second = Instrumentation(1, str(ROOT), [], [])
    try:
        assert first.tool_id not in (mon.DEBUGGER_ID, mon.COVERAGE_ID, mon.PROFILER_ID)
        assert second.tool_id not in (mon.DEBUGGER_ID, mon.COVERAGE_ID, mon.PROFILER_ID)
        assert first.tool_id != second.tool_id
    finally:
        first.close()
        second.close()


def test_clear_error_when_no_tool_id_is_free():
    taken = []
    try:
        for tool in range(6):
            if mon.get_tool(tool) is None:
                mon.use_tool_id(tool, f"squatter{tool}")
                taken.append(tool)
        with pytest.raises(RuntimeError, match="no free sys.monitoring tool id.*squatter"):
            Instrumentation(1, str(ROOT), [], [])
    finally:
        for tool in taken:
            mon.free_tool_id(tool)
    Instrumentation(1, str(ROOT), [], []).close()  # nothing was leaked


def test_an_existing_tool_is_not_clobbered():
    # A tool that holds our preferred id (say a coverage tool in id 4) keeps its callback.
    seen = []
    squat = next(t for t in instrument.PREFERRED_TOOL_IDS if mon.get_tool(t) is None)
    mon.use_tool_id(squat, "other-tool")
    mon.register_callback(squat, mon.events.PY_START, lambda code, off: seen.append(code))
    try:
        with Instrumentation(1, str(ROOT), [], []) as inst:
            assert inst.tool_id != squat
            with inst.start_test("x"):
                pass
        assert mon.get_tool(squat) == "other-tool"
        mon.set_local_events(squat, touch.__code__, mon.events.PY_START)
        touch(Box())
        assert touch.__code__ in seen
    finally:
        mon.set_local_events(squat, touch.__code__, 0)
        mon.register_callback(squat, mon.events.PY_START, None)
        mon.free_tool_id(squat)


def test_one_active_test_run_per_instrumentation(inst):
    a, b = inst.start_test("a"), inst.start_test("b")
    with a:
        with pytest.raises(RuntimeError, match="still active"):
            b.activate()
    with b:
        pass


# ---- seeds and threads ---------------------------------------------------------------------------


def test_test_seed_derives_from_session_seed_and_nodeid():
    from pytest_ftrace import _native

    with Instrumentation(42, str(ROOT), [], []) as inst:
        run = inst.start_test("t.py::test_x")
        assert run.seed == 0x565C2EDD78F97850 == _native.derive_seed(42, "test", "t.py::test_x")
        assert inst.start_test("t.py::test_y").seed != run.seed


def test_threads_without_thread_enter_get_injection():
    with Instrumentation(3, str(ROOT), [], [], yield_probability=0.5) as inst:
        run = inst.start_test("foreign")
        with run:
            workers = [threading.Thread(target=bump, args=(Box(), 50)) for _ in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        stats = run.stats()
    assert stats["foreign_threads"] >= 2
    assert stats["hooked"] >= 200
    assert stats["yields"] > 0


def stress(inst, nodeid, threads, n, inject=True, rounds=1):
    """A miniature of the stress runner: `threads` workers run bump() on one shared Box."""
    box = Box()
    run = inst.start_test(nodeid)
    barrier = threading.Barrier(threads)

    def worker(index):
        run.thread_enter(index)
        for it in range(rounds):
            run.round_start(it)
            barrier.wait()
            bump(box, n)
        run.thread_exit()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    if inject:
        run.activate()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        run.deactivate()
    return threads * n * rounds - box.n, run.stats()


def test_stats_count_threads_executions_and_accesses():
    with Instrumentation(5, str(ROOT), [], [], **QUIET) as inst:
        lost, stats = stress(inst, "stats", threads=2, n=100, rounds=3)
    assert (stats["threads"], stats["executions"]) == (2, 6)
    assert stats["hooked"] >= 2 * 3 * 100 * 2  # LOAD_ATTR + STORE_ATTR per iteration
    assert stats["yields"] == stats["delays"] == 0


@pytest.mark.parametrize("threads", [2, 8])
def test_injection_makes_lost_updates_show(threads):
    # With the default policy, threads doing `box.n += 1` lose updates in every run (no miss
    # in 200 runs of one round each, on 3.12, 3.13 and 3.13t); plain threads on a GIL build
    # never do (the GIL does not switch between the load and the store).
    with Instrumentation(2024, str(ROOT), [], []) as inst:
        injected = [stress(inst, f"race[{i}]", threads, 1000, rounds=2)[0] for i in range(5)]
        plain = [stress(inst, f"plain[{i}]", threads, 1000, False, 2)[0] for i in range(5)]
    assert all(lost > 0 for lost in injected), injected
    if not FREE_THREADED_BUILD:
        assert plain == [0] * 5


@only_free_threaded
def test_instrumentation_keeps_gil_disabled(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, threading
            from pytest_ftrace.ftrace.instrument import Instrumentation
            class Box:
                n = 0
            def bump(o, n):
                for _ in range(n):
                    o.n += 1
            with Instrumentation(1, ROOTDIR, [], []) as inst:
                run = inst.start_test("t")
                box = Box()
                with run:
                    ts = [threading.Thread(target=bump, args=(box, 500)) for _ in range(4)]
                    [t.start() for t in ts]
                    [t.join() for t in ts]
                assert run.stats()["hooked"] >= 4000, run.stats()
            print(sys._is_gil_enabled())
            """
        ).replace("ROOTDIR", repr(str(tmp_path)))
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
