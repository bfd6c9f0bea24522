"""The FastAPI application: endpoints, request validation, and the ASGI guard in front of them
(API key, body-size limit, metrics). Everything that runs the model goes through the Batcher."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from torch import Tensor

from ..api import Processor
from ..config import DEFAULT_TEMPLATE
from ..model import SigLIP
from ..text import check_text_length, warn_if_truncated
from ..zeroshot import ZeroShotClassifier, check_labels, check_templates
from .batcher import Batcher, Closed, Metrics, QueueFull
from .inputs import (
    Aborted,
    Aborter,
    ApiError,
    ImageLimits,
    data_uri_bytes,
    decode_image,
    fetch_url,
    is_image_uri,
)

ENDPOINTS = ("/v1/embeddings", "/v1/classify", "/v1/search", "/health", "/metrics", "/docs",
             "/openapi.json", "/v1/images", "/")
MAX_TEMPLATES = 32  # prompt templates per classify request: each multiplies the text tower's work


@dataclass
class Upload:
    """An image sent as a multipart file part."""

    data: bytes
    filename: str | None


@dataclass
class Settings:
    model_name: str
    revision: str | None
    precision: str
    backend: str = "torch"  # what runs the towers (--backend): torch, onnx or openvino
    raw_embeddings: bool = True  # False: the graphs return normalized embeddings only
    max_items: int = 64
    max_labels: int = 256
    max_request_bytes: int = 32 << 20
    image_limits: ImageLimits = field(default_factory=lambda: ImageLimits(max_pixels=40_000_000))
    api_key: str | None = None
    label_cache_size: int = 10_000
    decode_threads: int = 4
    retry_after_s: int = 1
    max_k: int = 1000  # hits per /v1/search query
    max_bodies: int = 4  # requests parsed and decoded at once (--max-concurrent-bodies)
    body_timeout_s: float = 30.0  # from a request's start to its body's last byte (--body-timeout)
    url_threads: int = 8  # URL fetches at once (--url-threads)
    page: bool = True  # with an index: the page at / and the image endpoints (--no-page: off)
    image_cache_bytes: int = 64 << 20  # thumbnails and overlays kept in memory (--image-cache-mb)


class LabelMemory:
    """Label embeddings in memory, shared by every request and bounded (least recently used go
    first), keyed by (precision, templates, label): a bf16 embedding is not an fp32 one."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: OrderedDict[tuple[str, tuple[str, ...], str], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, precision: str, templates: Sequence[str], labels: Sequence[str]) -> _LabelView:
        return _LabelView(self, (precision, tuple(templates)), list(labels))


class _LabelView:
    """The get()/put() of zeroshot.LabelCache, on the shared memory, for one request's labels."""

    def __init__(self, memory: LabelMemory, prefix: tuple[str, tuple[str, ...]], labels: list[str]):
        self.memory, self.prefix, self.labels = memory, prefix, labels

    def get(self, labels: Sequence[str] | None = None) -> dict[str, Tensor]:
        m = self.memory
        with m._lock:
            found = {}
            for label in self.labels if labels is None else labels:
                key = (*self.prefix, label)
                if key in m._lru:
                    m._lru.move_to_end(key)
                    found[label] = m._lru[key]
            return found

    def put(self, embeddings: dict[str, Tensor]) -> None:
        m = self.memory
        with m._lock:
            for label, emb in embeddings.items():
                key = (*self.prefix, label)
                m._lru[key] = emb
                m._lru.move_to_end(key)
            while len(m._lru) > m.capacity:
                m._lru.popitem(last=False)


class ByteBudget:
    """Bytes of request bodies the server holds, bounded: a body takes its bytes as they arrive and
    gives them back once its items are decoded; past the bound, reading waits. On the event loop
    only. A chunk that fits is taken even while others wait: the waiting ones may be bodies that
    hold budget already, and none must wait behind another (chunks are at most uvicorn's 64 KiB,
    so none starves). Bodies that fill the budget and all stall end at --body-timeout."""

    def __init__(self, capacity: int):
        self.capacity = self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def take(self, n: int) -> int:
        n = min(n, self.capacity)
        if self.free >= n:
            self.free -= n
            return n
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append((n, granted))
        try:
            await granted
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give(n)  # granted, then cancelled before it could use them
            else:
                granted.cancel()  # give() skips it
            raise
        return n

    def give(self, n: int) -> None:
        self.free += n
        waiting = self._waiters
        self._waiters = deque()
        for n, granted in waiting:
            if granted.done():
                continue
            if n <= self.free:
                self.free -= n
                granted.set_result(None)
            else:
                self._waiters.append((n, granted))


