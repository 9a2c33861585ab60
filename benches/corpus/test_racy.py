"""Racy tests: each has a thread-safety bug that a plain single-threaded run never shows."""

import collections
import threading
import zlib

from rounds import slot

N = 40  # operations per body


class Counter:
    def __init__(self):
        self.n = 0


def check_rising(read, last):
    value = read()
    assert value > last, f"counter went from {last} back to {value}: an update was lost"
    return value


# -- lost updates ----------------------------------------------------------------------------


def test_lost_update_attribute():
    c = slot("attr", Counter)
    last = -1
    for _ in range(N):
        c.n += 1
        last = check_rising(lambda: c.n, last)


class Shared:
    count = 0


def test_lost_update_class_attribute():
    last = Shared.count - 1
    for _ in range(N):
        Shared.count += 1
        last = check_rising(lambda: Shared.count, last)


HITS = 0


def read_hits():
    return HITS


def test_lost_update_global():
    global HITS
    last = HITS - 1
    for _ in range(N):
        HITS += 1
        last = check_rising(read_hits, last)


def test_lost_update_dict_item():
    d = slot("dict", lambda: {"n": 0})
    last = -1
    for _ in range(N):
        d["n"] += 1
        last = check_rising(lambda: d["n"], last)


def test_lost_update_list_item():
    lst = slot("list", lambda: [0])
    last = -1
    for _ in range(N):
        lst[0] += 1
        last = check_rising(lambda: lst[0], last)


def test_lost_update_dict_get():
    d = slot("get", dict)
    last = -1
    for _ in range(N):
        d["k"] = d.get("k", 0) + 1
        last = check_rising(lambda: d["k"], last)


# -- check-then-act ----------------------------------------------------------------------------


def test_check_then_act_dict():
    registry = slot("cta-dict", dict)
    winners = slot("cta-dict-winners", dict)
    for i in range(N):
        if i not in registry:
            registry[i] = object()
        mine = registry[i]
        assert winners.setdefault(i, mine) is mine, f"two objects were registered for {i}"


def test_check_then_act_list():
    items = slot("cta-list", list)
    for i in range(N):
        if i not in items:
            items.append(i)
        assert items.count(i) == 1, f"{i} was added twice"


def test_check_then_act_deque():
    queues = slot("cta-deque", lambda: [collections.deque([i]) for i in range(N)])
    for dq in queues:
        if dq:
            dq.popleft()  # IndexError when another thread emptied it in between


class Account:
    def __init__(self, balance):
        self.n = balance


def test_bank_overdraft():
    account = slot("bank", lambda: Account(N * 2))
    for _ in range(N):
        if account.n >= 1:
            account.n = account.n - 1
        assert account.n >= 0, f"balance went negative: {account.n}"


# -- initialisation ----------------------------------------------------------------------------


class Lazy:
    def __init__(self):
        self._instance = None
        self._lock = threading.Lock()

    def get(self):
        if self._instance is None:
            self._instance = object()
        return self._instance

    def get_double_checked(self):
        if self._instance is None:
            with self._lock:
                self._instance = object()  # broken: no second check under the lock
        return self._instance


def test_lazy_init():
    holders = slot("lazy", lambda: [Lazy() for _ in range(N)])
    winners = slot("lazy-winners", dict)
    for i, holder in enumerate(holders):
        mine = holder.get()
        assert winners.setdefault(i, mine) is mine, "lazy init made two instances"


def test_broken_double_checked_locking():
    holders = slot("dcl", lambda: [Lazy() for _ in range(N)])
    winners = slot("dcl-winners", dict)
    for i, holder in enumerate(holders):
        mine = holder.get_double_checked()
        assert winners.setdefault(i, mine) is mine, "double-checked locking made two instances"


class Memo:
    def __init__(self):
        self.cache = {}
        self.computed = []

    def get(self, key):
        if key not in self.cache:
            self.computed.append(key)
            self.cache[key] = key * key
        return self.cache[key]


def test_memoisation_computes_twice():
    memo = slot("memo", Memo)
    for i in range(N):
        memo.get(i)
        assert memo.computed.count(i) == 1, f"value for {i} computed twice"


