"""Where a denoising step's time goes, part by part, without slowing the step down.

On the CPU a part is the host time between two marks. On a GPU the host only queues work (no
part of a step waits for the GPU: ControlNet samples and residuals are ordered by events), so host
times would say how long queueing took. There each mark is a CUDA event on the loop's stream and
a part is the GPU time between two marks, the wait for another worker's residuals included. The
events are read once, after the loop.

The same events bound how far the host runs ahead of the GPU (`wait_for_step`): queueing every
step at once would keep the GPU no busier, but progress reports, cancellations and deadlines
would act on steps the GPU has not run yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from swiftd.device import wait_for_gpu

#: A step's parts, in order: the time between consecutive marks.
PARTS = ("encoder_half", "controlnet_wait", "decoder_half", "guidance", "scheduler")


class StepClock:
    def __init__(self, device: torch.device):
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._steps: list[tuple[int, list]] = []  # per step: its start (ns since the epoch), its marks

    def start_step(self) -> None:
        self._steps.append((time.time_ns(), []))
        self.mark()

    def mark(self) -> None:
        """The end of the step's next part (the first mark starts the step)."""
        marks = self._steps[-1][1]
        if self._stream is None:
            marks.append(time.perf_counter())
        else:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            marks.append(event)

    def wait_for_step(self, step: int, stop: Callable[[], bool] | None = None) -> None:
        """Block the host until the GPU has run step `step` (its last part), or until `stop()`;
        at once on the CPU, where parts run as they are called, or for a step before the first."""
        if self._stream is not None and step >= 0:
            wait_for_gpu(self._steps[step][1][-1], stop)

    def read(self, stop: Callable[[], bool] | None = None) -> list[tuple[int, dict[str, float]]] | None:
        """Per step: when it started (ns since the epoch, host clock) and seconds per part. On a
        GPU this waits until the GPU has done the last step; None if `stop()` said to give up first."""
        if self._stream is not None and self._steps and not wait_for_gpu(self._steps[-1][1][-1], stop):
            return None
        out = []
        for started, marks in self._steps:
            if self._stream is None:
                seconds = [end - start for start, end in zip(marks, marks[1:])]
            else:
                seconds = [start.elapsed_time(end) / 1e3 for start, end in zip(marks, marks[1:])]
            out.append((started, dict(zip(PARTS, seconds))))
        return out
