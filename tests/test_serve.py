"""The HTTP server (`siglip-so400m serve`): every test talks real HTTP over 127.0.0.1 to a server
process it starts and stops, on the tiny checkpoint.

Parity is with the Python API in this process (itself proven equal to transformers elsewhere);
the rest is behaviour: bad input, limits, load across 64 clients, overload, SIGTERM and auth.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import siglip_so400m

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra")

TOL = 1e-5  # float32 on both sides; only the batch a row is computed in differs
LABELS = ["a red square", "a blue square", "a cat", "noise"]
KEY = "correct horse battery staple"


# ---- the optional extra ----

def test_import_pulls_in_no_server_dependency():
    code = ("import sys, siglip_so400m, siglip_so400m.serve, siglip_so400m.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'multipart') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_the_extra_one_message_names_it(monkeypatch, capsys, tiny_ckpt):
    from siglip_so400m.serve import serve_main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert serve_main(["--model", str(tiny_ckpt)]) == 1
    err = capsys.readouterr().err
    assert "uvicorn is missing" in err and "pip install 'siglip_so400m[serve]'" in err


# ---- a server process, started and stopped by the test ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m siglip_so400m serve ...` on a free port; waits until /health answers."""

    def __init__(self, ckpt: Path, log: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "siglip_so400m", "serve", "--model", str(ckpt), "--port",
               str(self.port), "--dtype", "float32", "--log-level", "warning", *args]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not answer /health within 90 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def api(tiny_ckpt):
    return siglip_so400m.load(tiny_ckpt)  # float32, as the servers here run


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    """The shared server: small limits, so the limit tests need no big bodies."""
    s = Served(tiny_ckpt, tmp_path_factory.mktemp("serve") / "log.txt", "--max-request-mb", "1",
               "--max-items", "8", "--max-labels", "8", "--max-wait-ms", "20", "--max-queue", "1024")
    yield s
    assert s.stop() == 0, s.log()


# ---- inputs ----

def image_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "PNG",
                exif_orientation: int | None = None) -> bytes:
    g = torch.Generator().manual_seed(seed)
    h, w = size[1], size[0]
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    kw = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(buf, fmt, **kw)
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


IMAGES = {  # name -> encoded bytes, of several formats, modes and sizes
    "rgb.png": image_bytes(1),
    "gray.png": image_bytes(2, (50, 50), "L"),
    "rgba.png": image_bytes(3, (33, 61), "RGBA"),
    "photo.jpg": image_bytes(4, (64, 48), fmt="JPEG"),
    "rotated.jpg": image_bytes(5, (64, 40), fmt="JPEG", exif_orientation=6),
    "big.png": image_bytes(6, (300, 200)),
}
TEXTS = ["a photo of a cat", "A RED Square!", "/etc/passwd", "x" * 500, "ünïcödé 猫"]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    for name, data in IMAGES.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in IMAGES}


@torch.inference_mode()
def api_image(api, paths: list[Path], normalize: bool = True) -> torch.Tensor:
    model, processor = api
    return model.encode_image(processor.images([str(p) for p in paths]), normalize=normalize)


@torch.inference_mode()
def api_text(api, texts: list[str], normalize: bool = True) -> torch.Tensor:
    model, processor = api
    return model.encode_text(processor.texts(texts), normalize=normalize)


def embeddings(resp: httpx.Response) -> torch.Tensor:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return torch.tensor([d["embedding"] for d in data])


