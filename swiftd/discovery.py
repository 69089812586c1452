"""Where the workers are: static addresses, or DNS names re-resolved on every catalog refresh;
and the peers a service may dial when a request names an address (`AllowedPeers`).

A target is `host:port` (one worker, used as given) or `dns:///name:port` (every A/AAAA record of
`name` is a worker: a Kubernetes headless Service's records are its ready pods). Scaling a worker
StatefulSet then needs no gateway change: a pod that appears is used from the next catalog refresh
on, one that disappears is dropped at it. Names are resolved with the system's resolver
configuration (/etc/resolv.conf and its search domains, as in a pod), or with `--dns-server`.
"""

from __future__ import annotations

import logging
import threading
import time

from swiftd.errors import PermissionDenied, shown

log = logging.getLogger(__name__)
DNS_SCHEME = "dns:///"


class WorkerTargets:
    def __init__(self, targets: list[str], dns_server: str = "", timeout: float = 2.0):
        self.targets = list(targets)
        self._dns_server = dns_server
        self._timeout = timeout
        self._resolver = None
        self._addresses = [t for t in self.targets if not t.startswith(DNS_SCHEME)]
        if len(self._addresses) < len(self.targets):
            self.refresh()

    def addresses(self) -> list[str]:
        """The workers as of the last refresh."""
        return list(self._addresses)

    def refresh(self) -> list[str]:
        """Resolve the DNS targets again; a name that does not resolve contributes no worker (logged)."""
        addresses: list[str] = []
        for target in self.targets:
            for address in self._resolve(target) if target.startswith(DNS_SCHEME) else [target]:
                if address not in addresses:
                    addresses.append(address)
        if addresses != self._addresses:
            log.info("workers of %s: %s", " ".join(self.targets), " ".join(addresses) or "none")
        self._addresses = addresses
        return list(addresses)

    def _resolve(self, target: str) -> list[str]:
        import dns.exception
        import dns.resolver

        name, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
        if self._resolver is None:
            self._resolver = dns.resolver.Resolver(configure=not self._dns_server)
            if self._dns_server:
                host, _, dns_port = self._dns_server.rpartition(":")
                self._resolver.nameservers, self._resolver.port = [host], int(dns_port)
            self._resolver.lifetime = self._timeout
        addresses = []
        for record_type, form in (("A", "{}:{}"), ("AAAA", "[{}]:{}")):
            try:
                answer = self._resolver.resolve(name, record_type, search=True)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                log.warning("%s: %s %s did not resolve: %s", target, name, record_type, exc)
                continue
            addresses += sorted(form.format(record.address, port) for record in answer)
        return addresses


class AllowedPeers:
    """The only addresses a service dials when a request names one (a ControlNet worker, a CFG
    partner, a LoRA store, a UNet worker to push deltas to): its configured targets, DNS names
    re-resolved when an address is not among them (at most once a second). With no targets, any
    address is dialed, as in a local run, and the service says so at start."""

    def __init__(self, targets: list[str], flag: str, dns_server: str = "", extra: tuple[str, ...] = ()):
        self.flag = flag
        self._targets = WorkerTargets([*targets, *[e for e in extra if e]], dns_server) if targets else None
        self._refreshed = 0.0
        self._lock = threading.Lock()
        if not targets:
            log.warning("no %s given: this service dials any address a request names (fine on one machine only)", flag)

    def check(self, field: str, address: str) -> None:
        """PermissionDenied naming `field` unless `address` is empty or a configured peer."""
        if self._targets is None or not address or address in self._targets.addresses():
            return
        with self._lock:  # one resolution at a time, at most one a second: a new pod is found, a flood waits
            if address in self._targets.addresses():
                return
            time.sleep(max(0.0, 1.0 - (time.monotonic() - self._refreshed)))
            self._refreshed = time.monotonic()
            if address in self._targets.refresh():
                return
        raise PermissionDenied(f"{field}: {shown(address)} is not a peer of this service ({self.flag})")
