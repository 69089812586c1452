"""Admission control: at most `capacity` requests run at once, at most `max_queue` wait (FIFO).

A full queue refuses at once (RESOURCE_EXHAUSTED) rather than letting latency grow without bound;
a waiting request leaves the queue when its caller cancels or its deadline passes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from swiftd.errors import Cancelled, DeadlineExceeded, ResourceExhausted


class AdmissionQueue:
    def __init__(self, capacity: int, max_queue: int):
        self.capacity = capacity
        self.max_queue = max_queue
        self._running = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    def wait_turn(self, is_active: Callable[[], bool], deadline: float) -> Iterator[int]:
        """Take a slot, waiting in line if need be. Yields the number of requests ahead each time
        it changes (0 = next; nothing when a slot is free at once) and returns once admitted; the
        caller must `release()` after. `deadline` is a time.monotonic() value."""
        ticket = object()
        with self._changed:
            if self._running < self.capacity and not self._waiting:
                self._running += 1
                return
            if len(self._waiting) >= self.max_queue:
                raise ResourceExhausted(f"queue full: {len(self._waiting)} requests waiting, {self._running} running")
            self._waiting.append(ticket)
        last = None
        try:
            while True:
                with self._changed:
                    position = self._waiting.index(ticket)
                    if position == 0 and self._running < self.capacity:
                        self._waiting.popleft()
                        self._running += 1
                        self._changed.notify_all()  # everyone behind moves up one place
                        return
                    if position == last:
                        self._changed.wait(0.1)
                if position != last:
                    last = position
                    yield position  # outside the lock: the caller may send it over the network
                if not is_active():
                    raise Cancelled("request cancelled while queued")
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded("deadline passed while queued")
        except BaseException:  # cancelled, expired, or the caller stopped iterating
            with self._changed:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._changed.notify_all()
            raise

    def resize(self, capacity: int) -> None:
        """Follow the number of workers (requests already running keep their slots)."""
        with self._changed:
            if capacity != self.capacity:
                self.capacity = capacity
                self._changed.notify_all()

    def release(self) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()

    def snapshot(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._changed:
            return self._running, len(self._waiting)
