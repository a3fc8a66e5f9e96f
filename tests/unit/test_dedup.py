from __future__ import annotations

import hashlib

import pytest

from forwarder.clock import FakeClock
from forwarder.dedup import GENERATIONS, DedupWindow


def key(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=16).digest()


def kept(k: bytes) -> bytes:
    """What the window keeps of a key: its first 60 bits, as 8 bytes (dedup.py says why)."""
    return (int.from_bytes(k[:8], "little") & ((1 << 60) - 1)).to_bytes(8, "little")


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



def memory_of(window: DedupWindow, clock: FakeClock) -> int:
    """Bytes of every object the window holds (sys.getsizeof over what gc says it
    references, each object once), the injected clock left out."""
    import gc
    import sys

    seen = {id(clock)}
    todo: list[object] = [window]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        todo.extend(gc.get_referents(obj))
    return total


def full_window_bytes(max_keys: int) -> int:
    """What a window holding max_keys keys takes: the memory max_keys stands for."""
    clock = FakeClock()
    window = DedupWindow(window_seconds=3600, max_keys=max_keys, clock=clock)
    for n in range(max_keys):
        window.add_if_absent(key(-1 - n))
    return memory_of(window, clock)


def test_a_503_storm_does_not_grow_the_windows_memory(clock):
    """Every event the queue refuses is added, then forgotten (the intake's 503 path).

    Steps: 500 keys accepted; then 200,000 refused events (add_if_absent, forget), the
    clock moving through several generations. Expected: the window takes less memory
    than a full window of max_keys (it used to keep 8 bytes per refused event: 1.6 MB
    more here, ~16 MB after 2M), and still remembers exactly the 500 accepted keys.
    """
    window = DedupWindow(window_seconds=3600, max_keys=1000, clock=clock)
    accepted = [key(n) for n in range(500)]
    for k in accepted:
        window.add_if_absent(k)
    refused = [key(n) for n in range(500, 10_500)]
    for i in range(200_000):
        k = refused[i % len(refused)]
        assert window.add_if_absent(k)
        window.forget(k)
        if i % 1000 == 0:
            clock.advance(1.0)  # 200 s: four 56 s generations

    assert memory_of(window, clock) < full_window_bytes(1000)
    assert len(window) == 500
    assert all(window.contains(k) for k in accepted)


def test_a_full_window_under_heavy_traffic_keeps_only_about_max_keys(clock):
    """The count bound evicts the oldest keys; memory must follow it down.

    Steps: a window of 1,000 keys takes 200,000 new keys within one generation.
    Expected: it takes less than twice the memory of a freshly filled window (a dict
    that has seen many deletions keeps a larger table); it used to keep 8 bytes per key
    it had evicted until the generation expired: 1.6 MB more here.
    """
    window = DedupWindow(window_seconds=3600, max_keys=1000, clock=clock)
    keys = [key(n) for n in range(200_000)]
    for k in keys:
        assert window.add_if_absent(k)

    assert memory_of(window, clock) < 2 * full_window_bytes(1000)
    assert len(window) == 1000
    assert all(window.contains(k) for k in keys[-1000:])


def test_after_a_storm_of_forgets_the_count_bound_still_evicts_oldest_first(clock):
    """Reclaiming forgotten keys' room must not change which keys are remembered."""
    window = DedupWindow(window_seconds=3600, max_keys=100, clock=clock)
    for n in range(50):
        window.add(key(n))
    for n in range(1000, 11_000):  # refused events, in the same generation
        window.add_if_absent(key(n))
        window.forget(key(n))
    for n in range(50, 150):
        window.add(key(n))
    assert [window.contains(key(n)) for n in range(150)] == [False] * 50 + [True] * 100
    assert not any(window.contains(key(n)) for n in range(1000, 11_000))


def test_forgetting_most_keys_of_an_older_generation_keeps_the_rest_until_it_expires(clock):
    """Dead letters forget keys of older generations; the keys left there must stay
    remembered for their whole window, then expire with their generation."""
    window = DedupWindow(window_seconds=64, max_keys=1000, clock=clock)
    for n in range(200):
        window.add(key(n))
    clock.advance(10)
    window.add(key(500))
    for n in range(150):
        window.forget(key(n))
    assert [window.contains(key(n)) for n in range(200)] == [False] * 150 + [True] * 50
    assert len(window) == 51
    clock.advance(64 - 10 + 1)  # the first generation's window (and one more slice) is over
    assert not any(window.contains(key(n)) for n in range(200))
    assert window.contains(key(500))
    assert len(window) == 1