class Server:
    """What the endpoints share: the model, its batcher, limits, metrics and the search index."""

    def __init__(self, model: SigLIP, processor: Processor, settings: Settings, batcher: Batcher,
                 metrics: Metrics, index: Any = None):
        if processor.tokenizer is None:
            raise ValueError("the checkpoint has no spiece.model: the server needs its tokenizer")
        self.model, self.processor, self.settings = model, processor, settings
        self.batcher, self.metrics, self.index = batcher, metrics, index
        self.labels = LabelMemory(settings.label_cache_size)
        self.precision = model.precision  # the label memory's key; model.precision walks the modules
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="siglip-decode")
        # URL fetches have their own threads: a host that never answers holds one of these for
        # --url-timeout, never a thread that texts and uploads need.
        self.fetch_pool = ThreadPoolExecutor(settings.url_threads, thread_name_prefix="siglip-fetch")
        self.aborters: set[Aborter] = set()  # the fetches in flight, stopped at shutdown
        self.index_lock = threading.Lock()
        # What concurrent requests may cost in memory. Bodies being received hold only the bytes
        # that arrived, within one budget (a client that sends one byte and stalls holds one
        # byte, not a slot); a body is parsed, and its images decoded, only inside `reading`
        # (--max-concurrent-bodies at once, each about twice its body once parsed, plus its
        # tensors). A request that fetches URLs does so outside `reading`, in `fetching`, with
        # as many slots: a URL never makes a text wait. What leaves both is the items' tensors,
        # which the bounded batch queue holds.
        self.body_bytes = ByteBudget(settings.max_bodies * settings.max_request_bytes)
        self.reading = asyncio.Semaphore(settings.max_bodies)
        self.fetching = asyncio.Semaphore(settings.max_bodies)
        self.width = model.config.text_config.projection_size  # the embedding's dimensions

    # ---- turning request items into model inputs (in the decode threads) ----

    def image_tensor(self, item: Any, param: str, aborter: Aborter | None = None) -> Tensor:
        """A data URI, {"image_url": ...} or Upload -> (3, S, S) float32 pixels."""
        limits = self.settings.image_limits
        if isinstance(item, Upload):
            data = item.data
        elif isinstance(item, str) and is_image_uri(item):
            data = data_uri_bytes(item, param)
        elif isinstance(item, dict):
            url = item["image_url"]
            data = data_uri_bytes(url, param) if is_image_uri(url) else fetch_url(url, param, limits, aborter)
        else:
            raise ApiError(400, f"{param}: expected an image as a data:image/...;base64 URI, an "
                           "{\"image_url\": ...} object or a multipart file (paths are never read)", param)
        img = decode_image(data, param, limits.max_pixels)
        try:
            image = self.processor.image
            return image.to_tensor(image.prepare(img))
        except Exception as e:
            raise ApiError(400, f"{param}: cannot convert the image ({e})", param) from None

    def text_ids(self, text: str) -> tuple[Tensor, int]:
        """A text -> (L,) int64 token ids, and the tokens it used (up to and with the EOS)."""
        tok = self.processor.tokenizer
        warn_if_truncated(tok, [text])
        ids = tok.encode(text)
        used = ids.index(tok.eos_id) + 1 if tok.eos_id in ids else len(ids)
        return torch.tensor(ids, dtype=torch.long), used

    def search(self, rows: list[Tensor], n_texts: int, k: int, threshold: float | None,
               index_rows: Sequence[int] = (), fold: float | None = None) -> list[list[dict]]:
        """Query embeddings made by the batcher, then the stored embeddings of `index_rows` ("more
        like this") -> the index's hits, scored as Index.search scores them: a text query by SigLIP's
        sigmoid (t' and b in float32, from the index's manifest), an image or row query by cosine.
        With `fold`, near-duplicates among each query's hits are marked (search.fold_duplicates)."""
        from ..search import fold_duplicates

        # As Index.embed_texts/embed_images: the raw embedding in float32, then normalized.
        q = F.normalize(torch.stack(rows).float(), dim=-1).numpy() if rows else \
            np.zeros((0, self.index.collection.dim), np.float32)  # (Q, D)
        with self.index_lock:  # the index's metadata cache is not made for threads
            if index_rows:
                q = np.concatenate([q, self.index.collection.vectors(np.array(index_rows, np.int64))])
            results = self.index.search(vectors=q, k=k)
            out = []
            for n, hits in enumerate(results):
                if n < n_texts:
                    self.index.score_text_hits(hits)  # as Index.search scores a text query
                hits = [h for h in hits if threshold is None or h["score"] >= threshold]
                out.append(hits if fold is None else fold_duplicates(self.index.collection, hits, fold))
        return out

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def gather_items(self, jobs: list) -> list:
        """Run one decode job per item in the pool; the first failing item (by index) wins."""
        results = await asyncio.gather(*(self.in_pool(*job) for job in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    async def fetch_items(self, jobs: list) -> list:
        """Run one URL job per item in the fetch pool; the first to fail stops the others (those
        not started never start, the running ones' sockets are shut) and is the answer."""
        aborter = Aborter()
        self.aborters.add(aborter)
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self.fetch_pool, fn, server, item, param, aborter)
                   for fn, server, item, param in jobs]
        try:
            done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            return [f.result() for f in futures]
        finally:  # also when this request is cancelled (client gone, or the shutdown's grace over)
            aborter.abort()
            for f in futures:
                f.cancel()
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: an aborted fetch is no error to log
            self.aborters.discard(aborter)

    def abort_fetches(self) -> None:
        """Stop every URL fetch in flight (at shutdown, once open requests had their grace)."""
        for aborter in list(self.aborters):
            aborter.abort()

    @asynccontextmanager
    async def receiving(self, request: Request) -> AsyncIterator[tuple[Request, bytes]]:
        """The request's whole body, received within --body-timeout holding only the bytes that
        arrived (ByteBudget), and a request that reads it again from memory; the bytes are the
        budget's again when the block ends."""
        raw, taken = bytearray(), 0

        async def receive_all() -> None:
            nonlocal taken
            async for chunk in request.stream():
                if chunk:
                    taken += await self.body_bytes.take(len(chunk))
                    raw.extend(chunk)

        try:
            try:
                await asyncio.wait_for(receive_all(), self.settings.body_timeout_s)
            except asyncio.TimeoutError:
                t = self.settings.body_timeout_s
                raise ApiError(408, f"the request body did not arrive within {t:g} s (--body-timeout)",
                               headers={"Connection": "close"}) from None
            body, sent = bytes(raw), False
            del raw[:]

            async def replay() -> dict:
                nonlocal sent
                if sent:
                    return await request.receive()  # a disconnect, when it comes
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            yield Request(request.scope, replay), body
        finally:
            self.body_bytes.give(taken)

    async def read(self, request: Request, parse: Callable[[Request, bytes], Awaitable[tuple[list, Any]]]
                   ) -> tuple[list, Any]:
        """A request's items ready for the batcher, and what else `parse` read from its body.
        parse(request, body) -> (jobs, rest) validates the body and gives one job per item."""
        async with self.receiving(request) as (request, body):
            async with self.reading:
                jobs, rest = await parse(request, body)
                if not any(_is_fetch(job) for job in jobs):
                    return await self.gather_items(jobs), rest
            # The other items first (a bad one fails without a fetch), then the URLs, outside
            # `reading`; the decoded items wait in a `fetching` slot, which bounds their memory.
            urls = [i for i, job in enumerate(jobs) if _is_fetch(job)]
            async with self.fetching:
                async with self.reading:
                    local = iter(await self.gather_items([j for j in jobs if not _is_fetch(j)]))
                fetched = dict(zip(urls, await self.fetch_items([jobs[i] for i in urls]), strict=True))
            return [fetched[i] if i in fetched else next(local) for i in range(len(jobs))], rest

    def overloaded(self, e: Exception) -> ApiError:
        s = self.settings.retry_after_s
        return ApiError(503, f"{e}; retry after {s} s", headers={"Retry-After": str(s)})

    def submit(self, items: list[tuple[str, Tensor]]) -> list[Future]:
        """Queue items for the batcher (all or none, else 503) -> one future per item."""
        try:
            return self.batcher.submit(items)
        except (QueueFull, Closed) as e:
            raise self.overloaded(e) from None

    async def embed(self, items: list[tuple[str, Tensor]]) -> list[Tensor]:
        """Items through the batcher -> their raw (D,) embeddings in the model's dtype."""
        return await collect(self.submit(items))

    async def classifier(self, labels: list[str], templates: list[str]) -> ZeroShotClassifier:
        """The labels' embeddings from the shared memory, the missing ones computed (by the zero-shot
        module's own code) on the model thread, if its bounded call queue takes them (else 503)."""
        view = self.labels.view(self.precision, templates, labels)
        make = lambda: ZeroShotClassifier(self.model, self.processor, labels, templates, cache=view)  # noqa: E731
        known = len(view.get())
        if known == len(labels):
            self.metrics.label_cache(hits=known, misses=0)
            return make()  # every label known: no model work, so no need to queue behind batches
        try:
            future = self.batcher.call(make)
        except (QueueFull, Closed) as e:
            raise self.overloaded(e) from None
        self.metrics.label_cache(hits=known, misses=len(labels) - known)
        return await asyncio.wrap_future(future)


