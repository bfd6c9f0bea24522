"""Reading what a request sends: images as base64 data URIs or uploads (URLs only with
--allow-urls), every failure an ApiError that names the item.

Nothing here ever opens a path named in a request: a string is either a data URI or a text.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import ClassVar

from PIL import Image, ImageOps

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
    url_timeout_s: float = 10.0


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


def fetch_url(url: str, param: str, limits: ImageLimits) -> bytes:
    """An http(s) URL's body, at most url_max_bytes, within about url_timeout_s; only with
    --allow-urls, and never another scheme (no file://, no ftp://, also not through redirects)."""
    if not limits.allow_urls:
        raise ApiError(400, f"{param}: this server does not fetch URLs (start it with --allow-urls); "
                       "send the image as a base64 data URI or a multipart upload", param)
    if not url.lower().startswith(("http://", "https://")):
        raise ApiError(400, f"{param}: only http(s) URLs and data:image/ URIs are accepted", param)
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.HTTPDefaultErrorHandler()):
        opener.add_handler(handler)
    deadline = time.monotonic() + limits.url_timeout_s
    try:
        with opener.open(url, timeout=limits.url_timeout_s) as r:
            chunks, size = [], 0
            while chunk := r.read(1 << 16):
                size += len(chunk)
                if size > limits.url_max_bytes:
                    raise ApiError(400, f"{param}: the image at the URL is over "
                                   f"{limits.url_max_bytes >> 20} MB", param)
                if time.monotonic() > deadline:
                    raise ApiError(400, f"{param}: fetching the URL took over {limits.url_timeout_s} s",
                                   param)
                chunks.append(chunk)
    except ApiError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"{param}: cannot fetch the URL ({e})", param) from None
    return b"".join(chunks)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> a fully decoded PIL image with its EXIF orientation applied (as
    siglip_so400m.load_image does for files, so a file and its upload give the same pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # The header gives the size before any pixel is decoded: refuse bombs here, before
            # they cost memory. PIL's own limit is process-wide; this one is the server's.
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(400, f"{param}: {w}x{h} image refused as a possible decompression bomb "
                               f"(over {max_pixels} pixels; see --max-image-pixels)", param)
            img.load()
            img = ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except Image.UnidentifiedImageError:
        raise ApiError(400, f"{param}: not an image file PIL can read", param) from None
    except Image.DecompressionBombError as e:
        raise ApiError(400, f"{param}: refused as a possible decompression bomb ({e})", param) from None
    except Exception as e:  # truncated or corrupt data: PIL raises many kinds; none may harm the server
        raise ApiError(400, f"{param}: cannot decode the image, truncated or corrupt "
                       f"({type(e).__name__}: {e})", param) from None
    return img
