"""Running a service process: CPU pinning, the gRPC server, health, graceful stop.

Every service's `__main__` builds its servicer and calls `serve`. Readiness is the standard
grpc.health.v1 status (SERVING once the servicer is registered); liveness is the server answering
at all. SIGTERM/SIGINT drain: open Health.Watch streams see NOT_SERVING, new RPCs (health checks
included) are refused with UNAVAILABLE, running ones get `grace_seconds` to finish and are then
cancelled (their callers see UNAVAILABLE). A call that fails because the device did (a CUDA error
that leaves the process's context unusable) starts the same drain, and the process then exits
with EXIT_DEVICE_FAILED: a new process gets a new context (an orchestrator restarts it), where
this one would fail every request the same way while still answering its health checks.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2_grpc

from swiftd import logs, metrics, rpc, security, tracing
from swiftd.drain import DrainInterceptor
from swiftd.interceptor import ErrorInterceptor
from swiftd.request import Limits

log = logging.getLogger(__name__)
_PROCESS_START = time.monotonic()  # this module is imported first thing by every service
# After the grace period the running calls are cancelled; how long their loops get to reach their
# next step check (one step, or one VAE decode) before the process exits anyway.
STOP_WAIT_SECONDS = 30.0
EXIT_DEVICE_FAILED = 70  # EX_SOFTWARE: the process's device context is unusable


@dataclass
class ServerConfig:
    address: str = "127.0.0.1:0"
    max_workers: int = 16  # concurrent RPCs (a whole stream holds one)
    grace_seconds: float = 10.0
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    cpu_cores: list[int] = field(default_factory=list)  # pin the process (a CPU "device"); empty = no pinning
    log_format: str | None = None  # swiftd.logs.FORMATS; None: SWIFTD_LOG_FORMAT, else text
    metrics_port: int | None = None  # Prometheus /metrics; None: not served
    # Largest request message accepted; None: rpc.MAX_MESSAGE_BYTES (residual tensors). The public
    # gateway takes its largest valid request (Limits.max_request_bytes).
    max_receive_bytes: int | None = None
    tls_dir: Path | None = None  # swiftd.security: mutual TLS; None: plaintext (local runs)
    tls_server_name: str = ""
    health_port: int | None = None  # plaintext health checks only (kubelet probes do not speak TLS)
    tokens_file: Path | None = None  # the gateway: its clients' bearer tokens
    # RPCs that may wait for a worker thread beyond max_workers; more are refused at once with
    # RESOURCE_EXHAUSTED, so waiting calls' messages (held by gRPC, counted by no budget) stay bounded.
    max_waiting_rpcs: int | None = None  # None: as many as max_workers


def add_server_arguments(parser) -> None:
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port to listen on (port 0 = pick one)")
    parser.add_argument("--max-workers", type=int, default=16, help="RPCs served at once (a stream holds one)")
    parser.add_argument(
        "--max-waiting-rpcs",
        type=int,
        default=None,
        help="RPCs that may wait for one of those; more get RESOURCE_EXHAUSTED at once (default: --max-workers)",
    )
    parser.add_argument("--grace-seconds", type=float, default=10.0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--cpu-cores", default="", help="comma-separated cores to pin this process to")
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=None,
        help=f"text, or JSON lines with request and trace ids (default: ${logs.FORMAT_ENV}, else text)",
    )
    metrics.add_metrics_argument(parser)
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="mutual TLS: a folder with tls.crt, tls.key and ca.crt (a Kubernetes TLS secret); "
        "default: plaintext, for local runs only",
    )
    parser.add_argument(
        "--tls-server-name",
        default="",
        help="the name every service's certificate carries, checked instead of the dialed host",
    )
    parser.add_argument(
        "--health-port", type=int, default=None, help="also serve health checks (only) in plaintext on this port"
    )


def server_config_from_args(args) -> ServerConfig:
    cores = [int(c) for c in args.cpu_cores.split(",") if c.strip()]
    return ServerConfig(
        args.address,
        args.max_workers,
        args.grace_seconds,
        args.num_threads,
        cores,
        args.log_format,
        args.metrics_port,
        tls_dir=args.tls_dir,
        tls_server_name=args.tls_server_name,
        health_port=args.health_port,
        tokens_file=getattr(args, "tokens_file", None),
        max_waiting_rpcs=args.max_waiting_rpcs,
    )


# Set by swiftd.launcher: the pid of the process that started this service, which it must not outlive.
PARENT_PID_ENV = "SWIFTD_PARENT_PID"


def add_limit_arguments(parser) -> None:
    """What a request may ask for (`swiftd.request.Limits`). The gateway enforces them for the
    public API; a UNet worker enforces its own for requests that reach it directly, so give it
    limits at least as wide as its gateway's."""
    defaults = Limits()
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help="pixels per side")
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="pixels per side")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps)
    parser.add_argument("--max-loras", type=int, default=defaults.max_loras)
    parser.add_argument("--max-controlnets", type=int, default=defaults.max_controlnets)


def limits_from_args(args) -> Limits:
    return Limits(
        min_size=args.min_size,
        max_size=args.max_size,
        max_steps=args.max_steps,
        max_loras=args.max_loras,
        max_controlnets=args.max_controlnets,
    )


