"""Ahead-of-time compilation of the split backbone (`python -m compiler`; docs/compiler.md).

parts.py      the graphs: UNet encoder half, decoder half (ControlNet residuals as inputs),
              ControlNet step, VAE decoder
export.py     torch.export of each part, weights as inputs, batch dynamic
inductor.py   AOTInductor packages without weights, bound to the live parameters at load
frozen.py     frozen (prepacked) packages kept current: patched weights re-packed, nothing recompiled
tensorrt.py   refittable torch-tensorrt engines, refitted after a LoRA patch
artifacts.py  the artifact directory's manifest, fingerprints, compatibility checks, error codes
build.py      build + verify against eager; runtime.py: serving on artifacts (services/unet)
probe.py      a worker's artifacts verified in a child process first; unusable ones: serve eagerly
cli.py        build / verify / inspect (the GPU-only checks are bench/gpu_check.py)
"""
