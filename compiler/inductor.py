"""Inductor backend: AOTInductor packages whose weights are the live module's parameters.

Why AOTInductor and not torch.compile's caches: a service started on a torch.compile cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`, or a warm FX graph cache) still
runs Dynamo on every graph at start — bytecode tracing, guards, AOT autograd's cache lookups —
before the cached kernels load. An AOTInductor package is a compiled shared library: loading it
compiles nothing and traces nothing (`aoti_load_package` is a dlopen), so a service on artifacts
is ready as soon as its weights are.

Weights stay mutable inputs. Packages are built with `aot_inductor.package_constants_in_so =
False` (no weights inside them), and at load the model's own parameters are handed over with
`load_constants(..., user_managed=True)`: the compiled code reads the parameters' storage, so an
in-place LoRA patch (`LoraPatcher`, `addmm_` into the weight) or a restore (`copy_`) is what the
next call computes with. Built without freezing, that is all (nothing is recompiled, re-packed or
copied); built with freezing (the CPU default: weights prepacked for oneDNN), the constants
derived from patched parameters are recomputed before the next call (compiler/frozen.py).
Parameters given new storage (`.to()`, `load_state_dict(assign=True)`) are noticed at the next
call and bound again (same dtype and shape only).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.utils import _pytree as pytree

from compiler.artifacts import ArtifactMismatch, UsageError

log = logging.getLogger(__name__)

# Weights are never inside a package: they come from the serving model at load. With `freezing`
# the constants are recomputed from them when they change (compiler/frozen.py); without, the
# compiled code reads the parameters in place.
FIXED_OPTIONS = {"aot_inductor.package_constants_in_so": False}


def default_options(device: str) -> dict:
    """On CPU, freezing (oneDNN weight prepacking: 1.18x on the bench UNet step against 1.00x
    without; bench group `compiler`). Elsewhere none: frozen CUDA artifacts are untested."""
    return {"freezing": True} if torch.device(device).type == "cpu" else {}


def build_package(
    program: ExportedProgram, path: Path, options: dict | None = None, module: torch.nn.Module | None = None
) -> tuple[float, dict | None]:
    """Compile `program` into an AOTInductor package at `path`.

    Returns (seconds, recipes): with the option `freezing`, the recipes that recompute every
    constant of the frozen package from `module`'s parameters (compiler/frozen.py); else None.
    """
    configs = {**(options or {}), **FIXED_OPTIONS}
    frozen = bool(configs.get("freezing"))
    with torch.no_grad():  # inference graphs; Inductor freezes only without autograd
        return _build_package(program, path, configs, frozen, module)


def _build_package(program, path, configs, frozen, module):
    device = str(_program_device(program))  # reading the package back: the device it was built for
    t0 = time.perf_counter()
    if not frozen:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
        seconds = time.perf_counter() - t0
        baked = [n for n in load_package(path, device).get_constant_fqns() if n not in module_tensors(module)]
        if baked:
            # E.g. max_autotune's CPU GEMM templates pack weights into constants of their own.
            raise UsageError(
                f"{Path(path).name}: options {sorted(configs)} made Inductor bake {len(baked)} weights into "
                f"constants ({baked[0]!r}, ...) that a LoRA patch would not reach; drop the option"
            )
        return seconds, None
    from compiler import frozen as F

    records, leaves = {}, {}
    with F.record_constants(records, leaves):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    seconds = time.perf_counter() - t0
    if not records:
        raise RuntimeError("freezing was asked for but Inductor froze nothing")
    recipes = F.resolve_leaves(records, leaves, module)
    return seconds, F.complete_recipes(recipes, load_package(path, device).get_constant_fqns(), module)


def _program_device(program: ExportedProgram) -> torch.device:
    for t in program.state_dict.values():
        return t.device
    return torch.device("cpu")


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers by fully qualified name (the names export gives them)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def load_package(path: Path, device: str):
    """Load an AOTInductor package without invoking the C++ compiler.

    `torch._inductor.aoti_load_package` first asks Inductor which vector ISA this CPU supports,
    which builds and runs small probe programs with the C++ compiler (into the Inductor cache,
    seconds at every start on a fresh machine). The manifest check has already established that
    this CPU has the instruction set the package was built for (compiler.artifacts.platform_key),
    so the package's loader is constructed directly (what aoti_load_package itself falls back to).
    """
    device_index = torch.device(device).index
    device_index = -1 if device_index is None else device_index
    if torch.device(device).type != "cpu":  # the ISA probe is a CPU matter: the public loader
        return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    from torch.export.pt2_archive._package import AOTICompiledModel

    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, device_index)
    return AOTICompiledModel(loader)


# How a package without frozen constants gets the module's weights:
#   live  the compiled code reads the parameters' own storage (user-managed constants): no copy,
#         an in-place patch is seen as it happens;
#   copy  the package holds a copy, and the parameters patched since the last call (their
#         version counters moved) are copied in again before the next one: one more copy of
#         the weights in memory, a memcpy of the patched ones per LoRA switch.
# "copy" stays off torch's user-managed constant handles, the suspect in the CUDA runs that died
# (docs/gpu.md); SWIFTD_AOTI_WEIGHTS=copy selects it for every package a process loads.
WEIGHT_BINDINGS = ("live", "copy")


class PackagePart:
    """A loaded AOTInductor package bound to a live module's weights; call it like the graph.

    `recipes` (from a frozen build) say how each constant is computed from the parameters:
    such a package is kept current by compiler.frozen.FrozenBinding. `weights` is the binding of
    a package without them (WEIGHT_BINDINGS; default from SWIFTD_AOTI_WEIGHTS, else live).
    """

    def __init__(
        self,
        path: Path,
        module: torch.nn.Module,
        device: str = "cpu",
        recipes: dict | None = None,
        weights: str | None = None,
    ):
        import os

        self.name = Path(path).name
        self.weights = weights or os.environ.get("SWIFTD_AOTI_WEIGHTS", "live")
        if self.weights not in WEIGHT_BINDINGS:
            raise UsageError(
                f"weight binding {self.weights!r}: one of {', '.join(WEIGHT_BINDINGS)} (SWIFTD_AOTI_WEIGHTS)"
            )
        self.runner = load_package(path, device)
        self.recipes = recipes
        self.frozen = None
        tensors = module_tensors(module)
        names = self.runner.get_constant_fqns()
        if recipes is None:
            missing = [n for n in names if n not in tensors]
            used = names
        else:
            from compiler.frozen import _params_of

            missing = [n for n in names if n not in recipes]
            used = sorted(set().union(*(_params_of(recipes[n]) for n in names if n in recipes)))
            missing += [p for p in used if p not in tensors]
        if missing:
            raise ArtifactMismatch(f"{self.name}: the model has no weight {missing[0]!r} ({len(missing)} missing)")
        self._live = {name: tensors[name] for name in used}
        self._dtypes = {name: t.dtype for name, t in self._live.items()}
        self._shapes = {name: tuple(t.shape) for name, t in self._live.items()}
        self._bind()

    def _bind(self) -> None:
        for name, t in self._live.items():
            if t.dtype != self._dtypes[name] or tuple(t.shape) != self._shapes[name]:
                raise ArtifactMismatch(
                    f"{self.name}: weight {name!r} changed dtype or shape since the artifact was bound"
                )
            if not t.is_contiguous():
                # The compiled code indexes weights with the strides it was built for.
                raise ArtifactMismatch(
                    f"{self.name}: weight {name!r} is not contiguous; artifacts expect contiguous weights"
                )
        self._pointers = [t.data_ptr() for t in self._live.values()]
        if self.recipes is not None:
            from compiler.frozen import FrozenBinding

            self.frozen = FrozenBinding(self.runner, self.recipes, self._live, self.name)
            return
        if self.weights == "copy":
            self._versions = {name: t._version for name, t in self._live.items()}
            self.runner.load_constants(
                {n: t.detach() for n, t in self._live.items()}, check_full_update=True, user_managed=False
            )
            return
        # User-managed constants are raw pointers into these storages: the detached views keep
        # them alive even if the module's parameters get new storage (`.to()`), and share them
        # with the parameters otherwise (in-place patches are seen).
        self._bound = {name: t.detach() for name, t in self._live.items()}
        self.runner.load_constants(self._bound, check_full_update=True, user_managed=True)

    def _copy_patched(self) -> None:
        changed = {n: t.detach() for n, t in self._live.items() if t._version != self._versions[n]}
        if changed:
            self.runner.load_constants(changed, check_full_update=False, user_managed=False)
            self._versions.update({n: self._live[n]._version for n in changed})

    def __call__(self, *inputs):
        # A parameter given new storage (module.to(), load_state_dict(assign=True)) is rebound;
        # in-place changes keep the pointer and need nothing. ~0.2 us per weight.
        if [t.data_ptr() for t in self._live.values()] != self._pointers:
            log.info("%s: weights were given new storage; rebinding", self.name)
            self._bind()
        if self.frozen is not None:
            self.frozen.refresh()  # recomputes constants of parameters patched since the last call
        elif self.weights == "copy":
            self._copy_patched()
        # The compiled code assumes the strides it was built with (contiguous) and does not check
        # them: a channels_last input (the ControlNet hint embedding is one) would be misread.
        return self.runner(*pytree.tree_map_only(torch.Tensor, lambda x: x.contiguous(), inputs))
