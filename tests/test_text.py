"""Token ids equal transformers' SiglipTokenizer(padding="max_length", truncation=True, max_length=64)."""

from __future__ import annotations

import random

import pytest
import torch

from siglip_so400m import Tokenizer

HARD_CASES = [
    "",
    " ",
    "...",
    "!?!",
    "a photo of 2 cats",
    "A Photo Of 2 CATS",
    "This is a photo of a plane.",
    "Café naïve résumé ÜBER straße",
    "東京の猫の写真",
    "東京 猫",
    "😀🐱 emoji 😀",
    "tabs\tand\nnewlines\r\n  and   spaces",
    "▁cat",
    "a▁b ▁▁ c",
    "</s>",
    "hello </s> world",
    "cat</s>",
    "</S> upper-case is not special",
    "<unk> x <unk>",
    "<pad>",
    "x-ray e-mail 12,345.67",
    "'quoted' \"double\" (parens) [brackets] {braces}",
    "«guillemets» — em dash … ellipsis",  # non-ASCII punctuation is kept
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",  # NFKC folds these
    " ".join(["cat"] * 70),  # far over 64 tokens
    " ".join(["crème brûlée"] * 40),
    "word " * 62 + "</s>",  # a literal EOS right at the truncation boundary
    "word " * 63 + "</s>",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_ckpt):
    from transformers import SiglipTokenizer

    return SiglipTokenizer.from_pretrained(str(tiny_ckpt))


@pytest.fixture(scope="module")
def ours(tiny_ckpt):
    return Tokenizer.from_folder(tiny_ckpt)


def reference(tok, texts: list[str]) -> torch.Tensor:
    return tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("text", HARD_CASES)
def test_token_ids_match_transformers_on_hard_cases(text, ours, hf_tokenizer):
    expected = reference(hf_tokenizer, [text])
    got = ours([text])
    assert got.shape == (1, 64) and got.dtype == torch.long
    assert got.tolist() == expected.tolist()


def test_token_ids_match_transformers_on_random_strings(ours, hf_tokenizer):
    # Random mixtures of the characters that make tokenization hard.
    alphabet = [*"abcxyzABCXYZ0123 \t\n.,!?'-_()éüñ東京猫😀▁<>/s", "</s>", "<unk>", "  "]
    rng = random.Random(1)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(300)]
    assert ours(texts).tolist() == reference(hf_tokenizer, texts).tolist()


def test_padding_is_eos_and_no_text_exceeds_64_tokens(ours):
    ids = ours(["a photo of 2 cats", " ".join(["cat"] * 200)])
    assert ids.shape == (2, 64)
    n = len(ours.tokenize("a photo of 2 cats"))
    assert ids[0, n:].eq(1).all() and ids[0, :n].ne(1).all()  # pieces, then EOS padding
    assert ids[1, 63] == 1 and ids[1, :63].ne(1).all()  # truncated to 63 pieces + EOS
    assert ours.is_truncated(" ".join(["cat"] * 200)) and not ours.is_truncated("a cat")


def test_legacy_false_tokenizer_matches_transformers(tmp_path, spiece):
    from transformers import SiglipTokenizer

    SiglipTokenizer(str(spiece), legacy=False).save_pretrained(tmp_path)
    hf = SiglipTokenizer.from_pretrained(str(tmp_path))
    assert hf.legacy is False
    ours = Tokenizer.from_folder(tmp_path)
    assert ours(HARD_CASES).tolist() == reference(hf, HARD_CASES).tolist()


def test_bad_inputs_are_refused(ours, tmp_path):
    with pytest.raises(TypeError, match="must be str"):
        ours([b"bytes"])
    with pytest.raises(ValueError, match="no texts"):
        ours([])
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(tmp_path / "spiece.model")
