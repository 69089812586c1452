"""Training shapes-sd15, stage by stage, seeded and resumable.

    python -m swiftd.shapeworld train --stage vae        --work .train/shapes
    python -m swiftd.shapeworld train --stage unet       --work .train/shapes   (text encoder with it)
    python -m swiftd.shapeworld train --stage controlnet --work .train/shapes
    python -m swiftd.shapeworld train --stage lora-outline --work .train/shapes
    python -m swiftd.shapeworld train --stage lora-pastel  --work .train/shapes
    python -m swiftd.shapeworld export --work .train/shapes --out weights

Each stage reads what the stages before it wrote to `--work` and writes `<stage>.pt` there every
`save_every` steps (weights, optimiser, step, seconds spent), so a stopped run resumes where it
stopped; batch `i` and its noise depend only on (seed, stage, i), so a resumed run trains on what
an uninterrupted one would. The text encoder is trained from scratch with the UNet (there is no
pretrained CLIP here); the ControlNet and the LoRAs train against the frozen UNet, as they do on
real SD1.5. Uses CUDA when there is a GPU.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from swiftd.shapeworld.data import training_batch
from swiftd.shapeworld.models import fresh_components, new_controlnet, tokenizer

STAGES = ("vae", "unet", "controlnet", "lora-outline", "lora-pastel")
CAPTION_DROPOUT = 0.1  # captions replaced by "" so the UNet also learns the unconditional prediction (CFG)
KL_WEIGHT = 1e-6
FOREGROUND_WEIGHT = 10.0
LORA_RANK = 8
VAE_STYLE_MIX = (None, None, "outline", "pastel")  # the VAE must reproduce the LoRAs' looks too


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    save_every: int = 200


DEFAULTS = {
    "vae": StageConfig(steps=4000, batch_size=16, lr=1e-3, save_every=100),
    "unet": StageConfig(steps=4200, batch_size=64, lr=4e-4),  # held-out prompt adherence 0.97 at 4000
    "controlnet": StageConfig(steps=1500, batch_size=64, lr=2e-4),
    "lora-outline": StageConfig(steps=1500, batch_size=64, lr=1e-3),
    "lora-pastel": StageConfig(steps=1000, batch_size=64, lr=1e-3),
}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _generator(config: StageConfig, stage: str, step: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{config.seed}/{stage}/{step}".encode()))


# -- what each stage trains ------------------------------------------------------------------------


class LoRA(torch.nn.Module):
    """Rank-r factors on the UNet's attention and feed-forward layers, added by forward hooks (the
    base weights stay untouched and frozen); the names are the UNet's module names."""

    def __init__(self, unet, rank: int = LORA_RANK):
        from swiftd.zoo.loras import unet_lora_targets

        super().__init__()
        # Linear layers only (attention projections, feed-forward); SD1.5's proj_in/proj_out are 1x1 convs.
        self.targets = [name for name, module in unet_lora_targets(unet) if isinstance(module, torch.nn.Linear)]
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        modules = dict(unet.named_modules())
        for name in self.targets:
            weight = modules[name].weight
            key = name.replace(".", "__")
            self.down[key] = torch.nn.Parameter(torch.randn(rank, weight.shape[1]) / weight.shape[1] ** 0.5)
            self.up[key] = torch.nn.Parameter(torch.zeros(weight.shape[0], rank))  # starts as a no-op
        self.hooks = []

    def attach(self, unet) -> None:
        modules = dict(unet.named_modules())
        for name in self.targets:
            key = name.replace(".", "__")

            def hook(module, inputs, output, key=key):
                return output + F.linear(F.linear(inputs[0], self.down[key]), self.up[key])

            self.hooks.append(modules[name].register_forward_hook(hook))

    def layers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name -> (down, up), scale 1."""
        return {
            name: (self.down[name.replace(".", "__")].data, self.up[name.replace(".", "__")].data)
            for name in self.targets
        }


def _encode_prompts(text_encoder, tok, captions: list[str], device) -> torch.Tensor:
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids.to(device))[0]


def _latents(vae, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def _drop_captions(captions: list[str], generator: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=generator, device=generator.device) >= CAPTION_DROPOUT
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def _noise_loss(unet, scheduler, latents, encoder_hidden_states, generator, residuals=None) -> torch.Tensor:
    """The noise-prediction loss of one batch; `residuals(noisy, timesteps)`, if given, are the
    ControlNet's (down, mid) residuals added to the UNet."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {}
    if residuals is not None:
        down, mid = residuals(noisy, timesteps)
        added = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    prediction = unet(noisy, timesteps, encoder_hidden_states, **added).sample
    return F.mse_loss(prediction, noise)


