"""The extension's injection core, called directly: seeds, opcode table, runs, the callback."""

import random
import subprocess
import sys
import threading

import pytest
from conftest import only_free_threaded

from pytest_ftrace import _native
from pytest_ftrace.ftrace.instrument import opcode_table

M64 = (1 << 64) - 1


def reference_derive(seed, *parts):
    """The algorithm documented in rust/seed.rs, written again from its description."""

    def mix64(x):
        z = (x + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    h = seed & M64
    for part in parts:
        if isinstance(part, int):
            words = [2 if part < 0 else 1, part & M64]
        else:
            data = part.encode()
            words = [3, len(data)]
            words += [
                int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little")
                for i in range(0, len(data), 8)
            ]
        for w in words:
            h = mix64(h ^ w)
    return mix64(h ^ len(parts))


# Pinned: the same values as rust/seed.rs `pinned_values`. Never change them.
PINNED = [
    ((0,), 0xE220A8397B1DCDAF),
    ((1,), 0x910A2DEC89025CC1),
    ((42, "test", "t.py::test_x"), 0x565C2EDD78F97850),
    ((42, 7), 0x1EC3E893655B233F),
    ((42, -1), 0x3507969659247E7D),
    ((M64, "é∂", 1 << 40), 0xA742C8D77473CE50),
]


@pytest.mark.parametrize(("args", "expected"), PINNED)
def test_derive_seed_pinned_values(args, expected):
    assert _native.derive_seed(*args) == expected


def test_derive_seed_matches_the_documented_algorithm():
    rng = random.Random(1234)
    for _ in range(300):
        seed = rng.randrange(-(1 << 63), 1 << 64)
        parts = []
        for _ in range(rng.randrange(5)):
            if rng.random() < 0.5:
                parts.append(rng.randrange(-(1 << 63), 1 << 64))
            else:
                parts.append(
                    "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))
                )
        assert _native.derive_seed(seed, *parts) == reference_derive(seed, *parts), (seed, parts)


def test_derive_seed_parts_are_typed():
    assert _native.derive_seed(5, 1) != _native.derive_seed(5, "1")
    assert _native.derive_seed(-1, 2) == _native.derive_seed(M64, 2)  # seeds are mod 2**64
    assert _native.derive_seed(5, "a", "b") != _native.derive_seed(5, "b", "a")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((1 << 64,), ValueError),
        ((-(1 << 63) - 1,), ValueError),
        ((0, 1 << 64), ValueError),
        ((0, 1.5), TypeError),
        ((0, True), TypeError),
        ((0, b"x"), TypeError),
        (("0",), TypeError),
    ],
)
def test_derive_seed_rejects_bad_input(args, error):
    with pytest.raises(error):
        _native.derive_seed(*args)


def test_opcode_table_roundtrip_and_validation():
    table = opcode_table()
    _native.set_hooked_opcodes(table)
    assert _native.hooked_opcodes() == table
    with pytest.raises(ValueError):
        _native.set_hooked_opcodes(table[:10])
    with pytest.raises(ValueError):
        _native.set_hooked_opcodes([0x300] + table[1:])


def sample(o):
    o.a = o.b
    return o


def offsets_of(func, opnames):
    import dis

    return [i.offset for i in dis.get_instructions(func) if i.opname in opnames]


def test_callback_disables_unhooked_and_counts_hooked_offsets():
    _native.set_hooked_opcodes(opcode_table())
    code = sample.__code__
    (load_attr,) = offsets_of(sample, {"LOAD_ATTR"})
    (store_attr,) = offsets_of(sample, {"STORE_ATTR"})
    (ret,) = offsets_of(sample, {"RETURN_VALUE"})
    run = _native.Run(1, yield_probability=0, delay_probability=0)
    run.activate()
    try:
        assert _native.on_instruction(code, load_attr) is None
        assert _native.on_instruction(code, store_attr) is None
        assert _native.on_instruction(code, ret) is sys.monitoring.DISABLE
        assert _native.on_instruction(code, 10_000) is sys.monitoring.DISABLE
        assert _native.on_instruction("not code", 0) is sys.monitoring.DISABLE
    finally:
        run.deactivate()
    assert _native.on_instruction(code, load_attr) is None  # inactive: nothing counted
    assert run.stats()["hooked"] == 2
    with pytest.raises(TypeError):
        _native.on_instruction(code)


def decisions(seed, accesses=3000, rounds=2):
    """Yields and delays one worker thread gets from `accesses` hooked accesses per round."""
    _native.set_hooked_opcodes(opcode_table())
    (load_attr,) = offsets_of(sample, {"LOAD_ATTR"})
    run = _native.Run(seed, yield_probability=0.05, delay_probability=0.02, max_sleep_us=1)
    out = []

    def worker():
        run.thread_enter(0)
        for it in range(rounds):
            run.round_start(it)
            before = run.stats()
            for _ in range(accesses):
                _native.on_instruction(sample.__code__, load_attr)
            after = run.stats()
            out.append((after["yields"] - before["yields"], after["delays"] - before["delays"]))
        run.thread_exit()

    run.activate()
    try:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    finally:
        run.deactivate()
    return out, run.stats()


def test_decisions_follow_the_seed():
    a, stats = decisions(99)
    b, _ = decisions(99)
    c, _ = decisions(100)
    assert a == b
    assert a != c
    assert a[0] != a[1], "each round reseeds its stream"
    assert stats["hooked"] == 6000
    assert (stats["threads"], stats["executions"], stats["foreign_threads"]) == (1, 2, 0)
    # 5% yields, 2% delays of 3000 accesses, well within binomial bounds
    for yields, delays in a:
        assert 100 <= yields <= 210 and 25 <= delays <= 100


