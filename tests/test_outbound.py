"""The outbound URL policy (ovi_server/outbound.py) on loopback servers: what it refuses, that it
connects to the address it checked, and that TLS still verifies the URL's name."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ovi_server.outbound import (
    REFUSED_MESSAGE,
    PinnedTransport,
    Refused,
    URLPolicy,
    is_public,
    parse_networks,
)
from tests.clients.live import make_self_signed_cert


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = f"host={self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(ip: str, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer((ip, 0), _Echo)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture
def port() -> Iterator[int]:
    yield from _serve("127.0.0.2")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
     "224.0.0.1", "240.0.0.1", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1", "2002:7f00:1::", "::"],
)  # fmt: skip
def test_non_public_addresses_are_refused(address: str):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address: str):
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    ["http://localhost:{p}/", "http://127.0.0.2:{p}/", "http://0x7f000002:{p}/", "http://2130706434:{p}/",
     "http://[::ffff:127.0.0.2]:{p}/", "ftp://127.0.0.2:{p}/", "file:///etc/passwd", "http://[::1]:{p}/"],
)  # fmt: skip
def test_every_spelling_of_loopback_is_refused_with_one_message(port: int, url: str):
    with pytest.raises(Refused) as info:
        URLPolicy().fetch(url.format(p=port))
    assert str(info.value) == REFUSED_MESSAGE


def test_allowed_networks_open_a_range(port: int):
    policy = URLPolicy(parse_networks("127.0.0.2/32"))
    assert policy.fetch(f"http://127.0.0.2:{port}/x") == f"host=127.0.0.2:{port}".encode()
    with pytest.raises(Refused):  # the rest of loopback stays closed
        policy.fetch(f"http://127.0.0.1:{port}/x")
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not a CIDR range"):
        parse_networks("127.0.0.0/8, 10.0.0.0/33")


def test_connects_to_the_address_it_checked(port: int, monkeypatch: pytest.MonkeyPatch):
    # DNS rebinding: the name answers an allowed address once, then an internal one. The connection
    # must go to the address that was checked, not to a second lookup's answer.
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host, port_, *args, **kwargs):
        if host == "rebind.test":
            return real(next(answers, "127.0.0.1"), port_, *args, **kwargs)
        return real(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    policy = URLPolicy(parse_networks("127.0.0.2/32"))
    assert policy.fetch(f"http://rebind.test:{port}/x") == f"host=rebind.test:{port}".encode()


def test_tls_verifies_the_name_while_connecting_to_the_checked_address(tmp_path: Path):
    cert, key = make_self_signed_cert(tmp_path, with_ip=False)  # names only the DNS name
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    servers = _serve("127.0.0.1", server_tls)
    tls_port = next(servers)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        transport = PinnedTransport(URLPolicy(parse_networks("127.0.0.1/32")), verify=trust)
        with httpx.Client(transport=transport) as client:
            # Connected to 127.0.0.1, verified as localhost (SNI and Host keep the name) ...
            assert client.get(f"https://localhost:{tls_port}/").text == f"host=localhost:{tls_port}"
            # ... and a name the certificate does not hold still fails, although the address is the same.
            with pytest.raises(httpx.ConnectError):
                client.get(f"https://127.0.0.1:{tls_port}/")
    finally:
        next(servers, None)