# -- torn state --------------------------------------------------------------------------------


class Pair:
    def __init__(self):
        self.a = 0
        self.b = 0


def test_torn_multi_field_write():
    pair = slot("torn", Pair)
    me = threading.get_ident()
    for _ in range(N):
        pair.a = me
        pair.b = me
        a, b = pair.a, pair.b
        assert a == b, f"torn write: a={a} b={b}"


class Swap:
    def __init__(self):
        self.a, self.b = 0, 1

    def swap(self):
        a = self.a
        self.a = self.b
        self.b = a


def test_torn_swap():
    s = slot("swap", Swap)
    for _ in range(N):
        s.swap()
        assert {s.a, s.b} == {0, 1}, f"swap tore the pair: {s.a}, {s.b}"


class Max:
    def __init__(self):
        self.value = -1

    def offer(self, v):
        if v > self.value:
            self.value = v


def test_non_atomic_max():
    m = slot("max", Max)
    # A per-thread offset that is the same in every run (a thread's name is given by the
    # runner in creation order; its OS ident is not), so an exact replay meets the same values.
    offset = zlib.crc32(threading.current_thread().name.encode()) % 97
    for i in range(N):
        v = i * 100 + offset
        m.offer(v)
        assert m.value >= v, f"max {m.value} lost the larger value {v}"


# -- shared iterators and containers -------------------------------------------------------------


def numbers():
    state = Counter()
    while True:
        state.n += 1
        yield state.n


def test_shared_generator():
    gen = slot("gen", numbers)
    for _ in range(N):
        next(gen)  # ValueError: generator already executing


def test_iterate_while_mutate():
    d = slot("iter", lambda: {i: i for i in range(20)})
    me = threading.get_ident()
    for i in range(N // 4):
        total = 0
        for key in d:
            total += d[key]
        d[(me, i)] = i


class Stack:
    def __init__(self, values):
        self.head = None
        for v in values:
            self.head = (v, self.head)

    def pop(self):
        node = self.head
        if node is None:
            return None
        self.head = node[1]
        return node[0]


def test_linked_stack_double_pop():
    stack = slot("stack", lambda: Stack(range(N * 8)))
    popped = slot("stack-popped", dict)
    for _ in range(N):
        v = stack.pop()
        if v is not None:
            assert popped.setdefault(v, threading.get_ident()) == threading.get_ident(), (
                f"{v} popped twice"
            )


class IdGenerator:
    def __init__(self):
        self.next_id = 0

    def new_id(self):
        current = self.next_id
        self.next_id = current + 1
        return current


def test_unique_ids():
    gen = slot("ids", IdGenerator)
    issued = slot("ids-issued", dict)
    me = threading.get_ident()
    for _ in range(N):
        new = gen.new_id()
        assert issued.setdefault(new, me) == me, f"id {new} handed out twice"


# -- one-shot races: a single racy step per thread per round ---------------------------------


def test_one_shot_unique_id():
    gen = slot("one-ids", IdGenerator)
    issued = slot("one-ids-issued", dict)
    me = threading.get_ident()
    new = gen.new_id()
    assert issued.setdefault(new, me) == me, f"id {new} handed out twice"


def test_one_shot_lazy_init():
    holder = slot("one-lazy", Lazy)
    winners = slot("one-lazy-winner", dict)
    mine = holder.get()
    assert winners.setdefault(0, mine) is mine, "lazy init made two instances"


# -- module state filled on first use, never reset between rounds ----------------------------
# Only the round that finds the cache empty can race: each round must start from the test's
# starting state (forked rounds) for every round to get the chance.

_PROFILES: dict = {}
_PROFILE_LOADS: list = []


def load_profile(name):
    if name not in _PROFILES:  # check
        profile = {"name": name, "load": len(_PROFILE_LOADS)}  # compute
        _PROFILE_LOADS.append(name)
        _PROFILES[name] = profile  # store
    return _PROFILES[name]


def test_first_fill_module_cache():
    mine = load_profile("default")
    assert mine["name"] == "default"
    assert len(_PROFILE_LOADS) == 1, f"the profile was loaded {len(_PROFILE_LOADS)} times"
