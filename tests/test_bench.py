"""The benchmark harness end to end on the tiny model: both sides run, every stable figure is
written with a positive value, and other groups' lines in the results file survive. No speed is
asserted (tiny models on a shared CPU say nothing about it)."""

from __future__ import annotations

import json

import pytest

from bench import run as bench_run

SCENARIOS = ("base", "cn1", "cn1_lora1", "cn2_lora2")
STABLE = {
    "baseline": [
        *(f"{side}.latency_s.{s}" for side in ("diffusers", "diffusers_2cores", "ours") for s in SCENARIOS),
        *(f"{kind}.{s}" for kind in ("speedup", "speedup_equal_cores") for s in SCENARIOS),
        *(f"ours.lora_restore_s.{s}" for s in ("cn1_lora1", "cn2_lora2")),
        *(
            f"ours.stage_s.{s}.{stage}"
            for s in SCENARIOS
            for stage in ("text_encode", "denoise", "denoise.encoder_half", "denoise.decoder_half", "vae_decode")
        ),
        *(f"ours.stage_s.{s}.lora_unet_patch" for s in ("cn1_lora1", "cn2_lora2")),
        *(f"ours.stage_s.{s}.denoise.controlnet_wait" for s in ("cn1", "cn1_lora1", "cn2_lora2")),
    ],
    "lora": [
        "diffusers.lora_load_fuse_s",
        "diffusers.lora_unfuse_unload_s",
        "ours.lora_apply_s",
        "ours.lora_restore_s",
        "lora.swap_s.diffusers",
        "lora.swap_s.ours",
        "lora.swap_speedup",
        "lora.swap_speedup.first_use",
        "lora.critical_path_fraction.stages",
        "lora.critical_path_fraction.stages_min",
        "lora.critical_path_fraction.stages_max",
        "lora.store.prepare_mb_s",
        "lora.store.stream_mb_s",
        "lora.critical_path_fraction",
        "lora.critical_path_fraction.k2",
        "lora.bal_applied_step.on_arrival",
        *(f"lora.bal_{m}.{k}" for m in ("psnr_db", "ssim") for k in ("k2", "k5", "k10", "on_arrival")),
    ],
    "controlnet": [
        "controlnet.addon_overhead",
        "controlnet.addon_overhead.diffusers",
        "controlnet.addon_overhead.inline",
        "controlnet.transport_fraction",
        "controlnet.transport_fraction.inline",
        *(f"controlnet.step_s.{part}" for part in ("encoder_half", "decoder_half", "controlnet", "wait", "transport")),
        "controlnet.step_s.transport.inline",
        "controlnet.first_step_s.transport",
        "controlnet.speedup.cn1",
        "controlnet.fp32_wire_psnr_db",
        "controlnet.fp16_wire_psnr_db",
    ],
}


# Figures that may be zero or negative (a step index; a ratio minus 1 that noise can push below 0).
SIGNED = {"lora.critical_path_fraction", "lora.critical_path_fraction.k2", "lora.bal_applied_step.on_arrival"}


def expected_unit(name: str) -> str:
    if "psnr_db" in name:
        return "dB"
    if name.endswith("_mb_s"):
        return "MB/s"
    if "applied_step" in name:
        return "step"
    return "x" if any(word in name for word in ("speedup", "overhead", "fraction", "ssim")) else "s"


