"""The Kubernetes deployment stays true: every kustomize root (the base and each overlay) renders
with `kubectl kustomize`, passes the Kubernetes schemas, starts services that exist with the flags
they take once the release ConfigMap's values are substituted as the kubelet does, and holds what
a production deploy needs (disruption budgets, spread, a restricted security context, a drain
delay, network policies that let through exactly the calls the services make)."""

from __future__ import annotations

import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from swiftd import rpc
from swiftd.server import STOP_WAIT_SECONDS

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
ROOTS = ["base"] + sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir() if p.is_dir())
# The oldest Kubernetes the manifests are for (preStop `sleep` is on by default from 1.30) and the
# newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
SERVICE_NAMES = {
    "services.unet": rpc.UNET_SERVICE,
    "services.controlnet": rpc.CONTROLNET_SERVICE,
    "services.lora_store": rpc.LORA_STORE_SERVICE,
    "services.gateway": rpc.GATEWAY_SERVICE,
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)


@functools.cache
def _render(root: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / root)], capture_output=True, text=True, check=True)
    return tuple(yaml.safe_load_all(out.stdout))


def _all(root: str, *kinds: str) -> list[dict]:
    return [d for d in _render(root) if d["kind"] in kinds]


def _one(root: str, kind: str, name: str) -> dict:
    (doc,) = [d for d in _render(root) if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _containers(workload: dict) -> list[dict]:
    return _pod(workload).get("initContainers", []) + _pod(workload)["containers"]


def _args(root: str, container: dict) -> list[str]:
    """The container's args as the kubelet runs them: $(VAR) from its env and envFrom ConfigMaps."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(_one(root, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container["args"]]
    assert not [a for a in args if "$(" in a], f"{container['name']}: unresolved variables in {args}"
    return args


def _service_args(root: str, container: dict):
    """(module, parsed args) of a `python -m <module> ...` container, parsed by the module's own parser."""
    python, dash_m, module, *args = _args(root, container)
    assert (python, dash_m) == ("python", "-m")
    if module == "compiler":
        from compiler.cli import build_parser
    else:
        build_parser = importlib.import_module(f"{module}.__main__").build_parser
    return module, build_parser().parse_args(args)  # exits (fails the test) on an unknown or malformed flag


def _services(root: str) -> list[tuple[dict, dict, str, object]]:
    """Every service the root runs: (workload, container, module, parsed args), one per container
    (a pod may run two: components/colocated-controlnets)."""
    found = []
    for workload in _all(root, "Deployment", "StatefulSet"):
        for container in _pod(workload)["containers"]:
            if container["args"][:2] == ["python", "-m"]:
                found.append((workload, container, *_service_args(root, container)))
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _directories(compiled_artifacts) -> list:
    """--compiled-artifacts: one directory (UNet worker) or several (ControlNet worker)."""
    if isinstance(compiled_artifacts, list):
        return compiled_artifacts
    return [compiled_artifacts] if compiled_artifacts else []


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("root", ROOTS)
def test_each_root_renders_to_manifests_that_pass_the_kubernetes_schemas(root):
    import kubernetes_validate

    docs = _render(root)
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= {
        d["kind"] for d in docs
    }
    for version in KUBERNETES_VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for doc in docs:  # strict: an unknown field (a typo) fails as well as a wrong type
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_a_cluster_would():
    import kubernetes_validate

    unet = _one("base", "StatefulSet", "swiftd-unet")
    typo = yaml.safe_load(yaml.safe_dump(unet).replace("readinessProbe", "readinesProbe"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # preStop sleep: our oldest version's floor
        kubernetes_validate.validate(unet, "1.28.0", strict=True)


@pytest.mark.parametrize("root", ROOTS)
def test_each_workload_starts_a_real_service_with_valid_flags(root):
    listening: dict[str, list[int]] = {}  # per pod: the containers share its network
    for workload, container, module, parsed in _services(root):
        ports = {p["containerPort"] for p in container["ports"]}
        assert {_port(parsed.address), parsed.metrics_port} <= ports, container["name"]
        listening.setdefault(workload["metadata"]["name"], []).extend(
            [_port(parsed.address), parsed.metrics_port, *([parsed.health_port] if parsed.health_port else [])]
        )
        # Probes on the service's port, or with TLS on its plaintext health port (kubelet probes do not speak TLS).
        probe_port = parsed.health_port if parsed.tls_dir else _port(parsed.address)
        assert container["readinessProbe"]["grpc"] == {"port": probe_port, "service": SERVICE_NAMES[module]}
        for probe in ("livenessProbe", "startupProbe"):
            assert container.get(probe, {"grpc": {"port": probe_port}})["grpc"]["port"] == probe_port, probe
        # A pod leaving drains after its preStop delay; Kubernetes must not kill it before both end.
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        # ... nor while cancelled calls stop at their next step check (swiftd.server.STOP_WAIT_SECONDS).
        budget = pre_stop + parsed.grace_seconds + STOP_WAIT_SECONDS
        assert _pod(workload)["terminationGracePeriodSeconds"] > budget, workload["metadata"]["name"]
        # Prometheus finds /metrics where the pod's first service serves it (a second container's
        # port is declared, for a PodMonitor).
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        if container is _pod(workload)["containers"][0]:
            assert parsed.metrics_port == int(annotations["prometheus.io/port"])
        assert annotations["prometheus.io/scrape"] == "true"
        if workload["kind"] == "StatefulSet":  # stable pod names need the governing headless Service
            service = _one(root, "Service", workload["spec"]["serviceName"])
            assert service["spec"]["clusterIP"] == "None"
    for pod, ports in listening.items():
        assert len(ports) == len(set(ports)), f"{pod}: two services on one port {sorted(ports)}"


@pytest.mark.parametrize("root", ROOTS)
def test_the_gateway_finds_the_workers_through_their_headless_services_and_outlasts_their_drain(root):
    (gateway,) = [w for w in _all(root, "Deployment") if w["metadata"]["name"] == "swiftd-gateway"]
    _, parsed = _service_args(root, _pod(gateway)["containers"][0])

    def headless(target: str) -> str:
        """The service a gateway target reaches: a headless Service's ready pods, on the port of
        the container that serves it."""
        name, port = target.removeprefix("dns:///").split(":")
        service = _one(root, "Service", name)
        assert service["spec"]["clusterIP"] == "None"
        assert not service["spec"].get("publishNotReadyAddresses", False)  # only ready pods get requests
        selected = {"matchLabels": service["spec"]["selector"]}
        (sts,) = [
            w for w in _all(root, "StatefulSet") if _selects(selected, w["spec"]["template"]["metadata"]["labels"])
        ]
        (container,) = [c for c in _pod(sts)["containers"] if int(port) in {p["containerPort"] for p in c["ports"]}]
        # A worker leaving keeps serving until every gateway has re-resolved the records without it
        # (one catalog refresh, plus CoreDNS's default 5 s record TTL).
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] >= parsed.catalog_ttl + 5
        module, serving = _service_args(root, container)
        assert _port(serving.address) == int(port)
        return module

    assert [headless(t) for t in parsed.unet] == ["services.unet"]
    assert [headless(t) for t in parsed.controlnet] == ["services.controlnet"]
    store = _one(root, "Service", parsed.lora_store.split(":")[0])
    assert store["spec"]["ports"][0]["port"] == int(parsed.lora_store.split(":")[1])


@pytest.mark.parametrize("root", ROOTS)
def test_one_release_is_served_everywhere(root):
    """Model, dtype, images and GPU type are set once per root, so no two pods can disagree."""
    parsed = {}
    for workload in _all(root, *WORKLOADS):
        for container in _containers(workload):
            if container["args"][:2] == ["python", "-m"]:
                parsed[(workload["metadata"]["name"], container["name"])] = _service_args(root, container)[1]
    models = {getattr(a, "model_id", None) or getattr(a, "default_model", None) for a in parsed.values()}
    models |= {m for a in parsed.values() for m in getattr(a, "base_model", [])}
    assert len(models - {None}) == 1, models
    dtypes = {getattr(a, "dtype", None) or getattr(a, "default_dtype", None) for a in parsed.values()}
    assert len(dtypes - {None}) == 1, dtypes
    ours = [c["image"] for w in _all(root, *WORKLOADS) for c in _containers(w) if "swiftd-" in c["image"]]
    assert len({image.rsplit(":", 1)[1] for image in ours}) == 1, ours  # one tag for both images
    gpu_pods = [_pod(w) for w in _all(root, *WORKLOADS) if any("nvidia.com/gpu" in str(c) for c in _containers(w))]
    assert gpu_pods and len({str(p.get("nodeSelector")) for p in gpu_pods}) == 1  # kernels are per GPU type
    for pod in gpu_pods:  # GPU nodes are tainted; a GPU pod tolerates it
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


COMPILED_ROOTS = [r for r in ROOTS if "../../components/compiled" in (K8S / r / "kustomization.yaml").read_text()]


@pytest.mark.parametrize("root", COMPILED_ROOTS)
def test_the_compile_job_publishes_what_the_workers_load(root):
    """The release Job builds into a staging directory, verifies it and publishes it under the
    release's name; that name is what the workers pass to --compiled-artifacts, on the same volume,
    built on the workers' GPU type and for their model, dtype and device."""
    (job,) = _all(root, "Job")
    pod = _pod(job)
    (build,), (verify,) = pod["initContainers"], pod["containers"]
    (_, built), (_, verified) = _service_args(root, build), _service_args(root, verify)
    assert (built.command, verified.command) == ("build", "verify")
    assert built.out == verified.artifacts and verified.publish is not None and verified.publish != built.out
    assert built.out.parent == verified.publish.parent  # one filesystem: publishing is a rename
    assert (built.model_id, built.dtype, built.device) == (verified.model_id, verified.dtype, verified.device)
    release = _one(root, "ConfigMap", build["envFrom"][0]["configMapRef"]["name"])["data"]["SWIFTD_RELEASE"]
    assert verified.publish.name.endswith(f"-{release}") and job["metadata"]["name"].endswith(f"-{release}")
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # a failure stops the release

    def claim(spec, mount_path):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for mount in container["volumeMounts"]:
                if mount["mountPath"] == mount_path:
                    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
                    yield volume["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)

    root_dir = str(built.out.parent)
    assert set(claim(pod, root_dir)) == {("swiftd-artifacts", False)}
    workers = [s for s in _services(root) if s[2] in ("services.unet", "services.controlnet")]
    assert sorted(module for _, _, module, _ in workers) == ["services.controlnet", "services.unet"]
    for workload, container, module, args in workers:
        spec = _pod(workload)
        assert _directories(args.compiled_artifacts) == [verified.publish], module
        assert args.dtype == built.dtype and args.device == built.device
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == root_dir]
        assert mount.get("readOnly"), module
        assert set(claim(spec, root_dir)) == {("swiftd-artifacts", True)}
        assert spec["nodeSelector"] == pod["nodeSelector"], module  # kernels are built per GPU type
        if module == "services.controlnet":  # the ControlNets it preloads are the ones compiled
            assert set(args.preload) == set(built.controlnet_id)


def test_the_base_serves_eagerly_without_artifacts():
    """A fresh cluster serves at once: the base's workers need no compile step."""
    assert not _all("base", "Job")
    for name in ("swiftd-unet", "swiftd-controlnet"):
        _, args = _service_args("base", _pod(_one("base", "StatefulSet", name))["containers"][0])
        assert _directories(args.compiled_artifacts) == []
    # One ConfigMap value, a list: `--preload=$(SWIFTD_CONTROLNETS)` is one argument of two ids.
    assert args.preload == ["sd15-canny", "sd15-depth"]


@pytest.mark.parametrize("root", ROOTS)
def test_every_volume_claim_is_defined_with_an_access_mode_that_fits(root):
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _all(root, "PersistentVolumeClaim")}
    for workload in _all(root, *WORKLOADS):
        for volume in _pod(workload).get("volumes", []):
            if "persistentVolumeClaim" not in volume:
                continue
            name = volume["persistentVolumeClaim"]["claimName"]
            assert name in claims, f"{workload['metadata']['name']} mounts {name}, which {root} does not define"
            if workload["spec"].get("replicas", 1) > 1 or name != "swiftd-lora-cache":  # pods on many nodes
                assert set(claims[name]) & {"ReadOnlyMany", "ReadWriteMany"}, name
    if "swiftd-artifacts" in claims:
        assert claims["swiftd-artifacts"] == ["ReadWriteMany"]  # written by the Job, read by every worker


@pytest.mark.parametrize("root", ROOTS)
def test_store_replicas_keep_registry_and_disk_tier_on_one_volume_that_outlives_them(root):
    """The store's --registry and --cache-dir lie on its claim (so registrations and prepared deltas
    survive a restart), and replicas share that claim (ReadWriteMany) and roll one at a time."""
    store = _one(root, "Deployment", "swiftd-lora-store")
    (container,) = _pod(store)["containers"]
    _, args = _service_args(root, container)
    assert args.registry is not None and args.cache_dir is not None
    volumes = {v["name"]: v for v in _pod(store)["volumes"]}
    claims = {d["metadata"]["name"]: d for d in _all(root, "PersistentVolumeClaim")}
    for path in (args.registry, args.cache_dir):
        (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
        assert not mount.get("readOnly") and "persistentVolumeClaim" in volumes[mount["name"]], path
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        if store["spec"]["replicas"] > 1:
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], path
    if store["spec"]["replicas"] > 1:
        assert store["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    else:
        assert store["spec"]["strategy"] == {"type": "Recreate"}  # the new pod needs the old one's volume


@pytest.mark.parametrize("root", ROOTS)
def test_every_pod_runs_restricted_on_a_read_only_root(root):
    for workload in _all(root, *WORKLOADS):
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in _containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
            if "swiftd-" in container["image"]:  # torch, Triton and Python write under /tmp
                (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])


@pytest.mark.parametrize("root", ROOTS)
def test_serving_components_survive_drains_and_node_loss(root):
    budgets = _all(root, "PodDisruptionBudget")
    for workload in _all(root, "Deployment", "StatefulSet"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if workload["spec"]["replicas"] < 2:
            continue  # a budget on one replica would block every drain of its node (lora-store)
        (budget,) = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        assert budget["spec"]["maxUnavailable"] == 1
        (spread, *_) = _pod(workload)["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname" and _selects(spread["labelSelector"], labels)


def _secret_at(pod: dict, container: dict, path) -> str:
    """The Secret mounted at `path` in `container`."""
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == Path(path)]
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]["secretName"]


MTLS_ROOTS = [r for r in ROOTS if "../../components/mtls" in (K8S / r / "kustomization.yaml").read_text()]


@pytest.mark.parametrize("root", MTLS_ROOTS)
def test_every_service_speaks_mutual_tls_with_its_own_certificate(root):
    """Each service mounts its own certificate (Secret swiftd-<service>-tls: its identity in
    swiftd.security.RULES) where --tls-dir points, all certificates carry the one --tls-server-name,
    and the gateway reads its clients' tokens from a mounted Secret."""
    from swiftd import security

    server_names = set()
    for workload, container, module, parsed in _services(root):
        identity = module.removeprefix("services.").replace("_", "-")  # services.lora_store: lora-store
        assert _secret_at(_pod(workload), container, parsed.tls_dir) == f"swiftd-{identity}-tls"
        assert identity in {security.GATEWAY, security.UNET, security.CONTROLNET, security.LORA_STORE}
        server_names.add(parsed.tls_server_name)
        if module == "services.gateway":
            assert _secret_at(_pod(workload), container, parsed.tokens_file.parent) == "swiftd-gateway-tokens"
    assert len(server_names) == 1 and "" not in server_names


# -- network policies --------------------------------------------------------------------------------


def _component(root: str, name: str) -> dict:
    """Pod labels and ports of the workload `name` (e.g. otel-collector): port name -> (name, number)."""
    workload = next(w for w in _all(root, "Deployment", "StatefulSet") if w["metadata"]["name"] == name)
    ports = {p["name"]: (p["name"], p["containerPort"]) for c in _pod(workload)["containers"] for p in c["ports"]}
    return {"labels": workload["spec"]["template"]["metadata"]["labels"], "ports": ports}


def _endpoint(root: str, module: str) -> dict:
    """As _component, for the container running `module`: its pod's labels, and its "grpc" and
    "metrics" ports whatever they are named (two services in one pod name theirs apart)."""
    ((workload, container, _, parsed),) = [s for s in _services(root) if s[2] == module]
    named = {p["containerPort"]: p["name"] for p in container["ports"]}
    ports = {
        role: (named[port], port) for role, port in (("grpc", _port(parsed.address)), ("metrics", parsed.metrics_port))
    }
    return {"labels": workload["spec"]["template"]["metadata"]["labels"], "ports": ports}


def _allowed(root: str, source_labels: dict | None, target: dict, port_name: str) -> bool:
    """Whether the root's NetworkPolicies admit a connection to `target`'s port from a pod with
    `source_labels` in the same namespace (None: a pod in another namespace)."""
    policies = [p for p in _all(root, "NetworkPolicy") if _selects(p["spec"]["podSelector"], target["labels"])]
    if not any("Ingress" in p["spec"]["policyTypes"] for p in policies):
        return True  # no policy selects it: open
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] in target["ports"][port_name] for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                if "namespaceSelector" in peer:
                    if peer["namespaceSelector"] == {}:  # every namespace (ours included)
                        if "podSelector" not in peer or _selects(peer["podSelector"], source_labels or {}):
                            return True
                elif source_labels is not None and _selects(peer["podSelector"], source_labels):
                    return True
    return False


