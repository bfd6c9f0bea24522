"""What a request may cost the server, and the one image-format allowlist of every entry point.

Most tests drive the ASGI app in this process (a real Server, Batcher and tiny model, no socket
between client and app), so they can count what the server holds and do it in a fraction of a
second; the ones about the process itself (usage errors, SIGTERM) start `siglip-so400m serve`.
URL tests fetch from HTTP servers on 127.0.0.1 that this file starts.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import ipaddress
import json
import signal
import socket
import struct
import threading
import time
import warnings
import zlib
from typing import ClassVar

import pytest
import torch
from PIL import EpsImagePlugin, Image

import siglip_so400m

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")

from siglip_so400m.serve import app as app_module  # noqa: E402
from siglip_so400m.serve import inputs  # noqa: E402
from siglip_so400m.serve.app import Server, Settings, create_app  # noqa: E402
from siglip_so400m.serve.batcher import Batcher, Metrics, QueueFull  # noqa: E402
from siglip_so400m.serve.inputs import ImageLimits  # noqa: E402
from siglip_so400m.text import MAX_TEXT_CHARS  # noqa: E402

TOL = 1e-5  # float32 on both sides; only the batch a row is computed in differs
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"  # Ghostscript would spin


def encoded(fmt: str, size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def bomb_png(side: int = 40_000) -> bytes:
    """A valid PNG header that claims side x side pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


# ---- the app in this process ----

@pytest.fixture(scope="module")
def api(tiny_ckpt):
    return siglip_so400m.load(tiny_ckpt)  # float32


def make_server(api, *, max_queue: int = 256, start: bool = True, index=None, **settings) -> Server:
    model, processor = api
    metrics = Metrics()
    batcher = Batcher(model, max_batch=8, max_wait_s=0.002, max_queue=max_queue, metrics=metrics)
    server = Server(model, processor, Settings(model_name="tiny", revision=None, precision="float32",
                                               **settings), batcher, metrics, index)
    if start:
        batcher.start()
    return server


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        return json.loads(self.content)


async def post(app, path: str, body: dict | None = None, content: bytes | None = None,
               consumed: list | None = None) -> Reply:
    """One POST through the ASGI app, as uvicorn would make it; `consumed` gets an entry when the
    app has taken the request's body."""
    content = json.dumps(body).encode() if content is None else content
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(content)).encode())]}
    sent, given = False, asyncio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            if consumed is not None:
                consumed.append(path)
            return {"type": "http.request", "body": content, "more_body": False}
        await given.wait()  # no disconnect
        return {"type": "http.disconnect"}

    return await _answer(app, scope, receive)


async def _answer(app, scope: dict, receive) -> Reply:
    """Run the ASGI app on one request and collect its answer."""
    out = {"status": None, "headers": {}, "body": b""}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in msg["headers"]}
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    await app(scope, receive, send)
    return Reply(out["status"], out["headers"], out["body"])


