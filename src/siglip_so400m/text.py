"""Text preprocessing: SentencePiece ids exactly as transformers' SiglipTokenizer makes them with
`padding="max_length", truncation=True, max_length=64`.

What SigLIP expects: lowercase, ASCII punctuation stripped, whitespace collapsed, the SentencePiece
pieces, at most 63 of them, then EOS (id 1), then EOS again as padding up to exactly 64 tokens. No
attention mask: the model was trained on padded sequences and pools the last position.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path

import sentencepiece as spm
import torch

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-boundary marker
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class Tokenizer:
    """SigLIP's text preprocessing over a SentencePiece model (the checkpoint's spiece.model)."""

    def __init__(self, spiece_model: str | Path, *, max_length: int = 64, do_lower_case: bool = True,
                 eos_token: str = "</s>", unk_token: str = "<unk>", pad_token: str = "</s>",
                 extra_special_tokens: tuple[str, ...] = (), legacy: bool = True):
        self.path = Path(spiece_model)
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
        if not legacy:
            sp = _without_dummy_prefix(sp)
        self.sp = sp
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.unk_token = unk_token
        self.specials = {t: self._piece_id(t) for t in (eos_token, unk_token, pad_token,
                                                         *extra_special_tokens)}
        self.eos_id = self.specials[eos_token]
        self.pad_id = self.specials[pad_token]
        # Special tokens written literally in a text become those tokens (as in transformers);
        # longest first so that the regex prefers the longest match at a position.
        alternatives = sorted(self.specials, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        # Texts are encoded behind an "<unk>" prefix whose pieces are then dropped: the trick that
        # transformers uses to keep SentencePiece from treating the text's start specially.
        self._unk_len = len(self.sp.encode(unk_token, out_type=str))

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 64) -> Tokenizer:
        """Read spiece.model and, when present, tokenizer_config.json from a checkpoint folder."""
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        extra = tuple(_content(t) for t in cfg.get("added_tokens_decoder", {}).values())
        return cls(folder / "spiece.model",
                   max_length=min(max_length, int(cfg.get("model_max_length", max_length))),
                   do_lower_case=bool(cfg.get("do_lower_case", True)),
                   eos_token=_content(cfg.get("eos_token", "</s>")),
                   unk_token=_content(cfg.get("unk_token", "<unk>")),
                   pad_token=_content(cfg.get("pad_token", "</s>")),
                   extra_special_tokens=extra,
                   legacy=bool(cfg.get("legacy", True)))

    def identity(self) -> str:
        """A digest of everything that decides the ids (for caches of text embeddings)."""
        h = hashlib.sha256(self.sp.serialized_model_proto())
        h.update(repr((self.max_length, self.do_lower_case, self.unk_token, sorted(self.specials.items()),
                       self.eos_id, self.pad_id)).encode())
        return h.hexdigest()

    def _piece_id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise ValueError(f"special token {piece!r} is not in {self.path}")
        return i

    def canonicalize(self, text: str) -> str:
        """big_vision's prompt canonicalisation: lowercase, no punctuation, single spaces."""
        if self.do_lower_case:
            text = text.lower()
        return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

    def tokenize(self, text: str) -> list[str]:
        """Text -> SentencePiece pieces (special tokens kept whole), before truncation and EOS."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        # A literal "▁" in the text would read as a word boundary; transformers makes it a space
        # and marks the start of the text with one.
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for chunk in self._special_re.split(text):
            if chunk in self.specials:
                tokens.append(chunk)
            elif chunk:
                pieces = self.sp.encode(self.unk_token + self.canonicalize(chunk), out_type=str)
                tokens += pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.specials:
            tokens = tokens[1:]  # a lone boundary marker before a special token means nothing
        return tokens

    def _ids(self, text: str) -> list[int]:
        return [self.specials[t] if t in self.specials else self.sp.piece_to_id(t)
                for t in self.tokenize(text)]

    def encode(self, text: str) -> list[int]:
        """Text -> exactly max_length ids: pieces truncated to max_length - 1, EOS, EOS padding."""
        ids = self._ids(text)[: self.max_length - 1]
        if not ids or ids[-1] != self.eos_id:
            ids.append(self.eos_id)
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def is_truncated(self, text: str) -> bool:
        """Whether the text has more than the max_length - 1 tokens that fit before the EOS."""
        return len(self._ids(text)) > self.max_length - 1

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """One text or a list -> (B, max_length) int64 token ids."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("no texts given")
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)


def _content(token: str | dict) -> str:
    """tokenizer_config.json writes tokens either as strings or as AddedToken dicts."""
    return token["content"] if isinstance(token, dict) else token


def _without_dummy_prefix(sp: spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """transformers' `legacy=False`: the same model with SentencePiece's dummy prefix turned off."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # it needs protobuf
        raise ImportError("tokenizer_config.json sets legacy=false, which needs the protobuf "
                          f"package to edit spiece.model: pip install protobuf ({e})") from None
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    if not proto.normalizer_spec.add_dummy_prefix:
        return sp
    proto.normalizer_spec.add_dummy_prefix = False
    out = spm.SentencePieceProcessor()
    out.LoadFromSerializedProto(proto.SerializeToString())
    return out
