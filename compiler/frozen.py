"""Frozen Inductor artifacts whose weights stay patchable: re-packing only the patched weights.

Inductor's freezing is what makes compiled CPU code fast (weights prepacked for oneDNN, linear
and convolution fused with their bias and activation), but it bakes the weights into constants:
an in-place LoRA patch of a parameter no longer reaches the compiled code. This module keeps the
speed and the patchability:

* At build time it records, for every constant the frozen graph ends up with, how that constant
  was computed from the parameters (`record_constants`): a parameter itself, or an expression of
  them that freezing's constant folding evaluated (a transpose, a view, oneDNN's weight packing
  `mkldnn._reorder_convolution_weight` / `_reorder_linear_weight`, ...). The recipes go into
  the manifest; the package holds no weights.
* At load (`FrozenBinding`) every constant is computed from the live module: parameters are
  handed over as they are (user-managed: in-place patches are seen directly), expressions are
  evaluated from them.
* Before each call the version counters of the parameters that feed computed constants are
  compared with those seen at the last evaluation (every in-place op bumps them: LoraPatcher's
  `addmm_` and `copy_`); only the constants of changed parameters are recomputed and swapped in
  with AOTInductor's `update_constant_buffer`. Nothing is recompiled.

Recipes are replayed with the same aten/mkldnn ops, so the recomputed constants are the ones a
fresh freezing compile would produce. A constant whose computation cannot be recorded fails the
build (never a silently stale weight).
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    raise ValueError(f"cannot record constant computed by {target!r}")


def _resolve_op(name: str):
    namespace, rest = name.split("::")
    parts = rest.split(".")
    op = getattr(getattr(torch.ops, namespace), parts[0])
    return getattr(op, parts[1]) if len(parts) > 1 else op


def _plain(value):
    """JSON form of a non-tensor argument (SymInts become their hints)."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ValueError(f"cannot record argument {value!r}")


def _get_attr(gm, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _describe(gm, node, leaves: dict) -> dict:
    """The expression that computes `node` from get_attr leaves (the frozen parameters)."""
    if node.op == "get_attr":
        leaves.setdefault(node.target, _get_attr(gm, node.target))
        return {"leaf": node.target}
    if node.op != "call_function":
        raise ValueError(f"cannot record constant computed by a {node.op} node")

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return _describe(gm, a, leaves)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
            return {"list": [arg(x) for x in a]}
        return {"value": _plain(a)}

    return {
        "op": _op_name(node.target),
        "args": [arg(a) for a in node.args],
        "kwargs": {k: arg(v) for k, v in node.kwargs.items()},
    }


@contextlib.contextmanager
def record_constants(records: dict, leaf_values: dict):
    """While active, every constant freezing creates is recorded in `records` (name -> recipe);
    the parameter tensors the recipes start from are put in `leaf_values` (leaf name -> tensor)."""
    import torch._inductor.constant_folding as constant_folding
    import torch._inductor.freezing as freezing

    original = constant_folding.replace_node_with_constant

    def recording(gm, node, constant=None, name=None):
        recipe = None
        if constant is not None and node.op == "call_function":
            recipe = _describe(gm, node, leaf_values)
        before = {n.target for n in gm.graph.find_nodes(op="get_attr")}
        original(gm, node, constant, name)
        if constant is not None:
            (qualname,) = {n.target for n in gm.graph.find_nodes(op="get_attr")} - before or {name}
            if recipe is None:  # a parameter turned into a constant: itself
                leaf_values[qualname] = constant
                recipe = {"leaf": qualname}
            records[qualname] = recipe

    constant_folding.replace_node_with_constant = recording
    freezing.replace_node_with_constant = recording
    try:
        yield
    finally:
        constant_folding.replace_node_with_constant = original
        freezing.replace_node_with_constant = original


def resolve_leaves(records: dict, leaf_values: dict, module: torch.nn.Module) -> dict:
    """Recipes in terms of the module's parameter names.

    A leaf is a parameter (the same storage, shape and strides as one of the module's) or a
    constant recorded earlier (its recipe is inlined).
    """
    by_identity = {}
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        by_identity.setdefault((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), name)

    def leaf(name):
        value = leaf_values.get(name)
        if value is not None:
            key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
            if key in by_identity:
                return {"param": by_identity[key]}
        if name in records and records[name] != {"leaf": name}:
            return rename(records[name])
        if value is not None and value.numel() <= 4096 and not value.is_mkldnn:
            # A small constant of the graph itself (a scalar Inductor made a tensor): no weight.
            return {
                "tensor": value.detach().cpu().tolist(),
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape),
            }
        raise ValueError(f"frozen constant {name!r} comes from no parameter of the module")

    def rename(recipe):
        if "leaf" in recipe:
            return leaf(recipe["leaf"])
        if "list" in recipe:
            return {"list": [rename(r) for r in recipe["list"]]}
        if "value" in recipe or "tensor" in recipe:
            return recipe
        return {
            "op": recipe["op"],
            "args": [rename(a) for a in recipe["args"]],
            "kwargs": {k: rename(v) for k, v in recipe["kwargs"].items()},
        }

    return {name: rename(recipe) for name, recipe in records.items()}


