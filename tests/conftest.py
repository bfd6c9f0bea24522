"""Checkpoints in the exact Hub layout, made by transformers itself, with random weights.

Nothing can be downloaded here, so every test builds what it compares against: a SentencePiece
model trained on the fly with sentencepiece's own trainer (shaped like SigLIP's: unigram, pad 0,
EOS 1, unk 2, NFKC), and `transformers.SiglipModel` checkpoints saved with `save_pretrained`
together with the tokenizer and PIL image processor that transformers writes for them.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

SO400M_CONFIG = Path(__file__).parents[1] / "configs" / "siglip-so400m-patch14-384.json"

# Words for the tokenizer's training corpus: plain English, accents, CJK, emoji, digits, so that
# every hard case of the tokenizer tests meets real pieces and unknown characters alike.
_WORDS = (
    "a an the photo picture of two 2 cats cat dog dogs plane remote red blue green circle square "
    "triangle big small this is on in with and café naïve résumé über crème brûlée 東京 猫 写真 "
    "😀 🐱 hello world über straße ñandú 12 345 x-ray e-mail"
).split()


def train_spiece(path: Path, vocab_size: int = 200) -> Path:
    """A unigram SentencePiece model with SigLIP's special ids, trained on a synthetic corpus."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12))) for _ in range(4000)]
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


def save_checkpoint(folder: Path, config, spiece: Path, seed: int = 0) -> Path:
    """transformers' SiglipModel + tokenizer + PIL image processor saved in the Hub layout."""
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    torch.manual_seed(seed)
    model = SiglipModel(config)
    randomize(model, seed)
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    SiglipTokenizer(str(spiece)).save_pretrained(folder)
    return folder


TINY_VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=7)  # 32 px with 7 px patches drops pixels, as so400m does


@pytest.fixture(scope="session")
def spiece(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("spiece") / "spiece.model")


@pytest.fixture(scope="session")
def tiny_config(spiece):
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=vocab)
    return hf_config(TINY_VISION, text)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config, spiece) -> Path:
    """A tiny random SigLIP saved by transformers: config, weights, tokenizer, preprocessor."""
    return save_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config, spiece)


@pytest.fixture
def tiny_copy(tmp_path, tiny_ckpt) -> Path:
    """A private copy of the tiny checkpoint for tests that damage it."""
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))


@pytest.fixture(scope="session")
def so400m_ckpt(tmp_path_factory, spiece) -> Path:
    """The full so400m shape, random weights, 3.5 GB: the real file's 888 keys and shapes."""
    hub = json.loads(SO400M_CONFIG.read_text())
    return save_checkpoint(tmp_path_factory.mktemp("so400m"),
                           hf_config(hub["vision_config"], hub["text_config"]), spiece)


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
