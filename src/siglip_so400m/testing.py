"""Random SigLIP checkpoints in the exact Hub layout, for tests and benchmarks (needs transformers).

Nothing can be downloaded where this project is tested, so we make what we compare against:
`transformers.SiglipModel` with random weights saved by `save_pretrained`, the PIL image processor
and the tokenizer files transformers writes, and a SentencePiece model trained on the fly with
sentencepiece's own trainer, shaped like SigLIP's (unigram, pad 0, EOS 1, unk 2, NFKC) or, for
SigLIP 2, like Gemma's (BPE with byte fallback, pad 0, EOS 1, BOS 2, unk 3, mask 4) and converted to
tokenizer.json by transformers' own GemmaConverter. `CHECKPOINTS` lists every SoViT-400m checkpoint
with what differs between them; `save_family_checkpoint` writes one (tiny or full size) with a
config.json as sparse as the Hub's, and `write_big_vision_npz` writes its weights as big_vision does.
`save_naflex_checkpoint` writes SigLIP 2 NaFlex (`transformers.Siglip2Model`) the same way, with a
position table that has structure, so that a wrong resize of it shows.

    python -m siglip_so400m.testing OUT_DIR [--tiny] [--checkpoint google/siglip2-so400m-patch16-384]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import SO400M_CONFIG

# Words for the tokenizer's training corpus: plain English, accents, CJK, emoji, digits, so that
# hard tokenizer cases meet real pieces and unknown characters alike.
_WORDS = (
    "a an the photo picture of two 2 cats cat dog dogs plane remote red blue green circle square "
    "triangle big small this is on in with and café naïve résumé über crème brûlée 東京 猫 写真 "
    "😀 🐱 hello world über straße ñandú 12 345 x-ray e-mail astronaut rocket coffee cup camera "
    "man woman person sky space"
).split()

TINY_VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=7)  # 32 px with 7 px patches drops pixels, as so400m does
TINY_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


# For the multilingual vocabularies (i18n's mc4 SentencePiece, SigLIP 2's Gemma): German, Japanese,
# Arabic, Russian, Hindi and Greek words beside the English ones.
_MULTI_WORDS = _WORDS + (
    "Katze Hund Flugzeug Straße Fernbedienung Äpfel schön grün 猫 犬 飛行機 二匹の猫 写真 東京タワー "
    "قطة كلب طائرة صورة جهاز تحكم кошка собака самолёт фото बिल्ली कुत्ता हवाई γάτα σκύλος"
).split()


def train_spiece(path: Path, vocab_size: int = 200, words: list[str] | None = None) -> Path:
    """A unigram SentencePiece model with SigLIP's special ids, trained on a synthetic corpus."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = words or _WORDS
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) for _ in range(4000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers initialises LayerNorms to (1, 0), biases and the logit scale/bias to 0; perturb
    every parameter so that a parity test notices any one of them being used wrongly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.3)  # t = 10, as SigLIP starts training
            elif name == "logit_bias":
                p.fill_(-2.0)
            elif p.ndim == 1 or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def hf_config(vision: dict, text: dict):
    from transformers import SiglipConfig

    return SiglipConfig(text_config=text, vision_config=vision)


def tiny_hf_config(spiece: Path):
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
    return hf_config(TINY_VISION, {**TINY_TEXT, "vocab_size": vocab})


def so400m_hf_config():
    hub = json.loads(SO400M_CONFIG.read_text())
    return hf_config(hub["vision_config"], hub["text_config"])


def save_checkpoint(folder: Path, config, spiece: Path, seed: int = 0) -> Path:
    """transformers' SiglipModel + tokenizer + PIL image processor saved in the Hub layout."""
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    torch.manual_seed(seed)
    model = SiglipModel(config)
    randomize(model, seed)
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    # As Google's conversion did for the Hub checkpoints: no attention_mask from the tokenizer, since
    # SigLIP attends to its EOS padding (transformers' pipeline would otherwise mask it out).
    SiglipTokenizer(str(spiece), model_input_names=["input_ids"]).save_pretrained(folder)
    return Path(folder)


