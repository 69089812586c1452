"""The Diffusers baselines of issue #12, behind the same gRPC API as our gateway.

What people run today, at equal hardware: one Diffusers pipeline process per device
(`bench.baselines.worker`, its ControlNets in memory) behind a least-loaded FIFO dispatcher
(`bench.baselines.dispatcher`). Both serve `swiftd.v1.Gateway`, so the same load generator
(`swiftd.traffic.loadgen`), client and CLI drive them and our suite. Two LoRA policies:

* `fuse`: load_lora_weights + fuse_lora per request, unfused and unloaded after;
* `adapters`: the stronger variant, LoRAs kept loaded as PEFT adapters (LRU), `set_adapters`
  per request, never fused.

`start_baseline` starts a whole baseline as processes on loopback, one worker per core pinned to
it with one torch thread (as our services get one core each), so that a comparison runs both
sides on the same devices, model, dtype and trace::

    from bench.baselines import start_baseline
    with start_baseline(".zoo", "tiny-sd15", "fuse", cores=[0, 1]) as baseline:
        ...  # swiftd.client.Client(baseline.address), or loadgen.replay(..., ReplayConfig(baseline.address))

No torch is imported here: the dispatcher (which imports this package) never loads it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from swiftd.launcher import ServiceProcess, start_service

MODES = ("fuse", "adapters")


@dataclass
class Baseline:
    """A running baseline: the dispatcher (the address to send requests to) and its workers."""

    mode: str
    dispatcher: ServiceProcess
    workers: list[ServiceProcess] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The dispatcher's host:port (swiftd.v1.Gateway)."""
        return self.dispatcher.address

    @property
    def worker_addresses(self) -> list[str]:
        """Each worker's host:port; a worker also serves swiftd.v1.Gateway on its own."""
        return [w.address for w in self.workers]

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Drain and stop every process: all are signalled first, so they drain side by side."""
        processes = [self.dispatcher, *self.workers]
        for service in processes:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in processes:
            service.stop(grace_seconds)

    def __enter__(self) -> Baseline:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_baseline(
    model_root: str | Path,
    model_id: str,
    mode: str,
    cores: list[int],
    dtype: str = "float32",
    adapter_cache: int = 4,
    max_queue: int = 64,
    address: str = "127.0.0.1:0",
    worker_args: list[str] = (),
    dispatcher_args: list[str] = (),
    timeout: float = 300.0,
) -> Baseline:
    """Start one worker per core in `cores` (pinned to it, one torch thread) and the dispatcher
    in front of them; return once all report SERVING.

    The dispatcher holds no weights and does little work; it is pinned to the workers' cores (all
    of them), so a baseline uses exactly the devices it is given and no more. `adapter_cache`
    matters in `adapters` mode only; `worker_args` / `dispatcher_args` are passed on as given
    (e.g. limits). Everything started is stopped again if any part fails to start.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not cores:
        raise ValueError("a baseline needs at least one core (one worker per core)")
    args = ["--model-root", str(model_root), "--model-id", model_id, "--mode", mode, "--dtype", dtype]
    args += ["--adapter-cache", str(adapter_cache), *worker_args]
    started: list[ServiceProcess] = []
    try:
        # Side by side (most of a start is importing torch and Diffusers), then awaited.
        for core in cores:
            started.append(
                start_service(
                    f"baseline-worker-{core}",
                    "bench.baselines.worker",
                    args,
                    cpu_cores=[core],
                    num_threads=1,
                    timeout=timeout,
                    wait=False,
                )
            )
        for worker in started:
            worker.wait_ready()
        dispatcher = start_service(
            "baseline-dispatcher",
            "bench.baselines.dispatcher",
            ["--workers", *[w.address for w in started], "--max-queue", str(max_queue), *dispatcher_args],
            cpu_cores=sorted(set(cores)),
            timeout=timeout,
            address=address,
        )
    except BaseException:
        for service in started:
            service.stop()
        raise
    return Baseline(mode, dispatcher, started)
