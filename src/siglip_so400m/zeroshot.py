"""Zero-shot classification: score images against text labels, the SigLIP way.

What other tools get wrong and this does not: texts are padded to 64 with EOS and lowercased
(the processor does it), the text tower runs once per (labels, templates) and never per image, and
every score comes three ways: the logit, the sigmoid (SigLIP's own probability that a label matches,
independent of the other labels) and the softmax (relative among the labels given).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from . import files
from .api import Processor
from .config import DEFAULT_TEMPLATE
from .errors import UsageError
from .image import ImageInput, expand_images
from .model import SigLIP
from .modelspec import ModelSpec, add_model_arguments
from .text import Tokenizer, check_text_length, is_prompt_template, shorten, warn_if_truncated
from .weights import Checkpoint, atomic_write


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


# --- command line ---------------------------------------------------------------------------

SCORE_NOTES = {
    "sigmoid": "sigmoid: SigLIP's own probability that the label matches, each label on its own; "
               "they need not sum to 1",
    "softmax": "softmax: the share of each label among the labels given; sums to 1",
    "logit": "logit: exp(t')·cos(image, text) + b, the value before the sigmoid",
}


def add_zero_shot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (their images, not recursive) or glob patterns")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="the candidate labels")
    p.add_argument("--labels-file", type=Path, help="labels, one a line (blank lines are skipped)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help="prompt with {} for the label (default: %(default)r)")
    p.add_argument("--templates-file", type=Path,
                   help="several templates, one a line; their embeddings are averaged")
    p.add_argument("--top-k", type=int, metavar="K", help="show the K best labels per image")
    p.add_argument("--score", choices=("sigmoid", "softmax", "logit"), default="sigmoid",
                   help="what the table shows (JSON always carries all three; default: %(default)s)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="multi-label: only labels whose sigmoid is at least P")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON list of per-image results")
    out.add_argument("--jsonl", action="store_true", help="one JSON object a line, as images finish")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--cache-dir", type=Path, help="label-embedding cache (default: ~/.cache/siglip_so400m)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the label cache")


def read_lines(path: Path, what: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def zero_shot_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Zero-shot image classification with SigLIP "
                                "So400m: rank LABELs for each IMAGE.")
    add_zero_shot_arguments(p)
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning  # one plain line on stderr, restored on exit
        try:
            return run_zero_shot(args)
        except UsageError as e:
            p.error(str(e))  # exits 2
    return 2


def parse_labels(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    labels = list(args.labels or [])
    if args.labels_file:
        labels += read_lines(args.labels_file, "labels file")
    if not labels:
        raise UsageError("no labels: give --labels L1 L2 ... or --labels-file FILE")
    if any(not label.strip() for label in labels):
        raise UsageError("empty label in --labels")
    templates = read_lines(args.templates_file, "templates file") if args.templates_file else [args.template]
    if args.top_k is not None and args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError("--threshold is a sigmoid probability, between 0 and 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    return labels, templates


def run_zero_shot(args: argparse.Namespace) -> int:
    labels, templates = parse_labels(args)
    try:
        from .zeroshot import check_labels, check_templates

        labels, templates = check_labels(labels), check_templates(templates)
    except ValueError as e:
        raise UsageError(str(e)) from None

    # Heavy imports after the arguments are known to be good, so usage errors come back at once.
    import torch

    from .image import ImageReadError
    from .weights import CheckpointError
    from .zeroshot import LabelCache, ZeroShotClassifier

    run = ModelSpec.from_args(args).resolve()
    precision = run.precision
    if args.dtype == "auto" and run.dtype != torch.float32:
        print(f"note: computing in {precision}, the default on this {run.device.type}; "
              "--dtype float32 gives transformers' numbers exactly", file=sys.stderr)
    try:
        ckpt = run.checkpoint()
        processor = run.processor(ckpt)
        if processor.tokenizer is None:
            raise CheckpointError(f"{args.model} has no tokenizer (spiece.model, tokenizer.json or "
                                  "tokenizer.model) to tokenize the labels with")
        cache = None
        if not args.no_cache:
            cache = LabelCache(args.cache_dir or files.cache_dir(), ckpt, processor.tokenizer,
                               templates, precision)
        # With every label cached, the text tower is neither read nor run.
        towers = ("vision",) if cache and not cache.missing(labels) else ("vision", "text")
        model, processor = run.open(towers, ckpt=ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    classifier = ZeroShotClassifier(model, processor, labels, templates, cache=cache)
    image_proc = processor.image

    meta = {"model": ckpt.name, "revision": ckpt.revision, "dtype": precision, "templates": templates}
    specs = list(expand_images(args.images))
    failed = 0
    results: list[dict] = []
    progress = _progress(len(specs))
    for start in range(0, len(specs), args.batch_size):
        batch, pixels = [], []
        for path, error in specs[start : start + args.batch_size]:
            if error is None:
                try:
                    pixels.append(image_proc.to_tensor(image_proc.prepare(path)))
                except ImageReadError as e:
                    error = str(e)
            batch.append((path, error))
        logits = classifier.logits(image_proc.collate(pixels)) if pixels else None
        scores = iter(classifier.scores(logits)) if pixels else iter(())
        for path, error in batch:
            if error is not None:
                failed += 1
                print(f"error: {error if error.startswith(path) else f'{path}: {error}'}", file=sys.stderr)
                record = {"image": path, "error": error}
            else:
                record = {"image": path, **meta, "predictions": _select(next(scores), args)}
            results.append(record)
            if args.jsonl:
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not args.json and "error" not in record:
                _print_table(record, args.score, args.threshold)
        progress.update(len(batch))
    progress.close()
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    elif not args.jsonl and len(results) > failed:
        print(f"({SCORE_NOTES[args.score]})")
    if failed:
        print(f"{failed} of {len(results)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _select(preds: list[dict], args: argparse.Namespace) -> list[dict]:
    """The transformers pipeline's {label, score=sigmoid} extended with logit and softmax."""
    if args.threshold is not None:
        preds = [p for p in preds if p["sigmoid"] >= args.threshold]
    if args.top_k is not None:
        preds = preds[: args.top_k]
    return [{"label": p["label"], "score": p["sigmoid"], "logit": p["logit"], "softmax": p["softmax"]}
            for p in preds]


def _print_table(record: dict, score: str, threshold: float | None) -> None:
    key = {"sigmoid": "score", "softmax": "softmax", "logit": "logit"}[score]
    print(record["image"])
    if not record["predictions"]:
        print(f"  (no label with sigmoid >= {threshold})")
    for p in record["predictions"]:
        value = f"{p[key]:9.4f}" if score == "logit" else f"{p[key]:9.2%}"
        print(f"  {value}  {p['label']}")


def _progress(total: int):
    """A tqdm bar on stderr, only when stderr is a terminal (never in pipes, logs or JSON)."""
    from tqdm import tqdm

    shown = total > 1 and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    return tqdm(total=total, unit="img", file=sys.stderr, leave=False, disable=not shown)
