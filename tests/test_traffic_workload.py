"""The traffic catalog and the workload generator.

The catalog is built for tiny-sd15 (six LoRAs: every format/variant and rank 4..128; three
ControlNets) and read with the code the services use: the LoRA store prepares every LoRA against
the base model it loads through the catalog's symlink, ControlNets load as the ControlNet worker
loads them. A second build in another process gives the same bytes; a complete catalog is not
rebuilt, a broken one is. The generator is checked on the default 200-LoRA, 6-ControlNet catalog
as planned (no files needed): determinism, bounds, request validation, the published popularity
shape, arrival rates and burstiness; and through the CLI over the built catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from services.lora_store.store import LoraStore
from swiftd.loading import controlnet_family, list_ids, load_controlnet, load_pipeline, resolve
from swiftd.lora import extract_deltas
from swiftd.request import ControlNet, Limits, Lora, Request, validate
from swiftd.traffic.catalog import (
    CatalogConfig,
    build_catalog,
    is_complete,
    load_catalog,
    lora_path,
    plan_catalog,
)
from swiftd.traffic.trace import TraceEntry, read_header, read_trace, write_trace
from swiftd.traffic.workload import (
    WorkloadConfig,
    generate,
    popularity_stats,
    trace_header,
)

REPO = Path(__file__).resolve().parents[1]
# Six LoRAs: peft, kohya, peft, kohya-te, kohya-conv, peft at ranks 4, 8, 16, 32, 64, 128.
TINY = CatalogConfig(family="tiny-sd15", num_loras=6, num_controlnets=3)
BENCH_PLAN = plan_catalog(CatalogConfig())  # 200 LoRAs, 6 ControlNets: ids only, no files


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of each file, or the target of each symlink (not followed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file() and path.name != ".lock":
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def catalog_root(zoo_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("traffic") / "catalog"
    assert build_catalog(zoo_root, TINY, root) == root
    return root


# -- the catalog ----------------------------------------------------------------------------------


def test_catalog_lists_what_it_planned_in_the_model_root_layout(catalog_root, zoo_root):
    catalog = load_catalog(catalog_root)
    planned = plan_catalog(TINY)
    assert (catalog.model_id, catalog.loras, catalog.controlnets) == (
        planned.model_id,
        planned.loras,
        planned.controlnets,
    )
    assert [(lora.format, lora.has_te, lora.has_conv) for lora in catalog.loras] == [
        ("peft", False, False),
        ("kohya", False, False),
        ("peft", False, False),
        ("kohya", True, False),
        ("kohya", False, True),
        ("peft", False, False),
    ]
    assert [lora.rank for lora in catalog.loras] == [4, 8, 16, 32, 64, 128]
    assert len(set(catalog.controlnet_ids)) == 3
    # What a service lists under --model-root: exactly the catalog's ids, in the catalog's order.
    assert list_ids(catalog_root, "loras") == catalog.lora_ids
    assert list_ids(catalog_root, "controlnets") == catalog.controlnet_ids
    assert list_ids(catalog_root, "models") == ["tiny-sd15"]
    model = catalog_root / "models" / "tiny-sd15"
    assert model.is_symlink() and not os.readlink(model).startswith("/")
    assert model.resolve() == (zoo_root / "models" / "tiny-sd15").resolve()
    assert (catalog_root / "models" / "tiny-sd15.safetensors").is_file()


def test_every_lora_prepares_in_the_lora_store_and_has_its_rank_and_layers(catalog_root):
    catalog = load_catalog(catalog_root)
    store = LoraStore(catalog_root, cache_dir=None, host_budget_bytes=64 << 20)
    infos = {info.lora_id: info for info in store.list()}
    assert sorted(infos) == sorted(catalog.lora_ids)
    pipe = load_pipeline(resolve(catalog_root, "models", catalog.model_id, "model_id"))  # through the symlink
    for lora in catalog.loras:
        info = infos[lora.lora_id]
        assert (info.family, info.format, info.rank) == ("sd15", lora.format, lora.rank)
        # The store's whole preparation: base model via the symlink, every target mapped, shapes checked.
        prepared, tier, _ = store.entry(lora.lora_id, catalog.model_id)
        assert tier == "precompute" and len(prepared.deltas) == info.num_targets
        deltas = extract_deltas(pipe, lora_path(catalog_root, lora.lora_id))
        assert deltas.keys() == prepared.deltas.keys()
        assert {d.down.shape[0] for d in deltas.values()} == {lora.rank}
        assert any(name.startswith("text_encoder.") for name in deltas) == lora.has_te
        unet_weights = dict(pipe.unet.named_parameters(prefix="unet"))
        assert any(
            name in unet_weights and ".resnets." in name and unet_weights[name].ndim == 4 for name in deltas
        ) == (lora.has_conv)
        assert all(torch.isfinite(d.up).all() and d.up.abs().sum() > 0 for d in deltas.values())


def test_controlnets_load_as_the_worker_loads_them_and_all_differ(catalog_root):
    catalog = load_catalog(catalog_root)
    weights = []
    for cn_id in catalog.controlnet_ids:
        path = resolve(catalog_root, "controlnets", cn_id, "controlnet_id")
        assert controlnet_family(path) == "sd15"
        model = load_controlnet(path)
        weights.append(model.controlnet_cond_embedding.conv_in.weight.detach().clone())
        assert model.controlnet_down_blocks[0].weight.abs().sum() > 0  # not zero-initialised
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :])


def test_build_in_another_process_is_byte_identical_and_a_broken_catalog_is_rebuilt(catalog_root, zoo_root, tmp_path):
    other = tmp_path / "catalog"  # the same depth below a temp folder: the same relative symlinks
    args = ["--zoo", str(zoo_root), "--out", str(other), "--family", "tiny-sd15", "--num-loras", "6"]
    subprocess.run(
        [sys.executable, "-m", "swiftd.traffic", "catalog", *args, "--num-controlnets", "3"],
        check=True,
        cwd=REPO,
        env=_env(),
        capture_output=True,
    )
    expected = _tree(catalog_root)
    assert _tree(other) == expected

    # Complete: nothing is touched.
    mtimes = {p: p.lstat().st_mtime_ns for p in other.rglob("*")}
    t0 = time.perf_counter()
    build_catalog(zoo_root, TINY, other)
    assert time.perf_counter() - t0 < 1.0
    assert {p: p.lstat().st_mtime_ns for p in other.rglob("*")} == mtimes

    # A missing file, or a marker for another config, means rebuild; the result is the same bytes.
    lora_path(other, load_catalog(other).lora_ids[3]).unlink()
    assert not is_complete(other, TINY)
    build_catalog(zoo_root, TINY, other)
    assert _tree(other) == expected
    assert not is_complete(other, CatalogConfig(family="tiny-sd15", num_loras=5, num_controlnets=3))


# -- the generator --------------------------------------------------------------------------------


def _config(seed=0, **settings) -> WorkloadConfig:
    return WorkloadConfig(seed=seed, **{"num_requests": 400, "rate_rps": 2.0, **settings})


def test_same_seed_same_file_other_seed_other_trace(tmp_path):
    config = _config(seed=7)
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    for path, cfg in zip(paths, [config, config, _config(seed=8)]):
        write_trace(path, generate(cfg, BENCH_PLAN), header=trace_header(cfg, BENCH_PLAN))
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c
    header = read_header(paths[0])
    assert header == json.loads(json.dumps(trace_header(config, BENCH_PLAN)))
    assert WorkloadConfig.from_dict(header["config"]) == config


def test_trace_round_trips_through_the_file(tmp_path):
    entries = generate(_config(num_requests=50), BENCH_PLAN)
    write_trace(tmp_path / "t.jsonl", entries)
    again = read_trace(tmp_path / "t.jsonl")
    assert [(e.at_s, e.deadline_s, e.request) for e in again] == [(e.at_s, e.deadline_s, e.request) for e in entries]


def test_requests_stay_within_bounds_and_pass_request_validation():
    config = WorkloadConfig(seed=3, num_requests=1500, rate_rps=5.0)
    entries = generate(config, BENCH_PLAN)
    assert len(entries) == 1500
    lora_ids, cn_ids = set(BENCH_PLAN.lora_ids), set(BENCH_PLAN.controlnet_ids)
    times = [e.at_s for e in entries]
    assert times == sorted(times) and times[0] > 0
    assert len({e.request.request_id for e in entries}) == len(entries)
    limits = Limits()
    for entry in entries:
        pb = entry.request
        assert len(pb.controlnets) <= 3 and len(pb.loras) <= 2
        assert {cn.controlnet_id for cn in pb.controlnets} <= cn_ids
        assert {lora.lora_id for lora in pb.loras} <= lora_ids
        for cn in pb.controlnets:
            assert 0.0 <= cn.guidance_start < (cn.guidance_end or 1.0) <= 1.0
            assert 0.5 <= cn.conditioning_scale <= 1.0
        assert all(0.5 <= lora.scale <= 1.0 for lora in pb.loras)
        assert entry.deadline_s == config.deadline_s
        request = Request.from_pb(pb)
        validate(request, limits)  # raises InvalidArgument naming the field
        assert (request.width, request.height, request.num_inference_steps) == (128, 128, 10)
        assert request.model_id == BENCH_PLAN.model_id and request.seed is not None
        for cn in request.controlnets:
            assert cn.decoded_image().size == (128, 128)
    windows = Counter(
        "full" if (cn.guidance_start, cn.guidance_end) == (0.0, 1.0) else "early" if cn.guidance_start == 0 else "late"
        for e in entries
        for cn in e.request.controlnets
    )
    assert set(windows) == {"full", "early", "late"}


def test_popularity_has_the_published_shape():
    # The defaults over the 200-LoRA, 6-ControlNet catalog, for several seeds.
    for seed in range(3):
        stats = popularity_stats(generate(_config(seed=seed, num_requests=3000), BENCH_PLAN))
        assert 0.72 <= stats["controlnet_top5_share"] <= 0.98, stats
        assert 13 <= stats["loras_for_half_of_invocations"] <= 170, stats
        assert stats["distinct_loras"] > 150  # a long tail: most of the catalog is used
        assert abs(stats["addon_share"] - 0.8) < 0.03
        assert set(stats["controlnets_per_request"]) == {"0", "1", "2", "3"}
        assert set(stats["loras_per_request"]) == {"0", "1", "2"}
    # The popularity knobs move the shape: uniform LoRAs need far more ids for half of the uses.
    flat = WorkloadConfig(num_requests=3000, lora_zipf_s=0.0)
    assert popularity_stats(generate(flat, BENCH_PLAN))["loras_for_half_of_invocations"] > 60
    none = WorkloadConfig(num_requests=300, addon_share=0.0)
    assert popularity_stats(generate(none, BENCH_PLAN))["addon_share"] == 0.0


def test_popularity_stats_of_a_known_trace():
    def entry(at_s, cns=(), loras=()):
        request = Request(
            prompt="p",
            width=64,
            height=64,
            controlnets=[ControlNet(c, b"", guidance_end=0.5) for c in cns],
            loras=[Lora(lora) for lora in loras],
        )
        return TraceEntry(at_s, request.to_pb())

    entries = [
        entry(1.0, cns=["a", "b"], loras=["x"]),
        entry(2.0, cns=["a"], loras=["x", "y"]),
        entry(3.0, cns=["c", "d", "e"]),
        entry(4.0, cns=["f"], loras=["z"]),
        entry(5.0),
    ]
    stats = popularity_stats(entries)
    assert stats["requests"] == 5 and stats["mean_rate_rps"] == 1.0
    assert stats["addon_share"] == 0.8
    assert stats["controlnet_invocations"] == 7 and stats["controlnet_top5_share"] == round(6 / 7, 4)  # a, b..e
    assert stats["lora_invocations"] == 4 and stats["loras_for_half_of_invocations"] == 1  # x: 2 of 4
    assert stats["controlnets_per_request"] == {"0": 1, "1": 2, "2": 1, "3": 1}
    assert stats["loras_per_request"] == {"0": 2, "1": 2, "2": 1}
    assert stats["controlnet_mean_window"] == 0.5


def _dispersion(times: list[float], window_s: float) -> float:
    """Variance / mean of arrivals per window: 1 for Poisson, larger for bursty traffic."""
    counts = np.bincount((np.array(times) // window_s).astype(int))
    return float(counts.var() / counts.mean())


def test_poisson_rate_and_bursty_arrivals_at_the_same_mean_rate():
    poisson = generate(_config(seed=1, num_requests=4000, rate_rps=10.0), BENCH_PLAN)
    bursty = generate(
        _config(seed=1, num_requests=4000, rate_rps=10.0, arrival="bursty", burst_cycle_s=10.0), BENCH_PLAN
    )
    assert abs(popularity_stats(poisson)["mean_rate_rps"] - 10.0) < 0.5  # 3 standard errors
    assert abs(popularity_stats(bursty)["mean_rate_rps"] - 10.0) < 1.5  # fewer independent periods
    d_poisson, d_bursty = _dispersion([e.at_s for e in poisson], 1.0), _dispersion([e.at_s for e in bursty], 1.0)
    assert 0.7 < d_poisson < 1.3
    assert d_bursty > 3 * d_poisson
    # Arrivals have their own random stream: another add-on mix leaves the send times alone.
    other_mix = _config(seed=1, num_requests=4000, rate_rps=10.0, addon_share=0.3, lora_zipf_s=1.2)
    assert [e.at_s for e in generate(other_mix, BENCH_PLAN)] == [e.at_s for e in poisson]


def test_duration_bounds_the_trace_and_bad_configs_are_refused():
    entries = generate(_config(num_requests=None, duration_s=60.0, rate_rps=5.0), BENCH_PLAN)
    assert entries[-1].at_s < 60.0 and 220 < len(entries) < 380
    for bad in (
        _config(duration_s=10.0),  # both a count and a duration
        _config(arrival="steady"),
        _config(rate_rps=0.0),
        WorkloadConfig(controlnets_per_request=(1.0, 0.0), loras_per_request=(1.0,)),  # no add-on to add
        WorkloadConfig(loras_per_request=(0.5, -0.1, 0.6)),
    ):
        with pytest.raises(ValueError):
            generate(bad, BENCH_PLAN)


def test_cli_generates_the_same_trace_as_the_library(catalog_root, tmp_path):
    out = tmp_path / "trace.jsonl"
    args = ["--catalog", str(catalog_root), "--out", str(out), "--seed", "5", "--num-requests", "60"]
    result = subprocess.run(
        [sys.executable, "-m", "swiftd.traffic", "generate", *args, "--rate", "3", "--arrival", "bursty"],
        check=True,
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    stats = json.loads(result.stdout)
    assert stats["requests"] == 60
    catalog = load_catalog(catalog_root)
    config = WorkloadConfig.from_dict(read_header(out)["config"])
    assert (config.seed, config.arrival, config.rate_rps) == (5, "bursty", 3.0)
    library = tmp_path / "library.jsonl"
    write_trace(library, generate(config, catalog), header=trace_header(config, catalog))
    assert out.read_bytes() == library.read_bytes()
    entries = read_trace(out)
    assert stats == popularity_stats(entries)
    assert {lora.lora_id for e in entries for lora in e.request.loras} <= set(catalog.lora_ids)
    assert {cn.controlnet_id for e in entries for cn in e.request.controlnets} <= set(catalog.controlnet_ids)
    for entry in entries:
        validate(Request.from_pb(entry.request), Limits())