@dataclass
class Stage:
    """The modules a stage trains and the loss of one batch."""

    trained: dict[str, torch.nn.Module]
    loss: Callable[[int], torch.Tensor]
    # The steps of the frozen stages it trains against: a ControlNet or LoRA trained on a UNet
    # checkpoint still in training works on the later UNet (as those of SD1.5 work on its
    # fine-tunes), and TRAINING.json says which one it saw.
    trained_against: dict[str, int] = field(default_factory=dict)


def _stage(name: str, config: StageConfig, work: Path, device) -> Stage:
    parts = fresh_components(config.seed)
    for part in ("unet", "vae", "text_encoder"):
        parts[part].to(device)
    tok = tokenizer(work / "tokenizer")
    scheduler = parts["scheduler"]
    trained_against = {}
    if name != "vae":
        trained_against["vae"] = load_stage(parts, work / "vae.pt", ("vae",), device)["step"]
    if name not in ("vae", "unet"):
        trained_against["unet"] = load_stage(parts, work / "unet.pt", ("unet", "text_encoder"), device)["step"]

    def batch(step):
        style = {"lora-outline": "outline", "lora-pastel": "pastel"}.get(name)
        if name == "vae":
            style = VAE_STYLE_MIX[step % len(VAE_STYLE_MIX)]
        b = training_batch(config.seed, step, config.batch_size, style=style)
        return b, torch.from_numpy(b.images).to(device)

    if name == "vae":
        vae = parts["vae"]

        def vae_loss(step):
            _, images = batch(step)
            posterior = vae.encode(images).latent_dist
            latents = posterior.sample(generator=_generator(config, name, step, device))
            reconstruction = vae.decode(latents).sample
            # Shapes cover about a tenth of an image: unweighted, a VAE first learns (and long stays
            # at) the plain background. Pixels off the background (its colour is the corner's:
            # no shape reaches a corner) weigh FOREGROUND_WEIGHT times more.
            corner = images[:, :, :1, :1]
            foreground = ((images - corner).abs().amax(dim=1, keepdim=True) > 0.02).float()
            weight = 1.0 + (FOREGROUND_WEIGHT - 1.0) * foreground
            l1 = ((reconstruction - images).abs() * weight).sum() / (weight.sum() * images.shape[1])
            return l1 + KL_WEIGHT * posterior.kl().mean()

        return Stage({"vae": vae}, vae_loss, trained_against)

    unet, text_encoder, vae = parts["unet"], parts["text_encoder"], parts["vae"]
    if name == "unet":

        def unet_loss(step):
            b, images = batch(step)
            generator = _generator(config, name, step, device)
            states = _encode_prompts(text_encoder, tok, _drop_captions(b.captions, generator), device)
            return _noise_loss(unet, scheduler, _latents(vae, images), states, generator)

        return Stage({"unet": unet, "text_encoder": text_encoder}, unet_loss, trained_against)

    for frozen in (unet, text_encoder, vae):
        frozen.requires_grad_(False)
    if name == "controlnet":
        torch.manual_seed(config.seed)
        controlnet = new_controlnet(unet).to(device)

        def controlnet_loss(step):
            b, images = batch(step)
            edges = torch.from_numpy(b.edges()).to(device)
            generator = _generator(config, name, step, device)
            states = _encode_prompts(text_encoder, tok, _drop_captions(b.captions, generator), device)

            def residuals(noisy, timesteps):
                return controlnet(noisy, timesteps, states, controlnet_cond=edges, return_dict=False)

            return _noise_loss(unet, scheduler, _latents(vae, images), states, generator, residuals)

        return Stage({"controlnet": controlnet}, controlnet_loss, trained_against)

    lora = LoRA(unet).to(device)
    lora.attach(unet)

    def lora_loss(step):
        b, images = batch(step)
        generator = _generator(config, name, step, device)
        with torch.no_grad():
            states = _encode_prompts(text_encoder, tok, b.captions, device)
        return _noise_loss(unet, scheduler, _latents(vae, images), states, generator)

    return Stage({"lora": lora}, lora_loss, trained_against)


