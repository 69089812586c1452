"""Mutual TLS and caller identity over real processes. The test makes its own CA and a certificate
per identity (gateway, unet, controlnet, lora-store, operator), starts the four services with
--tls-dir, the gateway with a tokens file, and checks: a client with a token gets its image; no or
a wrong token is UNAUTHENTICATED; every internal RPC answers PERMISSION_DENIED to every identity
RULES does not name, changing nothing, and lets the others through; plaintext and certificates of
another CA do not connect; health checks answer in plaintext on --health-port; a renewed
certificate is served to new connections without a restart."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest

from swiftd import rpc, security
from swiftd.images import edge_image
from swiftd.launcher import start_controlnet, start_gateway, start_lora_store, start_unet
from swiftd.request import ControlNet
from swiftd.v1 import controlnet_pb2, lora_store_pb2, unet_pb2
from tests.net import free_port
from tests.otlp_collector import InMemoryCollector

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

MODEL = "tiny-sd15"
CN = f"{MODEL}-cn-edges"
LORA = f"{MODEL}-lora-peft-r4"
TOKEN = "t0k3n-for-alice"
IDENTITIES = (security.GATEWAY, security.UNET, security.CONTROLNET, security.LORA_STORE, security.OPERATOR)
DESCRIPTORS = {"UNetWorker": unet_pb2, "ControlNetWorker": controlnet_pb2, "LoraStore": lora_store_pb2}


class Authority:
    """A CA that issues certificates for 127.0.0.1 into Kubernetes-secret-shaped folders."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(subject, subject, self.key.public_key(), ca=True).sign(self.key, hashes.SHA256())

    @staticmethod
    def _build(subject, issuer, public_key, ca: bool):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder

    def issue(self, identity: str, folder: Path) -> int:
        """tls.crt, tls.key (CN = identity) and ca.crt in `folder`; returns the serial number."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)])
        cert = self._build(subject, self.cert.subject, key.public_key(), ca=False).sign(self.key, hashes.SHA256())
        folder.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        (folder / "tls.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        (folder / "tls.crt").write_bytes(cert.public_bytes(pem))
        (folder / "ca.crt").write_bytes(self.cert.public_bytes(pem))
        return cert.serial_number


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = Authority("swiftd test CA")
    for identity in (*IDENTITIES, "otel-collector"):
        ca.issue(identity, root / identity)
    return root, ca


@pytest.fixture(scope="module")
def collector(pki):
    """An OTLP collector that speaks TLS and wants a client certificate of the CA, as deployed by
    the mtls component; `env` is what each service is given (the standard OTEL_* variables)."""
    root, _ = pki
    folder = root / "otel-collector"
    credentials = grpc.ssl_server_credentials(
        [((folder / "tls.key").read_bytes(), (folder / "tls.crt").read_bytes())],
        root_certificates=(folder / "ca.crt").read_bytes(),
        require_client_auth=True,
    )
    collector = InMemoryCollector(credentials).start()
    env = lambda identity: {  # noqa: E731
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"https://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(root / identity / "ca.crt"),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(root / identity / "tls.crt"),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(root / identity / "tls.key"),
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    yield collector, env
    collector.stop()


@pytest.fixture(scope="module")
def secured(zoo_root, pki, collector):
    root, ca = pki
    _, otel_env = collector
    Authority("intruder CA").issue(security.GATEWAY, root / "intruder")
    (root / "tokens").write_text(f"# identity token\nalice {TOKEN}\n")
    security.configure_client(security.TlsConfig(root / security.OPERATOR))  # the test's own channels
    tls = lambda identity: ["--tls-dir", str(root / identity)]  # noqa: E731
    services = {}
    try:
        services["store"] = start_lora_store(
            zoo_root,
            root / "cache",
            [MODEL],
            num_threads=1,
            extra_args=tls(security.LORA_STORE),
            env=otel_env(security.LORA_STORE),
        )
        services["controlnet"] = start_controlnet(
            zoo_root,
            [CN],
            num_threads=1,
            extra_args=tls(security.CONTROLNET),
            wait=False,
            env=otel_env(security.CONTROLNET),
        )
        health_port = free_port()
        services["unet"] = start_unet(
            zoo_root,
            MODEL,
            lora_store=services["store"].address,
            num_threads=1,
            extra_args=[*tls(security.UNET), "--health-port", str(health_port), "--log-format", "json"],
            env=otel_env(security.UNET),
        )
        services["controlnet"].wait_ready()
        services["gateway"] = start_gateway(
            [services["unet"].address],
            [services["controlnet"].address],
            services["store"].address,
            extra_args=[*tls(security.GATEWAY), "--tokens-file", str(root / "tokens"), "--log-format", "json"],
            env=otel_env(security.GATEWAY),
        )
        yield root, ca, services, health_port
    finally:
        for service in services.values():
            service.stop()
        security.configure_client(None)


def _channel_as(root: Path, identity: str | None, address: str) -> grpc.Channel:
    """A channel presenting `identity`'s certificate (None: plaintext)."""
    if identity is None:
        return grpc.insecure_channel(address)
    security.configure_client(security.TlsConfig(root / identity))
    try:
        return rpc.create_channel(address)
    finally:
        security.configure_client(security.TlsConfig(root / security.OPERATOR))


