"""Zero-shot classification: parity with transformers' pipeline, the label cache, the CLI's
output and every bad-input case."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import siglip_so400m
from siglip_so400m.model import TextTower
from siglip_so400m.zeroshot import LabelCache, ZeroShotClassifier, embed_labels, zero_shot_main

ROOT = Path(__file__).parents[1]
SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
# Real photographs that scikit-image ships, of different sizes and modes.
PHOTOS = {
    "chelsea.png": "RGB 451x300, a cat",
    "astronaut.png": "RGB 512x512",
    "camera.png": "L 512x512, grayscale",
    "rocket.jpg": "JPEG RGB 427x640, portrait",
    "logo.png": "RGBA 500x500, transparency",
    "coffee.png": "RGB 600x400",
}
LABELS = ["a cat", "a dog", "an astronaut", "a rocket", "a cup of coffee", "2 cats"]
TEMPLATE = "This is a photo of {}."


def photo(name: str) -> str:
    return str(SKIMAGE_DATA / name)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = zero_shot_main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def pipeline_reference(ckpt: Path, images: list[str], labels: list[str], template: str):
    """transformers' zero-shot pipeline on the same folder, given the PIL image processor:
    its scores, and the logits its own preprocess/forward produce."""
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer, pipeline

    pipe = pipeline("zero-shot-image-classification", model=SiglipModel.from_pretrained(ckpt),
                    tokenizer=SiglipTokenizer.from_pretrained(ckpt),
                    image_processor=SiglipImageProcessorPil.from_pretrained(ckpt), device="cpu")
    out = []
    for image in images:
        scores = pipe(image, candidate_labels=labels, hypothesis_template=template)
        with torch.no_grad():
            inputs = pipe.preprocess(image, candidate_labels=labels, hypothesis_template=template)
            logits = pipe._forward(inputs)["logits"][0]
        out.append((scores, dict(zip(labels, logits.tolist(), strict=True))))
    return out


def assert_matches_pipeline(results: list[dict], reference, labels: list[str]) -> None:
    for record, (scores, logits) in zip(results, reference, strict=True):
        preds = record["predictions"]
        assert [p["label"] for p in preds] == [s["label"] for s in scores]  # identical ranking
        for p, s in zip(preds, scores, strict=True):
            assert p["score"] == pytest.approx(s["score"], abs=1e-4)
            assert p["logit"] == pytest.approx(logits[p["label"]], abs=1e-3)
        assert sum(p["softmax"] for p in preds) == pytest.approx(1.0, abs=1e-5)
        assert len(preds) == len(labels)


def test_cli_json_equals_transformers_pipeline_on_real_photos_tiny(capsys, tiny_ckpt, tmp_path):
    images = [photo(n) for n in PHOTOS]
    code, out, err = run_cli(capsys, *images, "--labels", *LABELS, "--model", tiny_ckpt, "--json",
                             "--dtype", "float32", "--cache-dir", tmp_path)
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == images
    ref = pipeline_reference(tiny_ckpt, images, LABELS, TEMPLATE)
    assert_matches_pipeline(results, ref, LABELS)
    # The random checkpoint must spread the logits, or equal rankings would prove little.
    assert max(abs(a - b) for a, b in zip(ref[0][1].values(), ref[1][1].values(), strict=True)) > 0.05


@pytest.mark.slow
def test_cli_json_equals_transformers_pipeline_so400m(capsys, so400m_ckpt, tmp_path):
    # One photo: the pipeline runs each image through the full-size model twice (its scores, then
    # its logits), minutes on a 2-core CPU; several images and batching are checked on the tiny model.
    images = [photo("chelsea.png")]
    labels = LABELS[:4]
    code, out, err = run_cli(capsys, *images, "--labels", *labels, "--model", so400m_ckpt, "--json",
                             "--dtype", "float32", "--no-cache")
    assert code == 0, err
    results = json.loads(out)
    assert_matches_pipeline(results, pipeline_reference(so400m_ckpt, images, labels, TEMPLATE), labels)
    assert results[0]["dtype"] == "float32" and results[0]["revision"] is None


def test_json_output_carries_what_a_result_needs(capsys, tiny_ckpt, tmp_path):
    code, out, _ = run_cli(capsys, photo("chelsea.png"), "--labels", "a cat", "a dog", "--model", tiny_ckpt,
                           "--json", "--cache-dir", tmp_path, "--template", "a photo of {}")
    assert code == 0
    (record,) = json.loads(out)
    assert record["image"] == photo("chelsea.png")
    assert record["model"] == str(tiny_ckpt) and record["templates"] == ["a photo of {}"]
    assert record["dtype"] in ("bfloat16", "float32") and "revision" in record
    assert [set(p) for p in record["predictions"]] == [{"label", "score", "logit", "softmax"}] * 2
    for p in record["predictions"]:
        assert p["score"] == pytest.approx(torch.tensor(p["logit"]).sigmoid().item(), abs=1e-6)


def test_jsonl_top_k_threshold_and_table(capsys, tiny_ckpt, tmp_path):
    images = [photo("chelsea.png"), photo("coffee.png")]
    base = ["--labels", *LABELS, "--model", tiny_ckpt, "--cache-dir", tmp_path, "--dtype", "float32"]
    code, out, _ = run_cli(capsys, *images, *base, "--jsonl", "--top-k", "2")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["image"] for r in lines] == images
    assert all(len(r["predictions"]) == 2 for r in lines)
    full = json.loads(run_cli(capsys, *images, *base, "--json")[1])
    ranked = sorted(p["score"] for p in full[0]["predictions"])
    cut = (ranked[2] + ranked[3]) / 2  # midway, so batch-size rounding cannot move a label across
    code, out, _ = run_cli(capsys, images[0], *base, "--json", "--threshold", str(cut))
    assert [p["label"] for p in json.loads(out)[0]["predictions"]] == [
        p["label"] for p in full[0]["predictions"] if p["score"] >= cut]
    code, out, _ = run_cli(capsys, images[0], *base, "--score", "softmax", "--top-k", "3")
    lines = out.splitlines()
    assert lines[0] == images[0] and len(lines) == 5 and "softmax" in lines[-1]
    best = full[0]["predictions"][0]
    assert lines[1].split(None, 1) == [f"{best['softmax']:.2%}", best["label"]]


def test_text_tower_runs_once_for_all_images(tiny_ckpt, monkeypatch):
    model, proc = siglip_so400m.load(tiny_ckpt)
    calls = []
    real = TextTower.forward
    monkeypatch.setattr(TextTower, "forward", lambda self, ids: calls.append(ids.shape[0]) or real(self, ids))
    clf = ZeroShotClassifier(model, proc, LABELS[:5], ["a photo of {}", "a picture of {}"])
    clf([photo(n) for n in ["chelsea.png", "camera.png"] * 4], batch_size=3)
    assert calls == [10]  # 5 labels x 2 templates in one batch; never again for the 8 images


def test_templates_are_averaged_then_renormalized(tiny_ckpt):
    model, proc = siglip_so400m.load(tiny_ckpt)
    templates = ["a photo of {}", "a drawing of {}.", "{}"]
    got = embed_labels(model, proc.tokenizer, ["a cat", "a dog"], templates)
    with torch.no_grad():
        for i, label in enumerate(["a cat", "a dog"]):
            e = model.encode_text(proc.texts([t.format(label) for t in templates]), normalize=True)
            torch.testing.assert_close(got[i], torch.nn.functional.normalize(e.mean(0), dim=0))


def test_label_cache_skips_the_text_tower_and_gives_the_same_scores(tiny_ckpt, tmp_path, monkeypatch, capsys):
    args = [photo("chelsea.png"), "--labels", *LABELS, "--model", tiny_ckpt, "--json",
            "--cache-dir", tmp_path]
    code, first, _ = run_cli(capsys, *args)
    assert code == 0 and len(list(tmp_path.glob("labels-*/*.safetensors"))) == len(LABELS)

    def no_text(*a, **k):
        raise AssertionError("the text tower ran although every label was cached")

    monkeypatch.setattr(TextTower, "forward", no_text)
    code, second, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(second) == json.loads(first)
    # Different templates, or a new label, miss the cache and need the text tower again.
    with pytest.raises(AssertionError, match="text tower ran"):
        run_cli(capsys, *args, "--template", "a {}")
    with pytest.raises(AssertionError, match="text tower ran"):
        run_cli(capsys, *args[:-2], "--cache-dir", tmp_path, "--labels", "a new label")


def test_label_cache_key_follows_checkpoint_tokenizer_templates_and_dtype(tiny_copy, tmp_path):
    from siglip_so400m.weights import resolve

    ckpt = resolve(tiny_copy)
    tok = siglip_so400m.Tokenizer.from_folder(tiny_copy)
    key = LabelCache(tmp_path, ckpt, tok, ["{}"], "float32").path
    assert LabelCache(tmp_path, ckpt, tok, ["{}"], "float32").path == key
    assert LabelCache(tmp_path, ckpt, tok, ["a {}"], "float32").path != key
    assert LabelCache(tmp_path, ckpt, tok, ["{}"], "bfloat16").path != key
    assert LabelCache(tmp_path, ckpt, tok, ["{}"], "int8").path != key
    os.utime(tiny_copy / "model.safetensors", ns=(1, 1))  # the weights changed
    assert LabelCache(tmp_path, resolve(tiny_copy), tok, ["{}"], "float32").path != key
    tok2 = siglip_so400m.Tokenizer(tiny_copy / "spiece.model", do_lower_case=False)
    assert LabelCache(tmp_path, ckpt, tok2, ["{}"], "float32").path != key


def test_zero_shot_api_returns_sorted_labels_with_three_scores(tiny_ckpt, tmp_path):
    model, proc = siglip_so400m.load(tiny_ckpt)
    img = Image.open(photo("chelsea.png"))
    (res,) = siglip_so400m.zero_shot(model, proc, [img], LABELS, cache_dir=tmp_path)
    assert sorted(r["label"] for r in res) == sorted(LABELS)
    assert [r["logit"] for r in res] == sorted((r["logit"] for r in res), reverse=True)
    assert sum(r["softmax"] for r in res) == pytest.approx(1.0, abs=1e-5)
    again = siglip_so400m.zero_shot(model, proc, img, LABELS, cache_dir=tmp_path)[0]
    assert again == res


def test_bf16_and_fp32_runs_sharing_a_label_cache_each_get_their_own_numbers(tiny_ckpt, tmp_path):
    # The bug: precision read t' (kept float32), so a bf16 run filed its label embeddings under the
    # float32 key and a later float32 run scored against them.
    img = Image.open(photo("chelsea.png"))
    m32, p32 = siglip_so400m.load(tiny_ckpt)
    m16, p16 = siglip_so400m.load(tiny_ckpt, dtype=torch.bfloat16)
    assert (m32.precision, m16.precision) == ("float32", "bfloat16")
    alone32 = siglip_so400m.zero_shot(m32, p32, img, LABELS)[0]  # no cache at all
    alone16 = siglip_so400m.zero_shot(m16, p16, img, LABELS)[0]
    # bf16 moves the tiny model's logits by far more than the 1e-6 this test can tell apart.
    logits16 = {r["label"]: r["logit"] for r in alone16}
    gap = max(abs(r["logit"] - logits16[r["label"]]) for r in alone32)
    assert gap > 1e-3
    for _ in range(2):  # the first round fills the cache (bf16 first), the second reads it
        shared16 = siglip_so400m.zero_shot(m16, p16, img, LABELS, cache_dir=tmp_path)[0]
        shared32 = siglip_so400m.zero_shot(m32, p32, img, LABELS, cache_dir=tmp_path)[0]
        assert shared32 == alone32  # exactly: float32 embeddings round-trip safetensors unchanged
        assert shared16 == alone16
    assert len(list(tmp_path.glob("labels-*"))) == 2


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A PNG whose header claims 1.6 gigapixels: PIL must refuse it before decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def test_bad_images_are_reported_by_name_and_the_rest_classified(capsys, tiny_ckpt, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    cut = tmp_path / "cut.jpg"
    Image.open(photo("astronaut.png")).convert("RGB").save(cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    bomb = bomb_png(tmp_path / "bomb.png")
    bad = [tmp_path / "missing.jpg", tmp_path / "notes.jpg", tmp_path / "empty.png", cut, bomb]
    code, out, err = run_cli(capsys, photo("chelsea.png"), *bad, photo("coffee.png"), "--labels", "a cat",
                             "--model", tiny_ckpt, "--json", "--cache-dir", tmp_path / "c")
    assert code == 1
    results = json.loads(out)
    assert [r["image"] for r in results] == [photo("chelsea.png"), *map(str, bad), photo("coffee.png")]
    assert "predictions" in results[0] and "predictions" in results[-1]
    for path, why in zip(bad, ["no such file", "not an image", "not an image", "cannot decode",
                               "refused as a possible decompression bomb"], strict=True):
        assert f"error: {path}: {why}" in err
    assert "5 of 7 images failed" in err
    assert "Traceback" not in err


def test_folders_and_globs_expand_and_empty_ones_fail(capsys, tiny_ckpt, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("b.png", "a.jpg"):
        Image.open(photo("chelsea.png")).convert("RGB").save(pics / name)
    (pics / "readme.txt").write_text("not listed")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, pics, str(pics / "*.png"), tmp_path / "empty", str(tmp_path / "*.gif"),
                             "--labels", "x", "--model", tiny_ckpt, "--jsonl", "--no-cache")
    images = [json.loads(line)["image"] for line in out.splitlines()]
    assert images == [str(pics / "a.jpg"), str(pics / "b.png"), str(pics / "b.png"),
                      str(tmp_path / "empty"), str(tmp_path / "*.gif")]
    assert code == 1 and "no image files in this folder" in err and "no files match" in err


@pytest.mark.parametrize(("args", "message"), [
    ([], "no labels"),
    (["--labels", "a cat", ""], "empty label"),
    (["--labels", "a cat", "--template", "no placeholder"], "must contain one {}"),
    (["--labels", "a cat", "--top-k", "0"], "--top-k"),
    (["--labels", "a cat", "--threshold", "1.5"], "--threshold"),
    (["--labels", "a cat", "--dtype", "int4"], "invalid choice"),
    (["--labels", "a cat", "--device", "tpu9"], "--device tpu9"),
])
def test_usage_errors_exit_2(capsys, tiny_ckpt, args, message):
    code, out, err = run_cli(capsys, photo("chelsea.png"), "--model", tiny_ckpt, *args)
    assert code == 2 and message in err and out == ""


def test_duplicate_and_overlong_labels_warn(capsys, tiny_ckpt, tmp_path, monkeypatch):
    import threading

    import siglip_so400m.text

    # The truncation warning is said once per process: as if this were the first.
    monkeypatch.setattr(siglip_so400m.text, "_truncation_warned", threading.Event())
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("a cat\n\na dog\n" + "cat " * 80 + "\n")
    code, out, err = run_cli(capsys, photo("chelsea.png"), "--labels", "a cat", "--labels-file", labels_file,
                             "--model", tiny_ckpt, "--json", "--no-cache")
    assert code == 0
    assert "warning: duplicate labels merged: 'a cat'" in err
    assert "is over 64 tokens" in err and "truncated" in err
    assert len(json.loads(out)[0]["predictions"]) == 3


def test_offline_and_not_cached_gives_one_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "zero_shot.py"), photo("chelsea.png"),
                        "--labels", "a cat"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("error: cannot fetch google/siglip-so400m-patch14-384@main") == 1
    assert "--model DIR" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["-m", "siglip_so400m", "zero-shot"],
                                     [str(ROOT / "scripts" / "zero_shot.py")]])
def test_entry_points_run(tiny_ckpt, tmp_path, command):
    env = {**os.environ, "SIGLIP_SO400M_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, *command, photo("chelsea.png"), "--labels", "a cat", "a dog",
                        "--model", str(tiny_ckpt), "--json"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p["label"] for p in json.loads(r.stdout)[0]["predictions"]} == {"a cat", "a dog"}
    assert list(tmp_path.glob("labels-*/*.safetensors"))  # the default cache honours the variable


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("siglip-so400m")
    assert exe, "pip install -e . should put siglip-so400m on PATH"
    r = subprocess.run([exe, "zero-shot", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--labels" in r.stdout


def test_cli_int8_mode_reports_its_precision_and_caches_apart(capsys, tiny_ckpt, tmp_path):
    args = [photo("chelsea.png"), "--labels", "a cat", "a dog", "--model", tiny_ckpt, "--json",
            "--cache-dir", tmp_path]
    code, out, err = run_cli(capsys, *args, "--dtype", "int8")
    assert code == 0, err
    assert json.loads(out)[0]["dtype"] == "int8"
    run_cli(capsys, *args, "--dtype", "float32")
    assert len(list(tmp_path.glob("labels-*"))) == 2  # one cache folder per precision