def die_with_parent() -> None:
    """With PARENT_PID_ENV set: SIGTERM (a graceful stop) when the launcher dies, even by SIGKILL (Linux)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)  # not inherited by processes this one starts
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before we asked: nobody would ever stop us
        raise SystemExit(f"the launcher (pid {parent}) is gone")


def configure_process(config: ServerConfig) -> None:
    """Tie the process to its launcher, pin cores and threads before any model is loaded (oneDNN
    sizes its pools at first use)."""
    die_with_parent()
    # `kill -USR1 <pid>` writes every thread's stack to stderr: where a stuck call waits, without
    # a debugger in the container.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if config.tls_dir is not None:
        security.configure(security.TlsConfig(config.tls_dir, config.tls_server_name))
    if config.cpu_cores:
        os.sched_setaffinity(0, set(config.cpu_cores))
    if config.num_threads:
        import torch  # here, so that the gateway (no models) never loads it

        torch.set_num_threads(config.num_threads)
    # Residual messages are tens of MB; keep their buffers on the heap instead of re-faulting
    # fresh mmap()s per message (3-4x faster codec; see rpc.tune_allocator_for_large_messages).
    rpc.tune_allocator_for_large_messages()
    logs.configure_logging(config.log_format)


def serve(
    service_full_name: str,
    config: ServerConfig,
    register: Callable[[grpc.Server], None],
    on_bound: Callable[[int], None] | None = None,
    on_health: Callable[[grpc_health.HealthServicer], None] | None = None,
    public: bool = False,
) -> None:
    """Start the server, report the bound port, block until SIGTERM/SIGINT, then drain.

    `on_health` gets the health servicer before the server starts, for a service whose readiness
    depends on more than having started (the gateway: reachable workers per model). `public`: the
    gateway's API, whose callers authenticate with a bearer token where `tokens_file` is given
    (else with a client certificate).
    """
    drain_gate = DrainInterceptor()
    device_failed = threading.Event()  # set by the first call that failed because the device did
    tls = security.configured()
    tokens = security.Tokens(config.tokens_file) if config.tokens_file else None
    authorization = [security.AuthorizationInterceptor(tokens)] if tls or tokens else []
    server = rpc.create_server(
        config.max_workers,
        max_waiting=config.max_workers if config.max_waiting_rpcs is None else config.max_waiting_rpcs,
        interceptors=[
            metrics.MetricsInterceptor(),
            drain_gate,
            *tracing.server_interceptors(),
            *authorization,  # inside tracing: the caller's identity goes on the server span
            ErrorInterceptor(on_device_failure=lambda reason: device_failed.set()),
        ],
        options=[("grpc.max_receive_message_length", config.max_receive_bytes)] if config.max_receive_bytes else [],
    )
    register(server)
    health = rpc.add_health_and_reflection(server, [service_full_name])
    if on_health is not None:
        on_health(health)  # before start: no caller sees a readiness the service has not decided
    if tls is not None:
        credentials = security.server_credentials(tls, require_client_auth=not (public and tokens))
        port = server.add_secure_port(config.address, credentials)  # raises if the address cannot be bound
    else:
        log.warning(
            "PLAINTEXT: no --tls-dir, so anyone who reaches %s can call every RPC of this service "
            "(fine on one machine; give --tls-dir everywhere else)",
            config.address,
        )
        port = server.add_insecure_port(config.address)
    server.start()
    health_server = None
    if config.health_port is not None:
        health_server = rpc.create_server(2)
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_server.add_insecure_port(f"{config.address.rsplit(':', 1)[0]}:{config.health_port}")
        health_server.start()
    host = config.address.rsplit(":", 1)[0]
    metrics.START_SECONDS.set(time.monotonic() - _PROCESS_START)
    metrics.track_device_memory("cpu")  # the process's resident memory; CUDA workers add their device
    metrics.serve_metrics(config.metrics_port, host)  # before SWIFTD_LISTENING: a launcher has both once bound
    # One parseable line: launchers that asked for port 0 read the real address from it.
    print(f"SWIFTD_LISTENING {service_full_name} {host}:{port}", flush=True)
    log.info("%s serving on %s:%d", service_full_name, host, port)
    if on_bound is not None:
        on_bound(port)

    # The handler only records the signal (no lock: it runs wherever the main thread happens to
    # be, maybe holding one); the drain runs here, in the main thread.
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not received and not device_failed.is_set():
        time.sleep(0.2)  # a signal interrupts the sleep, so the drain starts at once
    if received:
        log.info("signal %d: draining for up to %.1f s", received[0], config.grace_seconds)
    else:
        log.critical("the device failed: draining for up to %.1f s, then exiting", config.grace_seconds)
    drain_gate.start_draining()  # new RPCs: UNAVAILABLE from now on
    health.enter_graceful_shutdown()  # every service reports NOT_SERVING from now on
    if not drain_gate.wait_idle(config.grace_seconds):
        log.warning("grace period over: cancelling the RPCs still running")
    server.stop(0)  # cancels what is left (callers see UNAVAILABLE)
    # A cancelled call's loop stops at its next step check; wait for it (bounded), so the process
    # never exits under a loop still inside torch.
    if not drain_gate.wait_idle(STOP_WAIT_SECONDS):
        log.error("calls still running %.0f s after they were cancelled: exiting under them", STOP_WAIT_SECONDS)
    server.wait_for_termination()
    if health_server is not None:
        health_server.stop(0)
    tracing.shutdown_tracing()  # flush the spans of the last requests
    log.info("%s stopped", service_full_name)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: a helper thread (a daemon reading a residual stream or
    # pulling deltas) still inside torch's or gRPC's C++ code when the interpreter finalizes
    # ends the process with SIGABRT ("terminate called without an active exception") instead
    # of exit code 0. Everything worth keeping is flushed above.
    os._exit(EXIT_DEVICE_FAILED if device_failed.is_set() else 0)
