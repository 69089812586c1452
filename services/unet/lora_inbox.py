"""LoRA deltas arriving at a UNet worker, and what a request waits on.

Deltas reach the worker as LoraDeltaChunk streams: pushed by the LoRA store
(`ReceiveLoraDeltas`), pulled from it (`StreamDeltas`) by a background thread, or — with no store
configured — prepared locally from the worker's own model root. Either way they land in the
inbox, keyed by (lora_id, scale) since the store folds the scale in. A request gets a
`LoraFetch` over its entries and denoises while they fill; the engine applies text-encoder deltas
before text encoding and UNet deltas at a step boundary (bounded asynchronous loading).

Chunks come in forward order, text-encoder deltas first, then the UNet's (the wire contract in
protos/swiftd/v1/lora_store.proto): a LoRA's text-encoder part is complete as soon as its first
UNet delta (or its last chunk) arrives, and a text-encoder delta after that is refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import grpc
import torch

from swiftd import codec, metrics, rpc, tracing
from swiftd.errors import Cancelled, DeadlineExceeded, InvalidArgument, ServingError, Unavailable, from_rpc_error
from swiftd.lora import LoraDeltas, delta_from_proto
from swiftd.request import Lora, LoraKey, LoraSet, LoraSetKey
from swiftd.v1 import lora_store_pb2, lora_store_pb2_grpc

log = logging.getLogger(__name__)

UNET_PREFIX = "unet."


class InboxEntry:
    def __init__(self, key: LoraKey):
        self.key = key
        self.deltas: LoraDeltas = {}
        self.nbytes = 0
        self.complete = False
        self.text_encoder_done = False
        self.error: ServingError | None = None
        # A pushed entry is kept (not evicted) until its request fetches it, or this time passes.
        self.pinned_until = 0.0
        self.changed = threading.Condition()

    def add(self, deltas: Iterable[tuple[str, object]], last: bool) -> None:
        with self.changed:
            if self.complete:  # the same (lora_id, scale) pushed again: same deltas, nothing to do
                return
            for name, delta in deltas:
                if self.text_encoder_done and not name.startswith(UNET_PREFIX):
                    # The wire contract (lora_store.proto): text encoding may already have used
                    # this LoRA's text-encoder part; a late delta would be silently missed.
                    raise InvalidArgument(
                        "deltas", f"lora {self.key[0]!r}: text-encoder delta {name!r} after its UNet deltas"
                    )
                if name in self.deltas:
                    self.nbytes -= self.deltas[name].nbytes
                self.deltas[name] = delta
                self.nbytes += delta.nbytes
                if name.startswith(UNET_PREFIX):
                    self.text_encoder_done = True
            if last:
                self.complete = self.text_encoder_done = True
            self.changed.notify_all()

    def snapshot(self) -> list[tuple[str, object]]:
        """The deltas received so far (safe while more arrive)."""
        with self.changed:
            return list(self.deltas.items())

    def fail(self, error: ServingError) -> None:
        with self.changed:
            if not self.complete:
                self.error = error
            self.changed.notify_all()

    def wait(self, done: Callable[[], bool], timeout: float, should_stop: Callable[[], bool] | None) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not done():
                if self.error is not None:
                    raise self.error
                if should_stop is not None and should_stop():
                    raise Cancelled(f"request cancelled while waiting for lora {self.key[0]!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(f"lora {self.key[0]!r}: deltas not complete after {timeout:.0f} s")
                self.changed.wait(min(remaining, 0.1))
            if self.error is not None and not self.complete:
                raise self.error


class LoraFetch:
    """The LoRA set of one request, possibly still arriving."""

    def __init__(self, entries: list[InboxEntry], timeout: float, should_stop: Callable[[], bool] | None = None):
        self.entries = entries
        self.timeout = timeout
        self.should_stop = should_stop

    @property
    def key(self) -> LoraSetKey:
        return tuple(e.key for e in self.entries)

    def is_complete(self) -> bool:
        return all(e.complete for e in self.entries)

    def text_encoder_deltas(self) -> list[tuple[str, LoraDeltas]]:
        """Waits until every LoRA's text-encoder part is in; returns those parts."""
        parts = []
        for entry in self.entries:
            entry.wait(lambda e=entry: e.text_encoder_done, self.timeout, self.should_stop)
            parts.append((entry.key[0], {n: d for n, d in entry.snapshot() if not n.startswith(UNET_PREFIX)}))
        return parts

    def unet_deltas(self) -> list[tuple[str, LoraDeltas]]:
        """Waits until every LoRA is complete; returns the UNet parts."""
        parts = []
        for entry in self.entries:
            entry.wait(lambda e=entry: e.complete, self.timeout, self.should_stop)
            parts.append((entry.key[0], {n: d for n, d in entry.snapshot() if n.startswith(UNET_PREFIX)}))
        return parts