def error(resp: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param"}
    if param is not None:
        assert err["param"] == param, err
    assert says in err["message"], err
    return err


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metrics(url: str, headers: dict | None = None) -> dict[str, float]:
    resp = httpx.get(f"{url}/metrics", headers=headers)
    assert resp.status_code == 200
    return metric_values(resp.text)


def answered(m: dict[str, float], endpoint: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(f'siglip_requests_total{{endpoint="{endpoint}"'))


# ---- parity with the Python API ----

def test_embeddings_match_python_api(server, api, image_files):
    names = list(IMAGES)
    inputs = [TEXTS[0], data_uri(IMAGES[names[0]]), *TEXTS[1:], *(data_uri(IMAGES[n]) for n in names[1:])]
    expected = torch.cat([api_text(api, TEXTS[:1]), api_image(api, [image_files[names[0]]]),
                          api_text(api, TEXTS[1:]), api_image(api, [image_files[n] for n in names[1:]])])
    for chunk in range(0, len(inputs), 8):  # --max-items 8
        resp = httpx.post(f"{server.url}/v1/embeddings", json={"input": inputs[chunk : chunk + 8],
                                                                 "model": "ignored"})
        got = embeddings(resp)
        torch.testing.assert_close(got, expected[chunk : chunk + 8], atol=TOL, rtol=0)
        body = resp.json()
        assert body["object"] == "list" and body["model"] == str(server_model(server))
        assert all(d["object"] == "embedding" for d in body["data"])
        n_images = sum(s.startswith("data:image/") for s in inputs[chunk : chunk + 8])
        assert body["usage"]["images"] == n_images
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"]
        assert (body["usage"]["prompt_tokens"] > 0) == (n_images < len(got))


def server_model(server) -> str:
    return httpx.get(f"{server.url}/health").json()["model"]


def test_embeddings_raw_single_string_and_base64(server, api, image_files):
    resp = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS[0], "normalize": False})
    raw = api_text(api, TEXTS[:1], normalize=False)
    torch.testing.assert_close(embeddings(resp), raw, atol=TOL, rtol=0)
    assert embeddings(resp).norm() != pytest.approx(1.0, abs=1e-3)  # raw really is raw
    resp = httpx.post(f"{server.url}/v1/embeddings", json={"input": [data_uri(IMAGES["rgb.png"])],
                                                             "normalize": False, "encoding_format": "base64"})
    assert resp.status_code == 200, resp.text
    b64 = resp.json()["data"][0]["embedding"]
    got = torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.float32)
    torch.testing.assert_close(got[None], api_image(api, [image_files["rgb.png"]], normalize=False),
                               atol=TOL, rtol=0)


def test_multipart_uploads_match_data_uris(server, api, image_files):
    files = [("input", ("a.jpg", IMAGES["photo.jpg"], "image/jpeg")), ("input", (None, TEXTS[1])),
             ("input", ("b.png", IMAGES["rgba.png"], "image/png"))]
    got = embeddings(httpx.post(f"{server.url}/v1/embeddings", files=files, data={"normalize": "true"}))
    expected = torch.cat([api_image(api, [image_files["photo.jpg"]]), api_text(api, TEXTS[1:2]),
                          api_image(api, [image_files["rgba.png"]])])
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # {"image_url": data URI} is the same image too, also in OpenAI's content-part shape
    uri = data_uri(IMAGES["photo.jpg"], "jpeg")
    items = [{"image_url": uri}, {"type": "image_url", "image_url": {"url": uri}}]
    got = embeddings(httpx.post(f"{server.url}/v1/embeddings", json={"input": items}))
    torch.testing.assert_close(got, expected[[0, 0]], atol=TOL, rtol=0)


