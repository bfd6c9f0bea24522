"""`embed` and `serve` with `--backend onnx|openvino --graphs DIR`: the towers run through the export
folder's graphs, everything else is the jobs' own code.

Parity: the graph backends against `--backend torch` and against transformers' float32 SiglipModel
computed here; the start-up check against eager float32 (a graph of another checkpoint's weights,
a runtime that perturbs its outputs); and one clear message for each wrong folder or flag."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import siglip_so400m
from siglip_so400m import exporting
from siglip_so400m.backends import open_graphs
from siglip_so400m.embedding import EmbedError
from siglip_so400m.embedding import main as embed_main

BACKENDS = ("onnx", "openvino")
TEXTS = ["a photo of 2 cats", "a red square", "une télécommande rouge", "noise"]


def _needs_runtimes() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime", "openvino", "pyarrow"):
        pytest.importorskip(name, reason="the [export] and [embed] extras (part of [test]) are not installed")


@pytest.fixture(scope="module")
def exports(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint exported once to each format, both towers (float32)."""
    _needs_runtimes()
    root = tmp_path_factory.mktemp("backend_exports")
    for fmt in BACKENDS:
        siglip_so400m.export(tiny_ckpt, root / fmt, format=fmt)
    return {fmt: root / fmt for fmt in BACKENDS}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("backend_photos")
    for i in range(5):
        arr = np.random.default_rng(i).integers(0, 256, (20 + 9 * i, 70 - 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.png")
    (folder / "captions.csv").write_text("image_path,caption\n" + "".join(
        f"img_{i}.png,{TEXTS[i % len(TEXTS)]}\n" for i in range(5)))
    return folder


def _hf(tiny_ckpt: Path, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' float32 SiglipModel: normalized image and text embeddings."""
    from transformers import SiglipModel

    ref = SiglipModel.from_pretrained(str(tiny_ckpt)).eval()
    with torch.inference_mode():
        out = ref(pixel_values=pixels, input_ids=ids)
    return out.image_embeds, out.text_embeds


def _embed(photos: Path, out: Path, ckpt: Path, **kw) -> dict:
    return siglip_so400m.embed(photos / "captions.csv", out, model=str(ckpt), part_size=3, batch_size=2,
                               workers=0, captions=True, **kw)


# ---- embed ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_on_graphs_equals_torch_and_transformers_with_the_same_layout(backend, tiny_ckpt, exports,
                                                                            photos, tmp_path, capsys):
    got = _embed(photos, tmp_path / backend, tiny_ckpt, backend=backend, graphs=exports[backend])
    # The start-up check ran and said its figure.
    err = capsys.readouterr().err
    assert f"checked {exports[backend] / ('vision' + exporting.GRAPH_FILES[backend])} against eager" in err
    assert "max |diff|" in err and "text:" in err
    want = _embed(photos, tmp_path / "torch", tiny_ckpt, dtype="float32")
    assert got["backend"] == backend and want["backend"] == "torch" and got["dtype"] == "float32"
    # The same manifest and files, the backend apart.
    assert {k: v for k, v in got.items() if k not in ("backend", "run")} == \
        {k: v for k, v in want.items() if k not in ("backend", "run")}
    files = sorted(str(p.relative_to(tmp_path / backend)) for p in (tmp_path / backend).rglob("*"))
    assert files == sorted(str(p.relative_to(tmp_path / "torch")) for p in (tmp_path / "torch").rglob("*"))
    model, proc = siglip_so400m.load(tiny_ckpt)
    pixels = proc.images([str(photos / f"img_{i}.png") for i in range(5)])
    ids = proc.texts([TEXTS[i % len(TEXTS)] for i in range(5)])
    hf_img, hf_txt = _hf(tiny_ckpt, pixels, ids)
    for kind, ref in (("img_emb", hf_img), ("text_emb", hf_txt)):
        a = np.concatenate([np.load(tmp_path / backend / kind / f"{kind}_{i:06d}.npy") for i in range(2)])
        b = np.concatenate([np.load(tmp_path / "torch" / kind / f"{kind}_{i:06d}.npy") for i in range(2)])
        assert a.dtype == np.float16 and a.shape == b.shape == (5, 64)
        # Both are float16 roundings of float32 values 1e-7 apart: equal, or one ulp (< 2**-11) apart.
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).max() <= 2**-11
        np.testing.assert_allclose(a.astype(np.float32), ref.numpy(), atol=2**-11, rtol=0)
    # Before the float16 rounding: the backend's own rows within 1e-4 of transformers and of torch.
    net, _ = open_graphs(exports[backend], backend, model.checkpoint, ("vision", "text"))
    with torch.inference_mode():
        pairs = ((net.encode_image(pixels), model.encode_image(pixels, normalize=True), hf_img),
                 (net.encode_text(ids), model.encode_text(ids, normalize=True), hf_txt))
        for mine, eager, ref in pairs:
            torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(mine, eager, atol=1e-4, rtol=0)
    # search reads the folder as any embed folder (queries by the manifest's model and dtype).
    index = siglip_so400m.Index.load(tmp_path / backend)
    (hit, *_), = index.search(images=[str(photos / "img_3.png")], k=2)
    assert Path(hit["path"]).name == "img_3.png" and hit["score"] == pytest.approx(1, abs=1e-3)
    assert len(index.search(texts=["a red square"], k=2)[0]) == 2


def test_a_resume_with_another_backend_is_refused_and_old_manifests_still_resume(tiny_ckpt, exports, photos,
                                                                                 tmp_path):
    out = tmp_path / "out"
    _embed(photos, out, tiny_ckpt, dtype="float32")
    for backend in BACKENDS:
        with pytest.raises(EmbedError, match=f"backend: 'torch' there, '{backend}' now"):
            _embed(photos, out, tiny_ckpt, backend=backend, graphs=exports[backend])
    shutil.rmtree(out)
    _embed(photos, out, tiny_ckpt, backend="onnx", graphs=exports["onnx"])
    with pytest.raises(EmbedError, match="backend: 'onnx' there, 'torch' now"):
        _embed(photos, out, tiny_ckpt, dtype="float32")
    # A folder written before the backend was recorded was written by torch: torch continues it.
    m = json.loads((out / "manifest.json").read_text())
    del m["backend"]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EmbedError, match="backend: 'torch' there, 'onnx' now"):
        _embed(photos, out, tiny_ckpt, backend="onnx", graphs=exports["onnx"])
    assert _embed(photos, out, tiny_ckpt, dtype="float32")["counts"]["images"] == 5


