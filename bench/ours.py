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

import time

from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT, SEED, BenchConfig, Scenario
from swiftd import rpc
from swiftd.launcher import ServiceProcess, start_controlnet, start_unet
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

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
        self.service: ServiceProcess = start_unet(
            config.zoo, config.family, cpu_cores=[config.device_core], num_threads=1, wait=False
        )
        for service in [*self.controlnet_services, self.service]:
            service.wait_ready()
        self.start_s = time.perf_counter() - t0
        self.channel = rpc.create_channel(self.service.address)
        self.stub = unet_pb2_grpc.UNetWorkerStub(self.channel)

    def request(self, scenario: Scenario, wire_dtype: int = common_pb2.DTYPE_FLOAT32) -> unet_pb2.DenoiseRequest:
        c = self.config
        return unet_pb2.DenoiseRequest(
            params=common_pb2.GenerationParams(
                prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, width=c.size, height=c.size,
                num_inference_steps=c.steps, guidance_scale=GUIDANCE_SCALE, seed=SEED,
                scheduler=common_pb2.SCHEDULER_EULER, model_id=c.family,
            ),
            controlnets=[
                unet_pb2.ControlNetAttachment(
                    input=common_pb2.ControlNetInput(
                        controlnet_id=cn.controlnet_id, image=cn.image_png, conditioning_scale=cn.scale,
                    ),
                    worker_address=worker.address,
                )
                for cn, worker in zip(scenario.controlnets, self.controlnet_services)
            ],
            controlnet_wire_dtype=wire_dtype,
            loras=[common_pb2.LoraRef(lora_id=lora_id, scale=scale) for lora_id, scale in scenario.loras],
            request_id=f"bench-{scenario.name}",
        )  # fmt: skip

    def reset_loras(self) -> None:
        """An untimed no-LoRA request: the worker restores the pristine weights."""
        size = min(RESET_SIZE, self.config.size)
        self.stub.Denoise(unet_pb2.DenoiseRequest(
            params=common_pb2.GenerationParams(
                prompt="", width=size, height=size, num_inference_steps=1, guidance_scale=1.0, seed=0,
                scheduler=common_pb2.SCHEDULER_EULER, model_id=self.config.family,
            ),
            request_id="bench-reset",
        ), timeout=600)  # fmt: skip

    def timed(self, request: unet_pb2.DenoiseRequest) -> tuple[float, unet_pb2.DenoiseResponse]:
        t0 = time.perf_counter()
        response = self.stub.Denoise(request, timeout=600)
        return time.perf_counter() - t0, response

    def warm_up(self, scenario: Scenario) -> None:
        """Untimed: loads the scenario's ControlNets and prepares (caches) its LoRA deltas."""
        self.stub.Denoise(self.request(scenario), timeout=600)

    def run_once(self, scenario: Scenario, wire_dtype: int = common_pb2.DTYPE_FLOAT32) -> dict:
        """One timed request; a LoRA one is cold (the worker starts from the pristine weights)."""
        if scenario.loras:
            self.reset_loras()
        latency, response = self.timed(self.request(scenario, wire_dtype))
        stages = {t.stage: t.seconds for t in response.timings}
        # Outside the engine's stages: gRPC, (de)serialisation, PNG decode/encode, request parsing.
        top_level = sum(v for k, v in stages.items() if "." not in k)
        stages["outside_engine"] = max(latency - top_level, 0.0)
        return {
            "latency_s": latency, "stages": stages, "image_png": response.image_png,
            "lora_applied_at_step": response.lora_applied_at_step,
        }  # fmt: skip

    def close(self) -> None:
        self.channel.close()
        for service in [self.service, *self.controlnet_services]:
            service.stop()