def hub_cache(root: Path, repo_id: str, source: Path, sha: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay `source`'s files out as huggingface_hub's cache does: blobs, snapshots/<sha>, refs/main.
    Blobs are symlinks to the source files, so a 3.5 GB checkpoint costs nothing to lay out."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.symlink_to(f.resolve())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def train_gemma_spiece(path: Path, vocab_size: int = 700) -> Path:
    """A SentencePiece BPE model shaped like Gemma's: byte fallback, digits split, no dummy prefix, no
    normalization, ids pad 0, EOS 1, BOS 2, unk 3, <mask> 4 (so transformers adds no token)."""
    import sentencepiece as spm

    rng = random.Random(1)
    lines = [" ".join(rng.choice(_MULTI_WORDS) for _ in range(rng.randint(2, 12))) for _ in range(4000)]
    lines += [line.title() for line in lines[:500]]  # some capitals, which SigLIP 2 lowercases away
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<mask>"], byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


@dataclass(frozen=True)
class Family:
    """What one released SoViT-400m checkpoint fixes: its tokenizer, text length, image size and
    resize filter (PIL codes: 3 bicubic, 2 bilinear)."""

    tokenizer: str  # "siglip" (c4_en SentencePiece), "i18n" (mc4 SentencePiece), "gemma" (SigLIP 2)
    image_size: int
    patch_size: int
    text_length: int
    vocab_size: int
    resample: int

    @property
    def tiny_vision(self) -> dict:
        # Patches of 7 or 8 px and the full-size grid's remainder kept: 384/14 drops 6 px, 32/7 drops 4.
        p = self.patch_size // 2
        grid = max(self.image_size // self.patch_size // 4, 3)
        size = grid * p + (4 if self.image_size % self.patch_size else 0)
        return {**TINY_VISION, "image_size": size, "patch_size": p}


CHECKPOINTS: dict[str, Family] = {
    "google/siglip-so400m-patch14-384": Family("siglip", 384, 14, 64, 32000, 3),
    "google/siglip-so400m-patch14-224": Family("siglip", 224, 14, 16, 32000, 3),
    "google/siglip-so400m-patch16-256-i18n": Family("i18n", 256, 16, 64, 250000, 3),
    "google/siglip2-so400m-patch14-224": Family("gemma", 224, 14, 64, 256000, 2),
    "google/siglip2-so400m-patch14-384": Family("gemma", 384, 14, 64, 256000, 2),
    "google/siglip2-so400m-patch16-256": Family("gemma", 256, 16, 64, 256000, 2),
    "google/siglip2-so400m-patch16-384": Family("gemma", 384, 16, 64, 256000, 2),
    "google/siglip2-so400m-patch16-512": Family("gemma", 512, 16, 64, 256000, 2),
}

_QKV_NAMES = (("q", "query"), ("k", "key"), ("v", "value"))
_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)


def train_tokenizer(kind: str, folder: Path) -> Path:
    """The tokenizer model of a family, trained into `folder` (reuse it across checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "siglip":
        return train_spiece(folder / "spiece.model")
    if kind == "i18n":
        return train_spiece(folder / "spiece.model", vocab_size=400, words=_MULTI_WORDS)
    return train_gemma_spiece(folder / "tokenizer.model")


def family_hf_config(family: Family, tokenizer_model: Path, tiny: bool = True):
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
    if tiny:
        vision = family.tiny_vision
        text = {**TINY_TEXT, "vocab_size": vocab}
    else:
        vision = {**_SO400M, "image_size": family.image_size, "patch_size": family.patch_size}
        text = {**_SO400M, "vocab_size": family.vocab_size}
    return hf_config(vision, {**text, "max_position_embeddings": family.text_length})


def sparse_config(config) -> dict:
    """config.json as the Hub has it: only the fields that differ from transformers' defaults."""
    from transformers import SiglipTextConfig, SiglipVisionConfig

    skip = {"transformers_version", "architectures", "dtype", "_name_or_path", "id2label", "label2id"}

    def diff(sub, default) -> dict:
        d, base = sub.to_dict(), default.to_dict()
        out = {k: v for k, v in d.items() if k not in skip and base.get(k) != v}
        if out.get("projection_size") == d["hidden_size"]:
            del out["projection_size"]  # implied: the Hub files predate the field
        return {**out, "model_type": d["model_type"]}

    return {"architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
            "text_config": diff(config.text_config, SiglipTextConfig()),
            "torch_dtype": "float32", "transformers_version": "4.49.0",
            "vision_config": diff(config.vision_config, SiglipVisionConfig())}


def save_tokenizer(folder: Path, kind: str, tokenizer_model: Path, text_length: int) -> None:
    """The tokenizer files of a family as transformers writes them."""
    from transformers import GemmaTokenizer, SiglipTokenizer

    if kind in ("siglip", "i18n"):
        # As Google's conversion saved them: no attention_mask, model_max_length = the text length.
        SiglipTokenizer(str(tokenizer_model), model_input_names=["input_ids"],
                        model_max_length=text_length).save_pretrained(folder)
        return
    # transformers converts tokenizer.model with its GemmaConverter into tokenizer.json; the SigLIP 2
    # conversion set no BOS, an EOS, right padding and no attention_mask. The Hub repos ship both files.
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer_model, Path(tmp) / "tokenizer.model")
        tok = GemmaTokenizer.from_pretrained(tmp, add_bos_token=False, add_eos_token=True,
                                             padding_side="right", model_input_names=["input_ids"],
                                             model_max_length=text_length)
        tok.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("vocab_file", None)  # the temporary folder it was converted from
    cfg.update(add_bos_token=False, add_eos_token=True)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer_model.resolve() != (folder / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, folder / "tokenizer.model")


