"""The UNet as two halves: an encoder half and a decoder half.

A ControlNet's residuals are consumed only by the UNet's decoder half (added to the skip
connections and to the mid-block output), so splitting the UNet there lets the encoder half run
while ControlNet workers compute the residuals elsewhere. Both halves are `nn.Module`s that share
the wrapped UNet's submodules (no weight copies), take and return plain tensors, and so compile as
two separate graphs (see `compiler/`).

The arithmetic follows `diffusers.UNet2DConditionModel.forward` operation for operation; the
equivalence tests hold it to the unsplit model. Supported: SD1.5/SD2 and SDXL UNets (text_time
added conditioning). Not supported: attention masks, T2I adapters, GLIGEN, class labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn


@dataclass
class EncoderHalfOutput:
    """What the decoder half needs from the encoder half of one UNet step."""

    sample: torch.Tensor  # mid-block output
    emb: torch.Tensor  # time (+ added conditioning) embedding
    encoder_hidden_states: torch.Tensor  # after the UNet's own projection, if any
    down_block_res_samples: tuple[torch.Tensor, ...]  # skip connections, in down-block order


def run_down_and_mid_blocks(
    model: nn.Module, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Down blocks then mid block of a UNet or ControlNet, from the conv_in output.

    Returns the mid-block output and the skip connections (conv_in output first).
    """
    down_block_res_samples: tuple[torch.Tensor, ...] = (sample,)
    for down_block in model.down_blocks:
        if getattr(down_block, "has_cross_attention", False):
            sample, res_samples = down_block(
                hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states
            )
        else:
            sample, res_samples = down_block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples
    if model.mid_block is not None:
        if getattr(model.mid_block, "has_cross_attention", False):
            sample = model.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = model.mid_block(sample, emb)
    return sample, down_block_res_samples


class UNetEncoderHalf(nn.Module):
    """Time embedding, conv_in, down blocks and mid block."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> EncoderHalfOutput:
        unet = self.unet
        added_cond_kwargs = None
        if text_embeds is not None:
            added_cond_kwargs = {"text_embeds": text_embeds, "time_ids": time_ids}
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0

        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        aug_emb = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        sample, down_block_res_samples = run_down_and_mid_blocks(unet, unet.conv_in(sample), emb, encoder_hidden_states)
        return EncoderHalfOutput(sample, emb, encoder_hidden_states, down_block_res_samples)


class UNetDecoderHalf(nn.Module):
    """Adds ControlNet residuals, then up blocks and the output head."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        encoded: EncoderHalfOutput,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unet = self.unet
        sample = encoded.sample
        emb = encoded.emb
        encoder_hidden_states = encoded.encoder_hidden_states
        down_block_res_samples = encoded.down_block_res_samples

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(down_block_res_samples):
                raise ValueError(
                    f"expected {len(down_block_res_samples)} down-block residuals, "
                    f"got {len(down_block_additional_residuals)}"
                )
            down_block_res_samples = tuple(
                res + extra for res, extra in zip(down_block_res_samples, down_block_additional_residuals)
            )
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        # Latent sizes that are not a multiple of the total upsampling factor need explicit
        # upsample sizes, as in diffusers.
        up_factor = 2**unet.num_upsamplers
        forward_upsample_size = any(dim % up_factor != 0 for dim in down_block_res_samples[0].shape[-2:])
        upsample_size = None
        for i, up_block in enumerate(unet.up_blocks):
            is_final_block = i == len(unet.up_blocks) - 1
            res_samples = down_block_res_samples[-len(up_block.resnets) :]
            down_block_res_samples = down_block_res_samples[: -len(up_block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if getattr(up_block, "has_cross_attention", False):
                sample = up_block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states,
                    upsample_size=upsample_size,
                )
            else:
                sample = up_block(
                    hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples, upsample_size=upsample_size
                )

        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        return unet.conv_out(sample)


class SplitUNet(nn.Module):
    """A UNet run as encoder half + decoder half; `forward` equals the unsplit UNet's."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        unsupported = [
            name
            for name, on in [
                ("class_embed_type", unet.config.class_embed_type is not None),
                ("time_cond_proj_dim", unet.config.time_cond_proj_dim is not None),
                ("addition_embed_type=image_hint", unet.config.addition_embed_type == "image_hint"),
            ]
            if on
        ]
        if unsupported:
            raise ValueError(f"UNet configuration not supported by the split UNet: {', '.join(unsupported)}")
        self.unet = unet
        self.encoder_half = UNetEncoderHalf(unet)
        self.decoder_half = UNetDecoderHalf(unet)

    @property
    def config(self):
        return self.unet.config

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        encoded = self.encoder_half(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return self.decoder_half(encoded, down_block_additional_residuals, mid_block_additional_residual)
