"""The image tower as a backbone: patch tokens of any layer at any size against transformers'
SiglipVisionModel (output_hidden_states=True, interpolate_pos_encoding=True), the truncated tower,
the position-table cache, the MAP head's attention map, and fine-tuning at another size.

The tiny config here keeps so400m's patch (14 px) and native size (384 px, a 27x27 grid), so that
224, 448 and a non-square size give the grids they give the real model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import siglip_so400m
from siglip_so400m.model import _resize_positions
from siglip_so400m.testing import TINY_TEXT, hf_config, save_checkpoint

ROOT = Path(__file__).parents[1]
SIZES = [(384, 384), (224, 224), (448, 448), (336, 476)]  # native, smaller, larger, non-square
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              image_size=384, patch_size=14)
L = VISION["num_hidden_layers"]


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spiece) -> Path:
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
    return save_checkpoint(tmp_path_factory.mktemp("backbone"),
                           hf_config(VISION, {**TINY_TEXT, "vocab_size": vocab}), spiece)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(ckpt).eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return siglip_so400m.load(ckpt, towers=("vision",))[0]


def pixels_of(size: tuple[int, int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, *size, generator=g) * 2 - 1


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_layer_matches_transformers_hidden_states_at_any_size(ours, hf, size):
    pixels = pixels_of(size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        layers = ours.image_features(pixels, layers=tuple(range(L + 1)), norm=False)
        (last,) = ours.image_features(pixels)  # layers=(-1,), norm=True
        pooled = ours.encode_image(pixels)
        (grid,) = ours.image_features(pixels, layers=(-2,), norm=False, grid=True)
    h, w = size[0] // 14, size[1] // 14
    assert len(ref.hidden_states) == L + 1 and len(layers) == L + 1
    for k, (got, want) in enumerate(zip(layers, ref.hidden_states, strict=True)):
        assert got.shape == (2, h * w, 64), k
        assert rel_diff(got, want) <= 1e-5, k
    assert rel_diff(last, ref.last_hidden_state) <= 1e-5
    assert rel_diff(pooled, ref.pooler_output) <= 1e-5
    assert grid.shape == (2, 64, h, w)
    assert torch.equal(grid, layers[-2].transpose(1, 2).reshape(2, 64, h, w))
    # Teeth: the layers differ from each other, and at other sizes the table was really resized.
    assert rel_diff(layers[1], layers[0]) > 0.1 and rel_diff(layers[-1], layers[-2]) > 0.1


def test_layers_come_in_the_order_asked_and_negative_ones_count_from_the_end(ours):
    pixels = pixels_of((224, 224), batch=1)
    with torch.no_grad():
        every = ours.image_features(pixels, layers=tuple(range(L + 1)), norm=False)
        picked = ours.image_features(pixels, layers=(3, 0, -1, -2, -(L + 1)), norm=False)
        normed = ours.image_features(pixels, layers=(2,), norm=True)
    for got, k in zip(picked, (3, 0, L, L - 1, 0), strict=True):
        assert torch.equal(got, every[k])
    assert torch.equal(normed[0], ours.vision_model.post_layernorm(every[2]))


def test_blocks_past_the_deepest_requested_layer_are_not_run(ours):
    ran: list[int] = []
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
             for k, block in enumerate(ours.vision_model.encoder.layers)]
    try:
        with torch.no_grad():
            for layers, expected in [((-1,), [0, 1, 2, 3]), ((-2,), [0, 1, 2]), ((1, 0), [0]), ((0,), [])]:
                ran.clear()
                ours.image_features(pixels_of((224, 224), batch=1), layers=layers)
                assert ran == expected, layers
    finally:
        for hook in hooks:
            hook.remove()


def test_truncated_tower_matches_and_never_reads_the_dropped_block_or_the_head(ckpt, hf, ours, record_reads):
    reads = record_reads(siglip_so400m.weights)
    cut, _ = siglip_so400m.load(ckpt, towers=("vision",), vision_layers=L - 1)
    assert len(cut.vision_model.encoder.layers) == L - 1 and cut.vision_model.head is None
    read = set(reads)
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in read
    assert "vision_model.post_layernorm.weight" in read  # kept: norm=True still works
    dropped = [k for k in read if k.startswith((f"vision_model.encoder.layers.{L - 1}.",
                                                "vision_model.head.", "text_model."))]
    assert not dropped, dropped
    # The file does hold them (so "not read" means something).
    full_keys = set(siglip_so400m.weights.safe_open(str(ckpt / "model.safetensors"), "pt").keys())
    assert f"vision_model.encoder.layers.{L - 1}.mlp.fc1.weight" in full_keys
    assert "vision_model.head.probe" in full_keys

    pixels = pixels_of((448, 448))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        (got,) = cut.image_features(pixels, layers=(-1,), norm=False)  # its last block: L - 1
        (same,) = ours.image_features(pixels, layers=(L - 1,), norm=False)
    assert rel_diff(got, ref.hidden_states[L - 1]) <= 1e-5
    assert torch.equal(got, same)
    with pytest.raises(RuntimeError, match=rf"vision_layers={L - 1} of {L} blocks.*image_features"):
        cut.encode_image(pixels)
    with pytest.raises(RuntimeError, match="no MAP head"):
        siglip_so400m.attention_map(cut, pixels)


def test_bad_backbone_input_gets_one_clear_message(ckpt, ours):
    with pytest.raises(ValueError, match=r"13x100 pixels is smaller than one 14x14 patch"):
        ours.image_features(torch.zeros(1, 3, 13, 100))
    with pytest.raises(ValueError, match=r"smaller than one 14x14 patch"):
        ours.encode_image(torch.zeros(1, 3, 100, 10))
    for bad in (L + 1, -(L + 2)):
        with pytest.raises(ValueError, match=rf"layer {bad} is out of range.*from 0 \(the embeddings\) "
                                             rf"to {L}.*-{L + 1} to -1"):
            ours.image_features(torch.zeros(1, 3, 28, 28), layers=(0, bad))
    with pytest.raises(ValueError, match="non-empty sequence"):
        ours.image_features(torch.zeros(1, 3, 28, 28), layers=())
    for bad in (0, L + 1, 2.0):
        with pytest.raises(ValueError, match=rf"vision_layers must be between 1 and {L}"):
            siglip_so400m.load(ckpt, towers=("vision",), vision_layers=bad)


def test_position_table_is_cached_per_size_and_follows_the_weights(ckpt):
    model, _ = siglip_so400m.load(ckpt, towers=("vision",))
    emb = model.vision_model.embeddings
    table = emb.position_embedding.weight
    assert emb.positions(27, 27) is table  # the native grid: the table itself
    with torch.no_grad():
        small = emb.positions(16, 16)
        assert emb.positions(16, 16) is small  # resized once per size
        assert emb.positions(16, 20).shape == (320, 64)
        torch.testing.assert_close(small, _resize_positions(table, 27, 16, 16), atol=0, rtol=0)
        table.mul_(2)  # weights changed in place, as an optimizer step does
        moved = emb.positions(16, 16)
    assert moved is not small
    torch.testing.assert_close(moved, _resize_positions(table.detach(), 27, 16, 16), atol=0, rtol=0)
    # Training: the resize is part of the graph, so the table gets a gradient through it.
    model.train()
    (x,) = model.image_features(pixels_of((224, 224), batch=1), layers=(1,))
    x.square().mean().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    # Casting the weights computes anew, in the weights' dtype.
    model.to(torch.bfloat16)
    with torch.no_grad():
        bf16 = emb.positions(16, 16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, _resize_positions(emb.position_embedding.weight.detach(), 27, 16, 16))


def test_bf16_positions_are_resized_in_bf16_as_transformers_does(ckpt):
    from transformers import SiglipVisionModel

    hf = SiglipVisionModel.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    model, _ = siglip_so400m.load(ckpt, towers=("vision",), dtype=torch.bfloat16)
    pixels = pixels_of((224, 336))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        (x,) = model.image_features(pixels, layers=(0,), norm=False)
    assert x.dtype == torch.bfloat16
    assert torch.equal(x, ref.hidden_states[0])


def test_per_image_loop_is_a_switch_and_steps_aside_for_gradients_and_autocast(ours, monkeypatch):
    calls: list[int] = []
    hook = ours.vision_model.embeddings.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pixels = pixels_of((224, 224), batch=3)
    tower = ours.vision_model
    try:
        for switch, grad, amp, expected in [(True, False, False, [1, 1, 1]), (False, False, False, [3]),
                                            (True, True, False, [3]), (True, False, True, [3])]:
            monkeypatch.setattr(tower, "per_image_on_cpu", switch)
            calls.clear()
            with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=amp):
                ours.encode_image(pixels)
            assert calls == expected, (switch, grad, amp)
    finally:
        hook.remove()
    # With the switch off the batch runs whole, and each image still equals itself alone.
    monkeypatch.setattr(tower, "per_image_on_cpu", False)
    with torch.no_grad():
        batch = ours.image_features(pixels, layers=(1, -1))
        for i in range(3):
            alone = ours.image_features(pixels[i : i + 1], layers=(1, -1))
            for a, b in zip(alone, batch, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(384, 384), (224, 308)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_attention_map_equals_transformers_pooling_head_weights(ours, hf, size):
    pixels = pixels_of(size)
    with torch.no_grad():
        last = hf(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        head = hf.head
        probe = head.probe.repeat(2, 1, 1)
        _, ref = head.attention(probe, last, last, need_weights=True, average_attn_weights=False)
    weights = siglip_so400m.attention_map(ours, pixels)
    h, w = size[0] // 14, size[1] // 14
    assert weights.shape == (2, 4, h, w)  # (B, heads, h, w)
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(2, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(weights, ref.reshape(2, 4, h, w), atol=1e-5, rtol=0)
    assert rel_diff(weights, ref.reshape(2, 4, h, w)) <= 1e-5  # weights are ~1/N, so relative too
    assert ref.std() / ref.mean() > 0.05  # the maps are not flat: the comparison has teeth


def test_attention_map_cli_writes_png_overlays(ckpt, tmp_path, capsys):
    from siglip_so400m.cli import main

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.new("L", (200, 200), 128).save(tmp_path / "b.jpg")
    out = tmp_path / "maps"
    code = main(["attention-map", str(tmp_path / "a.png"), str(tmp_path / "b.jpg"),
                 str(tmp_path / "missing.png"), "--output", str(out), "--model", str(ckpt), "--per-head"])
    captured = capsys.readouterr()
    assert code == 1 and "missing.png" in captured.err  # the bad one named, the others written
    assert sorted(p.name for p in out.iterdir()) == ["a.attention.png", "a.heads.png",
                                                     "b.attention.png", "b.heads.png"]
    overlay = Image.open(out / "a.attention.png")
    assert overlay.format == "PNG" and overlay.mode == "RGB"
    assert overlay.width > 420 and overlay.height == 300  # the image plus its colour bar
    picture = np.asarray(overlay)[:, :420].astype(int)
    assert np.abs(picture - np.asarray(Image.open(tmp_path / "a.png"))).mean() > 5  # something drawn
    heads = Image.open(out / "a.heads.png")
    assert heads.size == (2 * 192, 2 * (137 + 14))  # 2x2 tiles of 192x137 for 4 heads, each labelled


def test_processor_resizes_to_any_size_as_transformers_does(ckpt):
    from transformers import SiglipImageProcessorPil

    _, proc = siglip_so400m.load(ckpt, towers=("vision",))
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (250, 333, 3), dtype=np.uint8))
    for size in ((224, 224), (336, 476)):
        ref = SiglipImageProcessorPil(size={"height": size[0], "width": size[1]})(image, return_tensors="pt")
        got = proc.images([image], size=size)
        assert got.shape == (1, 3, *size) and torch.equal(got, ref["pixel_values"])
    assert proc.images([image]).shape == (1, 3, 384, 384)
    assert torch.equal(proc.images([image], size=224), proc.images([image], size=(224, 224)))
    with pytest.raises(ValueError, match="size must be"):
        proc.images([image], size=(0, 10))


def test_zero_shot_cli_image_size_equals_transformers_at_that_size(ckpt, tmp_path, capsys):
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    from siglip_so400m.zeroshot import zero_shot_main

    rng = np.random.default_rng(2)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(path)
    labels = ["a cat", "a dog", "a plane"]
    code = zero_shot_main([str(path), "--labels", *labels, "--model", str(ckpt), "--json", "--dtype",
                           "float32", "--no-cache", "--image-size", "224"])
    out, err = capsys.readouterr()
    assert code == 0, err
    preds = {p["label"]: p for p in json.loads(out)[0]["predictions"]}
    hf = SiglipModel.from_pretrained(ckpt).eval()
    def hf_pixels(side: int) -> torch.Tensor:
        proc = SiglipImageProcessorPil(size={"height": side, "width": side})
        return proc(Image.open(path), return_tensors="pt")["pixel_values"]

    ids = SiglipTokenizer.from_pretrained(ckpt)([f"This is a photo of {x}." for x in labels],
                                                padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        ref = hf(pixel_values=hf_pixels(224), input_ids=ids["input_ids"],
                 interpolate_pos_encoding=True).logits_per_image[0]
        native = hf(pixel_values=hf_pixels(384), input_ids=ids["input_ids"]).logits_per_image[0]
    for label, logit in zip(labels, ref.tolist(), strict=True):
        assert preds[label]["logit"] == pytest.approx(logit, abs=1e-4)
    assert (ref - native).abs().max() > 1e-3  # the size did change the answer


def test_finetune_at_another_image_size_saves_a_checkpoint_transformers_loads(ckpt, tmp_path):
    from transformers import SiglipImageProcessorPil, SiglipModel

    rows = []
    for i in range(8):
        Image.new("RGB", (60, 50), (30 * i, 255 - 30 * i, 100)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"colour number {i}"})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--model", str(ckpt), "--data",
         str(tmp_path / "data.csv"), "--output-dir", str(out), "--steps", "2", "--batch-size", "4",
         "--precision", "fp32", "--num-workers", "0", "--save-every", "0", "--image-size", "224"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["vision_config"]["image_size"] == 224
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 224, "width": 224}

    ours, proc = siglip_so400m.load(out)
    hf = SiglipModel.from_pretrained(out).eval()
    assert hf.vision_model.embeddings.position_embedding.weight.shape == (256, 64)  # a 16x16 grid
    images = [tmp_path / "0.png", tmp_path / "5.png"]
    pixels = proc.images(images)
    assert pixels.shape == (2, 3, 224, 224)
    assert torch.equal(pixels, SiglipImageProcessorPil.from_pretrained(out)(
        [Image.open(p) for p in images], return_tensors="pt")["pixel_values"])
    ids = proc.texts(["colour number 0", "colour number 5"])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids)
        torch.testing.assert_close(ours.encode_image(pixels, normalize=True), ref.image_embeds,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(pixels, ids), ref.logits_per_image, atol=1e-5, rtol=0)
    # It trained from the resized table, not from scratch: close to the resize, but moved by training.
    base, _ = siglip_so400m.load(ckpt, towers=("vision",))
    resized = _resize_positions(base.vision_model.embeddings.position_embedding.weight.detach(), 27, 16, 16)
    trained = ours.vision_model.embeddings.position_embedding.weight.detach()
    assert 0 < (trained - resized).abs().max() < 0.1 * resized.abs().max()


@pytest.mark.slow
def test_backbone_matches_transformers_so400m(so400m_ckpt):
    """The full so400m shape at 384, 224, 448 and 336x476, batch 1: every layer at each size,
    norm=True and encode_image at all but 448 (a second 448 forward would cost the most and prove
    the least), and the 26-block tower LLaVA-OneVision runs against hidden_states[26]."""
    from transformers import SiglipVisionModel

    hf = SiglipVisionModel.from_pretrained(so400m_ckpt).eval()
    model, _ = siglip_so400m.load(so400m_ckpt, towers=("vision",))
    n = model.config.vision_config.num_hidden_layers
    for size in SIZES:
        pixels = pixels_of(size, batch=1)
        with torch.no_grad():
            ref = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
            layers = model.image_features(pixels, layers=tuple(range(n + 1)), norm=False)
        worst = max(rel_diff(a, b) for a, b in zip(layers, ref.hidden_states, strict=True))
        print(f"\nso400m {size}: worst layer {worst:.1e}")
        assert len(layers) == n + 1 and worst <= 1e-5
        if size != (448, 448):  # the public calls too, where they cost little
            with torch.no_grad():
                (last,) = model.image_features(pixels)
                pooled = model.encode_image(pixels)
            print(f"last {rel_diff(last, ref.last_hidden_state):.1e}, "
                  f"pooled {rel_diff(pooled, ref.pooler_output):.1e}")
            assert rel_diff(last, ref.last_hidden_state) <= 1e-5
            assert rel_diff(pooled, ref.pooler_output) <= 1e-5
        if size == (384, 384):
            ref26 = ref.hidden_states[n - 1]  # so400m: hidden_states[26]
        del ref, layers
    del model
    cut, _ = siglip_so400m.load(so400m_ckpt, towers=("vision",), vision_layers=n - 1)
    with torch.no_grad():
        (x,) = cut.image_features(pixels_of((384, 384), batch=1), norm=False)
    assert rel_diff(x, ref26) <= 1e-5