async def stalled_post(app, path: str, sent: bytes = b"{") -> Reply:
    """A POST that announces Content-Length: 100, sends `sent` and then nothing, as a slow or
    hostile client does, until the server answers (or the test cancels it)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50001),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")]}
    first, never = True, asyncio.Event()

    async def receive():
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": sent, "more_body": True}
        await never.wait()

    return await _answer(app, scope, receive)


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def error(resp: Reply, status: int, param: str | None = None, *says: str) -> str:
    assert resp.status_code == status, (resp.status_code, resp.content[:500])
    err = resp.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    for s in says:
        assert s in err["message"], err
    return err["message"]


@torch.inference_mode()
def api_image(api, data: bytes) -> torch.Tensor:
    model, processor = api
    return model.encode_image(processor.images([Image.open(io.BytesIO(data))]), normalize=True)


def embedding(resp: Reply) -> torch.Tensor:
    assert resp.status_code == 200, resp.content[:500]
    return torch.tensor([d["embedding"] for d in resp.json()["data"]])


# ---- OpenAI's dimensions ----

def test_dimensions_other_than_the_model_width_is_422_saying_siglip_was_not_trained_to_truncate(api):
    server = make_server(api)
    app = create_app(server)
    width = api[0].config.text_config.projection_size

    async def go():
        for bad in (32, width - 1, width + 1):
            msg = error(await post(app, "/v1/embeddings", {"input": "a cat", "dimensions": bad}), 422,
                        "dimensions", f"dimensions={bad}", str(width))
            assert "not trained for truncated" in msg
        full = await post(app, "/v1/embeddings", {"input": "a cat", "dimensions": width})
        assert len(embedding(full)[0]) == width

    try:
        run(go())
    finally:
        server.batcher.close()


# ---- one image-format allowlist ----

def test_pcx_and_eps_are_refused_by_the_server_with_415_naming_the_format_and_no_ghostscript(
        api, monkeypatch):
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    server = make_server(api)
    app = create_app(server)

    async def go():
        for data, fmt in [(encoded("PCX"), "PCX"), (EPS, "EPS")]:
            msg = error(await post(app, "/v1/embeddings", {"input": [data_uri(data)]}), 415, "input[0]",
                        f"{fmt} images are not accepted", "JPEG, PNG, WEBP, GIF, BMP, TIFF")
            assert msg.startswith("input[0]: ")
            body = {"images": [data_uri(data)], "labels": ["a cat"]}
            error(await post(app, "/v1/classify", body), 415, "images[0]", fmt)
        for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):  # the allowed ones still decode
            data = encoded(fmt)
            got = embedding(await post(app, "/v1/embeddings", {"input": [data_uri(data)]}))
            torch.testing.assert_close(got, api_image(api, data), atol=TOL, rtol=0)

    try:
        run(go())
    finally:
        server.batcher.close()
    assert ran == []


def test_pcx_is_refused_by_name_by_embed_zero_shot_and_the_fine_tuning_dataset(tiny_ckpt, api, tmp_path,
                                                                              capsys):
    pa = pytest.importorskip("pyarrow.parquet", reason="embed needs the [search] extra")
    pcx, png = tmp_path / "x.pcx", tmp_path / "y.png"
    pcx.write_bytes(encoded("PCX"))
    png.write_bytes(encoded("PNG"))
    why = f"{pcx}: PCX images are not accepted"

    # zero-shot (the CLI): the image is reported by name, the other classified
    from siglip_so400m.zeroshot import zero_shot_main

    code = zero_shot_main([str(pcx), str(png), "--labels", "a cat", "--model", str(tiny_ckpt), "--json",
                           "--no-cache", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 1 and f"error: {why}" in err
    assert "predictions" in json.loads(out)[1]

    # embed: a list of paths; the PCX is an error row naming the format
    listing = tmp_path / "list.txt"
    listing.write_text(f"{pcx}\n{png}\n")
    manifest = siglip_so400m.embed(listing, tmp_path / "emb", model=str(tiny_ckpt), dtype="float32",
                                   workers=0)
    assert manifest["counts"]["images"] == 1 and manifest["counts"]["errors"] == 1
    errors = [r for f in sorted((tmp_path / "emb" / "errors").glob("*.parquet"))
              for r in pa.read_table(f).to_pylist()]
    assert len(errors) == 1 and why in errors[0]["error"]

    # fine-tuning data: the pair is skipped with the reason, the next one taken
    from siglip_so400m.data import ImageTextDataset

    pixels, _, bad = ImageTextDataset([(pcx, "a cat"), (png, "a dog")], api[1])[0]
    assert len(bad) == 1 and why in bad[0]
    torch.testing.assert_close(pixels, api[1].images([str(png)])[0], atol=0, rtol=0)


# ---- /v1/search k ----

@pytest.fixture(scope="module")
def index(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("pyarrow", reason="search needs the [search] extra")
    pytest.importorskip("faiss", reason="search needs the [search] extra")
    from siglip_so400m.search import Index

    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        (folder / f"{i}.png").write_bytes(encoded("PNG", seed=i))
    out = tmp_path_factory.mktemp("collection") / "emb"
    siglip_so400m.embed(str(folder), out, model=str(tiny_ckpt), dtype="float32", workers=0)
    return Index.load(out)


def test_search_k_over_max_k_is_422_naming_k_and_responses_are_built_off_the_event_loop(
        api, index, monkeypatch):
    server = make_server(api, index=index, max_k=5)
    app = create_app(server)
    threads = []
    dumps = json.dumps

    def recording_dumps(obj, *a, **k):
        text = dumps(obj, *a, **k)
        if '"hits"' in text:
            threads.append(threading.current_thread().name)
        return text

    monkeypatch.setattr(app_module.json, "dumps", recording_dumps)

    async def go():
        error(await post(app, "/v1/search", {"texts": ["a cat"], "k": 6}), 422, "k", "k=6", "--max-k")
        error(await post(app, "/v1/search", {"texts": ["a cat"], "k": 10**9}), 422, "k", "--max-k")
        ok = await post(app, "/v1/search", {"texts": ["a cat"], "k": 5})
        assert ok.status_code == 200 and len(ok.json()["data"][0]["hits"]) == 5

    try:
        run(go())
    finally:
        server.batcher.close()
    assert threads and all(t.startswith("siglip-decode") for t in threads), threads


# ---- text length, and the truncation warning ----

def test_texts_labels_and_templates_over_the_limit_are_422_before_tokenizing(api, index, monkeypatch):
    server = make_server(api, index=index)
    app = create_app(server)
    seen = []
    tok = api[1].tokenizer
    for name in ("_ids", "encode"):
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda t, real=real: seen.append(len(t)) or real(t))
    long = "cat " * (MAX_TEXT_CHARS // 4) + "!"  # MAX_TEXT_CHARS + 1 characters
    ok = "x" * MAX_TEXT_CHARS
    img = data_uri(encoded("PNG"))
    says = f"over the limit of {MAX_TEXT_CHARS}"

    async def go():
        error(await post(app, "/v1/embeddings", {"input": ["a", long]}), 422, "input[1]", says)
        error(await post(app, "/v1/classify", {"images": [img], "labels": ["a", long]}), 422, "labels[1]",
              says)
        error(await post(app, "/v1/classify", {"images": [img], "labels": ["a"], "template": long + "{}"}),
              422, "template", says)
        body = {"images": [img], "labels": ["a"], "templates": ["{}", "a {}" + long]}
        error(await post(app, "/v1/classify", body), 422, "templates[1]", says)
        error(await post(app, "/v1/search", {"texts": [long]}), 422, "texts[0]", says)
        assert seen == []  # refused before any tokenizing
        assert (await post(app, "/v1/embeddings", {"input": [ok]})).status_code == 200  # the limit itself

    try:
        run(go())
    finally:
        server.batcher.close()


def test_a_template_with_a_format_spec_is_422_before_any_label_is_formatted(api, monkeypatch):
    """`{:>40000000}` is 12 characters that expand every label to 40 MB on the model thread; only a
    bare {} is accepted, checked by its shape. The specs here expand just past MAX_TEXT_CHARS, so the
    old check (which formatted them) would have let them through without hurting the test."""
    from siglip_so400m import zeroshot

    made = []
    real = app_module.ZeroShotClassifier
    monkeypatch.setattr(app_module, "ZeroShotClassifier", lambda *a, **k: made.append(a) or real(*a, **k))
    server = make_server(api)
    app = create_app(server)
    img = data_uri(encoded("PNG"))
    wide = "{:>" + str(MAX_TEXT_CHARS + 1) + "}"
    bad = [wide, "a photo of {:^5000}.", "{0:>5000}", "{!r:>5000}", "{label}", "{}{}", "{", "} {}"]

    async def go():
        for t in bad:
            error(await post(app, "/v1/classify", {"images": [img], "labels": ["a cat"], "template": t}),
                  422, "templates", "one {}", "no format spec")
            error(await post(app, "/v1/classify", {"images": [img], "labels": ["a cat"],
                                                   "templates": ["a photo of {}.", t]}), 422, "templates")
        assert made == []  # refused before any label was embedded
        for ok in ("{}", "a photo of {}.", "{{braces}} and {}"):
            resp = await post(app, "/v1/classify", {"images": [img], "labels": ["a cat"], "template": ok})
            assert resp.status_code == 200, resp.content[:300]

    try:
        run(go())
    finally:
        server.batcher.close()
    for t in bad:  # the zero-shot API and CLI share the check
        with pytest.raises(ValueError, match="one {}"):
            zeroshot.check_templates([t])


def test_zero_shot_cli_refuses_an_overlong_label_or_template_with_a_usage_error(tiny_ckpt, tmp_path, capsys):
    from siglip_so400m.zeroshot import zero_shot_main

    png = tmp_path / "y.png"
    png.write_bytes(encoded("PNG"))
    for extra in (["--labels", "x" * (MAX_TEXT_CHARS + 1)],
                  ["--labels", "a cat", "--template", "{} " + "y" * MAX_TEXT_CHARS]):
        with pytest.raises(SystemExit) as e:
            zero_shot_main([str(png), "--model", str(tiny_ckpt), "--no-cache", *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"over the limit of {MAX_TEXT_CHARS}" in err
        assert len(err) < 2000  # the label is not repeated whole


def test_truncation_is_warned_once_per_process_shortened(api, monkeypatch):
    import siglip_so400m.text
    from siglip_so400m.zeroshot import embed_labels

    monkeypatch.setattr(siglip_so400m.text, "_truncation_warned", threading.Event())
    model, processor = api
    labels = [f"label {i} " + "word " * 200 for i in range(20)]  # each over 64 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as the CLI shows them: nothing deduplicated by the filter
        embed_labels(model, processor.tokenizer, labels, ["{}"])
        embed_labels(model, processor.tokenizer, labels[:5], ["a photo of {}", "{}"])
    truncations = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(truncations) == 1, truncations
    assert len(truncations[0]) < 200 and labels[0] not in truncations[0]
    assert "over 64 tokens" in truncations[0] and "label 0" in truncations[0]


# ---- /v1/classify: capacity before model work, and a bounded call queue ----

def test_classify_with_a_full_queue_is_503_before_embedding_new_labels(api, monkeypatch):
    made = []
    real = app_module.ZeroShotClassifier
    monkeypatch.setattr(app_module, "ZeroShotClassifier", lambda *a, **k: made.append(a) or real(*a, **k))
    server = make_server(api, max_queue=2, start=False)  # a worker that takes nothing: the queue stays full
    server.batcher.submit([("text", torch.zeros(64, dtype=torch.long))] * 2)
    app = create_app(server)
    body = {"images": [data_uri(encoded("PNG"))], "labels": ["a brand new label"]}
    resp = run(post(app, "/v1/classify", body), timeout=10)
    error(resp, 503, None, "queue is full")
    assert resp.headers["retry-after"] == "1"
    view = server.labels.view(server.precision, ["This is a photo of {}."], body["labels"])
    assert made == [] and view.get() == {}


def test_batcher_call_queue_is_bounded():
    model = torch.nn.Linear(1, 1)
    batcher = Batcher(model, max_batch=1, max_wait_s=0, max_queue=4, metrics=Metrics(), max_calls=3)
    futures = [batcher.call(lambda: 1) for _ in range(3)]  # not started: they wait
    with pytest.raises(QueueFull, match="3 requests waiting"):
        batcher.call(lambda: 1)
    batcher.start()
    assert [f.result(5) for f in futures] == [1, 1, 1]
    assert batcher.call(lambda: 2).result(5) == 2  # room again
    batcher.close()


def test_retry_after_comes_from_the_settings(api):
    server = make_server(api, retry_after_s=7)
    server.batcher.close()  # shutting down: every new model request is a 503
    app = create_app(server)
    body = {"images": [data_uri(encoded("PNG"))], "labels": ["a label never seen"]}
    resp = run(post(app, "/v1/classify", body))
    error(resp, 503, None, "shutting down")
    assert resp.headers["retry-after"] == "7"


# ---- memory under concurrency: bodies received, parsed and decoded at once ----

def test_concurrent_bodies_hold_at_most_their_byte_budget_and_decode_max_concurrent_bodies(api, monkeypatch):
    """16 requests at once, with decoding held: max_bodies of them decode, and the bodies the
    server holds stay within max_bodies x max_request_bytes bytes; the others wait with at most the
    chunk in hand (here a whole body: uvicorn's are at most 64 KiB). Released, every one is answered."""
    big = data_uri(encoded("PNG", (256, 256)))  # ~200 KB of base64 per body
    size = len(json.dumps({"input": [big]}))
    server = make_server(api, max_bodies=2, decode_threads=4, max_request_bytes=2 * size)  # 4 bodies' budget
    app = create_app(server)
    release, decoding = threading.Event(), []
    real = server.image_tensor

    def held(item, param, *args):
        decoding.append(param)
        release.wait(20)
        return real(item, param, *args)

    monkeypatch.setattr(server, "image_tensor", held)
    consumed: list[str] = []

    async def go():
        tasks = [asyncio.create_task(post(app, "/v1/embeddings", {"input": [big]}, consumed=consumed))
                 for _ in range(16)]
        while len(decoding) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # time for more bodies to be taken, if anything would take them
        budget = server.body_bytes
        held_bodies, held_bytes, decoders = len(consumed), budget.capacity - budget.free, len(decoding)
        release.set()
        replies = await asyncio.gather(*tasks)
        return held_bodies, held_bytes, decoders, replies

    try:
        held_bodies, held_bytes, decoders, replies = run(go())
    finally:
        release.set()
        server.batcher.close()
    assert decoders == 2, decoders
    assert held_bytes == 4 * size, (held_bytes, held_bodies)  # the budget, full
    assert [r.status_code for r in replies] == [200] * 16 and len(consumed) == 16
    assert server.body_bytes.free == server.body_bytes.capacity  # every byte given back


def test_stalled_uploads_hold_no_slot_good_requests_need_and_end_with_408_at_body_timeout(api, index):
    """Twice --max-concurrent-bodies connections that send one byte of a 100-byte body and stall,
    on every POST endpoint: a good request is still answered at once (the stalled ones hold one
    byte each, not a slot), and each stalled one gets 408 at --body-timeout."""
    server = make_server(api, index=index, max_bodies=2, body_timeout_s=4.0)
    app = create_app(server)
    img = data_uri(encoded("PNG"))

    async def go():
        paths = ["/v1/embeddings", "/v1/classify", "/v1/search", "/v1/embeddings"]
        start = time.monotonic()
        stalled = [asyncio.create_task(stalled_post(app, p)) for p in paths]
        await asyncio.sleep(0.2)  # every stalled request is in, holding what it holds
        good = [await asyncio.wait_for(post(app, "/v1/embeddings", {"input": ["a cat"]}), 30),
                await asyncio.wait_for(post(app, "/v1/classify", {"images": [img], "labels": ["a"]}), 30),
                await asyncio.wait_for(post(app, "/v1/search", {"texts": ["a cat"], "k": 2}), 30)]
        pending = sum(not t.done() for t in stalled)  # the good ones did not wait for the deadline
        replies = await asyncio.gather(*stalled)
        return good, pending, replies, time.monotonic() - start

    try:
        good, pending, replies, took = run(go(), timeout=60)
    finally:
        server.batcher.close()
    assert [r.status_code for r in good] == [200] * 3, [r.content[:200] for r in good]
    assert pending == 4
    for r in replies:
        error(r, 408, None, "did not arrive within 4 s", "--body-timeout")
    assert 4 <= took < 30, took  # the deadline, not the clients, ended them
    assert server.body_bytes.free == server.body_bytes.capacity


# ---- untrusted JSON and images ----

def test_deeply_nested_json_is_400_not_500(api):
    server = make_server(api)
    app = create_app(server)

    async def go():
        for depth in (100_000, 20_000):  # parsed in the pool, and on the event loop (under 64 KiB)
            error(await post(app, "/v1/embeddings", content=b"[" * depth), 400, None, "not valid JSON")

    try:
        run(go())
    finally:
        server.batcher.close()


def test_bomb_refusal_quotes_max_image_pixels_not_pils_limit(api):
    server = make_server(api, image_limits=ImageLimits(max_pixels=1_000_000))
    app = create_app(server)

    async def go():
        for side in (40_000, 1_001):  # past PIL's own limit, and past ours only
            msg = error(await post(app, "/v1/embeddings", {"input": [data_uri(bomb_png(side))]}), 400,
                        "input[0]", "decompression bomb", "over 1000000 pixels", "--max-image-pixels")
            assert str(Image.MAX_IMAGE_PIXELS) not in msg and str(2 * Image.MAX_IMAGE_PIXELS) not in msg

    try:
        run(go())
    finally:
        server.batcher.close()


# ---- URLs: a total deadline, HTTP errors, and no private addresses ----

class _Handler(http.server.BaseHTTPRequestHandler):
    """/img: an image; /trickle: a body one byte per 0.1 s; /slowhead: headers the same way;
    /garbage: not HTTP at all; /redirect?to=URL."""

    image = encoded("JPEG", (32, 24))
    hits: ClassVar[list[str]] = []
    cut = 0  # trickles the fetcher hung up on

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/img":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/trickle", "/slowhead"):
            if self.path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                data = b"x" * 1000
            else:
                data = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"y" * 1000
            try:
                for b in data:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                type(self).cut += 1  # the fetcher hung up, as it should
        elif self.path == "/garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")