def test_re_adding_a_remembered_key_again_and_again_holds_no_more_memory(clock):
    """add() of a key still remembered (the spool reload) restarts its window; doing so
    100,000 times must neither count it twice nor hold memory for every re-add."""
    window = DedupWindow(window_seconds=3600, max_keys=1000, clock=clock)
    for _ in range(100_000):
        window.add(key(1))
    assert memory_of(window, clock) < full_window_bytes(10)
    assert len(window) == 1
    window.add(key(2))
    assert window.contains(key(1)) and window.contains(key(2))


def test_a_key_added_with_an_age_is_forgotten_that_much_sooner(clock):
    """A restart reloads keys with their age (issue 13): one added 50 s ago in a 60 s
    window is a duplicate for about 10 s more, not 60."""
    window = DedupWindow(60, 100, clock)
    window.add_aged(key(1), 50.0)
    window.add_aged(key(2), 61.0)  # its window has passed: not remembered at all
    assert window.contains(key(1)) and not window.contains(key(2))
    clock.advance(9.0)
    assert window.contains(key(1))
    clock.advance(60 / GENERATIONS + 1.5)
    assert not window.contains(key(1))


def test_items_give_back_every_key_with_its_age_for_a_reload(clock):
    """What a stop writes and the next start reads: a window rebuilt from items() holds
    the same keys, each forgotten no sooner than in the original."""
    window = DedupWindow(60, 100, clock)
    window.add(key(1))
    clock.advance(30.0)
    window.add(key(2))
    window.add(key(3))
    window.forget(key(3))
    pairs = list(window.items())
    assert [k for k, _ in pairs] == [kept(key(1)), kept(key(2))]
    ages = dict(pairs)
    assert 30.0 - 60 / GENERATIONS <= ages[kept(key(1))] <= 30.0
    assert ages[kept(key(2))] == 0.0

    reloaded = DedupWindow(60, 100, clock)
    for k, age in pairs:
        reloaded.add_aged(k, age)
    assert reloaded.contains(key(1)) and reloaded.contains(key(2))
    assert not reloaded.contains(key(3))
    # key(1) had ~30 s left, plus up to two generations' width (its generation's age,
    # and the window's own rounding); key(2) a whole window.
    clock.advance(30.0 + 2 * 60 / GENERATIONS)
    assert not reloaded.contains(key(1)) and reloaded.contains(key(2))


# add_aged_many: the bulk reload a start does (issue 13), one call per chunk of keys.


def per_key_and_bulk(clock: FakeClock, window_s: float, max_keys: int,
                     pairs: list[tuple[bytes, float]], chunk: int = 0,
                     ) -> tuple[DedupWindow, DedupWindow]:
    """Two windows loaded with the same (key, wall time added) pairs: one by add_aged per
    key (the reference), one by add_aged_many (in chunks of `chunk`, 0: one call)."""
    now = clock.wall()
    one, bulk = DedupWindow(window_s, max_keys, clock), DedupWindow(window_s, max_keys, clock)
    for k, added_at in pairs:
        one.add_aged(k, now - added_at)
    step = chunk or len(pairs) or 1
    for i in range(0, len(pairs), step):
        bulk.add_aged_many(pairs[i:i + step], now)
    return one, bulk


def assert_same_answers(clock: FakeClock, one: DedupWindow, bulk: DedupWindow,
                        keys: list[bytes], until_s: float) -> None:
    """contains() and len() agree for every key, now and at every step until until_s."""
    elapsed = 0.0
    while True:
        assert [one.contains(k) for k in keys] == [bulk.contains(k) for k in keys], elapsed
        assert len(one) == len(bulk), elapsed
        if elapsed >= until_s:
            return
        clock.advance(0.25)
        elapsed += 0.25


def aged_pairs(clock: FakeClock, ages: list[float]) -> list[tuple[bytes, float]]:
    now = clock.wall()
    return [(key(n), now - age) for n, age in enumerate(ages)]


