"""Zero-shot classification: score images against text labels, the SigLIP way.

What other tools get wrong and this does not: texts are padded to 64 with EOS and lowercased
(the processor does it), the text tower runs once per (labels, templates) and never per image, and
every score comes three ways: the logit, the sigmoid (SigLIP's own probability that a label matches,
independent of the other labels) and the softmax (relative among the labels given).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .api import Processor
from .config import DEFAULT_TEMPLATE
from .image import ImageInput
from .model import SigLIP
from .text import Tokenizer, check_text_length, is_prompt_template, shorten, warn_if_truncated
from .weights import Checkpoint, atomic_write


def default_cache_dir() -> Path:
    """$SIGLIP_SO400M_CACHE, else $XDG_CACHE_HOME/siglip_so400m, else ~/.cache/siglip_so400m."""
    if os.environ.get("SIGLIP_SO400M_CACHE"):
        return Path(os.environ["SIGLIP_SO400M_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siglip_so400m"


def check_labels(labels: Sequence[str]) -> list[str]:
    """Labels without duplicates (merged, with a warning); empty lists or labels are errors."""
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, not one string")
    if not labels:
        raise ValueError("no labels given")
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"labels must be non-empty strings, got {label!r}")
        check_text_length(label, f"the label {shorten(label)}")
    unique = list(dict.fromkeys(labels))
    if len(unique) < len(labels):
        dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
        warnings.warn(f"duplicate labels merged: {', '.join(map(repr, dupes))}", stacklevel=2)
    return unique


def check_templates(templates: Sequence[str]) -> list[str]:
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty list of strings")
    for t in templates:
        if not isinstance(t, str):
            raise ValueError(f"templates must be strings, got {t!r}")
        check_text_length(t, f"the template {shorten(t)}")
        if not is_prompt_template(t):
            raise ValueError(f"template {shorten(t)} must contain one {{}} where the label goes "
                             "(and no other braces: no format spec such as {:>10}, no field name)")
    return list(dict.fromkeys(templates))


class LabelCache:
    """Label embeddings on disk: a folder per (checkpoint, tokenizer, templates, precision), one small
    file per label in it, so that a second run with the same labels does not run the text tower.

    One file per label, each written to a fresh temporary name and renamed into place, means that
    concurrent writers (threads, processes, hosts sharing the folder) never lose each other's labels
    and that knowing what is cached reads no tensor. A cache that cannot be written (read-only,
    full, or not a folder) costs one warning, never the results."""

    def __init__(self, root: str | Path, ckpt: Checkpoint, tokenizer: Tokenizer,
                 templates: Sequence[str], precision: str):
        key = json.dumps({"checkpoint": ckpt.identity(), "tokenizer": tokenizer.identity(),
                          "templates": list(templates), "dtype": precision})
        self.path = Path(root) / f"labels-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
        self._read: dict[str, Tensor] = {}  # each file is read once, then served from here

    def _file(self, label: str) -> Path:
        # The label's sha256 names its file: any string is then a safe file name.
        return self.path / f"{hashlib.sha256(label.encode()).hexdigest()}.safetensors"

    def missing(self, labels: Sequence[str]) -> list[str]:
        """The labels without a usable cached embedding."""
        found = self.get(labels)
        return [label for label in labels if label not in found]

    def get(self, labels: Sequence[str]) -> dict[str, Tensor]:
        """The cached embeddings of those labels that have one, each file read at most once; a
        damaged file counts as missing (put() replaces it)."""
        for label in labels:
            if label in self._read:
                continue
            try:
                with safe_open(str(self._file(label)), framework="pt") as f:
                    if (f.metadata() or {}).get("label") == label:
                        self._read[label] = f.get_tensor("embedding")
            except (SafetensorError, OSError, ValueError):
                continue  # no file yet (FileNotFoundError), or a damaged one
        return {label: self._read[label] for label in labels if label in self._read}

    def put(self, embeddings: dict[str, Tensor]) -> None:
        """Store each label's embedding, atomically per label; an OSError becomes one warning."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for label, emb in embeddings.items():
                # Atomic (readers see no file or a whole one), not durable: a file a power cut
                # damaged reads as missing and is written again.
                atomic_write(self._file(label), lambda p, emb=emb, label=label: save_file(
                    {"embedding": emb.contiguous()}, p, metadata={"label": label}), durable=False)
                self._read[label] = emb
        except (OSError, SafetensorError) as e:
            warnings.warn(f"label cache not written ({e}); the results are not affected. Pass "
                          "--no-cache, or --cache-dir / $SIGLIP_SO400M_CACHE to a writable folder",
                          stacklevel=2)


