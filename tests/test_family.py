"""Every SoViT-400m checkpoint (SigLIP 224 px, i18n, SigLIP 2) and big_vision's .npz files.

Each checkpoint is built with random weights in its Hub layout (sparse config.json, its own tokenizer
files and preprocessor_config.json; see siglip_so400m.testing.CHECKPOINTS) and compared, in this run,
with what transformers computes from the same folder: token ids, pixels, embeddings and logits.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import siglip_so400m
from siglip_so400m import bigvision
from siglip_so400m.testing import (
    CHECKPOINTS,
    family_hf_config,
    randomize,
    save_family_checkpoint,
    train_tokenizer,
    write_big_vision_npz,
)
from siglip_so400m.text import GemmaTokenizer, Tokenizer
from siglip_so400m.weights import CheckpointError

# The seven released beside the one the project started from (google/siglip-so400m-patch14-384).
NAMES = [n for n in CHECKPOINTS if n != "google/siglip-so400m-patch14-384"]
MULTILINGUAL = ["google/siglip-so400m-patch16-256-i18n", "google/siglip2-so400m-patch16-384"]

HARD_CASES = [
    "", " ", "...", "!?!", "a photo of 2 cats", "A Photo Of 2 CATS", "This is a photo of a plane.",
    "Café naïve résumé ÜBER straße", "ÉCOLE Ÿ İstanbul ΣΟΦΊΑ",  # capitals whose lowercase is not ASCII
    "東京の猫の写真", "二匹の猫", "قطة على طائرة", "صورة لقطة.", "Zwei Katzen auf der Straße!",
    "кошка", "बिल्ली", "😀🐱 emoji 😀", "👩‍👩‍👧 family zwj", "tabs\tand\nnewlines\r\n  and   spaces",
    "▁cat", "a▁b ▁▁ c", "</s>", "<eos>", "<pad> cat", "<unk> x", "x-ray e-mail 12,345.67",
    "'quoted' \"double\" (parens) [brackets] {braces}", "«guillemets» — em dash … ellipsis",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "\u0000\u200b zero width", " ".join(["cat"] * 70),
    " ".join(["crème brûlée"] * 40), "猫" * 100,
]
ALPHABET = [*"abcxyzABCXYZ0123 \t\n.,!?'-_()éüñÄÖ東京猫😀▁<>/sصقط", "</s>", "<eos>", "<pad>", "  "]


@pytest.fixture(scope="module")
def tokenizer_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: train_tokenizer(kind, root / kind) for kind in ("siglip", "i18n", "gemma")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tokenizer_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    return {name: save_family_checkpoint(root / name.split("/")[1], name,
                                         tokenizer_models[CHECKPOINTS[name].tokenizer], seed=i)
            for i, name in enumerate(NAMES)}


def hf_ids(folder: Path, texts: list[str]) -> torch.Tensor:
    """transformers' tokenizer for the folder (AutoTokenizer reads tokenizer_config.json's class),
    as its processor pads for SigLIP; SigLIP 2 texts lowercased first, as big_vision trained."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    L = CHECKPOINTS[_name(folder)].text_length
    if CHECKPOINTS[_name(folder)].tokenizer == "gemma":
        texts = [t.lower() for t in texts]
    return tok(texts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")["input_ids"]


def _name(folder: Path) -> str:
    return "google/" + folder.name


def test_the_checkpoint_table_matches_the_configs(ckpts):
    """Sizes, patch, text length and resample read back from the files written for each checkpoint."""
    for name, folder in ckpts.items():
        fam = CHECKPOINTS[name]
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg.get("text_config", {}).get("max_position_embeddings", 64) == fam.text_length
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        assert pre["resample"] == fam.resample
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
        expected = "GemmaTokenizer" if fam.tokenizer == "gemma" else "SiglipTokenizer"
        assert tok_cfg["tokenizer_class"] == expected


@pytest.mark.parametrize("name", NAMES)
def test_processor_follows_the_checkpoint_files(name, ckpts):
    _, proc = siglip_so400m.load(ckpts[name], towers=("text",))
    fam = CHECKPOINTS[name]
    tok = proc.tokenizer
    assert tok.max_length == fam.text_length
    assert proc.image.resample == fam.resample
    if fam.tokenizer == "gemma":
        assert isinstance(tok, GemmaTokenizer) and (tok.eos_id, tok.pad_id) == (1, 0)
        assert tok.path.name == "tokenizer.json"
    else:
        assert isinstance(tok, Tokenizer) and (tok.eos_id, tok.pad_id) == (1, 1)


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_match_transformers_on_hard_strings(name, ckpts):
    _, proc = siglip_so400m.load(ckpts[name], towers=("text",))
    got = proc.texts(HARD_CASES)
    expected = hf_ids(ckpts[name], HARD_CASES)
    assert got.shape == (len(HARD_CASES), CHECKPOINTS[name].text_length)
    for text, g, e in zip(HARD_CASES, got.tolist(), expected.tolist(), strict=True):
        assert g == e, text


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_match_transformers_on_random_strings(name, ckpts):
    _, proc = siglip_so400m.load(ckpts[name], towers=("text",))
    rng = random.Random(hash(name) % 1000)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 90))) for _ in range(200)]
    assert proc.texts(texts).tolist() == hf_ids(ckpts[name], texts).tolist()


