"""The deployment manifests stay true: every service they start exists, takes the flags they pass,
and is probed on the health service name it registers."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from swiftd import rpc

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
SERVICE_NAMES = {
    "services.unet": rpc.UNET_SERVICE,
    "services.controlnet": rpc.CONTROLNET_SERVICE,
    "services.lora_store": rpc.LORA_STORE_SERVICE,
    "services.gateway": rpc.GATEWAY_SERVICE,
}


def _docs(manifest: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / manifest).read_text()))


SERVICE_MANIFESTS = sorted(
    p.name for p in K8S.glob("*.yaml") if any(d["kind"] in ("Deployment", "StatefulSet") for d in _docs(p.name))
)


@pytest.mark.parametrize("manifest", SERVICE_MANIFESTS)
def test_manifest_starts_a_real_service_with_valid_flags(manifest):
    docs = list(yaml.safe_load_all((K8S / manifest).read_text()))
    deployment = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))
    if deployment["kind"] == "StatefulSet":  # stable pod names need the governing headless Service
        service = next(d for d in docs if d["kind"] == "Service")
        assert (
            deployment["spec"]["serviceName"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
        )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    python, dash_m, module, *args = container["args"]
    assert (python, dash_m) == ("python", "-m")
    parser = importlib.import_module(f"{module}.__main__").build_parser()
    parsed = parser.parse_args(args)  # exits (fails the test) on an unknown or malformed flag
    port = int(parsed.address.rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAMES[module]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > parsed.grace_seconds
    # Prometheus finds /metrics where the service serves it.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert parsed.metrics_port == ports["metrics"] == int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true"


def test_gateway_finds_the_workers_through_their_headless_services():
    def headless_service(manifest):
        docs = _docs(manifest)
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        service = next(d for d in docs if d["kind"] == "Service")
        assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == sts["spec"]["serviceName"]
        assert not service["spec"].get("publishNotReadyAddresses", False)  # only ready pods get requests
        port = sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        return f"dns:///{service['metadata']['name']}:{port}"

    docs = _docs("gateway.yaml")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = importlib.import_module("services.gateway.__main__").build_parser().parse_args(args[3:])
    assert parsed.unet == [headless_service("unet.yaml")]
    assert parsed.controlnet == [headless_service("controlnet.yaml")]


def test_compile_job_publishes_what_the_workers_load():
    """The release Job builds into a staging directory, verifies it and publishes it under the
    release's name; that name is what the workers pass to --compiled-artifacts, on the same volume,
    built on the workers' GPU type and for their model, dtype and device."""
    from compiler.cli import build_parser

    job = _docs("compile-job.yaml")[0]
    pod = job["spec"]["template"]["spec"]
    (build,), (verify,) = pod["initContainers"], pod["containers"]
    assert build["args"][:3] == verify["args"][:3] == ["python", "-m", "compiler"]
    built, verified = build_parser().parse_args(build["args"][3:]), build_parser().parse_args(verify["args"][3:])
    assert (built.command, verified.command) == ("build", "verify")
    assert built.out == verified.artifacts and verified.publish is not None and verified.publish != built.out
    assert built.out.parent == verified.publish.parent  # one filesystem: publishing is a rename
    assert (built.model_id, built.dtype, built.device) == (verified.model_id, verified.dtype, verified.device)
    assert job["metadata"]["name"].endswith(verified.publish.name.rsplit("-", 1)[1])  # one Job per release tag
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # a failure stops the release

    def claim(spec, mount_path):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for mount in container["volumeMounts"]:
                if mount["mountPath"] == mount_path:
                    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                    yield volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    root = str(built.out.parent)
    assert set(claim(pod, root)) == {("swiftd-artifacts", False)}
    for manifest, module in (("unet.yaml", "services.unet"), ("controlnet.yaml", "services.controlnet")):
        sts = next(d for d in _docs(manifest) if d["kind"] == "StatefulSet")
        spec = sts["spec"]["template"]["spec"]
        args = (
            importlib.import_module(f"{module}.__main__").build_parser().parse_args(spec["containers"][0]["args"][3:])
        )
        directories = (
            args.compiled_artifacts if isinstance(args.compiled_artifacts, list) else [args.compiled_artifacts]
        )
        assert directories == [verified.publish], manifest
        assert args.dtype == built.dtype and args.device == built.device
        assert set(claim(spec, root)) == {("swiftd-artifacts", True)}
        assert spec["nodeSelector"] == pod["nodeSelector"], manifest  # kernels are built per GPU type


def test_every_volume_claim_is_defined_with_an_access_mode_that_fits():
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _docs("volumes.yaml")}
    for path in K8S.glob("*.yaml"):
        for doc in _docs(path.name):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for volume in spec.get("volumes", []):
                name = volume["persistentVolumeClaim"]["claimName"]
                assert name in claims, f"{path.name} mounts {name}, which volumes.yaml does not define"
                pods = doc["spec"].get("replicas", 1)
                if name != "swiftd-lora-cache" or pods > 1:  # mounted by pods on many nodes
                    assert set(claims[name]) & {"ReadOnlyMany", "ReadWriteMany"}, name
    assert claims["swiftd-artifacts"] == ["ReadWriteMany"]  # written by the Job, read by every worker


# -- container images ------------------------------------------------------------------------------

REPO = K8S.parent.parent
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


def test_each_manifest_runs_the_image_of_its_service():
    for manifest in sorted(p.name for p in K8S.glob("*.yaml")):
        for doc in _docs(manifest):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                image = container["image"].split(":")[0]
                module = container["args"][2] if container.get("args", [])[:2] == ["python", "-m"] else ""
                want = "swiftd-gateway" if module == "services.gateway" else "swiftd-worker"
                assert image == want, f"{manifest}: {container['name']} runs {image}, built from {want}"
                assert (DOCKER / f"{want.removeprefix('swiftd-')}.Dockerfile").exists()


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


def test_the_autoscaler_scales_a_worker_statefulset_on_a_metric_the_gateway_exports():
    from swiftd import metrics

    (hpa,) = _docs("autoscaling.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    manifest = next(
        d
        for p in K8S.glob("*.yaml")
        for d in _docs(p.name)
        if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
    )
    assert manifest["spec"]["template"]["metadata"]["labels"]["component"] == "unet"
    assert hpa["spec"]["minReplicas"] <= manifest["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "swiftd_gateway_queue_depth"
    assert metrics.QUEUE_DEPTH._name == "swiftd_queue_depth" and "model" in metrics.QUEUE_DEPTH._labelnames
    # The adapter rule the docs give sums the gateways' series of that metric.
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "swiftd_gateway_queue_depth" in readme and "sum(swiftd_queue_depth{" in readme


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
