"""ControlNets as an add-on: residuals for the UNet's decoder half, one source per ControlNet.

At `before_denoising` each ControlNet of the request gets a `ResidualSource`, sent once what is
constant for the request (a `ControlNetSession`): the conditioning image, the prompt embeddings,
SDXL's added conditioning, scale and guess mode. A source is a ControlNet worker at the other end
of a stream (`controlnet_stream.RemoteResidualSource`) or, without a worker address, the
ControlNet run in this process (`LocalResidualSource`). Each step, the sources of the ControlNets
whose guidance window covers it start computing before the UNet's encoder half runs and are
waited for after it; their residuals are summed. Those outside their window would contribute
zeros in Diffusers, so they are not run at all.

With the CFG batch split over two workers (services/unet/guidance.py) each half computes its own
residuals for its batch of one; a guess-mode ControlNet, which only ever sees the conditional
half, does not run on the unconditional half's worker at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from services.unet.addons.base import AddOn
from services.unet.guidance import UNCOND
from swiftd.controlnet_step import ControlNetResiduals, ControlNetSession, ControlNetStepper
from swiftd.request import ControlNet

if TYPE_CHECKING:
    from services.unet.run import DenoisingRun


class ResidualSource(Protocol):
    """The residuals of one ControlNet of one request, one step at a time.

    `start_step` must not block on the ControlNet's computation: the UNet's encoder half runs
    between `start_step` and `wait_step`. Its `timestep` is the scheduler's, on the host.
    """

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None: ...

    def wait_step(self) -> ControlNetResiduals: ...

    def close(self) -> None: ...


#: Opens the source of one ControlNet of a request (local or remote, by `worker_address`).
ResidualSourceFactory = Callable[[ControlNet, ControlNetSession], ResidualSource]


class LocalResidualSource:
    """A ControlNet run in this process, on the UNet's device (no overlap; the fallback path)."""

    def __init__(self, stepper: ControlNetStepper, session: ControlNetSession):
        self._stepper = stepper
        self._session = session
        model = stepper.controlnet
        self._cond_embedding = stepper.embed_condition(session.conditioning(model.device, model.dtype))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_step(self, step_index: int, timestep: torch.Tensor, sample: torch.Tensor) -> None:
        self._pending = (timestep, sample)

    def wait_step(self) -> ControlNetResiduals:
        timestep, sample = self._pending
        s = self._session
        return self._stepper.step(
            sample,
            timestep,
            s.encoder_hidden_states,
            self._cond_embedding,
            s.conditioning_scale,
            s.guess_mode,
            s.text_embeds,
            s.time_ids,
        )

    def close(self) -> None:
        self._pending = None


class ControlNetAddOn(AddOn):
    def __init__(
        self,
        controlnets: list[ControlNet],
        open_source: ResidualSourceFactory,
        check_local: Callable[[str], object],
        prepare_image: Callable[..., torch.Tensor],
    ):
        """`check_local(controlnet_id)` raises unless an in-process ControlNet can run;
        `prepare_image(image, height, width)` is Diffusers' preprocessing (once; the session repeats it for CFG)."""
        self.controlnets = controlnets
        self._open_source = open_source
        self._check_local = check_local
        self._prepare_image = prepare_image
        self.sources: list[tuple[ControlNet, ResidualSource]] = []
        self._active: list[tuple[ControlNet, ResidualSource]] = []

    def prepare(self, run: DenoisingRun) -> None:
        for cn in self.controlnets:
            if not cn.worker_address:
                self._check_local(cn.controlnet_id)

    def before_denoising(self, run: DenoisingRun) -> None:
        attributes = {"controlnet.ids": [cn.controlnet_id for cn in self.controlnets]}
        with run.stage("controlnet_setup", **attributes):
            for cn in self.controlnets:
                if cn.guess_mode and run.half == UNCOND:
                    continue  # Diffusers gives the unconditional half zeros for it
                self.sources.append((cn, self._open_source(cn, self._session(run, cn))))

    def _session(self, run: DenoisingRun, cn: ControlNet) -> ControlNetSession:
        """What stays constant for `cn` during the run; in guess mode with CFG the ControlNet
        sees only the conditional half of the batch."""
        request = run.request
        conditional_only = cn.guess_mode and run.cfg_batch

        def batch(tensor):
            return tensor.chunk(2)[1] if tensor is not None and conditional_only else tensor

        return ControlNetSession(
            controlnet_id=cn.controlnet_id,
            controlnet_cond=self._prepare_image(cn.decoded_image(), request.height, request.width),
            encoder_hidden_states=batch(run.prompt_embeds),
            text_embeds=batch(run.added_cond_kwargs.get("text_embeds")),
            time_ids=batch(run.added_cond_kwargs.get("time_ids")),
            conditioning_scale=cn.conditioning_scale,
            guess_mode=cn.guess_mode,
        )

    def before_step(self, run: DenoisingRun, step_index: int) -> None:
        self._active = [(cn, s) for cn, s in self.sources if cn.active_at(step_index, run.num_steps)]
        guess_input = None
        for cn, source in self._active:
            if cn.guess_mode and run.cfg_batch:
                if guess_input is None:
                    guess_input = run.scheduler.scale_model_input(run.latents, run.timestep_on_host)
                source.start_step(step_index, run.timestep_on_host, guess_input)
            else:
                source.start_step(step_index, run.timestep_on_host, run.latent_model_input)

    def decoder_residuals(self, run: DenoisingRun, step_index: int) -> ControlNetResiduals | None:
        total = None
        for cn, source in self._active:
            residuals = source.wait_step()
            down, mid = list(residuals.down_block_res_samples), residuals.mid_block_res_sample
            if cn.guess_mode and run.cfg_batch:  # nothing for the unconditional half
                down = [torch.cat([torch.zeros_like(d), d]) for d in down]
                mid = torch.cat([torch.zeros_like(mid), mid])
            if total is None:
                total = ControlNetResiduals(tuple(down), mid)
            else:
                total = ControlNetResiduals(
                    tuple(d + r for d, r in zip(total.down_block_res_samples, down)), total.mid_block_res_sample + mid
                )
        return total

    def finish(self, run: DenoisingRun) -> None:
        self._close()
        for cn, source in self.sources:  # remote ControlNets report their own compute and transport
            for key, value in getattr(source, "stats", {}).items():
                if key != "steps":
                    run.timings[f"controlnet.{cn.controlnet_id}.{key}"] = value
        # How residuals arrived (a remote source's negotiated transport; 0 = in-process), in request order.
        run.controlnet_transports = [
            next((getattr(source, "transport", 0) for c, source in self.sources if c is cn), 0)
            for cn in self.controlnets
        ]

    def fail(self, run: DenoisingRun) -> None:
        self._close()

    def _close(self) -> None:
        for _, source in self.sources:
            source.close()