@pytest.mark.parametrize("templates", [None, ["a photo of {}.", "{}", "art of {}, blurry"]])
def test_classify_matches_zero_shot_api(server, api, image_files, templates):
    model, processor = api
    names = ["rgb.png", "gray.png", "rotated.jpg"]
    body = {"images": [data_uri(IMAGES[n]) for n in names], "labels": LABELS}
    kw = {}
    if templates:
        body["templates"], kw["templates"] = templates, templates
    resp = httpx.post(f"{server.url}/v1/classify", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    reference = siglip_so400m.zero_shot(model, processor, [str(image_files[n]) for n in names], LABELS, **kw)
    assert len(data) == len(names)
    for i, (record, ref) in enumerate(zip(data, reference, strict=True)):
        assert record["image"] == i and record["dtype"] == "float32"
        assert record["templates"] == (templates or ["This is a photo of {}."])
        assert [p["label"] for p in record["predictions"]] == [r["label"] for r in ref]
        for p, r in zip(record["predictions"], ref, strict=True):
            assert p["score"] == pytest.approx(r["sigmoid"], abs=TOL)
            assert p["logit"] == pytest.approx(r["logit"], abs=TOL)
            assert p["softmax"] == pytest.approx(r["softmax"], abs=TOL)


def test_bf16_server_reports_bfloat16_in_health_and_classify(tiny_ckpt, tmp_path, image_files):
    # The bug: both said "float32" (t', kept float32, was taken for the model's dtype).
    s = Served(tiny_ckpt, tmp_path / "log.txt", "--dtype", "bfloat16")
    try:
        assert httpx.get(f"{s.url}/health").json()["dtype"] == "bfloat16"
        resp = httpx.post(f"{s.url}/v1/classify", json={"images": [data_uri(IMAGES["rgb.png"])],
                                                         "labels": LABELS})
        assert resp.status_code == 200, resp.text
        (record,) = resp.json()["data"]
        assert record["dtype"] == "bfloat16"
    finally:
        assert s.stop() == 0, s.log()
    # And it does compute in bf16: its logits are the bf16 API's, not the float32 ones.
    m16, p16 = siglip_so400m.load(tiny_ckpt, dtype=torch.bfloat16)
    m32, p32 = siglip_so400m.load(tiny_ckpt)
    ref16, ref32 = (siglip_so400m.zero_shot(m, p, str(image_files["rgb.png"]), LABELS)[0]
                    for m, p in ((m16, p16), (m32, p32)))
    got = {p["label"]: p["logit"] for p in record["predictions"]}
    err16 = max(abs(got[r["label"]] - r["logit"]) for r in ref16)
    err32 = max(abs(got[r["label"]] - r["logit"]) for r in ref32)
    assert err16 < 1e-4 < err32, (err16, err32)


def test_label_memory_keeps_bf16_and_fp32_embeddings_apart(tiny_ckpt):
    from siglip_so400m.serve.app import LabelMemory
    from siglip_so400m.zeroshot import ZeroShotClassifier

    templates = ["This is a photo of {}."]
    m32, p32 = siglip_so400m.load(tiny_ckpt)
    m16, p16 = siglip_so400m.load(tiny_ckpt, dtype=torch.bfloat16)
    alone32 = ZeroShotClassifier(m32, p32, LABELS, templates).label_emb
    alone16 = ZeroShotClassifier(m16, p16, LABELS, templates).label_emb
    assert (alone32 - alone16).abs().max() > 1e-3  # bf16 embeddings are not the fp32 ones
    memory = LabelMemory(100)
    for _ in range(2):  # bf16 fills the memory first; the second round reads it
        for (m, p), alone in (((m16, p16), alone16), ((m32, p32), alone32)):
            view = memory.view(m.precision, templates, LABELS)
            assert torch.equal(ZeroShotClassifier(m, p, LABELS, templates, cache=view).label_emb, alone)


def test_classify_options_and_shared_label_cache(server, api, image_files):
    labels = ["label cache one", "label cache two", "label cache three"]
    before = metrics(server.url)
    body = {"images": [data_uri(IMAGES["rgb.png"])], "labels": labels}
    first = httpx.post(f"{server.url}/v1/classify", json=body).json()["data"][0]["predictions"]
    mid = metrics(server.url)
    second = httpx.post(f"{server.url}/v1/classify", json={**body, "top_k": 2}).json()
    second = second["data"][0]["predictions"]
    after = metrics(server.url)
    miss, hit = 'siglip_label_cache_total{result="miss"}', 'siglip_label_cache_total{result="hit"}'
    assert mid[miss] - before[miss] == 3 and mid[hit] == before[hit]  # computed once...
    assert after[hit] - mid[hit] == 3 and after[miss] == mid[miss]  # ...then reused by another request
    assert second == first[:2]
    # multipart form, with threshold: only labels whose sigmoid is at least P
    threshold = first[1]["score"]
    files = [("images", ("x.png", IMAGES["rgb.png"], "image/png"))]
    resp = httpx.post(f"{server.url}/v1/classify", files=files,
                      data={"labels": labels, "threshold": str(threshold)})
    assert resp.status_code == 200, resp.text
    assert [p["label"] for p in resp.json()["data"][0]["predictions"]] == [p["label"] for p in first[:2]]


# ---- bad input: the right 4xx, a clear error, and the server unharmed ----

def test_bad_images_are_400_naming_the_item(server):
    good = data_uri(IMAGES["rgb.png"])
    png = IMAGES["big.png"]
    cases = {
        "data:image/png;base64,not*base64!": "invalid base64",
        data_uri(b"just some text, not an image"): "not an image",
        data_uri(png[: len(png) // 2]): "truncated or corrupt",
        data_uri(bomb_png()): "decompression bomb",
        "data:image/png,rawbytes": "must be base64",
    }
    for bad, says in cases.items():
        resp = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a text", good, bad]})
        error(resp, 400, "input[2]", says)
        resp = httpx.post(f"{server.url}/v1/classify", json={"images": [good, bad], "labels": ["a"]})
        error(resp, 400, "images[1]", says)
    files = [("input", ("x.png", png[:300], "image/png"))]
    error(httpx.post(f"{server.url}/v1/embeddings", files=files), 400, "input[0]", "truncated")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_validation_errors_are_422(server):
    img = data_uri(IMAGES["rgb.png"])
    emb, cls = f"{server.url}/v1/embeddings", f"{server.url}/v1/classify"
    error(httpx.post(emb, json={"input": []}), 422, "input", "empty list")
    error(httpx.post(emb, json={"input": ["ok", "  "]}), 422, "input[1]", "empty string")
    error(httpx.post(emb, json={"input": ""}), 422, "input[0]", "empty string")
    error(httpx.post(emb, json={}), 422, "input", "missing")
    error(httpx.post(emb, json={"input": [[1, 2, 3]]}), 422, "input[0]", "token ids")
    error(httpx.post(emb, json={"input": ["a"] * 9}), 422, "input", "--max-items")
    error(httpx.post(emb, json={"input": "a", "normalize": "yes"}), 422, "normalize")
    error(httpx.post(emb, json={"input": "a", "encoding_format": "int8"}), 422, "encoding_format")
    error(httpx.post(cls, json={"images": [img]}), 422, "labels", "missing")
    error(httpx.post(cls, json={"labels": ["a"]}), 422, "images", "missing")
    error(httpx.post(cls, json={"images": [img], "labels": []}), 422, "labels", "empty list")
    error(httpx.post(cls, json={"images": [img], "labels": ["a", ""]}), 422, "labels[1]")
    error(httpx.post(cls, json={"images": [img], "labels": [f"l{i}" for i in range(9)]}), 422, "labels",
          "--max-labels")
    error(httpx.post(cls, json={"images": [img] * 9, "labels": ["a"]}), 422, "images", "--max-items")
    error(httpx.post(cls, json={"images": [img], "labels": ["a"], "template": "no slot"}), 422, None,
          "must contain one {}")
    error(httpx.post(cls, json={"images": [img], "labels": ["a"], "top_k": 0}), 422, "top_k")
    error(httpx.post(cls, json={"images": [img], "labels": ["a"], "threshold": 2}), 422, "threshold")
    files = [("input", (f"{i}.png", IMAGES["rgb.png"], "image/png")) for i in range(10)]
    error(httpx.post(emb, files=files), 422, None, "at most 8 items")
    # not JSON, or not an object
    error(httpx.post(emb, content=b"{not json", headers={"content-type": "application/json"}), 400)
    error(httpx.post(emb, json=["a"]), 422)
    error(httpx.post(emb, content=b"input=a", headers={"content-type": "text/plain"}), 415)
    error(httpx.get(f"{server.url}/v1/nothing"), 404)
    error(httpx.post(f"{server.url}/v1/search", json={"texts": ["a"]}), 404, None, "--index")


def test_bodies_over_the_limit_are_413_while_reading(server):
    big = {"input": ["x" * (2 << 20)]}  # 2 MB, the server takes 1
    error(httpx.post(f"{server.url}/v1/embeddings", json=big), 413, None, "--max-request-mb")

    def stream():  # no Content-Length: chunked, counted as it arrives
        for _ in range(64):
            yield b"x" * (32 << 10)

    resp = httpx.post(f"{server.url}/v1/embeddings", content=stream(),
                      headers={"content-type": "application/json"})
    assert "content-length" not in resp.request.headers
    error(resp, 413, None, "--max-request-mb")
    files = [("input", ("big.png", b"\0" * (2 << 20), "image/png"))]
    error(httpx.post(f"{server.url}/v1/embeddings", files=files), 413)
    assert embeddings(httpx.post(f"{server.url}/v1/embeddings", json={"input": "still fine"})).shape[0] == 1


def test_paths_and_urls_are_never_opened(server, api, image_files):
    path = str(image_files["rgb.png"])
    # a path in `input` is a text like any other: embedded as text, the file never read
    got = embeddings(httpx.post(f"{server.url}/v1/embeddings", json={"input": [path, "/etc/passwd"]}))
    torch.testing.assert_close(got, api_text(api, [path, "/etc/passwd"]), atol=TOL, rtol=0)
    err = error(httpx.post(f"{server.url}/v1/classify", json={"images": [path], "labels": ["a"]}), 400,
                "images[0]", "paths are never read")
    assert "root:" not in err["message"]
    for url in ["http://127.0.0.1:1/x.png", "file:///etc/passwd"]:
        error(httpx.post(f"{server.url}/v1/embeddings", json={"input": [{"image_url": url}]}), 400,
              "input[0]", "--allow-urls")


# ---- load: 64 clients x 20 requests, good and bad, none lost or mixed up ----

def test_load_64_clients_every_answer_right(server, api, image_files):
    clients, per_client = 64, 20
    names = ["rgb.png", "gray.png", "photo.jpg", "rotated.jpg"]
    img_emb = dict(zip(names, api_image(api, [image_files[n] for n in names]), strict=True))
    img_raw = dict(zip(names, api_image(api, [image_files[n] for n in names], normalize=False), strict=True))
    tags = [f"request {c} {i}" for c in range(clients) for i in range(per_client)]
    tag_emb = dict(zip(tags, api_text(api, tags), strict=True))
    tag_raw = dict(zip(tags, api_text(api, tags, normalize=False), strict=True))
    model, processor = api
    scores = siglip_so400m.zero_shot(model, processor, [str(image_files[n]) for n in names], LABELS)
    ref_cls = {n: [(r["label"], r["sigmoid"]) for r in s] for n, s in zip(names, scores, strict=True)}
    truncated = data_uri(IMAGES["big.png"][:400])
    failures: list[str] = []
    outcomes: list[tuple[str, int]] = []  # (endpoint, status), one per request sent
    lock = threading.Lock()
    before = metrics(server.url)

    def one(client: httpx.Client, c: int, i: int, rng: random.Random) -> tuple[str, int]:
        tag = f"request {c} {i}"
        kind = (c + i) % 10
        if kind <= 5:  # texts and images, the request's own tag text among them
            picks = rng.sample(names, rng.randint(1, 3))
            items = [("tag", tag), *(("img", n) for n in picks)]
            rng.shuffle(items)
            normalize = kind != 5
            resp = client.post("/v1/embeddings", json={"input": [t if k == "tag" else data_uri(IMAGES[t])
                                                                  for k, t in items], "normalize": normalize})
            if resp.status_code != 200:
                return "/v1/embeddings", fail(resp.status_code, f"{tag}: {resp.text[:200]}")
            got = embeddings(resp)
            texts, images = (tag_emb, img_emb) if normalize else (tag_raw, img_raw)
            want = torch.stack([texts[t] if k == "tag" else images[t] for k, t in items])
            if not torch.allclose(got, want, atol=TOL, rtol=0):
                fail(200, f"{tag}: wrong embeddings")
            return "/v1/embeddings", 200
        if kind == 6:
            n = rng.choice(names)
            resp = client.post("/v1/classify", json={"images": [data_uri(IMAGES[n])], "labels": LABELS})
            if resp.status_code != 200:
                return "/v1/classify", fail(resp.status_code, f"{tag}: {resp.text[:200]}")
            preds = [(p["label"], p["score"]) for p in resp.json()["data"][0]["predictions"]]
            ok = [lab for lab, _ in preds] == [lab for lab, _ in ref_cls[n]] and all(
                abs(a[1] - b[1]) <= TOL for a, b in zip(preds, ref_cls[n], strict=True))
            if not ok:
                fail(200, f"{tag}: wrong classification")
            return "/v1/classify", 200
        bad, want = {7: (["ok", "data:image/png;base64,@@@"], 400), 8: (["ok", ""], 422),
                     9: ([tag, truncated], 400)}[kind]
        resp = client.post("/v1/embeddings", json={"input": bad})
        if resp.status_code != want or resp.json()["error"]["param"] != "input[1]":
            fail(resp.status_code, f"{tag}: expected {want}, got {resp.text[:200]}")
        return "/v1/embeddings", resp.status_code

    def fail(status: int, message: str) -> int:
        with lock:
            failures.append(message)
        return status

    def run(c: int) -> None:
        rng = random.Random(c)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for i in range(per_client):
                try:
                    result = one(client, c, i, rng)
                except Exception as e:  # a lost request: no answer at all
                    result = ("lost", fail(0, f"request {c} {i}: {type(e).__name__}: {e}"))
                with lock:
                    outcomes.append(result)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"
    assert not failures, f"{len(failures)} failures, e.g. {failures[:5]}"
    assert len(outcomes) == clients * per_client
    after = metrics(server.url)
    # The server answered exactly as many requests as were sent: none lost, none answered twice.
    for endpoint in ("/v1/embeddings", "/v1/classify"):
        sent = sum(e == endpoint for e, _ in outcomes)
        assert answered(after, endpoint) - answered(before, endpoint) == sent
    for status in (400, 422):
        key = f'siglip_request_errors_total{{endpoint="/v1/embeddings",status="{status}"}}'
        assert after[key] - before.get(key, 0) == sum(s == status for _, s in outcomes)
    # Batching happened: some forward passes took more than one item.
    def batches_over_1(m: dict[str, float]) -> float:
        return sum(m[f'siglip_batch_size_count{{kind="{k}"}}']
                   - m[f'siglip_batch_size_bucket{{kind="{k}",le="1"}}'] for k in ("text", "image"))

    multi = batches_over_1(after) - batches_over_1(before)
    assert multi > 0, "no batch larger than 1 in /metrics"
    assert after['siglip_queue_depth{kind="image"}'] == after['siglip_queue_depth{kind="text"}'] == 0


# ---- overload: a full queue answers 503 with Retry-After, then the server recovers ----

def test_full_queue_answers_503_then_recovers(tiny_ckpt, tmp_path):
    # Test hook: the model thread sleeps 400 ms per batch, so 12 requests overflow a 2-item queue.
    s = Served(tiny_ckpt, tmp_path / "log.txt", "--max-queue", "2", "--max-batch", "1", "--max-wait-ms", "0",
               env={"SIGLIP_SO400M_SERVE_TEST_DELAY_MS": "400"})
    try:
        body = {"input": [data_uri(IMAGES["rgb.png"])]}
        barrier = threading.Barrier(12)
        results: list[httpx.Response] = []

        def client() -> None:
            barrier.wait()
            r = httpx.post(f"{s.url}/v1/embeddings", json=body, timeout=60)
            results.append(r)

        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in results)
        assert len(codes) == 12 and set(codes) == {200, 503}, codes
        assert codes.count(200) <= 4  # one in the model, two queued (+1 for timing), the rest refused
        for r in results:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert error(r, 503)["type"] == "overloaded_error"
        assert httpx.get(f"{s.url}/health").json()["queue_depth"] == 0
        assert httpx.post(f"{s.url}/v1/embeddings", json=body, timeout=60).status_code == 200  # recovered
        m = metrics(s.url)
        assert m['siglip_requests_total{endpoint="/v1/embeddings",status="503"}'] == codes.count(503)
    finally:
        assert s.stop() == 0, s.log()


# ---- SIGTERM under load: every accepted request answered ----

def test_sigterm_answers_every_accepted_request(tiny_ckpt, tmp_path, api):
    """'Accepted' means the server began handling the request (the server counts it); a request
    the server never read may fail with a connection error. So: every request the server counted
    got its whole answer to the client (a 200: the queue never fills here), the counts are equal,
    requests in flight at SIGTERM finished after it, and the server exited 0 with nothing in
    flight. Uses --api-key (the flag) and a slowed model (test hook, 150 ms per batch)."""
    s = Served(tiny_ckpt, tmp_path / "log.txt", "--max-batch", "4", "--api-key", KEY,
               env={"SIGLIP_SO400M_SERVE_TEST_DELAY_MS": "150"})
    auth = {"Authorization": f"Bearer {KEY}"}
    done: list[tuple[float, int, str]] = []  # (time, status, tag)
    refused: list[str] = []
    wrong: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 30

    def client(c: int) -> None:
        with httpx.Client(base_url=s.url, headers=auth, timeout=60) as http:
            for i in range(10_000):
                if time.monotonic() > stop_at:
                    return
                tag = f"shutdown {c} {i}"
                try:
                    r = http.post("/v1/embeddings", json={"input": [tag]})
                except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError,
                        httpx.WriteError) as e:
                    with lock:
                        refused.append(type(e).__name__)
                    if isinstance(e, httpx.ConnectError):
                        return  # the server stopped listening
                    continue
                with lock:
                    done.append((time.monotonic(), r.status_code, tag))
                    if r.status_code == 200:
                        got = torch.tensor(r.json()["data"][0]["embedding"])
                        if not torch.allclose(got, api_text(api, [tag])[0], atol=TOL, rtol=0):
                            wrong.append(tag)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(60)
    for t in threads:
        t.join(60)
    log = s.log()
    assert rc == 0, log
    assert not wrong
    match = re.search(r"stopped; answered /v1/embeddings (\d+); (\d+) unanswered; (\d+) in flight", log)
    assert match, log
    served, unanswered, in_flight = map(int, match.groups())
    assert unanswered == in_flight == 0
    assert served == len(done), (served, len(done), refused)  # every accepted request reached its client
    # The queue (256 items) never fills with 12 clients: a 503 here would be a dropped request.
    assert {status for _, status, _ in done} == {200}
    assert any(t > t_term and status == 200 for t, status, _ in done), "nothing was in flight at SIGTERM"
    assert "ConnectError" in refused  # and new connections were refused after it


# ---- auth, and URLs when allowed ----

class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_api_key_and_allowed_urls(tiny_ckpt, tmp_path, api, image_files):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "cat.jpg").write_bytes(IMAGES["photo.jpg"])
    files = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(tmp_path / "www")))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    # The file server is on 127.0.0.1, which --allow-urls alone refuses (tests/test_serve_limits.py).
    s = Served(tiny_ckpt, tmp_path / "log.txt", "--allow-urls", "--allow-private-urls",
               env={"SIGLIP_SO400M_API_KEY": KEY})
    try:
        url, body = f"{s.url}/v1/embeddings", {"input": "hello"}
        err = error(httpx.post(url, json=body), 401, None, "API key")
        assert err["type"] == "authentication_error"
        for header in [f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer"]:
            error(httpx.post(url, json=body, headers={"Authorization": header}), 401)
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.get(f"{s.url}/health").status_code == 200  # for load balancers' probes
        auth = {"Authorization": f"Bearer {KEY}"}
        image_url = f"http://127.0.0.1:{files.server_address[1]}/cat.jpg"
        got = embeddings(httpx.post(url, json={"input": [{"image_url": image_url}]}, headers=auth))
        torch.testing.assert_close(got, api_image(api, [image_files["photo.jpg"]]), atol=TOL, rtol=0)
        for bad, says in [("file:///etc/passwd", "only http(s)"), (image_url + ".missing", "cannot fetch")]:
            error(httpx.post(url, json={"input": [{"image_url": bad}]}, headers=auth), 400, "input[0]", says)
    finally:
        files.shutdown()
        assert s.stop() == 0, s.log()


# ---- search over an embedded collection (--index) ----

@pytest.fixture(scope="module")
def collection(tiny_ckpt, image_files, tmp_path_factory) -> Path:
    pytest.importorskip("pyarrow", reason="search needs the [search] extra")
    out = tmp_path_factory.mktemp("collection") / "emb"
    siglip_so400m.embed(str(next(iter(image_files.values())).parent), out, model=str(tiny_ckpt),
                        dtype="float32", workers=0)
    return out


def test_search_matches_the_index_api(tiny_ckpt, collection, image_files, tmp_path):
    from siglip_so400m.search import Index

    s = Served(tiny_ckpt, tmp_path / "log.txt", "--index", str(collection))
    try:
        texts = ["a photo of a cat", "noise"]
        body = {"texts": texts, "images": [data_uri(IMAGES["gray.png"])], "k": 3}
        resp = httpx.post(f"{s.url}/v1/search", json=body)
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        reference = Index.load(collection).search(texts=texts, images=[str(image_files["gray.png"])], k=3)
        assert [d["query"] for d in data] == [{"text": t} for t in texts] + [{"image": 0}]
        for d, ref in zip(data, reference, strict=True):
            assert [h["id"] for h in d["hits"]] == [h["id"] for h in ref]
            assert [h["path"] for h in d["hits"]] == [h["path"] for h in ref]
            for h, r in zip(d["hits"], ref, strict=True):
                assert set(h) == set(r)
                for key in ("score", "cosine", "logit", "sigmoid"):
                    assert h.get(key) == pytest.approx(r.get(key), abs=1e-4)
        assert Path(data[2]["hits"][0]["path"]).name == "gray.png"  # an image finds itself first
        assert data[2]["hits"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)
        # Between the 2nd and 3rd scores, not at the 2nd: the same text's score differs in its last
        # bits between the two requests (seen once scores came from torch's sigmoid: the 2nd hit
        # fell below a cut equal to its own score of the first request).
        cut = (data[0]["hits"][1]["score"] + data[0]["hits"][2]["score"]) / 2
        assert data[0]["hits"][2]["score"] < cut < data[0]["hits"][1]["score"]
        resp = httpx.post(f"{s.url}/v1/search", json={"texts": texts[:1], "k": 3, "threshold": cut})
        assert [h["id"] for h in resp.json()["data"][0]["hits"]] == [h["id"] for h in data[0]["hits"][:2]]
        error(httpx.post(f"{s.url}/v1/search", json={}), 422, "texts")
        error(httpx.post(f"{s.url}/v1/search", json={"texts": ["a"], "k": 0}), 422, "k")
        bad = {"images": ["data:image/png;base64,@"]}
        error(httpx.post(f"{s.url}/v1/search", json=bad), 400, "images[0]")
    finally:
        assert s.stop() == 0, s.log()


def test_search_refuses_an_index_of_another_model(tiny_copy, collection, tmp_path):
    with pytest.raises(AssertionError, match="was embedded with"):
        Served(tiny_copy, tmp_path / "log.txt", "--index", str(collection))
