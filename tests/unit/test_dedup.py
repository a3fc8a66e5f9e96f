from __future__ import annotations

import hashlib

import pytest

from forwarder.clock import FakeClock
from forwarder.dedup import GENERATIONS, DedupWindow


def key(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=16).digest()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_an_added_key_is_contained_and_an_unknown_one_is_not(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    assert window.contains(key(1))
    assert not window.contains(key(2))
    assert len(window) == 1


def test_a_key_is_remembered_for_the_whole_window(clock):
    window = DedupWindow(60, 100, clock)
    clock.advance(0.5)
    window.add(key(1))
    clock.advance(59.99)
    assert window.contains(key(1))


def test_a_key_is_forgotten_once_the_window_and_one_generation_have_passed(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    clock.advance(60 + 60 / GENERATIONS)
    assert not window.contains(key(1))
    assert len(window) == 0


def test_keys_expire_in_the_order_they_were_added(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    clock.advance(30)
    window.add(key(2))
    clock.advance(31 + 60 / GENERATIONS)
    assert not window.contains(key(1))
    assert window.contains(key(2))
    assert len(window) == 1


def test_re_adding_a_key_restarts_its_window(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    clock.advance(50)
    window.add(key(1))
    clock.advance(50)
    assert window.contains(key(1))
    assert len(window) == 1


def test_the_count_bound_evicts_the_oldest_keys_first(clock):
    window = DedupWindow(3600, 3, clock)
    for n in range(5):
        window.add(key(n))
        clock.advance(1)
    assert len(window) == 3
    assert [window.contains(key(n)) for n in range(5)] == [False, False, True, True, True]


def test_the_count_bound_holds_across_many_generations(clock):
    window = DedupWindow(64, 1000, clock)
    for n in range(5000):
        window.add(key(n))
        clock.advance(0.01)
    assert len(window) == 1000
    assert not window.contains(key(3999))
    assert all(window.contains(key(n)) for n in range(4000, 5000))


def test_a_key_re_added_after_its_old_copy_is_evicted_stays(clock):
    """A re-added key leaves a stale entry in its first generation; evicting that entry
    must not drop the fresh copy."""
    window = DedupWindow(3600, 2, clock)
    window.add(key(1))
    clock.advance(3600 / GENERATIONS)
    window.add(key(2))
    window.add(key(1))
    window.add(key(3))  # over the bound: the oldest live key (2) goes
    assert window.contains(key(1))
    assert not window.contains(key(2))
    assert window.contains(key(3))
    assert len(window) == 2


def test_a_forgotten_key_is_not_contained_and_does_not_count(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    window.add(key(2))
    window.forget(key(1))
    window.forget(key(99))  # unknown: ignored
    assert not window.contains(key(1))
    assert window.contains(key(2))
    assert len(window) == 1


def test_a_forgotten_then_re_added_key_survives_its_old_generation_expiring(clock):
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    window.forget(key(1))
    clock.advance(30)
    window.add(key(1))
    clock.advance(31 + 60 / GENERATIONS)
    assert window.contains(key(1))


def test_expired_keys_are_dropped_when_the_window_is_idle(clock):
    window = DedupWindow(60, 100, clock)
    for n in range(10):
        window.add(key(n))
    clock.advance(3600)
    assert len(window) == 0
    window.add(key(1))
    assert len(window) == 1


@pytest.mark.parametrize(("window_seconds", "max_keys"), [(0, 10), (-1, 10), (60, 0)])
def test_a_window_without_room_is_refused(clock, window_seconds, max_keys):
    with pytest.raises(ValueError):
        DedupWindow(window_seconds, max_keys, clock)


def test_add_if_absent_admits_a_key_once_per_window(clock):
    window = DedupWindow(window_seconds=60, max_keys=10, clock=clock)
    assert window.add_if_absent(key(1)) is True
    assert window.add_if_absent(key(1)) is False
    assert window.contains(key(1))
    clock.advance(60 * (1 + 1 / GENERATIONS) + 1)
    assert window.add_if_absent(key(1)) is True  # the old copy expired: a new event


def test_add_if_absent_then_forget_leaves_the_key_admissible(clock):
    """The intake forgets a key when the queue refuses its event (503): the retry must pass."""
    window = DedupWindow(window_seconds=60, max_keys=10, clock=clock)
    assert window.add_if_absent(key(2)) is True
    window.forget(key(2))
    assert len(window) == 0
    assert window.add_if_absent(key(2)) is True


def test_a_full_window_is_invisible_to_the_cycle_collector(clock):
    """A full GC must not walk every remembered key (with 1e6 keys it set the intake's p99)."""
    import gc

    window = DedupWindow(window_seconds=600, max_keys=10_000, clock=clock)
    for n in range(5_000):
        window.add(key(n))
        if n % 500 == 0:
            clock.advance(20)  # spread the keys over several generations
    gc.collect()
    big_tracked_dicts = [o for o in gc.get_objects() if isinstance(o, dict) and len(o) >= 5_000]
    assert big_tracked_dicts == []
    assert window.contains(key(4_999))