def complete_recipes(recipes: dict, constant_names: list[str], module: torch.nn.Module) -> dict:
    """Recipes for every constant of the compiled package: those freezing left as plain parameters
    (never folded) are the parameters themselves; anything else unexplained fails the build."""
    tensors = dict((*module.named_parameters(), *module.named_buffers()))
    complete = {}
    for name in constant_names:
        if name in recipes:
            complete[name] = recipes[name]
        elif name in tensors:
            complete[name] = {"param": name}
        else:
            raise ValueError(f"compiled constant {name!r} has no recorded origin: cannot keep it current")
    return complete


def _params_of(recipe) -> set[str]:
    if "param" in recipe:
        return {recipe["param"]}
    if "list" in recipe:
        return set().union(*(_params_of(r) for r in recipe["list"])) if recipe["list"] else set()
    if "value" in recipe or "tensor" in recipe:
        return set()
    found = set()
    for a in (*recipe["args"], *recipe["kwargs"].values()):
        found |= _params_of(a)
    return found


def _value(plain):
    if isinstance(plain, dict) and "dtype" in plain:
        return getattr(torch, plain["dtype"])
    if isinstance(plain, dict) and "memory_format" in plain:
        return getattr(torch, plain["memory_format"])
    if isinstance(plain, list):
        return [_value(v) for v in plain]
    return plain


def evaluate(recipe, tensors: dict[str, torch.Tensor]):
    if "param" in recipe:
        return tensors[recipe["param"]].detach()
    if "list" in recipe:
        return [evaluate(r, tensors) for r in recipe["list"]]
    if "value" in recipe:
        return _value(recipe["value"])
    if "tensor" in recipe:
        return torch.tensor(recipe["tensor"], dtype=getattr(torch, recipe["dtype"])).reshape(recipe["shape"])
    op = _resolve_op(recipe["op"])
    return op(
        *[evaluate(a, tensors) for a in recipe["args"]],
        **{k: evaluate(v, tensors) for k, v in recipe["kwargs"].items()},
    )


class FrozenBinding:
    """The constants of a frozen package, computed from a live module and kept current."""

    def __init__(self, runner, recipes: dict, tensors: dict[str, torch.Tensor], label: str = ""):
        self.runner = runner
        self.label = label
        self.tensors = tensors  # the module's live parameters by name
        self.recipes = recipes
        names = runner.get_constant_fqns()
        missing = [n for n in names if n not in recipes]
        if missing:
            raise ValueError(f"{label}: no recipe for constant {missing[0]!r} ({len(missing)} missing)")
        # Parameters handed over as they are need nothing when patched in place; the others feed
        # computed constants, which are recomputed when their parameters change.
        self.direct = {n for n in names if "param" in recipes[n]}
        self.computed = {n: _params_of(recipes[n]) for n in names if n not in self.direct}
        self.watched = sorted(set().union(*self.computed.values())) if self.computed else []
        self.recomputed = 0  # constants recomputed after patches (for logs and tests)
        self.values: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n in names:
                self.values[n] = evaluate(recipes[n], tensors)
        self.versions = self._versions()
        runner.load_constants(self.values, check_full_update=True, user_managed=True)

    def _versions(self) -> list[int]:
        return [self.tensors[p]._version for p in self.watched]

    def refresh(self) -> int:
        """Recompute the constants whose parameters changed since the last call; returns how many."""
        versions = self._versions()
        if versions == self.versions:
            return 0
        changed = {p for p, old, new in zip(self.watched, self.versions, versions) if old != new}
        update = {}
        with torch.no_grad():
            for name, params in self.computed.items():
                if params & changed:
                    update[name] = evaluate(self.recipes[name], self.tensors)
        # user-managed: the runner reads these tensors; keep them alive in self.values.
        self.runner.loader.update_constant_buffer(update, False, False, True)
        self.values.update(update)
        self.versions = versions
        self.recomputed += len(update)
        return len(update)
