"""KeyLocks: ABORTED instead of waiting, all keys or none, shared readers."""

from __future__ import annotations

import threading

import pytest

from csi_kit._core.locks import KeyLocks
from csi_kit.errors import Aborted


def test_second_exclusive_holder_is_aborted_naming_the_key() -> None:
    locks = KeyLocks()
    held = locks.acquire(["volume:a"])
    with pytest.raises(Aborted, match="volume:a"):
        locks.acquire(["volume:a"])
    locks.release(held)
    locks.release(locks.acquire(["volume:a"]))
    assert locks.busy() == 0


def test_other_keys_are_independent() -> None:
    locks = KeyLocks()
    a = locks.acquire(["volume:a"])
    b = locks.acquire(["volume:b"])
    assert locks.busy() == 2
    locks.release(a)
    locks.release(b)
    assert locks.busy() == 0


def test_all_keys_or_none() -> None:
    locks = KeyLocks()
    busy = locks.acquire(["volume:b"])
    with pytest.raises(Aborted, match="volume:b"):
        locks.acquire(["volume:a", "volume:b"])
    # The failed attempt took nothing: "a" is still free.
    locks.release(locks.acquire(["volume:a"]))
    with pytest.raises(Aborted):
        locks.acquire(["name:x"], shared=["volume:b"])
    locks.release(locks.acquire(["name:x"]))
    locks.release(busy)
    assert locks.busy() == 0


def test_readers_share_and_writers_wait_for_all_of_them() -> None:
    locks = KeyLocks()
    r1 = locks.acquire(shared=["volume:a"])
    r2 = locks.acquire(shared=["volume:a"])
    with pytest.raises(Aborted):
        locks.acquire(["volume:a"])
    locks.release(r1)
    with pytest.raises(Aborted):
        locks.acquire(["volume:a"])  # one reader is left
    locks.release(r2)
    writer = locks.acquire(["volume:a"])
    with pytest.raises(Aborted):
        locks.acquire(shared=["volume:a"])
    locks.release(writer)
    assert locks.busy() == 0


def test_a_key_asked_for_both_ways_is_held_exclusively_once() -> None:
    locks = KeyLocks()
    held = locks.acquire(["k", "k"], shared=["k"])
    assert held.exclusive == ("k",) and held.shared == ()
    with pytest.raises(Aborted):
        locks.acquire(shared=["k"])
    locks.release(held)
    assert locks.busy() == 0


def test_at_most_one_thread_holds_a_key() -> None:
    locks = KeyLocks()
    holders = 0
    most = 0
    wins = 0
    count = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        nonlocal holders, most, wins
        start.wait()
        for _ in range(2000):
            try:
                held = locks.acquire(["hot"])
            except Aborted:
                continue
            with count:
                holders += 1
                wins += 1
                most = max(most, holders)
            with count:
                holders -= 1
            locks.release(held)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    assert wins > 0
    assert locks.busy() == 0
