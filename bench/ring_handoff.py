"""The residual handoff alone: one step's ControlNet residuals from a writer process to a reader
process through the ring a residual stream negotiates, timed per step.

    python -m bench.ring_handoff --device cuda --family sdxl      (CUDA IPC ring, a GPU)
    python -m bench.ring_handoff --device cuda --transport shared_memory
                                  (GPU tensors through the shared-memory ring: a GPU the reader
                                  cannot map, as in one GPU per container)
    python -m bench.ring_handoff --device cpu --family sd15       (shared-memory ring)

The writer (a child process, as a ControlNet worker is) fills the next slot with a step's
residuals (the shapes of the family's ControlNet at its native resolution, CFG batch 2, fp16 on
CUDA), waits until they are made (so the clock starts when the residuals exist, as a ControlNet
step ends), commits, and sends the slot's address with that moment over a pipe. The reader maps
the ring once, then per step reads the slot into tensors of its own, as the UNet worker's reader
does, and waits until they are usable. Handoff = that moment less the writer's (CLOCK_MONOTONIC,
one clock for both processes). GPU residuals into a host-memory ring are copied in after that
moment, as a ControlNet worker's are, so the handoff includes both copies. The reader then asks
for the next step, as the next StepInput would, with that step's sample in the ring's sample
buffer (the latents' shape, CFG batch 2); the writer copies it out and waits until its copy is
usable: the sample handoff, timed the same way the other direction. Every step's values are
checked both ways, so a torn or stale read fails the run.

This is the target "residual handoff over CUDA IPC <= 1 ms per step" measured without a UNet or
ControlNet around it; `bench.gpu_serve` measures it inside requests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time

import torch

from swiftd import transport


def residual_shapes(family: str, batch: int = 2) -> list[tuple[int, ...]]:
    """The ControlNet residual shapes of `family` at its native resolution: the down-block
    residuals (conv_in's output, each resnet's, each downsampler's), then the mid block's."""
    from swiftd.zoo import SPECS

    unet = SPECS[family].unet
    channels, layers = unet["block_out_channels"], unet["layers_per_block"]
    side = unet["sample_size"]
    shapes = [(batch, channels[0], side, side)]
    for i, width in enumerate(channels):
        shapes += [(batch, width, side, side)] * layers
        if i < len(channels) - 1:
            side //= 2
            shapes.append((batch, width, side, side))
    return shapes + [(batch, channels[-1], side, side)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_shape(family: str, batch: int = 2) -> tuple[int, ...]:
    """The latent model input of `family` at its native resolution."""
    from swiftd.zoo import SPECS

    unet = SPECS[family].unet
    return (batch, unet.get("in_channels", 4), unet["sample_size"], unet["sample_size"])


def _writer(conn, kind: int, shapes, sample: tuple[int, ...], device: str, dtype: str, steps: int) -> None:
    device, dtype = torch.device(device), getattr(torch, dtype)
    tensors = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
    ring = transport.ring_class(kind).create(tensors, None, sample=torch.zeros(sample, dtype=dtype))
    conn.send(ring.to_pb().SerializeToString())
    conn.recv()  # mapped
    sample_handoffs = []
    for step in range(steps):
        views = ring.next_slot()
        in_place = views[0].device == tensors[0].device  # else GPU residuals into a host-memory ring
        for tensor in views if in_place else tensors:
            tensor.fill_(float(step % 251))  # the reader checks it: a stale or torn slot fails
        _sync(device)
        made_at = time.perf_counter()
        if not in_place:
            for view, tensor in zip(views, tensors):
                view.copy_(tensor)  # as SessionChannel.respond does
        slot = ring.commit()
        conn.send((slot.SerializeToString(), made_at))
        written_at = conn.recv()  # the next step's input: its sample is in the ring
        got = ring.read_sample(step + 1).to(device)  # on the ControlNet's device, as its step uses it
        _sync(device)
        sample_handoffs.append(time.perf_counter() - written_at)
        if got.flatten()[-1].item() != float((step + 1) % 251):
            raise RuntimeError(f"step {step + 1}: the sample buffer did not hold that step's sample")
    conn.send(sample_handoffs)
    conn.recv()
    ring.unlink()
    ring.close()


def run(kind: int, family: str, device: str, dtype: str, steps: int) -> dict:
    from swiftd.v1 import controlnet_pb2

    shapes, sample = residual_shapes(family), sample_shape(family)
    context = multiprocessing.get_context("spawn")  # a CUDA context is not forked
    parent, child = context.Pipe()
    writer = context.Process(target=_writer, args=(child, kind, shapes, sample, device, dtype, steps), daemon=True)
    writer.start()
    child.close()  # the writer's end: if the writer dies, receiving fails instead of waiting for good

    def receive():
        """The writer's next message; RuntimeError, not a hang, once it has died (a CUDA error,
        /dev/shm too small for the ring)."""
        while not parent.poll(1.0):
            if not writer.is_alive():
                raise RuntimeError(f"the writer process ended (exit code {writer.exitcode}); its stderr says why")
        return parent.recv()

    try:
        ring_pb = controlnet_pb2.ResidualRing.FromString(receive())
        ring = transport.ring_class(kind).attach(ring_pb)
        ring.unlink()  # both sides have it: nothing left behind whatever happens next
        parent.send("mapped")
        target, out_dtype = torch.device(device), getattr(torch, dtype)
        handoffs = []
        next_sample = torch.empty(sample, device=target, dtype=out_dtype)
        while isinstance(message := receive(), tuple):
            slot_bytes, written_at = message
            slot = controlnet_pb2.ResidualSlot.FromString(slot_bytes)
            tensors = ring.read(slot, target, out_dtype)
            event = getattr(tensors, "event", None)  # CUDA: the copies' completion
            if event is not None:
                event.synchronize()
            handoffs.append(time.perf_counter() - written_at)
            step = len(handoffs) - 1
            if any(t.flatten()[-1].item() != float(step % 251) for t in (tensors[0], tensors[-1])):
                raise RuntimeError(f"step {step}: the slot did not hold that step's residuals")
            next_sample.fill_(float((step + 1) % 251))  # as the scheduler makes the next input
            _sync(target)
            written_at = time.perf_counter()
            if not ring.write_sample(next_sample, step + 1):
                raise RuntimeError("the ring has no sample buffer for this sample")
            parent.send(written_at)
        sample_handoffs = message
        parent.send("done")
        ring.close()
    finally:
        writer.join(timeout=30)
    warm = handoffs[2:] or handoffs  # the first steps touch fresh memory
    nbytes = sum(torch.Size(s).numel() for s in shapes) * getattr(torch, dtype).itemsize
    median = statistics.median(warm)
    return {
        "transport": transport.name(kind),
        "family": family,
        "device": torch.cuda.get_device_name() if target.type == "cuda" else "cpu",
        "dtype": dtype,
        "tensors": len(shapes),
        "bytes_per_step": nbytes,
        "steps": len(handoffs),
        "handoff_ms_median": 1e3 * median,
        "handoff_ms_p90": 1e3 * sorted(warm)[int(0.9 * (len(warm) - 1))],
        "handoff_ms_first": 1e3 * handoffs[0],
        "effective_gb_per_s": nbytes / median / 1e9,
        "sample_shape": list(sample),
        "sample_handoff_ms_median": 1e3 * statistics.median(sample_handoffs[2:] or sample_handoffs),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ring_handoff", description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (CUDA IPC ring) or cpu (shared-memory ring)")
    parser.add_argument(
        "--transport",
        choices=["cuda_ipc", "shared_memory"],
        default=None,
        help="default: cuda_ipc on CUDA, shared_memory on the CPU (on CUDA: GPU tensors through host memory)",
    )
    parser.add_argument("--family", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--dtype", default=None, help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    kind = transport.BY_NAME[args.transport or ("cuda_ipc" if on_cuda else "shared_memory")]
    if kind == transport.CUDA_IPC and not on_cuda:
        parser.error("cuda_ipc needs --device cuda")
    dtype = args.dtype or ("float16" if on_cuda else "float32")
    results = []
    for family in args.family:
        results.append(run(kind, family, args.device, dtype, args.steps))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
