"""Thread-safe twins of the racy corpus: the same shapes, done right. They must never fail."""

import collections
import queue
import threading

from rounds import slot

N = 40


class LockedCounter:
    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def increment(self):
        with self.lock:
            self.n += 1
            return self.n


def test_locked_counter():
    c = slot("s-attr", LockedCounter)
    last = -1
    for _ in range(N):
        value = c.increment()
        assert value > last
        last = value


def test_setdefault_registry():
    registry = slot("s-reg", dict)
    winners = slot("s-reg-winners", dict)
    for i in range(N):
        mine = registry.setdefault(i, object()) if i not in registry else registry[i]
        assert winners.setdefault(i, mine) is mine


class SafeLazy:
    def __init__(self):
        self._instance = None
        self._lock = threading.Lock()

    def get(self):
        if self._instance is None:
            with self._lock:
                if self._instance is None:  # checked again under the lock
                    self._instance = object()
        return self._instance


def test_double_checked_locking_done_right():
    holders = slot("s-dcl", lambda: [SafeLazy() for _ in range(N)])
    winners = slot("s-dcl-winners", dict)
    for i, holder in enumerate(holders):
        mine = holder.get()
        assert winners.setdefault(i, mine) is mine


class LockedDeques:
    def __init__(self):
        self.queues = [collections.deque([i]) for i in range(N)]
        self.lock = threading.Lock()


def test_deque_check_under_lock():
    shared = slot("s-deque", LockedDeques)
    for dq in shared.queues:
        with shared.lock:
            if dq:
                dq.popleft()


def test_queue_handoff():
    q = slot("s-queue", lambda: queue.Queue())
    for i in range(N):
        q.put(i)
        q.get(timeout=5)


class LockedMax:
    def __init__(self):
        self.value = -1
        self.lock = threading.Lock()

    def offer(self, v):
        with self.lock:
            if v > self.value:
                self.value = v


def test_locked_max():
    m = slot("s-max", LockedMax)
    offset = threading.get_ident() % 97
    for i in range(N):
        v = i * 100 + offset
        m.offer(v)
        assert m.value >= v


class LockedMemo:
    def __init__(self):
        self.cache = {}
        self.computed = []
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.cache:
                self.computed.append(key)
                self.cache[key] = key * key
            return self.cache[key]


def test_locked_memoisation():
    memo = slot("s-memo", LockedMemo)
    for i in range(N):
        memo.get(i)
        assert memo.computed.count(i) == 1


class LockedPair:
    def __init__(self):
        self.a = self.b = 0
        self.lock = threading.Lock()


def test_pair_written_under_lock():
    pair = slot("s-torn", LockedPair)
    me = threading.get_ident()
    for _ in range(N):
        with pair.lock:
            pair.a = me
            pair.b = me
        with pair.lock:
            a, b = pair.a, pair.b
        assert a == b


class LockedIds:
    def __init__(self):
        self.next_id = 0
        self.lock = threading.Lock()

    def new_id(self):
        with self.lock:
            current = self.next_id
            self.next_id = current + 1
            return current


def test_locked_unique_ids():
    gen = slot("s-ids", LockedIds)
    issued = slot("s-ids-issued", dict)
    me = threading.get_ident()
    for _ in range(N):
        new = gen.new_id()
        assert issued.setdefault(new, me) == me


def test_event_and_condition():
    state = slot("s-cond", lambda: {"cond": threading.Condition(), "items": []})
    cond, items = state["cond"], state["items"]
    for i in range(N // 4):
        with cond:
            items.append(i)
            cond.notify_all()
        with cond:
            assert cond.wait_for(lambda: len(items) > 0, timeout=5)


def test_local_state_only():
    local = {"n": 0}
    for _ in range(N):
        local["n"] += 1
    assert local["n"] == N


class Publication:
    """One thread publishes a value and sets an event; the others wait for it."""

    def __init__(self):
        self.claim = threading.Lock()
        self.claimed = False
        self.ready = threading.Event()
        self.value = None


def test_event_publishes_once():
    pub = slot("s-event", Publication)
    with pub.claim:
        mine = not pub.claimed
        pub.claimed = True
    if mine:
        pub.value = [1, 2, 3]
        pub.ready.set()
    assert pub.ready.wait(timeout=5)
    assert pub.value == [1, 2, 3]


class Gate:
    """At most two threads inside at once, counted under a lock."""

    def __init__(self):
        self.slots = threading.BoundedSemaphore(2)
        self.lock = threading.Lock()
        self.inside = 0


def test_semaphore_bounds_the_section():
    gate = slot("s-semaphore", Gate)
    for _ in range(N // 4):
        with gate.slots:
            with gate.lock:
                gate.inside += 1
                assert gate.inside <= 2
            with gate.lock:
                gate.inside -= 1


class Meeting:
    """The first two threads of a round meet at a two-party barrier, then read each other's
    value; any other thread of the round passes by (no test needs the thread count). Run on one
    thread, the first waits in vain and passes; so does a pair that a free-running runner let
    drift apart by more than the timeout."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrived = 0
        self.barrier = threading.Barrier(2, timeout=2)
        self.values = {}


def test_barrier_meeting():
    meeting = slot("s-barrier", Meeting)
    with meeting.lock:
        me = meeting.arrived
        meeting.arrived += 1
    if me >= 2:
        return
    meeting.values[me] = me * 10
    try:
        meeting.barrier.wait()
    except threading.BrokenBarrierError:
        return  # alone (one thread), or the partner came after the timeout: nobody to meet
    assert meeting.values[1 - me] == (1 - me) * 10


# -- module state filled on first use, never reset between rounds (the racy twin's fix) ------

_PROFILES: dict = {}
_PROFILE_LOADS: list = []
_PROFILES_LOCK = threading.Lock()


def load_profile(name):
    with _PROFILES_LOCK:
        if name not in _PROFILES:
            profile = {"name": name, "load": len(_PROFILE_LOADS)}
            _PROFILE_LOADS.append(name)
            _PROFILES[name] = profile
        return _PROFILES[name]


def test_first_fill_module_cache_under_lock():
    mine = load_profile("default")
    assert mine["name"] == "default"
    assert len(_PROFILE_LOADS) == 1, f"the profile was loaded {len(_PROFILE_LOADS)} times"
