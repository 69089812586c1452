"""The graphs the compiler builds, as `nn.Module`s with flat tensor inputs and outputs.

Four parts, each compiled on its own:

    unet_encoder   time embedding, conv_in, down blocks, mid block    (swiftd.split_unet.UNetEncoderHalf)
    unet_decoder   ControlNet residuals added, up blocks, output head  (swiftd.split_unet.UNetDecoderHalf)
    controlnet     one ControlNet step, hint embedding as an input     (swiftd.controlnet_step.ControlNetStepper)
    vae_decoder    the VAE's decode                                     (AutoencoderKL.decode)

The UNet is two graphs so that a ControlNet worker's residuals can still arrive while the encoder
half runs: the residuals are inputs of the decoder graph. Every module here wraps the serving
module and shares its parameters (no copies), and calls the same code the eager path calls, so a
compiled part computes what the eager one does. Weights are never baked in: the exported
programs list them as parameters (inputs), and the Inductor artifacts read them from the live
module at run time (see compiler/inductor.py).

Inputs are tensors only, in a fixed order per part (`input_names`), so that one artifact format
(AOTInductor, TensorRT) can call every part the same way; the timestep is a float32 0-d tensor
(schedulers hand out int64 or float32 timesteps; the UNet turns them into float32 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from swiftd.controlnet_step import ControlNetStepper
from swiftd.split_unet import EncoderHalfOutput, SplitUNet

UNET_ENCODER = "unet_encoder"
UNET_DECODER = "unet_decoder"
CONTROLNET = "controlnet"
VAE_DECODER = "vae_decoder"
ALL_PARTS = (UNET_ENCODER, UNET_DECODER, CONTROLNET, VAE_DECODER)


def has_added_conditioning(unet_or_controlnet) -> bool:
    """SDXL-style text_time conditioning: the part takes text_embeds and time_ids as well."""
    return unet_or_controlnet.config.addition_embed_type == "text_time"


class UNetEncoderGraph(nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) ->
    (mid-block sample, emb, encoder_hidden_states, *skip connections)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.encoder_half = SplitUNet(unet).encoder_half

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        encoded = self.encoder_half(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return (encoded.sample, encoded.emb, encoded.encoder_hidden_states, *encoded.down_block_res_samples)


class UNetDecoderGraph(nn.Module):
    """(sample, emb, encoder_hidden_states, skips, down residuals, mid residual) -> noise prediction.

    Without ControlNets the runtime passes zero residuals (x + 0 is x, bit for bit), so one graph
    serves requests with and without ControlNets.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.decoder_half = SplitUNet(unet).decoder_half

    def forward(
        self,
        sample,
        emb,
        encoder_hidden_states,
        down_block_res_samples,
        down_block_additional_residuals,
        mid_block_additional_residual,
    ):
        encoded = EncoderHalfOutput(sample, emb, encoder_hidden_states, tuple(down_block_res_samples))
        return self.decoder_half(encoded, tuple(down_block_additional_residuals), mid_block_additional_residual)


class ControlNetGraph(nn.Module):
    """(sample, timestep, encoder_hidden_states, hint embedding[, text_embeds, time_ids]) ->
    (*down residuals, mid residual), unscaled: the conditioning scale and guess mode are applied
    outside (cheap, and per request), exactly as ControlNetStepper applies them."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        self.stepper = ControlNetStepper(controlnet)

    def forward(self, sample, timestep, encoder_hidden_states, cond_embedding, text_embeds=None, time_ids=None):
        # Scale 1.0 and no guess mode: the step's own scaling multiplies by 1.0 (exact).
        residuals = self.stepper.step(
            sample, timestep, encoder_hidden_states, cond_embedding, 1.0, False, text_embeds, time_ids
        )
        return (*residuals.down_block_res_samples, residuals.mid_block_res_sample)


class VaeDecoderGraph(nn.Module):
    """(scaled latents) -> image in [-1, 1]: `AutoencoderKL.decode`, post_quant_conv included."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


@dataclass(frozen=True)
class PartSpec:
    """One part at one resolution: how to build its graph and example inputs."""

    name: str
    resolution: int  # image side in pixels
    batch_sizes: tuple[int, ...]  # the batch sizes it must serve (min..max becomes a dynamic range)

    @property
    def key(self) -> str:
        return f"{self.name}-{self.resolution}"


def graph_module(part: str, pipe, controlnet: ControlNetModel | None = None) -> nn.Module:
    if part == UNET_ENCODER:
        return UNetEncoderGraph(pipe.unet).eval()
    if part == UNET_DECODER:
        return UNetDecoderGraph(pipe.unet).eval()
    if part == CONTROLNET:
        if controlnet is None:
            raise ValueError("the controlnet part needs a ControlNet model")
        return ControlNetGraph(controlnet).eval()
    if part == VAE_DECODER:
        return VaeDecoderGraph(pipe.vae).eval()
    raise ValueError(f"unknown part {part!r}; one of {', '.join(ALL_PARTS)}")


def text_conditioning_shapes(pipe) -> tuple[int, int, int | None]:
    """(prompt length, cross-attention width, pooled text width or None) of the pipeline's text side."""
    unet = pipe.unet
    seq = pipe.tokenizer.model_max_length if getattr(pipe, "tokenizer", None) is not None else 77
    pooled = None
    if has_added_conditioning(unet):
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return seq, unet.config.cross_attention_dim, pooled


@torch.no_grad()
def example_inputs(
    part: str, pipe, resolution: int, batch: int, controlnet: ControlNetModel | None = None, seed: int = 0
) -> tuple:
    """Deterministic inputs of the right shapes and dtypes for `part` (for export and verification).

    The decoder's inputs come from running the eager encoder half, so they have realistic values.
    """
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    dtype, device = unet.dtype, unet.device
    latent = resolution // pipe.vae_scale_factor
    seq, width, pooled = text_conditioning_shapes(pipe)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    sample = randn(batch, unet.config.in_channels, latent, latent)
    timestep = torch.tensor(481.0, device=device)
    hidden = randn(batch, seq, width)
    added = ()
    if pooled is not None:
        time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype, device=device
        )
        added = (randn(batch, pooled), time_ids)
    if part == UNET_ENCODER:
        return (sample, timestep, hidden, *added)
    if part == UNET_DECODER:
        encoded = UNetEncoderGraph(unet)(sample, timestep, hidden, *added)
        skips = tuple(encoded[3:])
        residuals = tuple(randn(*s.shape, scale=0.1) for s in skips)
        return (encoded[0], encoded[1], encoded[2], skips, residuals, randn(*encoded[0].shape, scale=0.1))
    if part == CONTROLNET:
        stepper = ControlNetStepper(controlnet)
        image = torch.rand(batch, 3, resolution, resolution, generator=gen).to(device=device, dtype=dtype)
        return (sample, timestep, hidden, stepper.embed_condition(image), *added)
    if part == VAE_DECODER:
        return (randn(batch, pipe.vae.config.latent_channels, latent, latent),)
    raise ValueError(f"unknown part {part!r}")


def flat_tensors(outputs) -> list[torch.Tensor]:
    """A part's outputs as a flat list of tensors (for comparing compiled with eager)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    flat = []
    for item in outputs:
        flat.extend(flat_tensors(item))
    return flat