async def collect(futures: list[Future]) -> list[Tensor]:
    """The batcher's rows; if this request is cancelled, so are its items still queued."""
    try:
        return list(await asyncio.gather(*map(asyncio.wrap_future, futures)))
    finally:
        for f in futures:
            f.cancel()  # no effect on the finished ones


# ---- request parsing and validation ----

async def read_body(request: Request, raw: bytes, server: Server, fields: dict[str, str]) -> dict[str, Any]:
    """The JSON object, or the multipart form turned into the same shape, from the body `raw` that
    Server.receiving read (`request` reads it again). `fields` tells, for a form, which names are
    lists ("list") and which single values ("str", "int", "float", "bool")."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        s = server.settings
        try:
            form = await request.form(max_files=s.max_items + 1, max_fields=s.max_items + s.max_labels
                                      + 2 * MAX_TEMPLATES + 16, max_part_size=s.max_request_bytes)
        except HTTPException as e:
            status = 422 if "Too many" in str(e.detail) else 400
            raise ApiError(status, f"multipart form: {e.detail} (at most {s.max_items} items, "
                           f"{s.max_labels} labels)") from None
        try:
            body: dict[str, Any] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    value = Upload(await value.read(), value.filename)
                if fields.get(name) == "list":
                    body.setdefault(name, []).append(value)
                elif name in fields:
                    body[name] = _form_value(value, fields[name], name)
        finally:
            await form.close()
        return body
    if ctype not in ("", "application/json"):
        raise ApiError(415, f"unsupported content type {ctype!r}: send "
                       "application/json or multipart/form-data")
    if not raw:
        raise ApiError(422, "empty request body: send a JSON object")
    try:
        body = json.loads(raw) if len(raw) < 1 << 16 else await server.in_pool(json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    except RecursionError:  # [[[[... 100k deep: json's C parser gives up; a bad body, not a bug
        raise ApiError(400, "the body is not valid JSON (nested too deeply)") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object")
    return body


def _form_value(value: Any, kind: str, name: str) -> Any:
    if isinstance(value, Upload):
        raise ApiError(422, f"{name}: expected a value, got a file", name)
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}[kind](value)
    except ValueError:
        raise ApiError(422, f"{name}: expected {kind}, got {value!r}", name) from None


def require_list(body: dict, name: str, limit: int, limit_flag: str, *, allow_str: bool = False) -> list:
    if name not in body or body[name] is None:
        raise ApiError(422, f"missing field {name!r}", name)
    value = body[name]
    if allow_str and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ApiError(422, f"{name} must be a list" + (" or a string" if allow_str else ""), name)
    if not value:
        raise ApiError(422, f"{name} is an empty list", name)
    if len(value) > limit:
        raise ApiError(422, f"{name} has {len(value)} items, over this server's limit of {limit} "
                       f"({limit_flag})", name)
    return value


def check_text(text: str, param: str) -> None:
    """A request's text, label or template over MAX_TEXT_CHARS: 422, before any tokenizing."""
    try:
        check_text_length(text, param)
    except ValueError as e:
        raise ApiError(422, str(e), param) from None