@pytest.mark.slow  # ~30 s: starts the worker service and the Diffusers process
def test_bench_harness_writes_stable_figures(zoo_root, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    other = {"figure": "other.thing_s", "value": 1.0, "unit": "s", "group": "other"}
    stale = {"figure": "ours.latency_s.gone", "value": 9.0, "unit": "s", "group": "baseline"}
    out.write_text(json.dumps(other) + "\n" + json.dumps(stale) + "\n")

    argv = [
        "--zoo",
        str(zoo_root),
        "--family",
        "tiny-sd15",
        "--size",
        "64",
        "--steps",
        "11",
        "--out",
        str(out),
        "--no-pin",
        "--quiet",
    ]
    assert bench_run.main(argv + ["--only", "baseline,lora,controlnet"]) == 0

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert other in lines, "another group's line was dropped"
    assert stale not in lines, "a stale line of a group that ran was kept"
    by_name = {line["figure"]: line for line in lines}
    assert len(by_name) == len(lines), "duplicate figure names"
    for group, names in STABLE.items():
        for name in names:
            assert name in by_name, f"missing figure {name}"
            figure = by_name[name]
            assert figure["group"] == group
            assert figure["unit"] == expected_unit(name), figure
            assert isinstance(figure["value"], float | int), figure
            assert figure["value"] > 0 or (name in SIGNED and figure["value"] > -1), figure
    for line in lines:
        if line == other:
            continue
        assert set(line) == {"figure", "value", "unit", "group", "hardware", "dtype"}
        assert line["unit"] in ("s", "x", "dB", "MB/s", "MB", "step")
        assert line["dtype"] and line["hardware"] and all(line["hardware"].values()), line
    for name in [n for n in by_name if n.startswith(("speedup", "controlnet.speedup", "lora.swap_speedup"))]:
        assert {"ours", "diffusers"} <= set(by_name[name]["hardware"]), f"{name}: the hardware of each side"
    equal = by_name["speedup_equal_cores.base"]["hardware"]
    assert "2 threads" in equal["diffusers"] and "2 threads" not in by_name["speedup.base"]["hardware"]["diffusers"]

    printed = capsys.readouterr().out
    assert "speedup" in printed and "cn2_lora2" in printed  # the table
    assert json.dumps(by_name["speedup.base"]) in printed  # the figures, one JSON line each


def test_images_that_differ_stop_the_comparison():
    """The negative control of the bench's same-image check: one pixel off by more than the
    tolerance refuses the run; within it passes."""
    import io

    import numpy as np
    import PIL.Image

    from bench.scenarios import IMAGE_TOLERANCE, check_same_image

    def png(array):
        buffer = io.BytesIO()
        PIL.Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    base = np.full((8, 8, 3), 100)
    near, far = base.copy(), base.copy()
    near[3, 4, 1] += IMAGE_TOLERANCE
    far[3, 4, 1] += IMAGE_TOLERANCE + 1
    assert check_same_image(png(base), png(near), "near") == IMAGE_TOLERANCE
    with pytest.raises(RuntimeError, match="differ by 3"):
        check_same_image(png(base), png(far), "far")


def test_write_results_keeps_other_groups(tmp_path):
    out = tmp_path / "r.jsonl"
    bench_run.write_results(out, [bench_run.Figure("a.x_s", 1.0, "s", "g1")], ["g1"])
    bench_run.write_results(out, [bench_run.Figure("b.y", 2.0, "x", "g2")], ["g2"])
    bench_run.write_results(out, [bench_run.Figure("a.z_s", 3.0, "s", "g1")], ["g1"])
    assert [json.loads(line)["figure"] for line in out.read_text().splitlines()] == ["b.y", "a.z_s"]


def test_the_projection_lays_a_step_out_as_the_planner_does():
    """One GPU runs ControlNets in turn; a second hides one behind the encoder half unless it is
    longer; the CFG split halves the batch; the better layout is the one reported."""
    from bench.projection import StepParts, project, step_seconds

    parts = StepParts(encoder=0.014, decoder=0.017, controlnet=0.012, transport=0.001, batch1_fraction=0.6)
    assert step_seconds(parts, 1, 2, split=False) == pytest.approx(0.014 + 2 * 0.012 + 0.017)
    assert step_seconds(parts, 2, 1, split=False) == pytest.approx(0.014 + 0.017)  # hidden: 0.013 < 0.014
    assert step_seconds(parts, 2, 2, split=False) == pytest.approx(0.014 + (0.024 + 0.001 - 0.014) + 0.017)
    assert step_seconds(parts, 2, 1, split=True) == pytest.approx(0.6 * (0.014 + 0.012 + 0.017) + 0.001)
    rows = project(parts, steps=30, controlnets=1)
    assert [r["gpus"] for r in rows] == [1, 2, 4, 8] and rows[0]["layout"] == "pack"
    assert all(r["latency_s"] == min(r["spread_s"], r["split_s"] or r["spread_s"]) for r in rows)
    assert rows[-1]["latency_s"] <= rows[0]["latency_s"]
