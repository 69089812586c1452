"""ControlNet registry: models under a memory budget, and per-request residual sessions.

A session is one ControlNet of one request. It receives what is constant for the request once
(conditioning image, prompt embeddings, SDXL added conditioning, scale, guess mode), embeds the
conditioning image once (the hint encoder does not depend on the step), then answers one
residual computation per denoising step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel

from swiftd.controlnet_step import ControlNetResiduals, ControlNetSession, ControlNetStepper
from swiftd.errors import InvalidArgument, ResourceExhausted
from swiftd.loading import controlnet_family, list_ids, load_controlnet, resolve

log = logging.getLogger(__name__)


def model_nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


@dataclass
class _Entry:
    stepper: ControlNetStepper  # compiled (compiler.runtime) or eager, as make_stepper chose
    nbytes: int
    in_use: int = 0  # sessions holding it; never evicted while > 0


class ControlNetRegistry:
    """ControlNets by id, loaded on demand, least recently used evicted beyond a byte budget.

    `make_stepper` turns a loaded model into what runs its steps: ControlNetStepper (eager), or
    a compiled stepper bound to the model's weights (services/controlnet/__main__.py).
    """

    def __init__(
        self,
        model_root: Path,
        budget_bytes: int,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        loader: Callable[[Path, torch.dtype, str], ControlNetModel] = load_controlnet,
        make_stepper: Callable[[ControlNetModel], ControlNetStepper] = ControlNetStepper,
    ):
        self.model_root = Path(model_root)
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = device
        self._loader = loader
        self._make_stepper = make_stepper
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def available(self) -> list[str]:
        return list_ids(self.model_root, "controlnets")

    def family(self, controlnet_id: str) -> str:
        """'sd15' or 'sdxl' from the ControlNet's config ('' when unknown)."""
        return controlnet_family(resolve(self.model_root, "controlnets", controlnet_id, "controlnet_id"))

    def loaded(self) -> dict[str, int]:
        with self._lock:
            return {cid: e.nbytes for cid, e in self._entries.items()}

    def compiled(self) -> set[str]:
        """Loaded ControlNets whose steps run compiled."""
        with self._lock:
            return {cid for cid, e in self._entries.items() if e.stepper.compiled}

    def load(self, controlnet_id: str) -> tuple[bool, float]:
        """Make `controlnet_id` resident. Returns (was already loaded, seconds spent loading)."""
        with self._lock:
            if controlnet_id in self._entries:
                self._entries.move_to_end(controlnet_id)
                return True, 0.0
            per_id = self._loading.setdefault(controlnet_id, threading.Lock())
        with per_id:  # one load per id at a time; others wait for it
            with self._lock:
                if controlnet_id in self._entries:
                    return True, 0.0
            path = resolve(self.model_root, "controlnets", controlnet_id, "controlnet_id")
            t0 = time.perf_counter()
            model = self._loader(path, self.dtype, self.device)
            entry = _Entry(self._make_stepper(model), model_nbytes(model))
            seconds = time.perf_counter() - t0
            with self._lock:
                self._entries[controlnet_id] = entry
                self._evict_locked(keep=controlnet_id)
            log.info(
                "loaded ControlNet %s (%.1f MB, %s) in %.2f s",
                controlnet_id,
                entry.nbytes / 1e6,
                "compiled" if entry.stepper.compiled else "eager",
                seconds,
            )
            return False, seconds

    def unload(self, controlnet_id: str) -> bool:
        with self._lock:
            entry = self._entries.get(controlnet_id)
            if entry is None:
                return False
            if entry.in_use:
                raise ResourceExhausted(f"controlnet {controlnet_id!r} is in use by {entry.in_use} session(s)")
            del self._entries[controlnet_id]
            return True

    def acquire(self, controlnet_id: str) -> ControlNetStepper:
        """Pin a ControlNet for a session (loading it if needed); pair with `release`."""
        while True:
            self.load(controlnet_id)
            with self._lock:
                entry = self._entries.get(controlnet_id)
                if entry is not None:  # evicted between load and here: load again
                    entry.in_use += 1
                    self._entries.move_to_end(controlnet_id)
                    return entry.stepper

    def release(self, controlnet_id: str) -> None:
        with self._lock:
            entry = self._entries.get(controlnet_id)
            if entry is not None:
                entry.in_use -= 1
            self._evict_locked()

    def _evict_locked(self, keep: str | None = None) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for cid in list(self._entries):
            if total <= self.budget_bytes:
                break
            entry = self._entries[cid]
            if cid == keep or entry.in_use:
                continue
            del self._entries[cid]
            total -= entry.nbytes
            log.info("evicted ControlNet %s (budget %.1f MB)", cid, self.budget_bytes / 1e6)


class SessionRunner:
    """One ControlNet of one request: the hint embedded once, then one call per step."""

    def __init__(self, registry: ControlNetRegistry, session: ControlNetSession):
        self._registry = registry
        self.session = session
        self.stepper = registry.acquire(session.controlnet_id)
        try:
            model = self.stepper.controlnet
            needs_added = model.config.addition_embed_type == "text_time"
            if needs_added and (session.text_embeds is None or session.time_ids is None):
                raise InvalidArgument(
                    "start.text_embeds", f"controlnet {session.controlnet_id!r} (SDXL) needs text_embeds and time_ids"
                )
            expected = model.config.cross_attention_dim
            if session.encoder_hidden_states.shape[-1] != expected:
                raise InvalidArgument(
                    "start.encoder_hidden_states",
                    f"last dimension {session.encoder_hidden_states.shape[-1]} does not match "
                    f"controlnet {session.controlnet_id!r} cross_attention_dim {expected}",
                )
            self._cast = lambda t: None if t is None else t.to(device=model.device, dtype=model.dtype)
            self.cond_embedding = self.stepper.embed_condition(session.conditioning(model.device, model.dtype))
            self._hidden = self._cast(session.encoder_hidden_states)
            self._text_embeds = self._cast(session.text_embeds)
            self._time_ids = self._cast(session.time_ids)
        except BaseException:
            self.close()
            raise
        self._closed = False

    @property
    def device(self) -> torch.device:
        return self.stepper.controlnet.device

    def step(self, timestep: float, sample: torch.Tensor, out: list[torch.Tensor] | None = None) -> ControlNetResiduals:
        """`out`: where to write the residuals (a residual ring's slot), as ControlNetStepper.step."""
        c = self.session
        sample = self._cast(sample)
        if sample.shape[0] != self._hidden.shape[0]:
            raise InvalidArgument(
                "step.sample", f"batch {sample.shape[0]} != encoder_hidden_states batch {self._hidden.shape[0]}"
            )
        t = torch.tensor(timestep, dtype=torch.float32)  # on the host: the stepper makes it on the device
        return self.stepper.step(
            sample,
            t,
            self._hidden,
            self.cond_embedding,
            c.conditioning_scale,
            c.guess_mode,
            self._text_embeds,
            self._time_ids,
            out,
        )

    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self._registry.release(self.session.controlnet_id)
