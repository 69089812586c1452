"""Serving on compiled artifacts: drop-in replacements for the split UNet, the ControlNet step and
the VAE decode, bound to the serving pipeline's own modules.

`CompiledBackbone.load(directory, pipe, device=...)` (a UNet worker) reads the manifest, refuses
artifacts built for another architecture, dtype, library version or platform (ArtifactMismatch),
checks the part files, and loads every part (a dlopen per part: nothing is compiled).
`CompiledControlNets.load(directory, dtype=..., device=...)` (a ControlNet worker, which has no
pipeline) does the same for the ControlNet parts alone, matched per ControlNet architecture. Each call then goes to the
compiled part built for its resolution and batch size; a shape no artifact covers runs eagerly
(logged once per shape), so a request is never refused for lack of an artifact.

`compile_activity()` reads torch's own counters of compilation work in this process; a service
started on artifacts logs it once ready, and tests assert it stays zero.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from compiler import parts as P
from compiler.artifacts import (
    ArtifactMismatch,
    Manifest,
    PartEntry,
    check_compatible,
    check_files,
    module_fingerprint,
    pipeline_fingerprint,
    read_manifest,
)
from compiler.build import dtype_name
from swiftd.controlnet_step import ControlNetResiduals, ControlNetStepper, timestep_on, weight_residuals
from swiftd.split_unet import EncoderHalfOutput, SplitUNet

log = logging.getLogger(__name__)


def compile_activity() -> dict[str, int]:
    """Compilation work done in this process so far, by torch's counters (all zero: none).

    dynamo_frames: frames Dynamo compiled (`counters["stats"]["unique_graphs"]`);
    dynamo_recompiles: guard failures that recompiled (`counters["recompiles"]`);
    inductor: Inductor compilations, cache hits included (`counters["inductor"]`, graph
    lowerings and FX-graph cache lookups); aot_autograd: AOT autograd graph builds;
    cudagraph_skips: compiled graphs that run without CUDA graphs (`counters["inductor"]
    ["cudagraph_skips"]`: a CPU input, a mutated input; the CUDA-graph speed-up is lost, not the
    result), not compilation work but what the graphs backend on a GPU must keep at 0.
    """
    from torch._dynamo.utils import counters

    return {
        "dynamo_frames": int(counters["stats"]["unique_graphs"]),
        "dynamo_recompiles": int(sum(counters["recompiles"].values())),
        "inductor": int(
            counters["inductor"]["fxgraph_cache_miss"]
            + counters["inductor"]["fxgraph_cache_hit"]
            + counters["inductor"]["fxgraph_cache_bypass"]
        ),
        "aot_autograd": int(counters["aot_autograd"]["total"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def _inductor_cache_counts() -> tuple[int, int]:
    """(graphs Inductor took from its cache, graphs it compiled) in this process so far."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"])


def _warm_up(manifest: Manifest, dispatches: list[_Dispatch], pipe, controlnet=None) -> None:
    """Graphs backend: compile (from the cache) and record every graph now, at start, rather than
    at the first request that needs it. `pipe`: what example inputs are shaped after. On a GPU each
    graph runs twice: CUDA graph trees run a function's first call as a warm-up and record it at
    the second (which synchronises the device: not inside a request)."""
    if manifest.backend != "graphs":
        return
    before = _inductor_cache_counts()
    for dispatch in dispatches:
        for entry, part in dispatch.parts:
            for batch in [b for b in manifest.batch_sizes if entry.serves(entry.resolution, b)]:
                inputs = P.example_inputs(entry.name, pipe, entry.resolution, batch, controlnet)
                for _ in range(2 if inputs[0].is_cuda else 1):
                    part(*inputs)
    hits, misses = (a - b for a, b in zip(_inductor_cache_counts(), before))
    log.info(
        "graphs warmed up: %d graphs from the compile cache, %d compiled anew (%d run without CUDA graphs so far)",
        hits,
        misses,
        compile_activity()["cudagraph_skips"],
    )


def _load_part(directory: Path, entry: PartEntry, module: torch.nn.Module, backend: str, device: str):
    path = Path(directory) / entry.file
    if backend == "inductor":
        from compiler.inductor import PackagePart

        return PackagePart(path, module, device, entry.recipes)
    if backend == "graphs":
        from compiler import graphs

        graphs.load_cache(path)
        return graphs.GraphPart(module, device)
    from compiler.tensorrt import EnginePart

    return EnginePart(path, module)