@torch.inference_mode()
def embed_labels(model: SigLIP, tokenizer: Tokenizer, labels: Sequence[str], templates: Sequence[str],
                 batch_size: int = 32) -> Tensor:
    """(N, D) float32 label embeddings: each template filled in, encoded, normalized, averaged over
    templates and normalized again (the CLIP/SigLIP prompt-ensembling recipe)."""
    texts = [t.format(label) for label in labels for t in templates]
    warn_if_truncated(tokenizer, texts)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        ids = tokenizer(texts[i : i + batch_size]).to(device)
        out.append(model.encode_text(ids, normalize=True).float())
    emb = torch.cat(out).view(len(labels), len(templates), -1).mean(1)  # (N, T, D) -> (N, D)
    return F.normalize(emb, dim=-1)


class ZeroShotClassifier:
    """Labels embedded once, then any number of images scored against them."""

    def __init__(self, model: SigLIP, processor: Processor, labels: Sequence[str],
                 templates: Sequence[str] = (DEFAULT_TEMPLATE,), *, cache: LabelCache | None = None,
                 text_batch_size: int = 32):
        self.model = model
        self.processor = processor
        self.labels = check_labels(labels)
        self.templates = check_templates(templates)
        cached = cache.get(self.labels) if cache else {}
        todo = [label for label in self.labels if label not in cached]
        if todo:
            if processor.tokenizer is None:
                raise RuntimeError("the checkpoint has no tokenizer (spiece.model, tokenizer.json or "
                                   "tokenizer.model) to tokenize labels with")
            fresh = embed_labels(model, processor.tokenizer, todo, self.templates, text_batch_size)
            fresh = dict(zip(todo, fresh.cpu(), strict=True))
            cached.update(fresh)
            if cache:
                cache.put(fresh)
        device = next(model.parameters()).device
        self.label_emb = torch.stack([cached[label] for label in self.labels]).to(device)  # (N, D)

    @torch.inference_mode()
    def logits(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N) float32 logits exp(t') cos + b against the labels."""
        device = self.label_emb.device
        img = self.model.encode_image(pixel_values.to(device), normalize=True).float()
        return self.model.logits(img, self.label_emb).float()

    def scores(self, logits: Tensor) -> list[list[dict[str, float | str]]]:
        """Per image, every label sorted best first with its logit, sigmoid and softmax."""
        # One copy to the CPU for the whole batch: an .item() per value would be one device sync
        # each on a GPU.
        logits = logits.float().cpu()
        order = logits.argsort(dim=-1, descending=True, stable=True).tolist()
        values = zip(logits.tolist(), logits.sigmoid().tolist(), logits.softmax(dim=-1).tolist(),
                     strict=True)
        return [[{"label": self.labels[j], "logit": lg[j], "sigmoid": sg[j], "softmax": sm[j]}
                 for j in idx] for idx, (lg, sg, sm) in zip(order, values, strict=True)]

    def __call__(self, images: ImageInput | list[ImageInput], batch_size: int = 8) -> list[list[dict]]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for i in range(0, len(images), batch_size):
            out += self.scores(self.logits(self.processor.images(images[i : i + batch_size])))
        return out


def zero_shot(model: SigLIP, processor: Processor, images: ImageInput | list[ImageInput],
              labels: Sequence[str], template: str = DEFAULT_TEMPLATE,
              templates: Sequence[str] | None = None, batch_size: int = 8,
              cache_dir: str | Path | None = None, max_num_patches: int | None = None) -> list[list[dict]]:
    """Classify images against labels. Returns, per image, the labels sorted best first, each a dict
    with `label`, `logit`, `sigmoid` (independent per label; SigLIP's native probability) and
    `softmax` (relative over the given labels). Several `templates` are averaged; `cache_dir` keeps
    label embeddings on disk between calls. max_num_patches: SigLIP 2 NaFlex's patch budget per
    image (default: the checkpoint's); `processor` itself is left as it is."""
    templates = list(templates) if templates is not None else [template]
    if max_num_patches is not None:
        processor = processor.sized(None, max_num_patches)  # ValueError for a fixed-size checkpoint
    cache = None
    if cache_dir is not None:
        ckpt = getattr(model, "checkpoint", None)
        if ckpt is None or processor.tokenizer is None:
            raise ValueError("cache_dir needs a model from siglip_so400m.load() with its tokenizer")
        cache = LabelCache(cache_dir, ckpt, processor.tokenizer, templates, model.precision)
    return ZeroShotClassifier(model, processor, labels, templates, cache=cache)(images, batch_size)