# ---- the start-up check ----

def test_a_graph_of_another_checkpoints_weights_is_refused_at_start_with_the_numbers(
        tiny_ckpt, tiny_config, spiece, photos, tmp_path):
    _needs_runtimes()
    from siglip_so400m.testing import save_checkpoint

    other = save_checkpoint(tmp_path / "other", tiny_config, spiece, seed=7)  # same shapes, other weights
    siglip_so400m.export(other, tmp_path / "g", format="openvino", towers=("vision",))
    with pytest.raises(EmbedError, match=r"the vision graph vision\.xml \(OpenVINO, float32\) does not "
                                         r"compute what --model .* computes in eager float32: max \|diff\| "
                                         r"\d\.\d+e[-+]\d+ > 0\.0001"):
        siglip_so400m.embed(photos, tmp_path / "out", model=str(tiny_ckpt), backend="openvino",
                            graphs=tmp_path / "g", workers=0)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_runtime_that_perturbs_its_outputs_is_refused_at_start(tiny_ckpt, exports, photos, tmp_path,
                                                                 monkeypatch, capsys):
    real = exporting.Graph.__call__
    monkeypatch.setattr(exporting.Graph, "__call__", lambda self, *x: real(self, *x) + np.float32(3e-4))
    with pytest.raises(EmbedError, match=r"vision graph vision\.onnx \(ONNX Runtime, float32\) does not "
                                         r"compute .* max \|diff\| (2\.99\d|3\.00\d)e-04 > 0\.0001"):
        siglip_so400m.embed(photos, tmp_path / "out", model=str(tiny_ckpt), backend="onnx",
                            graphs=exports["onnx"], workers=0)
    assert not (tmp_path / "out").exists()
    # The CLI: the same message, exit 1.
    assert embed_main([str(photos), "--output", str(tmp_path / "cli"), "--model", str(tiny_ckpt),
                       "--backend", "onnx", "--graphs", str(exports["onnx"]), "--workers", "0"]) == 1
    assert "does not compute what --model" in capsys.readouterr().err