@pytest.fixture
def www():
    _Handler.hits, _Handler.cut = [], 0
    servers = []
    for host in ("127.0.0.1", "127.0.0.2"):
        try:
            srv = http.server.ThreadingHTTPServer((host, 0 if not servers else servers[0].server_port),
                                                  _Handler)
        except OSError:
            pytest.skip(f"cannot listen on {host}")
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def url_server(api, settings: dict | None = None, **limits) -> Server:
    return make_server(api, image_limits=ImageLimits(max_pixels=40_000_000, allow_urls=True, **limits),
                       **(settings or {}))


def test_url_reads_have_a_total_deadline_and_non_http_replies_are_400(api, www):
    server = url_server(api, url_timeout_s=1.0, allow_private_urls=True)
    app = create_app(server)

    async def go():
        for path in ("/trickle", "/slowhead"):  # never 1 s without a byte: only a total bound stops them
            start = time.monotonic()
            error(await post(app, "/v1/embeddings", {"input": [{"image_url": www[0] + path}]}), 400,
                  "input[0]", "took over 1.0 s", "--url-timeout")
            assert time.monotonic() - start < 2.0
        error(await post(app, "/v1/embeddings", {"input": [{"image_url": www[0] + "/garbage"}]}), 400,
              "input[0]", "not an HTTP reply")

    try:
        run(go())
    finally:
        server.batcher.close()


