"""The GPU serving benchmark's CPU rehearsal: `python -m bench.gpu_serve` end to end with the tiny
model, so the first run on a lent GPU is not the first run (docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~80 s: Diffusers and the whole suite as processes, four scenarios each, compiled
def test_the_gpu_serving_benchmark_runs_end_to_end_on_the_cpu(zoo_root, tmp_path):
    """As the next GPU lease runs it (`bench/gpu_session.sh compiled`): the workers on the graphs
    backend, the UNet worker's built at start, the ControlNet workers' by the CLI."""
    out = tmp_path / "gpu_serve.json"
    argv = [sys.executable, "-m", "bench.gpu_serve", "--device", "cpu", "--families", "tiny-sd15"]
    argv += ["--zoo", str(zoo_root), "--steps", "3", "--repeats", "1", "--layouts", "spread", "--out", str(out)]
    argv += ["--compiled", "--backend", "graphs"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    stages = data["families"]["tiny-sd15"]["stages"]
    assert set(stages) == {"zoo", "diffusers", "ours.spread"}
    assert all("result" in stage for stage in stages.values()), {k: v.get("error") for k, v in stages.items()}
    theirs, ours = stages["diffusers"]["result"]["scenarios"], stages["ours.spread"]["result"]["scenarios"]
    assert set(theirs) == set(ours) == {"base", "cn1", "cn1_lora1", "cn2_lora2"}
    for name, got in ours.items():
        assert got["latency_s"] > 0 and theirs[name]["latency_s"] > 0
        controlnets = {"base": 0, "cn1": 1, "cn1_lora1": 1, "cn2_lora2": 2}[name]
        # Every ControlNet streamed from its worker, over the shared-memory ring (one host).
        assert got["transports"] == ["shared_memory"] * controlnets, got
        # Every stage of the request, and what lay outside the denoising loop.
        assert {"denoise", "text_encode", "vae_decode", "plan"} <= set(got["stages_s"]), got["stages_s"]
        assert 0 < got["outside_denoising_s"] < got["latency_s"]
        if controlnets:
            parts = got["per_step_s"]
            assert parts["encoder_half"] > 0 and parts["decoder_half"] > 0 and parts["controlnet_compute"] > 0
            # The first step's transport (with the session's set-up) is part of all steps' (3 steps).
            assert 0 < parts["controlnet_first_step_transport"] <= parts["controlnet_transport"] * 3 + 1e-9, parts
    assert "lora_load_fuse" in theirs["cn1_lora1"]["stages"]  # Diffusers loads the LoRA per request
    ours_run = stages["ours.spread"]["result"]
    # Compiled at start; the LoRA swaps of the later scenarios compile nothing.
    compilations = ours_run["compilations"]
    assert compilations["after_first_request"]["dynamo_frames"] > 0, compilations
    assert compilations["at_end"] == compilations["after_first_request"], compilations
    warmed = [line for line in ours_run["controlnet_compile_log"] if "graphs warmed up" in line]
    assert len(warmed) == 2 and all("0 compiled anew" in line for line in warmed), warmed
    assert len(data["table"].splitlines()) == 2 + 4  # header, rule, a row per scenario
    assert all(len(row.split("|")) == 11 for row in data["table"].splitlines())  # 9 columns each