# ---- one clear message each ----

def _usage(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        embed_main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_wrong_folders_and_flags_are_usage_errors_with_one_message_each(tiny_ckpt, exports, photos,
                                                                        tmp_path, capsys, monkeypatch):
    base = [str(photos), "--output", str(tmp_path / "out"), "--model", str(tiny_ckpt), "--workers", "0"]
    cases = {
        "--backend onnx needs --graphs DIR": ["--backend", "onnx"],
        "--graphs DIR is for --backend onnx or openvino": ["--graphs", str(exports["onnx"])],
        f"--graphs {tmp_path / 'nope'}: no such folder":
            ["--backend", "onnx", "--graphs", str(tmp_path / "nope")],
        f"--graphs {tiny_ckpt} has no export.json": ["--backend", "onnx", "--graphs", str(tiny_ckpt)],
        "holds onnx graphs (export.json), not openvino: pass --backend onnx":
            ["--backend", "openvino", "--graphs", str(exports["onnx"])],
        "the openvino graphs in --graphs compute in float32 (export.json)":
            ["--backend", "openvino", "--graphs", str(exports["openvino"]), "--dtype", "bf16"],
        "runs the graphs on the CPU":
            ["--backend", "onnx", "--graphs", str(exports["onnx"]), "--device", "cuda"],
    }
    # A damaged export.json, a missing graph file, a folder of another model (by name, and by config).
    damaged = Path(shutil.copytree(exports["onnx"], tmp_path / "damaged"))
    (damaged / "export.json").write_text("{not json")
    cases["export.json is damaged"] = ["--backend", "onnx", "--graphs", str(damaged)]
    missing = Path(shutil.copytree(exports["openvino"], tmp_path / "missing"))
    (missing / "vision.bin").unlink()
    cases["vision.bin is missing"] = ["--backend", "openvino", "--graphs", str(missing)]
    hub = Path(shutil.copytree(exports["onnx"], tmp_path / "hub"))
    info = json.loads((hub / "export.json").read_text())
    (hub / "export.json").write_text(json.dumps({**info, "model": "google/siglip-so400m-patch14-384",
                                                 "revision": "9fdffc58"}))
    cases[f"was exported from google/siglip-so400m-patch14-384 (revision 9fdffc58), not from --model "
          f"{tiny_ckpt}"] = ["--backend", "onnx", "--graphs", str(hub)]
    wide = Path(shutil.copytree(exports["onnx"], tmp_path / "wide"))
    cfg = json.loads((wide / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] *= 2
    (wide / "config.json").write_text(json.dumps(cfg))
    cases["whose config.json differs from that of --model"] = ["--backend", "onnx", "--graphs", str(wide)]
    vision_only = tmp_path / "vision_only"
    siglip_so400m.export(tiny_ckpt, vision_only, format="onnx", towers=("vision",))
    cases["has no text graph (export.json lists vision)"] = [
        "--backend", "onnx", "--graphs", str(vision_only), "--captions"]
    for says, extra in cases.items():
        err = _usage(capsys, [*base, *extra])
        assert says in err, (says, err)
        assert err.count("error:") == 1
    # Without the runtime: the extra is named.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = _usage(capsys, [*base, "--backend", "onnx", "--graphs", str(exports["onnx"])])
    assert "onnxruntime is missing" in err and 'pip install -e ".[export]"' in err
    assert not (tmp_path / "out").exists()  # nothing was written by any of them


# ---- serve ----

def _server(model, processor, backend: str = "torch"):
    from siglip_so400m.serve.app import Server, Settings
    from siglip_so400m.serve.batcher import Batcher, Metrics

    metrics = Metrics()
    batcher = Batcher(model, max_batch=8, max_wait_s=0.002, max_queue=256, metrics=metrics)
    settings = Settings(model_name="tiny", revision=None, precision=model.precision, backend=backend,
                        raw_embeddings=getattr(model, "raw_embeddings", True))
    batcher.start()
    return Server(model, processor, settings, batcher, metrics)


async def _post(app, path: str, body: dict) -> tuple[int, dict]:
    content = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(content)).encode())]}
    sent, out = False, {"body": b""}

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}
        await asyncio.Event().wait()

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    await app(scope, receive, send)
    return out["status"], json.loads(out["body"])


