"""LoRAs as an add-on: deltas patched in place, with bounded asynchronous loading.

A worker that already has the request's LoRA set patched in does nothing. Otherwise the deltas
are fetched (pushed by the store, pulled, or prepared here) while the run goes on: the pristine
weights are restored, each LoRA's text-encoder deltas go in before text encoding (the store
streams them first), and the UNet deltas at the first step boundary after they are complete,
at step K (`lora_bound_steps`) at the latest, where the loop waits for them. A request that
fails after the patch began leaves the pristine weights: a set half patched in is no set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.unet.addons.base import AddOn
from services.unet.lora_inbox import LoraFetch, LoraInbox
from swiftd.errors import InvalidArgument
from swiftd.lora import LoraPatcher
from swiftd.request import LoraSet

if TYPE_CHECKING:
    from services.unet.backbone import Backbone
    from services.unet.run import DenoisingRun


class LoraAddOn(AddOn):
    def __init__(self, loras: LoraSet, patcher: LoraPatcher, inbox: LoraInbox | None, backbone: Backbone):
        self.loras = loras
        self.patcher = patcher
        self.inbox = inbox
        self.backbone = backbone
        self.fetch: LoraFetch | None = None  # None: nothing to patch (no LoRA, or the set is applied)
        self.applied_at_step: int | None = None  # step before which the set was in place; None: not yet

    def prepare(self, run: DenoisingRun) -> None:
        if not self.loras or self.loras.key == self.patcher.applied:
            self.applied_at_step = run.lora_applied_at_step = 0 if self.loras else -1
            return
        if self.inbox is None:
            raise InvalidArgument("loras", "this worker has no LoRA source configured")
        request = run.request
        self.fetch = self.inbox.fetch(
            self.loras, request.request_id, request.lora_store_address, run.should_stop, pushed=request.pushed_lora_ids
        )

    def before_text_encoding(self, run: DenoisingRun) -> None:
        attributes = {"lora.ids": self.loras.ids, "lora.already_applied": self.fetch is None}
        with run.stage("lora_text_encoder", **attributes):
            if self.fetch is not None or (not self.loras and self.patcher.applied):
                self.patcher.restore()
                if self.fetch is None:  # else the UNet patch's refresh covers both
                    self.backbone.refresh()
            if self.fetch is not None:
                for lora_id, deltas in self.fetch.text_encoder_deltas():
                    self.patcher.add(lora_id, deltas)

    def before_step(self, run: DenoisingRun, step_index: int) -> None:
        if self.applied_at_step is not None:
            return
        bound = min(max(run.request.lora_bound_steps, 0), run.num_steps - 1)
        if step_index < bound and not self.fetch.is_complete():
            return
        attributes = {"lora.ids": self.loras.ids, "lora.applied_at_step": step_index}
        with run.stage("lora_unet_patch", **attributes) as span:
            for lora_id, deltas in self.fetch.unet_deltas():  # waits here at the bound
                self.patcher.add(lora_id, deltas)
            self.patcher.applied = self.fetch.key
            # Frozen constants of patched weights (compiled backbones) are re-packed here.
            span.set_attribute("compiled.constants_recomputed", self.backbone.refresh())
        self.applied_at_step = run.lora_applied_at_step = step_index

    def fail(self, run: DenoisingRun) -> None:
        if self.fetch is not None:
            self.patcher.restore()
