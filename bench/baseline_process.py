"""The Diffusers baseline, in its own process pinned to its cores with one torch thread per core.

    python -m bench.baseline_process --zoo .zoo --family bench-sd15 --cores 0 [1]

Plain Diffusers serving requests "the usual way": the pipeline is loaded once
(StableDiffusionPipeline, and StableDiffusionControlNetPipeline sharing its components, with a
MultiControlNetModel for several ControlNets), and each request loads its LoRAs as adapters,
sets and fuses them, generates, then unfuses and unloads them, all inside the request's latency.
ControlNets run in turn, as Diffusers runs them. A request takes the control images as PNG bytes
and returns the image as PNG bytes, as a server would.

The same process also runs the in-process LoRA probes of our side (`swiftd.lora.LoraPatcher` on
`extract_deltas` output), so both swap figures come from the same core, thread count and weights.

Protocol: one JSON command per line on stdin; each reply is one line on stdout prefixed with
REPLY_PREFIX (everything else the libraries print goes to stderr). Commands:
  {"op": "generate", "scenario": Scenario.to_json(), "size": int, "steps": int}
      -> {"latency_s": float, "stages": {stage: seconds}, "image_png": base64 str}
  {"op": "lora_swap", "lora_id": str, "repeats": int}  -> lists of seconds per round (after a warm-up)
  {"op": "quit"}
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPLY_PREFIX = "BENCH_REPLY "


# -- parent side -------------------------------------------------------------------------------


class BaselineProcess:
    """Handle on the pinned Diffusers process, started lazily by the groups that need it."""

    def __init__(
        self,
        zoo: Path,
        family: str,
        cores: list[int],
        timeout: float = 900.0,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        cmd = [
            sys.executable,
            "-m",
            "bench.baseline_process",
            "--zoo",
            str(zoo),
            "--family",
            family,
            "--cores",
            *[str(core) for core in cores],
            "--device",
            device,
            "--dtype",
            dtype,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        repo = Path(__file__).resolve().parent.parent
        self.timeout = timeout
        self.process = subprocess.Popen(
            cmd, cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = self._read_reply()  # {"load_s": ...} once the models are loaded

    def _read_reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY_PREFIX):
                reply = json.loads(line[len(REPLY_PREFIX) :])
                if "error" in reply:
                    raise RuntimeError(f"Diffusers baseline process failed:\n{reply['error']}")
                return reply
        raise RuntimeError(f"Diffusers baseline process exited (code {self.process.wait()})")

    def call(self, op: str, **kwargs) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        return self._read_reply()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


# -- child side --------------------------------------------------------------------------------


def _pin(cores: list[int]) -> None:
    # Before torch does any work: oneDNN sizes its thread pools at first use.
    os.sched_setaffinity(0, set(cores))
    import torch

    torch.set_num_threads(len(cores))


def _quiet() -> None:
    """Keep the bench's output readable: no progress bars, warnings or info from the libraries."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class Baseline:
    def __init__(self, zoo: Path, family: str, device: str = "cpu", dtype: str = "float32"):
        from diffusers import (
            EulerDiscreteScheduler,
            MultiControlNetModel,
            StableDiffusionControlNetPipeline,
            StableDiffusionXLControlNetPipeline,
        )

        from swiftd import zoo as zoo_lib
        from swiftd.loading import DTYPES, load_controlnet, load_pipeline, pipeline_family

        self.paths = zoo_lib.zoo_paths(zoo, family)
        self.pipe = load_pipeline(self.paths.model, dtype=DTYPES[dtype], device=device)
        self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.controlnets = {
            cid: load_controlnet(path, dtype=DTYPES[dtype], device=device)
            for cid, path in self.paths.controlnets.items()
        }
        self._sdxl = pipeline_family(self.paths.model) == "sdxl"
        self._cn_pipeline_class = (
            StableDiffusionXLControlNetPipeline if self._sdxl else StableDiffusionControlNetPipeline
        )
        self._multi_controlnet_class = MultiControlNetModel
        self._cn_pipes = {}

    def pipeline_for(self, controlnet_ids: tuple[str, ...]):
        """The pipeline a usual server keeps per ControlNet combination (all share the base components)."""
        if not controlnet_ids:
            return self.pipe
        if controlnet_ids not in self._cn_pipes:
            models = [self.controlnets[c] for c in controlnet_ids]
            controlnet = models[0] if len(models) == 1 else self._multi_controlnet_class(models)
            extra = {} if self._sdxl else {"requires_safety_checker": False}
            pipe = self._cn_pipeline_class(**self.pipe.components, controlnet=controlnet, **extra)
            pipe.set_progress_bar_config(disable=True)
            self._cn_pipes[controlnet_ids] = pipe
        return self._cn_pipes[controlnet_ids]

    def generate(self, scenario, size: int, steps: int) -> dict:
        """One request, timed end to end: LoRA load+fuse, generation, LoRA unfuse+unload."""
        import PIL.Image
        import torch

        from bench.scenarios import GUIDANCE_SCALE, NEGATIVE_PROMPT, PROMPT, SEED
        from swiftd.images import encode_png

        pipe = self.pipeline_for(tuple(c.controlnet_id for c in scenario.controlnets))  # built once per combination
        t_start = time.perf_counter()
        names = []
        for i, (lora_id, _) in enumerate(scenario.loras):
            pipe.load_lora_weights(str(self.paths.loras[lora_id]), adapter_name=f"req{i}")
            names.append(f"req{i}")
        if names:
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in scenario.loras])
            pipe.fuse_lora(adapter_names=names)
        t_fused = time.perf_counter()
        try:
            kwargs = dict(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE_SCALE,
                generator=torch.Generator().manual_seed(SEED),
            )
            if scenario.controlnets:
                images = [PIL.Image.open(io.BytesIO(c.image_png)).convert("RGB") for c in scenario.controlnets]
                scales = [c.scale for c in scenario.controlnets]
                multi = len(images) > 1
                kwargs.update(
                    image=images if multi else images[0], controlnet_conditioning_scale=scales if multi else scales[0]
                )
            image = pipe(**kwargs).images[0]
            # The suite's encoder and zlib level: the ratio compares serving, not PNG settings.
            image_png = encode_png(image)
            t_generated = time.perf_counter()
        finally:
            if names:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
        t_end = time.perf_counter()
        stages = {"generate": t_generated - t_fused}
        if names:
            stages = {"lora_load_fuse": t_fused - t_start, **stages, "lora_unfuse_unload": t_end - t_generated}
        return {"latency_s": t_end - t_start, "stages": stages, "image_png": image_png}

    def lora_swap(self, lora_id: str, repeats: int) -> dict:
        """Diffusers' per-request LoRA cost vs our in-place patch, for one LoRA at scale 1.0."""
        path = str(self.paths.loras[lora_id])
        pipe = self.pipe
        # Unfusing subtracts, so the rounds below leave the weights a rounding error away from
        # pristine: put them back afterwards, so that later groups compare against pristine weights.
        components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
        pristine = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in components}
        try:
            return self._lora_swap(pipe, lora_id, path, repeats)
        finally:
            for c in components:
                getattr(pipe, c).load_state_dict(pristine[c])

    def _lora_swap(self, pipe, lora_id: str, path: str, repeats: int) -> dict:
        from swiftd.lora import LoraPatcher, extract_deltas

        out = {k: [] for k in ("diffusers_load_fuse_s", "diffusers_unfuse_unload_s", "ours_apply_s", "ours_restore_s")}
        for i in range(repeats + 1):  # the first round is a warm-up
            t0 = time.perf_counter()
            pipe.load_lora_weights(path, adapter_name="swap")
            pipe.set_adapters(["swap"], adapter_weights=[1.0])
            pipe.fuse_lora(adapter_names=["swap"])
            t1 = time.perf_counter()
            pipe.unfuse_lora()
            pipe.unload_lora_weights()
            t2 = time.perf_counter()
            if i:
                out["diffusers_load_fuse_s"].append(t1 - t0)
                out["diffusers_unfuse_unload_s"].append(t2 - t1)

        t0 = time.perf_counter()
        deltas = extract_deltas(pipe, Path(path))  # preparation: once per LoRA, off the request path
        out["ours_prepare_s"] = time.perf_counter() - t0
        patcher = LoraPatcher(pipe)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            patcher.apply([(lora_id, 1.0, deltas)])
            t1 = time.perf_counter()
            patcher.restore()
            t2 = time.perf_counter()
            if i:
                out["ours_apply_s"].append(t1 - t0)
                out["ours_restore_s"].append(t2 - t1)
        out["num_params"] = len(deltas)
        out["num_weights"] = int(sum(d.up.shape[0] * d.down.shape[1] for d in deltas.values()))
        return out


def child_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_process")
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--family", required=True)
    parser.add_argument("--cores", type=int, nargs="+", default=[0], help="one torch thread per core")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    _pin(args.cores)
    _quiet()
    replies = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not interleave with replies

    def reply(obj: dict) -> None:
        replies.write(REPLY_PREFIX + json.dumps(obj) + "\n")
        replies.flush()

    from bench.scenarios import Scenario

    try:
        t0 = time.perf_counter()
        baseline = Baseline(args.zoo, args.family, args.device, args.dtype)
        reply({"load_s": time.perf_counter() - t0})
    except Exception:
        reply({"error": traceback.format_exc()})
        return 1
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            if op == "generate":
                result = baseline.generate(Scenario.from_json(command["scenario"]), command["size"], command["steps"])
                result["image_png"] = base64.b64encode(result["image_png"]).decode()
                reply(result)
            elif op == "lora_swap":
                reply(baseline.lora_swap(command["lora_id"], command["repeats"]))
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