def test_urls_to_loopback_are_refused_without_allow_private_urls_and_fetched_with_it(api, www):
    image_url = www[0] + "/img"
    refused, allowed = url_server(api), url_server(api, allow_private_urls=True)

    async def go():
        for url in (image_url, image_url.replace("127.0.0.1", "localhost"),
                    f"http://[::ffff:127.0.0.1]:{image_url.rsplit(':', 1)[1]}"):
            error(await post(create_app(refused), "/v1/embeddings", {"input": [{"image_url": url}]}), 400,
                  "input[0]", "loopback address", "--allow-private-urls")
        assert _Handler.hits == []  # not one request reached the host
        body = {"input": [{"image_url": image_url}]}
        got = embedding(await post(create_app(allowed), "/v1/embeddings", body))
        torch.testing.assert_close(got, api_image(api, _Handler.image), atol=TOL, rtol=0)

    try:
        run(go())
    finally:
        refused.batcher.close()
        allowed.batcher.close()
    for addr in ("169.254.169.254", "10.0.0.1", "192.168.1.1", "0.0.0.0", "240.0.0.1", "100.64.0.1",
                 "fe80::1", "::1"):
        assert inputs.address_refusal(ipaddress.ip_address(addr)) is not None, addr
    assert inputs.address_refusal(ipaddress.ip_address("93.184.216.34")) is None


