"""The gateway's placement rules and admission queue, on their own (no processes)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from services.gateway.admission import AdmissionQueue
from services.gateway.planner import UNetWorkerState, assign_controlnets, choose_unet_worker
from swiftd.errors import Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from swiftd.request import LoraSet

A = LoraSet.of([("papercut", 0.8)]).key
B = LoraSet.of([("watercolor", 1.0), ("papercut", 0.5)]).key


def worker(name, load=0, applied=(), cached=()):
    return UNetWorkerState(name, ["sd15"], tuple(applied), set(cached), load)


def test_affinity_first_while_it_has_a_free_slot_then_least_loaded():
    pick = lambda workers, want=A, slots=1: choose_unet_worker(workers, want, slots)  # noqa: E731
    # A free slot: the worker with the set applied wins, and says so.
    assert pick([worker("w0"), worker("w1", applied=A)]) == (worker("w1", applied=A), True)
    # Busy: the request does not wait for it while another worker is free.
    assert pick([worker("w0"), worker("w1", load=1, applied=A)]) == (worker("w0"), False)
    assert pick([worker("w0", load=1), worker("w1", load=1, applied=A)], slots=2)[0].address == "w1"
    # Everyone busy: least loaded, affinity only among equals.
    assert pick([worker("w0", load=1), worker("w1", load=2, applied=A)]) == (worker("w0", load=1), False)
    assert pick([worker("w0", load=1), worker("w1", load=1, applied=A)]) == (worker("w1", load=1, applied=A), True)
    # Same ids with another scale is another set.
    other_scale = LoraSet.of([("papercut", 0.7)]).key
    assert pick([worker("w0", load=0), worker("w1", applied=other_scale)], want=A)[0].address == "w0"


def test_ties_prefer_held_deltas_then_a_worker_without_another_set():
    # Nobody has B applied: the worker holding its deltas saves the transfer.
    held = worker("w1", cached=set(B))
    assert choose_unet_worker([worker("w0"), held], B, 1) == (held, False)
    # Then a pristine worker over one whose set other requests may want again.
    assert choose_unet_worker([worker("w0", applied=A), worker("w1")], B, 1)[0].address == "w1"
    # Requests without LoRAs: least loaded, then first listed.
    assert (
        choose_unet_worker([worker("w0", load=2), worker("w1", load=1), worker("w2", load=1)], (), 1)[0].address == "w1"
    )


def test_controlnets_spread_one_per_worker_preferring_loaded():
    hosts = {"edges": ["c0", "c1"], "depth": ["c0", "c1"], "pose": ["c1"]}
    loaded = {"c0": {"edges"}, "c1": {"depth"}}
    assert assign_controlnets(["edges", "depth"], hosts, loaded, Counter()) == ["c0", "c1"]
    assert assign_controlnets(["depth", "edges"], hosts, loaded, Counter()) == ["c1", "c0"]
    # More ControlNets than workers: they share, still balanced.
    assert Counter(assign_controlnets(["edges", "depth", "edges", "depth"], hosts, loaded, Counter())) == {
        "c0": 2,
        "c1": 2,
    }
    # Load from other requests breaks ties among equals.
    assert assign_controlnets(["edges"], {"edges": ["c0", "c1"]}, {}, Counter({"c0": 3})) == ["c1"]
    with pytest.raises(Unavailable, match="canny"):
        assign_controlnets(["canny"], hosts, loaded, Counter())


def test_admission_runs_capacity_then_queues_in_order():
    queue = AdmissionQueue(capacity=1, max_queue=2)
    assert list(queue.wait_turn(lambda: True, time.monotonic() + 5)) == []  # admitted at once
    seen: dict[str, list[int]] = {"a": [], "b": []}
    order = []

    def waiter(name):
        for position in queue.wait_turn(lambda: True, time.monotonic() + 10):
            seen[name].append(position)
        order.append(name)

    def until(condition):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    threads = [threading.Thread(target=waiter, args=(n,)) for n in ("a", "b")]
    threads[0].start()
    until(lambda: queue.snapshot() == (1, 1))
    threads[1].start()
    until(lambda: queue.snapshot() == (1, 2))
    with pytest.raises(ResourceExhausted, match="queue full"):
        list(queue.wait_turn(lambda: True, time.monotonic() + 5))
    queue.release()  # the first request ends: a starts, b moves up
    until(lambda: order == ["a"] and seen["b"] == [1, 0])
    queue.release()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert order == ["a", "b"]
    assert seen == {"a": [0], "b": [1, 0]}
    assert queue.snapshot() == (1, 0)


def test_admission_cancel_and_deadline_leave_the_queue():
    queue = AdmissionQueue(capacity=1, max_queue=4)
    list(queue.wait_turn(lambda: True, time.monotonic() + 5))
    with pytest.raises(DeadlineExceeded):
        list(queue.wait_turn(lambda: True, time.monotonic() + 0.3))
    active = [True]
    with pytest.raises(Cancelled):
        for _ in queue.wait_turn(lambda: active[0], time.monotonic() + 5):
            active[0] = False
    assert queue.snapshot() == (1, 0)  # nobody left behind in the queue
