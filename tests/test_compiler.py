"""The compiler: artifacts that match eager, survive LoRA swaps without recompiling, and start warm.

Bound: every compiled part equals the eager part within 1e-4 x max(1, max |eager|) (fp32, tiny
models, 64 px, batch 1 and 2), the UNet halves with and without ControlNet residuals; whole
requests through the engine within 1e-3 of the eager engine's latents.

The artifacts are built once per module (compiling a tiny part takes 20-50 s on 2 cores): the
tiny SD1.5 UNet halves and VAE decoder by a UNet worker started with --compile-missing (which is
also the "compiles from scratch" side of the warm-start test), the SD1.5 ControlNet by the CLI,
both with the CPU default, freezing (constants re-packed from the live weights after a patch:
compiler/frozen.py); the tiny SDXL UNet halves through the Python API without freezing (the
compiled code reads the parameters in place). Both modes go through every equivalence and swap test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compiler import parts as P
from compiler.artifacts import MANIFEST, ArtifactCorrupt, ArtifactMismatch, read_manifest
from compiler.build import build
from compiler.export import export_part, folded_constants, lifted_weights
from compiler.runtime import CompiledBackbone, compile_activity
from services.unet.pipeline import UNetPipeline
from swiftd import codec, rpc, zoo
from swiftd.controlnet_step import ControlNetStepper
from swiftd.launcher import start_controlnet, start_lora_store, start_unet
from swiftd.lora import LoraPatcher, extract_deltas
from swiftd.request import ControlNet, Request
from swiftd.split_unet import SplitUNet
from swiftd.v1 import common_pb2, controlnet_pb2, controlnet_pb2_grpc, unet_pb2, unet_pb2_grpc
from tests.reference import conditioning_image

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # of max(1, max |eager|), per part
ENGINE_TOLERANCE = 1e-3  # latents after a whole request
SIZE = 64


def assert_matches(compiled, eager, tolerance=TOLERANCE):
    got, want = P.flat_tensors(compiled), P.flat_tensors(eager)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = max(1.0, w.abs().max().item())
        diff = (g - w).abs().max().item()
        assert diff <= tolerance * scale, f"max |compiled - eager| {diff:.3g} > {tolerance} x {scale:.3g}"


def run_cli(*args, timeout=900, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compiler", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture(scope="module")
def cold_start(zoo_root, tmp_path_factory):
    """A UNet worker that compiles its artifacts at start: (artifact dir, seconds to SERVING, log)."""
    directory = tmp_path_factory.mktemp("artifacts") / "tiny-sd15"
    t0 = time.monotonic()
    worker = start_unet(
        zoo_root,
        "tiny-sd15",
        num_threads=1,
        timeout=900,
        extra_args=["--compiled-artifacts", str(directory), "--compile-missing", "--compile-resolution", str(SIZE)],
    )
    seconds = time.monotonic() - t0
    log = worker.log_tail(400)
    worker.stop()
    return directory, seconds, log


@pytest.fixture(scope="module")
def sd15_backbone(sd15, cold_start):
    return CompiledBackbone.load(cold_start[0], sd15.pipe)


@pytest.fixture(scope="module")
def sd15_controlnet_artifacts(zoo_root, tmp_path_factory):
    """The tiny SD1.5 ControlNet architecture, built by the CLI as a release pipeline would."""
    out = tmp_path_factory.mktemp("cn-artifacts") / "tiny-sd15-cn"
    result = run_cli(
        "build",
        "--model-root",
        zoo_root,
        "--model-id",
        "tiny-sd15",
        "--resolution",
        SIZE,
        "--batch",
        1,
        2,
        "--parts",
        "controlnet",
        "--controlnet-id",
        "tiny-sd15-cn-edges",
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sdxl_backbone(sdxl, tmp_path_factory):
    """Built without freezing: the compiled code reads the parameters in place."""
    out = tmp_path_factory.mktemp("sdxl-artifacts") / "tiny-sdxl"
    build(
        sdxl.pipe,
        out,
        model_id="tiny-sdxl",
        resolutions=[SIZE],
        batch_sizes=[1, 2],
        parts=[P.UNET_ENCODER, P.UNET_DECODER],
        options={"freezing": False},
    )
    return CompiledBackbone.load(out, sdxl.pipe)


def step_inputs(fam, batch, seed=0):
    return P.example_inputs(P.UNET_ENCODER, fam.pipe, SIZE, batch, seed=seed)


def residuals_like(encoded, seed):
    gen = torch.Generator().manual_seed(seed)
    down = tuple(torch.randn(r.shape, generator=gen) * 0.1 for r in encoded.down_block_res_samples)
    return down, torch.randn(encoded.sample.shape, generator=gen) * 0.1


# -- what every backend consumes: exported programs with weights as inputs ----------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exported_halves_take_every_weight_as_an_input(family, request):
    """The programs torch-tensorrt builds refittable engines from (and Inductor compiles): every
    parameter is a PARAMETER input, none is folded into a constant, the batch is dynamic, and the
    program computes what the module does."""
    fam = request.getfixturevalue(family)
    for part in (P.UNET_ENCODER, P.UNET_DECODER):
        module = P.graph_module(part, fam.pipe)
        inputs = P.example_inputs(part, fam.pipe, SIZE, 2)
        program = export_part(part, module, inputs, (1, 2))
        params = {name for name, _ in module.named_parameters()}
        assert params <= set(lifted_weights(program)), sorted(params - set(lifted_weights(program)))[:3]
        assert not folded_constants(program)
        assert {(r.lower, r.upper) for r in program.range_constraints.values()} == {(1, 2)}  # batch 1..2
        with torch.no_grad():
            assert_matches(program.module()(*inputs), module(*inputs), tolerance=1e-6)


def test_exported_controlnet_and_vae_take_every_weight_as_an_input(sd15):
    controlnet = sd15.controlnets["tiny-sd15-cn-edges"]
    for part, batches in ((P.CONTROLNET, (1, 2)), (P.VAE_DECODER, (1,))):
        module = P.graph_module(part, sd15.pipe, controlnet)
        program = export_part(part, module, P.example_inputs(part, sd15.pipe, SIZE, batches[-1], controlnet), batches)
        params = {name for name, _ in module.named_parameters()}
        assert params <= set(lifted_weights(program))
        assert not folded_constants(program)


def test_tensorrt_build_is_refused_cleanly_without_tensorrt(zoo_root, tmp_path):
    try:
        import torch_tensorrt  # noqa: F401

        pytest.skip("torch_tensorrt is installed here: bench/gpu_check.py exercises the engine build")
    except ImportError:
        pass
    result = run_cli(
        "build",
        "--model-root",
        zoo_root,
        "--model-id",
        "tiny-sd15",
        "--backend",
        "tensorrt",
        "--device",
        "cuda",
        "--resolution",
        SIZE,
        "--out",
        tmp_path / "trt",
        timeout=120,
    )
    assert result.returncode == 4, result.stderr[-2000:]
    assert "torch_tensorrt cannot be imported" in result.stderr and "pip install" in result.stderr
    assert not (tmp_path / "trt").exists()


def test_tensorrt_engine_build_and_refit(sd15):
    """Runs where TensorRT is (a CUDA machine with torch-tensorrt); skipped with the reason elsewhere."""
    from compiler import tensorrt

    reason = tensorrt.unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_check",
            "--family",
            "tiny-sd15",
            "--size",
            str(SIZE),
            "--stages",
            "tensorrt",
            "--out",
            "/dev/stdout",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and '"error"' not in result.stdout, result.stdout + result.stderr


# -- compiled equals eager -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_compiled_halves_match_eager_with_and_without_controlnet_residuals(family, request):
    fam = request.getfixturevalue(family)
    backbone = request.getfixturevalue(f"{family}_backbone")
    compiled, eager = backbone.split_unet(), SplitUNet(fam.pipe.unet)
    with torch.no_grad():
        for batch in (1, 2):
            inputs = step_inputs(fam, batch, seed=batch)
            encoded, eager_encoded = compiled.encoder_half(*inputs), eager.encoder_half(*inputs)
            assert_matches(
                (encoded.sample, encoded.emb, encoded.encoder_hidden_states, encoded.down_block_res_samples),
                (
                    eager_encoded.sample,
                    eager_encoded.emb,
                    eager_encoded.encoder_hidden_states,
                    eager_encoded.down_block_res_samples,
                ),
            )
            assert_matches(compiled.decoder_half(eager_encoded), eager.decoder_half(eager_encoded))
            down, mid = residuals_like(eager_encoded, seed=10 + batch)
            assert_matches(
                compiled.decoder_half(eager_encoded, down, mid), eager.decoder_half(eager_encoded, down, mid)
            )
            # DDIM hands out int64 timesteps, Euler float32: both reach the compiled graph as float32.
            int_inputs = (inputs[0], torch.tensor(481), *inputs[2:])
            assert_matches(compiled.encoder_half(*int_inputs).sample, eager.encoder_half(*int_inputs).sample)
    calls = backbone.calls()
    assert calls[P.UNET_ENCODER].get("eager", 0) == 0 and calls[P.UNET_DECODER].get("eager", 0) == 0


@pytest.mark.slow
def test_compiled_controlnet_and_vae_match_eager(sd15, sd15_backbone, sd15_controlnet_artifacts):
    controlnet = sd15.controlnets["tiny-sd15-cn-edges"]
    stepper = CompiledBackbone.load(sd15_controlnet_artifacts, sd15.pipe).controlnet_stepper(controlnet)
    eager = ControlNetStepper(controlnet)
    with torch.no_grad():
        for batch, scale, guess in ((2, 1.0, False), (2, 0.6, True), (1, 0.8, False)):
            sample, timestep, hidden, hint = P.example_inputs(
                P.CONTROLNET, sd15.pipe, SIZE, batch, controlnet, seed=batch
            )
            hint = hint.to(memory_format=torch.channels_last)  # as the hint encoder returns it for images
            got = stepper.step(sample, timestep, hidden, hint, scale, guess)
            want = eager.step(sample, timestep, hidden, hint, scale, guess)
            assert_matches(
                (got.down_block_res_samples, got.mid_block_res_sample),
                (want.down_block_res_samples, want.mid_block_res_sample),
            )
        assert stepper.dispatch.calls == {"compiled": 3}
        latents = P.example_inputs(P.VAE_DECODER, sd15.pipe, SIZE, 1)[0]
        assert_matches(
            sd15_backbone.vae_decode(sd15.pipe.vae, latents), sd15.pipe.vae.decode(latents, return_dict=False)[0]
        )
    assert sd15_backbone.calls()[P.VAE_DECODER] == {"compiled": 1}


@pytest.mark.slow
def test_compiled_engine_matches_eager_engine(zoo_root, sd15, sd15_backbone, sd15_controlnet_artifacts):
    """Whole requests (CFG and not, a ControlNet in-process, a LoRA) through UNetPipeline,
    compiled vs eager; the frozen constants of patched weights are re-packed in the patch stage."""
    cn_backbone = CompiledBackbone.load(sd15_controlnet_artifacts, sd15.pipe)
    steppers = {cid: cn_backbone.controlnet_stepper(model) for cid, model in sd15.controlnets.items()}
    lora_path = zoo.zoo_paths(zoo_root, "tiny-sd15").loras["tiny-sd15-lora-peft-r64"]
    load_lora = {"r64": extract_deltas(sd15.pipe, lora_path)}.__getitem__
    engine = UNetPipeline(sd15.pipe, load_controlnet=steppers.__getitem__, load_lora=load_lora, backbone=sd15_backbone)
    eager = UNetPipeline(
        sd15.pipe, load_controlnet=lambda cid: ControlNetStepper(sd15.controlnets[cid]), load_lora=load_lora
    )

    def request(guidance, controlnets=(), loras=()):
        return Request(
            "a photo of a cat",
            height=SIZE,
            width=SIZE,
            num_inference_steps=5,
            seed=5,
            scheduler="euler",
            guidance_scale=guidance,
            loras=list(loras),
            controlnets=[ControlNet(c, conditioning_image(1), 0.8) for c in controlnets],
        )

    base = {}
    for guidance, controlnets in ((7.5, []), (1.0, []), (7.5, ["tiny-sd15-cn-edges"])):
        ours, reference = (
            engine.generate(request(guidance, controlnets)),
            eager.generate(request(guidance, controlnets)),
        )
        assert (ours.latents - reference.latents).abs().max().item() <= ENGINE_TOLERANCE
        base[guidance, bool(controlnets)] = ours.latents
    # A LoRA: its weights' frozen constants are re-packed in the lora_unet_patch stage, by the
    # engine's refresh (the parts would otherwise do it themselves at their next call).
    refreshed = []
    refresh = sd15_backbone.refresh
    sd15_backbone.refresh = lambda: refreshed.append(refresh()) or refreshed[-1]
    try:
        with_lora = engine.generate(request(7.5, loras=[("r64", 0.8)]))
    finally:
        del sd15_backbone.refresh
    assert refreshed and refreshed[0] > 0 and with_lora.lora_applied_at_step == 0
    # The next request without it restores the base weights (and re-packs them) in the engine.
    after = engine.generate(request(7.5, ["tiny-sd15-cn-edges"]))
    assert (after.latents - base[7.5, True]).abs().max().item() <= ENGINE_TOLERANCE
    reference = eager.generate(request(7.5, loras=[("r64", 0.8)]))  # the same pipe, base weights again
    eager.lora_patcher.restore()
    assert (with_lora.latents - reference.latents).abs().max().item() <= ENGINE_TOLERANCE
    assert (reference.latents - base[7.5, False]).abs().max().item() > 100 * ENGINE_TOLERANCE  # the LoRA mattered
    assert sd15_backbone.calls()[P.UNET_ENCODER].get("eager", 0) == 0


# -- LoRA swaps: no recompilation, each output equal to eager with the same LoRA ------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])  # frozen, patched weights re-packed; read in place
def test_50_lora_swaps_recompile_nothing_and_match_eager(zoo_root, family, request):
    fam, backbone = request.getfixturevalue(family), request.getfixturevalue(f"{family}_backbone")
    paths = zoo.zoo_paths(zoo_root, f"tiny-{family}").loras
    deltas = {lora_id: extract_deltas(fam.pipe, path) for lora_id, path in sorted(paths.items())}
    patcher = LoraPatcher(fam.pipe)
    compiled, eager = backbone.split_unet(), SplitUNet(fam.pipe.unet)
    inputs = step_inputs(fam, 2, seed=3)
    activity = compile_activity()
    dynamo_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ids = list(deltas)
    with torch.no_grad():
        encoded = eager.encoder_half(*inputs)
        down, mid = residuals_like(encoded, seed=4)
        base = eager.decoder_half(encoded, down, mid)
        for swap in range(50):
            if swap % 5 == 4:
                patcher.restore()  # back to the base weights now and then
                loras = []
            else:
                loras = [(ids[swap % len(ids)], 0.5 + 0.1 * (swap % 4), deltas[ids[swap % len(ids)]])]
                if swap % 3 == 0:  # and two LoRAs at once
                    loras.append((ids[(swap + 1) % len(ids)], 0.7, deltas[ids[(swap + 1) % len(ids)]]))
                patcher.apply(loras)
            encoded_eager = eager.encoder_half(*inputs)
            want = eager.decoder_half(encoded_eager, down, mid)
            got = compiled.decoder_half(compiled.encoder_half(*inputs), down, mid)
            assert_matches(got, want)
            if loras:  # the swap took effect in the compiled graphs
                assert (want - base).abs().max().item() > 100 * TOLERANCE
            else:
                assert_matches(got, base)
        patcher.restore()
    assert compile_activity() == activity
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == dynamo_before
    assert backbone.calls()[P.UNET_ENCODER].get("eager", 0) == 0
    frozen = [part.frozen for _, part in backbone.encoder.parts + backbone.decoder.parts]
    if family == "sd15":  # frozen (the CPU default): the swaps re-packed the patched weights
        assert all(f is not None for f in frozen) and sum(f.recomputed for f in frozen) > 0
    else:
        assert all(f is None for f in frozen)


@pytest.mark.slow
def test_copied_weights_binding_follows_lora_swaps(zoo_root, sdxl, sdxl_backbone):
    """The `copy` weight binding (the package holds its own copy of the weights, re-copied for
    the parameters a patch changed) computes what eager computes across LoRA swaps, like `live`."""
    from compiler.inductor import PackagePart

    entry, live = sdxl_backbone.encoder.parts[0]
    module = P.graph_module(P.UNET_ENCODER, sdxl.pipe)
    copied = PackagePart(sdxl_backbone.directory / entry.file, module, weights="copy")
    paths = zoo.zoo_paths(zoo_root, "tiny-sdxl").loras
    deltas = {lora_id: extract_deltas(sdxl.pipe, path) for lora_id, path in sorted(paths.items())}
    patcher = LoraPatcher(sdxl.pipe)
    inputs = step_inputs(sdxl, 2, seed=8)
    with torch.no_grad():
        base = module(*inputs)
        for swap, lora_id in enumerate([*deltas, *deltas]):
            patcher.apply([(lora_id, 0.9, deltas[lora_id])]) if swap % 3 != 2 else patcher.restore()
            want = module(*inputs)
            assert_matches(copied(*inputs), want)
            assert_matches(live(*inputs), want)
        patcher.restore()
        assert_matches(copied(*inputs), base)
    assert copied.weights == "copy" and live.weights == "live"


@pytest.mark.slow
def test_a_worker_on_graphs_artifacts_matches_eager_over_lora_swaps_and_compiles_nothing_after_start(
    zoo_root, tmp_path
):
    """The CUDA default backend (compiler/graphs.py: torch.compile, CUDA graphs on a GPU) end to
    end on the CPU. A worker builds it at start, then serves requests with and without a LoRA as an
    eager worker does, and torch compiles nothing after its start: in-place LoRA patches fail no
    guard. (A worker started on such artifacts takes its graphs from their saved compile cache:
    the ControlNet worker's test below.)

    The deltas come from a LoRA store, as in production."""
    from tests.test_metrics import scrape

    directory = tmp_path / "graphs"
    store = start_lora_store(zoo_root, tmp_path / "lora-cache", ["tiny-sd15"])
    build_args = ["--compile-backend", "graphs", "--compile-resolution", str(SIZE), "--compile-batch-sizes", "2"]
    build_args += ["--compile-parts", "unet_encoder", "unet_decoder", "--metrics-port", "0"]
    build_args += ["--lora-store", store.address]
    eager = start_unet(zoo_root, "tiny-sd15", num_threads=1, wait=False, extra_args=["--lora-store", store.address])
    compiled = start_unet(
        zoo_root,
        "tiny-sd15",
        num_threads=1,
        timeout=600,
        extra_args=["--compiled-artifacts", str(directory), "--compile-missing", *build_args],
    )
    lora = "tiny-sd15-lora-peft-r64"

    def denoise(worker, loras):
        request = unet_pb2.DenoiseRequest(
            params=common_pb2.GenerationParams(
                prompt="a cat",
                width=SIZE,
                height=SIZE,
                num_inference_steps=3,
                guidance_scale=7.5,  # batch 2: the batch size built
                seed=4,
                model_id="tiny-sd15",
            ),
            loras=[common_pb2.LoraRef(lora_id=i, scale=s) for i, s in loras],
            return_latents=True,
        )
        with rpc.create_channel(worker.address) as channel:
            response = unet_pb2_grpc.UNetWorkerStub(channel).Denoise(request, timeout=120)
        return codec.tensor_from_proto(response.latents)

    def compilations(worker):
        return {
            dict(k[1])["kind"]: v for k, v in scrape(worker.metrics_address).items() if k[0] == "swiftd_compilations"
        }

    try:
        eager.wait_ready()
        swaps = [(), ((lora, 0.8),), (), ((lora, 0.4),), ((lora, 0.8),)]
        want = [denoise(eager, loras) for loras in swaps]
        got = [denoise(compiled, swaps[0])]
        after_start = compilations(compiled)
        got += [denoise(compiled, loras) for loras in swaps[1:]]
        assert compilations(compiled) == after_start and after_start["dynamo_frames"] > 0, after_start
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert (want[1] - want[0]).abs().max() > 1e-2  # the LoRA moves the output: a stale graph would fail
        log = compiled.log_tail(400)
        assert "no compiled unet_encoder" not in log and "no compiled unet_decoder" not in log  # (the VAE: eager)
    finally:
        eager.stop()
        compiled.stop()
        store.stop()


# -- warm start: a service on artifacts compiles nothing and is ready >= 5x sooner ----------------


@pytest.mark.slow
def test_service_on_artifacts_compiles_nothing_and_starts_5x_sooner(zoo_root, cold_start, tmp_path):
    directory, cold_seconds, cold_log = cold_start
    assert "compiling the backbone" in cold_log
    cache = tmp_path / "inductor-cache"  # anything Inductor or Dynamo compiled would land here
    cache.mkdir()
    t0 = time.monotonic()
    worker = start_unet(
        zoo_root,
        "tiny-sd15",
        num_threads=1,
        timeout=300,
        extra_args=["--compiled-artifacts", str(directory), "--metrics-port", "0"],
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
    )
    warm_seconds = time.monotonic() - t0
    from tests.test_metrics import scrape

    try:
        with rpc.create_channel(worker.address) as channel:
            stub = unet_pb2_grpc.UNetWorkerStub(channel)
            for guidance in (7.5, 1.0):  # batch 2 and batch 1
                params = common_pb2.GenerationParams(
                    prompt="a cat",
                    width=SIZE,
                    height=SIZE,
                    num_inference_steps=3,
                    guidance_scale=guidance,
                    seed=1,
                    model_id="tiny-sd15",
                )
                response = stub.Denoise(unet_pb2.DenoiseRequest(params=params), timeout=120)
                assert response.image_png
        log = worker.log_tail(400)
        # The same, as a scraper sees it: every kind of compile work at 0.
        compilations = {
            dict(k[1])["kind"]: v for k, v in scrape(worker.metrics_address).items() if k[0] == "swiftd_compilations"
        }
        assert compilations and set(compilations.values()) == {0}, compilations
    finally:
        worker.stop()
    assert "'dynamo_frames': 0, 'dynamo_recompiles': 0, 'inductor': 0, 'aot_autograd': 0" in log, log
    assert "running it eagerly" not in log  # every call of the first requests ran compiled
    assert not any(cache.rglob("*")), sorted(str(p) for p in cache.rglob("*"))[:5]
    assert cold_seconds >= 5 * warm_seconds, f"cold {cold_seconds:.1f} s vs warm {warm_seconds:.1f} s"


@pytest.mark.slow
def test_controlnet_service_on_artifacts_compiles_nothing_and_matches_diffusers(
    zoo_root, sd15, sd15_controlnet_artifacts, tmp_path
):
    """A ControlNet worker started on the CLI's artifacts: its steps run compiled, it compiles
    nothing, and requests streaming residuals from it match Diffusers' ControlNet pipeline."""
    from tests.test_controlnet_service import denoise_request

    cache = tmp_path / "inductor-cache"
    cache.mkdir()
    cn_worker = start_controlnet(
        zoo_root,
        preload=["tiny-sd15-cn-edges"],
        num_threads=1,
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
        extra_args=["--compiled-artifacts", str(sd15_controlnet_artifacts)],
    )
    unet_worker = start_unet(zoo_root, "tiny-sd15", num_threads=1)
    try:
        with rpc.create_channel(cn_worker.address) as channel:
            listing = controlnet_pb2_grpc.ControlNetWorkerStub(channel).ListControlNets(
                controlnet_pb2.ControlNetWorkerListControlNetsRequest(), timeout=10
            )
        # Loaded and of the compiled architecture: compiled; the others are not loaded.
        assert {c.controlnet_id for c in listing.controlnets if c.compiled} == {"tiny-sd15-cn-edges"}
        with rpc.create_channel(unet_worker.address) as channel:
            stub = unet_pb2_grpc.UNetWorkerStub(channel)
            for guidance, (scale, start, end) in ((7.5, (0.8, 0.0, 1.0)), (1.0, (1.0, 0.2, 0.8))):  # batch 2 and 1
                controlnets = [ControlNet("tiny-sd15-cn-edges", conditioning_image(2), scale, start, end)]
                response = stub.Denoise(
                    denoise_request("tiny-sd15", controlnets, [cn_worker.address], guidance), timeout=120
                )
                reference = sd15.diffusers_latents(
                    "euler",
                    controlnets,
                    prompt="an astronaut riding a horse",
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(11),
                )
                ours = codec.tensor_from_proto(response.latents)
                assert (ours - reference).abs().max().item() <= ENGINE_TOLERANCE
        log = cn_worker.log_tail(400)
    finally:
        unet_worker.stop()
        cn_worker.stop()
    assert "loaded ControlNet tiny-sd15-cn-edges" in log and "compiled) in" in log, log
    assert (
        "first session done: steps {'compiled': 5}; compilation in this process: {'dynamo_frames': 0, "
        "'dynamo_recompiles': 0, 'inductor': 0, 'aot_autograd': 0, 'cudagraph_skips': 0}" in log
    ), log
    assert "running it eagerly" not in log
    assert not any(cache.rglob("*")), sorted(str(p) for p in cache.rglob("*"))[:5]


@pytest.mark.slow
def test_controlnet_worker_on_graphs_artifacts_warms_up_at_start_and_matches_diffusers(zoo_root, sd15, tmp_path):
    """The graphs backend on a ControlNet worker (the CUDA default): the CLI builds it, a worker
    with an empty Inductor cache compiles every graph from the saved cache while it loads the
    ControlNet, before any request, and the residuals it streams give Diffusers' latents."""
    from tests.test_controlnet_service import denoise_request

    artifacts = tmp_path / "cn-graphs"
    result = run_cli(
        "build",
        *("--model-root", zoo_root, "--model-id", "tiny-sd15", "--backend", "graphs", "--resolution", SIZE),
        *("--batch", 2, "--parts", "controlnet", "--controlnet-id", "tiny-sd15-cn-edges", "--out", artifacts),
        env={"OMP_NUM_THREADS": "1"},  # as the worker runs: Inductor's CPU kernels are keyed by thread count
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cn_worker = start_controlnet(
        zoo_root,
        preload=["tiny-sd15-cn-edges"],
        num_threads=1,
        env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")},
        extra_args=["--compiled-artifacts", str(artifacts)],
    )
    unet_worker = start_unet(zoo_root, "tiny-sd15", num_threads=1)
    try:
        log = cn_worker.log_tail(400)
        assert "graphs warmed up: 1 graphs from the compile cache, 0 compiled anew" in log, log
        controlnets = [ControlNet("tiny-sd15-cn-edges", conditioning_image(2), 0.8, 0.0, 1.0)]
        with rpc.create_channel(unet_worker.address) as channel:
            response = unet_pb2_grpc.UNetWorkerStub(channel).Denoise(
                denoise_request("tiny-sd15", controlnets, [cn_worker.address], 7.5), timeout=120
            )
        reference = sd15.diffusers_latents(
            "euler",
            controlnets,
            prompt="an astronaut riding a horse",
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(11),
        )
        assert (codec.tensor_from_proto(response.latents) - reference).abs().max().item() <= ENGINE_TOLERANCE
        log = cn_worker.log_tail(400)
    finally:
        unet_worker.stop()
        cn_worker.stop()
    assert "first session done: steps {'compiled': 5}" in log, log


def test_an_evicted_compiled_controlnet_frees_its_weights(zoo_root, sd15_controlnet_artifacts):
    """The registry's budget holds for compiled ControlNets too: unloading one drops its model and
    its bound package (nothing else keeps them), and loading it again binds afresh."""
    import gc
    import weakref

    from compiler.runtime import CompiledControlNets
    from services.controlnet.registry import ControlNetRegistry

    compiled = CompiledControlNets.load(sd15_controlnet_artifacts, dtype=torch.float32)
    registry = ControlNetRegistry(zoo_root, budget_bytes=1 << 40, make_stepper=compiled.stepper)
    stepper = registry.acquire("tiny-sd15-cn-edges")
    assert stepper.compiled and registry.compiled() == {"tiny-sd15-cn-edges"}
    model = weakref.ref(stepper.controlnet)
    registry.release("tiny-sd15-cn-edges")
    del stepper
    assert registry.unload("tiny-sd15-cn-edges")
    gc.collect()
    assert model() is None, "an unloaded compiled ControlNet is still referenced"
    assert len(compiled.steppers) == 0
    registry.load("tiny-sd15-cn-edges")
    assert registry.compiled() == {"tiny-sd15-cn-edges"} and len(compiled.steppers) == 1


@pytest.mark.slow
def test_controlnet_service_refuses_artifacts_without_controlnets(zoo_root, cold_start):
    """Asked to (`--on-unusable-artifacts exit`), the worker stops with the compiler's exit code."""
    args = ["--compiled-artifacts", str(cold_start[0]), "--on-unusable-artifacts", "exit"]
    worker = start_controlnet(zoo_root, num_threads=1, wait=False, extra_args=args)
    assert worker.process.wait(timeout=300) == 6
    time.sleep(0.5)  # the log pump drains the last lines
    assert "has no ControlNet part" in worker.log_tail(), worker.log_tail()


def test_service_without_artifacts_says_it_serves_eagerly(caplog):
    from services.unet.__main__ import build_parser, load_backbone
    from services.unet.backbone import EagerBackbone

    args = build_parser().parse_args(["--model-root", ".zoo", "--model-id", "tiny-sd15"])
    with caplog.at_level("INFO"):
        assert isinstance(load_backbone(args, pipe=None), EagerBackbone)
    assert "serving eagerly" in caplog.text


# -- refusing artifacts that do not fit ------------------------------------------------------------


@pytest.mark.slow
def test_artifacts_for_another_model_are_refused(sdxl, cold_start):
    with pytest.raises(ArtifactMismatch, match="model: built for 'tiny-sd15'"):
        CompiledBackbone.load(cold_start[0], sdxl.pipe)


@pytest.mark.slow
def test_a_worker_whose_artifacts_do_not_fit_serves_eagerly_and_says_why(zoo_root, cold_start, tmp_path):
    """Artifacts for another model, or ones that fail their probe in a child process (a corrupt
    part here; a native crash on CUDA): the worker does not exit (which would restart it in a
    loop), it serves eagerly, logs why and exports swiftd_compiled 0."""
    from swiftd import rpc
    from swiftd.request import Request
    from swiftd.v1 import unet_pb2_grpc
    from tests.test_metrics import scrape, value

    corrupt = tmp_path / "corrupt"
    shutil.copytree(cold_start[0], corrupt)
    part = next(p for p in corrupt.iterdir() if p.name != "manifest.json" and p.is_file())
    part.write_bytes(part.read_bytes()[:-16])
    cases = {
        "tiny-sdxl": (["--compiled-artifacts", str(cold_start[0])], "do not fit: model: built for 'tiny-sd15'"),
        "tiny-sd15": (["--compiled-artifacts", str(corrupt), "--probe-artifacts", "always"], "in a child process"),
    }
    for model, (args, why) in cases.items():
        worker = start_unet(zoo_root, model, num_threads=1, timeout=300, extra_args=[*args, "--metrics-port", "0"])
        try:
            log = worker.log_tail(400)
            assert "serving EAGERLY" in log and why in log, log
            request = Request("a cat", width=64, height=64, num_inference_steps=2, model_id=model)
            with rpc.create_channel(worker.address) as channel:
                assert unet_pb2_grpc.UNetWorkerStub(channel).Denoise(request.to_denoise_pb(), timeout=120).image_png
            assert value(scrape(worker.metrics_address), "swiftd_compiled", part="unet") == 0
        finally:
            worker.stop()


@pytest.mark.slow
def test_cli_verify_exit_codes(zoo_root, cold_start, tmp_path, capsys):
    from compiler.cli import main

    directory = cold_start[0]
    ok = run_cli("verify", "--artifacts", directory, "--model-root", zoo_root, "--model-id", "tiny-sd15")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fit tiny-sd15" in ok.stderr

    def cli(*args) -> tuple[int, str]:  # in-process (same code as the command, no torch import per case)
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err

    code, err = cli("verify", "--artifacts", directory, "--model-root", zoo_root, "--model-id", "tiny-sdxl")
    assert code == 6 and "model: built for 'tiny-sd15'" in err

    old_torch = tmp_path / "old-torch"
    shutil.copytree(directory, old_torch)
    manifest = json.loads((old_torch / MANIFEST).read_text())
    manifest["libraries"]["torch"] = "2.0.0"
    (old_torch / MANIFEST).write_text(json.dumps(manifest))
    code, err = cli("verify", "--artifacts", old_torch, "--model-root", zoo_root, "--model-id", "tiny-sd15")
    assert code == 6 and f"torch: built with 2.0.0, this process has {torch.__version__}" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(directory, corrupt)
    part = corrupt / read_manifest(corrupt).parts[0].file
    part.write_bytes(part.read_bytes()[:1000])
    code, err = cli("verify", "--artifacts", corrupt, "--model-root", zoo_root, "--model-id", "tiny-sd15")
    assert code == 7 and "checksum" in err

    assert (
        cli("verify", "--artifacts", tmp_path / "nowhere", "--model-root", zoo_root, "--model-id", "tiny-sd15")[0] == 3
    )

    # --publish: only a verified directory gets the name workers load, and never over another.
    staging, published = tmp_path / "release.staging", tmp_path / "release"
    shutil.copytree(directory, staging)
    code, err = cli(
        "verify", "--artifacts", staging, "--model-root", zoo_root, "--model-id", "tiny-sd15", "--publish", published
    )
    assert code == 0 and (published / MANIFEST).exists() and not staging.exists(), err
    shutil.copytree(directory, staging)
    code, err = cli(
        "verify", "--artifacts", staging, "--model-root", zoo_root, "--model-id", "tiny-sd15", "--publish", published
    )
    assert code == 2 and "never replaced" in err and staging.exists()
    code, err = cli(
        "verify",
        "--artifacts",
        corrupt,
        "--model-root",
        zoo_root,
        "--model-id",
        "tiny-sd15",
        "--publish",
        tmp_path / "bad-release",
    )
    assert code == 7 and not (tmp_path / "bad-release").exists()
    code, err = cli(
        "build", "--model-root", zoo_root, "--model-id", "no-such-model", "--resolution", SIZE, "--out", tmp_path / "x"
    )
    assert code == 3 and "no-such-model" in err
    assert (
        cli("build", "--model-root", zoo_root, "--model-id", "tiny-sd15", "--out", tmp_path / "y")[0] == 2
    )  # no --resolution
    code, err = cli(
        "build", "--model-root", zoo_root, "--model-id", "tiny-sd15", "--resolution", SIZE, "--out", directory
    )
    assert code == 2 and "--force" in err  # never overwrites artifacts silently
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    code, err = cli(
        "build",
        "--model-root",
        zoo_root,
        "--model-id",
        "tiny-sd15",
        "--resolution",
        SIZE,
        "--out",
        tmp_path / "home",
        "--force",
    )
    assert code == 2 and "not artifacts" in err and (tmp_path / "home" / "notes.txt").exists()

    code = main(["inspect", str(directory)])
    manifest = json.loads(capsys.readouterr().out)
    assert code == 0 and manifest["model_id"] == "tiny-sd15" and manifest["backend"] == "inductor"
    assert manifest["options"] == {"freezing": True}  # the CPU default
    assert {p["name"] for p in manifest["parts"]} == {P.UNET_ENCODER, P.UNET_DECODER, P.VAE_DECODER}
    assert all(p["batch_min"] == 1 and p["batch_max"] == 2 for p in manifest["parts"] if p["name"] != P.VAE_DECODER)


def test_manifest_checks_name_every_difference(tmp_path):
    from compiler.artifacts import Manifest, check_compatible, library_versions, platform_key, write_manifest

    manifest = Manifest(
        backend="inductor",
        model_id="m",
        model_fingerprint="abc",
        dtype="float16",
        libraries={**library_versions("inductor"), "diffusers": "0.1"},
        platform=platform_key("cpu"),
        resolutions=[64],
        batch_sizes=[1],
        options={},
        tolerance=1e-4,
    )
    write_manifest(tmp_path, manifest)
    with pytest.raises(ArtifactMismatch) as error:
        check_compatible(read_manifest(tmp_path), model_fingerprint="def", dtype="float32", device="cpu")
    message = str(error.value)
    assert "model: built for 'm'" in message and "dtype: built for float16, serving float32" in message
    assert "diffusers: built with 0.1" in message
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactCorrupt):
        read_manifest(tmp_path)
    os.remove(tmp_path / MANIFEST)
    with pytest.raises(ArtifactCorrupt, match="missing"):
        read_manifest(tmp_path)
