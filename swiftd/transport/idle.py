"""Shared-memory rings kept between sessions of the same two workers.

A ring costs its session more than its steps do: the ControlNet worker reserves and maps it, the
UNet worker maps it, both fault its pages in and, with GPU tensors, page-lock them (215 MB for an
SDXL ring of two fp16 slots). So a session that ends cleanly keeps its ring on both sides, idle:

1. the UNet worker, every step it sent answered, ends the session with `StepInput.keep_ring` on
   the step socket (only to a ring its writer offered as `keepable`);
2. the ControlNet worker keeps the ring here, after its session's last write, and answers
   `ring_kept`; only then does the UNet worker keep its mapping here, under the worker's address;
3. the UNet worker's next session with that worker sets those rings aside and lists them
   (`SessionStart.idle_rings`); the ControlNet worker offers one it also holds idle, if its slots
   and sample buffer fit, under the same name, and names those it no longer holds (`not_kept`):
   the UNet worker takes the offered one's mapping back, lets go of those, and returns the rest.

A ring is in one session at a time on each side (handed out once, under a lock), so the two never
use one ring in two sessions. Sequence numbers run on across sessions: a slot still holding an
earlier session's step is a torn read, never residuals. A session that fails, or whose peer dies,
frees its ring as before. Bounded: at most MAX_IDLE rings per process, each closed after IDLE_S
seconds unused; idle rings count against /dev/shm (a writer that finds it full lets go of its
own and tries again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

MAX_IDLE = 4  # rings per process: a request's ControlNets (up to 2 per pair of workers), twice
IDLE_S = 60.0  # then closed: an idle worker does not hold their memory for good


class IdleRings:
    def __init__(self, max_idle: int = MAX_IDLE, idle_s: float = IDLE_S):
        self.max_idle = max_idle
        self.idle_s = idle_s
        self._lock = threading.Lock()
        # By name, oldest first: (idle since, whose: the peer's address on the UNet worker, ring).
        self._rings: OrderedDict[str, tuple[float, str, object]] = OrderedDict()
        self._sweeper: threading.Thread | None = None  # closes expired rings while any is idle

    def put(self, ring, whose: str = "") -> None:
        """Keep `ring` (its `name` unique) for a later session; the oldest goes beyond max_idle."""
        with self._lock:
            self._rings[ring.name] = (time.monotonic(), whose, ring)
            self._rings.move_to_end(ring.name)
            gone = self._expired()
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep, name="idle-rings", daemon=True)
                self._sweeper.start()
        _close(gone)

    def take_all(self, whose: str, limit: int | None = None) -> list:
        """The idle rings kept for `whose`, newest first, at most `limit` of them, no longer idle
        (a session sets them aside)."""
        with self._lock:
            names = [name for name, (_, owner, _) in reversed(self._rings.items()) if owner == whose]
            return [self._rings.pop(name)[2] for name in names[:limit]]

    def take_first(self, names: Iterable[str], fits: Callable[[object], bool]):
        """The first of `names` held idle here for which `fits(ring)`, no longer idle; or None."""
        with self._lock:
            for name in names:
                entry = self._rings.get(name)
                if entry is not None and fits(entry[2]):
                    del self._rings[name]
                    return entry[2]
        return None

    def take(self, name: str):
        """The idle ring `name`, no longer idle; None if not here."""
        with self._lock:
            entry = self._rings.pop(name, None)
        return None if entry is None else entry[2]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._rings)

    def clear(self) -> None:
        with self._lock:
            gone = [ring for _, _, ring in self._rings.values()]
            self._rings.clear()
        _close(gone)

    def __len__(self) -> int:
        return len(self._rings)

    def _sweep(self) -> None:
        """Close each ring once it has been idle for idle_s, whether or not anyone asks; ends
        when no ring is idle (the next `put` starts another)."""
        while True:
            with self._lock:
                gone = self._expired()
                if not self._rings:
                    self._sweeper = None
                    oldest = None
                else:
                    oldest = next(iter(self._rings.values()))[0]
            _close(gone)
            if oldest is None:
                return
            time.sleep(max(0.01, oldest + self.idle_s - time.monotonic() + 0.01))

    def _expired(self) -> list:
        now, gone = time.monotonic(), []
        for name, (since, _, ring) in list(self._rings.items()):
            if now - since > self.idle_s or len(self._rings) > self.max_idle:
                del self._rings[name]
                gone.append(ring)
        return gone


def _close(rings: list) -> None:
    for ring in rings:  # outside the lock: unmapping (and unpinning) takes a while
        try:
            ring.close()
        except Exception:  # noqa: BLE001 - one ring that fails to close must not keep the rest
            log.exception("closing an idle residual ring failed")