class _Dispatch:
    """Compiled parts of one kind by (latent height, latent width) and batch range; eager fallback."""

    def __init__(self, name: str, vae_scale_factor: int, dtype: torch.dtype):
        self.name = name
        self.vae_scale_factor = vae_scale_factor
        self.dtype = dtype
        self.parts: list[tuple[PartEntry, object]] = []
        self.calls = Counter()  # "compiled" / "eager"
        self._warned: set = set()

    def find(self, latent_hw: tuple[int, int], batch: int, dtype: torch.dtype):
        if dtype == self.dtype and latent_hw[0] == latent_hw[1]:
            resolution = latent_hw[0] * self.vae_scale_factor
            for entry, compiled in self.parts:
                if entry.serves(resolution, batch):
                    self.calls["compiled"] += 1
                    return compiled
        self.calls["eager"] += 1
        key = (latent_hw, batch, dtype)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "no compiled %s for batch %d, latent %s, %s: running it eagerly", self.name, batch, latent_hw, dtype
            )
        return None


def _as_float_timestep(timestep, device) -> torch.Tensor | None:
    """The 0-d float32 timestep the compiled parts take, or None when it is not a scalar.

    Exact: the UNet and ControlNet turn timesteps into float32 before using them.
    """
    t = torch.as_tensor(timestep)
    if t.numel() != 1:
        return None
    return timestep_on(t.reshape(()), device).to(torch.float32)