def _call(channel: grpc.Channel, method: str):
    """Call `method` with an empty request (raw bytes), whatever its shape; the status code."""
    service, name = method.strip("/").split("/")
    descriptor = DESCRIPTORS[service.split(".")[-1]].DESCRIPTOR.services_by_name[service.split(".")[-1]]
    rpc_method = descriptor.methods_by_name[name]
    kind = (
        ("stream" if rpc_method.client_streaming else "unary")
        + "_"
        + ("stream" if rpc_method.server_streaming else "unary")
    )
    call = getattr(channel, kind)(method)
    request = iter([b""]) if rpc_method.client_streaming else b""
    try:
        response = call(request, timeout=60)
        if rpc_method.server_streaming:
            list(response)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_client_with_a_token_gets_its_image_and_others_are_unauthenticated(secured, collector):
    from swiftd.client import Client

    _, _, services, _ = secured
    otel = collector
    address = services["gateway"].address
    with Client(address, token=TOKEN) as client:
        result = client.generate(
            "a cat",
            model_id=MODEL,
            width=64,
            height=64,
            num_inference_steps=2,
            loras=[(LORA, 0.8)],
            controlnets=[ControlNet(CN, edge_image(64))],
        )
        assert result.image_png and list(result.plan.lora_ids) == [LORA]
    # Its trace reached the collector over mutual TLS from every service it crossed.
    collector, _ = otel
    crossed = {"gateway", "unet", "lora_store"} | ({"controlnet"} if result.plan.controlnets[0].worker else set())

    def arrived(spans) -> bool:  # every service, and the gateway's server span (it ends last)
        served = any(s.name == "/swiftd.v1.Gateway/Generate" for s in spans)
        return served and {s.service for s in spans} >= crossed

    spans = collector.wait_for(result.trace_id, arrived)
    (server,) = [s for s in spans if s.name == "/swiftd.v1.Gateway/Generate"]
    assert server.attributes["enduser.id"] == "alice"
    for service in services.values():
        assert not [line for line in service.log_lines if "unencrypted" in line], service.name
    # The client's identity is on the request's log lines, at the gateway and at the worker.
    for service in (services["gateway"], services["unet"]):
        lines = [json.loads(line) for line in service.log_lines if line.startswith("{")]
        assert any(e.get("caller") == "alice" and e.get("request_id") == result.request_id for e in lines), service.name
    for token in ("", "wrong"):
        with Client(address, token=token) as client, pytest.raises(grpc.RpcError) as refused:
            client.list_models()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_every_internal_rpc_only_from_the_identities_that_need_it(secured):
    root, _, services, _ = secured
    where = {"UNetWorker": "unet", "ControlNetWorker": "controlnet", "LoraStore": "store"}
    checked = 0
    for identity in IDENTITIES:
        channels = {name: _channel_as(root, identity, services[name].address) for name in where.values()}
        for method, allowed in security.RULES.items():
            code = _call(channels[where[method.split("/")[1].split(".")[-1]]], method)
            if identity in allowed:
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), (
                    identity,
                    method,
                )
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (identity, method, code)
            checked += 1
        for channel in channels.values():
            channel.close()
    assert checked == len(IDENTITIES) * len(security.RULES)
    # Refused means nothing changed: the gateway may not remove a LoRA; it is still there.
    with _channel_as(root, security.GATEWAY, services["store"].address) as channel:
        remove = channel.unary_unary("/swiftd.v1.LoraStore/RemoveLora")
        with pytest.raises(grpc.RpcError) as refused:
            remove(lora_store_pb2.RemoveLoraRequest(lora_id=LORA).SerializeToString(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with _channel_as(root, security.OPERATOR, services["store"].address) as channel:
        listed = channel.unary_unary("/swiftd.v1.LoraStore/ListLoras")(b"", timeout=30)
        assert LORA in {i.lora_id for i in lora_store_pb2.LoraStoreListLorasResponse.FromString(listed).loras}


def test_plaintext_and_foreign_certificates_do_not_connect_and_health_answers_on_its_port(secured):
    root, _, services, health_port = secured
    for identity in (None, "intruder"):
        with _channel_as(root, identity, services["unet"].address) as channel:
            assert _call(channel, "/swiftd.v1.UNetWorker/ListModels") == grpc.StatusCode.UNAVAILABLE
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as only_health:
            channel.unary_unary("/swiftd.v1.UNetWorker/ListModels")(b"", timeout=10)
        assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_renewed_certificate_is_served_to_new_connections(secured):
    root, ca, services, _ = secured
    host, port = services["unet"].address.rsplit(":", 1)

    def served_serial() -> int:
        context = ssl.create_default_context(cafile=str(root / security.OPERATOR / "ca.crt"))
        context.load_cert_chain(root / security.OPERATOR / "tls.crt", root / security.OPERATOR / "tls.key")
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port))) as raw, context.wrap_socket(raw, server_hostname=host) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    before = served_serial()
    time.sleep(0.05)  # a new mtime
    renewed = ca.issue(security.UNET, root / security.UNET)
    assert renewed != before
    deadline = time.monotonic() + 10
    while served_serial() != renewed:
        assert time.monotonic() < deadline, "the renewed certificate was never served"
        time.sleep(0.2)
    with _channel_as(root, security.GATEWAY, services["unet"].address) as channel:
        assert _call(channel, "/swiftd.v1.UNetWorker/ListModels") == grpc.StatusCode.OK


def test_a_renewed_client_certificate_is_presented_on_new_channels(secured):
    """A service's outgoing channels follow its certificate files too: once they change, the pool
    makes a new channel (presenting the renewed certificate) for the calls after its next look at
    them (at most a second later)."""
    root, ca, services, _ = secured
    pool = rpc.ChannelPool()
    try:
        first = pool.get(services["unet"].address)
        assert pool.get(services["unet"].address) is first
        time.sleep(0.05)
        ca.issue(security.OPERATOR, root / security.OPERATOR)  # the test's own identity, renewed
        time.sleep(rpc.ChannelPool.STAMP_EVERY_S)
        renewed = pool.get(services["unet"].address)
        assert renewed is not first
        assert _call(renewed, "/swiftd.v1.UNetWorker/ListModels") == grpc.StatusCode.OK
    finally:
        pool.close()
