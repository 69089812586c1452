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


@pytest.mark.parametrize("manifest", sorted(p.name for p in K8S.glob("*.yaml")))
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
