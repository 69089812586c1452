"""The denoising loop's step clock: each part of a step timed where it runs (host time on the CPU,
GPU time from CUDA events on a GPU), and on a GPU a host that never runs more than the allowed
number of steps ahead of the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from services.unet.run import MAX_STEPS_AHEAD
from services.unet.step_clock import PARTS, StepClock


def run_steps(clock: StepClock, steps: int, busy, before_step=lambda i: None) -> None:
    """`steps` steps of len(PARTS) parts each; `busy(part)` does the part's work."""
    for i in range(steps):
        before_step(i)
        clock.start_step()
        for part in PARTS:
            busy(part)
            clock.mark()


def test_on_the_cpu_each_part_is_the_host_time_it_took():
    clock = StepClock(torch.device("cpu"))
    run_steps(clock, 3, lambda part: time.sleep(0.03 if part == "controlnet_wait" else 0.0))
    steps = clock.read()
    assert len(steps) == 3 and all(set(parts) == set(PARTS) for _, parts in steps)
    for started, parts in steps:
        assert 0.03 <= parts["controlnet_wait"] < 0.5
        assert all(parts[p] < 0.02 for p in PARTS if p != "controlnet_wait")
        assert abs(started / 1e9 - time.time()) < 60
    clock.wait_for_step(1)  # the CPU has run every step it was given: returns at once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU (runs on a lent GPU machine)")
def test_on_a_gpu_parts_are_gpu_time_and_the_host_stays_within_the_allowed_steps():
    device = torch.device("cuda")
    clock = StepClock(device)
    cycles = 20_000_000  # torch.cuda._sleep spins the GPU: tens of milliseconds a part on any GPU
    ahead = []

    def before_step(i: int) -> None:
        clock.wait_for_step(i - MAX_STEPS_AHEAD)
        # The GPU has run every step up to i - MAX_STEPS_AHEAD; how many steps are still queued:
        ahead.append(sum(not marks[-1].query() for _, marks in clock._steps))

    run_steps(clock, 6, lambda part: torch.cuda._sleep(cycles) if part == "decoder_half" else None, before_step)
    steps = clock.read()
    # Queued and not yet run when the next step is queued: fewer than MAX_STEPS_AHEAD (that step
    # makes MAX_STEPS_AHEAD), and as many as that, so the GPU always has the next step queued.
    assert max(ahead) == MAX_STEPS_AHEAD - 1, ahead
    decoder = [parts["decoder_half"] for _, parts in steps]
    others = [parts[p] for _, parts in steps for p in PARTS if p != "decoder_half"]
    assert min(decoder) > 10 * max(others), (decoder, others)  # GPU time, not the host's queueing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU (runs on a lent GPU machine)")
def test_on_a_gpu_a_stopped_request_stops_waiting_for_steps_the_gpu_has_not_run():
    """A cancelled request or a passed deadline ends the wait for the GPU (a peer's event that is
    never reached must not hold the request); an unstopped wait returns once the GPU is there."""
    clock = StepClock(torch.device("cuda"))
    run_steps(clock, 1, lambda part: torch.cuda._sleep(2_000_000_000) if part == "decoder_half" else None)
    t0 = time.monotonic()
    clock.wait_for_step(0, stop=lambda: True)
    assert clock.read(stop=lambda: True) is None
    assert time.monotonic() - t0 < 0.2 and not clock._steps[0][1][-1].query()  # the GPU is still at it
    assert clock.read() is not None and clock._steps[0][1][-1].query()
