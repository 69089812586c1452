"""Classifier-free guidance: the whole batch on this worker, or split over two (latent parallelism).

With CFG a step needs two noise predictions, the conditional one (the prompt) and the
unconditional one (the negative prompt), combined as `uncond + g * (cond - uncond)`. Diffusers
runs them as one batch of two (`Guidance`, the default). When the gateway finds two idle devices
it may split the batch instead (`DenoiseRequest.cfg_split`): the worker it calls, the leader, runs
the conditional half; a partner worker runs the unconditional half; each runs a batch of one, with
its own ControlNet residuals, and they exchange noise predictions every step over one gRPC stream
(`UNetWorker.ExchangeGuidance`, the leader calling the partner).

Both sides step. Each step both send their half's prediction, and both combine the two and step
their schedulers on the same bits (the same seed, the same scheduler, the same inputs), so their
latents stay identical and never travel. The alternative, the leader stepping alone and sending
the latents back, puts two transfers on every step's critical path (the partner's prediction to
the leader, then the new latents to the partner, which idles meanwhile); here the two predictions
cross at once, one transfer per step. The price is the scheduler step done twice (elementwise:
microseconds), and two copies of state that must not drift: each message carries the CRC-32 of
the latents its prediction came from, and a mismatch fails the request rather than return a wrong
image. Against the unsplit path the result differs only in that the UNet runs batches of one
instead of two (within 1e-4 in fp32, tests/test_cfg_split.py).

What the halves need:

- The same weights at every step: LoRA deltas are in place before the first step on both sides
  (the bound K is taken as 0). Agreeing on a later step would cost a round trip, and a side that
  already had the set applied could not wait for the other without un-patching.
- Their own ControlNet residuals: each half computes them for its half of the batch, where it
  runs. A guess-mode ControlNet sees only the conditional half (Diffusers feeds the unconditional
  half zeros), so the partner does not run it at all.
- The same noise: the leader resolves the request (seed included) before it sends it.

Starting: the partner never queues behind another request (two leaders each waiting for the
other's worker would deadlock): busy, it refuses at once. The leader waits for the partner's
GuidanceAccepted before it encodes its prompt; refused before that (busy, or unreachable), it runs
the whole batch itself, so a stale plan costs a round trip, not the request.

Failure and cancellation: once both run, either side's failure ends the stream with its status,
which the other side sees at its next exchange (UNAVAILABLE, or the partner's own verdict such as
NOT_FOUND); a cancelled leader cancels the stream, and the partner stops at its next step
boundary or exchange. Waits poll the caller's cancellation, and no exchange waits longer than
`step_timeout`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc
import torch

from swiftd import codec, rpc
from swiftd.errors import Cancelled, DeadlineExceeded, FailedPrecondition, ServingError, Unavailable, from_rpc_error
from swiftd.request import Request
from swiftd.v1 import common_pb2, unet_pb2, unet_pb2_grpc

if TYPE_CHECKING:
    from services.unet.run import DenoisingRun

log = logging.getLogger(__name__)

COND, UNCOND = "cond", "uncond"  # the halves of the CFG batch; Diffusers' batch order is (uncond, cond)
_POLL_SECONDS = 0.1  # how often a wait for the other side checks for a cancelled caller
_END = object()


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Diffusers' classifier-free guidance, operation for operation."""
    return uncond + scale * (cond - uncond)


