"""Model loading from a model repository: folders, single files, ids that are names only."""

from __future__ import annotations

import shutil

import pytest
import torch

from services.unet.pipeline import UNetPipeline
from swiftd import zoo
from swiftd.errors import InvalidArgument, NotFound
from swiftd.loading import list_ids, load_pipeline, resolve
from swiftd.request import Request


def test_single_file_checkpoint_generates_like_the_folder(zoo_root, tmp_path):
    paths = zoo.zoo_paths(zoo_root, "tiny-sd15")
    # A repository holding only the single file, with its config folder given explicitly.
    (tmp_path / "models").mkdir()
    shutil.copy(paths.single_file, tmp_path / "models" / "real-sd15.safetensors")
    path = resolve(tmp_path, "models", "real-sd15", "model_id")
    assert path.is_file()
    single = load_pipeline(path, config=paths.model)
    folder = load_pipeline(paths.model)
    request = Request("a cat", width=64, height=64, num_inference_steps=3, seed=9, scheduler="ddim")
    a = UNetPipeline(single).generate(request).latents
    b = UNetPipeline(folder).generate(request).latents
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_single_file_without_config_is_a_clear_error(zoo_root, tmp_path):
    paths = zoo.zoo_paths(zoo_root, "tiny-sd15")
    shutil.copy(paths.single_file, tmp_path / "lonely.safetensors")
    with pytest.raises(NotFound, match="config"):
        load_pipeline(tmp_path / "lonely.safetensors")


def test_ids_are_names_not_paths(zoo_root):
    assert "tiny-sd15" in list_ids(zoo_root, "models")
    assert "tiny-sd15-cn-edges" in list_ids(zoo_root, "controlnets")
    for bad in ["../models/tiny-sd15", "/etc/passwd", "a/b", "", ".hidden"]:
        with pytest.raises(InvalidArgument, match="model_id"):
            resolve(zoo_root, "models", bad, "model_id")
    with pytest.raises(NotFound, match="'missing'"):
        resolve(zoo_root, "models", "missing", "model_id")