def test_each_checkpoint_loads_by_hub_id_offline_from_the_hub_cache(ckpts, tmp_path):
    import os
    import subprocess
    import sys

    from siglip_so400m.testing import hub_cache

    for name, folder in ckpts.items():
        hub_cache(tmp_path / "cache", name, folder)
    code = (
        "import json, siglip_so400m\n"
        f"out = {{}}\nfor name in {NAMES!r}:\n"
        "    m, p = siglip_so400m.load(name)\n"
        "    out[name] = [type(p.tokenizer).__name__, p.texts(['a cat']).shape[1], p.image.resample,\n"
        "                 m.config.vision_config.patch_size]\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    for name in NAMES:
        fam = CHECKPOINTS[name]
        kind = "GemmaTokenizer" if fam.tokenizer == "gemma" else "Tokenizer"
        assert got[name] == [kind, fam.text_length, fam.resample, fam.patch_size // 2], name


def test_siglip2_ids_end_with_eos_then_pad_zero_and_keep_punctuation(ckpts):
    folder = ckpts["google/siglip2-so400m-patch16-384"]
    _, proc = siglip_so400m.load(folder, towers=("text",))
    with_dot, without = proc.texts(["A cat.", "a cat"]).tolist()
    n = with_dot.index(1)
    assert with_dot[n + 1:] == [0] * (64 - n - 1) and 0 not in with_dot[:n]
    assert with_dot != without  # the "." is a token: SigLIP 2 strips no punctuation
    assert proc.texts(["A CAT"]).tolist() == proc.texts(["a cat"]).tolist()  # lowercased
    # transformers' GemmaTokenizer itself does not lowercase (what docs/checkpoints.md warns about)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok("A CAT")["input_ids"] != tok("a cat")["input_ids"]


def test_gemma_sentencepiece_path_gives_the_tokenizers_ids(ckpts, tmp_path):
    """Without tokenizer.json (big_vision's gemma_tokenizer.model alone) the ids come from
    sentencepiece; on this vocabulary they equal transformers' converted BPE."""
    src = ckpts["google/siglip2-so400m-patch14-224"]
    rng = random.Random(7)
    texts = HARD_CASES + [t.upper() for t in HARD_CASES] + [
        "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 90))) for _ in range(300)]
    sp = GemmaTokenizer(src / "tokenizer.model")
    assert sp(texts).tolist() == hf_ids(src, texts).tolist()


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (97, 143, 4), dtype=np.uint8)
    base = Image.fromarray(rgba, "RGBA")
    return [base.convert("RGB"), base, base.convert("L"), base.convert("RGB").resize((300, 40)),
            base.convert("RGB").resize((20, 21))]


@pytest.mark.parametrize("name", NAMES)
def test_pixels_match_transformers_pil_processor_bit_for_bit(name, ckpts):
    from transformers import SiglipImageProcessorPil

    ref = SiglipImageProcessorPil.from_pretrained(str(ckpts[name]))
    _, proc = siglip_so400m.load(ckpts[name], towers=("vision",))
    images = _images()
    expected = ref(images=images, return_tensors="pt")["pixel_values"]
    got = proc.images(images)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_and_logits_match_transformers(name, ckpts):
    from transformers import SiglipImageProcessorPil, SiglipModel

    folder = ckpts[name]
    ref = SiglipModel.from_pretrained(str(folder)).eval()
    model, proc = siglip_so400m.load(folder)
    texts = ["a photo of 2 cats", "東京タワー", "قطة", "Zwei Katzen", "a remote"]
    ids = hf_ids(folder, texts)
    pixels = SiglipImageProcessorPil.from_pretrained(str(folder))(images=_images(), return_tensors="pt")
    pixels = pixels["pixel_values"]
    assert torch.equal(proc.texts(texts), ids)
    with torch.inference_mode():
        out = ref(input_ids=ids, pixel_values=pixels)
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(ids, normalize=True)
        logits = model(pixels, ids)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", MULTILINGUAL)
def test_zero_shot_cli_classifies_multilingual_labels_like_transformers(name, ckpts, tmp_path, capsys):
    from transformers import SiglipImageProcessorPil, SiglipModel

    from siglip_so400m.cli import main
    from siglip_so400m.zeroshot import DEFAULT_TEMPLATE

    folder = ckpts[name]
    labels = ["二匹の猫", "Zwei Katzen", "قطتان", "a plane"]
    image = _images()[0]
    image.save(tmp_path / "cat.png")
    assert main(["zero-shot", str(tmp_path / "cat.png"), "--labels", *labels, "--model", str(folder),
                 "--json", "--no-cache", "--dtype", "float32", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["predictions"]

    ref = SiglipModel.from_pretrained(str(folder)).eval()
    ids = hf_ids(folder, [DEFAULT_TEMPLATE.format(label) for label in labels])
    pixels = SiglipImageProcessorPil.from_pretrained(str(folder))(images=[image], return_tensors="pt")
    with torch.inference_mode():
        logits = ref(input_ids=ids, pixel_values=pixels["pixel_values"]).logits_per_image[0]
    order = logits.argsort(descending=True).tolist()
    assert [p["label"] for p in got] == [labels[i] for i in order]
    for p in got:
        assert abs(p["logit"] - logits[labels.index(p["label"])].item()) < 1e-3
    # The labels are not all unknown pieces: the multilingual vocabulary has them.
    _, proc = siglip_so400m.load(folder, towers=("text",))
    assert len(set(map(tuple, proc.texts(labels).tolist()))) == len(labels)


# --- big_vision .npz ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def npz_source(tokenizer_models):
    """transformers' SiglipModel (tiny, SigLIP 2 shaped) that the .npz files are written from."""
    from transformers import SiglipModel

    cfg = family_hf_config(CHECKPOINTS["google/siglip2-so400m-patch16-384"], tokenizer_models["gemma"])
    torch.manual_seed(3)
    model = SiglipModel(cfg).eval()
    randomize(model, 3)
    return model


def _reference(ref, pixels, ids):
    with torch.inference_mode():
        return ref(input_ids=ids, pixel_values=pixels)


@pytest.mark.parametrize("stacked", [False, True], ids=["encoderblock_N", "stacked"])
@pytest.mark.parametrize("prefix", ["params/", ""])
def test_npz_loads_to_the_model_it_was_written_from(stacked, prefix, npz_source, tokenizer_models, tmp_path):
    cfg = npz_source.config
    npz = write_big_vision_npz(tmp_path / "model.npz", npz_source.state_dict(), cfg, stacked=stacked,
                               prefix=prefix)
    shutil.copyfile(tokenizer_models["gemma"], tmp_path / "tokenizer.model")  # found beside the .npz
    model, proc = siglip_so400m.load(npz)
    # Every field from the shapes (the tiny 48 px, 8 px patches, is a multiple of 16 like the real ones).
    assert model.config.to_dict() == siglip_so400m.SiglipConfig.from_dict(cfg.to_dict()).to_dict()
    assert isinstance(proc.tokenizer, GemmaTokenizer)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    ids = proc.texts(["a photo of 2 cats", "東京"])
    out = _reference(npz_source, pixels, ids)
    with torch.inference_mode():
        img, txt = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
        torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pixels, ids), out.logits_per_image, atol=1e-3, rtol=0)
    # In bf16 too, t' and b stay float32, as from safetensors: bf16 would move the logits.
    bf16, _ = siglip_so400m.load(npz, dtype=torch.bfloat16)
    assert bf16.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    for name in ("logit_scale", "logit_bias"):
        assert getattr(bf16, name).dtype == torch.float32
        torch.testing.assert_close(getattr(bf16, name), getattr(model, name), atol=0, rtol=0)


def test_i18n_npz_without_text_head_gets_the_identity_head(tokenizer_models, tmp_path):
    from transformers import SiglipModel

    fam = CHECKPOINTS["google/siglip-so400m-patch16-256-i18n"]
    cfg = family_hf_config(fam, tokenizer_models["i18n"])
    torch.manual_seed(4)
    ref = SiglipModel(cfg).eval()
    randomize(ref, 4)
    with torch.no_grad():  # what transformers' conversion put in place of the missing head
        ref.text_model.head.weight.copy_(torch.eye(cfg.text_config.hidden_size))
        ref.text_model.head.bias.zero_()
    npz = write_big_vision_npz(tmp_path / "i18n.npz", ref.state_dict(), cfg, stacked=True, text_head=False)
    model, proc = siglip_so400m.load(npz, tokenizer=tokenizer_models["i18n"])
    assert isinstance(proc.tokenizer, Tokenizer) and proc.tokenizer.max_length == 64
    ids = proc.texts(["قطة", "Katze"])
    pixels = torch.zeros(1, 3, 32, 32)
    out = _reference(ref, pixels, ids)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(ids, normalize=True), out.text_embeds, atol=1e-5, rtol=0)


def _stand_ins(grid: int, patch: int, text_len: int, stacked: bool) -> dict[str, np.ndarray]:
    """Zero-byte arrays with the shapes of a so400m big_vision tree (names without prefix)."""
    D, F, H, L = 1152, 4304, 16, 27
    z = np.zeros((), np.float32)
    shapes = {"img/embedding/kernel": (patch, patch, 3, D), "img/pos_embedding": (1, grid * grid, D),
              "txt/Embed_0/embedding": (32000, D), "txt/pos_embedding": (1, text_len, D),
              "txt/head/kernel": (D, D)}
    block = {"MultiHeadDotProductAttention_0/query/kernel": (D, H, D // H),
             "MlpBlock_0/Dense_0/kernel": (D, F), "LayerNorm_0/scale": (D,)}
    for enc in ("img/Transformer/", "txt/Encoder_0/"):
        for k, s in block.items():
            if stacked:
                shapes[f"{enc}encoderblock/{k}"] = (L, *s)
            else:
                shapes.update({f"{enc}encoderblock_{i}/{k}": s for i in range(L)})
    return {k: np.broadcast_to(z, s) for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_config_inferred_from_full_size_shapes_is_the_hub_config(name):
    fam = CHECKPOINTS[name]
    grid = fam.image_size // fam.patch_size
    cfg = bigvision.infer_config(_stand_ins(grid, fam.patch_size, fam.text_length, stacked="224" in name))
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (fam.image_size, fam.patch_size)
    assert cfg.text_config.max_position_embeddings == fam.text_length
    assert (cfg.vision_config.num_hidden_layers, cfg.vision_config.intermediate_size) == (27, 4304)


def test_convert_writes_the_hub_layout_that_transformers_and_load_read_alike(npz_source, tokenizer_models,
                                                                          tmp_path):
    from transformers import AutoTokenizer, SiglipImageProcessorPil, SiglipModel

    from siglip_so400m.cli import main

    npz = write_big_vision_npz(tmp_path / "ft.npz", npz_source.state_dict(), npz_source.config, stacked=False)
    out = tmp_path / "hub"
    assert main(["convert", str(npz), str(out), "--tokenizer", str(tokenizer_models["gemma"])]) == 0
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.model",
            "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    hf = SiglipModel.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    hf_img = SiglipImageProcessorPil.from_pretrained(str(out))
    assert hf_img.resample == 2 and hf_img.size == {"height": 48, "width": 48}
    model, proc = siglip_so400m.load(out)
    texts = ["A photo of 2 cats.", "東京タワー", "قطة"]
    ids = hf_tok([t.lower() for t in texts], padding="max_length", truncation=True, max_length=64,
                 return_tensors="pt")["input_ids"]
    assert proc.texts(texts).tolist() == ids.tolist()
    images = _images()
    pixels = hf_img(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(proc.images(images), pixels)
    with torch.inference_mode():
        got, ref, src = model(pixels, ids), hf(input_ids=ids, pixel_values=pixels), npz_source(
            input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(got, ref.logits_per_image, atol=1e-3, rtol=0)
    torch.testing.assert_close(ref.logits_per_image, src.logits_per_image, atol=1e-5, rtol=0)


def test_convert_of_a_siglip_npz_writes_a_siglip_tokenizer(tokenizer_models, tmp_path):
    from transformers import AutoTokenizer, SiglipModel

    from siglip_so400m.convert import convert

    fam = CHECKPOINTS["google/siglip-so400m-patch14-224"]
    cfg = family_hf_config(fam, tokenizer_models["siglip"])
    torch.manual_seed(5)
    ref = SiglipModel(cfg).eval()
    randomize(ref, 5)
    npz = write_big_vision_npz(tmp_path / "m.npz", ref.state_dict(), cfg, stacked=True)
    cfg_path = tmp_path / "config.json"  # the tiny 28 px is no multiple of 16, so give the config
    cfg_path.write_text(cfg.to_json_string())
    out = convert(npz, tmp_path / "hub", config=cfg_path, tokenizer=tokenizer_models["siglip"])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(tok).__name__.startswith("SiglipTokenizer") and tok.model_max_length == 16
    _, proc = siglip_so400m.load(out, towers=("text",))
    texts = ["A photo of 2 cats!", " ".join(["cat"] * 30)]
    assert proc.texts(texts).tolist() == tok(texts, padding="max_length", truncation=True, max_length=16,
                                             return_tensors="pt")["input_ids"].tolist()
    assert json.loads((out / "preprocessor_config.json").read_text())["resample"] == 3
    hf = SiglipModel.from_pretrained(str(out)).eval()
    for k, v in ref.state_dict().items():
        if not k.endswith("position_ids"):
            assert torch.equal(hf.state_dict()[k], v), k


# --- one clear message each -----------------------------------------------------------------------

def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_npz_with_a_missing_array_is_named(npz_source, tmp_path):
    npz = write_big_vision_npz(tmp_path / "m.npz", npz_source.state_dict(), npz_source.config, stacked=False)
    arrays = _arrays(npz)
    del arrays["params/img/MAPHead_0/probe"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"missing arrays: img/MAPHead_0/probe"):
        siglip_so400m.load(tmp_path / "bad.npz")
    arrays = _arrays(npz)
    del arrays["params/txt/head/bias"]  # a text head is optional (i18n has none), half of one is not
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"missing arrays: txt/head/bias"):
        siglip_so400m.load(tmp_path / "bad.npz")


def test_npz_with_an_unknown_array_is_named(npz_source, tmp_path):
    npz = write_big_vision_npz(tmp_path / "m.npz", npz_source.state_dict(), npz_source.config, stacked=True)
    arrays = _arrays(npz)
    arrays["params/img/Transformer/encoderblock/Adapter_0/kernel"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match=r"unknown arrays: img/Transformer/encoderblock/Adapter_0"):
        siglip_so400m.load(tmp_path / "bad.npz")


def test_npz_that_is_not_a_zip_is_refused(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        siglip_so400m.load(tmp_path / "x.npz")


def test_config_not_matching_the_npz_weights(npz_source, ckpts, tmp_path):
    npz = write_big_vision_npz(tmp_path / "m.npz", npz_source.state_dict(), npz_source.config, stacked=False)
    other = ckpts["google/siglip-so400m-patch14-224"] / "config.json"  # 7 px patches, 200 tokens
    with pytest.raises(CheckpointError, match=r"does not fit its config: wrong shapes: .*patch_embedding"):
        siglip_so400m.load(npz, config=other)


def test_tokenizer_vocabulary_larger_than_the_embedding_table(ckpts, tokenizer_models):
    folder = ckpts["google/siglip-so400m-patch14-224"]  # a 200-row table; the Gemma vocabulary has 700
    with pytest.raises(CheckpointError, match=r"has 700 tokens but the text embedding table has \d+ rows"):
        siglip_so400m.load(folder, towers=("text",), tokenizer=tokenizer_models["gemma"])


def test_text_length_mismatch_between_tokenizer_and_model(ckpts, tmp_path):
    folder = Path(shutil.copytree(ckpts["google/siglip-so400m-patch14-224"], tmp_path / "ckpt"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 64  # the model has 16 positions
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text-length mismatch: .*model_max_length 64 .* 16 text"):
        siglip_so400m.load(folder, towers=("text",))


def test_gemma_model_max_length_longer_than_the_model_is_fine_shorter_is_not(ckpts, tmp_path):
    """A Gemma tokenizer_config.json may carry the language model's context (8192): not a mismatch."""
    folder = Path(shutil.copytree(ckpts["google/siglip2-so400m-patch16-256"], tmp_path / "ckpt"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 8192}))
    assert siglip_so400m.load(folder, towers=("text",))[1].tokenizer.max_length == 64
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 32}))
    with pytest.raises(CheckpointError, match=r"text-length mismatch: .*model_max_length 32 .* 64 text"):
        siglip_so400m.load(folder, towers=("text",))


# --- full size (3.5 GB each; CI and the lead run these) -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["google/siglip2-so400m-patch16-384", "google/siglip-so400m-patch14-224"])
def test_full_size_embeddings_and_logits_match_transformers(name, tokenizer_models, tmp_path):
    from transformers import SiglipImageProcessorPil, SiglipModel

    folder = save_family_checkpoint(tmp_path / name.split("/")[1], name,
                                    tokenizer_models[CHECKPOINTS[name].tokenizer], tiny=False)
    texts = ["a photo of 2 cats", "東京タワー", "قطة"]
    ids = hf_ids(folder, texts)
    pixels = SiglipImageProcessorPil.from_pretrained(str(folder))(images=_images()[:2], return_tensors="pt")
    pixels = pixels["pixel_values"]
    ref = SiglipModel.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        out = ref(input_ids=ids, pixel_values=pixels)
    del ref  # one full-size model at a time
    model, proc = siglip_so400m.load(folder)
    assert torch.equal(proc.texts(texts), ids) and torch.equal(proc.images(_images()[:2]), pixels)
    with torch.inference_mode():
        img, txt = model.encode_image(pixels, normalize=True), model.encode_text(ids, normalize=True)
        torch.testing.assert_close(img, out.image_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(txt, out.text_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(pixels, ids), out.logits_per_image, atol=1e-3, rtol=0)


def test_convert_of_a_missing_npz_says_the_file_does_not_exist(tmp_path, capsys):
    from siglip_so400m.cli import main

    assert main(["convert", str(tmp_path / "nope.npz"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope.npz'}: no such file" in err
    assert "Hub id" not in err  # it said "no such file or folder, and not a Hub id like ..."
    assert not (tmp_path / "out").exists()
