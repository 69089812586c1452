"""torch.export of each part: the graph every backend compiles, weights as inputs.

An ExportedProgram lifts every parameter and buffer of the module into a placeholder of the
graph (`InputKind.PARAMETER` / `BUFFER`): weights are inputs of the program, not constants in
it. Inductor (compiler/inductor.py) keeps them that way (no freezing, no constant folding) and
reads them from the live module at run time; torch-tensorrt (compiler/tensorrt.py) builds its
engines from the same programs and refits them from the parameters.

The batch dimension is dynamic (min..max of the batch sizes asked for), so one artifact serves a
request with CFG (batch 2) and without (batch 1); the resolution is static per artifact.
"""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from compiler.parts import VAE_DECODER


def batch_dynamic_shapes(part: str, inputs: tuple, batch_sizes: tuple[int, ...]):
    """dynamic_shapes for torch.export: dim 0 of every batched input, over [min, max] of `batch_sizes`.

    None (static) when only one batch size is asked for. The timestep (0-d) is never batched.
    """
    low, high = min(batch_sizes), max(batch_sizes)
    if low == high:
        return None
    # Dim min 1 is fine here: the programs never branch on the batch size.
    batch = Dim("batch", min=low, max=high)

    def spec(x):
        if isinstance(x, (tuple, list)):
            return tuple(spec(item) for item in x)
        return {0: batch} if x.dim() > 0 else None

    return tuple(spec(x) for x in inputs)


@torch.no_grad()
def export_part(part: str, module: torch.nn.Module, inputs: tuple, batch_sizes: tuple[int, ...]) -> ExportedProgram:
    """Export `module` (a compiler.parts graph) on `inputs`, batch dynamic over `batch_sizes`."""
    if part == VAE_DECODER and len(set(batch_sizes)) > 1:
        raise ValueError("the VAE decoder is exported for one batch size")
    return torch.export.export(module, inputs, dynamic_shapes=batch_dynamic_shapes(part, inputs, batch_sizes))


def lifted_weights(program: ExportedProgram) -> dict[str, str]:
    """Parameter and buffer names the program takes as inputs -> their input kind.

    What torch-tensorrt refits from and what a LoRA patch changes: every weight of the module
    must be here (none folded into a constant).
    """
    return {
        spec.target: spec.kind.name
        for spec in program.graph_signature.input_specs
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)
    }


def folded_constants(program: ExportedProgram) -> list[str]:
    """Tensor constants baked into the program (CONSTANT_TENSOR inputs): weights must never be here."""
    return [spec.target for spec in program.graph_signature.input_specs if spec.kind == InputKind.CONSTANT_TENSOR]
