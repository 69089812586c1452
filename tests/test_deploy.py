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


SERVICE_MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "compile-job.yaml")


def test_every_manifest_is_checked():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted([*SERVICE_MANIFESTS, "compile-job.yaml"])


@pytest.mark.parametrize("manifest", SERVICE_MANIFESTS)
def test_manifest_starts_a_real_service_with_valid_flags(manifest):
    docs = list(yaml.safe_load_all((K8S / manifest).read_text()))
    deployment = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))
    if deployment["kind"] == "StatefulSet":  # stable pod names need the governing headless Service
        service = next(d for d in docs if d["kind"] == "Service")
        assert deployment["spec"]["serviceName"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
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
        name, port = sts["metadata"]["name"], sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        return {f"{name}-{i}.{sts['spec']['serviceName']}:{port}" for i in range(sts["spec"]["replicas"])}

    docs = list(yaml.safe_load_all((K8S / "gateway.yaml").read_text()))
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = importlib.import_module("services.gateway.__main__").build_parser().parse_args(args[3:])
    assert set(parsed.unet) == pods("unet.yaml")
    assert set(parsed.controlnet) == pods("controlnet.yaml")


def test_compile_job_builds_and_verifies_what_the_workers_load():
    """The release-pipeline Job's build and verify take valid compiler flags, name the same
    directory, and that directory is what the workers pass to --compiled-artifacts, on the same
    volume (written by the Job, read-only in the workers)."""
    from compiler.cli import build_parser

    job = yaml.safe_load((K8S / "compile-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (build,), (verify,) = pod["initContainers"], pod["containers"]
    built = build_parser().parse_args(build["args"][3:])
    verified = build_parser().parse_args(verify["args"][3:])
    assert build["args"][:3] == verify["args"][:3] == ["python", "-m", "compiler"]
    assert (built.command, verified.command) == ("build", "verify")
    assert built.out == verified.artifacts
    assert (built.model_id, built.dtype, built.device) == (verified.model_id, verified.dtype, verified.device)
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # a failure stops the rollout

    def claim(spec, mount_path):
        mounts = {m["mountPath"]: m for c in spec.get("initContainers", []) + spec["containers"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
        return volumes[mounts[mount_path]["name"]], mounts[mount_path].get("readOnly", False)

    root = str(built.out.parent)
    assert claim(pod, root) == ("swiftd-artifacts", True)  # the verify container's mount; build's is writable
    assert not any(m.get("readOnly") for m in build["volumeMounts"] if m["mountPath"] == root)
    for manifest, module in (("unet.yaml", "services.unet"), ("controlnet.yaml", "services.controlnet")):
        sts = next(d for d in yaml.safe_load_all((K8S / manifest).read_text()) if d["kind"] == "StatefulSet")
        spec = sts["spec"]["template"]["spec"]
        args = importlib.import_module(f"{module}.__main__").build_parser().parse_args(spec["containers"][0]["args"][3:])
        directories = args.compiled_artifacts if isinstance(args.compiled_artifacts, list) else [args.compiled_artifacts]
        assert directories == [built.out], manifest
        assert args.dtype == built.dtype and args.device == built.device
        assert claim(spec, root) == ("swiftd-artifacts", True)
