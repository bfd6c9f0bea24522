"""The page at / (with --index, unless --no-page) and the endpoints that show the index's images.

The page is three static files (static/): HTML, CSS and plain JavaScript, no build step, nothing
fetched from elsewhere. It calls the JSON endpoints every client calls (/v1/search, /v1/classify)
and these, which take a row id of the index and nothing else:

    GET /v1/images/{row}             the image file as stored (a webdataset row: its shard's member)
    GET /v1/images/{row}/thumbnail   a JPEG at most THUMB_SIDE px on its longer side, kept in memory
    GET /v1/images/{row}/attention   a PNG: where the MAP head looked (attention_maps.overlay)

The file read is the one the row's metadata names, never a path from the request. A row id outside
the index is 404; a file that is missing, unreadable, too big or in a refused format answers a
placeholder image (200, with an X-Placeholder header saying why), so one bad file never costs the
page more than its tile. The API key guards these endpoints as it guards the others.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from PIL import Image, ImageDraw, ImageOps

from ..attention_maps import attention_map, grid_cover, overlay
from ..image import ImageReadError, open_image, to_rgb
from ..items import scan_shard
from .batcher import Closed, QueueFull
from .inputs import ApiError

STATIC = Path(__file__).parent / "static"
# URL -> (file in STATIC, media type). Served without the API key: they hold no data.
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/page.js": ("page.js", "text/javascript; charset=utf-8"),
              "/page.css": ("page.css", "text/css; charset=utf-8")}
# Captions and metadata come from the web (img2dataset): the page writes them as text only, and this
# policy stops any script but page.js from running should one slip through.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
THUMB_SIDE = 256  # px, the longer side of a thumbnail
OVERLAY_SIDE = 512  # px, the longer side of the image under an attention overlay
MAX_FILE_BYTES = 64 << 20  # an image file larger than this is a placeholder, never read
SHARDS_KEPT = 16  # webdataset shards whose member table is kept (a table is ~100 bytes a member)


class Unreadable(Exception):
    """A row whose image cannot be shown; the message says why, without the path."""


class BoundedCache:
    """An LRU of encoded images, bounded in count and in bytes; safe across threads."""

    def __init__(self, max_bytes: int, max_items: int = 10_000):
        self.max_bytes, self.max_items = max_bytes, max_items
        self.bytes = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.max_bytes:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes or len(self._items) > self.max_items:
                self.bytes -= len(self._items.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._items)


class RowImages:
    """The image of each row of an index, found through the row's metadata: a file (image_path), or
    a member of a webdataset shard (shard + image_path = shard/member)."""

    def __init__(self, server: Any, cache_bytes: int):  # app.Server (app imports this module)
        self.server = server
        self.cache = BoundedCache(cache_bytes)
        self._shards: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._shards_lock = threading.Lock()

    def check(self, row: int) -> int:
        n = len(self.server.index)
        if not 0 <= row < n:  # -1 too: it must never wrap to the last row
            raise ApiError(404, f"no row {row} in the index (it has rows 0 to {n - 1})", "row")
        return row

    def read(self, row: int) -> bytes:
        """The encoded image of `row`, as stored; raises Unreadable."""
        with self.server.index_lock:  # the metadata cache is not made for threads
            meta = self.server.index.collection.metadata(row)
        path, shard = meta.get("image_path"), meta.get("shard")
        try:
            if shard:
                member = path[len(shard) + 1:] if path and path.startswith(shard + "/") else None
                offset, size = self._member(shard, member)
                if size > MAX_FILE_BYTES:
                    raise Unreadable(f"the image is over {MAX_FILE_BYTES >> 20} MB")
                with open(shard, "rb") as f:
                    f.seek(offset)
                    return f.read(size)
            if not path:
                raise Unreadable("the row names no image file")
            if os.path.getsize(path) > MAX_FILE_BYTES:
                raise Unreadable(f"the image file is over {MAX_FILE_BYTES >> 20} MB")
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Unreadable("the image file is missing") from None
        except OSError as e:
            raise Unreadable(f"cannot read the image file ({e.strerror or type(e).__name__})") from None

    def _member(self, shard: str, member: str | None) -> tuple[int, int]:
        """(offset, size) of an image member of a shard, from a table made once per shard."""
        with self._shards_lock:
            table = self._shards.get(shard)
            if table is not None:
                self._shards.move_to_end(shard)
        if table is None:
            if not os.path.isfile(shard):
                raise FileNotFoundError(shard)
            items, error = scan_shard(shard)
            if error is not None:
                raise Unreadable("cannot read the shard")
            table = {i.member: (i.offset, i.size) for i in items if i.member}
            with self._shards_lock:
                self._shards[shard] = table
                while len(self._shards) > SHARDS_KEPT:
                    self._shards.popitem(last=False)
        if member not in table:
            raise Unreadable("the shard has no such member any more")
        return table[member]

    def decode(self, data: bytes, side: int | None = None) -> Image.Image:
        """Bytes -> an RGB image with its EXIF orientation applied; with `side`, JPEGs decode at the
        smallest scale that still gives side px (draft), as a thumbnail needs no more."""
        max_pixels = self.server.settings.image_limits.max_pixels
        try:
            with open_image(io.BytesIO(data), "image") as img:
                if img.width * img.height > max_pixels:
                    raise Unreadable(f"the image is over --max-image-pixels ({max_pixels})")
                if side is not None:
                    img.draft(None, (side, side))
                img.load()
                return to_rgb(ImageOps.exif_transpose(img))
        except ImageReadError as e:  # a format outside the accepted list
            raise Unreadable(str(e).removeprefix("image: ")) from None
        except Unreadable:
            raise
        except Exception as e:  # truncated or corrupt: PIL raises many kinds
            raise Unreadable(f"cannot decode the image ({type(e).__name__})") from None

    def full(self, row: int) -> tuple[bytes, str]:
        """The stored bytes and their media type, once they decode as an image of an accepted format
        (a truncated file is a placeholder here too, not half a picture)."""
        data = self.read(row)
        self.decode(data)
        with open_image(io.BytesIO(data), "image") as img:
            return data, Image.MIME.get(img.format or "", "application/octet-stream")

    def thumbnail(self, row: int) -> bytes:
        key = ("thumbnail", row)
        if (jpeg := self.cache.get(key)) is None:
            img = self.decode(self.read(row), THUMB_SIDE)
            img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            jpeg = buf.getvalue()
            self.cache.put(key, jpeg)
        return jpeg


@functools.lru_cache(maxsize=16)
def placeholder(reason: str) -> bytes:
    """A grey tile with a crossed frame and the reason, as PNG."""
    w, h = THUMB_SIDE, THUMB_SIDE * 3 // 4
    img = Image.new("RGB", (w, h), (228, 228, 228))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, w - 9, h - 9), outline=(150, 150, 150), width=2)
    draw.line((8, 8, w - 9, h - 9), fill=(190, 190, 190), width=2)
    draw.line((8, h - 9, w - 9, 8), fill=(190, 190, 190), width=2)
    draw.text((16, h // 2 - 6), reason[:40], fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _image(data: bytes, media: str) -> Response:
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=600",
                                                     "X-Content-Type-Options": "nosniff"})


def _placeholder(e: Unreadable) -> Response:
    return Response(placeholder("image unavailable"), media_type="image/png",
                    headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                             "X-Placeholder": str(e)})


def add_page(app: FastAPI, server: Any, cache_bytes: int) -> None:  # server: app.Server
    """The page's files and the image endpoints, on `app` (the server has an index)."""
    images = RowImages(server, cache_bytes)
    app.state.row_images = images  # for tests and a debugger: what the cache holds
    pages = {url: (STATIC / name).read_bytes() for url, (name, _) in PAGE_FILES.items()}

    for url, (_, media) in PAGE_FILES.items():
        def serve_file(url: str = url, media: str = media) -> Response:
            return Response(pages[url], media_type=media,
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff"})

        app.add_api_route(url, serve_file, methods=["GET", "HEAD"], include_in_schema=False)

    async def shown(row: int, make: Callable[[int], Response]) -> Response:
        images.check(row)
        try:
            return await server.in_pool(make, row)
        except Unreadable as e:
            return _placeholder(e)

    @app.get("/v1/images/{row}", response_class=Response)
    async def full_image(row: int):
        """The row's image file as stored (a webdataset row: the member of its shard)."""
        return await shown(row, lambda r: _image(*images.full(r)))

    @app.get("/v1/images/{row}/thumbnail", response_class=Response)
    async def thumbnail(row: int):
        """The row's image as a JPEG at most 256 px on its longer side, made once and kept."""
        return await shown(row, lambda r: _image(images.thumbnail(r), "image/jpeg"))

    @app.get("/v1/images/{row}/attention", response_class=Response)
    async def attention(row: int):
        """Where the MAP head looked: its attention over the patches (mean over heads), over the
        row's image, brighter = more; the same for every query, as the head's probe is learned."""
        images.check(row)
        model = server.model
        if getattr(model, "vision_model", None) is None:
            raise ApiError(501, f"attention overlays need the PyTorch image tower; this server runs "
                           f"the {server.settings.backend} graphs (--backend)")
        key = ("attention", row)
        if (png := images.cache.get(key)) is not None:
            return _image(png, "image/png")
        proc = server.processor.image
        try:
            original = await server.in_pool(lambda: images.decode(images.read(row)))
        except Unreadable as e:
            return _placeholder(e)
        pixels = await server.in_pool(lambda: proc.collate([proc.to_tensor(proc.prepare(original))]))
        try:
            future = server.batcher.call(
                lambda: attention_map(model, pixels.to(server.batcher.device))[0].mean(0).cpu().numpy())
        except (QueueFull, Closed) as e:
            raise server.overloaded(e) from None
        weights = await asyncio.wrap_future(future)  # (h, w)

        def draw() -> bytes:
            base = original.copy()
            base.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.BICUBIC)
            buf = io.BytesIO()
            overlay(base, weights, grid_cover(proc, model.vision_model.config.patch_size)).save(buf, "PNG")
            return buf.getvalue()

        png = await server.in_pool(draw)
        images.cache.put(key, png)
        return _image(png, "image/png")
