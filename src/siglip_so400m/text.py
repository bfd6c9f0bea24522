"""Text preprocessing: token ids exactly as the checkpoint's reference tokenizer makes them.

Two families, chosen by the checkpoint's own tokenizer files (`load_tokenizer`):

- SigLIP (spiece.model, `SiglipTokenizer`): lowercase, ASCII punctuation stripped, whitespace
  collapsed, SentencePiece pieces, at most L-1 of them, then EOS (id 1), then EOS again as padding up
  to exactly L tokens (L = 64, or 16 for so400m-patch14-224): transformers' SiglipTokenizer with
  `padding="max_length", truncation=True, max_length=L`.
- SigLIP 2 (tokenizer.json / tokenizer.model, `GemmaTokenizer`): the Gemma BPE vocabulary with byte
  fallback, lowercase (big_vision's training recipe), punctuation kept, at most L-1 tokens, EOS
  (id 1), padded with <pad> (id 0) to L.

No attention mask: the model was trained on padded sequences and pools the last position.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import threading
import warnings
from pathlib import Path

import sentencepiece as spm
import torch

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-boundary marker
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# The longest label, template or request text the jobs accept, in characters. The model reads 64
# tokens (a few hundred characters); a megabyte of text costs seconds and hundreds of MB to tokenize
# for the same 64 tokens, so entry points refuse more than this before tokenizing.
MAX_TEXT_CHARS = 4096


class TextTooLongError(ValueError):
    """A text over MAX_TEXT_CHARS, refused before it is tokenized."""


def check_text_length(text: str, what: str) -> None:
    """Raise TextTooLongError, naming `what` (a label, a template, input[3]), if text is too long."""
    if len(text) > MAX_TEXT_CHARS:
        raise TextTooLongError(f"{what} is {len(text)} characters, over the limit of {MAX_TEXT_CHARS}: "
                               "the model reads only its first 64 tokens (a few hundred characters)")


def is_prompt_template(template: str) -> bool:
    """Whether a prompt template holds exactly one bare `{}` where the label goes (and `{{`, `}}`
    for literal braces). No format spec, conversion or field name: `{:>40000000}` would expand every
    label to 40 MB before anything could check its length, so the shape is checked, never formatted."""
    try:
        fields = [f[1:] for f in string.Formatter().parse(template) if f[1] is not None]
    except ValueError:  # a lone { or }
        return False
    return fields == [("", "", None)]


def shorten(text: str, width: int = 60) -> str:
    """The text's start, for messages: never a whole long label."""
    return repr(text) if len(text) <= width else f"{text[:width]!r}... ({len(text)} characters)"


_truncation_warned = threading.Event()


def warn_if_truncated(tokenizer: AnyTokenizer, texts: list[str]) -> None:
    """Warn, once per process, when a text is longer than the tokenizer's max_length tokens and
    so loses its end. Once, and shortened: a warning per long label once wrote 205 MB to stderr
    in eight requests, and every distinct message stays in the warnings registry for good."""
    if _truncation_warned.is_set():
        return  # nothing left to say: no text is tokenized twice
    for text in texts:
        if tokenizer.is_truncated(text):
            _truncation_warned.set()
            warnings.warn(f"{shorten(text)} is over {tokenizer.max_length} tokens and was truncated; "
                          "so may later texts be (said once per process)", stacklevel=2)
            return


class _Batched:
    """What both tokenizers share once `_ids` and `encode` are defined: truncation check, batching."""

    max_length: int

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


class Tokenizer(_Batched):
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
        self.vocab_size = sp.get_piece_size()
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


