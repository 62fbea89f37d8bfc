"""Fetch an image from a client-given URL without becoming a proxy into the network.

The original clients send {"url": "https://..."} and the container downloads it.
Done naively that lets any caller make the endpoint read the instance metadata
service or anything else on its private network. Here:

- only http and https;
- the host name is resolved once per hop and EVERY address it resolves to must be
  public (not loopback, private, link-local, multicast, reserved, unspecified, or
  the metadata service 169.254.169.254 / fd00:ec2::254) unless the allowlist
  (KENNEL_URL_ALLOWLIST: CIDRs and host names) says so; the metadata address is
  only ever allowed by an allowlist entry for exactly that address;
- the connection goes to the address that was checked (the name is not resolved
  again, so DNS rebinding cannot swap in another address); TLS still verifies the
  certificate against the host name;
- connect timeout, one deadline for the whole download, a byte cap (checked from
  Content-Length and while reading), at most N redirects, each one checked again
  like the first URL.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from typing import Callable
from urllib.parse import urljoin, urlsplit

from kennel_serve.errors import RequestError, bad_request
from kennel_serve.settings import UrlFetchSettings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]

METADATA_ADDRESSES = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


def refused(reason: str) -> RequestError:
    return bad_request(f"cannot fetch the image URL: {reason}")


def address_problem(ip: IpAddress) -> str | None:
    """Why a client URL may not reach this address, or None for a public address."""
    if ip in METADATA_ADDRESSES:
        return "the instance metadata service"
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            problem = address_problem(embedded)
            if problem:
                return problem
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


class UrlFetcher:
    def __init__(self, settings: UrlFetchSettings, resolver: Resolver = socket.getaddrinfo):
        self.settings = settings
        self._resolve = resolver

    def fetch(self, url: str) -> bytes:
        """The body the URL answers with (after redirects), or RequestError(400) saying why not."""
        if not self.settings.enabled:
            raise bad_request("fetching image URLs is turned off on this endpoint (KENNEL_URL_FETCH=false); "
                              "send the image bytes instead")
        if not isinstance(url, str) or not url.strip():
            raise bad_request("the field 'url' must be a non-empty string")
        deadline = time.monotonic() + self.settings.timeout_s
        current = url.strip()
        for _ in range(self.settings.max_redirects + 1):
            status, location, body = self._get(current, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise refused(f"HTTP {status} redirect without a Location")
                try:
                    current = urljoin(current, location)
                except ValueError:
                    raise refused(f"HTTP {status} redirect to an invalid URL") from None
                continue
            if not 200 <= status < 300:
                raise refused(f"the server answered HTTP {status}")
            return body
        raise refused(f"more than {self.settings.max_redirects} redirects")

    # -- one hop -------------------------------------------------------------------------

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        scheme, host, port, target = self._parse(url)
        ip = self._checked_address(host, port)
        sock = self._connect(scheme, host, ip, port, deadline)
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock  # already connected to the checked address: no second DNS lookup
        try:
            connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
            default_port = 443 if scheme == "https" else 80
            connection.putheader("Host", _host_header(host, port, default_port))
            connection.putheader("Accept", "image/*, application/octet-stream;q=0.5")
            connection.putheader("Accept-Encoding", "identity")
            connection.putheader("User-Agent", "kennel-serve")
            connection.putheader("Connection", "close")
            connection.endheaders()
            response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                return response.status, response.getheader("Location"), b""
            if not 200 <= response.status < 300:
                return response.status, None, b""
            return response.status, None, self._read_body(response, sock, deadline)
        except (socket.timeout, TimeoutError):
            raise refused(f"no complete answer within {self.settings.timeout_s:g} s") from None
        except ssl.SSLError as exc:
            raise refused(f"TLS failed ({exc.reason or 'handshake error'})") from None
        except (OSError, http.client.HTTPException) as exc:
            raise refused(f"the connection failed ({type(exc).__name__})") from None
        finally:
            connection.close()

    def _parse(self, url: str) -> tuple[str, str, int, str]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise refused("the URL is malformed") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise refused(f"only http and https URLs are fetched, not {scheme or 'a URL without a scheme'}")
        if not parts.hostname:
            raise refused("the URL has no host")
        try:
            host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
        except UnicodeError:
            raise refused("the URL's host name is not valid") from None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return scheme, host.lower().rstrip("."), port or (443 if scheme == "https" else 80), target

    def _checked_address(self, host: str, port: int) -> IpAddress:
        """Resolve once; every address must pass; return the one to connect to."""
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = self._resolve(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError, OSError):
                raise refused(f"the host {host} cannot be resolved") from None
            addresses = []
            for info in infos:
                address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
                if address not in addresses:
                    addresses.append(address)
            if not addresses:
                raise refused(f"the host {host} cannot be resolved")
        host_allowed = host in self.settings.allowed_hosts
        for address in addresses:
            if self._allowed(address, host_allowed):
                continue
            problem = address_problem(address)
            raise refused(f"{host} is {problem}" if str(address) == host else f"{host} resolves to {address}, {problem}")
        return addresses[0]

    def _allowed(self, address: IpAddress, host_allowed: bool) -> bool:
        if address in METADATA_ADDRESSES:
            # Only an entry for exactly this address opens the metadata service, never a range.
            return any(net.num_addresses == 1 and address in net for net in self.settings.allowed_networks)
        if host_allowed or any(address in net for net in self.settings.allowed_networks):
            return True
        return address_problem(address) is None

    def _connect(self, scheme: str, host: str, ip: IpAddress, port: int, deadline: float) -> socket.socket:
        timeout = min(self.settings.connect_timeout_s, max(0.001, deadline - time.monotonic()))
        try:
            sock = socket.create_connection((str(ip), port), timeout=timeout)
        except (socket.timeout, TimeoutError):
            raise refused(f"connecting to {host} timed out after {timeout:g} s") from None
        except OSError as exc:
            raise refused(f"cannot connect to {host} ({exc.strerror or type(exc).__name__})") from None
        # From here on one deadline bounds the handshake, the headers and every read.
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        if scheme == "https":
            context = ssl.create_default_context()
            try:
                sock = context.wrap_socket(sock, server_hostname=host)
            except (socket.timeout, TimeoutError):
                sock.close()
                raise refused(f"the TLS handshake with {host} timed out") from None
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise refused(f"the certificate of {host} is not valid ({exc.verify_message})") from None
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise refused(f"TLS with {host} failed ({type(exc).__name__})") from None
        return sock

    def _read_body(self, response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> bytes:
        cap = self.settings.max_bytes
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > cap:
            raise refused(f"the image is {int(length)} bytes, more than the limit of {cap} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise refused(f"no complete answer within {self.settings.timeout_s:g} s")
            sock.settimeout(remaining)
            chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise refused(f"the image is more than the limit of {cap} bytes")
            chunks.append(chunk)


def _host_header(host: str, port: int, default_port: int) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == default_port else f"{name}:{port}"
