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
from swiftd.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
    Unavailable,
    from_rpc_error,
)
from swiftd.lora import DeltaDigest, LoraDeltas, check_delta, delta_from_proto
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
        # Last chunk: a transfer idle too long is dropped. None until its first chunk: a request may
        # wait longer than that for a transfer to begin (bounded by its own wait_timeout).
        self.updated_at: float | None = None
        self.changed = threading.Condition()

    def add(self, deltas: Iterable[tuple[str, object]], last: bool) -> None:
        with self.changed:
            if self.complete:  # the same (lora_id, scale) pushed again: same deltas, nothing to do
                return
            if self.error is not None:  # dropped (stalled, over budget): the rest of its stream too
                raise self.error
            self.updated_at = time.monotonic()
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
    """Received deltas by (lora_id, scale), under a byte budget that counts transfers still under
    way: complete entries are evicted LRU; a transfer idle for `stall_timeout` is dropped; one that
    would still exceed the budget is refused (RESOURCE_EXHAUSTED) and its bytes let go."""

    def __init__(
        self,
        budget_bytes: int,
        dtype: torch.dtype,
        base_model_id: str,
        prepare_local: Callable[[str, float], LoraDeltas] | None = None,
        default_store: str = "",
        wait_timeout: float = 120.0,
        stall_timeout: float = 30.0,
    ):
        self.budget_bytes = budget_bytes
        self.stall_timeout = stall_timeout
        self.dtype = dtype
        self.base_model_id = base_model_id
        self.prepare_local = prepare_local
        self.default_store = default_store
        self.wait_timeout = wait_timeout
        self._entries: OrderedDict[LoraKey, InboxEntry] = OrderedDict()
        self._lock = threading.Lock()
        # Set by the pipeline (LoraPatcher.check): FailedPrecondition unless every delta names a
        # parameter of this model, with its shape.
        self.check_targets: Callable[[str, LoraDeltas], None] | None = None
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
        """Consume a chunk stream. Returns (completed lora ids, parameters, bytes).

        Nothing poisons the cache: every delta must name a parameter of this model with its shape,
        in this worker's dtype, finite; a LoRA completes only when the digest on its last chunk
        matches what arrived. Otherwise the transfer fails (INVALID_ARGUMENT) and is not kept.
        """
        completed, parameters, nbytes = [], 0, 0
        current: InboxEntry | None = None
        digest = DeltaDigest()
        try:
            for chunk in chunks:
                key = Lora(chunk.lora_id, chunk.scale).key
                if current is None or current.key != key:
                    current = self._entry(key)
                    current.pinned_until = time.monotonic() + self.wait_timeout
                    digest = DeltaDigest()
                deltas = self._checked(chunk)
                for entry in chunk.deltas:
                    digest.update(entry)
                if chunk.last and chunk.sha256 != digest.value():
                    raise InvalidArgument(
                        "sha256", f"lora {chunk.lora_id!r}: the deltas received do not match their digest"
                    )
                current.add(deltas, chunk.last)
                self._evict(receiving=current)  # raises when this transfer does not fit
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

    def _checked(self, chunk: lora_store_pb2.LoraDeltaChunk) -> list[tuple[str, object]]:
        try:
            deltas = [delta_from_proto(d) for d in chunk.deltas]
            for name, delta in deltas:
                check_delta(name, delta, self.dtype)
        except ValueError as exc:
            raise InvalidArgument("deltas", f"lora {chunk.lora_id!r}: {exc}") from None
        if self.check_targets is not None:
            try:
                self.check_targets(chunk.lora_id, dict(deltas))
            except FailedPrecondition as exc:
                raise InvalidArgument("deltas", exc.message) from None
        return deltas

    def _pull(self, store: str, loras: LoraSet, request_id: str) -> None:
        """Background: stream the deltas of `loras` from a LoRA store into the inbox."""
        channel = self._channels.get(store)
        request = lora_store_pb2.StreamDeltasRequest(
            loras=loras.to_pb(),
            base_model_id=self.base_model_id,
            dtype=codec.dtype_to_proto(self.dtype),
            request_id=request_id,
        )
        call = lora_store_pb2_grpc.LoraStoreStub(channel).StreamDeltas(request, timeout=self.wait_timeout)
        chunks = rpc.responses(call)
        try:
            self.receive(chunks)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, f"lora store {store}")
            for lora in loras:
                entry = self._entry(lora.key, create=False)
                if entry is not None:
                    entry.fail(error)
        except ServingError as error:  # refused here (digest, budget, bad delta): the whole set fails
            log.warning("pulling lora deltas from %s failed: %s", store, error.message)
            for lora in loras:
                entry = self._entry(lora.key, create=False)
                if entry is not None:
                    entry.fail(error)
        except Exception:  # noqa: BLE001 - recorded on the entry by receive()
            log.exception("pulling lora deltas from %s failed", store)
        finally:
            # The entries keep the error, and its traceback the stream: end the stream's reader
            # and the call now rather than at the call's deadline.
            chunks.close()
            call.cancel()

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

    def _evict(self, receiving: InboxEntry | None = None) -> None:
        """Hold the budget: drop stalled transfers, evict complete entries LRU, and refuse the
        transfer `receiving` belongs to if it still does not fit."""
        now = time.monotonic()
        dropped: list[tuple[InboxEntry, ServingError]] = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                started = entry.updated_at is not None
                if not entry.complete and started and now - entry.updated_at > self.stall_timeout:
                    del self._entries[key]
                    message = f"lora {key[0]!r}: no deltas for {self.stall_timeout:.0f} s; transfer dropped"
                    dropped.append((entry, Unavailable(message)))
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
            if receiving is not None and not receiving.complete and total > self.budget_bytes:
                if self._entries.get(receiving.key) is receiving:
                    del self._entries[receiving.key]
                message = (
                    f"lora {receiving.key[0]!r}: the deltas held and under way would exceed this worker's "
                    f"LoRA budget ({self.budget_bytes >> 20} MiB, --lora-cache-mib)"
                )
                dropped.append((receiving, ResourceExhausted(message)))
        for entry, error in dropped:
            log.warning("%s", error.message)
            entry.fail(error)
        if receiving is not None and receiving.error is not None:
            raise receiving.error
