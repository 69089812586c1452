"""Start the suite's services as separate processes on loopback, and stop them cleanly.

Used by `make run` (the demo below), by the benchmark and by the tests, so all three exercise the
same processes a deployment runs. Each service is asked for port 0 and reports the port it bound
(`SWIFTD_LISTENING <service> <host:port>` on stdout); it counts as up once grpc.health.v1 says
SERVING. Children die with the launcher: on exit, Ctrl-C or SIGTERM they get SIGTERM (graceful
drain), then SIGKILL after a grace period.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import PIL.Image
from grpc_health.v1 import health_pb2, health_pb2_grpc

from swiftd import rpc
from swiftd.server import PARENT_PID_ENV

REPO = Path(__file__).resolve().parent.parent
# make run's prompt: held-out scene number DEMO_SCENE (swiftd.shapeworld.data.held_out_scenes).
DEMO_SCENE = 0


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    address: str = ""
    metrics_address: str = ""  # Prometheus /metrics, when started with --metrics-port
    log_lines: list[str] = field(default_factory=list)
    bound: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0

    def wait_ready(self) -> ServiceProcess:
        """Block until the service listens and reports SERVING."""
        self.bound.wait(max(0.0, self.deadline - time.monotonic()))
        if not self.address:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")
        wait_serving(self.address, self.deadline - time.monotonic())
        return self

    def stop(self, grace_seconds: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines[-n:])

    def stacks(self, timeout: float = 10.0) -> str:
        """Every thread's stack, as the service writes it on SIGUSR1 (swiftd.server), for a
        test's failure message; empty if the process is gone."""
        if self.process.poll() is not None:
            return ""
        start = len(self.log_lines)
        self.process.send_signal(signal.SIGUSR1)
        # The dump arrives through the log pump: taken as whole once no line came for 0.5 s.
        deadline, seen, quiet_since = time.monotonic() + timeout, start, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if len(self.log_lines) != seen:
                seen, quiet_since = len(self.log_lines), time.monotonic()
            elif seen > start and time.monotonic() - quiet_since >= 0.5:
                break
        return "\n".join(self.log_lines[start:])


_running: list[ServiceProcess] = []


def _stop_all() -> None:
    while _running:
        _running.pop().stop()


atexit.register(_stop_all)


def start_service(
    name: str,
    module: str,
    args: list[str],
    cpu_cores: list[int] | None = None,
    num_threads: int | None = None,
    timeout: float = 300.0,
    env: dict | None = None,
    wait: bool = True,
    address: str = "127.0.0.1:0",
) -> ServiceProcess:
    """Start `python -m module args...`; with `wait`, block until it is SERVING.

    Call from the main thread: a child is tied to the thread that spawned it (PDEATHSIG).
    """
    cmd = [sys.executable, "-m", module, *args, "--address", address]
    if cpu_cores:
        cmd += ["--cpu-cores", ",".join(map(str, cpu_cores))]
    if num_threads:
        cmd += ["--num-threads", str(num_threads)]
    # The child asks for SIGTERM when this process dies (swiftd.server.die_with_parent) itself: no
    # preexec_fn, so Popen can vfork, which skips the pthread_atfork handlers. gRPC's prefork
    # handler, run by a plain fork() in a process with live channels, waits for gRPC threads that
    # wait for the GIL the forking thread holds: a full test run hung there now and then.
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **(env or {})}
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the launcher only; it stops children in order
    )
    service = ServiceProcess(name, process, deadline=time.monotonic() + timeout)
    _running.append(service)

    def pump():
        for line in process.stdout:
            line = line.rstrip("\n")
            service.log_lines.append(line)
            if line.startswith("SWIFTD_METRICS "):  # printed before SWIFTD_LISTENING
                service.metrics_address = line.split()[1]
            if line.startswith("SWIFTD_LISTENING "):
                service.address = line.split()[2]
                service.bound.set()
        service.bound.set()

    threading.Thread(target=pump, name=f"log-{name}", daemon=True).start()
    return service.wait_ready() if wait else service


def wait_serving(address: str, timeout: float) -> None:
    with rpc.create_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f} s")
            time.sleep(0.1)


def start_unet(
    model_root: Path, model_id: str, lora_store: str = "", extra_args: list[str] = (), **kwargs
) -> ServiceProcess:
    args = ["--model-root", str(model_root), "--model-id", model_id, *extra_args]
    if lora_store:
        args += ["--lora-store", lora_store]
    return start_service("unet", "services.unet", args, **kwargs)


def start_controlnet(model_root: Path, preload: list[str] = (), extra_args: list[str] = (), **kwargs) -> ServiceProcess:
    args = ["--model-root", str(model_root), *extra_args]
    if preload:
        args += ["--preload", *preload]
    return start_service("controlnet", "services.controlnet", args, **kwargs)


def start_gateway(
    unet: list[str], controlnet: list[str] = (), lora_store: str = "", extra_args: list[str] = (), **kwargs
) -> ServiceProcess:
    """The gateway in front of the given workers (no torch in it: give it no num_threads)."""
    args = ["--unet", *unet, *extra_args]
    if controlnet:
        args += ["--controlnet", *controlnet]
    if lora_store:
        args += ["--lora-store", lora_store]
    return start_service("gateway", "services.gateway", args, **kwargs)


def start_lora_store(
    model_root: Path,
    cache_dir: Path,
    base_models: list[str] = (),
    prefetch: list[str] = (),
    extra_args: list[str] = (),
    **kwargs,
) -> ServiceProcess:
    args = ["--model-root", str(model_root), "--cache-dir", str(cache_dir), *extra_args]
    if base_models:
        args += ["--base-model", *base_models]
    if prefetch:
        args += ["--prefetch", *prefetch]
    return start_service("lora_store", "services.lora_store", args, **kwargs)


