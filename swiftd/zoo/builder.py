"""Building the zoo: which families to build, and each family's artefacts written in order, marker last.

A family whose marker matches the current generator is skipped, so callers may run `build` every
time; concurrent builders of one zoo take a file lock, and torch & co. are imported only when
something is to be built.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import sys
import time
from pathlib import Path

from swiftd.zoo.files import make_readable
from swiftd.zoo.layout import is_complete, marker_text, zoo_paths
from swiftd.zoo.loras import write_kohya_lora, write_peft_lora
from swiftd.zoo.models import make_components, make_controlnet, write_pipeline
from swiftd.zoo.single_file import write_single_file
from swiftd.zoo.specs import CONTROLNET_KINDS, DEFAULT_FAMILIES, FULL_FAMILIES, LORA_KINDS, SPECS


def _log(msg: str) -> None:
    print(f"[zoo] {msg}", file=sys.stderr, flush=True)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_family(out: Path, family: str) -> None:
    import torch

    spec, paths = SPECS[family], zoo_paths(out, family)
    t0 = time.perf_counter()
    for p in [paths.marker, *paths.all_outputs()]:  # a half-built family is rebuilt from scratch
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    with torch.no_grad():
        parts = make_components(spec)
        dtype = torch.float16 if spec.fp16 else torch.float32
        if spec.fp16:
            for name, mod in parts.items():
                if isinstance(mod, torch.nn.Module):
                    parts[name] = mod.to(dtype)
        write_pipeline(spec, parts, paths.model)
        if paths.single_file:
            write_single_file(spec, parts, paths.single_file)
        cn_params = []
        for cn_id, kind in zip(paths.controlnets, CONTROLNET_KINDS):
            cn = make_controlnet(spec, parts["unet"], kind)
            cn = cn.to(dtype) if spec.fp16 else cn
            cn.save_pretrained(paths.controlnets[cn_id])
            cn_params.append(_count(cn))
            del cn
        for lora_id, (fmt, rank) in zip(paths.loras, LORA_KINDS.values()):
            if fmt == "peft":
                write_peft_lora(spec, parts["unet"], rank, paths.loras[lora_id], lora_id, dtype)
            else:
                te, convs = lora_id.endswith("-te"), lora_id.endswith("-conv")
                write_kohya_lora(spec, parts, rank, paths.loras[lora_id], lora_id, dtype, te=te, convs=convs)

    make_readable(paths.all_outputs())
    paths.marker.write_text(marker_text(family))  # last: its presence means the family is whole
    _log(
        f"built {family} in {time.perf_counter() - t0:.1f}s: UNet {_count(parts['unet']) / 1e6:.2f} M params, "
        f"ControlNets {', '.join(f'{n / 1e6:.2f} M' for n in cn_params)}"
    )


@contextlib.contextmanager
def _locked(out: Path):
    # `make run` and `make test` may build the same zoo at once; one builds, the other then skips.
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_libraries():
    # Saving dozens of small models makes Diffusers/transformers print progress bars and notices
    # that bury the zoo's own one line per family; silence them for the build only.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        tlog.enable_progress_bar()


def resolve_families(only: list[str] | None = None, full: bool = False) -> list[str]:
    if only:
        unknown = [f for f in only if f not in SPECS]
        if unknown:
            raise ValueError(f"unknown zoo families {unknown}; known: {list(SPECS)}")
        return list(dict.fromkeys(only))
    return list(DEFAULT_FAMILIES + (FULL_FAMILIES if full else ()))


def build(out: str | Path, only: list[str] | None = None, full: bool = False) -> None:
    """Build the default families (plus the full-size ones if `full`), or exactly `only`.

    Families already complete for this ZOO_VERSION are skipped.
    """
    out = Path(out)
    families = resolve_families(only, full)
    if all(is_complete(out, f) for f in families):  # no lock needed (the zoo may be read-only)
        _log(f"{', '.join(families)}: up to date")
        return
    with _locked(out):
        todo = [f for f in families if not is_complete(out, f)]  # again: another builder may have run
        for family in families:
            if family not in todo:
                _log(f"{family}: up to date")
        # torch & co. are imported only now, so an up-to-date zoo is checked in milliseconds.
        import torch

        with _quiet_libraries(), torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            for family in todo:
                build_family(out, family)
