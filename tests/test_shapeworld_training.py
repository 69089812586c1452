"""Training shapes-sd15: a few steps of every stage, resumed, exported, and loaded as a checkpoint.

The real training is long (its figures in docs/quality.md); this smoke run checks what CI can:
each stage runs and writes a checkpoint, a stopped stage resumes to the same weights as an
uninterrupted one, and the export is a model root Diffusers loads: the pipeline folder, the
ControlNet folder and both LoRA files (PEFT and kohya) in each style.
"""

import json

import pytest
import torch

from swiftd.shapeworld.export import CONTROLNET_ID, export, lora_id
from swiftd.shapeworld.models import FAMILY
from swiftd.shapeworld.render import STYLES
from swiftd.shapeworld.train import STAGES, train

TINY = dict(batch_size=2, save_every=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("shapes-train")
    for stage in STAGES:
        train(stage, work, steps=2, log=lambda line: None, **TINY)
    return work


def test_a_stopped_stage_resumes_to_the_weights_of_an_uninterrupted_run(work, tmp_path):
    (tmp_path / "vae.pt").write_bytes((work / "vae.pt").read_bytes())
    train("unet", tmp_path, steps=1, log=lambda line: None, **TINY)  # stopped after one step
    train("unet", tmp_path, steps=2, log=lambda line: None, **TINY)  # and resumed
    resumed = torch.load(tmp_path / "unet.pt", weights_only=False)
    straight = torch.load(work / "unet.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 2
    for name, tensor in straight["modules"]["unet"].items():
        torch.testing.assert_close(resumed["modules"]["unet"][name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_stage_needs_the_stages_before_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vae.pt"):
        train("unet", tmp_path, steps=1, **TINY)


def test_the_export_loads_as_a_real_checkpoint_with_controlnet_and_both_lora_formats(work, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    summary = export(work, tmp_path)
    assert set(summary["stages"]) == set(STAGES)
    # What each add-on was trained against is on record (it may be an earlier UNet checkpoint).
    assert summary["stages"]["controlnet"]["trained_against_steps"] == {"vae": 2, "unet": 2}
    assert summary["stages"]["unet"]["trained_against_steps"] == {"vae": 2}
    assert (
        json.loads((tmp_path / "TRAINING.json").read_text())["training_code_version"]
        == summary["training_code_version"]
    )
    controlnet = ControlNetModel.from_pretrained(tmp_path / "controlnets" / CONTROLNET_ID)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tmp_path / "models" / FAMILY, controlnet=controlnet, safety_checker=None
    )
    hint = torch.zeros(1, 3, 64, 64)
    for style in STYLES:
        for fmt in ("peft", "kohya"):
            pipe.load_lora_weights(
                tmp_path / "loras", weight_name=f"{lora_id(style, fmt)}.safetensors", adapter_name=f"{style}_{fmt}"
            )
    image = pipe(
        "a red circle at the top left on a white background",
        image=hint,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (64, 64, 3)


def test_evaluation_scores_held_out_prompts_through_diffusers(work, tmp_path):
    from swiftd.shapeworld.data import held_out_scenes, is_held_out
    from swiftd.shapeworld.evaluate import evaluate, reconstructions, summarise
    from swiftd.shapeworld.models import fresh_components
    from swiftd.shapeworld.render import edge_map, render

    scenes = held_out_scenes(8)
    assert all(is_held_out(s.caption()) for s in scenes)
    perfect = summarise([render(s) for s in scenes], scenes, [edge_map(s) for s in scenes])
    assert perfect.prompt_adherence == 1.0 and perfect.control_iou > 0.9 and perfect.style_hit["outline"] == 0
    untrained = reconstructions(fresh_components()["vae"].eval(), scenes)
    assert untrained[0].shape == (64, 64, 3) and summarise(untrained, scenes).prompt_adherence < 0.2
    export(work, tmp_path)
    scores = evaluate(tmp_path, count=2, controlnet=True, lora="outline")  # two training steps: noise
    assert 0.0 <= scores.prompt_adherence <= 1.0 and scores.control_iou is not None