class GemmaTokenizer(_Batched):
    """SigLIP 2's text preprocessing over the Gemma vocabulary (BPE with byte fallback).

    With a tokenizer.json the ids come from the `tokenizers` library, the engine transformers'
    GemmaTokenizer runs, so they are the reference ids by construction; with only a SentencePiece
    tokenizer.model (big_vision's own gemma_tokenizer.model) they come from `sentencepiece`, the engine
    big_vision trained with. Unlike transformers, texts are lowercased first: big_vision lowercased
    every caption in SigLIP 2's training, while the Hub's GemmaTokenizer does not.
    """

    def __init__(self, path: str | Path, *, max_length: int = 64, do_lower_case: bool = True,
                 eos_token: str = "<eos>", pad_token: str = "<pad>"):
        self.path = Path(path)
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        if self.path.suffix == ".json":
            try:
                import tokenizers
            except ImportError:  # a core dependency, so only a broken install gets here
                raise ImportError("reading tokenizer.json needs the tokenizers package: "
                                  "pip install tokenizers") from None
            try:
                tok = tokenizers.Tokenizer.from_file(str(self.path))
            except Exception as e:  # tokenizers raises a bare Exception on a bad file
                raise ValueError(f"{self.path}: not a tokenizers JSON file ({e})") from None
            # Truncation, padding and EOS are ours to add (below), whatever the file sets.
            tok.no_truncation()
            tok.no_padding()
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            vocab = tok.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1
            ids = {t: vocab.get(t) for t in (eos_token, pad_token)}
            self._blob = self.path.read_bytes()
        else:
            sp = spm.SentencePieceProcessor()
            try:
                sp.Load(str(self.path))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{self.path}: not a SentencePiece model ({e})") from None
            # transformers' converted tokenizer matches its special tokens (<pad>, <eos>, <bos>, <unk>)
            # written literally in a text; sentencepiece would spell them out, so split them off first.
            specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                        if sp.is_control(i) or sp.is_unknown(i)}
            split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

            def encode(text: str) -> list[int]:
                ids: list[int] = []
                for chunk in split.split(text) if specials else [text]:
                    ids += [specials[chunk]] if chunk in specials else sp.encode(chunk) if chunk else []
                return ids

            self._encode = encode
            self.vocab_size = sp.get_piece_size()
            ids = {t: (sp.piece_to_id(t) if sp.id_to_piece(sp.piece_to_id(t)) == t else None)
                   for t in (eos_token, pad_token)}
            self._blob = sp.serialized_model_proto()
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"special token {missing[0]!r} is not in {self.path}")
        self.eos_id, self.pad_id = ids[eos_token], ids[pad_token]

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 64) -> GemmaTokenizer:
        """tokenizer.json (else tokenizer.model) and tokenizer_config.json of a checkpoint folder."""
        folder = Path(folder)
        cfg = _read_tokenizer_config(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            path = folder / "tokenizer.model"
        return cls(path, max_length=max_length, eos_token=_content(cfg.get("eos_token", "<eos>")),
                   pad_token=_content(cfg.get("pad_token", "<pad>")))

    def identity(self) -> str:
        """A digest of everything that decides the ids (for caches of text embeddings)."""
        h = hashlib.sha256(self._blob)
        h.update(repr((self.max_length, self.do_lower_case, self.eos_id, self.pad_id)).encode())
        return h.hexdigest()

    def _ids(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        return self._encode(text.lower() if self.do_lower_case else text)

    def encode(self, text: str) -> list[int]:
        """Text -> exactly max_length ids: tokens truncated to max_length - 1, EOS, <pad> padding."""
        ids = [*self._ids(text)[: self.max_length - 1], self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))


AnyTokenizer = Tokenizer | GemmaTokenizer
# tokenizer_config.json's tokenizer_class -> ours; a folder without one is told apart by its files.
_GEMMA_CLASSES = {"GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer"}
_SIGLIP_CLASSES = {"SiglipTokenizer", "SiglipTokenizerFast"}


def load_tokenizer(folder: str | Path, max_length: int) -> AnyTokenizer | None:
    """The tokenizer a checkpoint folder's files name, or None when it has no tokenizer files."""
    folder = Path(folder)
    cfg = _read_tokenizer_config(folder)
    cls_name = cfg.get("tokenizer_class")
    # Google's SigLIP conversions set model_max_length to the model's text length (64, or 16 for
    # so400m-patch14-224); SigLIP 2's Gemma tokenizer config may carry the language model's context
    # (8192) or transformers' "none" (1e30) instead, which only disagrees if it is shorter.
    declared = cfg.get("model_max_length")
    gemma = cls_name in _GEMMA_CLASSES
    if isinstance(declared, int) and (declared < max_length if gemma else
                                      declared < 10**6 and declared != max_length):
        raise ValueError(f"text-length mismatch: {folder}/tokenizer_config.json has model_max_length "
                         f"{declared} but the model has {max_length} text positions "
                         "(config.json text_config.max_position_embeddings); fix one to match the other")
    has_gemma = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    if cls_name in _GEMMA_CLASSES or (cls_name is None and has_gemma and
                                      not (folder / "spiece.model").is_file()):
        if not has_gemma:
            raise ValueError(f"{folder}/tokenizer_config.json names {cls_name} but the folder has "
                             "neither tokenizer.json nor tokenizer.model")
        return GemmaTokenizer.from_folder(folder, max_length)
    if cls_name not in (None, *_SIGLIP_CLASSES):
        raise ValueError(f"{folder}/tokenizer_config.json names tokenizer_class {cls_name!r}; "
                         "SigLIP checkpoints use SiglipTokenizer or GemmaTokenizer")
    if (folder / "spiece.model").is_file():
        return Tokenizer.from_folder(folder, max_length)
    return None


def tokenizer_from_file(path: str | Path, max_length: int) -> AnyTokenizer:
    """A tokenizer file given on its own (e.g. beside a big_vision .npz): tokenizer.json is Gemma's;
    a SentencePiece .model is Gemma's when its EOS piece is <eos> (gemma_tokenizer.model), SigLIP's
    when it is </s> (c4_en / mc4 sentencepiece.model)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path}: no such file")
    if path.suffix == ".json":
        return GemmaTokenizer(path, max_length=max_length)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if sp.get_piece_size() > 1 and sp.id_to_piece(1) == "<eos>":
        return GemmaTokenizer(path, max_length=max_length)
    return Tokenizer(path, max_length=max_length)


def _read_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


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
