"""What the suite can serve, from the workers' own listings, refreshed every few seconds.

The gateway holds no weights and reads no model folders: base models come from the UNet workers'
ListModels, LoRAs from the LoRA store's ListLoras, ControlNets from the ControlNet workers'
ListControlNets (and the ControlNets each UNet worker can run in-process, from its ListModels).
The workers' devices come with them: ControlNet workers' here, UNet workers' with their status at
plan time. An unknown id forces one refresh before it is reported NOT_FOUND (at most one a
second), so a model or LoRA added a moment ago is found. Refreshes run one at a time, outside any
lock requests wait on: meanwhile requests use the listing they have. Each refresh resolves the
workers' DNS names again (discovery.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from swiftd import rpc, tracing
from swiftd.device import Device
from swiftd.discovery import WorkerTargets
from swiftd.v1 import (
    common_pb2,
    controlnet_pb2,
    controlnet_pb2_grpc,
    lora_store_pb2,
    lora_store_pb2_grpc,
    unet_pb2,
    unet_pb2_grpc,
)

log = logging.getLogger(__name__)
MIN_FORCED_REFRESH_INTERVAL = 1.0  # seconds: unknown ids cannot make the gateway hammer the workers


@dataclass
class Listing:
    models: dict[str, common_pb2.ModelInfo] = field(default_factory=dict)  # workers filled in
    loras: dict[str, common_pb2.LoraInfo] = field(default_factory=dict)
    # ControlNet id -> its info (workers: the ControlNet workers that have it loaded) and every
    # ControlNet worker that can serve it. Ids only UNet workers can run (in-process) are listed too.
    controlnets: dict[str, common_pb2.ControlNetInfo] = field(default_factory=dict)
    controlnet_hosts: dict[str, list[str]] = field(default_factory=dict)
    controlnet_devices: dict[str, Device] = field(default_factory=dict)  # ControlNet worker -> its device
    local_controlnets: dict[str, set[str]] = field(default_factory=dict)  # UNet worker -> in-process ids
    # Which tables may be missing entries because a source did not answer ("models", "loras",
    # "controlnets"): an id missing from one of those is UNAVAILABLE, not NOT_FOUND.
    incomplete: set[str] = field(default_factory=set)
    fetched_at: float = 0.0


class Catalog:
    def __init__(
        self,
        channels: rpc.ChannelPool,
        unet_workers: WorkerTargets,
        controlnet_workers: WorkerTargets,
        lora_store: str,
        ttl: float,
        call_timeout: float,
    ):
        self._channels = channels
        self._unet_workers = unet_workers
        self._controlnet_workers = controlnet_workers
        self.lora_store = lora_store
        self._ttl = ttl
        self._timeout = call_timeout
        self._listing = Listing()
        self._refresh_lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="catalog")

    def get(self, force: bool = False) -> Listing:
        """The current listing; refreshed when older than the TTL, or when `force`d (an unknown id)."""
        listing = self._listing
        age = time.monotonic() - listing.fetched_at
        if age < self._ttl and not (force and age > MIN_FORCED_REFRESH_INTERVAL):
            return listing
        # One refresh at a time. A stale listing serves meanwhile; a forced or first one waits.
        if self._refresh_lock.acquire(blocking=force or not listing.fetched_at):
            try:
                if self._listing is listing:  # nobody refreshed it while this request waited
                    self._listing = self._fetch()
            finally:
                self._refresh_lock.release()
        return self._listing

    def _fetch(self) -> Listing:
        listing = Listing(fetched_at=time.monotonic())
        submit = tracing.submitter(self._pool)  # the calls belong to the trace of the request that refreshes
        unet_workers, controlnet_workers = self._unet_workers.refresh(), self._controlnet_workers.refresh()
        self._channels.retain([*unet_workers, *controlnet_workers, self.lora_store])
        unet = {
            a: submit(self._call, unet_pb2_grpc.UNetWorkerStub, "ListModels", a, unet_pb2.UNetWorkerListModelsRequest())
            for a in unet_workers
        }
        cn = {
            a: submit(
                self._call,
                controlnet_pb2_grpc.ControlNetWorkerStub,
                "ListControlNets",
                a,
                controlnet_pb2.ControlNetWorkerListControlNetsRequest(),
            )
            for a in controlnet_workers
        }
        store = (
            submit(
                self._call,
                lora_store_pb2_grpc.LoraStoreStub,
                "ListLoras",
                self.lora_store,
                lora_store_pb2.LoraStoreListLorasRequest(),
            )
            if self.lora_store
            else None
        )
        for address, future in unet.items():
            if (response := future.result()) is None:
                listing.incomplete.add("models")
                continue
            for model in response.models:
                entry = listing.models.setdefault(model.model_id, common_pb2.ModelInfo())
                if not entry.model_id:
                    entry.CopyFrom(model)
                    del entry.workers[:]
                entry.workers.append(address)
            listing.local_controlnets[address] = {info.controlnet_id for info in response.controlnets}
            for info in response.controlnets:
                entry = listing.controlnets.setdefault(info.controlnet_id, common_pb2.ControlNetInfo())
                entry.controlnet_id = info.controlnet_id
                entry.family = entry.family or info.family
        for address, future in cn.items():
            if (response := future.result()) is None:
                listing.incomplete.add("controlnets")
                continue
            listing.controlnet_devices[address] = Device.of(
                response.host, response.device, address, response.host_identity
            )
            for info in response.controlnets:
                entry = listing.controlnets.setdefault(info.controlnet_id, common_pb2.ControlNetInfo())
                entry.controlnet_id = info.controlnet_id
                entry.family = entry.family or info.family
                entry.size_bytes = max(entry.size_bytes, info.size_bytes)
                if info.loaded:
                    entry.loaded = True
                    entry.workers.append(address)
                entry.compiled = entry.compiled or info.compiled
                entry.transports.extend(t for t in info.transports if t not in entry.transports)
                listing.controlnet_hosts.setdefault(info.controlnet_id, []).append(address)
        if store is not None:
            if (response := store.result()) is not None:
                listing.loras = {info.lora_id: info for info in response.loras}
            else:
                listing.incomplete.add("loras")
        return listing

    def _call(self, stub_class, method: str, address: str, request):
        try:
            return getattr(stub_class(self._channels.get(address)), method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            log.warning(
                "%s on %s failed: %s %s (left out of the catalog)", method, address, exc.code().name, exc.details()
            )
            return None
