"""URL fetching refuses before connecting: schemes, addresses, resolution, allowlist (no network here)."""
import ipaddress
import socket

import pytest

from kennel_serve import url_fetch
from kennel_serve.mms_toolkit.errors import RequestError
from kennel_serve.settings import UrlFetchSettings
from kennel_serve.url_fetch import UrlFetcher, address_problem


@pytest.fixture(autouse=True)
def no_connections(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a refused URL must not be connected to: {args}")
    monkeypatch.setattr(url_fetch.socket, "create_connection", refuse)


def resolver(mapping):
    def resolve(host, port, type=0):
        if host not in mapping:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in mapping[host]]
    return resolve


def refusal(url, settings=UrlFetchSettings(), mapping=None) -> str:
    with pytest.raises(RequestError) as caught:
        UrlFetcher(settings, resolver(mapping or {})).fetch(url)
    assert caught.value.status_code == 400
    return caught.value.message


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("169.254.10.10", "link-local"), ("fe80::1", "link-local"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "not a public"),
    ("::ffff:127.0.0.1", "loopback"), ("2002:a00:1::", "private"), ("fc00::5", "private"), ("192.0.2.10", "private"),
])
def test_non_public_addresses_are_named(address, problem):
    assert problem in address_problem(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("url, message", [
    ("file:///etc/passwd", "only http and https URLs are fetched, not file"),
    ("ftp://example.com/dog.jpg", "not ftp"),
    ("gopher://example.com/", "not gopher"),
    ("//example.com/dog.jpg", "a URL without a scheme"),
    ("http:///dog.jpg", "has no host"),
    ("http://example.com:99999/", "malformed"),
    ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://[::1]:8080/", "::1 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "the instance metadata service"),
    ("http://[fd00:ec2::254]/latest/", "the instance metadata service"),
    ("http://10.0.0.5/dog.jpg", "10.0.0.5 is a private address"),
    ("http://nowhere.invalid/", "cannot be resolved"),
])
def test_refused_before_connecting(url, message):
    assert message in refusal(url)


def test_every_resolved_address_must_be_public(caplog):
    # A name that resolves to a public AND a private address (a rebinding setup) is refused.
    caplog.set_level("INFO", logger="kennel_serve.url_fetch")
    message = refusal("https://dogs.example/a.jpg", mapping={"dogs.example": ["93.184.215.14", "10.0.0.7"]})
    assert message.endswith("the URL's host resolves to a non-public address")
    message = refusal("http://metadata.example/", mapping={"metadata.example": ["169.254.169.254"]})
    assert message.endswith("the URL's host resolves to a non-public address")
    # What the names resolve to is for the operator's log, never for the caller.
    assert "dogs.example resolves to 10.0.0.7, a private address" in caplog.text
    assert "metadata.example resolves to 169.254.169.254, the instance metadata service" in caplog.text


def test_what_private_names_resolve_to_stays_in_the_log(caplog):
    # An endpoint in a VPC must not tell callers which private names exist where.
    caplog.set_level("INFO", logger="kennel_serve.url_fetch")
    message = refusal("http://db.corp.internal:5432/x", mapping={"db.corp.internal": ["10.1.2.3"]})
    assert "10.1.2.3" not in message and "db.corp.internal" not in message and "private" not in message
    assert "db.corp.internal resolves to 10.1.2.3, a private address" in caplog.text


def test_allowlist_opens_networks_and_host_names_but_not_the_metadata_service(monkeypatch):
    connected = []

    def fake_connect(address, timeout):
        connected.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(url_fetch.socket, "create_connection", fake_connect)
    settings = UrlFetchSettings(allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),
                                                  ipaddress.ip_network("169.254.0.0/16")),
                                allowed_hosts=("images.internal",))
    mapping = {"images.internal": ["172.18.0.4"], "cache.example": ["10.2.3.4"]}
    assert "could not connect to the image server" in refusal("http://images.internal:8000/x.jpg", settings, mapping)
    assert "could not connect to the image server" in refusal("http://cache.example/x.jpg", settings, mapping)
    # The connection goes to the address that was checked, with the port of the URL.
    assert connected == [("172.18.0.4", 8000), ("10.2.3.4", 80)]
    # A range that happens to contain the metadata address does not open it.
    assert "metadata service" in refusal("http://169.254.169.254/", settings, mapping)
    exact = UrlFetchSettings(allowed_networks=(ipaddress.ip_network("169.254.169.254/32"),))
    assert "could not connect" in refusal("http://169.254.169.254/", exact)


def test_fetching_can_be_turned_off():
    assert "turned off" in refusal("https://example.com/dog.jpg", UrlFetchSettings(enabled=False))