def test_a_bulk_load_expires_each_key_as_add_aged_does(clock):
    """Ages spread over the whole window and past it, oldest first, plus keys stamped
    by a clock that was ahead (negative age): each is forgotten at the same instant."""
    ages = [61.0, 60.0, 59.9] + [60 - i * 0.37 for i in range(1, 160)] + [-5.0, -0.1]
    pairs = aged_pairs(clock, ages)
    one, bulk = per_key_and_bulk(clock, 60, 1000, pairs)
    assert not bulk.contains(key(0)) and not bulk.contains(key(1))  # window passed
    assert bulk.contains(key(2)) and bulk.contains(key(len(ages) - 1))
    assert_same_answers(clock, one, bulk, [k for k, _ in pairs], until_s=62.0)
    assert len(bulk) == 0


def test_a_bulk_load_past_max_keys_keeps_the_newest_keys(clock):
    pairs = aged_pairs(clock, [50 - i * 0.1 for i in range(300)])
    one, bulk = per_key_and_bulk(clock, 60, 100, pairs)
    assert len(bulk) == 100
    assert [bulk.contains(k) for k, _ in pairs] == [False] * 200 + [True] * 100
    assert_same_answers(clock, one, bulk, [k for k, _ in pairs], until_s=12.0)


def test_a_bulk_load_in_chunks_answers_as_one_call_and_as_add_aged(clock):
    """The disk queue hands keys over in chunks: the later chunks join the generation
    the earlier ones left open, and the count bound holds across them."""
    pairs = aged_pairs(clock, [59 - i * 0.05 for i in range(1000)])
    one, chunked = per_key_and_bulk(clock, 60, 700, pairs, chunk=64)
    _, whole = per_key_and_bulk(clock, 60, 700, pairs)
    keys = [k for k, _ in pairs]
    assert [chunked.contains(k) for k in keys] == [whole.contains(k) for k in keys]
    assert_same_answers(clock, one, chunked, keys, until_s=60.0)


def test_keys_repeated_or_already_held_count_once_as_with_add_aged(clock):
    """A key twice in the input, or already in the window (the window held it before the
    load): remembered once, from its newest time, as add_aged's forget-then-add does."""
    pairs = aged_pairs(clock, [50.0, 40.0, 30.0])
    pairs += [(key(0), clock.wall() - 10.0), (key(1), clock.wall() - 5.0)]
    one, bulk = per_key_and_bulk(clock, 60, 3, pairs)
    assert len(bulk) == 3
    bulk.add_aged_many([(key(2), clock.wall())], clock.wall())  # already held: restarts
    one.add_aged(key(2), 0.0)
    assert_same_answers(clock, one, bulk, [key(n) for n in range(3)], until_s=61.0)


def test_a_bulk_loaded_key_can_be_forgotten_and_added_again(clock):
    """The intake forgets a refused event's key and a dead letter's key: keys from a bulk
    load must be forgettable like any other."""
    window = DedupWindow(60, 100, clock)
    window.add_aged_many(aged_pairs(clock, [30.0, 20.0, 10.0]), clock.wall())
    window.forget(key(1))
    assert not window.contains(key(1)) and window.contains(key(0)) and len(window) == 2
    assert window.add_if_absent(key(1)) and not window.add_if_absent(key(2))
    clock.advance(51.0 + 60 / GENERATIONS)
    assert window.contains(key(1)) and not window.contains(key(2))


def test_a_bulk_load_then_many_forgets_stays_bounded(clock):
    """forget() counts stale entries in the bulk-built generations and compacts them, as
    in windows built key by key."""
    window = DedupWindow(60, 10_000, clock)
    window.add_aged_many(aged_pairs(clock, [30.0] * 5000), clock.wall())
    for n in range(4990):
        window.forget(key(n))
    assert len(window) == 10
    assert sum(len(g.keys) - g.cursor for g in window._gens) < 200


def test_a_bulk_load_of_one_key_again_and_again_holds_no_more_memory(clock):
    """Each repeat leaves a stale entry that is counted, so the arrays get compacted."""
    window = DedupWindow(60, 10_000, clock)
    now = clock.wall()
    window.add_aged_many([(key(n % 10), now - 30.0) for n in range(10_000)], now)
    assert len(window) == 10
    assert sum(len(g.keys) - g.cursor for g in window._gens) < 200