# -- checkpoints -----------------------------------------------------------------------------------


def load_stage(parts: dict, path: Path, names: tuple[str, ...], device="cpu") -> dict:
    """Load the modules `names` of a stage's checkpoint into `parts` (and the VAE's scaling
    factor, from the vae stage's); return the whole checkpoint (steps, time, config)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train the stage that writes it first")
    state = torch.load(path, map_location=device, weights_only=False)
    for name in names:
        parts[name].load_state_dict(state["modules"][name])
    if "scaling_factor" in state:
        parts["vae"].register_to_config(scaling_factor=state["scaling_factor"])
    return state


def _vae_scaling_factor(vae, config: StageConfig, device) -> float:
    """1 / std of the latents over a few batches, as SD1.5's 0.18215 was chosen."""
    with torch.no_grad():
        latents = [
            vae.encode(torch.from_numpy(training_batch(config.seed, -1 - i, 64).images).to(device)).latent_dist.mean
            for i in range(4)
        ]
    return float(1.0 / torch.cat(latents).std())


def train(
    name: str, work: Path, config: StageConfig | None = None, log: Callable[[str], None] = print, **overrides
) -> dict:
    """Train stage `name` to `config.steps` (resuming from `work/<name>.pt`); return its summary."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    config = replace(config or DEFAULTS[name], **overrides)
    device = _device()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"{name}.pt"
    stage = _stage(name, config, work, device)
    params = [p for module in stage.trained.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    step, seconds, losses = 0, 0.0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        for module_name, module in stage.trained.items():
            module.load_state_dict(state["modules"][module_name])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = state["step"], state["seconds"]
        log(f"[train] {name}: resuming at step {step} ({seconds / 60:.1f} min spent)")
    for module in stage.trained.values():
        module.train()

    def save() -> None:
        state = {
            "modules": {n: m.state_dict() for n, m in stage.trained.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
            "seconds": seconds,
            "config": asdict(config),
            "device": str(device),
            "trained_against": stage.trained_against,
        }
        if name == "vae":
            state["scaling_factor"] = _vae_scaling_factor(stage.trained["vae"], config, device)
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)  # a kill mid-save leaves the last checkpoint whole

    while step < config.steps:
        t0 = time.perf_counter()
        # Cosine decay to a tenth over the stage, so a longer run ends as settled as a shorter one.
        progress = step / config.steps
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))
        loss = stage.loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        seconds += time.perf_counter() - t0
        losses.append(loss.item())
        if step % config.save_every == 0 or step == config.steps:
            save()
            recent = losses[-config.save_every :]
            log(
                f"[train] {name}: step {step}/{config.steps} loss {sum(recent) / len(recent):.4f} "
                f"({seconds / step:.2f} s/step on {device}, {seconds / 60:.1f} min)"
            )
    return {"stage": name, "steps": step, "seconds": seconds, "device": str(device), "config": asdict(config)}
