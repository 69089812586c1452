"""Transport security and caller identity: mutual TLS between services, tokens at the gateway, and
who may call which RPC.

A service started with `--tls-dir DIR` (a Kubernetes TLS secret mounted as files: `tls.crt`,
`tls.key`, `ca.crt`) serves TLS, requires a client certificate from the same CA (the gateway:
a certificate or a bearer token from `--tokens-file`), and presents its own certificate on every
channel it opens. A caller's identity is its certificate's common name (`gateway`, `unet`,
`controlnet`, `lora-store`, `operator`) or its token's name; `RULES` says which identities may call
each internal RPC, and anything else is UNAUTHENTICATED (no identity) or PERMISSION_DENIED
(the wrong one), before the RPC runs. Certificate files are re-read when they change: new
connections use them. Without `--tls-dir` a service runs plaintext, for local runs, and says so.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

from swiftd.logs import CALLER_BAGGAGE

log = logging.getLogger(__name__)

FILES = ("tls.crt", "tls.key", "ca.crt")  # a kubernetes.io/tls secret, plus the CA that signs peers
GATEWAY, UNET, CONTROLNET, LORA_STORE, OPERATOR = "gateway", "unet", "controlnet", "lora-store", "operator"

# Who may call what. Internal RPCs only from the identities whose work needs them; administration
# only from an operator; the public API from any authenticated client. Health checks and
# reflection stay open (probes). An RPC missing here is refused to everyone.
_UNET, _CONTROLNET, _STORE = "/swiftd.v1.UNetWorker/", "/swiftd.v1.ControlNetWorker/", "/swiftd.v1.LoraStore/"
RULES: dict[str, frozenset[str]] = {
    _UNET + "Denoise": frozenset({GATEWAY}),
    _UNET + "DenoiseStream": frozenset({GATEWAY}),
    _UNET + "ExchangeGuidance": frozenset({UNET}),  # a CFG split's leader calls its partner
    _UNET + "ReceiveLoraDeltas": frozenset({LORA_STORE}),
    _UNET + "GetWorkerStatus": frozenset({GATEWAY, OPERATOR}),
    _UNET + "ListModels": frozenset({GATEWAY, OPERATOR}),
    _CONTROLNET + "StreamResiduals": frozenset({UNET}),
    _CONTROLNET + "ListControlNets": frozenset({GATEWAY, OPERATOR}),
    _CONTROLNET + "LoadControlNet": frozenset({OPERATOR}),
    _CONTROLNET + "UnloadControlNet": frozenset({OPERATOR}),
    _STORE + "PushLoras": frozenset({GATEWAY}),
    _STORE + "StreamDeltas": frozenset({UNET}),
    _STORE + "ListLoras": frozenset({GATEWAY, OPERATOR}),
    _STORE + "RegisterLora": frozenset({OPERATOR}),
    _STORE + "RemoveLora": frozenset({OPERATOR}),
    _STORE + "PrefetchLora": frozenset({OPERATOR}),
}
PUBLIC = "/swiftd.v1.Gateway/"  # any authenticated caller
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class TlsConfig:
    directory: Path
    # The name every service's certificate carries, checked instead of the dialed host (workers
    # are dialed by pod IP); empty: the host dialed must be in the peer's certificate.
    server_name: str = ""

    def read(self) -> tuple[bytes, bytes, bytes]:
        return tuple((self.directory / name).read_bytes() for name in FILES)

    def stamp(self) -> tuple[int | None, ...]:
        """The files' modification times (None: missing), to tell when they change."""
        stamps = []
        for name in FILES:
            try:
                stamps.append(os.stat(self.directory / name).st_mtime_ns)
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)


_tls: TlsConfig | None = None


def configure(config: TlsConfig | None) -> None:
    """The process's TLS files: its server and every channel `swiftd.rpc` opens use them."""
    global _tls
    if config is not None:
        config.read()  # fail at start, naming the file, rather than at the first call
    _tls = config


def configure_client(config: TlsConfig | None) -> None:
    """A client's TLS files (ca.crt, and tls.crt/tls.key if it has a certificate)."""
    global _tls
    _tls = config


