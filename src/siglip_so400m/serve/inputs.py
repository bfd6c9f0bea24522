"""Reading what a request sends: images as base64 data URIs or uploads (URLs only with
--allow-urls), every failure an ApiError that names the item.

Nothing here ever opens a path named in a request: a string is either a data URI or a text.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image, ImageOps

from ..image import ImageFormatError, open_image

IMAGE_URI_PREFIX = "data:image/"


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {401: "authentication_error", 404: "not_found_error",
                                       503: "overloaded_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int  # width x height before decoding; more is refused as a decompression bomb
    allow_urls: bool = False
    url_max_bytes: int = 32 << 20
    url_timeout_s: float = 10.0  # in all, redirects included
    allow_private_urls: bool = False  # loopback, private, link-local and reserved addresses too


def is_image_uri(s: str) -> bool:
    """How /v1/embeddings tells images from texts in one `input` list: a string that starts with
    `data:image/` is an image (and must be base64); any other string is a text."""
    return s.startswith(IMAGE_URI_PREFIX)


def data_uri_bytes(uri: str, param: str) -> bytes:
    """`data:image/<type>[;...];base64,<data>` -> the decoded bytes."""
    head, comma, payload = uri.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ApiError(400, f"{param}: an image data URI must be base64: "
                       "data:image/<type>;base64,<data>", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 in the image data URI ({e})", param) from None
    if not data:
        raise ApiError(400, f"{param}: the image data URI holds no data", param)
    return data


class Aborted(Exception):
    """A fetch stopped by its Aborter: another item of its request failed, or the server stops."""


class Aborter:
    """Stops the URL fetches of one request at once, from any thread: their sockets are shut (which
    wakes a blocked read), a name lookup is no longer waited for, and new fetches do not start."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.aborted = threading.Event()

    def abort(self) -> None:
        with self._lock:
            self.aborted.set()
            _shut(list(self._sockets))

    def check(self) -> None:
        if self.aborted.is_set():
            raise Aborted

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            if self.aborted.is_set():
                _shut([sock])

    def discard(self, socks: list[socket.socket]) -> None:
        with self._lock:
            self._sockets.difference_update(socks)


def fetch_url(url: str, param: str, limits: ImageLimits, aborter: Aborter | None = None) -> bytes:
    """An http(s) URL's body, at most url_max_bytes, within url_timeout_s in all (redirects, a
    slow host and a trickling body included); only with --allow-urls, never another scheme, and,
    unless --allow-private-urls, never a loopback, private, link-local or reserved address.
    Raises Aborted once `aborter` is aborted."""
    if not limits.allow_urls:
        raise ApiError(400, f"{param}: this server does not fetch URLs (start it with --allow-urls); "
                       "send the image as a base64 data URI or a multipart upload", param)
    deadline = time.monotonic() + limits.url_timeout_s
    aborter = aborter or Aborter()
    for _ in range(MAX_REDIRECTS + 1):
        aborter.check()
        status, location, body = _fetch_once(url, param, limits, deadline, aborter)
        if location is None:
            if status != 200:
                raise ApiError(400, f"{param}: cannot fetch the URL (HTTP {status})", param)
            return body
        url = urllib.parse.urljoin(url, location)  # every hop is checked again, address included
    raise ApiError(400, f"{param}: cannot fetch the URL (over {MAX_REDIRECTS} redirects)", param)