class CompiledEncoderHalf:
    def __init__(self, eager, dispatch: _Dispatch):
        self.eager = eager
        self.dispatch = dispatch

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> EncoderHalfOutput:
        compiled = self.dispatch.find(tuple(sample.shape[-2:]), sample.shape[0], sample.dtype)
        t = _as_float_timestep(timestep, sample.device) if compiled is not None else None
        if t is None:
            return self.eager(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        added = () if text_embeds is None else (text_embeds, time_ids)
        out = compiled(sample, t, encoder_hidden_states, *added)
        return EncoderHalfOutput(out[0], out[1], out[2], tuple(out[3:]))


class CompiledDecoderHalf:
    def __init__(self, eager, dispatch: _Dispatch):
        self.eager = eager
        self.dispatch = dispatch
        self._zeros: dict = {}  # residuals of a step without ControlNets, per shape (never written)

    def _zero_residuals(self, encoded: EncoderHalfOutput):
        key = tuple((tuple(r.shape), r.dtype) for r in encoded.down_block_res_samples) + (tuple(encoded.sample.shape),)
        if key not in self._zeros:
            self._zeros = {
                key: (
                    tuple(torch.zeros_like(r) for r in encoded.down_block_res_samples),
                    torch.zeros_like(encoded.sample),
                )
            }
        return self._zeros[key]

    def __call__(
        self, encoded: EncoderHalfOutput, down_block_additional_residuals=None, mid_block_additional_residual=None
    ):
        sample = encoded.sample
        compiled = self.dispatch.find(
            tuple(encoded.down_block_res_samples[0].shape[-2:]), sample.shape[0], sample.dtype
        )
        if compiled is None:
            return self.eager(encoded, down_block_additional_residuals, mid_block_additional_residual)
        if down_block_additional_residuals is None and mid_block_additional_residual is None:
            down, mid = self._zero_residuals(encoded)
        else:
            zeros_down, zeros_mid = self._zero_residuals(encoded)
            down = tuple(down_block_additional_residuals) if down_block_additional_residuals is not None else zeros_down
            mid = mid_block_additional_residual if mid_block_additional_residual is not None else zeros_mid
            if len(down) != len(encoded.down_block_res_samples):
                raise ValueError(
                    f"expected {len(encoded.down_block_res_samples)} down-block residuals, got {len(down)}"
                )
        return compiled(
            sample, encoded.emb, encoded.encoder_hidden_states, tuple(encoded.down_block_res_samples), down, mid
        )


class CompiledSplitUNet:
    """What a DenoisingRun uses of a SplitUNet: `encoder_half`, `decoder_half`, `config`."""

    def __init__(self, split: SplitUNet, encoder: _Dispatch, decoder: _Dispatch):
        self.eager = split
        self.unet = split.unet
        self.encoder_half = CompiledEncoderHalf(split.encoder_half, encoder)
        self.decoder_half = CompiledDecoderHalf(split.decoder_half, decoder)

    @property
    def config(self):
        return self.unet.config

    def __call__(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
    ):
        encoded = self.encoder_half(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        return self.decoder_half(encoded, down_block_additional_residuals, mid_block_additional_residual)


class CompiledControlNetStepper(ControlNetStepper):
    """ControlNetStepper whose step runs the compiled ControlNet graph where one fits.

    The graph returns unscaled residuals; scale and guess mode are applied here as
    ControlNetStepper.step applies them (ControlNets with global pooling run eagerly).
    """

    compiled = True

    def __init__(self, controlnet, dispatch: _Dispatch):
        super().__init__(controlnet)
        self.dispatch = dispatch

    @torch.no_grad()
    def step(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        cond_embedding,
        conditioning_scale,
        guess_mode=False,
        text_embeds=None,
        time_ids=None,
        out=None,
    ) -> ControlNetResiduals:
        cn = self.controlnet
        compiled = None
        if not cn.config.global_pool_conditions:
            compiled = self.dispatch.find(tuple(sample.shape[-2:]), sample.shape[0], sample.dtype)
        t = _as_float_timestep(timestep, sample.device) if compiled is not None else None
        if t is None:
            return super().step(
                sample,
                timestep,
                encoder_hidden_states,
                cond_embedding,
                conditioning_scale,
                guess_mode,
                text_embeds,
                time_ids,
                out,
            )
        added = () if text_embeds is None else (text_embeds, time_ids)
        residuals = compiled(sample, t, encoder_hidden_states, cond_embedding, *added)
        return weight_residuals(list(residuals[:-1]), residuals[-1], conditioning_scale, guess_mode, out)


class CompiledControlNets:
    """The ControlNet parts of an artifact directory: one per ControlNet architecture.

    A ControlNet of a compiled architecture gets a stepper running the compiled graph bound to
    its own weights (loading it is a dlopen); any other ControlNet runs eagerly (logged).
    """

    def __init__(self, directory: Path, manifest: Manifest, device: str):
        self.directory = Path(directory)
        self.manifest = manifest
        self.device = device
        # The compiled steppers handed out, for call counts and refresh; weak, so that a ControlNet
        # the registry evicts frees its weights and its loaded package with its stepper.
        self.steppers: weakref.WeakSet[CompiledControlNetStepper] = weakref.WeakSet()

    @classmethod
    def load(cls, directory: Path, *, dtype: torch.dtype, device: str = "cpu") -> CompiledControlNets:
        """For a ControlNet worker: check the directory (no base model to compare) and its ControlNet parts."""
        manifest = read_manifest(directory)
        check_compatible(manifest, model_fingerprint=None, dtype=dtype_name(dtype), device=device)
        check_files(directory, manifest, names={P.CONTROLNET})
        compiled = cls(directory, manifest, device)
        if not compiled.fingerprints():
            raise ArtifactMismatch(f"{directory} has no ControlNet part (build it with --controlnet-id)")
        return compiled

    def fingerprints(self) -> set[str]:
        return {e.fingerprint for e in self.manifest.parts if e.name == P.CONTROLNET}

    def describe(self) -> str:
        entries = [e for e in self.manifest.parts if e.name == P.CONTROLNET]
        shapes = sorted({f"{e.source_id}@{e.resolution}" for e in entries})
        return f"ControlNet artifacts from {self.directory} ({len(self.fingerprints())} architecture(s): {', '.join(shapes)})"

    def stepper(self, controlnet) -> ControlNetStepper:
        """A stepper for `controlnet`: compiled when an artifact of its architecture exists."""
        fingerprint = module_fingerprint(controlnet)
        entries = [e for e in self.manifest.parts if e.name == P.CONTROLNET and e.fingerprint == fingerprint]
        if not entries:
            log.info("no compiled ControlNet of this architecture (%s): it runs eagerly", fingerprint)
            return ControlNetStepper(controlnet)
        dispatch = _Dispatch(P.CONTROLNET, self.manifest.vae_scale_factor, controlnet.dtype)
        module = P.graph_module(P.CONTROLNET, None, controlnet)
        for entry in entries:
            dispatch.parts.append(
                (entry, _load_part(self.directory, entry, module, self.manifest.backend, self.device))
            )
        # A ControlNet worker has no pipeline: example inputs shaped after the ControlNet itself.
        shapes = SimpleNamespace(unet=controlnet, vae_scale_factor=self.manifest.vae_scale_factor, tokenizer=None)
        _warm_up(self.manifest, [dispatch], shapes, controlnet)
        stepper = CompiledControlNetStepper(controlnet, dispatch)
        self.steppers.add(stepper)
        return stepper

    def dispatches(self) -> list[_Dispatch]:
        return [stepper.dispatch for stepper in list(self.steppers)]  # list(): safe while another thread adds

    def calls(self) -> dict[str, int]:
        """Steps that ran compiled / eagerly, over the ControlNets whose steppers are alive."""
        total = Counter()
        for dispatch in self.dispatches():
            total.update(dispatch.calls)
        return dict(total)


class CompiledBackbone:
    """The compiled parts of one serving pipeline (and its ControlNets), loaded from artifacts."""

    def __init__(self, directory: Path, manifest: Manifest, pipe, device: str):
        self.directory = Path(directory)
        self.manifest = manifest
        self.pipe = pipe
        self.device = device
        dtype = pipe.unet.dtype
        scale = pipe.vae_scale_factor
        self.encoder = _Dispatch(P.UNET_ENCODER, scale, dtype)
        self.decoder = _Dispatch(P.UNET_DECODER, scale, dtype)
        self.vae = _Dispatch(P.VAE_DECODER, scale, dtype)
        self.controlnets = CompiledControlNets(directory, manifest, device)  # in-process ControlNets
        self.load_seconds = 0.0
        self._first_request_reported = False

    @classmethod
    def load(cls, directory: Path, pipe, *, device: str = "cpu") -> CompiledBackbone:
        """Load every UNet and VAE part of `directory` for `pipe`; ControlNets load on first use."""
        t0 = time.perf_counter()
        manifest = read_manifest(directory)
        check_compatible(
            manifest, model_fingerprint=pipeline_fingerprint(pipe), dtype=dtype_name(pipe.unet.dtype), device=device
        )
        check_files(directory, manifest)
        backbone = cls(directory, manifest, pipe, device)
        modules = {
            P.UNET_ENCODER: (P.graph_module(P.UNET_ENCODER, pipe), backbone.encoder),
            P.UNET_DECODER: (P.graph_module(P.UNET_DECODER, pipe), backbone.decoder),
            P.VAE_DECODER: (P.graph_module(P.VAE_DECODER, pipe), backbone.vae),
        }
        for entry in manifest.parts:
            if entry.name in modules:
                module, dispatch = modules[entry.name]
                dispatch.parts.append((entry, _load_part(directory, entry, module, manifest.backend, device)))
        _warm_up(manifest, [backbone.encoder, backbone.decoder, backbone.vae], pipe)
        backbone.load_seconds = time.perf_counter() - t0
        return backbone

    def describe(self) -> str:
        names = sorted({f"{e.name}@{e.resolution}" for e in self.manifest.parts})
        return (
            f"{self.manifest.backend} artifacts from {self.directory} ({', '.join(names)}; "
            f"batch {self.manifest.batch_sizes}) loaded in {self.load_seconds:.2f} s"
        )

    def split_unet(self) -> CompiledSplitUNet:
        return CompiledSplitUNet(SplitUNet(self.pipe.unet), self.encoder, self.decoder)

    def vae_decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """`vae.decode(latents, return_dict=False)[0]`, compiled when `vae` is the pipeline's own
        VAE in the serving dtype (an upcast VAE has other weights: eager)."""
        compiled = None
        if vae is self.pipe.vae and vae.dtype == self.vae.dtype:
            compiled = self.vae.find(tuple(latents.shape[-2:]), latents.shape[0], latents.dtype)
        image = vae.decode(latents, return_dict=False)[0] if compiled is None else compiled(latents)
        if not self._first_request_reported:
            # The end of the first request: what it ran compiled, and that nothing was compiled.
            self._first_request_reported = True
            log.info("first request done: calls %s; compilation in this process: %s", self.calls(), compile_activity())
        return image

    def refresh(self) -> int:
        """Bring frozen parts up to date with the weights now (constants of patched parameters
        recomputed); returns how many constants were recomputed.

        Each part also does this itself before its next call; calling it right after a LoRA patch
        puts the cost where the patch is (the `lora_unet_patch` stage) instead of in the next step.
        """
        dispatches = [self.encoder, self.decoder, self.vae, *self.controlnets.dispatches()]
        return sum(
            part.frozen.refresh()
            for d in dispatches
            for _, part in d.parts
            if getattr(part, "frozen", None) is not None
        )

    def controlnet_stepper(self, controlnet) -> ControlNetStepper:
        """A stepper for an in-process `controlnet`: compiled when an artifact of its architecture exists."""
        return self.controlnets.stepper(controlnet)

    def calls(self) -> dict[str, dict[str, int]]:
        """Calls per part kind that ran compiled / eagerly (for logs and tests)."""
        result = {d.name: dict(d.calls) for d in (self.encoder, self.decoder, self.vae)}
        if self.controlnets.dispatches():
            result[P.CONTROLNET] = self.controlnets.calls()
        return result
