"""SigLIP 2 NaFlex (google/siglip2-so400m-patch16-naflex) against transformers' Siglip2Model and its PIL
Siglip2ImageProcessor, computed in this run from a tiny random checkpoint in the Hub layout (see
siglip_so400m.testing.save_naflex_checkpoint; its position table has structure, not noise)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import siglip_so400m
from siglip_so400m import model as model_module
from siglip_so400m.config import SiglipConfig
from siglip_so400m.errors import RecordMismatch
from siglip_so400m.image import NaFlexImageProcessor, NaFlexPixels
from siglip_so400m.testing import NAFLEX, hub_cache
from siglip_so400m.weights import CheckpointError

# (height, width): aspect ratios 1:8 to 8:1, smaller than one patch, and far larger than any budget.
SIZES = [(40, 320), (320, 40), (50, 200), (200, 50), (90, 180), (180, 90), (128, 128), (333, 97),
         (3, 5), (1, 1), (7, 60), (2000, 1500), (700, 5600)]


def _image(h: int, w: int, seed: int) -> Image.Image:
    """A smooth gradient with noise on it: the resize filter shows in every pixel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 40, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


IMAGES = [_image(h, w, i) for i, (h, w) in enumerate(SIZES)]


def _hf_inputs(folder, images, **kw) -> dict[str, torch.Tensor]:
    from transformers import Siglip2ImageProcessorPil

    out = Siglip2ImageProcessorPil.from_pretrained(str(folder), **kw)(images=images, return_tensors="pt")
    return {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


@pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
def test_patches_mask_and_grid_sizes_match_transformers_pil_processor_bit_for_bit(max_num_patches):
    from transformers import Siglip2ImageProcessorPil

    ref = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=max_num_patches)
    ours = NaFlexImageProcessor(patch_size=16, max_num_patches=max_num_patches)
    want = ref(images=IMAGES, return_tensors="pt")
    got = ours(IMAGES)
    assert got.patches.dtype == want["pixel_values"].dtype == torch.float32
    assert torch.equal(got.patches, want["pixel_values"])
    assert torch.equal(got.mask, want["pixel_attention_mask"].bool())
    assert torch.equal(got.spatial_shapes, want["spatial_shapes"])
    # The budget is used: no grid could take another row or column of patches.
    for h, w in got.spatial_shapes.tolist():
        assert h * w <= max_num_patches and min(h, w) >= 1


def test_load_reads_the_naflex_hub_layout_as_transformers_does(naflex_ckpt):
    from transformers import Siglip2Config

    cfg = SiglipConfig.from_json(naflex_ckpt / "config.json")
    hf = Siglip2Config.from_pretrained(str(naflex_ckpt))
    assert json.loads((naflex_ckpt / "config.json").read_text())["model_type"] == "siglip2"
    v = cfg.vision_config
    assert (v.num_patches, v.patch_size, v.hidden_size, v.num_hidden_layers) == (
        hf.vision_config.num_patches, hf.vision_config.patch_size, hf.vision_config.hidden_size,
        hf.vision_config.num_hidden_layers)
    assert cfg.naflex and v.image_size is None and v.grid_size == 8
    model, proc = siglip_so400m.load(naflex_ckpt)
    assert isinstance(model.vision_model.embeddings.patch_embedding, torch.nn.Linear)
    assert (proc.image.max_num_patches, proc.image.patch_size, proc.image.resample) == (256, 8, 2)
    # The config we write back is read by transformers to the same shape.
    assert Siglip2Config.from_dict(cfg.to_dict()).vision_config.num_patches == 64