def test_a_text_never_waits_behind_url_fetches(api, www):
    """One request with 8 URLs that trickle for 100 s takes the only decode thread's place in the
    old design and its body slot; URLs have their own pool now, and a request fetches outside the
    slots that texts need. The text is answered while the URLs are still being fetched."""
    server = url_server(api, {"decode_threads": 1, "max_bodies": 1}, url_timeout_s=20.0,
                        allow_private_urls=True)
    app = create_app(server)

    async def go():
        slow = asyncio.create_task(post(app, "/v1/embeddings",
                                        {"input": [{"image_url": www[0] + "/trickle"}] * 8}))
        while _Handler.hits.count("/trickle") < 2:  # fetches under way
            await asyncio.sleep(0.01)
        text = await asyncio.wait_for(post(app, "/v1/embeddings", {"input": ["a cat"]}), 15)
        still_fetching = not slow.done()
        slow.cancel()
        return text, still_fetching

    try:
        text, still_fetching = run(go(), timeout=60)
    finally:
        server.batcher.close()
        server.fetch_pool.shutdown(wait=False, cancel_futures=True)
    assert text.status_code == 200 and still_fetching


def test_a_requests_first_failed_fetch_stops_its_other_fetches(api, www):
    """Three URLs that would trickle for 100 s and one that fails at once: the answer is the failure,
    at once, not after --url-timeout; the trickling fetches are stopped (their connections shut), and
    the fetch threads are free again."""
    server = url_server(api, {"url_threads": 4}, url_timeout_s=20.0, allow_private_urls=True)
    app = create_app(server)
    body = {"input": [{"image_url": www[0] + "/trickle"}] * 3 + [{"image_url": www[0] + "/garbage"}]}

    async def go():
        start = time.monotonic()
        first = await post(app, "/v1/embeddings", body)
        took = time.monotonic() - start
        # Every fetch thread free again: four good fetches are answered without waiting.
        again = await asyncio.wait_for(post(app, "/v1/embeddings",
                                            {"input": [{"image_url": www[0] + "/img"}] * 4}), 15)
        return first, took, again

    try:
        first, took, again = run(go(), timeout=60)
    finally:
        server.batcher.close()
    error(first, 400, "input[3]", "not an HTTP reply")
    assert took < 10, took  # not the 20 s of --url-timeout
    assert again.status_code == 200
    cut_by = time.monotonic() + 10  # the host notices at its next write, 0.1 s later
    while _Handler.cut < _Handler.hits.count("/trickle") and time.monotonic() < cut_by:
        time.sleep(0.05)
    # Each trickle that had started was cut off (one not started yet never starts).
    assert _Handler.cut == _Handler.hits.count("/trickle") >= 1, (_Handler.cut, _Handler.hits)


