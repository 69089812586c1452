"""TensorRT backend through torch-tensorrt: refittable engines built from the parts' exported programs.

torch-tensorrt needs CUDA and the TensorRT libraries; it is imported lazily, and
`unavailable_reason()` says why the backend cannot run here (the CLI exits 4 with it). What every
machine can check is everything up to the engine build: the exported programs (compiler/export.py)
take every weight as a parameter input, which is what torch-tensorrt builds refittable engines
from and refits from (tests/test_compiler.py). `bench/gpu_check.py` runs the rest on a GPU
machine with TensorRT: build, run, LoRA swap, refit, compare with eager.

Engines are built refittable (`immutable_weights=False`; `make_refittable=True` before
torch-tensorrt 2.6), and a LoRA swap refits them with `torch_tensorrt.dynamo.refit_module_weights`
instead of rebuilding: `EnginePart` notices that the module's weights changed (the version
counters of their tensors, which every in-place op such as LoraPatcher's `addmm_`/`copy_` bumps)
and refits before the next call.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import torch
from torch.export import ExportedProgram

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install '.[tensorrt]' on a machine with CUDA and the TensorRT libraries"


def _import():
    import torch_tensorrt  # noqa: F401 - lazily: pulls CUDA and TensorRT

    return torch_tensorrt


def unavailable_reason(device: str = "cuda") -> str | None:
    """None when engines can be built for `device` here; otherwise why not."""
    if torch.device(device).type != "cuda":
        return f"TensorRT builds engines for CUDA devices, not {device!r} (pass --device cuda)"
    try:
        _import()
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA/TensorRT library that fails to load
        return f"torch_tensorrt cannot be imported ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def versions() -> dict[str, str]:
    try:
        trt = _import()
    except Exception:  # noqa: BLE001
        return {"torch_tensorrt": "none"}
    found = {"torch_tensorrt": trt.__version__}
    try:
        import tensorrt

        found["tensorrt"] = tensorrt.__version__
    except Exception:  # noqa: BLE001
        pass
    return found


def refittable_settings(compile_fn) -> dict:
    """The keyword that makes engines refittable, by torch-tensorrt version."""
    params = inspect.signature(compile_fn).parameters
    if "immutable_weights" in params:  # torch-tensorrt >= 2.6
        return {"immutable_weights": False}
    if "make_refittable" in params:  # 2.4, 2.5
        return {"make_refittable": True}
    return {"refit": True}  # 2.3


def trt_inputs(inputs: tuple, batch_min: int, batch_max: int):
    """torch_tensorrt.Input specs mirroring `inputs` (nested tuples kept), batch dim min..max."""
    trt = _import()

    def spec(x):
        if isinstance(x, (tuple, list)):
            return tuple(spec(item) for item in x)
        if x.dim() == 0 or batch_min == batch_max:
            return trt.Input(shape=list(x.shape), dtype=x.dtype)
        rest = list(x.shape[1:])
        return trt.Input(
            min_shape=[batch_min, *rest], opt_shape=[batch_max, *rest], max_shape=[batch_max, *rest], dtype=x.dtype
        )

    return tuple(spec(x) for x in inputs)


def build_engine(
    program: ExportedProgram,
    inputs: tuple,
    path: Path,
    options: dict | None = None,
    batch_range: tuple[int, int] | None = None,
) -> float:
    """Compile `program` into a refittable TensorRT module saved at `path`; returns the seconds."""
    trt = _import()
    batch_min, batch_max = batch_range or (inputs[0].shape[0], inputs[0].shape[0])
    settings = {
        "arg_inputs": trt_inputs(inputs, batch_min, batch_max),
        "min_block_size": 1,
        **refittable_settings(trt.dynamo.compile),
        **(options or {}),
    }
    t0 = time.perf_counter()
    trt_module = trt.dynamo.compile(program, **settings)
    seconds = time.perf_counter() - t0
    trt.save(trt_module, str(path), output_format="exported_program", arg_inputs=list(inputs))
    return seconds


class EnginePart:
    """A saved TensorRT module, refitted from `module`'s weights whenever they changed in place."""

    def __init__(self, path: Path, module: torch.nn.Module, example_inputs: tuple | None = None):
        trt = _import()
        self._trt = trt
        self.module = module
        self.engine = trt.load(str(path)).module()
        self.example_inputs = example_inputs
        self._program: ExportedProgram | None = None
        self.weights = dict(module.named_parameters())
        self._versions = self._weight_versions()
        self.refits = 0

    def _weight_versions(self) -> dict[str, int]:
        return {name: t._version for name, t in self.weights.items()}

    def refit(self, inputs: tuple) -> float:
        """Refit the engine from the module's current weights (no rebuild); returns the seconds."""
        t0 = time.perf_counter()
        if self._program is None:
            # Exported once, on the live module: the program's state_dict holds the module's own
            # parameters, so later refits see every in-place change without exporting again.
            self._program = torch.export.export(self.module, inputs)
        self.engine = self._trt.dynamo.refit_module_weights(
            compiled_module=self.engine,
            new_weight_module=self._program,
            arg_inputs=inputs,
            in_place=True,
        )
        self._versions = self._weight_versions()
        self.refits += 1
        return time.perf_counter() - t0

    def __call__(self, *inputs):
        if self._weight_versions() != self._versions:
            seconds = self.refit(inputs)
            log.info("TensorRT engine refitted after a weight change in %.2f s", seconds)
        return self.engine(*inputs)