def test_naflex_loads_by_hub_id_offline_from_the_hub_cache(naflex_ckpt, tmp_path):
    hub_cache(tmp_path / "cache", NAFLEX, naflex_ckpt)
    code = ("import siglip_so400m\n"
            f"m, p = siglip_so400m.load({NAFLEX!r})\n"
            "x = p.images([__import__('PIL.Image').Image.new('RGB', (300, 40))])\n"
            "print(type(x).__name__, x.spatial_shapes.tolist(), p.texts(['a cat']).shape[1])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    h, w = _hf_inputs(naflex_ckpt, [Image.new("RGB", (300, 40))])["spatial_shapes"][0].tolist()
    assert r.stdout.split() == ["NaFlexPixels", f"[[{h},", f"{w}]]", "64"]


def _reference(folder, images, ids, **kw):
    from transformers import Siglip2Model

    ref = Siglip2Model.from_pretrained(str(folder)).eval()
    inputs = _hf_inputs(folder, images, **kw)
    with torch.inference_mode():
        out = ref(input_ids=ids, **inputs)
    return ref, inputs, out


@pytest.mark.parametrize("max_num_patches", [64, 256])
def test_embeddings_and_logits_match_transformers_alone_and_batched(naflex_ckpt, max_num_patches):
    model, proc = siglip_so400m.load(naflex_ckpt)
    texts = ["a photo of 2 cats", "東京タワー", "a receipt", "a panorama"]
    ids = proc.texts(texts)
    _, inputs, out = _reference(naflex_ckpt, IMAGES, ids, max_num_patches=max_num_patches)
    pixels = proc.images(IMAGES, max_num_patches=max_num_patches)
    assert torch.equal(pixels.patches, inputs["pixel_values"])
    with torch.inference_mode():
        batched = model.encode_image(pixels, normalize=True)  # on CPU: each image at its own length
        logits = model(pixels, ids)
        alone = torch.cat([model.encode_image(pixels[i], normalize=True) for i in range(len(pixels))])
        model.vision_model.per_image_on_cpu = False  # one padded batch, the padding masked out
        try:
            masked = model.encode_image(pixels, normalize=True)
            # Padded further than the processor pads: the padding changes nothing.
            longer = model.encode_image(NaFlexPixels.cat([pixels], length=max_num_patches + 37),
                                        normalize=True)
        finally:
            model.vision_model.per_image_on_cpu = True
    torch.testing.assert_close(batched, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(longer, out.image_embeds, atol=1e-5, rtol=0)
    assert torch.equal(alone, batched)  # the same loop: the same bits in any batch
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-3, rtol=0)


def test_hidden_states_of_every_layer_match_transformers_without_padding(naflex_ckpt):
    model, proc = siglip_so400m.load(naflex_ckpt, towers=("vision",))
    from transformers import Siglip2VisionModel

    ref = Siglip2VisionModel.from_pretrained(str(naflex_ckpt)).eval()
    inputs = _hf_inputs(naflex_ckpt, IMAGES, max_num_patches=64)
    with torch.inference_mode():
        out = ref(**inputs, output_hidden_states=True)
        pixels = proc.images(IMAGES, max_num_patches=64)
        L = len(out.hidden_states)
        raw = model.image_features(pixels, layers=tuple(range(L)), norm=False)
        last = model.image_features(pixels, layers=(-1,), norm=True)[0]
        grids = model.image_features(pixels, layers=(-1,), grid=True)[0]
    for k in range(L):
        assert len(raw[k]) == len(IMAGES)
        for i, (h, w) in enumerate(inputs["spatial_shapes"].tolist()):
            want = out.hidden_states[k][i, : h * w]
            assert raw[k][i].shape == want.shape  # the image's own tokens, no padding
            torch.testing.assert_close(raw[k][i], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for i, (h, w) in enumerate(inputs["spatial_shapes"].tolist()):
        torch.testing.assert_close(last[i], out.last_hidden_state[i, : h * w], rtol=1e-5, atol=1e-5)
        assert grids[i].shape == (64, h, w)
        torch.testing.assert_close(grids[i].flatten(1).t(), last[i], rtol=0, atol=0)


@pytest.mark.parametrize("mode,antialias", [("bicubic", True), ("bilinear", False), ("nearest", False)])
def test_a_wrong_position_resize_is_caught_by_the_structured_table(naflex_ckpt, monkeypatch, mode, antialias):
    """The parity above would pass with any resize if the table were flat; with this structured one a
    different filter, or bilinear without antialias, moves the embeddings far past the tolerance."""
    ids = torch.zeros(1, 64, dtype=torch.long)
    images = [IMAGES[0], IMAGES[1], IMAGES[6]]  # 1:8, 8:1 and square: the table shrinks from 8x8
    _, _, out = _reference(naflex_ckpt, images, ids, max_num_patches=16)
    model, proc = siglip_so400m.load(naflex_ckpt, towers=("vision",))

    def wrong(table, g, h, w):
        D = table.shape[-1]
        grid = table.float().reshape(1, g, g, D).permute(0, 3, 1, 2)
        kw = {"align_corners": False} if mode != "nearest" else {}
        grid = torch.nn.functional.interpolate(grid, size=(h, w), mode=mode, antialias=antialias, **kw)
        return grid.permute(0, 2, 3, 1).reshape(h * w, D)

    pixels = proc.images(images, max_num_patches=16)
    with torch.inference_mode():
        right = model.encode_image(pixels, normalize=True)
        monkeypatch.setattr(model_module, "_resize_positions_naflex", wrong)
        model.vision_model.embeddings._resized.clear()
        bad = model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(right, out.image_embeds, atol=1e-5, rtol=0)
    assert (bad - out.image_embeds).abs().max() > 1e-3


def test_bad_inputs_get_one_clear_message(naflex_ckpt, tiny_ckpt):
    naflex, nproc = siglip_so400m.load(naflex_ckpt, towers=("vision",))
    fixed, fproc = siglip_so400m.load(tiny_ckpt, towers=("vision",))
    with pytest.raises(ValueError, match="max_num_patches must be a positive integer"):
        nproc.images(IMAGES[:1], max_num_patches=0)
    with pytest.raises(ValueError, match="max_num_patches must be a positive integer"):
        NaFlexImageProcessor(max_num_patches=-3)
    with pytest.raises(TypeError, match="NaFlex patches .* this model takes \\(B, 3, H, W\\)"):
        fixed.encode_image(nproc.images(IMAGES[:2]))
    with pytest.raises(TypeError, match="NaFlex model takes NaFlexPixels"):
        naflex.encode_image(fproc.images(IMAGES[:2]))
    with pytest.raises(TypeError, match="NaFlex model takes NaFlexPixels"):
        naflex.image_features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pass max_num_patches"):
        nproc.images(IMAGES[:1], size=64)
    with pytest.raises(ValueError, match="applies to SigLIP 2 NaFlex"):
        fproc.images(IMAGES[:1], max_num_patches=64)
    with pytest.raises(ValueError, match="num_patches must be a square"):
        SiglipConfig.from_dict({"model_type": "siglip2", "vision_config": {"num_patches": 60}})
    with pytest.raises(ValueError, match="vision_config.image_size"):
        SiglipConfig.from_dict({"model_type": "siglip2", "vision_config": {"image_size": 224}})
    px = nproc.images([IMAGES[0], IMAGES[6]])  # grids of different sizes
    lying = NaFlexPixels(px.patches, px.mask, px.spatial_shapes.flip(0))
    with pytest.raises(ValueError, match="NaFlex image 0: grid .* does not match its mask"):
        naflex.encode_image(lying)
    with pytest.raises(ValueError, match="set_image_size|max_num_patches instead"):
        naflex.set_image_size(64)


def test_an_image_that_cannot_fit_is_refused_by_name():
    # 2e7 px long: even at the smallest scale the search tries, the long side spans 2 patches.
    proc = NaFlexImageProcessor(patch_size=16, max_num_patches=1)
    with pytest.raises(ValueError, match="cannot fit in max_num_patches=1"):
        proc.target_size(20_000_000, 1)
    assert proc.target_size(1000, 3) == (16, 16)


def test_naflex_preprocessor_with_a_fixed_size_config_is_refused(naflex_ckpt, tmp_path):
    import shutil

    folder = shutil.copytree(naflex_ckpt, tmp_path / "ckpt")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}}))
    with pytest.raises(CheckpointError, match="fixed-size SigLIP image processor"):
        siglip_so400m.load(folder)


