"""The outbound URL policy: which URLs the server may fetch (`image_url`) or POST to (webhooks).

A request's URLs come from the caller, so every outbound connection goes through `URLPolicy.client()`:
- http and https only;
- the host is resolved once, and every address it resolves to must be public: loopback, private
  (RFC 1918, ULA), link-local (169.254.169.254 included), CGNAT, multicast, reserved and unspecified
  addresses are refused, whatever their spelling (`localhost`, `0x7f000001`, `2130706433`,
  `::ffff:127.0.0.1`, 6to4 and Teredo wrappers), unless an operator opened their range
  (`--allowed-networks` / `OVI_ALLOWED_NETWORKS`);
- the connection goes to the address that was checked (no second lookup, so DNS rebinding cannot swap
  it), with the original name kept for TLS (SNI, certificate check) and the Host header;
- every redirect hop is checked again (the transport sees each hop);
- every refusal or network failure raises `Refused` with one generic message, so answers cannot be
  used to map an internal network ("connection refused" vs "HTTP 404" vs "not allowed").

httpx has no hook for "connect to this IP but verify that name"; a transport that rewrites the URL's
host to the checked address and sets httpcore's `sni_hostname` extension does it without a custom
connection pool. No torch, no HTTP framework: used by media/images.py, jobs/webhooks.py and the API.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# CGNAT (RFC 6598) is neither private nor global in `ipaddress`; it is refused explicitly.
_SHARED = ipaddress.ip_network("100.64.0.0/10")
REFUSED_MESSAGE = (
    "the server could not use this URL: it is not a public http(s) URL, or its host did not answer "
    "(in time, with success); use a URL on the public internet"
)
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_DEADLINE_S = 10.0
MAX_REDIRECTS = 5


class Refused(Exception):
    """The URL is not allowed, or fetching it failed on the network. `str()` is the generic message;
    `reason` says what happened, for the server log only."""

    def __init__(self, reason: str):
        super().__init__(REFUSED_MESSAGE)
        self.reason = reason


class TooLarge(Exception):
    """The body is larger than the caller's byte cap."""

    def __init__(self, max_bytes: int):
        super().__init__(f"the file is more than {max_bytes / 2**20:.1f} MiB, the limit")
        self.max_bytes = max_bytes


def parse_networks(text: str | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """`"127.0.0.0/8, 10.1.0.0/16"` → networks; raises ValueError naming the bad entry."""
    items = text.split(",") if isinstance(text, str) else list(text or ())
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"allowed networks: {item!r} is not a CIDR range such as 10.0.0.0/8") from exc
    return tuple(networks)


def _unwrap(ip: IPAddress) -> list[IPAddress]:
    """The address and every IPv4 address it embeds (IPv4-mapped, 6to4, Teredo)."""
    found: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())):
            if inner is not None:
                found.append(inner)
    return found


def is_public(ip: IPAddress) -> bool:
    """A unicast address on the public internet (not loopback, private, link-local, CGNAT, ...)."""
    for address in _unwrap(ip):
        if (
            not address.is_global
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
            or address.is_loopback
            or address.is_link_local
            or address.is_private
            or (isinstance(address, ipaddress.IPv4Address) and address in _SHARED)
        ):
            return False
    return True


@dataclass(frozen=True)
class URLPolicy:
    """What outbound URLs may reach. `allowed_networks` opens ranges (on-prem receivers, tests)."""

    allowed_networks: tuple[IPNetwork, ...] = ()

    def allows(self, ip: IPAddress) -> bool:
        if any(address in network for address in _unwrap(ip) for network in self.allowed_networks):
            return True
        return is_public(ip)

    def resolve(self, url: httpx.URL | str) -> IPAddress:
        """The checked address to connect to for `url`; raises Refused."""
        url = httpx.URL(url) if isinstance(url, str) else url
        if url.scheme not in ("http", "https"):
            raise Refused(f"scheme {url.scheme!r} is not http(s)")
        host = url.host
        if not host:
            raise Refused("no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise Refused(f"cannot resolve {host!r}: {exc}") from exc
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise Refused(f"{host!r} resolves to nothing")
        blocked = [a for a in addresses if not self.allows(a)]
        if blocked:  # all or nothing: a name with one internal address is refused outright
            raise Refused(f"{host!r} resolves to {blocked[0]}, which is not a public address")
        return addresses[0]

    def check(self, url: str) -> None:
        """Raises Refused unless `url` is http(s) and its host resolves to allowed addresses only."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise Refused(f"malformed URL: {exc}") from exc
        self.resolve(parsed)

    def client(self, timeout_s: float, follow_redirects: bool = False) -> httpx.Client:
        """An httpx client whose every connection (and redirect hop) obeys this policy."""
        return httpx.Client(
            transport=PinnedTransport(self),
            timeout=timeout_s,
            follow_redirects=follow_redirects,
            max_redirects=MAX_REDIRECTS,
            trust_env=False,  # an HTTP(S)_PROXY would connect on our behalf, unchecked
        )

    def fetch(
        self, url: str, *, max_bytes: int = DEFAULT_MAX_BYTES, deadline_s: float = DEFAULT_DEADLINE_S
    ) -> bytes:
        """GET `url` (redirects followed, each hop checked): at most `max_bytes`, within `deadline_s` in
        all, a slow drip included. Raises Refused (generic) or TooLarge."""
        deadline = time.monotonic() + deadline_s
        try:
            with (
                self.client(deadline_s, follow_redirects=True) as client,
                client.stream("GET", url, headers={"Accept": "image/*"}) as response,
            ):
                if response.status_code >= 400:
                    raise Refused(f"HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise TooLarge(max_bytes)
                chunks: list[bytes] = []
                received = 0
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise TooLarge(max_bytes)
                    if time.monotonic() > deadline:
                        raise Refused(f"took longer than {deadline_s:g} s")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:  # refused, reset, TLS, timeout, too many redirects, bad URL
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        except (httpx.InvalidURL, ValueError) as exc:
            raise Refused(f"malformed URL: {exc}") from exc
        return b"".join(chunks)


class PinnedTransport(httpx.HTTPTransport):
    """Connects to the address `policy` checked, keeping the name for TLS and the Host header."""

    def __init__(self, policy: URLPolicy, verify: ssl.SSLContext | bool = True):
        super().__init__(verify=verify, trust_env=False)
        self.policy = policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            ip = self.policy.resolve(request.url)
        except Refused as exc:
            # An httpx error, so that callers handle it with every other connection failure.
            raise httpx.ConnectError(exc.reason, request=request) from exc
        host = request.url.host
        request.url = request.url.copy_with(host=str(ip))
        request.extensions = {**request.extensions, "sni_hostname": host}
        # httpx set Host from the original URL when it built the request; it is left as it is.
        return super().handle_request(request)
