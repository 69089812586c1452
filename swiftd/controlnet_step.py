"""One ControlNet step, with the conditioning image's embedding computed once per request.

`diffusers.ControlNetModel.forward` runs the hint encoder (`controlnet_cond_embedding`) on the
conditioning image at every step although the image never changes. `ControlNetStepper` splits
that off: `embed_condition` once per request, `step` per denoising step. The remaining arithmetic
follows `ControlNetModel.forward` operation for operation, so residuals are the same numbers.
Both the ControlNet service and the UNet worker's in-process path use this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ControlNetModel

from swiftd import codec
from swiftd.errors import InvalidArgument
from swiftd.request import check_id, or_one
from swiftd.split_unet import run_down_and_mid_blocks
from swiftd.v1 import controlnet_pb2

# Diffusers' control-image preprocessing ends in `uint8 pixels / 255.0` in float32
# (VaeImageProcessor.pil_to_numpy), so each value of a prepared image is one of these 256: the image
# travels as one byte per value instead of four, and this table gives back the very same floats.
PIXEL_VALUES = torch.from_numpy(np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0)


@dataclass
class ControlNetSession:
    """What stays constant for one ControlNet during one request: sent once (SessionStart in
    protos/swiftd/v1/controlnet.proto), not per step. The UNet worker sends `to_pb()`, the
    ControlNet worker reads `from_pb()`; an in-process ControlNet uses it as it is."""

    controlnet_id: str
    # The preprocessed image (NCHW, [0, 1]) once: `conditioning()` repeats it to the batch of
    # encoder_hidden_states, as Diffusers duplicates it for CFG.
    controlnet_cond: torch.Tensor
    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None  # SDXL added conditioning
    time_ids: torch.Tensor | None
    conditioning_scale: float
    guess_mode: bool

    def conditioning(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The conditioning image as Diffusers' `prepare_image` hands it to the ControlNet: moved,
        cast, contiguous NCHW (preprocess gives a channels-last view, on which the hint encoder's
        convolutions round differently), then `torch.cat` up to the batch of encoder_hidden_states."""
        cond = self.controlnet_cond.to(device=device, dtype=dtype).contiguous()
        copies = self.encoder_hidden_states.shape[0] // cond.shape[0]
        return torch.cat([cond] * copies) if copies > 1 else cond

    def to_pb(self, wire_dtype: int = 0, request_id: str = "") -> controlnet_pb2.SessionStart:
        """`wire_dtype`: DType of the residuals in responses (DTYPE_UNSPECIFIED: the sample's)."""

        def tensor(t):
            return codec.tensor_to_proto(t) if t is not None else None

        return controlnet_pb2.SessionStart(
            controlnet_id=self.controlnet_id,
            controlnet_cond=tensor(_as_pixels(self.controlnet_cond)),
            encoder_hidden_states=tensor(self.encoder_hidden_states),
            text_embeds=tensor(self.text_embeds),
            time_ids=tensor(self.time_ids),
            conditioning_scale=self.conditioning_scale,
            guess_mode=self.guess_mode,
            wire_dtype=wire_dtype,
            request_id=request_id,
        )

    @classmethod
    def from_pb(cls, start: controlnet_pb2.SessionStart) -> ControlNetSession:
        """INVALID_ARGUMENT naming the field for a missing or malformed part."""
        check_id("start.controlnet_id", start.controlnet_id)
        session = cls(
            controlnet_id=start.controlnet_id,
            controlnet_cond=codec.tensor_from_field(start.controlnet_cond, "start.controlnet_cond"),
            encoder_hidden_states=codec.tensor_from_field(start.encoder_hidden_states, "start.encoder_hidden_states"),
            text_embeds=codec.tensor_from_field(start.text_embeds, "start.text_embeds", required=False),
            time_ids=codec.tensor_from_field(start.time_ids, "start.time_ids", required=False),
            conditioning_scale=or_one(start.conditioning_scale),
            guess_mode=start.guess_mode,
        )
        cond = session.controlnet_cond
        if cond.dim() != 4 or cond.shape[1] != 3:
            raise InvalidArgument("start.controlnet_cond", f"expected NCHW with 3 channels, got {tuple(cond.shape)}")
        if cond.dtype == torch.uint8:
            session.controlnet_cond = PIXEL_VALUES[cond.long()]
        elif not cond.is_floating_point():
            raise InvalidArgument("start.controlnet_cond", f"expected a float or uint8 tensor, got {cond.dtype}")
        hidden = session.encoder_hidden_states
        if hidden.dim() != 3:
            raise InvalidArgument(
                "start.encoder_hidden_states", f"expected [batch, tokens, dim], got {tuple(hidden.shape)}"
            )
        batch = hidden.shape[0]
        if cond.shape[0] == 0 or batch % cond.shape[0]:
            raise InvalidArgument(
                "start.controlnet_cond", f"batch {cond.shape[0]} does not divide encoder_hidden_states batch {batch}"
            )
        return session


