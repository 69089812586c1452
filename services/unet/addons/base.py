"""What an add-on type plugs into a request's denoising run.

A run (`services/unet/run.py`) calls every add-on of the request at the same points, in order:

    prepare               before anything changes: resolve ids, start transfers; raise to refuse
    before_text_encoding  e.g. text-encoder weights patched in (LoRA)
    before_denoising      the prompt embeddings exist: e.g. open per-request sessions (ControlNet)
    before_step           each step, once the step's UNet input is ready (`run.latent_model_input`)
    decoder_residuals     each step, after the UNet's encoder half: residuals for the decoder half
    finish                denoising done: close sessions, report timings
    fail                  the request failed or was cancelled after `prepare`: undo what changed

Every hook is optional (the defaults do nothing). Extra conditioning that the UNet itself takes
goes into `run.added_cond_kwargs`, as in Diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from swiftd.controlnet_step import ControlNetResiduals

if TYPE_CHECKING:
    from services.unet.run import DenoisingRun


class AddOn:
    def prepare(self, run: DenoisingRun) -> None:
        pass

    def before_text_encoding(self, run: DenoisingRun) -> None:
        pass

    def before_denoising(self, run: DenoisingRun) -> None:
        pass

    def before_step(self, run: DenoisingRun, step_index: int) -> None:
        pass

    def decoder_residuals(self, run: DenoisingRun, step_index: int) -> ControlNetResiduals | None:
        return None

    def finish(self, run: DenoisingRun) -> None:
        pass

    def fail(self, run: DenoisingRun) -> None:
        pass
