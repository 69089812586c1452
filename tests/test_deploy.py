"""The deployment manifests stay true: every service they start exists, takes the flags they pass,
and is probed on the health service name it registers."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
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


def test_gateway_names_the_worker_pods_the_manifests_create():
    def pods(manifest):
        docs = list(yaml.safe_load_all((K8S / manifest).read_text()))
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        name, port = (
            sts["metadata"]["name"],
            sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        )
        return {f"{name}-{i}.{sts['spec']['serviceName']}:{port}" for i in range(sts["spec"]["replicas"])}

    docs = list(yaml.safe_load_all((K8S / "gateway.yaml").read_text()))
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = importlib.import_module("services.gateway.__main__").build_parser().parse_args(args[3:])
    assert set(parsed.unet) == pods("unet.yaml")
    assert set(parsed.controlnet) == pods("controlnet.yaml")


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