def test_one_active_run_at_a_time():
    a, b = _native.Run(1), _native.Run(2)
    a.activate()
    try:
        assert _native.active_run_id() == a.id
        with pytest.raises(RuntimeError, match="another test run"):
            b.activate()
        assert b.deactivate() is False
    finally:
        assert a.deactivate() is True
    assert _native.active_run_id() == 0


def test_round_start_needs_thread_enter():
    run = _native.Run(3)
    with pytest.raises(RuntimeError, match="thread_enter"):
        run.round_start(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"yield_probability": -0.1},
        {"delay_probability": 2.0},
        {"yield_probability": 0.7, "delay_probability": 0.7},
        {"sleep_share": 0.5, "max_spin_ns": 0},
    ],
)
def test_bad_policies_are_rejected(kwargs):
    with pytest.raises(ValueError):
        _native.Run(0, **kwargs)


def test_round_latency_percentiles():
    run = _native.Run(0)
    assert run.stats()["rounds"] == 0
    for ms in range(1, 101):
        run.record_round(ms / 1000)
    s = run.stats()
    assert s["rounds"] == 100
    assert 49_900 <= s["round_p50_us"] <= 50_100
    assert 98_900 <= s["round_p99_us"] <= 99_100
    assert 99_900 <= s["round_max_us"] <= 100_100
    assert set(s) >= {"executions", "hooked", "yields", "delays", "round_p50_us"}


@only_free_threaded
def test_native_injection_keeps_gil_disabled():
    code = (
        "import sys, threading\n"
        "from pytest_ftrace import _native\n"
        "from pytest_ftrace.ftrace.instrument import opcode_table\n"
        "_native.set_hooked_opcodes(opcode_table())\n"
        "def f(o):\n    o.a = o.b\n"
        "import dis\n"
        "off = [i.offset for i in dis.get_instructions(f) if i.opname == 'LOAD_ATTR'][0]\n"
        "run = _native.Run(5, yield_probability=0.5, delay_probability=0.1, max_sleep_us=1)\n"
        "run.activate()\n"
        "def w():\n"
        "    for _ in range(500): _native.on_instruction(f.__code__, off)\n"
        "ts = [threading.Thread(target=w) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "run.deactivate()\n"
        "assert run.stats()['hooked'] == 2000, run.stats()\n"
        "print(sys._is_gil_enabled())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def _exact_round(run, threads: int, points: int, iteration: int = 0) -> list[tuple[int, int]]:
    """Managed threads taking `points` explicit scheduling points each; the order they ran."""
    log: list[tuple[int, int]] = []

    def worker(tid):
        run.thread_enter(tid)
        assert run.sched_enter(tid, iteration, threads) == "turn"
        assert run.sched_me() == tid
        for i in range(points):
            log.append((tid, i))  # only the thread whose turn it is runs here
            run.sched_point()
        run.sched_exit()
        assert run.sched_me() is None
        run.thread_exit()

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert not any(w.is_alive() for w in workers)
    return log


def test_exact_run_serialises_and_replays_its_schedule():
    first = _native.Run(21, mode="exact", scheduler="random")
    log = _exact_round(first, 3, 20)
    record = first.sched_round(0)
    assert record["exact"] and not record["deadlock"]
    assert record["preemptions"] > 0
    assert len(first.sched_steps(0)) == len(record["decisions"])
    assert _exact_round(_native.Run(21, mode="exact", scheduler="random"), 3, 20) == log
    replay = _native.Run(999, mode="exact", replay=record["decisions"])
    assert _exact_round(replay, 3, 20) == log
    assert replay.sched_round(0)["divergences"] == 0


def test_exact_round_counts_match_the_record():
    run = _native.Run(5, mode="exact", scheduler="random")
    assert run.sched_counts(0) is None  # not run yet
    _exact_round(run, 3, 20)
    record = run.sched_round(0)
    decisions = record["decisions"]
    handovers = sum(1 for a, b in zip(decisions, decisions[1:], strict=False) if a != b)
    assert handovers > 0
    assert run.sched_counts(0) == (
        len(decisions),
        handovers,
        record["preemptions"],
        record["exact"],
        record["deadlock"],
    )


def test_exact_mix_first_round_longer_than_its_estimate_keeps_few_hand_overs():
    # Round 0 is made with a default length estimate (200 steps); this one takes 8,000. Past
    # the estimate the mix policy's hand-over rate fades, so a long first round does not pay
    # a wake-up of another OS thread at a fixed share of its points (it made thousands).
    for seed in (1, 2, 3):
        run = _native.Run(seed, mode="exact", scheduler="mix")
        _exact_round(run, 4, 2_000)
        points, handovers, preemptions, exact, _deadlock = run.sched_counts(0)
        assert exact and points >= 8_000
        assert handovers < 400, (seed, handovers, points)


def test_exact_block_and_wake_hand_the_turn_over():
    run = _native.Run(3, mode="exact", replay=[0, 0, 1])
    order = []

    def waiter():
        run.sched_enter(0, 0, 2)
        order.append("0 blocks")
        assert run.sched_block(77, False) == "woken"
        order.append("0 woken")
        run.sched_exit()

    def waker():
        run.sched_enter(1, 0, 2)
        order.append("1 wakes")
        assert run.sched_wake(77) == 1
        run.sched_exit()

    threads = [threading.Thread(target=waiter), threading.Thread(target=waker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert order == ["0 blocks", "1 wakes", "0 woken"]
