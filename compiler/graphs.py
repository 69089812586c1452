"""Graphs backend: the parts through torch.compile in the serving process, on CUDA with CUDA graphs.

Why a second Inductor backend: on CUDA, the AOTInductor packages this project builds (weights not
inside them, bound to the live parameters at load) end the process while loading, with torch
2.11 (H200, docs/gpu.md, run of 2026-11-30: a segfault in the package loader, before any weight
binding). torch.compile of the same graph modules runs on CUDA, and with mode "reduce-overhead"
replays each step as one CUDA graph: 2.0x on the SDXL UNet step and 4.2x on SD1.5's, with no
recompilation over LoRA swaps (in-place patches keep the parameters' addresses, which the graphs
read).

The artifact is torch's portable compile cache (`torch.compiler.save_cache_artifacts`: Inductor's
compiled graphs, Triton kernels, autotuning results) in `compile-cache.bin`, one file for every
part of the directory. A service loads it before its first compilation, then compiles each part
for every resolution and batch size of its manifest at start (`warm_up`): Dynamo still traces, but
Inductor and Triton compile nothing the cache holds. Compiled with `dynamic=False`: one graph per
batch size, which CUDA graphs need anyway.

Each call runs on one thread per process: CUDA-graph trees keep their state per thread, and the
gRPC servers run each request on a thread of its own. Outputs are cloned before they leave that
thread, so that the next replay, which rewrites the graph's output buffers, cannot change a tensor
the denoising loop still holds (an SDXL step's residuals: ~50 us on an H200).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CACHE_FILE = "compile-cache.bin"
_loaded_caches: set[Path] = set()
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def mode(device: str) -> str | None:
    """torch.compile's mode: CUDA graphs on CUDA; Inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def _graph_thread() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compiled-graphs")
        return _executor


class GraphPart:
    """A part's graph module through torch.compile; call it like the graph (flat tensors in)."""

    def __init__(self, module: torch.nn.Module, device: str = "cpu"):
        self.module = module
        self.compiled = torch.compile(module, mode=mode(device), fullgraph=True, dynamic=False)

    def __call__(self, *inputs):
        return _graph_thread().submit(self._call, inputs).result()

    def _call(self, inputs):
        # Grad mode is per thread: the caller's no_grad does not reach this one.
        with torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()  # no earlier output is held (they are clones)
            out = self.compiled(*inputs)
            if isinstance(out, torch.Tensor):
                return out.clone()
            return type(out)(t.clone() if isinstance(t, torch.Tensor) else t for t in out)


def save_cache(path: Path) -> int:
    """Write this process's compile cache (everything compiled so far) to `path`; its size."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("torch.compile produced no cache artifacts to save")
    data, _info = saved
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load_cache(path: Path) -> None:
    """Hand `path`'s compile cache to torch, once per process and file, before compiling."""
    path = Path(path).resolve()
    with _lock:
        if path in _loaded_caches:
            return
        torch.compiler.load_cache_artifacts(path.read_bytes())
        _loaded_caches.add(path)