def configured() -> TlsConfig | None:
    return _tls


def server_credentials(config: TlsConfig, require_client_auth: bool) -> grpc.ServerCredentials:
    """TLS for a server port, re-reading the files at a handshake after they changed."""

    def certificates():
        cert, key, ca = config.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    seen = [config.stamp()]

    def fetch():
        stamp = config.stamp()
        if stamp == seen[0]:
            return None
        try:
            fresh = certificates()
        except OSError as exc:  # mid-rotation: keep serving the old files, try again next handshake
            log.warning("TLS files in %s not readable yet: %s", config.directory, exc)
            return None
        seen[0] = stamp
        log.info("TLS files in %s changed: new connections use them", config.directory)
        return fresh

    return grpc.dynamic_ssl_server_credentials(certificates(), fetch, require_client_authentication=require_client_auth)


def channel_credentials(config: TlsConfig) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    """Credentials (the CA, and this process's certificate where it has one: a client of the
    gateway may have only the CA and a token) and options for a new channel."""
    ca = (config.directory / "ca.crt").read_bytes()
    cert = key = None
    if (config.directory / "tls.crt").is_file():
        cert, key = (config.directory / "tls.crt").read_bytes(), (config.directory / "tls.key").read_bytes()
    options = [("grpc.ssl_target_name_override", config.server_name)] if config.server_name else []
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert), options


class Tokens:
    """Bearer tokens of the gateway's clients: `--tokens-file` lines `IDENTITY TOKEN` (# comments),
    re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp = None
        self._entries: list[tuple[str, bytes]] = []
        self._load()

    def _load(self) -> None:
        stamp = os.stat(self.path).st_mtime_ns
        if stamp == self._stamp:
            return
        entries = []
        for line in self.path.read_text().splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) == 2:
                entries.append((fields[0], fields[1].encode()))
        self._entries, self._stamp = entries, stamp

    def identity(self, token: str) -> str:
        self._load()
        found = ""
        for identity, known in self._entries:  # every entry compared, in constant time each
            if hmac.compare_digest(known, token.encode()):
                found = identity
        return found


def caller_identity(context: grpc.ServicerContext, tokens: Tokens | None = None) -> str:
    """The caller's verified certificate name, else (with `tokens`) its bearer token's name."""
    names = context.auth_context().get("x509_common_name") or []
    if names:
        return names[0].decode()
    if tokens is not None:
        for key, value in context.invocation_metadata():
            if key == "authorization" and value.startswith("Bearer "):
                return tokens.identity(value.removeprefix("Bearer ").strip())
    return ""


class AuthorizationInterceptor(grpc.ServerInterceptor):
    """Each RPC only from the identities RULES names (the public API: any identity), before it runs."""

    def __init__(self, tokens: Tokens | None = None):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        from swiftd.interceptor import wrap_behavior

        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN):
            return handler
        allowed = None if method.startswith(PUBLIC) else RULES.get(method, frozenset())

        def admit(context) -> str:
            identity = caller_identity(context, self.tokens)
            if not identity:
                log.warning("%s: refused an unauthenticated caller from %s", method, context.peer())
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate or bearer token")
            if allowed is not None and identity not in allowed:
                log.warning("%s: refused %r", method, identity)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{identity!r} may not call {method}")
            trace.get_current_span().set_attribute("enduser.id", identity)
            return identity

        def as_caller(identity: str):
            """The public API's caller on every log line of the call, here and downstream (baggage)."""
            if allowed is not None:
                return None
            return otel_context.attach(baggage.set_baggage(CALLER_BAGGAGE, identity))

        def wrap_unary(behavior):
            def call(request_or_iterator, context):
                token = as_caller(admit(context))
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    if token is not None:
                        otel_context.detach(token)

            return call

        def wrap_stream(behavior):
            def call(request_or_iterator, context):
                token = as_caller(admit(context))
                try:
                    yield from behavior(request_or_iterator, context)
                finally:
                    if token is not None:
                        otel_context.detach(token)

            return call

        return wrap_behavior(handler, wrap_unary, wrap_stream)
