"""Which addresses the image fetcher may connect to, enforced when the socket is opened.

Task image URLs come from whoever can create tasks, so fetching them is a server-side request
forgery risk (Label Studio itself had CVE-2023-47116 and CVE-2025-25297). The rule: connect only
to public (global unicast) addresses, plus the configured Label Studio host:port and the hosts
or networks in `SAM_ALLOWED_HOSTS`. The check runs inside the HTTP connection, on the addresses
that the name resolved to at that moment, and the socket connects to exactly the checked address,
so a DNS answer cannot change between check and connect. IPv4 embedded in IPv6 (mapped, 6to4,
Teredo, NAT64) is checked as IPv4.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddress(Exception):  # not an OSError: urllib3 must not retry or wrap it
    """A connection to a non-public address that no setting allows."""


def _embedded_v4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = [ip.ipv4_mapped, ip.sixtofour]
    if ip.teredo:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v for v in found if v is not None]


def describe(ip: IPAddress) -> str | None:
    """Why `ip` is not public (e.g. 'loopback', 'link-local', 'private'), or None for a public address."""
    for candidate in [ip, *_embedded_v4(ip)]:
        for attr, name in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                           ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                           ("is_reserved", "reserved"), ("is_private", "private")):
            if getattr(candidate, attr):
                return name
        if not candidate.is_global:
            return "not globally routable"
    return None


class AddressPolicy:
    """Public addresses always; otherwise only `exempt` (host, port) pairs and `allowed` hosts/networks."""

    def __init__(self, allowed: Iterable[str] = (), exempt: Iterable[tuple[str, int]] = ()) -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            entry = entry.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry)
        self.exempt = {(h.lower().strip("[]"), int(p)) for h, p in exempt}

    def check(self, host: str, port: int, addresses: Iterable[str]) -> None:
        """Raise `BlockedAddress` unless every address `host` resolved to may be used."""
        host = host.lower().strip("[]")
        if (host, int(port)) in self.exempt or host in self.names:
            return
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            reason = describe(ip)
            if reason is None or any(ip in net for net in self.networks):
                continue
            raise BlockedAddress(
                f"{host} resolves to {ip}, a {reason} address; the backend fetches images only from public "
                "addresses, the Label Studio host and SAM_ALLOWED_HOSTS")


class _GuardMixin:
    policy: AddressPolicy

    def _new_conn(self) -> socket.socket:
        infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        self.policy.check(self.host, self.port, addresses)
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
                sock.connect(sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        from urllib3.exceptions import NewConnectionError

        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")


def guarded_adapter(policy: AddressPolicy, **kwargs) -> HTTPAdapter:
    """A requests adapter whose connections obey `policy`."""
    http_conn = type("GuardedHTTPConnection", (_GuardMixin, HTTPConnection), {"policy": policy})
    https_conn = type("GuardedHTTPSConnection", (_GuardMixin, HTTPSConnection), {"policy": policy})
    http_pool = type("GuardedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
    https_pool = type("GuardedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kw) -> None:
            super().init_poolmanager(*args, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}

    return GuardedAdapter(**kwargs)