@pytest.mark.parametrize("root", ROOTS)
def test_network_policies_let_through_exactly_the_calls_the_services_make(root):
    modules = {"gateway": "services.gateway", "unet": "services.unet", "controlnet": "services.controlnet"}
    modules["lora-store"] = "services.lora_store"
    pods = {short: _endpoint(root, module) for short, module in modules.items()}
    # Who dials whom: the gateway its flags' targets; a UNet worker its --lora-store and, per
    # request, the ControlNet workers the plan names; the store the UNet workers it pushes to.
    _, gateway = _service_args(root, _pod(_one(root, "Deployment", "swiftd-gateway"))["containers"][0])
    _, unet = _service_args(root, _pod(_one(root, "StatefulSet", "swiftd-unet"))["containers"][0])
    service_of = {"swiftd-unet": "unet", "swiftd-controlnet": "controlnet", "swiftd-lora-store": "lora-store"}
    host = lambda target: target.removeprefix("dns:///").split(":")[0]  # noqa: E731
    calls = {("gateway", service_of[host(t)]) for t in [*gateway.unet, *gateway.controlnet, gateway.lora_store]}
    calls |= {("unet", service_of[host(unet.lora_store)]), ("unet", "controlnet"), ("lora-store", "unet")}
    assert calls >= {("gateway", "unet"), ("gateway", "controlnet"), ("gateway", "lora-store")}
    # The addresses requests name are the services' configured peers: the workers the gateway
    # plans onto are the store's --push-to and the UNet workers' --peers.
    _, store = _service_args(root, _pod(_one(root, "Deployment", "swiftd-lora-store"))["containers"][0])
    assert set(gateway.unet) <= set(store.push_to)
    assert set(gateway.controlnet) | set(gateway.unet) <= set(unet.peers)

    for source in pods:
        for target in pods:
            if target == "gateway":
                continue
            # Policies select pods, not containers: a service may reach what any service of its pod calls.
            pod_mates = [other for other in pods if pods[other]["labels"] == pods[source]["labels"]]
            want = any((other, target) in calls for other in pod_mates)
            assert _allowed(root, pods[source]["labels"], pods[target], "grpc") == want, (source, target)
    assert _allowed(root, None, pods["gateway"], "grpc")  # the public API
    for target in pods.values():  # Prometheus, from its own namespace
        assert _allowed(root, None, target, "metrics")
    # Nothing outside reaches a worker's or the store's gRPC port: only the store may push deltas,
    # only the gateway may send requests (which of the two calls which RPC: caller identity, #14).
    for target in ("unet", "controlnet", "lora-store"):
        assert not _allowed(root, None, pods[target], "grpc")
        assert not _allowed(root, {"app": "other"}, pods[target], "grpc")


