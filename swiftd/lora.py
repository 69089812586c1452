"""LoRA deltas in factored form, and in-place patching that restores bit-for-bit.

Preparation (`extract_deltas`) lets Diffusers and PEFT parse the file — Diffusers/PEFT and
kohya/A1111 keys, alphas, conv (LoCon) layers, text-encoder layers, SDXL block names — by loading
it as an adapter onto the base pipeline, then reads each adapted layer's (lora_B * scaling,
lora_A) pair and unloads the adapter. The result is keyed by the base model's parameter names
(`unet.down_blocks.1....to_q.weight`, `text_encoder.text_model....q_proj.weight`) and is what a
worker applies: `W += up @ down`, one GEMM per layer.

`LoraPatcher` applies a set of such deltas in place — parameters keep their storage, so compiled
graphs stay valid — and keeps each touched weight's pristine value, so removal is a copy back,
never a subtraction (repeated add/subtract drifts).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft.tuners.lora import LoraLayer

from swiftd.errors import FailedPrecondition

# Pipeline components a LoRA may target, in the order deltas are applied.
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")


def component_rank(parameter_name: str) -> int:
    """Position of a "<component>.<parameter>" name's component in LORA_COMPONENTS."""
    return LORA_COMPONENTS.index(parameter_name.split(".", 1)[0])


@dataclass(frozen=True)
class WeightDelta:
    """delta(W) = (up @ down).view(W.shape), alpha/rank (and a scale, once scaled) folded into `up`.

    Where the factors would be larger than the matrix, `down` is None and `up` is the full delta
    (shaped [out_features, in_features * kernel elements]).
    """

    up: torch.Tensor  # [out_features, rank], or the full delta
    down: torch.Tensor | None = None  # [rank, in_features * kernel elements]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down) if t is not None)

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        return self.up.shape[1] if self.down is None else self.down.shape[1]


LoraDeltas = dict[str, WeightDelta]  # parameter name -> delta, in the order a forward pass uses them


_extract_lock = threading.Lock()