def check_image_item(item: Any, param: str) -> None:
    """Shape checks that need no decoding (422); decoding failures are 400 later."""
    if isinstance(item, Upload) or (isinstance(item, str) and item):
        return
    if isinstance(item, dict) and "image_url" in item and set(item) <= {"type", "image_url"} \
            and item.get("type", "image_url") == "image_url":  # also OpenAI's content-part shape
        url = item["image_url"]
        if isinstance(url, dict):  # OpenAI's {"image_url": {"url": ...}}
            url = url.get("url")
            item["image_url"] = url
        if isinstance(url, str) and url:
            return
    if isinstance(item, str):
        raise ApiError(422, f"{param} is an empty string", param)
    raise ApiError(422, f"{param}: expected a data:image/ URI string or {{\"image_url\": URL}}", param)


def optional(body: dict, name: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(422, f"{name} has the wrong type ({type(value).__name__})", name)
    return value


# ---- the ASGI guard: auth, body limit, metrics ----

class Guard:
    """Pure ASGI middleware in front of the app: it sees every request, including ones refused
    before routing (401, 413), and counts them."""

    def __init__(self, app, server: Server, public: frozenset[str] = frozenset({"/health"})):
        self.app, self.server = app, server
        self.public = public  # paths answered without the API key
        s = server.settings
        self.key = s.api_key.encode() if s.api_key else None
        self.limit = s.max_request_bytes
        self.drain_cap = max(4 * s.max_request_bytes, 16 << 20)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/images" if path.startswith("/v1/images/") else "other"
        metrics = self.server.metrics
        status = 500
        start = perf_counter()
        metrics.request_started()
        received = 0
        overflow = complete = False

        async def drain() -> None:
            # Read and drop the rest of an oversized body (up to a cap), so the client, still
            # sending, is not cut off by a reset before it can read the 413.
            nonlocal received
            while received <= self.drain_cap:
                msg = await receive()
                if msg["type"] != "http.request":
                    return
                received += len(msg.get("body", b""))
                if not msg.get("more_body"):
                    return

        async def limited_receive():
            nonlocal received, overflow
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    overflow = True
                    raise ApiError(413, f"request body over {self.limit >> 20} MB (--max-request-mb)")
            return msg

        async def send_status(msg):
            nonlocal status, complete
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if overflow:
                    await drain()
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                complete = True

        try:
            headers = dict(scope["headers"])
            if self.key and path not in self.public:
                auth = headers.get(b"authorization", b"")
                scheme, _, token = auth.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                    await _send_error(send_status, ApiError(401, "missing or wrong API key: send "
                                      "Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}))
                    return
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    await _send_error(send_status, ApiError(400, "bad Content-Length header"))
                    return
                if n > self.limit:
                    if n <= self.drain_cap:
                        await drain()
                    await _send_error(send_status, ApiError(
                        413, f"request body of {n} bytes is over {self.limit >> 20} MB (--max-request-mb)"))
                    return
            await self.app(scope, limited_receive, send_status)
        finally:
            # Not complete: cancelled (the client went away, or the graceful timeout ran out).
            metrics.request_done(endpoint, status, perf_counter() - start, complete)


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- the application ----

EMBEDDINGS_SCHEMA = {
    "type": "object", "required": ["input"],
    "properties": {
        "input": {"description": "a text, or a list of texts and images; a string starting with "
                  "data:image/ is an image (base64 data URI), any other string a text",
                  "anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [
                      {"type": "string"},
                      {"type": "object", "properties": {"image_url": {"type": "string"}}}]}}]},
        "model": {"type": "string", "description": "ignored: the server has one model"},
        "normalize": {"type": "boolean", "default": True},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
    },
}
CLASSIFY_SCHEMA = {
    "type": "object", "required": ["images", "labels"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string"}, "description": "data:image/ URIs"},
        "labels": {"type": "array", "items": {"type": "string"}},
        "template": {"type": "string", "default": DEFAULT_TEMPLATE},
        "templates": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer"}, "threshold": {"type": "number"},
    },
}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {
        "texts": {"type": "array", "items": {"type": "string"}},
        "images": {"type": "array", "items": {"type": "string"}, "description": "data:image/ URIs"},
        "rows": {"type": "array", "items": {"type": "integer"},
                 "description": "row ids of the index: search with their stored embeddings"},
        "k": {"type": "integer", "default": 10}, "threshold": {"type": "number"},
        "fold": {"type": "number", "description": "mark hits with cosine >= fold to a better hit "
                 "(duplicate_of: its id)"},
    },
}


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": schema}}}}


