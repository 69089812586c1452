"""Our side: the UNet worker service on one device (one core, one thread), driven over gRPC,
with each ControlNet of a request on a ControlNet worker of its own (on the other core: this
machine has two, so with two ControlNets both workers share it).

Latency is measured here, client-side, around the Denoise call. A LoRA scenario's timed request is
*cold* the way it matters for a server: the worker does not have that LoRA set applied when the
request arrives (an untimed no-LoRA request runs in between, so the weights are pristine again),
so it must patch the set in within the request. The per-LoRA preparation (`extract_deltas`) is
cached from the warm-up: preparing happens once per LoRA, off the critical path, by design.
"""

from __future__ import annotations

import tempfile
import time

from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT, SEED, BenchConfig, Scenario
from swiftd import rpc, transport
from swiftd.launcher import ServiceProcess, start_controlnet, start_lora_store, start_unet
from swiftd.request import ControlNet, Request
from swiftd.v1 import common_pb2, lora_store_pb2, lora_store_pb2_grpc, unet_pb2, unet_pb2_grpc

RESET_SIZE = 64  # the untimed "put the base weights back" request: tiny, one step, no CFG
MAX_CONTROLNETS = 2  # the most any scenario uses: one worker each


class OursWorker:
    """A UNet worker service pinned to the device core, and a channel to it."""

    def __init__(self, config: BenchConfig):
        self.config = config
        t0 = time.perf_counter()
        # Spawned side by side, then awaited (importing torch dominates a start).
        self.controlnet_services: list[ServiceProcess] = [
            start_controlnet(config.zoo, cpu_cores=[config.controlnet_core], num_threads=1, wait=False)
            for _ in range(MAX_CONTROLNETS)
        ]
        # The LoRA store prepares deltas ahead of requests, off the device (a fresh cache dir, so
        # its precompute is measured cold).
        self._cache_dir = tempfile.TemporaryDirectory(prefix="swiftd-bench-lora-cache-")
        self.store: ServiceProcess = start_lora_store(
            config.zoo,
            self._cache_dir.name,
            base_models=[config.family],
            cpu_cores=[config.controlnet_core],
            num_threads=1,
        )
        self.service: ServiceProcess = start_unet(
            config.zoo,
            config.family,
            lora_store=self.store.address,
            cpu_cores=[config.device_core],
            num_threads=1,
            wait=False,
        )
        for service in [*self.controlnet_services, self.service]:
            service.wait_ready()
        self.start_s = time.perf_counter() - t0
        self.channel = rpc.create_channel(self.service.address)
        self.stub = unet_pb2_grpc.UNetWorkerStub(self.channel)
        self.store_channel = rpc.create_channel(self.store.address)
        self.store_stub = lora_store_pb2_grpc.LoraStoreStub(self.store_channel)
        self._prefetched: dict[str, lora_store_pb2.PrefetchLoraResponse] = {}
        self._inline: ServiceProcess | None = None

    def first_prefetch(self, lora_id: str) -> lora_store_pb2.PrefetchLoraResponse:
        """The response of the first prefetch of `lora_id` in this run (the cold precompute)."""
        if lora_id not in self._prefetched:
            self.prefetch(lora_id)
        return self._prefetched[lora_id]

    def prefetch(self, lora_id: str) -> lora_store_pb2.PrefetchLoraResponse:
        """Into the store's host tier (what a deployment does ahead of requests)."""
        response = self.store_stub.PrefetchLora(
            lora_store_pb2.PrefetchLoraRequest(
                lora_id=lora_id, base_model_id=self.config.family, dtype=common_pb2.DTYPE_FLOAT32
            ),
            timeout=600,
        )
        self._prefetched.setdefault(lora_id, response)
        return response

    def inline_controlnet(self) -> ServiceProcess:
        """A ControlNet worker that takes no shared-memory ring (started on first use): residuals
        as bytes in the stream, as between two hosts, for comparing the transports."""
        if self._inline is None:
            self._inline = start_controlnet(
                self.config.zoo,
                cpu_cores=[self.config.controlnet_core],
                num_threads=1,
                extra_args=["--residual-transports"],
            )
        return self._inline

    def request(
        self, scenario: Scenario, wire_dtype: str = "float32", lora_bound_steps: int = 0, inline: bool = False
    ) -> Request:
        c = self.config
        workers = [self.inline_controlnet()] if inline else self.controlnet_services
        controlnets = [
            ControlNet(cn.controlnet_id, cn.image_png, cn.scale, worker_address=worker.address)
            for cn, worker in zip(scenario.controlnets, workers)
        ]
        return Request(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=c.size,
            height=c.size,
            num_inference_steps=c.steps,
            guidance_scale=GUIDANCE_SCALE,
            seed=SEED,
            scheduler="euler",
            model_id=c.family,
            loras=scenario.loras,
            controlnets=controlnets,
            controlnet_wire_dtype=wire_dtype,
            lora_bound_steps=lora_bound_steps,
            request_id=f"bench-{scenario.name}",
        )

    def reset_loras(self) -> float:
        """A no-LoRA request: the worker restores the pristine weights. Returns the seconds the
        restore took on the worker (its `lora_text_encoder` stage), so that our side's LoRA cost
        counts the restore as Diffusers' counts unfuse + unload."""
        size = min(RESET_SIZE, self.config.size)
        reset = Request(
            width=size,
            height=size,
            num_inference_steps=1,
            guidance_scale=1.0,
            seed=0,
            scheduler="euler",
            model_id=self.config.family,
            request_id="bench-reset",
        )
        response = self.stub.Denoise(reset.to_denoise_pb(), timeout=600)
        return next((t.seconds for t in response.timings if t.stage == "lora_text_encoder"), 0.0)

    def timed(self, request: Request) -> tuple[float, unet_pb2.DenoiseResponse]:
        pb = request.to_denoise_pb()
        t0 = time.perf_counter()
        response = self.stub.Denoise(pb, timeout=600)
        return time.perf_counter() - t0, response

    def warm_up(self, scenario: Scenario) -> None:
        """Untimed: loads the scenario's ControlNets; its LoRAs reach the store's host tier."""
        for lora_id, _ in scenario.loras:
            self.prefetch(lora_id)
        self.stub.Denoise(self.request(scenario).to_denoise_pb(), timeout=600)

    def run_once(
        self, scenario: Scenario, wire_dtype: str = "float32", lora_bound_steps: int = 0, inline: bool = False
    ) -> dict:
        """One timed request; a LoRA one is cold (the worker starts from the pristine weights) and
        is followed by the restore of its LoRA set, timed on the worker (`restore_s`). `inline`:
        its ControlNet on a worker that sends residual bytes in the stream."""
        if scenario.loras:
            self.reset_loras()
        latency, response = self.timed(self.request(scenario, wire_dtype, lora_bound_steps, inline))
        restore_s = self.reset_loras() if scenario.loras else 0.0
        stages = {t.stage: t.seconds for t in response.timings}
        # Outside the engine's stages: gRPC, (de)serialisation, PNG decode/encode, request parsing.
        top_level = sum(v for k, v in stages.items() if "." not in k)
        stages["outside_engine"] = max(latency - top_level, 0.0)
        return {
            "latency_s": latency,
            "stages": stages,
            "image_png": response.image_png,
            "lora_applied_at_step": response.lora_applied_at_step,
            "restore_s": restore_s,
            "controlnet_transports": [transport.name(t) for t in response.controlnet_transports],
        }

    def stream_deltas(self, lora_id: str, scale: float) -> tuple[float, int]:
        """(seconds, bytes) to stream one LoRA's deltas from the store's host tier to here."""
        from swiftd import codec

        t0 = time.perf_counter()
        nbytes = 0
        for chunk in self.store_stub.StreamDeltas(
            lora_store_pb2.StreamDeltasRequest(
                loras=[common_pb2.LoraRef(lora_id=lora_id, scale=scale)],
                base_model_id=self.config.family,
                dtype=common_pb2.DTYPE_FLOAT32,
            ),
            timeout=600,
        ):
            for delta in chunk.deltas:
                tensors = (
                    [delta.full] if delta.WhichOneof("form") == "full" else [delta.factored.up, delta.factored.down]
                )
                nbytes += sum(codec.tensor_nbytes(t) for t in tensors)
        return time.perf_counter() - t0, nbytes

    def close(self) -> None:
        for channel in (self.channel, self.store_channel):
            channel.close()
        for service in [self.service, *self.controlnet_services, self.store, *filter(None, [self._inline])]:
            service.stop()
        self._cache_dir.cleanup()