def _as_pixels(cond: torch.Tensor) -> torch.Tensor:
    """`cond` as uint8 pixel values when PIXEL_VALUES gives it back exactly (a prepared image),
    else as it is."""
    if cond.dtype != torch.float32 or cond.device.type != "cpu":
        return cond
    pixels = (cond * 255).round_().clamp_(0, 255).to(torch.uint8)
    return pixels if torch.equal(PIXEL_VALUES[pixels.long()], cond) else cond


@dataclass
class ControlNetResiduals:
    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class ControlNetStepper:
    compiled = False  # steps run eagerly (compiler.runtime.CompiledControlNetStepper: compiled)

    def __init__(self, controlnet: ControlNetModel):
        if controlnet.config.class_embed_type is not None:
            raise ValueError("ControlNets with class embeddings are not supported")
        self.controlnet = controlnet

    @torch.no_grad()
    def embed_condition(self, controlnet_cond: torch.Tensor) -> torch.Tensor:
        """The hint encoder's output for a preprocessed conditioning image (NCHW, range [0, 1])."""
        cn = self.controlnet
        if cn.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        return cn.controlnet_cond_embedding(controlnet_cond.to(cn.dtype))

    @torch.no_grad()
    def step(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cond_embedding: torch.Tensor,
        conditioning_scale: float,
        guess_mode: bool = False,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        out: list[torch.Tensor] | None = None,
    ) -> ControlNetResiduals:
        """One step's residuals; `out` (down blocks, then mid block): tensors of their shapes
        to write them into (a residual ring's slot) instead of fresh ones."""
        cn = self.controlnet
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.int64, device=sample.device)
        elif timesteps.dim() == 0:
            timesteps = timestep_on(timesteps, sample.device)[None]
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = cn.time_proj(timesteps).to(dtype=sample.dtype)
        emb = cn.time_embedding(t_emb, None)

        if cn.config.addition_embed_type == "text_time":
            time_embeds = cn.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
            add_embeds = torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + cn.add_embedding(add_embeds)
        elif cn.config.addition_embed_type == "text":
            emb = emb + cn.add_embedding(encoder_hidden_states)
        elif cn.config.addition_embed_type is not None:
            raise ValueError(f"addition_embed_type {cn.config.addition_embed_type!r} is not supported")

        sample = cn.conv_in(sample) + cond_embedding
        sample, down_block_res_samples = run_down_and_mid_blocks(cn, sample, emb, encoder_hidden_states)

        down = [block(res) for res, block in zip(down_block_res_samples, cn.controlnet_down_blocks)]
        mid = cn.controlnet_mid_block(sample)

        if cn.config.global_pool_conditions:
            weighted = weight_residuals(down, mid, conditioning_scale, False)
            down = [torch.mean(d, dim=(2, 3), keepdim=True) for d in weighted.down_block_res_samples]
            mid = torch.mean(weighted.mid_block_res_sample, dim=(2, 3), keepdim=True)
            return fill(out, down, mid)
        return weight_residuals(down, mid, conditioning_scale, guess_mode, out)


def timestep_on(timestep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 0-d timestep on `device`, the same number and dtype. One on the host is made there, not
    copied: a copy from the host to a GPU waits for the GPU's queue, once per step."""
    if timestep.device == device:
        return timestep
    return torch.full((), timestep.item(), dtype=timestep.dtype, device=device)


def weight_residuals(
    down: list[torch.Tensor],
    mid: torch.Tensor,
    conditioning_scale: float,
    guess_mode: bool,
    out: list[torch.Tensor] | None = None,
) -> ControlNetResiduals:
    """Diffusers' weighting of a ControlNet's residuals: by the conditioning scale; in guess mode
    shallow residuals weigh less (0.1 .. 1.0 times the scale). `out` (down blocks, then mid
    block; a residual ring's slot): where to write them, the same numbers without a copy."""
    scales = [conditioning_scale] * (len(down) + 1)
    if guess_mode:
        scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * conditioning_scale
    weighted = [
        torch.mul(r, s, out=None if out is None else out[i]) for i, (r, s) in enumerate(zip([*down, mid], scales))
    ]
    return ControlNetResiduals(tuple(weighted[:-1]), weighted[-1])


def fill(out: list[torch.Tensor] | None, down: list[torch.Tensor], mid: torch.Tensor) -> ControlNetResiduals:
    """The residuals, copied into `out` when given."""
    if out is None:
        return ControlNetResiduals(tuple(down), mid)
    for target, residual in zip(out, [*down, mid]):
        target.copy_(residual)
    return ControlNetResiduals(tuple(out[:-1]), out[-1])