def create_app(server: Server) -> Guard:
    s = server.settings

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        yield
        # uvicorn calls this after it stopped listening and every open request was answered; the
        # batcher then finishes what is queued (nothing should be) and the worker stops.
        server.batcher.close()
        # Jobs of requests that uvicorn gave up on are dropped, not run, and fetches still in
        # flight are stopped (their requests' cancellation stopped most already): a URL that
        # trickles would otherwise hold the exit for --url-timeout. A running decode job ends
        # within its bounds (--max-image-pixels).
        server.abort_fetches()
        server.fetch_pool.shutdown(wait=True, cancel_futures=True)
        server.pool.shutdown(wait=True, cancel_futures=True)
        m = server.metrics
        counts = ", ".join(f"{e} {m.answered(e)}" for e in ENDPOINTS[:3] if m.answered(e))
        print(f"siglip-so400m serve: stopped; answered {counts or 'no model requests'}; "
              f"{m.unanswered} unanswered; {m.in_flight} in flight", file=sys.stderr, flush=True)

    app = FastAPI(title="siglip-so400m", lifespan=lifespan,
                  description="SigLIP So400m/14@384: embeddings, zero-shot classification and search, "
                  "batched across requests. Errors: {\"error\": {\"message\", \"type\", \"param\"}}.")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        err = ApiError(e.status_code, str(e.detail), headers=dict(e.headers or {}))
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        # Starlette answers this, then re-raises so uvicorn logs the traceback.
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(ApiError(422, str(e.errors())).body(), 422)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_name, "revision": s.revision, "dtype": s.precision,
                "backend": s.backend,
                "queue_depth": sum(server.batcher.depth().values()),
                "max_queue": server.batcher.max_queue, "search": server.index is not None}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.batcher.depth(), server.batcher.max_queue),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/embeddings", openapi_extra=_body_doc(EMBEDDINGS_SCHEMA))
    async def embeddings(request: Request):
        """OpenAI's embeddings request and response; texts and images in one `input` list."""
        prepared, (normalize, fmt) = await server.read(request, read_embeddings)  # [(kind, tensor, tokens)]
        rows = await server.embed([(kind, x) for kind, x, _ in prepared])
        tokens = sum(t for _, _, t in prepared)
        n_images = sum(kind == "image" for kind, _, _ in prepared)

        def build() -> bytes:
            emb = torch.stack(rows)  # (N, D)
            emb = (F.normalize(emb, dim=-1) if normalize else emb).float()
            data = []
            for i, e in enumerate(emb):
                value = base64.b64encode(e.numpy().astype("<f4").tobytes()).decode() if fmt == "base64" \
                    else e.tolist()
                data.append({"object": "embedding", "index": i, "embedding": value})
            return json.dumps({"object": "list", "data": data, "model": s.model_name,
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                                         "images": n_images}}).encode()

        return Response(await server.in_pool(build), media_type="application/json")

    async def read_embeddings(request: Request, raw: bytes) -> tuple[list, tuple[bool, str]]:
        body = await read_body(request, raw, server, {"input": "list", "model": "str", "normalize": "bool",
                                                 "encoding_format": "str", "dimensions": "int"})
        items = require_list(body, "input", s.max_items, "--max-items", allow_str=True)
        normalize = optional(body, "normalize", bool, True)
        if not normalize and not s.raw_embeddings:
            raise ApiError(422, f"normalize=false: this server runs the {s.backend} graphs (--backend), "
                           "which return L2-normalized embeddings only; send normalize=true, or run the "
                           "server with --backend torch for raw embeddings", "normalize")
        fmt = optional(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise ApiError(422, f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                           "encoding_format")
        dimensions = optional(body, "dimensions", int, None)
        if dimensions is not None and dimensions != server.width:
            # OpenAI's text-embedding-3 models were trained so that a prefix of the vector is an
            # embedding too (Matryoshka); SigLIP was not, and a cut vector would rank at random.
            raise ApiError(422, f"dimensions={dimensions}: this model's embeddings have {server.width} "
                           "dimensions, and SigLIP was not trained for truncated embeddings, so "
                           f"{server.width} (or no dimensions) is the only value accepted", "dimensions")
        jobs = []
        for i, item in enumerate(items):
            param = f"input[{i}]"
            if isinstance(item, str) and not is_image_uri(item):
                if not item.strip():
                    raise ApiError(422, f"{param} is an empty string", param)
                check_text(item, param)
                jobs.append((_text_job, server, item))
            elif isinstance(item, list):
                raise ApiError(422, f"{param}: token ids are not accepted; send the text", param)
            else:
                check_image_item(item, param)
                jobs.append((_image_job, server, item, param))
        return jobs, (normalize, fmt)

    @app.post("/v1/classify", openapi_extra=_body_doc(CLASSIFY_SCHEMA))
    async def classify(request: Request):
        """Zero-shot classification: per image, the labels best first with score (= sigmoid),
        logit and softmax, as `siglip-so400m zero-shot --json` prints them."""
        prepared, (labels, templates, top_k, threshold) = await server.read(request, read_classify)
        # The images take their place in the queue first: if it is full, the answer is 503 before
        # any model work is spent on new labels.
        futures = server.submit([(kind, x) for kind, x, _ in prepared])
        try:
            clf = await server.classifier(labels, templates)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        rows = await collect(futures)

        def build() -> bytes:
            with torch.inference_mode():
                # What ZeroShotClassifier.logits does after encode_image(normalize=True).
                img = F.normalize(torch.stack(rows).to(clf.label_emb.device), dim=-1).float()
                logits = server.model.logits(img, clf.label_emb).float()  # (B, N)
            data = []
            for i, preds in enumerate(clf.scores(logits)):
                if threshold is not None:
                    preds = [p for p in preds if p["sigmoid"] >= threshold]
                if top_k is not None:
                    preds = preds[:top_k]
                data.append({"image": i, "model": s.model_name, "revision": s.revision,
                             "dtype": s.precision, "templates": templates,
                             "predictions": [{"label": p["label"], "score": p["sigmoid"],
                                              "logit": p["logit"], "softmax": p["softmax"]}
                                             for p in preds]})
            return json.dumps({"object": "list", "model": s.model_name, "data": data},
                              ensure_ascii=False).encode()

        return Response(await server.in_pool(build), media_type="application/json")

    async def read_classify(request: Request, raw: bytes
                            ) -> tuple[list, tuple[list[str], list[str], int | None, float | None]]:
        body = await read_body(request, raw, server, {"images": "list", "labels": "list", "template": "str",
                                                 "templates": "list", "top_k": "int", "threshold": "float"})
        images = require_list(body, "images", s.max_items, "--max-items")
        labels = require_list(body, "labels", s.max_labels, "--max-labels")
        if "templates" in body and body["templates"] is not None:
            templates = require_list(body, "templates", MAX_TEMPLATES, f"at most {MAX_TEMPLATES}")
        else:
            templates = [optional(body, "template", str, DEFAULT_TEMPLATE)]
        for i, label in enumerate(labels):
            if not isinstance(label, str) or not label.strip():
                raise ApiError(422, f"labels[{i}] must be a non-empty string", f"labels[{i}]")
            check_text(label, f"labels[{i}]")
        for i, template in enumerate(templates):
            if isinstance(template, str):
                check_text(template, f"templates[{i}]" if "templates" in body else "template")
        try:
            labels = list(dict.fromkeys(labels))  # duplicates merged, as the CLI does
            labels, templates = check_labels(labels), check_templates(templates)
        except (TypeError, ValueError) as e:
            raise ApiError(422, str(e), "templates") from None
        top_k = optional(body, "top_k", int, None)
        if top_k is not None and top_k < 1:
            raise ApiError(422, "top_k must be at least 1", "top_k")
        threshold = optional(body, "threshold", (int, float), None)
        if threshold is not None and not 0 <= threshold <= 1:
            raise ApiError(422, "threshold is a sigmoid probability, between 0 and 1", "threshold")
        for i, item in enumerate(images):
            check_image_item(item, f"images[{i}]")
        jobs = [(_image_job, server, item, f"images[{i}]") for i, item in enumerate(images)]
        return jobs, (labels, templates, top_k, threshold)

    @app.post("/v1/search", openapi_extra=_body_doc(SEARCH_SCHEMA))
    async def search(request: Request):
        """Search the --index: texts scored by SigLIP's sigmoid, images by cosine, as
        `siglip-so400m search` does."""
        if server.index is None:
            raise ApiError(404, "no index: start the server with --index DIR to search")
        prepared, (texts, n_images, index_rows, k, threshold, fold) = await server.read(request, read_search)
        rows = await server.embed([(kind, x) for kind, x, _ in prepared])

        def build() -> bytes:
            # Off the event loop: k hits per query are up to --max-k x --max-items dicts to encode.
            results = server.search(rows, len(texts), k, threshold, index_rows, fold)
            queries = [{"text": t} for t in texts] + [{"image": i} for i in range(n_images)]
            queries += [{"row": r} for r in index_rows]
            data = [{"query": q, "hits": h} for q, h in zip(queries, results, strict=True)]
            return json.dumps({"object": "list", "model": s.model_name, "data": data},
                              ensure_ascii=False, default=str).encode()

        return Response(await server.in_pool(build), media_type="application/json")

    async def read_search(request: Request, raw: bytes
                          ) -> tuple[list, tuple[list[str], int, list[int], int, float | None, float | None]]:
        body = await read_body(request, raw, server, {"texts": "list", "images": "list", "rows": "list",
                                                 "k": "int", "threshold": "float", "fold": "float"})
        texts = body.get("texts") or []
        images = body.get("images") or []
        index_rows = body.get("rows") or []
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(x, list) for x in (texts, images, index_rows)):
            raise ApiError(422, "texts, images and rows must be lists")
        if not texts and not images and not index_rows:
            raise ApiError(422, "give texts, images or rows to search with", "texts")
        n = len(texts) + len(images) + len(index_rows)
        if n > s.max_items:
            raise ApiError(422, f"{n} queries, over this server's limit of {s.max_items} (--max-items)",
                           "texts")
        for i, r in enumerate(index_rows):
            # A multipart form sends numbers as text.
            r = int(r) if isinstance(r, str) and r.isascii() and r.isdigit() and len(r) < 19 else r
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(server.index):
                raise ApiError(422, f"rows[{i}] must be a row id of the index, 0 to "
                               f"{len(server.index) - 1}", f"rows[{i}]")
            index_rows[i] = r
        fold = optional(body, "fold", (int, float), None)
        if fold is not None and not -1 <= fold <= 1:
            raise ApiError(422, "fold is a cosine, between -1 and 1 (e.g. 0.95)", "fold")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ApiError(422, f"texts[{i}] must be a non-empty string", f"texts[{i}]")
            check_text(t, f"texts[{i}]")
        for i, item in enumerate(images):
            check_image_item(item, f"images[{i}]")
        k = optional(body, "k", int, 10)
        if k < 1:
            raise ApiError(422, "k must be at least 1", "k")
        if k > s.max_k:
            raise ApiError(422, f"k={k} is over this server's limit of {s.max_k} hits per query "
                           "(--max-k)", "k")
        threshold = optional(body, "threshold", (int, float), None)
        jobs = [(_text_job, server, t) for t in texts]
        jobs += [(_image_job, server, item, f"images[{i}]") for i, item in enumerate(images)]
        return jobs, (texts, len(images), index_rows, k, threshold, fold)

    public = {"/health"}
    if server.index is not None and s.page:
        from .page import PAGE_FILES, add_page

        add_page(app, server, s.image_cache_bytes)
        public |= set(PAGE_FILES)  # the page's own files hold no data; the key guards what they fetch
    return Guard(app, server, frozenset(public))


def _text_job(server: Server, text: str) -> tuple[str, Tensor, int]:
    ids, used = server.text_ids(text)
    return "text", ids, used


def _image_job(server: Server, item: Any, param: str, aborter: Aborter | None = None
               ) -> tuple[str, Tensor, int]:
    try:
        return "image", server.image_tensor(item, param, aborter), 0
    except Aborted:
        raise ApiError(503, f"{param}: the fetch was stopped (another item failed, or the server is "
                       "stopping)", param) from None


def _is_fetch(job: tuple) -> bool:
    """Whether a job fetches a URL (in the fetch pool), not decodes what the body holds."""
    if job[0] is not _image_job or not isinstance(job[2], dict):
        return False
    url = job[2].get("image_url")
    return isinstance(url, str) and not is_image_uri(url)
