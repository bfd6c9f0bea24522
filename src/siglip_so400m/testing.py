"""Random SigLIP checkpoints in the exact Hub layout, for tests and benchmarks (needs transformers).

Nothing can be downloaded where this project is tested, so we make what we compare against:
`transformers.SiglipModel` with random weights saved by `save_pretrained`, the PIL image processor
and the tokenizer files transformers writes, and a SentencePiece model trained on the fly with
sentencepiece's own trainer, shaped like SigLIP's (unigram, pad 0, EOS 1, unk 2, NFKC).

    python -m siglip_so400m.testing OUT_DIR [--tiny]     # writes a checkpoint folder
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a random SigLIP checkpoint in the Hub layout.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="a tiny config instead of the full so400m (3.5 GB)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spiece = train_spiece(args.out / "spiece.model")
    save_checkpoint(args.out, tiny_hf_config(spiece) if args.tiny else so400m_hf_config(), spiece)
    print(args.out)


if __name__ == "__main__":
    main()