def _png(seed: int, size: tuple[int, int]) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_on_graphs_answers_embeddings_and_classify_as_torch_does(backend, tiny_ckpt, exports):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from siglip_so400m.serve.app import create_app

    model, processor = siglip_so400m.load(tiny_ckpt)
    net, proc = open_graphs(exports[backend], backend, model.checkpoint, ("vision", "text"))
    images = [_png(i, (30 + 7 * i, 40)) for i in range(3)]
    inputs = [TEXTS[0], images[0], *TEXTS[1:], *images[1:]]
    body = {"input": inputs}
    classify = {"images": images, "labels": ["a red square", "a cat", "noise"]}

    async def ask(app) -> list[tuple[int, dict]]:
        return [await _post(app, "/v1/embeddings", body), await _post(app, "/v1/classify", classify),
                await _post(app, "/v1/embeddings", {"input": TEXTS[0], "normalize": False})]

    answers = []
    for m, p, b in ((net, proc, backend), (model, processor, "torch")):
        server = _server(m, p, b)
        try:
            answers.append(asyncio.run(asyncio.wait_for(ask(create_app(server)), 60)))
        finally:
            server.batcher.close()
    (s1, emb), (s2, cls), (s3, raw) = answers[0]
    (t1, emb_t), (t2, cls_t), _ = answers[1]
    assert (s1, s2, t1, t2) == (200, 200, 200, 200), (emb, cls)
    a = torch.tensor([d["embedding"] for d in emb["data"]])
    b = torch.tensor([d["embedding"] for d in emb_t["data"]])
    assert a.shape == (len(inputs), 64)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # And against transformers, row by row: texts and images in the request's order.
    pixels = processor.images([Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in images])
    hf_img, hf_txt = _hf(tiny_ckpt, pixels, processor.texts(TEXTS))
    ref = torch.cat([hf_txt[:1], hf_img[:1], hf_txt[1:], hf_img[1:]])
    torch.testing.assert_close(a, F.normalize(ref, dim=-1), atol=1e-4, rtol=0)
    for g, t in zip(cls["data"], cls_t["data"], strict=True):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in t["predictions"]]
        for p, q in zip(g["predictions"], t["predictions"], strict=True):
            assert p["logit"] == pytest.approx(q["logit"], abs=1e-3)  # t ~ 10 times the cosine's 1e-4
    # The graphs give normalized embeddings only: a raw request is refused, not answered normalized.
    assert s3 == 422 and "normalized embeddings only" in raw["error"]["message"]