class LoraInbox:
    """Received deltas by (lora_id, scale); complete entries kept LRU under a byte budget."""

    def __init__(
        self,
        budget_bytes: int,
        dtype: torch.dtype,
        base_model_id: str,
        prepare_local: Callable[[str, float], LoraDeltas] | None = None,
        default_store: str = "",
        wait_timeout: float = 120.0,
    ):
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.base_model_id = base_model_id
        self.prepare_local = prepare_local
        self.default_store = default_store
        self.wait_timeout = wait_timeout
        self._entries: OrderedDict[LoraKey, InboxEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._channels = rpc.ChannelPool()

    # -- arrival -----------------------------------------------------------------------------

    def _entry(self, key: LoraKey, create: bool = True) -> InboxEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.error is not None:
                del self._entries[key]  # a failed transfer may be retried
                entry = None
            if entry is None and create:
                entry = self._entries[key] = InboxEntry(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, lora_id: str, scale: float, deltas: Iterable[tuple[str, object]], last: bool) -> None:
        """Accept ready deltas (scale folded in) from elsewhere in this process, in forward order."""
        self._entry(Lora(lora_id, scale).key).add(deltas, last)
        if last:
            self._evict()

    def receive(self, chunks: Iterable[lora_store_pb2.LoraDeltaChunk]) -> tuple[list[str], int, int]:
        """Consume a chunk stream. Returns (completed lora ids, parameters, bytes)."""
        completed, parameters, nbytes = [], 0, 0
        current: InboxEntry | None = None
        try:
            for chunk in chunks:
                key = Lora(chunk.lora_id, chunk.scale).key
                if current is None or current.key != key:
                    current = self._entry(key)
                    current.pinned_until = time.monotonic() + self.wait_timeout
                try:
                    deltas = [delta_from_proto(d) for d in chunk.deltas]
                except ValueError as exc:
                    raise InvalidArgument("deltas", str(exc)) from None
                deltas = [(n, _cast(d, self.dtype)) for n, d in deltas]
                current.add(deltas, chunk.last)
                parameters += len(deltas)
                chunk_bytes = sum(d.nbytes for _, d in deltas)
                metrics.LORA_BYTES.labels("received").inc(chunk_bytes)
                nbytes += chunk_bytes
                if chunk.last:
                    completed.append(chunk.lora_id)
                    current = None
        except BaseException as exc:
            if current is not None and not current.complete:
                current.fail(
                    exc
                    if isinstance(exc, ServingError)
                    else Unavailable(f"lora {current.key[0]!r}: transfer broke off: {exc}")
                )
            raise
        finally:
            self._evict()
        return completed, parameters, nbytes

    def _pull(self, store: str, loras: LoraSet, request_id: str) -> None:
        """Background: stream the deltas of `loras` from a LoRA store into the inbox."""
        channel = self._channels.get(store)
        request = lora_store_pb2.StreamDeltasRequest(
            loras=loras.to_pb(),
            base_model_id=self.base_model_id,
            dtype=codec.dtype_to_proto(self.dtype),
            request_id=request_id,
        )
        try:
            self.receive(lora_store_pb2_grpc.LoraStoreStub(channel).StreamDeltas(request, timeout=self.wait_timeout))
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, f"lora store {store}")
            for lora in loras:
                entry = self._entry(lora.key, create=False)
                if entry is not None:
                    entry.fail(error)
        except Exception:  # noqa: BLE001 - already recorded on the entry by receive()
            log.exception("pulling lora deltas from %s failed", store)

    # -- requests ----------------------------------------------------------------------------

    def fetch(
        self,
        loras: LoraSet,
        request_id: str,
        store: str = "",
        should_stop: Callable[[], bool] | None = None,
        pushed: Iterable[str] = (),
    ) -> LoraFetch:
        """Entries for a request's LoRAs; missing ones are pulled or prepared (not waited for).

        LoRA ids in `pushed` are on their way from the store (the gateway started the push): the
        request waits for those, bounded by wait_timeout, and does not fetch them a second time.
        """
        loras = LoraSet.of(loras)
        store = store or self.default_store
        pushed = set(pushed)
        present = {lora.key: self._entry(lora.key, create=False) for lora in loras}
        missing = LoraSet(tuple(lora for lora in loras if lora.lora_id not in pushed and present[lora.key] is None))
        # A hit: the deltas were here, complete, before the request asked (pushed ones are misses).
        hits = sum(1 for entry in present.values() if entry is not None and entry.complete)
        metrics.LORA_LOOKUPS.labels("worker", "hit").inc(hits)
        metrics.LORA_LOOKUPS.labels("worker", "miss").inc(len(loras) - hits)
        entries = [self._entry(lora.key) for lora in loras]
        for entry in entries:
            entry.pinned_until = 0.0  # fetched: evictable once this request is done with it
        if missing:
            if store:
                tracing.in_current_context(self._pull, store, missing, request_id).start()
            elif self.prepare_local is not None:
                for lora in missing:  # synchronous: raises NotFound/FailedPrecondition before anything changed
                    try:
                        deltas = self.prepare_local(lora.lora_id, lora.scale)
                    except ServingError as exc:
                        self._entry(lora.key).fail(exc)
                        raise
                    self._entry(lora.key).add(deltas.items(), last=True)
                self._evict()
            # else: nowhere to get them from but a push (ReceiveLoraDeltas); wait, bounded by wait_timeout
        return LoraFetch(entries, self.wait_timeout, should_stop)

    def cached(self) -> list[LoraKey]:
        """Keys of the complete entries, ready to patch without a transfer."""
        with self._lock:
            return [key for key, entry in self._entries.items() if entry.complete]

    def _evict(self) -> None:
        now = time.monotonic()
        with self._lock:
            total = sum(e.nbytes for e in self._entries.values())
            for key in list(self._entries):
                if total <= self.budget_bytes or len(self._entries) <= 1:
                    break
                entry = self._entries[key]
                # A request holding it keeps its own reference; one pushed for a request that has
                # not fetched it yet stays, or that request would wait for it in vain.
                if entry.complete and entry.pinned_until <= now:
                    del self._entries[key]
                    total -= entry.nbytes


def _cast(delta, dtype: torch.dtype):
    if delta.up.dtype == dtype and (delta.down is None or delta.down.dtype == dtype):
        return delta
    return type(delta)(delta.up.to(dtype), None if delta.down is None else delta.down.to(dtype))
