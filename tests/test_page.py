"""The page of `siglip-so400m serve --index` and the endpoints that show the index's images.

The image-serving rules are tested in this process through FastAPI's TestClient (each test fails
without the rule it names); the page itself is driven in a real headless Chromium (Playwright, with
the system's chromium) against a real server on 127.0.0.1, as a person would use it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import tarfile
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import siglip_so400m

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
pytest.importorskip("pyarrow", reason="an index needs the [search] extra")
from fastapi.testclient import TestClient

from siglip_so400m.search import Index
from siglip_so400m.serve.app import Server, Settings, create_app
from siglip_so400m.serve.batcher import Batcher, Metrics
from siglip_so400m.serve.inputs import ImageLimits
from siglip_so400m.serve.page import THUMB_SIDE, BoundedCache, RowImages

KEY = "correct horse battery staple"
N_PHOTOS = 30  # over one page of the grid (24), so "Load more" has something to load


# ---- a small collection: files with captions, a webdataset shard, a copy, a missing and a bad file ----

def drawn(seed: int) -> Image.Image:
    """Coloured rectangles on a coloured ground: images the tiny random model tells apart."""
    rng = random.Random(seed)
    color = tuple(rng.randrange(256) for _ in "rgb")
    img = Image.new("RGB", (rng.randint(60, 200), rng.randint(60, 200)), color)
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.randrange(img.width), rng.randrange(img.height)
        d.rectangle((x, y, x + rng.randint(10, 60), y + rng.randint(10, 60)),
                    fill=tuple(rng.randrange(256) for _ in "rgb"))
    return img


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def collection(tiny_ckpt, tmp_path_factory) -> dict:
    """embed's folder of N_PHOTOS drawn files (captioned, through a .csv list), big.jpg (1200x900),
    copy.png (the bytes of photo_03.png), gone.png (deleted after embedding), bad.png (truncated
    after embedding) and a webdataset shard of 3 samples with img2dataset's .txt and .json members.
    Returns {"folder", "files", "rows" (name -> row id), "members" (key -> member bytes)}."""
    root = tmp_path_factory.mktemp("page")
    files = {f"photo_{i:02d}.png": encoded(drawn(i)) for i in range(N_PHOTOS)}
    files["big.jpg"] = encoded(drawn(100).resize((1200, 900)), "JPEG")
    files["copy.png"] = files["photo_03.png"]
    files["gone.png"] = encoded(drawn(101))
    files["bad.png"] = encoded(drawn(102))
    (root / "images").mkdir()
    with open(root / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "caption"])
        for name, data in files.items():
            (root / "images" / name).write_bytes(data)
            w.writerow([f"images/{name}", f"picture {name.split('.')[0]}"])
    members = {f"{k:03d}": encoded(drawn(200 + k), "JPEG") for k in range(3)}
    with tarfile.open(root / "shard.tar", "w") as tar:
        for key, data in members.items():
            for ext, payload in [("jpg", data), ("txt", f"sample {key}".encode()),
                                 ("json", json.dumps({"url": f"https://example.com/{key}.jpg"}).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = root / "emb"
    siglip_so400m.embed([root / "list.csv", root / "shard.tar"], out, model=str(tiny_ckpt), dtype="float32",
                        workers=0)
    (root / "images" / "gone.png").unlink()
    (root / "images" / "bad.png").write_bytes(files["bad.png"][:200])
    coll = Index.load(out).collection
    rows = {}
    for i in range(len(coll)):
        meta = coll.metadata(i)
        rows[meta["key"] if meta["shard"] else Path(meta["image_path"]).name] = i
    assert len(rows) == len(files) + len(members)
    return {"root": root, "folder": out, "files": files, "rows": rows, "members": members}


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return siglip_so400m.load(tiny_ckpt)  # float32


def make_app(model, folder: Path | None, **settings):
    net, processor = model
    metrics = Metrics()
    batcher = Batcher(net, max_batch=8, max_wait_s=0.002, max_queue=64, metrics=metrics,
                      collate_images=processor.image.collate)
    s = Settings(model_name="tiny", revision=None, precision=net.precision,
                 image_limits=ImageLimits(max_pixels=40_000_000), **settings)
    index = Index.load(folder) if folder is not None else None
    return create_app(Server(net, processor, s, batcher, metrics, index))


@pytest.fixture(scope="module")
def client(model, collection):
    with TestClient(make_app(model, collection["folder"])) as c:
        yield c


def row_images(client) -> RowImages:
    return client.app.app.state.row_images  # Guard -> FastAPI -> what add_page keeps


def error(resp, status: int, says: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert says in err["message"], err
    return err


# ---- the page and the switch that turns it off ----

def test_page_is_served_at_root_with_an_index_and_its_files_forbid_other_scripts(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/page.js"' in r.text and "http" not in r.text.replace('http-equiv', '')
    for path, kind in [("/page.js", "text/javascript"), ("/page.css", "text/css")]:
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere


def test_no_page_without_an_index_or_with_no_page(model, collection):
    with TestClient(make_app(model, collection["folder"], page=False)) as c:
        error(c.get("/"), 404)
        error(c.get("/v1/images/0/thumbnail"), 404)
        assert c.post("/v1/search", json={"rows": [0], "k": 1}).status_code == 200  # search stays
    with TestClient(make_app(model, None)) as c:
        error(c.get("/"), 404)
        error(c.get("/v1/images/0"), 404)


# ---- the image-serving rules ----

def test_a_row_is_served_from_the_file_its_metadata_names(client, collection):
    for name in ("photo_05.png", "big.jpg"):
        r = client.get(f"/v1/images/{collection['rows'][name]}")
        assert r.status_code == 200 and "x-placeholder" not in r.headers
        assert r.content == collection["files"][name]
        assert r.headers["content-type"] == ("image/png" if name.endswith("png") else "image/jpeg")
        assert r.headers["x-content-type-options"] == "nosniff"


def test_a_webdataset_row_is_served_from_its_shard_member(client, collection):
    for key, data in collection["members"].items():
        r = client.get(f"/v1/images/{collection['rows'][key]}")
        assert r.status_code == 200 and "x-placeholder" not in r.headers, r.headers.get("x-placeholder")
        assert r.content == data and r.headers["content-type"] == "image/jpeg"
        thumb = client.get(f"/v1/images/{collection['rows'][key]}/thumbnail")
        assert "x-placeholder" not in thumb.headers
        assert Image.open(io.BytesIO(thumb.content)).size == Image.open(io.BytesIO(data)).size


def test_a_row_outside_the_index_is_404(client, collection):
    n = len(Index.load(collection["folder"]))
    for row in (n, -1, -n, 10**12):  # -1 must not wrap round to the last row
        for suffix in ("", "/thumbnail", "/attention"):
            error(client.get(f"/v1/images/{row}{suffix}"), 404, f"no row {row} in the index")
    assert client.get(f"/v1/images/{n - 1}").status_code == 200


def test_a_path_in_place_of_a_row_id_is_refused(client, collection):
    real = collection["root"] / "images" / "photo_05.png"  # a file of the index, by path
    for path in (str(real), "images/photo_05.png", "photo_05.png", "../../etc/passwd", "/etc/passwd",
                 str(collection["root"] / "shard.tar")):
        for suffix in ("", "/thumbnail", "/attention"):
            r = client.get("/v1/images/" + urllib.parse.quote(path, safe="") + suffix)
            assert r.status_code in (404, 422), (path, r.status_code)
            assert r.headers["content-type"] == "application/json"
            assert r.content != collection["files"]["photo_05.png"]
    # A path beside the id is not read either: the row's own image comes back.
    r = client.get(f"/v1/images/{collection['rows']['photo_07.png']}", params={"path": str(real)})
    assert r.content == collection["files"]["photo_07.png"]


def test_a_missing_or_unreadable_file_is_a_placeholder_not_a_500(client, collection):
    for name, says in [("gone.png", "missing"), ("bad.png", "cannot decode")]:
        row = collection["rows"][name]
        for suffix in ("", "/thumbnail", "/attention"):
            r = client.get(f"/v1/images/{row}{suffix}")
            assert r.status_code == 200, (name, suffix, r.text[:200])
            assert r.headers["content-type"] == "image/png" and says in r.headers["x-placeholder"]
            assert str(collection["root"]) not in r.headers["x-placeholder"]  # says why, not where
            assert r.headers["cache-control"] == "no-store"
            Image.open(io.BytesIO(r.content)).verify()


def test_thumbnails_are_bounded_and_made_once(client, collection, monkeypatch):
    reads = []
    real = RowImages.read
    monkeypatch.setattr(RowImages, "read", lambda self, row: reads.append(row) or real(self, row))
    row = collection["rows"]["big.jpg"]  # 1200 x 900
    first = client.get(f"/v1/images/{row}/thumbnail")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(first.content)).size == (THUMB_SIDE, THUMB_SIDE * 3 // 4)
    again = client.get(f"/v1/images/{row}/thumbnail")
    assert again.content == first.content
    assert reads.count(row) <= 1  # 0 if an earlier test made it: made once per server either way
    assert ("thumbnail", row) in row_images(client).cache._items


def test_the_image_cache_is_bounded_in_bytes_and_count(model, collection):
    cache = BoundedCache(max_bytes=100, max_items=3)
    for i in range(5):
        cache.put(("t", i), bytes(30))
    assert len(cache) == 3 and cache.bytes == 90 and cache.get(("t", 0)) is None
    cache.put(("t", 9), bytes(101))  # larger than the whole budget: not kept
    assert cache.get(("t", 9)) is None and cache.bytes <= 100
    budget = 6000  # bytes: a few of the tiny thumbnails
    with TestClient(make_app(model, collection["folder"], image_cache_bytes=budget)) as c:
        for name in [n for n in collection["rows"] if n.startswith("photo_")]:
            assert c.get(f"/v1/images/{collection['rows'][name]}/thumbnail").status_code == 200
        cache = row_images(c).cache
        assert 0 < cache.bytes <= budget and len(cache) < N_PHOTOS


def test_the_image_endpoints_need_the_api_key_and_the_page_files_do_not(model, collection):
    with TestClient(make_app(model, collection["folder"], api_key=KEY)) as c:
        for path in ("/", "/page.js", "/page.css"):
            assert c.get(path).status_code == 200, path
        row = collection["rows"]["photo_01.png"]
        for path in (f"/v1/images/{row}", f"/v1/images/{row}/thumbnail", f"/v1/images/{row}/attention"):
            error(c.get(path), 401, "API key")
            error(c.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            error(c.get(path, params={"key": KEY}), 401)  # never in the URL
            r = c.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("image/"), path


def test_the_attention_overlay_is_the_map_heads_attention_over_that_rows_image(client, collection, model):
    from siglip_so400m.attention_maps import attention_map, grid_cover, overlay
    from siglip_so400m.image import load_image, to_rgb
    from siglip_so400m.serve.page import OVERLAY_SIDE

    net, processor = model
    proc = processor.image
    got = {}
    for name in ("big.jpg", "photo_02.png"):
        r = client.get(f"/v1/images/{collection['rows'][name]}/attention")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        got[name] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    # What `siglip-so400m attention-map` draws for the file, on the image at OVERLAY_SIDE px.
    img = to_rgb(load_image(collection["root"] / "images" / "big.jpg"))
    with torch.inference_mode():
        weights = attention_map(net, proc.collate([proc.to_tensor(proc.prepare(img))]))[0].mean(0).numpy()
    img.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.BICUBIC)
    cover = grid_cover(proc, net.config.vision_config.patch_size)
    want = np.asarray(overlay(img, weights, cover)).astype(int)
    assert got["big.jpg"].shape == want.shape == (384, 512 + 16 + 64, 3)
    assert np.abs(got["big.jpg"] - want).max() <= 1  # float32 on both sides
    assert got["photo_02.png"].shape != want.shape or np.abs(got["photo_02.png"] - want).max() > 10


def test_the_attention_overlay_of_a_naflex_row_is_on_its_own_grid(naflex_ckpt, collection, tmp_path):
    # SigLIP 2 NaFlex: the map comes back as a list, one grid per image, and the grid covers it all.
    from siglip_so400m.attention_maps import attention_map, overlay
    from siglip_so400m.image import load_image, to_rgb
    from siglip_so400m.serve.page import OVERLAY_SIDE

    out = tmp_path / "emb"
    big = collection["root"] / "images" / "big.jpg"
    siglip_so400m.embed(big, out, model=str(naflex_ckpt), dtype="float32", workers=0)
    net, processor = siglip_so400m.load(naflex_ckpt)
    with TestClient(make_app((net, processor), out)) as c:
        r = c.get("/v1/images/0/attention")
        assert r.status_code == 200 and "x-placeholder" not in r.headers
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
    proc = processor.image
    img = to_rgb(load_image(big))
    with torch.inference_mode():
        weights = attention_map(net, proc.collate([proc.to_tensor(proc.prepare(img))]))[0].mean(0).numpy()
    img.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.BICUBIC)
    want = np.asarray(overlay(img, weights, (1.0, 1.0))).astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_the_attention_overlay_without_the_pytorch_image_tower_is_501(model, collection):
    from types import SimpleNamespace

    with TestClient(make_app(model, collection["folder"], backend="onnx")) as c:
        # What --backend onnx|openvino serves: a GraphModel, which has no vision_model to look into.
        row_images(c).server.model = SimpleNamespace(precision="float32")
        error(c.get(f"/v1/images/{collection['rows']['photo_01.png']}/attention"), 501, "--backend")
        assert c.get(f"/v1/images/{collection['rows']['photo_01.png']}/thumbnail").status_code == 200


# ---- /v1/search by row ("more like this") and with near-duplicates folded ----

def test_a_row_that_is_a_digit_but_not_a_number_is_422_not_500(client):
    for row in ("²", "9" * 5000):  # str.isdigit() is True for both, int() fails on them
        error(client.post("/v1/search", json={"rows": [row]}), 422, "rows[0] must be a row id")


def test_search_by_a_row_finds_it_first_and_fold_marks_its_copy(client, collection):
    rows = collection["rows"]
    original, copy = rows["photo_03.png"], rows["copy.png"]
    r = client.post("/v1/search", json={"rows": [original], "k": 40})
    assert r.status_code == 200, r.text
    data = r.json()["data"][0]
    assert data["query"] == {"row": original}
    hits = data["hits"]
    assert {hits[0]["id"], hits[1]["id"]} == {original, copy}  # the same bytes: the same embedding
    assert [h["cosine"] for h in hits[:2]] == pytest.approx([1.0, 1.0], abs=1e-3)
    assert hits[2]["cosine"] < 0.99  # precondition: no other image is that close under the tiny model
    r = client.post("/v1/search", json={"rows": [original], "k": 40, "fold": 0.99})
    folded = r.json()["data"][0]["hits"]
    assert [h["id"] for h in folded] == [h["id"] for h in hits]  # the order stays
    assert folded[0]["duplicate_of"] is None and folded[1]["duplicate_of"] == folded[0]["id"]
    assert all(h["duplicate_of"] is None for h in folded[2:])
    n = len(Index.load(collection["folder"]))
    for bad in (n, -1, "/etc/passwd", 1.5, True):
        error(client.post("/v1/search", json={"rows": [bad]}), 422, "rows[0] must be a row id")
    error(client.post("/v1/search", json={"rows": [0], "fold": 2}), 422, "fold is a cosine")


# ---- the page in a real browser ----

CHROMIUM = os.environ.get("SIGLIP_SO400M_CHROMIUM") or shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("the page's browser tests need chromium, and none is installed: apt-get install "
                    "chromium (or set SIGLIP_SO400M_CHROMIUM to a Chromium binary)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the page's browser tests need "
                                   "playwright (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        # Chromium's sandbox cannot start as root (CI containers): only there is it turned off.
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tiny_ckpt, collection, tmp_path_factory):
    from test_serve import Served

    s = Served(tiny_ckpt, tmp_path_factory.mktemp("served") / "log.txt", "--index", str(collection["folder"]))
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(30_000)
    errors = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(served.url + "/")
    yield p
    context.close()
    assert errors == []  # no script error on the page


def tiles(page) -> list[int]:
    """The rows of the grid's tiles, in order (folded ones left out)."""
    rows = page.eval_on_selector_all("#results > li.hit", "els => els.map(e => e.dataset.row)")
    return [int(r) for r in rows]


