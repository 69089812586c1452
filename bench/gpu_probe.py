"""GPU probe: per-part step times of the split UNet and the ControlNet on CUDA, full-size models.

    python -m bench.gpu_probe [--families sd15 sdxl] [--iters 30]

Random-weight full-size SD1.5 (512², batch 2: CFG) and SDXL (1024², batch 2) UNets and
ControlNets in fp16, built on the GPU from the zoo's configs. Prints one JSON object: the split
UNet's agreement with the unsplit one, and milliseconds per call for the whole UNet, its encoder
and decoder halves, a ControlNet step with the hint embedded once (ours) and Diffusers' ControlNet
forward (hint every step), plus an in-place rank-64 LoRA apply/restore on the attention and
feed-forward weights. Whether a ControlNet on another GPU hides behind the encoder half is the
question these answer.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from bench.gpu_check import Timer
from swiftd.controlnet_step import ControlNetStepper
from swiftd.lora import LoraPatcher, WeightDelta
from swiftd.split_unet import SplitUNet
from swiftd.zoo import SPECS

SIZES = {"sd15": 512, "sdxl": 1024}


def timed_ms(fn, iters: int) -> float:
    """Mean milliseconds per call on the GPU (CUDA events, after 3 warm-up calls)."""
    return Timer("cuda").ms(fn, iters)


@torch.no_grad()
def probe(family: str, iters: int) -> dict:
    spec = SPECS[family]
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**spec.unet).half().eval()
        controlnet = (
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=spec.cn_cond_channels).half().eval()
        )
    for p in controlnet.parameters():  # from_unet zero-initialises the output convs
        if p.abs().max() == 0:
            p.normal_(0, 0.02)
    size = SIZES[family]
    latent = size // 8
    x = torch.randn(2, 4, latent, latent, device="cuda", dtype=torch.float16)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    t = torch.tensor(500, device="cuda")
    cond = torch.rand(2, 3, size, size, device="cuda", dtype=torch.float16)
    added = {}
    if spec.kind == "sdxl":
        proj = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, proj, device="cuda", dtype=torch.float16),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device="cuda", dtype=torch.float16),
        }
    split = SplitUNet(unet)
    stepper = ControlNetStepper(controlnet)
    hint = stepper.embed_condition(cond)
    te, ti = added.get("text_embeds"), added.get("time_ids")

    residuals = stepper.step(x, t, hidden, hint, 1.0, False, te, ti)
    encoded = split.encoder_half(x, t, hidden, te, ti)
    ours = split.decoder_half(encoded, residuals.down_block_res_samples, residuals.mid_block_res_sample)
    reference = unet(
        x,
        t,
        hidden,
        added_cond_kwargs=added or None,
        down_block_additional_residuals=residuals.down_block_res_samples,
        mid_block_additional_residual=residuals.mid_block_res_sample,
    ).sample
    result = {
        "family": family,
        "size": size,
        "batch": 2,
        "dtype": "float16",
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "split_vs_unet_max_abs_diff": (ours.float() - reference.float()).abs().max().item(),
        "unet_ms": timed_ms(lambda: unet(x, t, hidden, added_cond_kwargs=added or None), iters),
        "encoder_half_ms": timed_ms(lambda: split.encoder_half(x, t, hidden, te, ti), iters),
        "decoder_half_ms": timed_ms(
            lambda: split.decoder_half(encoded, residuals.down_block_res_samples, residuals.mid_block_res_sample), iters
        ),
        "controlnet_step_cached_hint_ms": timed_ms(lambda: stepper.step(x, t, hidden, hint, 1.0, False, te, ti), iters),
        "controlnet_hint_ms": timed_ms(lambda: stepper.embed_condition(cond), iters),
        "controlnet_diffusers_forward_ms": timed_ms(
            lambda: controlnet(x, t, hidden, controlnet_cond=cond, added_cond_kwargs=added or None, return_dict=False),
            iters,
        ),
        "residual_mb_fp16": sum(
            r.numel() * 2 for r in (*residuals.down_block_res_samples, residuals.mid_block_res_sample)
        )
        / 1e6,
    }
    # In-place rank-64 LoRA on attention q/k/v/out and feed-forward weights (as DESIGN.md's LoRA).
    patcher = LoraPatcher(type("P", (), {"unet": unet})())
    deltas = {}
    for name, p in unet.named_parameters():
        if (
            p.dim() == 2
            and any(k in name for k in ("to_q", "to_k", "to_v", "to_out.0", "ff.net"))
            and name.endswith("weight")
        ):
            deltas[f"unet.{name}"] = WeightDelta(
                torch.randn(p.shape[0], 64, device="cuda", dtype=torch.float16) * 0.01,
                torch.randn(64, p.shape[1], device="cuda", dtype=torch.float16) * 0.01,
            )
    result["lora_layers"] = len(deltas)
    result["lora_apply_restore_ms"] = timed_ms(lambda: (patcher.apply([("x", 1.0, deltas)]), patcher.restore()), 5)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__)
    parser.add_argument("--families", nargs="+", default=["sd15", "sdxl"], choices=sorted(SIZES))
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this probe needs a GPU", file=sys.stderr)
        return 2
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "results": [probe(f, args.iters) for f in args.families],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