def test_sigterm_is_bounded_by_the_graceful_timeout_with_a_url_fetch_in_flight(tiny_ckpt, tmp_path, www):
    """A URL that trickles for 100 s, fetched with --url-timeout 30, and SIGTERM with
    --graceful-timeout 2: the request had its 2 s, then its fetch is stopped and the server exits
    (it used to wait for the fetch's own deadline, 29 s, past an orchestrator's 30 s kill)."""
    from test_serve import Served

    s = Served(tiny_ckpt, tmp_path / "log.txt", "--allow-urls", "--allow-private-urls", "--url-timeout",
               "30", "--graceful-timeout", "2")
    replies: list = []

    def client() -> None:
        try:
            replies.append(httpx.post(f"{s.url}/v1/embeddings", timeout=60,
                                      json={"input": [{"image_url": www[0] + "/trickle"}]}).status_code)
        except httpx.HTTPError as e:
            replies.append(type(e).__name__)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        by = time.monotonic() + 30
        while "/trickle" not in _Handler.hits and time.monotonic() < by:
            time.sleep(0.05)
        assert "/trickle" in _Handler.hits, s.log()
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(60)
        took = time.monotonic() - start
    finally:
        s.stop()
        thread.join(60)
    assert took < 10, (took, s.log())  # 2 s of grace and margins, not the fetch's 30 s
    assert rc == 0, s.log()
    assert replies and replies[0] != 200, replies  # the request was given up, not answered


