"""Shared-memory rings kept between sessions of the same two workers.

A ring costs its session more than its steps do: the ControlNet worker reserves and maps it, the
UNet worker maps it, both fault its pages in and, with GPU tensors, page-lock them (215 MB for an
SDXL ring of two fp16 slots). So a session that ends cleanly keeps its ring on both sides, idle:

1. the UNet worker, having got every step, says so in its last message (`StepInput.keep_ring`)
   and keeps the ring mapped here, under its name;
2. the ControlNet worker, having read that message, keeps the ring here too;
3. the UNet worker's next SessionStart lists its idle rings (`idle_rings`); the ControlNet worker
   offers one it also holds idle, if its slots and sample buffer fit the new session, under the
   same name, and the UNet worker takes its mapping back instead of opening the name.

A ring is in one session at a time on each side (`take` hands it out once), and the ControlNet
worker keeps it only after its session's last write, so the two never use one ring in two
sessions. Sequence numbers run on across sessions: a slot still holding an earlier session's step
is a torn read, never residuals. A session that fails, or whose peer dies, frees its ring as
before. Bounded: at most MAX_IDLE rings per process, each closed after IDLE_S seconds unused.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

MAX_IDLE = 4  # rings per process: a request's ControlNets (up to 2 per pair of workers), twice
IDLE_S = 60.0  # then closed: an idle worker does not hold their memory for good


class IdleRings:
    def __init__(self, max_idle: int = MAX_IDLE, idle_s: float = IDLE_S):
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._rings: OrderedDict[str, tuple[float, object]] = OrderedDict()  # by name, oldest first

    def put(self, ring) -> None:
        """Keep `ring` (its `name` unique) for a later session; the oldest goes beyond max_idle."""
        with self._lock:
            self._rings[ring.name] = (time.monotonic(), ring)
            self._rings.move_to_end(ring.name)
            gone = self._expired()
        _close(gone)
        timer = threading.Timer(self.idle_s + 0.05, self.expire)
        timer.daemon = True
        timer.start()

    def take(self, name: str):
        """The idle ring `name`, no longer idle; None if not here."""
        with self._lock:
            entry = self._rings.pop(name, None)
        return None if entry is None else entry[1]

    def take_first(self, names: Iterable[str], fits: Callable[[object], bool]):
        """The first of `names` held idle here for which `fits(ring)`, no longer idle; or None."""
        with self._lock:
            for name in names:
                entry = self._rings.get(name)
                if entry is not None and fits(entry[1]):
                    del self._rings[name]
                    return entry[1]
        return None

    def names(self) -> list[str]:
        with self._lock:
            gone = self._expired()
            names = list(self._rings)
        _close(gone)
        return names

    def expire(self) -> None:
        """Close the rings idle for longer than idle_s."""
        with self._lock:
            gone = self._expired()
        _close(gone)

    def clear(self) -> None:
        with self._lock:
            gone = [ring for _, ring in self._rings.values()]
            self._rings.clear()
        _close(gone)

    def __len__(self) -> int:
        return len(self._rings)

    def _expired(self) -> list:
        now, gone = time.monotonic(), []
        for name, (since, ring) in list(self._rings.items()):
            if now - since > self.idle_s or len(self._rings) > self.max_idle:
                del self._rings[name]
                gone.append(ring)
        return gone


def _close(rings: list) -> None:
    for ring in rings:  # outside the lock: unmapping (and unpinning) takes a while
        ring.close()