MAX_REDIRECTS = 5


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the server must not connect to this address for a client (None: a public address).
    A client could otherwise make it read cloud metadata (169.254.169.254) or internal services."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_refusal(ip.ipv4_mapped)  # ::ffff:127.0.0.1 is 127.0.0.1
        if ip in _SITE_LOCAL:  # deprecated (RFC 3879) but still routed inside some networks
            return "a site-local address"
        # 6to4 (2002::/16) and Teredo (2001::/32) carry an IPv4 address that relays route to;
        # Python 3.11 calls 2002:7f00:1:: global. Teredo's client address is stored bit-inverted,
        # which ipaddress undoes. (IPv4-compatible ::a.b.c.d and NAT64 64:ff9b::/96 are reserved.)
        embedded = [("6to4", ip.sixtofour)] if ip.sixtofour else []
        embedded += [("Teredo", v4) for v4 in ip.teredo or ()]
        for kind, v4 in embedded:
            why = address_refusal(v4)
            if why is not None:
                return f"a {kind} address that embeds {v4}, {why}"
    # Most specific first: 127.0.0.1 and 169.254.169.254 are "private" to Python as well.
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:  # shared (100.64/10), documentation and other special ranges
        return "not a public address"
    return None


_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def _fetch_once(url: str, param: str, limits: ImageLimits, deadline: float, aborter: Aborter
                ) -> tuple[int, str | None, bytes]:
    """One request: (status, the redirect's Location or None, the body of a 200)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ApiError(400, f"{param}: only http(s) URLs and data:image/ URIs are accepted"
                       + (f" (a redirect led to {scheme}:)" if scheme else ""), param)
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:  # a port that is not a number
        raise ApiError(400, f"{param}: invalid URL ({e})", param) from None
    if not host:
        raise ApiError(400, f"{param}: the URL names no host", param)
    address = _checked_address(host, port, param, limits, deadline, aborter)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _timeout(param, limits)
    # Pinned: the connection goes to the address checked above, not to a second lookup that a
    # DNS server under a client's control could answer differently. TLS is ours too (certificate
    # and name checked against the URL's host), so that the deadline timer holds the socket
    # that is read, whichever it is.
    sockets: list[socket.socket] = []

    def connect(_, *args, **kwargs) -> socket.socket:
        aborter.check()
        # Not create_connection((address, port)): the socket must be the aborter's before the
        # connect, which may itself hang on a host that drops packets.
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(sock)
        aborter.add(sock)
        sock.settimeout(remaining)
        try:
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        if scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sockets.append(sock)
            aborter.add(sock)
        return sock

    conn = http.client.HTTPConnection(address, port, timeout=remaining)
    conn._create_connection = connect
    # The socket timeout bounds each wait, this timer the whole exchange: a host that trickles a
    # byte per second never lets a read time out, so at the deadline the socket is shut (the
    # connection object may have handed it to the response already, hence our own reference).
    timer = threading.Timer(remaining, _shut, (sockets,))
    timer.start()
    try:
        path = parts.path or "/"
        default_port = 443 if scheme == "https" else 80
        netloc = f"[{host}]" if ":" in host else host
        conn.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                     headers={"Host": netloc if port == default_port else f"{netloc}:{port}",
                              "User-Agent": "siglip-so400m-serve", "Accept": "image/*"})
        r = conn.getresponse()
        if r.status in (301, 302, 303, 307, 308) and r.getheader("Location"):
            return r.status, r.getheader("Location"), b""
        if r.status != 200:
            return r.status, None, b""
        declared = r.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.url_max_bytes:
            raise _too_big(param, limits)
        chunks, size = [], 0
        while chunk := r.read1(1 << 16):
            size += len(chunk)
            if size > limits.url_max_bytes:
                raise _too_big(param, limits)
            chunks.append(chunk)
        if time.monotonic() > deadline:
            raise _timeout(param, limits)
        if r.length:  # the host closed before the Content-Length it announced
            raise http.client.IncompleteRead(b"".join(chunks), r.length)
        return 200, None, b"".join(chunks)
    except (ApiError, Aborted):
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        aborter.check()  # the shut socket's error is not the host's
        if time.monotonic() >= deadline:
            raise _timeout(param, limits) from None
        # http.client.HTTPException: the host answered something that is not HTTP.
        what = "not an HTTP reply" if isinstance(e, http.client.HTTPException) else "connection failed"
        raise ApiError(400, f"{param}: cannot fetch the URL ({what}: {type(e).__name__}: {e})",
                       param) from None
    finally:
        timer.cancel()
        conn.close()
        aborter.discard(sockets)


def _checked_address(host: str, port: int, param: str, limits: ImageLimits, deadline: float,
                     aborter: Aborter) -> str:
    """The address to connect to: the first the host resolves to that may be fetched."""
    try:
        infos = _resolve(host, port, deadline, aborter)
    except TimeoutError:
        raise _timeout(param, limits) from None
    except (OSError, UnicodeError) as e:
        raise ApiError(400, f"{param}: cannot fetch the URL (cannot resolve {host}: {e})", param) from None
    refused = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])  # an IPv6 zone (fe80::1%eth0) dropped
        why = None if limits.allow_private_urls else address_refusal(ip)
        if why is None:
            return sockaddr[0]
        refused.append(f"{ip} is {why}")
    raise ApiError(400, f"{param}: refused to fetch from {host}: {'; '.join(dict.fromkeys(refused))} "
                   "(the server fetches public addresses only; --allow-private-urls lifts this)", param)


# Name lookups in flight. getaddrinfo cannot be interrupted, and a resolver that never answers
# would hold a fetch past --url-timeout (and the server's exit past SIGTERM), so each lookup runs
# in a daemon thread that the fetch stops waiting for at its deadline; this bounds how many such
# threads a hostile name server can leave waiting.
MAX_LOOKUPS = 64
_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)


def _resolve(host: str, port: int, deadline: float, aborter: Aborter) -> list:
    """socket.getaddrinfo(host, port), within the deadline (else TimeoutError) and until aborted."""
    if not _lookups.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise TimeoutError
    result: list = []
    done = threading.Event()

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as e:  # handed to the fetch, which may have gone already
            result.append(e)
        finally:
            _lookups.release()
            done.set()

    threading.Thread(target=lookup, name="siglip-resolve", daemon=True).start()
    # Waits in steps, to notice an abort (a second Event cannot be waited on together with this one).
    while not done.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
        aborter.check()
        if time.monotonic() >= deadline:
            break
    if not result:
        raise TimeoutError
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _shut(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the read blocked in the fetching thread


def _timeout(param: str, limits: ImageLimits) -> ApiError:
    return ApiError(400, f"{param}: fetching the URL took over {limits.url_timeout_s} s "
                    "(--url-timeout)", param)


def _too_big(param: str, limits: ImageLimits) -> ApiError:
    return ApiError(400, f"{param}: the image at the URL is over {limits.url_max_bytes >> 20} MB "
                    "(--max-request-mb)", param)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image with its EXIF orientation applied (as
    siglip_so400m.load_image does for files, so a file and its upload give the same pixels). Only
    the formats of siglip_so400m.image.IMAGE_FORMATS are opened (the same list as every job's)."""
    bomb = f"refused as a possible decompression bomb (over {max_pixels} pixels; see --max-image-pixels)"
    try:
        with open_image(io.BytesIO(data), param) as img:
            # The header gives the size before any pixel is decoded: refuse bombs here, before
            # they cost memory. PIL's own limit is process-wide; this one is the server's.
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(400, f"{param}: {w}x{h} image {bomb}", param)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except ImageFormatError as e:
        # A format that exists but is not accepted is 415 (unsupported media type); bytes that
        # are no image at all stay 400.
        raise ApiError(415 if e.format else 400, str(e), param) from None
    except Image.DecompressionBombError:
        # PIL's own check (at twice Image.MAX_IMAGE_PIXELS, which serve sets to ours) fired
        # before the size could be read: the refusal still quotes the server's limit.
        raise ApiError(400, f"{param}: image {bomb}", param) from None
    except Exception as e:  # truncated or corrupt data: PIL raises many kinds; none may harm the server
        raise ApiError(400, f"{param}: cannot decode the image, truncated or corrupt "
                       f"({type(e).__name__}: {e})", param) from None
    return img