def wait_for_grid(page, first: int | None = None) -> list[int]:
    page.wait_for_selector("#results > li.hit img[src^='blob:']")
    if first is not None:
        page.wait_for_function("row => document.querySelector('#results > li.hit')?.dataset.row"
                               " === String(row)", arg=first)
    return tiles(page)


def api_search(url: str, body: dict, **headers) -> list[dict]:
    import httpx

    r = httpx.post(f"{url}/v1/search", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["hits"]


def test_browser_text_query_shows_the_grid_best_first_and_loads_more(page, served):
    page.uncheck("#fold")
    page.fill("#q", "picture of a red square")
    page.keyboard.press("Enter")
    shown = wait_for_grid(page)
    want = api_search(served.url, {"texts": ["picture of a red square"], "k": 24})
    assert shown == [h["id"] for h in want]  # 24: a page
    scores = page.eval_on_selector_all("#results .score", "els => els.map(e => e.textContent)")
    assert scores[0] == f"p = {100 * want[0]['score']:.1f}%"
    assert page.inner_text(f"#results > li.hit[data-row='{want[0]['id']}'] .caption") == want[0]["caption"]
    page.click("#more")
    page.wait_for_function("() => document.querySelectorAll('#results > li.hit').length > 24")
    everything = api_search(served.url, {"texts": ["picture of a red square"], "k": 48})
    assert tiles(page) == [h["id"] for h in everything]  # the whole collection: 37 rows
    assert page.is_hidden("#more")


def test_browser_more_like_this_puts_that_image_first_from_the_keyboard(page, collection):
    page.fill("#q", "anything")
    page.keyboard.press("Enter")
    shown = wait_for_grid(page)
    target = shown[3]
    page.focus(f"#results > li.hit[data-row='{target}'] .actions button:text('More like this')")
    page.keyboard.press("Enter")
    assert wait_for_grid(page, first=target)[0] == target
    assert page.inner_text("#results > li.hit .score") == "cos 1.000"
    page.keyboard.press("/")  # back to the search box
    assert page.evaluate("document.activeElement.id") == "q"


def test_browser_upload_drop_and_paste_find_the_images_own_row_first(page, collection):
    for how, name in [("upload", "photo_11.png"), ("drop", "photo_17.png"), ("paste", "big.jpg")]:
        path = collection["root"] / "images" / name
        if how == "upload":
            page.set_input_files("#file", str(path))
        else:
            data = list((path).read_bytes())
            page.evaluate("""([how, data, name]) => {
                const t = new DataTransfer();
                const type = name.endsWith('jpg') ? 'image/jpeg' : 'image/png';
                t.items.add(new File([new Uint8Array(data)], name, {type}));
                const init = {bubbles: true, cancelable: true};
                const e = how === 'drop' ? new DragEvent('drop', {dataTransfer: t, ...init})
                                         : new ClipboardEvent('paste', {clipboardData: t, ...init});
                document.body.dispatchEvent(e);
            }""", [how, data, name])
        row = collection["rows"][name]
        assert wait_for_grid(page, first=row)[0] == row, how
        assert page.inner_text("#results > li.hit .score") == "cos 1.000"
        assert page.is_visible("#query-preview")


def test_browser_shows_a_shard_rows_caption_img2dataset_fields_and_full_image(page, collection):
    data = collection["members"]["001"]
    page.set_input_files("#file", files=[{"name": "001.jpg", "mimeType": "image/jpeg", "buffer": data}])
    row = collection["rows"]["001"]
    wait_for_grid(page, first=row)
    tile = f"#results > li.hit[data-row='{row}']"
    assert page.inner_text(f"{tile} .caption") == "sample 001"  # the shard's .txt member
    page.click(f"{tile} summary")
    facts = page.eval_on_selector_all(f"{tile} dt, {tile} dd", "els => els.map(e => e.textContent)")
    assert facts[facts.index("url") + 1] == "https://example.com/001.jpg"  # its .json member
    page.click(f"{tile} button:text('Full image')")
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
    size = page.evaluate("[document.getElementById('viewer-img').naturalWidth, "
                         "document.getElementById('viewer-img').naturalHeight]")
    assert tuple(size) == Image.open(io.BytesIO(data)).size


def test_browser_zero_shot_labels_for_an_uploaded_image(page, served, collection):
    import base64

    import httpx

    path = collection["root"] / "images" / "photo_04.png"
    page.set_input_files("#file", str(path))
    wait_for_grid(page, first=collection["rows"]["photo_04.png"])
    page.fill("#labels", "a red square, a blue circle,  noise ")
    page.click("#classify button")
    page.wait_for_selector("#predictions li")
    got = page.eval_on_selector_all("#predictions li", "els => els.map(e => e.textContent)")
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    body = {"images": [uri], "labels": ["a red square", "a blue circle", "noise"]}
    want = httpx.post(f"{served.url}/v1/classify", json=body, timeout=60).json()["data"][0]["predictions"]
    assert got == [f"{p['label']}: p = {100 * p['score']:.1f}%" for p in want]


def test_browser_why_this_matched_opens_the_attention_overlay(page):
    page.fill("#q", "a photo")
    page.keyboard.press("Enter")
    first = wait_for_grid(page)[0]
    page.click(f"#results > li.hit[data-row='{first}'] button:text('Why this matched')")
    page.wait_for_selector("#viewer[open] #viewer-img[src^='blob:']")
    page.wait_for_function("() => document.getElementById('viewer-img').naturalWidth > 0")
    assert "pooling head" in page.inner_text("#viewer-note")
    assert page.get_attribute("#viewer-open", "href").startswith("blob:")
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")
    # An image query's hits have no "why": the overlay explains a text's match.
    page.click(f"#results > li.hit[data-row='{first}'] button:text('More like this')")
    wait_for_grid(page, first=first)
    assert page.locator("button:text('Why this matched')").count() == 0


def test_browser_shows_the_servers_refusal(page):
    page.fill("#q", "x" * 5000)  # over the server's 4,096 characters
    page.keyboard.press("Enter")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert text.startswith("The server refused:") and "4096" in text.replace(",", ""), text
    page.fill("#fold-at", "3")
    page.fill("#q", "a photo")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('error').textContent.includes('fold is a cosine')")


def test_browser_folds_near_duplicates_and_downloads_the_json(page, collection):
    rows = collection["rows"]
    page.fill("#fold-at", "0.99")
    page.set_input_files("#file", str(collection["root"] / "images" / "photo_03.png"))
    shown = wait_for_grid(page, first=rows["photo_03.png"])
    assert rows["copy.png"] not in shown  # folded under its original...
    toggle = page.locator(f"#results > li.hit[data-row='{shown[0]}'] > .similar")
    assert toggle.inner_text() == "+1 similar" and toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    # ...and shown on request.
    assert page.is_visible(f"#results .folded li.hit[data-row='{rows['copy.png']}']")
    with page.expect_download() as d:
        page.click("#download")
    data = json.loads(Path(d.value.path()).read_text())
    assert data["kind"] == "image" and data["hits"][0]["id"] == rows["photo_03.png"]
    assert {h["id"] for h in data["hits"]} >= {rows["copy.png"], *shown}


def test_browser_asks_for_the_api_key_once_and_keeps_it_for_the_tab_only(browser, tiny_ckpt, collection,
                                                                          tmp_path):
    from test_serve import Served

    s = Served(tiny_ckpt, tmp_path / "log.txt", "--index", str(collection["folder"]), "--api-key", KEY)
    try:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(s.url + "/")
        page.fill("#q", "a photo")
        page.keyboard.press("Enter")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key", "wrong")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('key-note').textContent.includes('refused')")
        assert page.is_visible("#key-dialog")
        page.fill("#key", KEY)
        page.keyboard.press("Enter")
        shown = wait_for_grid(page)
        want = api_search(s.url, {"texts": ["a photo"], "k": 24, "fold": 0.95}, Authorization=f"Bearer {KEY}")
        assert shown == [h["id"] for h in want if h["duplicate_of"] is None]
        assert page.evaluate("sessionStorage.getItem('siglip-so400m-api-key')") == KEY
        assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
        page.reload()  # the same tab: the key is kept, no question
        page.fill("#q", "a photo")
        page.keyboard.press("Enter")
        wait_for_grid(page)
        assert page.is_hidden("#key-dialog")
        other = context.new_page()  # another tab: asked again
        other.goto(s.url + "/")
        other.fill("#q", "a photo")
        other.keyboard.press("Enter")
        other.wait_for_selector("#key-dialog[open]")
        context.close()
    finally:
        assert s.stop() == 0, s.log()