def test_serve_cli_refuses_wrong_graphs_with_usage_errors_and_a_perturbed_one_with_numbers(
        tiny_ckpt, exports, capsys, monkeypatch):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from siglip_so400m.serve import serve_main

    for argv, says in ((["--backend", "openvino"], "--backend openvino needs --graphs DIR"),
                       (["--backend", "openvino", "--graphs", str(exports["onnx"])],
                        "holds onnx graphs (export.json), not openvino"),
                       (["--backend", "onnx", "--graphs", str(exports["onnx"]), "--dtype", "int8"],
                        "compute in float32 (export.json)")):
        with pytest.raises(SystemExit) as e:
            serve_main(["--model", str(tiny_ckpt), *argv])
        assert e.value.code == 2
        assert says in capsys.readouterr().err
    # The start-up check, before the port opens: exit 1 with the numbers.
    real = exporting.Graph.__call__
    monkeypatch.setattr(exporting.Graph, "__call__", lambda self, *x: real(self, *x) * np.float32(0.999))
    assert serve_main(["--model", str(tiny_ckpt), "--backend", "openvino", "--graphs",
                       str(exports["openvino"]), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"vision graph vision\.xml \(OpenVINO, float32\) does not compute what --model .* "
                     r"max \|diff\| \d\.\d+e-0[34] > 0\.0001", err), err


def test_naflex_embed_on_an_onnx_graph_equals_torch_and_transformers_siglip2(naflex_ckpt, tmp_path):
    _needs_runtimes()
    from transformers import Siglip2ImageProcessorPil, Siglip2Model

    siglip_so400m.export(naflex_ckpt, tmp_path / "g", format="onnx", towers=("vision",))
    photos = tmp_path / "photos"
    photos.mkdir()
    images = []
    for i, (h, w) in enumerate(((20, 90), (80, 30), (50, 50))):  # three grids, three paddings
        images.append(Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)))
        images[-1].save(photos / f"{i}.png")
    kw = {"model": str(naflex_ckpt), "workers": 0, "batch_size": 3}
    got = siglip_so400m.embed(photos, tmp_path / "onnx", backend="onnx", graphs=tmp_path / "g", **kw)
    siglip_so400m.embed(photos, tmp_path / "torch", dtype="float32", **kw)
    assert got["backend"] == "onnx" and got["counts"]["images"] == 3
    a, b = (np.load(tmp_path / d / "img_emb" / "img_emb_000000.npy").astype(np.float32)
            for d in ("onnx", "torch"))
    assert np.abs(a - b).max() <= 2**-11
    inputs = Siglip2ImageProcessorPil.from_pretrained(str(naflex_ckpt))(images=images, return_tensors="pt")
    with torch.inference_mode():
        ref = Siglip2Model.from_pretrained(str(naflex_ckpt)).eval().get_image_features(**inputs)
    ref = F.normalize(ref if torch.is_tensor(ref) else ref.pooler_output, dim=-1)
    np.testing.assert_allclose(a, ref.numpy(), atol=2**-11, rtol=0)


def test_a_dtype_the_graphs_do_not_compute_in_is_refused_with_an_export_that_exists():
    from siglip_so400m.backends import BackendError, check_dtype
    from siglip_so400m.exporting import PRECISIONS

    # bfloat16 is OpenVINO's: ONNX refuses `export --format onnx --dtype bfloat16`, so that is not
    # the advice; the export that makes bfloat16 graphs is.
    with pytest.raises(BackendError) as e:
        check_dtype("bfloat16", {"precision": "float32"}, "onnx")
    assert "export with --format openvino --dtype bfloat16 and run those graphs with --backend openvino" \
        in str(e.value) and "--format onnx" not in str(e.value)
    with pytest.raises(BackendError, match=r"export with --format onnx --dtype int8 and run those graphs "
                       r"with --backend onnx"):
        check_dtype("int8", {"precision": "float32"}, "openvino")
    with pytest.raises(BackendError, match=r"or export them again with --dtype int8$"):
        check_dtype("int8", {"precision": "float32"}, "onnx")
    with pytest.raises(BackendError, match=r"export them again with --fp16"):
        check_dtype("fp16", {"precision": "float32"}, "openvino")
    # Every --format/--dtype pair advised is one that export takes.
    for backend, precisions in PRECISIONS.items():
        for dtype in {"float32", "bfloat16", "int8"} - set(precisions):
            with pytest.raises(BackendError) as e:
                check_dtype(dtype, {"precision": "float32"}, backend)
            advised = re.search(r"--format (\w+) --dtype (\w+)", str(e.value))
            assert advised and advised[2] in PRECISIONS[advised[1]], str(e.value)
