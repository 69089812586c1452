"""Gateway configuration: where the workers are, what a request may ask for, how much to admit."""

from __future__ import annotations

from dataclasses import dataclass, field

from swiftd.request import Limits


@dataclass
class GatewayConfig:
    # host:port of each worker, or dns:///name:port for every address of a name (discovery.py)
    unet_workers: list[str]
    controlnet_workers: list[str] = field(default_factory=list)
    dns_server: str = ""  # host:port of the DNS server for dns:/// targets; empty: the system's
    lora_store: str = ""  # host:port; empty = requests with LoRAs are refused
    default_model: str = ""  # empty = the first model the workers list
    limits: Limits = field(default_factory=Limits)
    # Admission, per model: requests running at once per UNet worker serving it (a worker runs
    # them one at a time; more than one per worker keeps it busy between requests at the price of
    # queueing there), and how many may wait at the gateway.
    per_worker_concurrency: int = 1
    max_queue: int = 64
    default_lora_bound_steps: int | None = None  # None = the UNet workers' default
    request_timeout: float = 600.0  # seconds, applied when the client sets no deadline
    catalog_ttl: float = 10.0  # seconds between refreshes of the model/LoRA/ControlNet listings
    status_timeout: float = 2.0  # seconds for a worker's status or listing call
    # "auto": a request with classifier-free guidance may be split over two UNet workers on idle
    # devices (services/gateway/planner.py); "never": each request runs on one UNet worker.
    cfg_split: str = "auto"