def test_ipv6_spellings_of_private_ipv4_and_site_local_addresses_are_refused():
    """6to4 (2002::/16) and Teredo (2001::/32, the client's IPv4 stored bit-inverted) reach the IPv4
    they embed through a relay; Python 3.11 calls 2002:7f00:1:: global. fec0::/10 is site-local."""
    refused = {
        "fec0::1": "site-local", "fec0:1234::5": "site-local", "feff::1": "site-local",
        "2002:7f00:1::": "embeds 127.0.0.1, a loopback",
        "2002:a9fe:a9fe::": "embeds 169.254.169.254, a link-local",
        "2002:a00:1::1": "embeds 10.0.0.1, a private", "2002:c0a8:101::": "embeds 192.168.1.1, a private",
        "2002:6440:1::": "embeds 100.64.0.1, not a public",
        # Teredo: server 65.54.227.120, client ~0x80fffffe = 127.0.0.1 and ~0xf5fefefe = 10.1.1.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe": "127.0.0.1",
        "2001:0:4136:e378:8000:63bf:f5fe:fefe": "10.1.1.1",
        "::ffff:169.254.169.254": "link-local", "::127.0.0.1": "", "::a00:1": "",
        "64:ff9b::7f00:1": "",
    }
    for addr, says in refused.items():
        why = inputs.address_refusal(ipaddress.ip_address(addr))
        assert why is not None and says in why, (addr, why)
    for addr in ("2002:5db8:d822::1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"):
        assert inputs.address_refusal(ipaddress.ip_address(addr)) is None, addr