@torch.no_grad()
def extract_deltas(pipe: DiffusionPipeline, lora_path: Path, adapter_name: str = "swiftd_extract") -> LoraDeltas:
    """Parse a LoRA file into factored deltas for `pipe`'s parameters (scale 1.0).

    Leaves the pipeline's weights and modules as they were, `requires_grad` included (PEFT
    freezes the base weights; a compiled graph guards on that flag and would recompile). Raises
    FailedPrecondition for a LoRA that does not fit the pipeline (other family, unknown targets,
    shape mismatch).
    """
    with _extract_lock, _requires_grad_kept(pipe):  # adapters are module surgery on the shared pipeline
        try:
            pipe.load_lora_weights(str(lora_path), adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as exc:
            _unload(pipe)
            raise FailedPrecondition(f"lora {Path(lora_path).stem!r} does not fit this model: {exc}") from None
        try:
            deltas: LoraDeltas = {}
            for component in LORA_COMPONENTS:
                module = getattr(pipe, component, None)
                if module is None:
                    continue
                for name, layer in module.named_modules():
                    if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                        continue
                    if layer.use_dora.get(adapter_name, False):
                        raise FailedPrecondition(f"{component}.{name}: DoRA layers are not supported")
                    down = layer.lora_A[adapter_name].weight
                    up = layer.lora_B[adapter_name].weight
                    scaling = layer.scaling[adapter_name]
                    deltas[f"{component}.{name}.weight"] = WeightDelta(
                        up=(up.reshape(up.shape[0], -1) * scaling).contiguous().clone(),
                        down=down.reshape(down.shape[0], -1).contiguous().clone(),
                    )
            if not deltas:
                raise FailedPrecondition(f"lora {Path(lora_path).stem!r} targets no layer of this model")
            return deltas
        finally:
            _unload(pipe)


@contextlib.contextmanager
def _requires_grad_kept(pipe: DiffusionPipeline):
    params = [
        p
        for component in LORA_COMPONENTS
        if getattr(pipe, component, None) is not None
        for p in getattr(pipe, component).parameters()
    ]
    flags = [p.requires_grad for p in params]
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _unload(pipe: DiffusionPipeline) -> None:
    # Unloading removes the PEFT wrappers entirely, so the modules are plain again.
    pipe.unload_lora_weights()


class LoraPatcher:
    """Applies LoRA sets in place on a pipeline's parameters; restores them exactly."""

    def __init__(self, pipe: DiffusionPipeline):
        self._params: dict[str, torch.nn.Parameter] = {}
        for component in LORA_COMPONENTS:
            module = getattr(pipe, component, None)
            if module is not None:
                for name, param in module.named_parameters():
                    self._params[f"{component}.{name}"] = param
        self._pristine: dict[str, torch.Tensor] = {}
        self.applied: tuple[tuple[str, float], ...] = ()  # (lora_id, scale) in application order

    @torch.no_grad()
    def apply(self, loras: list[tuple[str, float, LoraDeltas]]) -> None:
        """Make exactly `loras` (id, scale, deltas) the applied set; no-op if it already is.

        `scale` multiplies the deltas (use 1.0 for deltas with the scale already folded in).
        """
        key = tuple((lora_id, float(scale)) for lora_id, scale, _ in loras)
        if key == self.applied:
            return
        for lora_id, _, deltas in loras:  # validate everything before touching anything
            self.check(lora_id, deltas)
        self.restore()
        for lora_id, scale, deltas in loras:
            self.add(lora_id, deltas, scale)
        self.applied = key

    def check(self, lora_id: str, deltas: LoraDeltas) -> None:
        for name, delta in deltas.items():
            param = self._params.get(name)
            if param is None:
                raise FailedPrecondition(f"lora {lora_id!r}: parameter {name!r} not in this model")
            if delta.out_features * delta.in_features != param.numel() or delta.out_features != param.shape[0]:
                raise FailedPrecondition(
                    f"lora {lora_id!r}: delta for {name!r} is {delta.out_features}x{delta.in_features}, "
                    f"weight is {tuple(param.shape)}"
                )

    @torch.no_grad()
    def add(self, lora_id: str, deltas: LoraDeltas, scale: float = 1.0) -> None:
        """Patch `deltas` in on top of whatever is applied (all or nothing: checked first).

        For building a set in parts (text encoder now, UNet later); `applied` is left as it was:
        set it once the whole set is in.
        """
        self.check(lora_id, deltas)
        for name, delta in deltas.items():
            param = self._params[name]
            if name not in self._pristine:
                self._pristine[name] = param.detach().clone()
            weight = param.view(param.shape[0], -1)
            up = delta.up.to(device=param.device, dtype=param.dtype)
            if delta.down is None:
                weight.add_(up, alpha=scale)
            else:
                # One GEMM into the weight's own storage.
                weight.addmm_(up, delta.down.to(device=param.device, dtype=param.dtype), alpha=scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the pristine values of every touched weight (bit-identical)."""
        for name, pristine in self._pristine.items():
            self._params[name].copy_(pristine)
        self._pristine.clear()
        self.applied = ()


# -- preparation and the wire ----------------------------------------------------------------------


def prepare_deltas(deltas: LoraDeltas, scale: float, dtype: torch.dtype) -> LoraDeltas:
    """Ready to apply with no further arithmetic: the user's scale folded into `up`, cast to the
    serving dtype, and the full matrix wherever the factors would be larger."""
    ready: LoraDeltas = {}
    for name, delta in deltas.items():
        if delta.down is not None:
            rank = delta.down.shape[0]
            if rank * (delta.out_features + delta.in_features) >= delta.out_features * delta.in_features:
                # Scaled after the product, so that scaling a prepared (full) delta again gives
                # the same bits as preparing with that scale directly.
                ready[name] = WeightDelta(((delta.up.float() @ delta.down.float()) * scale).to(dtype))
                continue
            ready[name] = WeightDelta((delta.up.float() * scale).to(dtype), delta.down.to(dtype))
        else:
            ready[name] = WeightDelta((delta.up.float() * scale).to(dtype))
    return ready


def deltas_to_chunks(lora_id: str, scale: float, deltas: LoraDeltas, request_id: str = "", chunk_bytes: int = 16 << 20):
    """LoraDeltaChunk messages of at most ~chunk_bytes tensor data each: text encoders first, then
    the UNet, each in forward order (what the worker needs first comes first). The order is the
    wire contract of protos/swiftd/v1/lora_store.proto: the first UNet delta tells the worker the
    text-encoder part is complete."""
    from swiftd import codec
    from swiftd.v1 import lora_store_pb2

    digest = DeltaDigest()

    def message(batch, last):
        for entry in batch:
            digest.update(entry)
        return lora_store_pb2.LoraDeltaChunk(
            request_id=request_id,
            lora_id=lora_id,
            scale=scale,
            deltas=batch,
            last=last,
            sha256=digest.value() if last else b"",
        )

    batch, size = [], 0
    first_unet_sent = False
    # A stable sort by component: forward order within each component stays as given.
    items = sorted(deltas.items(), key=lambda item: component_rank(item[0]))
    for i, (name, delta) in enumerate(items):
        entry = lora_store_pb2.ParameterDelta(parameter_name=name)
        if delta.down is None:
            entry.full.CopyFrom(codec.tensor_to_proto(delta.up))
        else:
            entry.factored.up.CopyFrom(codec.tensor_to_proto(delta.up))
            entry.factored.down.CopyFrom(codec.tensor_to_proto(delta.down))
        if batch and size + delta.nbytes > chunk_bytes:
            yield message(batch, last=False)
            batch, size = [], 0
        batch.append(entry)
        size += delta.nbytes
        if not first_unet_sent and name.startswith("unet.") and i < len(items) - 1:
            # The text-encoder part and the first UNet delta travel alone and early: the first
            # UNet delta tells the worker the text-encoder part is complete (text encoding may
            # start) without waiting for a full-size chunk.
            first_unet_sent = True
            yield message(batch, last=False)
            batch, size = [], 0
    yield message(batch, last=True)


class DeltaDigest:
    """SHA-256 over a LoRA's ParameterDelta messages in the order sent (LoraDeltaChunk.sha256)."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def update(self, entry) -> None:
        self._hash.update(entry.SerializeToString(deterministic=True))

    def value(self) -> bytes:
        return self._hash.digest()


def check_delta(name: str, delta: WeightDelta, dtype: torch.dtype) -> None:
    """ValueError unless `delta` is in `dtype` and finite (a NaN or inf delta blackens every image)."""
    for tensor in (delta.up, delta.down):
        if tensor is None:
            continue
        if tensor.dtype != dtype:
            raise ValueError(f"{name}: delta is {tensor.dtype}; this worker serves {dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}: delta has non-finite values")


def delta_from_proto(entry) -> tuple[str, WeightDelta]:
    """(parameter name, delta) of one ParameterDelta; ValueError for a malformed one."""
    from swiftd import codec

    form = entry.WhichOneof("form")
    if form == "full":
        return entry.parameter_name, WeightDelta(codec.tensor_from_proto(entry.full))
    if form == "factored":
        up, down = codec.tensor_from_proto(entry.factored.up), codec.tensor_from_proto(entry.factored.down)
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{entry.parameter_name}: factors {tuple(up.shape)} @ {tuple(down.shape)} do not chain")
        return entry.parameter_name, WeightDelta(up, down)
    raise ValueError(f"{entry.parameter_name}: delta has no form")