def save_family_checkpoint(folder: Path, name: str, tokenizer_model: Path, *, tiny: bool = True,
                           seed: int = 0) -> Path:
    """One of CHECKPOINTS with random weights in its Hub layout: sparse config.json,
    model.safetensors, preprocessor_config.json (its size and resample) and its tokenizer files."""
    from transformers import SiglipImageProcessorPil, SiglipModel

    family = CHECKPOINTS[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = family_hf_config(family, tokenizer_model, tiny)
    torch.manual_seed(seed)
    model = SiglipModel(config)
    randomize(model, seed)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(sparse_config(config), indent=2) + "\n")
    size = config.vision_config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size},
                            resample=family.resample).save_pretrained(folder)
    save_tokenizer(folder, family.tokenizer, tokenizer_model, family.text_length)
    return folder


def write_big_vision_npz(path: Path, state: dict[str, torch.Tensor], config, *, stacked: bool,
                         text_head: bool = True, prefix: str = "params/") -> Path:
    """A transformers SiglipModel state dict written as big_vision writes SigLIP: the flax parameter
    tree flattened with "/" into np.savez. Written from flax's own conventions, not from our reader:
    Dense kernels (in, out); DenseGeneral q/k/v kernels (D, H, Dh) and biases (H, Dh), out kernel
    (H, Dh, D); conv kernel HWIO; pos_embedding (1, N, D); MAP probe (1, 1, D); t and b of shape (1,);
    blocks as encoderblock_i or, with `stacked`, one encoderblock with a leading layer axis (nn.scan).
    `text_head=False` drops txt/head, as in the i18n checkpoint."""
    a = {k: v.detach().float().numpy() for k, v in state.items()}
    Hv, Ht = config.vision_config.num_attention_heads, config.text_config.num_attention_heads

    def dense(w):  # torch Linear (out, in) -> flax Dense kernel (in, out)
        return w.T

    def heads_in(w, H):  # (H·Dh, D) -> (D, H, Dh): q[h, k] = sum_d x[d] kernel[d, h, k]
        return w.reshape(H, -1, w.shape[1]).transpose(2, 0, 1)

    def heads_out(w, H):  # (D, H·Dh) -> (H, Dh, D): y[d] = sum_hk o[h, k] kernel[h, k, d]
        return w.reshape(w.shape[0], H, -1).transpose(1, 2, 0)

    tree: dict[str, np.ndarray] = {
        "img/embedding/kernel": a["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": a["vision_model.embeddings.patch_embedding.bias"],
        "img/pos_embedding": a["vision_model.embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": a["vision_model.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": a["vision_model.post_layernorm.bias"],
        "img/MAPHead_0/probe": a["vision_model.head.probe"],
        "img/MAPHead_0/LayerNorm_0/scale": a["vision_model.head.layernorm.weight"],
        "img/MAPHead_0/LayerNorm_0/bias": a["vision_model.head.layernorm.bias"],
        "txt/Embed_0/embedding": a["text_model.embeddings.token_embedding.weight"],
        "txt/pos_embedding": a["text_model.embeddings.position_embedding.weight"][None],
        "txt/Encoder_0/encoder_norm/scale": a["text_model.final_layer_norm.weight"],
        "txt/Encoder_0/encoder_norm/bias": a["text_model.final_layer_norm.bias"],
        "t": a["logit_scale"].reshape(1),
        "b": a["logit_bias"].reshape(1),
    }
    map_head = "img/MAPHead_0/"
    mha = map_head + "MultiHeadDotProductAttention_0/"
    for r in (0, 1):
        tree[f"{map_head}MlpBlock_0/Dense_{r}/kernel"] = dense(a[f"vision_model.head.mlp.fc{r + 1}.weight"])
        tree[f"{map_head}MlpBlock_0/Dense_{r}/bias"] = a[f"vision_model.head.mlp.fc{r + 1}.bias"]
    D = config.vision_config.hidden_size
    w, b = a["vision_model.head.attention.in_proj_weight"], a["vision_model.head.attention.in_proj_bias"]
    for j, n in enumerate(("query", "key", "value")):
        tree[f"{mha}{n}/kernel"] = heads_in(w[j * D : (j + 1) * D], Hv)
        tree[f"{mha}{n}/bias"] = b[j * D : (j + 1) * D].reshape(Hv, -1)
    tree[f"{mha}out/kernel"] = heads_out(a["vision_model.head.attention.out_proj.weight"], Hv)
    tree[f"{mha}out/bias"] = a["vision_model.head.attention.out_proj.bias"]
    if text_head:
        tree["txt/head/kernel"] = dense(a["text_model.head.weight"])
        tree["txt/head/bias"] = a["text_model.head.bias"]
    # Our name in a layer -> (big_vision name in an encoderblock, how the array is laid out).
    attn = "MultiHeadDotProductAttention_0/"
    block = {
        "layer_norm1.weight": ("LayerNorm_0/scale", None), "layer_norm1.bias": ("LayerNorm_0/bias", None),
        "layer_norm2.weight": ("LayerNorm_1/scale", None), "layer_norm2.bias": ("LayerNorm_1/bias", None),
        **{f"mlp.fc{r + 1}.weight": (f"MlpBlock_0/Dense_{r}/kernel", "dense") for r in (0, 1)},
        **{f"mlp.fc{r + 1}.bias": (f"MlpBlock_0/Dense_{r}/bias", None) for r in (0, 1)},
        "self_attn.out_proj.weight": (attn + "out/kernel", "heads_out"),
        "self_attn.out_proj.bias": (attn + "out/bias", None),
        **{f"self_attn.{p}_proj.weight": (f"{attn}{n}/kernel", "heads_in") for p, n in _QKV_NAMES},
        **{f"self_attn.{p}_proj.bias": (f"{attn}{n}/bias", "heads_bias") for p, n in _QKV_NAMES},
    }
    for tower, enc, H, L in (("vision_model", "img/Transformer/", Hv, config.vision_config.num_hidden_layers),
                             ("text_model", "txt/Encoder_0/", Ht, config.text_config.num_hidden_layers)):
        layout = {None: lambda x: x, "dense": dense, "heads_in": lambda x, H=H: heads_in(x, H),
                  "heads_out": lambda x, H=H: heads_out(x, H), "heads_bias": lambda x, H=H: x.reshape(H, -1)}
        for ours, (theirs, kind) in block.items():
            arrays = [layout[kind](a[f"{tower}.encoder.layers.{i}.{ours}"]) for i in range(L)]
            if stacked:
                tree[f"{enc}encoderblock/{theirs}"] = np.stack(arrays)
            else:
                tree.update({f"{enc}encoderblock_{i}/{theirs}": x for i, x in enumerate(arrays)})
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, **{prefix + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tree.items()})
    return path


NAFLEX = "google/siglip2-so400m-patch16-naflex"
# The tiny NaFlex shape: 8 px patches and an 8 x 8 position table (the real one: 16 px, 16 x 16).
TINY_NAFLEX_VISION = {**TINY_VISION, "patch_size": 8, "num_patches": 64}
del TINY_NAFLEX_VISION["image_size"]


def naflex_hf_config(tokenizer_model: Path, tiny: bool = True):
    import sentencepiece as spm
    from transformers import Siglip2Config

    if tiny:
        vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()
        vision, text = TINY_NAFLEX_VISION, {**TINY_TEXT, "vocab_size": vocab}
    else:
        vision, text = {**_SO400M, "patch_size": 16, "num_patches": 256}, {**_SO400M, "vocab_size": 256000}
    return Siglip2Config(text_config={**text, "max_position_embeddings": 64}, vision_config=vision)


def naflex_sparse_config(config) -> dict:
    """A Siglip2Model config.json as the Hub has it: only what differs from Siglip2Config's defaults."""
    from transformers import Siglip2TextConfig, Siglip2VisionConfig

    skip = {"transformers_version", "architectures", "dtype", "_name_or_path", "id2label", "label2id"}

    def diff(sub, default) -> dict:
        d, base = sub.to_dict(), default.to_dict()
        out = {k: v for k, v in d.items() if k not in skip and base.get(k) != v}
        if out.get("projection_size") == d["hidden_size"]:
            del out["projection_size"]
        return {**out, "model_type": d["model_type"]}

    return {"architectures": ["Siglip2Model"], "initializer_factor": 1.0, "model_type": "siglip2",
            "text_config": diff(config.text_config, Siglip2TextConfig()),
            "torch_dtype": "float32", "transformers_version": "4.49.0.dev0",
            "vision_config": diff(config.vision_config, Siglip2VisionConfig())}


def structured_positions(g: int, D: int) -> torch.Tensor:
    """A (g * g, D) position table with structure: smooth waves of several frequencies along rows
    and columns plus a checkerboard, so that bilinear against bicubic, antialias or not, and rows
    swapped with columns all give visibly different resized tables (random noise would not tell
    them apart as sharply)."""
    r = torch.arange(g, dtype=torch.float64)[:, None, None]
    c = torch.arange(g, dtype=torch.float64)[None, :, None]
    d = torch.arange(D, dtype=torch.float64)[None, None, :]
    f = 0.3 + (d % 7) * 0.25  # a different frequency per channel
    waves = torch.sin(f * r + d) + 0.7 * torch.cos(0.5 * f * c - d) + 0.05 * r * (d % 3 - 1)
    checker = ((r + c) % 2 * 2 - 1) * (d % 5 == 0)
    return (0.3 * (waves + checker)).reshape(g * g, D).float()


def save_naflex_checkpoint(folder: Path, tokenizer_model: Path, *, tiny: bool = True, seed: int = 0,
                           max_num_patches: int = 256) -> Path:
    """SigLIP 2 NaFlex with random weights (a structured position table) in the Hub layout: sparse
    config.json (model_type siglip2), model.safetensors, preprocessor_config.json of transformers'
    Siglip2ImageProcessor (max_num_patches, patch_size, bilinear) and the Gemma tokenizer files."""
    from transformers import Siglip2ImageProcessorPil, Siglip2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = naflex_hf_config(tokenizer_model, tiny)
    torch.manual_seed(seed)
    model = Siglip2Model(config)
    randomize(model, seed)
    v = config.vision_config
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.copy_(
            structured_positions(int(v.num_patches**0.5), v.hidden_size))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(naflex_sparse_config(config), indent=2) + "\n")
    Siglip2ImageProcessorPil(patch_size=v.patch_size, max_num_patches=max_num_patches).save_pretrained(folder)
    # The Hub's file was saved through Siglip2Processor, which records itself there.
    pre = folder / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "processor_class": "Siglip2Processor"},
                              indent=2, sort_keys=True) + "\n")
    save_tokenizer(folder, "gemma", tokenizer_model, 64)
    return folder


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package ("google"), or a masked module
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a random SigLIP checkpoint in the Hub layout.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="a tiny config instead of the full so400m (3.5 GB)")
    ap.add_argument("--checkpoint", choices=sorted([*CHECKPOINTS, NAFLEX]),
                    help="the layout of this released checkpoint (tokenizer, sizes, text length) "
                    "instead of siglip-so400m-patch14-384")
    args = ap.parse_args()
    # Checked before anything is written: a missing transformers used to fail half-way, leaving a
    # folder with a spiece.model and no weights.
    missing = [name for name in ("transformers", "google.protobuf") if not _importable(name)]
    if missing:
        sys.exit(f"error: python -m siglip_so400m.testing builds its checkpoints with transformers' "
                 f"SiglipModel and tokenizer, from the [test] extra ({', '.join(missing)} missing): "
                 "pip install 'siglip_so400m[test]'")
    from transformers.utils import logging as hf_logging

    # transformers' chatter, which says nothing about the checkpoint written: that the tiny vocabulary
    # does not hold the CLIP bos/eos ids its SiglipConfig defaults to (SigLIP never uses them), and a
    # progress bar for one shard. What this prints is the folder.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint == NAFLEX:
        save_naflex_checkpoint(args.out, train_tokenizer("gemma", args.out), tiny=args.tiny)
    elif args.checkpoint:
        tok = train_tokenizer(CHECKPOINTS[args.checkpoint].tokenizer, args.out)
        save_family_checkpoint(args.out, args.checkpoint, tok, tiny=args.tiny)
    else:
        spiece = train_spiece(args.out / "spiece.model")
        save_checkpoint(args.out, tiny_hf_config(spiece) if args.tiny else so400m_hf_config(), spiece)
    print(args.out)


if __name__ == "__main__":
    main()