def _collector_config(root: str, pod: dict, container: dict) -> dict:
    """The collector's configuration as it runs: each --config file, read from the ConfigMap
    mounted there, merged in order (maps merge key by key, as the collector does)."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged: dict = {}
    for arg in container["args"]:
        path = Path(arg.removeprefix("--config="))
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        merged = merge(merged, yaml.safe_load(_one(root, "ConfigMap", volume["configMap"]["name"])["data"][path.name]))
    return merged


@pytest.mark.parametrize("root", ROOTS)
def test_every_service_sends_its_spans_to_the_collector_deployed_with_it(root):
    collector = _component(root, "otel-collector")
    service = _one(root, "Service", "otel-collector")
    assert _selects({"matchLabels": service["spec"]["selector"]}, collector["labels"])
    port = service["spec"]["ports"][0]["port"]
    assert collector["ports"]["otlp-grpc"][1] == port
    deployment = _one(root, "Deployment", "otel-collector")
    pod, (container,) = _pod(deployment), _pod(deployment)["containers"]
    config = _collector_config(root, pod, container)
    receiver = config["receivers"]["otlp"]["protocols"]["grpc"]
    assert receiver["endpoint"].endswith(f":{port}")
    mtls = root in MTLS_ROOTS
    if mtls:  # only clients with a certificate of the services' CA send spans
        tls = receiver["tls"]
        for key in ("cert_file", "key_file", "client_ca_file"):
            assert _secret_at(pod, container, Path(tls[key]).parent) == "swiftd-otel-collector-tls", key
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and set(pipeline["exporters"]) <= set(config["exporters"])
    assert re.search(r":\d+\.\d+\.\d+$", _pod(deployment)["containers"][0]["image"])  # pinned
    for workload in _all(root, *WORKLOADS):
        for container in _containers(workload):
            if container["args"][:2] != ["python", "-m"] or workload["kind"] == "Job":
                continue
            env = {e["name"]: e["value"] for e in container["env"]}
            assert len(env) == len(container["env"])  # no variable set twice
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"{'https' if mtls else 'http'}://otel-collector:{port}"
            if mtls:  # the service's own certificate, as on its gRPC calls
                _, parsed = _service_args(root, container)
                for key in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
                    assert Path(env[f"OTEL_EXPORTER_OTLP_{key}"]).parent == parsed.tls_dir, key
            assert _allowed(root, workload["spec"]["template"]["metadata"]["labels"], collector, "otlp-grpc")


@pytest.mark.parametrize("root", ROOTS)
def test_each_workload_runs_the_image_of_its_service(root):
    for workload in _all(root, *WORKLOADS):
        for container in _containers(workload):
            if container["args"][:2] != ["python", "-m"]:
                continue
            image = container["image"].rsplit("/", 1)[-1].split(":")[0]
            want = "swiftd-gateway" if container["args"][2] == "services.gateway" else "swiftd-worker"
            assert image == want, f"{root}: {container['name']} runs {image}, built from {want}"
            assert (REPO / "deploy" / "docker" / f"{want.removeprefix('swiftd-')}.Dockerfile").exists()


@pytest.mark.parametrize("root", ROOTS)
def test_the_autoscaler_scales_the_unet_workers_on_a_metric_the_gateway_exports(root):
    from swiftd import metrics

    (hpa,) = _all(root, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    workload = _one(root, target["kind"], target["name"])
    assert workload["spec"]["template"]["metadata"]["labels"]["component"] == "unet"
    assert hpa["spec"]["minReplicas"] <= workload["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "swiftd_gateway_queue_depth"
    assert metrics.QUEUE_DEPTH._name == "swiftd_queue_depth" and "model" in metrics.QUEUE_DEPTH._labelnames
    # The adapter rule the docs give sums the gateways' series of that metric.
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "swiftd_gateway_queue_depth" in readme and "sum(swiftd_queue_depth{" in readme