def test_text_ids_match_transformers_gemma_tokenizer(naflex_ckpt):
    from transformers import AutoTokenizer

    _, proc = siglip_so400m.load(naflex_ckpt, towers=("text",))
    texts = ["A Photo of 2 CATS", "東京タワー", "", "a receipt " * 20]
    tok = AutoTokenizer.from_pretrained(str(naflex_ckpt))
    want = tok([t.lower() for t in texts], padding="max_length", truncation=True, max_length=64,
               return_tensors="pt")["input_ids"]
    assert torch.equal(proc.texts(texts), want)


def test_attention_map_is_on_each_images_own_grid_and_equals_transformers_head_weights(naflex_ckpt):
    from transformers import Siglip2VisionModel

    ref = Siglip2VisionModel.from_pretrained(str(naflex_ckpt)).eval()
    model, proc = siglip_so400m.load(naflex_ckpt, towers=("vision",))
    images = [IMAGES[0], IMAGES[1], IMAGES[7], IMAGES[8]]
    inputs = _hf_inputs(naflex_ckpt, images, max_num_patches=64)
    with torch.no_grad():
        last = ref(**inputs).last_hidden_state  # (B, N, D), padding included
        head = ref.head
        B, N = inputs["pixel_attention_mask"].shape
        # The key mask as transformers' pooling head builds it: a float mask per (image, head).
        hide = torch.zeros(B, 1, N).masked_fill(inputs["pixel_attention_mask"][:, None] == 0, float("-inf"))
        hide = hide.repeat_interleave(head.num_heads, 0)
        _, want = head.attention(head.probe.repeat(B, 1, 1), last, last, attn_mask=hide,
                                 need_weights=True, average_attn_weights=False)  # (B, heads, 1, N)
    maps = siglip_so400m.attention_map(model, proc.images(images, max_num_patches=64))
    assert len(maps) == len(images)
    for i, (h, w) in enumerate(inputs["spatial_shapes"].tolist()):
        assert maps[i].shape == (4, h, w)
        torch.testing.assert_close(maps[i].sum((-2, -1)), torch.ones(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(maps[i].flatten(1), want[i, :, 0, : h * w], atol=1e-6, rtol=1e-5)
        assert want[i, :, 0, h * w :].abs().max() == 0  # the reference gives the padding nothing too


def test_attention_map_cli_runs_naflex_at_a_chosen_budget(naflex_ckpt, tmp_path, capsys):
    from siglip_so400m.cli import main

    IMAGES[0].save(tmp_path / "wide.png")
    out = tmp_path / "maps"
    code = main(["attention-map", str(tmp_path / "wide.png"), "--output", str(out),
                 "--model", str(naflex_ckpt), "--max-num-patches", "32"])
    assert code == 0, capsys.readouterr().err
    overlay = Image.open(out / "wide.attention.png")
    assert overlay.format == "PNG" and overlay.width > 6 * overlay.height  # the 1:8 image, plus a colour bar
    with pytest.raises(SystemExit):
        main(["attention-map", str(tmp_path / "wide.png"), "--output", str(out),
              "--model", str(naflex_ckpt), "--image-size", "64"])
    assert "pass max_num_patches" in capsys.readouterr().err


# ---- the jobs: the variant enters through the processor and the model, the jobs take what they give ----

@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Seven images from 1:8 to 8:1 and one smaller than a patch, as files."""
    folder = tmp_path_factory.mktemp("mixed")
    for i in (0, 1, 2, 3, 6, 7, 8, 10):
        IMAGES[i].save(folder / f"img_{i:02d}.png")
    return folder


def _hf_embeddings(folder, images, max_num_patches, texts_ids=None):
    from transformers import Siglip2Model

    ref = Siglip2Model.from_pretrained(str(folder)).eval()
    inputs = _hf_inputs(folder, images, max_num_patches=max_num_patches)
    with torch.inference_mode():
        img = ref.get_image_features(**inputs).pooler_output
        img = torch.nn.functional.normalize(img, dim=-1)
        if texts_ids is None:
            return img
        txt = ref.get_text_features(input_ids=texts_ids).pooler_output
        txt = torch.nn.functional.normalize(txt, dim=-1)
        return img, img @ txt.t() * ref.logit_scale.exp() + ref.logit_bias


def test_zero_shot_cli_scores_mixed_shapes_in_one_batch_as_transformers(naflex_ckpt, mixed_folder, capsys):
    from siglip_so400m.cli import main

    labels = ["a receipt", "a panorama", "a cat"]
    _, proc = siglip_so400m.load(naflex_ckpt, towers=("text",))
    ids = proc.texts([f"This is a photo of {x}." for x in labels])
    paths = sorted(mixed_folder.iterdir())
    images = [Image.open(p) for p in paths]
    _, want = _hf_embeddings(naflex_ckpt, images, 32, ids)
    code = main(["zero-shot", *map(str, paths), "--labels", *labels, "--model", str(naflex_ckpt),
                 "--dtype", "float32", "--batch-size", "8", "--max-num-patches", "32", "--json",
                 "--no-cache"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    for row, record in zip(want.tolist(), results, strict=True):
        got = {p["label"]: p["logit"] for p in record["predictions"]}
        for label, logit in zip(labels, row, strict=True):
            assert abs(got[label] - logit) < 1e-3
    with pytest.raises(SystemExit):
        main(["zero-shot", str(paths[0]), "--labels", "x", "--model", str(naflex_ckpt),
              "--max-num-patches", "0"])


def test_embed_search_and_resume_bits_on_naflex(naflex_ckpt, mixed_folder, tmp_path):
    pytest.importorskip("pyarrow")
    paths = sorted(mixed_folder.iterdir())
    want = _hf_embeddings(naflex_ckpt, [Image.open(p) for p in paths], 48)
    runs = {}
    for run, batch_size in (("1", 1), ("3", 3), ("3 again", 3)):
        out = tmp_path / run.replace(" ", "_")
        manifest = siglip_so400m.embed(mixed_folder, out, model=str(naflex_ckpt), dtype="float32",
                                       batch_size=batch_size, part_size=5, workers=0, max_num_patches=48)
        assert manifest["max_num_patches"] == 48 and manifest["counts"]["images"] == len(paths)
        runs[run] = [(out / "img_emb" / f"img_emb_{i:06d}.npy").read_bytes()
                            for i in range(manifest["parts"])]
    # The same batches give the same bits, which the byte-identical resume of embed rests on; other
    # batches of mixed shapes give the same embeddings to float rounding.
    assert runs["3"] == runs["3 again"]
    for one, three in zip(runs["1"], runs["3"], strict=True):
        np.testing.assert_allclose(np.load(io.BytesIO(one)).astype(np.float32),
                                   np.load(io.BytesIO(three)).astype(np.float32), atol=2**-11, rtol=0)
    emb = np.concatenate([np.load(tmp_path / "3" / "img_emb" / f"img_emb_{i:06d}.npy") for i in range(2)])
    np.testing.assert_allclose(emb.astype(np.float32), want.numpy(), atol=2**-10, rtol=0)
    index = siglip_so400m.Index.load(tmp_path / "3")
    hits = index.search(images=[str(paths[0]), str(paths[3])], k=1)
    assert [h[0]["path"] for h in hits] == [str(paths[0]), str(paths[3])]
    # Queries at another budget than the collection's would be another embedding: refused.
    other = siglip_so400m.Index.load(tmp_path / "3")
    other.max_num_patches = 8
    with pytest.raises(RecordMismatch, match="max_num_patches: 48 there, 8 now"):
        other.embed_images([str(paths[0])])


def test_server_batches_requests_of_different_shapes_together(naflex_ckpt, mixed_folder, tmp_path):
    pytest.importorskip("fastapi")
    import base64

    import httpx
    from test_serve import Served, metrics

    paths = sorted(mixed_folder.iterdir())
    want = _hf_embeddings(naflex_ckpt, [Image.open(p) for p in paths], 40)
    body = {"input": [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in paths]}
    s = Served(naflex_ckpt, tmp_path / "log.txt", "--max-num-patches", "40", "--max-wait-ms", "300")
    try:
        r = httpx.post(f"{s.url}/v1/embeddings", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        m = metrics(s.url)
    finally:
        assert s.stop() == 0, s.log()
    torch.testing.assert_close(torch.nn.functional.normalize(got, dim=-1), want, atol=1e-5, rtol=0)
    batches = m['siglip_batch_size_count{kind="image"}']
    assert batches < len(paths)  # images of eight shapes went through fewer forward passes


def test_finetune_on_naflex_trains_mixed_shapes_and_saves_what_transformers_loads(naflex_ckpt, mixed_folder,
                                                                                  tmp_path):
    from transformers import Siglip2Model

    from siglip_so400m.train import TrainConfig, train

    files = sorted(mixed_folder.iterdir())
    rows = [{"image": p.name, "caption": f"shape {i % 3}"} for i, p in enumerate(files)]
    data = mixed_folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = {k: v.clone() for k, v in siglip_so400m.load(naflex_ckpt)[0].state_dict().items()}
    out = train(TrainConfig(model=str(naflex_ckpt), data=str(data), output_dir=str(tmp_path / "run"),
                            steps=3, batch_size=8, lr=1e-3, precision="fp32", num_workers=0, log_every=1,
                            save_every=0, max_num_patches=24))
    data.unlink()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Siglip2Model"] and config["model_type"] == "siglip2"
    model, proc = siglip_so400m.load(out)
    after = model.state_dict()
    for key in ("vision_model.embeddings.patch_embedding.weight", "vision_model.head.probe",
                "vision_model.embeddings.position_embedding.weight", "text_model.head.weight"):
        assert not torch.equal(before[key], after[key]), f"{key} did not train"
    ref = Siglip2Model.from_pretrained(str(out)).eval()
    inputs = _hf_inputs(out, IMAGES[:3])
    with torch.inference_mode():
        want = torch.nn.functional.normalize(ref.get_image_features(**inputs).pooler_output, dim=-1)
        got = model.encode_image(proc.images(IMAGES[:3]), normalize=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- full size (the So400m NaFlex shape, about 4.5 GB; CI and the lead run it) ----

@pytest.mark.slow
def test_full_size_naflex_embeddings_logits_and_hidden_states_match_transformers(gemma_spiece, tmp_path):
    from transformers import Siglip2Model

    from siglip_so400m.testing import save_naflex_checkpoint

    folder = save_naflex_checkpoint(tmp_path / "naflex", gemma_spiece, tiny=False)
    images = [IMAGES[0], IMAGES[1], IMAGES[7], IMAGES[8]]  # 1:8, 8:1, about 7:2, smaller than a patch
    _, proc = siglip_so400m.load(folder, towers=("text",))
    ids = proc.texts(["a photo of 2 cats", "a receipt"])
    inputs = _hf_inputs(folder, images)  # max_num_patches 256 from the folder
    ref = Siglip2Model.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        out = ref(input_ids=ids, **inputs, output_hidden_states=True)
        hidden = [out.vision_model_output.hidden_states[k] for k in (0, 13, 27)]
    del ref  # one full-size model at a time
    model, proc = siglip_so400m.load(folder)
    pixels = proc.images(images)
    assert torch.equal(pixels.patches, inputs["pixel_values"])
    assert torch.equal(pixels.spatial_shapes, inputs["spatial_shapes"])
    with torch.inference_mode():
        img = model.encode_image(pixels, normalize=True)
        alone = torch.cat([model.encode_image(pixels[i], normalize=True) for i in range(len(images))])
        torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(alone, out.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pixels, ids), out.logits_per_image, atol=1e-3, rtol=0)
        feats = model.image_features(pixels, layers=(0, 13, 27), norm=False)
    for want, got in zip(hidden, feats, strict=True):
        for i, n in enumerate(pixels.lengths()):
            scale = want[i, :n].abs().max().item()
            torch.testing.assert_close(got[i], want[i, :n], rtol=1e-5, atol=1e-5 * scale)


def test_eval_and_the_zero_shot_api_take_a_patch_budget_as_transformers(naflex_ckpt, tiny_ckpt, mixed_folder,
                                                                         tmp_path):
    """`eval zero-shot|retrieval --max-num-patches` and zero_shot(..., max_num_patches=) embed each
    image within that budget, as transformers' processor does at max_num_patches."""
    from siglip_so400m.evaluate import EvalError, retrieval
    from siglip_so400m.evaluate import zero_shot as eval_zero_shot
    from siglip_so400m.evaluate.cli import eval_main

    classes = ["a receipt", "a panorama", "a cat", "a dog", "a tree"]
    paths = sorted(mixed_folder.iterdir())
    data = tmp_path / "folder"
    for i, p in enumerate(paths):  # ImageFolder: the class is the folder's name
        (data / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        (data / classes[i % len(classes)] / p.name).write_bytes(p.read_bytes())
    model, proc = siglip_so400m.load(naflex_ckpt, dtype=torch.float32)
    ids = proc.texts([f"a photo of {c}." for c in classes])
    order = sorted(data.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))  # ImageFolder's order
    images = [Image.open(p) for p in order]
    rank = {}
    for budget in (32, 256):
        _, logits = _hf_embeddings(naflex_ckpt, images, budget, ids)
        rank[budget] = [[classes[j] for j in row] for row in logits.argsort(dim=1, descending=True).tolist()]
    assert rank[32] != rank[256]  # the budget changes at least one image's ranking of the classes
    common = dict(model=(model, proc), classes=sorted(classes), templates=["a photo of {}."], dtype="float32",
                  workers=0, progress=False)
    got = eval_zero_shot(data, max_num_patches=32, **common)
    assert [p["top5"] for p in got["predictions"]] == rank[32]
    assert proc.image.max_num_patches == 256  # the caller's processor is not changed
    # An embed output at the same budget gives the same predictions; at another, a clear refusal.
    siglip_so400m.embed(data, tmp_path / "emb", model=str(naflex_ckpt), dtype="float32", recursive=True,
                        workers=0, max_num_patches=32, progress=False)
    again = eval_zero_shot(data, max_num_patches=32, embeddings=tmp_path / "emb", **common)
    assert [p["top5"] for p in again["predictions"]] == rank[32]
    with pytest.raises(RecordMismatch, match="max_num_patches: 32 there, 64 now"):
        eval_zero_shot(data, max_num_patches=64, embeddings=tmp_path / "emb", **common)
    with pytest.raises(EvalError, match="SigLIP 2 NaFlex"):
        eval_zero_shot(data, max_num_patches=32, **(common | {"model": siglip_so400m.load(tiny_ckpt)}))
    with pytest.raises(SystemExit):
        eval_main(["zero-shot", str(data), "--model", str(naflex_ckpt), "--max-num-patches", "0"])

    # The Python zero_shot(): logits as transformers' at the budget.
    _, want = _hf_embeddings(naflex_ckpt, images, 32, ids)
    results = siglip_so400m.zero_shot(model, proc, images, [f"a photo of {c}." for c in classes],
                                      template="{}", max_num_patches=32)
    for row, record in zip(want.tolist(), results, strict=True):
        got_logits = {p["label"]: p["logit"] for p in record}
        for c, logit in zip(classes, row, strict=True):
            assert abs(got_logits[f"a photo of {c}."] - logit) < 1e-3

    # Retrieval: each image's own caption; recall as transformers' embeddings give it.
    captions = [f"a photo of {classes[i % 5]}, number {i}." for i in range(len(order))]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c in zip(order, captions, strict=True)))
    got = retrieval(pairs, max_num_patches=32, **{k: v for k, v in common.items()
                                                   if k not in ("classes", "templates")})
    _, logits = _hf_embeddings(naflex_ckpt, images, 32, proc.texts(captions))  # (images, texts)
    own = torch.arange(len(order))
    for k in (1, 5):
        text_to_image = (logits.topk(k, dim=0).indices == own).any(0).float().mean()
        image_to_text = (logits.topk(k, dim=1).indices == own[:, None]).any(1).float().mean()
        assert got["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(text_to_image.item())
        assert got["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(image_to_text.item())
