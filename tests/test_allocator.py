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