# -- make run --------------------------------------------------------------------------------------


def _stop_on_signals() -> None:
    def on_signal(signum, _frame):
        # Unwind: an in-flight call is cancelled first, then the services are stopped (finally).
        print(f"\nsignal {signum}: stopping the services", flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def start_suite(args, gateway_address: str = "127.0.0.1:0") -> dict[str, ServiceProcess]:
    """The four services on loopback, as `make run` uses them."""
    t0 = time.perf_counter()
    print(f"starting the services for {args.model_id} ...", flush=True)
    # One device per service: on CPU, one pinned core and one thread each (two threads on a busy
    # core oversubscribe OpenMP and run many times slower).
    # Started side by side (most of a start is importing torch and diffusers), then awaited.
    side_core = [1 % os.cpu_count()]
    # The store prepares the LoRA before serving (as a deployment prefetches its popular LoRAs).
    store = start_lora_store(
        args.model_root,
        args.lora_cache,
        base_models=[args.model_id],
        prefetch=[args.lora_id],
        cpu_cores=side_core,
        num_threads=1,
        wait=False,
    )
    controlnet = start_controlnet(
        args.model_root, preload=[args.controlnet_id], cpu_cores=side_core, num_threads=1, wait=False
    )
    unet = start_unet(args.model_root, args.model_id, cpu_cores=[0], num_threads=1, wait=False)
    for service in (store, controlnet, unet):
        service.wait_ready()
    gateway = start_gateway(
        [unet.address], [controlnet.address], store.address, cpu_cores=side_core, address=gateway_address
    )
    suite = {"lora_store": store, "controlnet": controlnet, "unet": unet, "gateway": gateway}
    for name, service in suite.items():
        print(f"  {name:<11} {service.address}")
    print(f"all up in {time.perf_counter() - t0:.1f} s", flush=True)
    return suite


def demo(args) -> int:
    """Start the four services, send one request through the gateway with the CLI, score the
    image it wrote, stop.

    The request is a held-out prompt of the shape world (a caption the model never saw in
    training) with the edges ControlNet given that scene's edge map and the pastel LoRA: on the
    trained model the image shows what the prompt asks, where the edges say, in the LoRA's style,
    and the scorer says so.
    """
    from swiftd import cli
    from swiftd.shapeworld.data import held_out_scenes
    from swiftd.shapeworld.render import edge_map
    from swiftd.shapeworld.score import score

    _stop_on_signals()
    args.out.mkdir(parents=True, exist_ok=True)
    scene = held_out_scenes(DEMO_SCENE + 1)[DEMO_SCENE]
    hint = edge_map(scene, args.size)
    edges = args.out / "edges.png"
    PIL.Image.fromarray(hint).save(edges)
    image_path = args.out / "demo.png"
    try:
        gateway = start_suite(args)["gateway"]
        command = [
            "generate",
            "--address",
            gateway.address,
            "--model",
            args.model_id,
            "--prompt",
            scene.caption(),
            "--width",
            str(args.size),
            "--height",
            str(args.size),
            "--steps",
            str(args.steps),
            "--guidance",
            str(args.guidance),
            "--seed",
            "0",
            "--lora",
            f"{args.lora_id}:1.0",
            "--controlnet",
            f"{args.controlnet_id}={edges}:1.0",
            "--request-id",
            "make-run",
            "-o",
            str(image_path),
        ]
        shown = [f"'{c}'" if " " in c else c for c in command]
        print("\nthe request, through the gateway with the swiftd CLI:\n  swiftd " + " ".join(shown) + "\n", flush=True)
        code = cli.main(command)
    finally:
        _stop_all()
    if code == 0:
        verdict = score(np.asarray(PIL.Image.open(image_path).convert("RGB")), scene, hint)
        print(f"\nthe scorer on {image_path} (swiftd/shapeworld/score.py):\n  {verdict.describe(scene)}")
    return code


def up(args) -> int:
    """Start the four services and keep them up until Ctrl-C or SIGTERM."""
    _stop_on_signals()
    try:
        gateway = start_suite(args, gateway_address=args.gateway_address)["gateway"]
        print(
            f"\ngateway on {gateway.address}; try:\n  swiftd generate --address {gateway.address} --model {args.model_id} "
            f"--prompt 'a red circle at the top left on a white background' --width 64 --height 64 --guidance 4 "
            f"--lora {args.lora_id}:1.0 -o out.png\nCtrl-C stops the suite.",
            flush=True,
        )
        while all(s.process.poll() is None for s in _running):
            time.sleep(0.5)
        print("a service exited; stopping the others", flush=True)
        return 1
    finally:
        _stop_all()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swiftd.launcher")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="start the suite, send one request, write the image, stop")
    u = sub.add_parser("up", help="start the suite and keep it up until Ctrl-C")
    u.add_argument("--gateway-address", default="127.0.0.1:50050")
    for p in (d, u):
        p.add_argument(
            "--model-root", type=Path, default=REPO / "weights", help="model repository (models/, controlnets/, loras/)"
        )
        p.add_argument("--model-id", default="shapes-sd15")
        p.add_argument("--controlnet-id", default="shapes-sd15-cn-edges")
        p.add_argument("--lora-id", default="shapes-sd15-lora-pastel-kohya", help="kohya format")
        p.add_argument("--lora-cache", type=Path, default=Path("out/.lora-cache"), help="the LoRA store's disk tier")
    d.add_argument("--out", type=Path, default=Path("out"))
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--guidance", type=float, default=4.0)
    d.add_argument("--size", type=int, default=64, help="pixels per side (the shape world's native 64)")
    args = parser.parse_args(argv)
    return demo(args) if args.command == "demo" else up(args)


if __name__ == "__main__":
    sys.exit(main())