def latents_crc32(latents: torch.Tensor) -> int:
    return zlib.crc32(latents.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


class Guidance:
    """The whole CFG batch on this worker (or no CFG): Diffusers' way."""

    half: str | None = None  # the half of the CFG batch this worker computes; None: the whole batch
    decodes = True  # this side decodes the image
    partner = ""  # the worker computing the other half, once it runs

    def open(self, run: DenoisingRun) -> bool:
        """The request is resolved and checked; nothing has run yet. False: this guidance cannot
        go on (a refused split), run the whole batch here instead."""
        return True

    def own_half(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """This side's part of a CFG-batched tensor (prompt embeddings, added conditioning)."""
        return tensor

    def combine(self, run: DenoisingRun, step_index: int, noise_pred: torch.Tensor) -> torch.Tensor:
        """The guided noise prediction of a step from this side's UNet output."""
        if not run.do_cfg:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        return guide(uncond, cond, run.request.guidance_scale)

    def finish(self, run: DenoisingRun) -> None:
        """Denoising done on this side."""

    def close(self) -> None:
        """The run ended (done, failed or cancelled): release what `open` made."""


class _Link:
    """One side of an ExchangeGuidance stream: sends this side's messages through `send`, and
    hands over the other side's from `incoming` (read on a thread of its own, so that a wait can
    give up on a cancelled caller or a timeout)."""

    def __init__(self, send: Callable[[unet_pb2.GuidanceMessage], None], where: str, step_timeout: float):
        self._send = send
        self.where = where
        self._step_timeout = step_timeout
        self._incoming: queue.Queue = queue.Queue()

    def pump(
        self,
        incoming: Iterator[unet_pb2.GuidanceMessage],
        on_error: Callable[[grpc.RpcError], Exception],
        on_end: Exception | None = None,
    ):
        """Read the other side's messages; a failed stream is `on_error(exc)` to whoever waits for
        the next message, one that ends is `on_end` (default: UNAVAILABLE)."""

        def read():
            try:
                for message in incoming:
                    self._incoming.put(message)
                self._incoming.put(on_end or _END)
            except grpc.RpcError as exc:
                self._incoming.put(on_error(exc))
            except Exception as exc:  # noqa: BLE001 - surfaced on the run's thread
                self._incoming.put(exc)

        threading.Thread(target=read, name="cfg-exchange", daemon=True).start()

    def send(self, message: unet_pb2.GuidanceMessage) -> None:
        self._send(message)

    def receive(self, kind: str, should_stop: Callable[[], bool] | None) -> unet_pb2.GuidanceMessage:
        deadline = time.monotonic() + self._step_timeout
        while True:
            try:
                item = self._incoming.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if should_stop is not None and should_stop():
                    raise Cancelled(f"request cancelled while waiting for {self.where}") from None
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"{self.where}: no {kind} within {self._step_timeout:.0f} s") from None
        if item is _END:
            raise Unavailable(f"{self.where}: the stream ended before its {kind}")
        if isinstance(item, BaseException):
            raise item
        if item.WhichOneof("kind") != kind:
            raise FailedPrecondition(f"{self.where}: sent {item.WhichOneof('kind')!r} where {kind!r} was due")
        return item


class SplitGuidance(Guidance):
    """One half of the CFG batch here, the other on the far side of a `_Link`."""

    def __init__(self, half: str, device: torch.device, dtype: torch.dtype):
        self.half = half
        self._device, self._dtype = device, dtype
        self.link: _Link | None = None

    def own_half(self, tensor):
        if tensor is None:
            return None
        uncond, cond = tensor.chunk(2)
        return cond if self.half == COND else uncond

    def combine(self, run: DenoisingRun, step_index: int, noise_pred: torch.Tensor) -> torch.Tensor:
        crc = latents_crc32(run.latents)
        step = unet_pb2.GuidanceStep(
            step_index=step_index, noise_pred=codec.tensor_to_proto(noise_pred), latents_crc32=crc
        )
        self.link.send(unet_pb2.GuidanceMessage(step=step))
        other = self.link.receive("step", run.should_stop).step
        if other.step_index != step_index:
            raise FailedPrecondition(f"{self.link.where}: step {other.step_index} arrived for step {step_index}")
        if other.latents_crc32 != crc:
            raise FailedPrecondition(
                f"{self.link.where}: the halves' latents differ before step {step_index} "
                f"(crc32 {other.latents_crc32:08x} there, {crc:08x} here)"
            )
        theirs = codec.tensor_from_proto(other.noise_pred, device=self._device, dtype=self._dtype)
        uncond, cond = (theirs, noise_pred) if self.half == COND else (noise_pred, theirs)
        return guide(uncond, cond, run.request.guidance_scale)


def partner_request(request: Request) -> Request:
    """What the partner runs: the leader's resolved request with the partner's share of it."""
    split = request.cfg_split
    workers = split.partner_controlnet_workers or ("",) * len(request.controlnets)
    return replace(
        request,
        controlnets=[
            replace(cn, worker_address=w, fallback_workers=tuple(a for a in cn.fallback_workers if a != w))
            for cn, w in zip(request.controlnets, workers)
        ],
        pushed_lora_ids=split.partner_pushed_lora_ids,
        cfg_split=None,
        preview_every_n_steps=0,
        return_latents=False,
    )


class LeaderGuidance(SplitGuidance):
    """The conditional half, calling the partner's ExchangeGuidance; decodes the image."""

    def __init__(
        self,
        channel: grpc.Channel,
        timeout: float | None,
        step_timeout: float,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__(COND, device, dtype)
        self._channel = channel
        self._timeout = timeout
        self._step_timeout = step_timeout
        self._requests: queue.Queue = queue.Queue()
        self._call = None
        self.partner_timings: dict[str, float] = {}

    def open(self, run: DenoisingRun) -> bool:
        # Before text encoding: once accepted, the partner encodes its prompt and sets up its
        # ControlNets while this side does the same.
        address = run.request.cfg_split.partner_address
        self.link = _Link(self._requests.put, f"cfg partner {address}", self._step_timeout)
        start = unet_pb2.GuidanceStart(request=partner_request(run.request).to_denoise_pb())
        self._requests.put(unet_pb2.GuidanceMessage(start=start))
        stub = unet_pb2_grpc.UNetWorkerStub(self._channel)
        self._call = stub.ExchangeGuidance(iter(self._requests.get, _END), timeout=self._timeout)
        self.link.pump(rpc.responses(self._call), lambda exc: from_rpc_error(exc, self.link.where))
        try:
            self.link.receive("accepted", run.should_stop)
        except ServingError as exc:
            if exc.code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                raise
            log.info("request %s: runs unsplit: %s", run.request.request_id or "-", exc.message)
            self.close()
            return False
        self.partner = address
        return True

    def finish(self, run: DenoisingRun) -> None:
        self._requests.put(_END)  # half-close: every step has been sent
        done = self.link.receive("done", run.should_stop).done
        if done.lora_applied_at_step != run.lora_applied_at_step:
            raise FailedPrecondition(
                f"{self.link.where}: LoRA set in place before step {done.lora_applied_at_step} there, "
                f"{run.lora_applied_at_step} here"
            )
        run.timings.update({f"cfg_partner.{t.stage}": t.seconds for t in done.timings})
        run.cfg_partner_controlnet_transports = list(done.controlnet_transports)

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()  # nothing once the stream has ended; else the partner stops
        self._requests.put(_END)  # after the cancel: a half-close first would look like a normal end


class PartnerGuidance(SplitGuidance):
    """The unconditional half, answering a leader's ExchangeGuidance; decodes nothing."""

    decodes = False

    def __init__(
        self,
        send: Callable[[unet_pb2.GuidanceMessage], None],
        incoming: Iterator[unet_pb2.GuidanceMessage],
        step_timeout: float,
        device: torch.device,
        dtype: torch.dtype,
    ):
        super().__init__(UNCOND, device, dtype)
        self.link = _Link(send, "cfg leader", step_timeout)
        # Whether the leader cancels the stream or (mid-run) just closes it, it has gone.
        gone = Cancelled("the cfg leader went away")
        self.link.pump(incoming, lambda exc: gone, on_end=gone)

    def open(self, run: DenoisingRun) -> bool:
        self.link.send(unet_pb2.GuidanceMessage(accepted=unet_pb2.GuidanceAccepted()))
        return True


def done_message(result) -> unet_pb2.GuidanceMessage:
    """The partner's last message, from its GenerationResult."""
    done = unet_pb2.GuidanceDone(
        timings=[common_pb2.StageTiming(stage=k, seconds=v) for k, v in result.timings.items()],
        lora_applied_at_step=result.lora_applied_at_step,
        controlnet_transports=result.controlnet_transports,
    )
    return unet_pb2.GuidanceMessage(done=done)
