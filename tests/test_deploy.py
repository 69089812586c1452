"""The container images and the one-host compose file stay true: Dockerfiles built in stages from
pinned bases as a non-root user, and compose commands every service's own parser accepts.
(Kubernetes: tests/test_deploy_k8s.py.)"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

# -- container images ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = sorted(p.name for p in DOCKER.glob("*.Dockerfile"))


def _dockerfile(name: str) -> tuple[dict[str, str], list[tuple[str, str, list[str]]]]:
    """(global ARG defaults, stages as (base image, stage name, instructions))."""
    lines, pending = [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            lines.append(pending.strip())
            pending = ""
    args, stages = {}, []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        if keyword == "FROM":
            image, _, stage = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            stages.append((image, stage.strip(), []))
        elif keyword == "ARG" and not stages and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        elif stages:
            stages[-1][2].append(line)
    return args, stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_an_image_builds_in_stages_from_pinned_bases_and_runs_as_a_user(dockerfile):
    _, stages = _dockerfile(dockerfile)
    assert len(stages) >= 2, "multi-stage: build tools and sources stay out of the runtime image"
    for image, _, _ in stages:
        assert "@sha256:" in image or re.search(r":\d+(\.\d+){2}", image), f"{image}: pin an exact release"
    _, _, runtime = stages[-1]
    assert any(line.startswith("COPY --from=") for line in runtime), "the runtime stage takes the build's output"
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the service runs as a non-root user"
    # The manifests' `args` are whole command lines (python -m <service> ...): an ENTRYPOINT would prefix them.
    assert any(line.startswith("CMD") for line in runtime) and not any(
        line.startswith("ENTRYPOINT") for line in runtime
    )


def test_the_worker_image_installs_the_projects_torch():
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    args, _ = _dockerfile("worker.Dockerfile")
    assert f"torch=={args['TORCH_VERSION']}" == torch_pin


def test_the_gateway_installs_and_imports_without_torch():
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if d.split("=")[0].split(">")[0] in ("torch", "diffusers", "transformers")], base
    _, stages = _dockerfile("gateway.Dockerfile")
    installs = [line for _, _, lines in stages for line in lines if "pip install" in line]
    assert installs and all("[" not in line for line in installs), "the gateway image installs no extras"
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, services.gateway.__main__; print(sorted(m for m in sys.modules if m in ('torch', 'diffusers', 'transformers')))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def test_the_build_context_leaves_local_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".zoo", ".train", "out"} <= ignored


# -- one-host compose ------------------------------------------------------------------------------

COMPOSE = REPO / "deploy" / "compose"


def _compose() -> dict:
    """compose.yaml with each ${VAR:-default} at its default, as `docker compose` reads it unset."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), (COMPOSE / "compose.yaml").read_text())
    return yaml.safe_load(text)


def test_the_compose_file_starts_real_services_that_find_each_other():
    services = _compose()["services"]
    parsed = {}
    for name, service in services.items():
        command = service.get("command", [])
        if command[:2] != ["python", "-m"]:
            continue
        module = command[2]
        parsed[name] = importlib.import_module(f"{module}.__main__").build_parser().parse_args(command[3:])
        want = "swiftd-gateway" if module == "services.gateway" else "swiftd-worker"
        assert service["image"].split(":")[0] == want, name
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        assert service["user"] != "0" and service["read_only"], name
    port = {name: args.address.rsplit(":", 1)[1] for name, args in parsed.items()}
    gateway = parsed["gateway"]
    assert gateway.unet == [f"unet:{port['unet']}"] and gateway.controlnet == [f"controlnet:{port['controlnet']}"]
    assert gateway.lora_store == parsed["unet"].lora_store == f"lora-store:{port['lora-store']}"
    assert parsed["lora-store"].push_to == gateway.unet and parsed["unet"].peers == gateway.controlnet
    # The ControlNet worker shares the UNet worker's /dev/shm (IPC namespace) and PID namespace,
    # where CUDA IPC handles open: residuals take the ring, not the network.
    controlnet, unet = services["controlnet"], services["unet"]
    assert controlnet["ipc"] == "service:unet" and unet["ipc"] == "shareable"
    assert controlnet["pid"] == f"container:{unet['container_name']}"
    # Served by default: the trained model in weights/, its ControlNet preloaded.
    assert "../../weights:/models:ro" in services["unet"]["volumes"]
    assert (REPO / "weights" / "models" / parsed["unet"].model_id).is_dir()
    assert all((REPO / "weights" / "controlnets" / c).is_dir() for c in parsed["controlnet"].preload)
    # Spans reach the trace UI: services -> collector (OTLP/gRPC 4317) -> Jaeger.
    collector = yaml.safe_load((COMPOSE / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (exporter,) = collector["service"]["pipelines"]["traces"]["exporters"]
    assert collector["exporters"][exporter]["endpoint"].split(":")[0] in services
    assert "16686:16686" in services["jaeger"]["ports"]
