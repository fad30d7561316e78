"""The allocator is pure logic: these tests drive it with explicit host checks and clocks."""
import random

import pytest

from nodemngr import BUSY_RETRY, BadArgumentError, PortAllocator, Registration


def reg(port, pid=0, start=0):
    return Registration(port, "info", pid, start, 0.0, "")


def take_and_hold(alloc, usable=lambda p: True, pid=0):
    port = alloc.take(usable)
    if port is not None:
        alloc.hold(reg(port, pid))
    return port


def test_lowest_first_and_freed_ports_come_back_lowest_first():
    a = PortAllocator(100, 109)
    assert [take_and_hold(a) for _ in range(5)] == [100, 101, 102, 103, 104]
    a.release(103)
    a.release(101)
    assert take_and_hold(a) == 101
    assert take_and_hold(a) == 103
    assert take_and_hold(a) == 105


def test_exhaustion_returns_none_and_release_restores():
    a = PortAllocator(1, 3)
    assert [take_and_hold(a) for _ in range(3)] == [1, 2, 3]
    assert a.take(lambda p: True) is None
    a.release(2)
    assert take_and_hold(a) == 2


def test_busy_ports_are_skipped_not_held_and_retried_later():
    now = [0.0]
    a = PortAllocator(10, 20, clock=lambda: now[0])
    busy = {10, 11}
    assert take_and_hold(a, lambda p: p not in busy) == 12
    assert 10 not in a.held and 11 not in a.held
    busy.clear()
    assert take_and_hold(a) == 13, "a refused port is not probed again at once"
    now[0] += BUSY_RETRY
    assert take_and_hold(a) == 10, "after BUSY_RETRY it is offered again"
    assert take_and_hold(a) == 11


def test_registrations_loaded_are_held_and_owners_indexed():
    a = PortAllocator(50, 59, [reg(50, pid=7, start=1), reg(52, pid=7, start=1), reg(70)])
    assert sorted(a.held) == [50, 52, 70]
    assert a.owners == {(7, 1): {50, 52}}
    assert take_and_hold(a) == 51
    a.release(70)       # outside the range (range changed since): forgotten, never handed out
    assert 70 not in a.held
    assert [take_and_hold(a) for _ in range(8)] == [53, 54, 55, 56, 57, 58, 59, None]


def test_bad_range_is_refused():
    with pytest.raises(BadArgumentError):
        PortAllocator(10, 5)
    with pytest.raises(BadArgumentError):
        PortAllocator(0, 5)


def test_random_operations_agree_with_a_model():
    rnd = random.Random(1)
    a = PortAllocator(1000, 1063)
    model = set()
    for _ in range(3000):
        if model and rnd.random() < 0.45:
            port = rnd.choice(sorted(model))
            a.release(port)
            model.discard(port)
        else:
            port = take_and_hold(a)
            expected = min(set(range(1000, 1064)) - model) if len(model) < 64 else None
            assert port == expected
            if port is not None:
                model.add(port)
        assert set(a.held) == model
        assert a.free_count == 64 - len(model)


def named(port, info):
    return Registration(port, info, 0, 0, 0.0, "")


def take_named(alloc, info, usable=lambda p: True):
    from nodemngr import explicit_name
    port = alloc.take(usable, explicit_name(info))
    if port is not None:
        alloc.hold(named(port, info), alloc.memory_change(port, info))
    return port


def test_names_operations_agree_with_a_model():
    """Explicit names get their last port back when it is free; everything else takes the lowest
    free port no name remembers, and a remembered one only when nothing else is free (its name
    then forgets it); several holders of one name keep the first one's port."""
    rnd = random.Random(2)
    first, last = 1000, 1015
    a = PortAllocator(first, last)
    held, remembered = {}, {}
    infos = ["plain", "other"] + [{"name": n} for n in ("db", "web", "cache", "queue", "log")] + [{"x": 1}]
    for step in range(4000):
        if held and rnd.random() < 0.45:
            port = rnd.choice(sorted(held))
            a.release(port)
            del held[port]
        else:
            info = rnd.choice(infos)
            name = info.get("name") if isinstance(info, dict) else None
            free = set(range(first, last + 1)) - set(held)
            kept = remembered.get(name)
            if kept in free:
                expected = kept
            else:
                nobody = free - set(remembered.values())
                expected = min(nobody or free) if free else None
            port = take_named(a, info)
            assert port == expected, (step, info, remembered)
            if port is None:
                continue
            other = next((n for n, p in remembered.items() if p == port), None)
            if other != name:
                if other is not None:
                    del remembered[other]
                kept = remembered.get(name)
                if name is not None and not (kept in held and held[kept] == info):
                    remembered[name] = port
            held[port] = info
        assert set(a.held) == set(held)
        assert a.remembered == remembered
        assert len(set(remembered.values())) == len(remembered), "one name per remembered port"
        assert a.free_count == last - first + 1 - len(held)
    assert len(a._free) + len(a._kept) <= 2 * a.free_count + 64, "skipped heap entries are bounded"


def test_lookup_is_an_index_of_names():
    a = PortAllocator(1, 10)
    for port, info in ((1, "web"), (2, {"name": "web", "n": 2}), (3, {"name": 3}), (4, "db"), (5, ["web"])):
        a.hold(named(port, info))
    assert [r.port for r in a.lookup("web")] == [1, 2]
    assert [r.port for r in a.lookup("db")] == [4]
    assert a.lookup("nobody") == [] and a.lookup(3) == []
    a.release(1)
    a.release(4)
    assert [r.port for r in a.lookup("web")] == [2]
    assert a.lookup("db") == [] and "db" not in a.names, "an empty entry is dropped, not kept"


def test_remembered_ports_outside_the_range_are_dropped_and_a_1_0_state_seeds_them():
    regs = [named(5, {"name": "db"}), named(6, {"name": "db"}), named(7, "plain"), named(50, {"name": "far"})]
    a = PortAllocator(1, 10, regs, remembered={"old": 40, "web": 3})
    assert a.remembered == {"web": 3}
    assert a.remember_held() == [("db", 5)], "the lowest holder's port; none for a port out of range"
    assert a.remembered == {"web": 3, "db": 5}
    assert take_named(a, "x") == 1 and take_named(a, "y") == 2 and take_named(a, "z") == 4, "3 is kept for web"