def test_name_resolution_is_bounded_by_the_url_timeout(api, monkeypatch):
    """A name server that never answers: getaddrinfo cannot be interrupted, so the fetch stops
    waiting for it at --url-timeout and answers 400."""
    answer = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *a, **k):
        if host == "hangs.test":
            answer.wait(30)
            raise socket.gaierror("no answer")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    server = url_server(api, url_timeout_s=0.5)
    app = create_app(server)

    async def go():
        start = time.monotonic()
        error(await post(app, "/v1/embeddings", {"input": [{"image_url": "http://hangs.test/a.png"}]}), 400,
              "input[0]", "took over 0.5 s", "--url-timeout")
        return time.monotonic() - start

    try:
        took = run(go(), timeout=60)
    finally:
        answer.set()
        server.batcher.close()
    assert took < 5, took  # 0.5 s and its margins, not the resolver's 30 s


def test_every_redirect_is_checked_and_the_connection_is_pinned_to_the_checked_address(api, www, monkeypatch):
    """Here 127.0.0.1 plays a public host and 127.0.0.2 a private one."""
    monkeypatch.setattr(inputs, "address_refusal",
                        lambda ip: None if str(ip) == "127.0.0.1" else "a private address")
    server = url_server(api)
    app = create_app(server)
    port = www[0].rsplit(":", 1)[1]
    lookups = []
    real = socket.getaddrinfo

    def rebinding(host, *a, **k):  # a DNS server that answers the check and the connect differently
        if host == "rebind.test":
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)

    async def go():
        to_private = f"{www[0]}/redirect?to={www[1]}/img"
        error(await post(app, "/v1/embeddings", {"input": [{"image_url": to_private}]}), 400, "input[0]",
              "127.0.0.2 is a private address")
        assert _Handler.hits == ["/redirect?to=" + www[1] + "/img"]  # the private host never asked
        got = embedding(await post(app, "/v1/embeddings",
                                   {"input": [{"image_url": f"http://rebind.test:{port}/img"}]}))
        torch.testing.assert_close(got, api_image(api, _Handler.image), atol=TOL, rtol=0)
        assert lookups == ["rebind.test"]  # resolved once: the connection used the checked address

    try:
        run(go())
    finally:
        server.batcher.close()


# ---- usage errors ----

def test_serve_with_a_bad_port_is_a_one_line_usage_error(tiny_ckpt, capsys):
    from siglip_so400m.serve import serve_main

    for port in ("99999", "-1", "http"):
        with pytest.raises(SystemExit) as e:
            serve_main(["--model", str(tiny_ckpt), "--port", port])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert "--port" in err and port in err and "0-65535" in err
