"""The model zoo: what every other test, the demo and the benchmark rely on.

Builds the two tiny families once into a temporary zoo and checks that each artefact loads with
Diffusers' own loaders and actually does something (a zero ControlNet or no-op LoRA would make every
downstream test vacuous), that builds are byte-for-byte reproducible, and that the full-size
configurations have the real models' parameter counts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swiftd import zoo

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny-sd15", "tiny-sdxl"]
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo")
    zoo.build(out, only=TINY)
    return out


def _pipeline_class(paths: zoo.FamilyPaths):
    import diffusers

    return getattr(diffusers, paths.pipeline_class)


def _load_pipeline(zoo_dir: Path, family: str):
    paths = zoo.zoo_paths(zoo_dir, family)
    pipe = _pipeline_class(paths).from_pretrained(paths.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_inputs(unet, family: str):
    """A fixed (sample, timestep, text embedding, extra kwargs) for calling a tiny UNet/ControlNet."""
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if zoo.SPECS[family].kind == "sdxl":
        pooled = zoo.SPECS[family].text_encoders[1]["projection_dim"]
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return sample, torch.tensor(500), text, extra


# --- layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY)
def test_every_listed_artefact_exists(zoo_dir, family):
    paths = zoo.zoo_paths(zoo_dir, family)
    assert list(paths.controlnets) == [f"{family}-cn-edges", f"{family}-cn-depth"]
    assert list(paths.loras) == [
        f"{family}-lora-peft-r4",
        f"{family}-lora-peft-r64",
        f"{family}-lora-kohya-r16-te",
        f"{family}-lora-kohya-r8-conv",
    ]
    for p in paths.all_outputs():
        assert p.exists(), p
    assert (paths.model / "model_index.json").is_file()
    assert zoo.is_complete(zoo_dir, family)
    # Other users (service containers) must be able to read the repository.
    for p in paths.model.rglob("*.safetensors"):
        assert p.stat().st_mode & 0o044 == 0o044, p


def test_default_families_exclude_full_size():
    assert zoo.resolve_families() == ["tiny-sd15", "tiny-sdxl", "bench-sd15"]
    assert zoo.resolve_families(full=True)[-2:] == ["sd15", "sdxl"]
    assert zoo.resolve_families(only=["sdxl"]) == ["sdxl"]
    with pytest.raises(ValueError):
        zoo.resolve_families(only=["nope"])


# --- pipelines and tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY)
def test_pipeline_loads_and_generates(zoo_dir, family):
    pipe = _load_pipeline(zoo_dir, family)
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out)).all()
    assert out.std() > 0.01  # not a constant image
    # The latent grid is 1/8 of the image, as ControlNet's hint encoder requires.
    assert pipe.vae_scale_factor == 8


@pytest.mark.parametrize("family", TINY)
def test_tokenizer_is_a_real_clip_tokenizer(zoo_dir, family):
    from transformers import CLIPTextConfig, CLIPTokenizer

    model = zoo.zoo_paths(zoo_dir, family).model
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    ids = tok(PROMPT).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", *(w + "</w>" for w in PROMPT.split()), "<|endoftext|>"]
    assert tok.model_max_length == 77
    # Unknown words still tokenize, down to bytes, as in CLIP.
    assert tok.unk_token_id not in tok("zxqv!").input_ids[1:-1]
    cfg = CLIPTextConfig.from_pretrained(model / "text_encoder")
    # Saved in the real checkpoints' key layout, and loaded back without any re-initialised weight.
    from transformers import CLIPTextModel

    saved = load_file(model / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in saved)
    loaded = CLIPTextModel.from_pretrained(model / "text_encoder").state_dict()
    assert {zoo.te_checkpoint_name(k) for k in loaded} == set(saved)
    assert all(torch.equal(v, saved[zoo.te_checkpoint_name(k)]) for k, v in loaded.items())
    assert cfg.vocab_size >= len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    if zoo.SPECS[family].kind == "sdxl":
        tok2 = CLIPTokenizer.from_pretrained(model / "tokenizer_2")
        assert tok2.pad_token == "!"
        assert tok2(PROMPT).input_ids == ids


def test_single_file_checkpoint_loads_to_the_same_weights(zoo_dir):
    from diffusers import StableDiffusionPipeline

    paths = zoo.zoo_paths(zoo_dir, "tiny-sd15")
    keys = load_file(paths.single_file).keys()
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    folder = _load_pipeline(zoo_dir, "tiny-sd15")
    single = StableDiffusionPipeline.from_single_file(paths.single_file, config=str(paths.model), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


# --- ControlNets --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY)
def test_controlnets_load_and_have_nonzero_distinct_residuals(zoo_dir, family):
    from diffusers import ControlNetModel

    paths = zoo.zoo_paths(zoo_dir, family)
    pipe = _load_pipeline(zoo_dir, family)
    sample, t, text, extra = _unet_inputs(pipe.unet, family)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    residuals = []
    with torch.no_grad():
        base = pipe.unet(sample, t, text, **extra).sample
        for cn_path in paths.controlnets.values():
            cn = ControlNetModel.from_pretrained(cn_path, local_files_only=True)
            down, mid = cn(sample, t, text, controlnet_cond=hint, return_dict=False, **extra)
            assert len(down) == len(pipe.unet.down_blocks) * (pipe.unet.config.layers_per_block + 1)
            assert all(r.abs().mean() > 1e-3 for r in [*down, mid])
            assert all(torch.isfinite(r).all() for r in [*down, mid])
            out = pipe.unet(
                sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra
            ).sample
            change = ((out - base).std() / base.std()).item()
            assert 0.02 < change < 2.0, change  # meaningful, but does not swamp the UNet
            residuals.append(mid)
    assert not torch.allclose(residuals[0], residuals[1])


# --- LoRAs --------------------------------------------------------------------------------------


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _fused(zoo_dir, family, lora_id):
    """(pipeline, weights before, changed key sets) after load_lora_weights + fuse_lora."""
    paths = zoo.zoo_paths(zoo_dir, family)
    pipe = _load_pipeline(zoo_dir, family)
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    before = {n: _weights(getattr(pipe, n)) for n in ["unet", *encoders]}
    pipe.load_lora_weights(paths.loras[lora_id])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # drops the adapters; the fused weights stay, under their own names
    changed = {n: _changed(before[n], getattr(pipe, n)) for n in before}
    return pipe, before, changed


@pytest.mark.parametrize("kind", list(zoo.LORA_KINDS))
@pytest.mark.parametrize("family", TINY)
def test_lora_loads_fuses_and_changes_the_right_weights(zoo_dir, family, kind):
    pipe, _, changed = _fused(zoo_dir, family, f"{family}-lora-{kind}")
    unet_changed = changed.pop("unet")
    attn = {k for k in unet_changed if ".attentions." in k}
    convs = {k for k in unet_changed if ".resnets." in k}
    n_targets = len(zoo.unet_lora_targets(pipe.unet))
    assert len(attn) == n_targets  # every targeted UNet layer moved (no zero up matrices)
    assert all(k.endswith(".weight") for k in unet_changed)
    if kind.endswith("-conv"):
        assert len(convs) == 2 * sum(
            len(b.resnets) for b in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]
        )
    else:
        assert not convs
    for encoder, keys in changed.items():
        if kind.endswith("-te"):
            assert len(keys) == len(zoo.te_lora_targets(getattr(pipe, encoder))), encoder
        else:
            assert not keys, encoder


@pytest.mark.parametrize("family", TINY)
def test_fused_deltas_match_the_files(zoo_dir, family):
    """Fused weight - original == scale * up @ down, scale alpha/rank (kohya) or 1 (PEFT)."""
    spec = zoo.SPECS[family]

    def check(before, after, down, up, scale):
        if down.ndim == 4:  # conv LoRA: a kxk conv to rank channels, then a 1x1 conv
            expected = scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            expected = scale * up @ down
        torch.testing.assert_close(after - before, expected, rtol=1e-4, atol=1e-6)

    # kohya LoCon: one attention projection (linear alpha) and one 3x3 resnet conv (conv alpha).
    pipe, before, _ = _fused(zoo_dir, family, f"{family}-lora-kohya-r8-conv")
    sd = load_file(zoo.zoo_paths(zoo_dir, family).loras[f"{family}-lora-kohya-r8-conv"])
    rank = zoo.LORA_KINDS["kohya-r8-conv"][1]
    modules = [
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.1.resnets.2.conv2",
        "mid_block.resnets.1.conv1",
    ]
    for module in modules:
        name = zoo.kohya_unet_name(module, spec)
        alpha = sd[f"{name}.alpha"].item()
        assert alpha != rank
        after = pipe.unet.get_submodule(module).weight.detach()
        check(
            before["unet"][f"{module}.weight"],
            after,
            sd[f"{name}.lora_down.weight"],
            sd[f"{name}.lora_up.weight"],
            alpha / rank,
        )

    # kohya with text encoder(s): one UNet layer and one layer per text encoder.
    pipe, before, _ = _fused(zoo_dir, family, f"{family}-lora-kohya-r16-te")
    sd = load_file(zoo.zoo_paths(zoo_dir, family).loras[f"{family}-lora-kohya-r16-te"])
    rank = zoo.LORA_KINDS["kohya-r16-te"][1]
    targets = [
        ("unet", "down_blocks.1.attentions.0.proj_in", zoo.kohya_unet_name("down_blocks.1.attentions.0.proj_in", spec))
    ]
    for i, encoder in enumerate(["text_encoder", "text_encoder_2"][: len(spec.text_encoders)]):
        # transformers 5's CLIPTextModel has no `text_model.` level; kohya names always do.
        module = next(n for n, _ in zoo.te_lora_targets(getattr(pipe, encoder)) if n.endswith("layers.1.mlp.fc1"))
        name = zoo.kohya_te_name(module, i, spec)
        assert name == f"lora_te{'' if spec.kind == 'sd15' else i + 1}_text_model_encoder_layers_1_mlp_fc1"
        targets.append((encoder, module, name))
    for component, module, name in targets:
        after = getattr(pipe, component).get_submodule(module).weight.detach()
        alpha = sd[f"{name}.alpha"].item()
        check(
            before[component][f"{module}.weight"],
            after,
            sd[f"{name}.lora_down.weight"],
            sd[f"{name}.lora_up.weight"],
            alpha / rank,
        )

    # PEFT: no alpha stored, so scale 1.
    pipe, before, _ = _fused(zoo_dir, family, f"{family}-lora-peft-r4")
    sd = load_file(zoo.zoo_paths(zoo_dir, family).loras[f"{family}-lora-peft-r4"])
    module = "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    after = pipe.unet.get_submodule(module).weight.detach()
    check(
        before["unet"][f"{module}.weight"],
        after,
        sd[f"unet.{module}.lora_A.weight"],
        sd[f"unet.{module}.lora_B.weight"],
        1.0,
    )


# --- reproducibility and idempotence --------------------------------------------------------------


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_build_is_byte_identical_across_processes(zoo_dir, tmp_path):
    # A separate process (its own hash seed, fresh RNG state) must produce the very same bytes.
    other = tmp_path / "zoo-b"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, "-m", "swiftd.zoo", "build", "--out", str(other), "--only", *TINY],
        check=True,
        cwd=REPO,
        env=env,
    )
    a, b = _tree_hashes(zoo_dir), _tree_hashes(other)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_second_build_is_skipped(zoo_dir):
    marker = zoo.zoo_paths(zoo_dir, "tiny-sd15").marker
    mtimes = {p: p.stat().st_mtime_ns for p in zoo_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    t0 = time.perf_counter()
    zoo.build(zoo_dir, only=TINY)
    assert time.perf_counter() - t0 < 1.0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # A marker from another generator version means "rebuild".
    text = marker.read_text()
    try:
        marker.write_text(text.replace(zoo.ZOO_VERSION, "zoo-0"))
        assert not zoo.is_complete(zoo_dir, "tiny-sd15")
    finally:
        marker.write_text(text)
    assert zoo.is_complete(zoo_dir, "tiny-sd15")


# --- full-size and bench configurations -----------------------------------------------------------


def _meta_param_counts(family: str) -> dict[str, int]:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    spec = zoo.SPECS[family]
    with torch.device("meta"):  # shapes only: no memory, no init time
        unet = UNet2DConditionModel(**spec.unet)
        models = {
            "unet": unet,
            "controlnet": ControlNetModel.from_unet(
                unet, conditioning_embedding_out_channels=spec.cn_cond_channels, load_weights_from_unet=False
            ),
            "vae": AutoencoderKL(**spec.vae),
        }
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        for i, (cls, cfg) in enumerate(zip((CLIPTextModel, CLIPTextModelWithProjection), spec.text_encoders)):
            models[f"text_encoder{'' if i == 0 else '_2'}"] = cls(zoo.clip_text_config(cfg, zoo.TOKENIZER_PADS[i]))
    return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


@pytest.mark.parametrize(
    "family, expected",
    [
        # The published models' exact counts.
        ("sd15", {"unet": 859_520_964, "controlnet": 361_279_120, "vae": 83_653_863, "text_encoder": 123_060_480}),
        (
            "sdxl",
            {
                "unet": 2_567_463_684,
                "controlnet": 1_251_014_160,
                "vae": 83_653_863,
                "text_encoder": 123_060_480,
                "text_encoder_2": 694_659_840,
            },
        ),
    ],
)
def test_full_size_configs_match_the_real_models(family, expected):
    assert _meta_param_counts(family) == expected
    assert zoo.SPECS[family].fp16


@pytest.mark.parametrize("family", ["sd15", "sdxl", "tiny-sdxl"])
def test_kohya_names_map_back_through_diffusers(family):
    """Every kohya name the zoo writes (sgm numbering for SDXL) resolves to the intended module."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    spec = zoo.SPECS[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet)
    targets = {name for name, _ in zoo.unet_lora_targets(unet, convs=True)}
    sd = {}
    for module in targets:
        name = zoo.kohya_unet_name(module, spec)
        sd.update(
            {
                f"{name}.lora_down.weight": torch.zeros(1),
                f"{name}.lora_up.weight": torch.zeros(1),
                f"{name}.alpha": torch.tensor(1.0),
            }
        )
    pipe_cls = getattr(diffusers, zoo.zoo_paths(".", family).pipeline_class)
    converted, _ = pipe_cls.lora_state_dict(sd, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.split(".lora_A")[0] for k in peft if ".lora_A" in k} == targets


def test_bench_config_size():
    counts = _meta_param_counts("bench-sd15")
    assert 33e6 < counts["unet"] < 36e6
    assert 14e6 < counts["controlnet"] < 16e6
