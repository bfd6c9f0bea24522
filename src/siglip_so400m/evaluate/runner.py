"""Running an evaluation: the model loaded once, the images embedded once (with embed's decoding
workers, or read from an `embed` output folder), the texts embedded, the metrics computed."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import Processor
from ..items import Decode, Item, worker_init
from ..model import SigLIP
from ..weights import DEFAULT_REPO
from ..zeroshot import embed_labels
from .inputs import EvalError, item_name, read_classes, read_labelled, read_pairs, read_templates
from .metrics import classification_metrics, retrieval_metrics

ModelOrName = str | os.PathLike | tuple[SigLIP, Processor]


class Loaded:
    """The model and processor, with the record of what they compute (the result JSON reports it)."""

    def __init__(self, model: ModelOrName, revision: str | None, dtype: str | torch.dtype | None,
                 device: str | torch.device | None, towers: tuple[str, ...],
                 max_num_patches: int | None = None, embeddings: str | os.PathLike | None = None,
                 image_size: int | None = None):
        from ..modelspec import ModelSpec, as_eager, computed_with, fixed_size
        from ..weights import resolve

        self.collection = _collection(embeddings) if embeddings is not None else None
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if self.collection is not None and dtype in (None, "auto"):
            # The texts in the precision the images were embedded in: the collection's record is
            # the default, as it is for search.
            dtype = as_eager(self.collection.manifest).get("dtype")
        if isinstance(model, tuple):
            self.net, self.processor = model
            ckpt = getattr(self.net, "checkpoint", None)
            if max_num_patches is not None or image_size is not None:  # on a new processor
                try:
                    self.processor = self.processor.sized(image_size, max_num_patches)
                except ValueError as e:
                    raise EvalError(str(e)) from None
        else:
            ckpt = resolve(model, revision=revision, towers=towers)
            if self.collection is not None and image_size is None:  # the collection's size, as dtype
                image_size = fixed_size(self.collection.manifest, ckpt)
            run = ModelSpec(model=model, revision=revision, dtype=dtype or "auto",
                            device=str(device or "auto"), image_size=image_size,
                            max_num_patches=max_num_patches).resolve()
            self.net, self.processor = run.open(towers, ckpt=ckpt)
        self.device = next(self.net.parameters()).device
        self.precision = self.net.precision
        # What the results were computed with: checkpoint, precision, image size or patch budget.
        self.record = None if ckpt is None else computed_with(ckpt, self.processor, self.precision)
        # embed records a local model by its absolute path and a Hub model by its name and commit.
        self.name = None if ckpt is None else self.record["model"]
        self.revision = None if ckpt is None else ckpt.revision
        self.checkpoint = ckpt
        self.max_num_patches = self.processor.image_record()["max_num_patches"]


def _collection(folder: str | os.PathLike):
    from ..collection import Collection, CollectionError

    try:
        return Collection(folder)
    except CollectionError as e:
        raise EvalError(str(e)) from None


def embed_items(net: SigLIP, processor: Processor, items: Sequence[Item], *, batch_size: int = 32,
                workers: int = 2, progress: bool | None = None) -> Tensor:
    """(N, D) float32 unit image embeddings of the items, in order, decoded by embed's worker
    processes. An unreadable image stops the evaluation (named, with the others), since a metric over
    fewer images than the set has is not the set's metric."""
    from tqdm import tqdm

    device = next(net.parameters()).device
    work = [(0, pos, item) for pos, item in enumerate(items)]
    loader = torch.utils.data.DataLoader(
        Decode(work, processor.image), batch_size=None, shuffle=False, num_workers=workers,
        worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None)
    bar = tqdm(total=len(work), unit="img", desc="images", file=sys.stderr, disable=not _shown(progress))
    out, pending, errors = [], [], []

    def flush() -> None:
        with torch.inference_mode():
            x = net.encode_image(processor.image.collate(pending).to(device))  # a stack, or NaFlex padding
            out.append(F.normalize(x.float(), dim=-1))  # (B, D)
        pending.clear()

    for sample in loader:
        result = sample[2]  # (part, position, pixels or error string, ...)
        if isinstance(result, str):
            errors.append(result)
        else:
            pending.append(result)
            if len(pending) == batch_size:
                flush()
        bar.update(1)
    if pending:
        flush()
    bar.close()
    if errors:
        raise EvalError(f"{len(errors)} of {len(items)} images cannot be read, so the metrics would not be "
                        "the set's: " + "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else ""))
    if not out:
        return torch.zeros(0, net.config.vision_config.hidden_size, device=device)
    return torch.cat(out)


def embeddings_from_folder(folder: str | os.PathLike, items: Sequence[Item], loaded: Loaded) -> Tensor:
    """The items' rows of an `embed` output folder, (N, D) float32 (stored float16) on the model's
    device. The folder must come from the same model; every item must be in it."""
    from ..modelspec import QUERY_FIELDS, as_eager, check_record, stored_record

    coll = loaded.collection if loaded.collection is not None else _collection(folder)
    if loaded.record is not None:
        check_record(as_eager(stored_record(coll.manifest, loaded.checkpoint)), loaded.record, str(folder),
                     fields=QUERY_FIELDS, advice="evaluate with the settings it was embedded with "
                     "(--model, --dtype, --image-size, --max-num-patches), or embed again")

    def key(path: str | None, shard: str | None, k: str | None) -> tuple:
        # Absolute paths, so that an embed run from another working directory still matches; a shard
        # member by its shard and key, whatever embed writes into its image_path.
        return (str(Path(shard).resolve()), k) if shard else (str(Path(path).resolve()),)

    rows = {}
    for i in range(len(coll)):
        m = coll.metadata(i)
        rows.setdefault(key(m.get("image_path"), m.get("shard"), m.get("key")), i)
    ids, missing = [], []
    for item in items:
        i = rows.get(key(item.path, item.shard, item.key))
        if i is None:
            missing.append(item_name(item))
        ids.append(i)
    if missing:
        raise EvalError(f"{len(missing)} of the {len(items)} images are not in {folder} (first: "
                        f"{missing[0]}); embed the same images: siglip-so400m embed DATA --recursive "
                        "--output DIR")
    return torch.from_numpy(coll.vectors(np.array(ids, dtype=np.int64))).to(loaded.device)


def embed_classes(loaded: Loaded, classes: list[str], templates: list[str], batch_size: int,
                  cache_dir: str | os.PathLike | None, progress: bool | None) -> Tensor:
    """(C, D) float32 class embeddings, zero-shot's definition (zeroshot.embed_labels), a few classes
    at a time for the progress bar; with cache_dir, read from and written to zero-shot's label cache."""
    from tqdm import tqdm

    from ..zeroshot import LabelCache

    ckpt = getattr(loaded.net, "checkpoint", None)
    cache = LabelCache(cache_dir, ckpt, loaded.processor.tokenizer, templates, loaded.precision) \
        if cache_dir is not None and ckpt is not None else None
    done = cache.get(classes) if cache else {}
    todo = [c for c in dict.fromkeys(classes) if c not in done]  # a name listed twice: embedded once
    step = max(1, batch_size // len(templates))
    with tqdm(total=len(todo) * len(templates), unit="text", desc="class prompts", file=sys.stderr,
              disable=not _shown(progress) or not todo) as bar:
        for s in range(0, len(todo), step):
            chunk = todo[s : s + step]
            emb = embed_labels(loaded.net, loaded.processor.tokenizer, chunk, templates, batch_size).cpu()
            fresh = dict(zip(chunk, emb, strict=True))
            done.update(fresh)
            if cache:
                cache.put(fresh)
            bar.update(len(chunk) * len(templates))
    return torch.stack([done[c] for c in classes]).to(loaded.device)


def _images(loaded: Loaded, items: list[Item], embeddings, batch_size: int, workers: int,
            progress: bool | None) -> Tensor:
    if embeddings is not None:
        return embeddings_from_folder(embeddings, items, loaded)
    return embed_items(loaded.net, loaded.processor, items, batch_size=batch_size, workers=workers,
                       progress=progress)


def _shown(progress: bool | None) -> bool:
    """A progress bar (with its ETA) when asked, or by default when stderr is a terminal."""
    return progress if progress is not None else sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def _texts(loaded: Loaded, texts: list[str], batch_size: int, progress: bool | None) -> Tensor:
    """(T, D) float32 unit caption embeddings."""
    from tqdm import tqdm

    out = []
    with torch.inference_mode(), tqdm(total=len(texts), unit="text", desc="captions", file=sys.stderr,
                                      disable=not _shown(progress)) as bar:
        for s in range(0, len(texts), batch_size):
            ids = loaded.processor.texts(texts[s : s + batch_size]).to(loaded.device)
            out.append(F.normalize(loaded.net.encode_text(ids).float(), dim=-1))
            bar.update(len(ids))
    return torch.cat(out)


def _result(task: str, loaded: Loaded, dataset: str, metrics: dict, **extra) -> dict:
    # clip_benchmark's result JSON (dataset, model, pretrained, task, metrics, language), so that our
    # numbers sit beside open_clip's tables; what we add comes after. Its `build` joins model and
    # pretrained as strings: neither may be null. A Hub model's pretrained is its commit; a local
    # folder's (no commit) "local"; a model handed over in memory, without a checkpoint, is named so.
    model = loaded.name or "siglip_so400m.SigLIP"
    pretrained = loaded.revision or ("local" if loaded.name else "in-memory")
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": metrics, "language": "en", "dtype": loaded.precision,
            "image_size": loaded.record and loaded.record.get("image_size"),
            "max_num_patches": loaded.max_num_patches, **extra}


def zero_shot(data: str | os.PathLike, *, model: ModelOrName = DEFAULT_REPO, revision: str | None = None,
              classes: str | os.PathLike | Sequence[str] | None = None,
              templates: str | os.PathLike | Sequence[str] | None = None,
              embeddings: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, batch_size: int = 32, text_batch_size: int = 256,
              workers: int = 2, progress: bool | None = None, dataset: str | None = None,
              cache_dir: str | os.PathLike | None = None, max_num_patches: int | None = None,
              image_size: int | None = None) -> dict:
    """Zero-shot classification accuracy on a labelled set (see inputs.read_labelled).

    Each class is embedded as the normalized mean of the normalized embeddings of its name in every
    template (CLIP's and clip_benchmark's prompt ensemble). classes: "imagenet1k", a file or a list
    (default: the folder names or labels); templates: "imagenet" (CLIP's 80), "siglip" (the default,
    one prompt), a file or a list. embeddings: an `embed` output folder holding the images, so they are
    not embedded again. cache_dir: keep the class embeddings there (zero-shot's label cache), so that
    ImageNet's 80 000 prompts go through the text tower once per checkpoint and dtype.
    dtype: None for the device's fast dtype, "float32" for transformers' numbers. max_num_patches:
    SigLIP 2 NaFlex's patch budget per image (default: the checkpoint's).
    Returns clip_benchmark's result dict ({acc1, acc5, mean_per_class_recall} under "metrics") with
    "per_class" rows and "predictions" ({path, label, top5} per image, class names best first).
    """
    templates = read_templates(templates)
    labelled = read_labelled(data, read_classes(classes))
    towers = ("text",) if embeddings is not None else ("vision", "text")
    loaded = Loaded(model, revision, dtype, device, towers, max_num_patches, embeddings, image_size)
    if loaded.processor.tokenizer is None:
        raise EvalError("the checkpoint has no tokenizer to embed the class names with")
    class_emb = embed_classes(loaded, labelled.classes, templates, text_batch_size, cache_dir,
                              progress)  # (C, D)
    image_emb = _images(loaded, labelled.items, embeddings, batch_size, workers, progress)  # (N, D)
    metrics, top, per_class = classification_metrics(image_emb, class_emb, torch.tensor(labelled.targets))
    names = labelled.classes
    for row in per_class:
        row["class"] = names[row["class"]]
    predictions = [{"path": item_name(item), "label": names[t], "top5": [names[j] for j in row]}
                   for item, t, row in zip(labelled.items, labelled.targets, top.tolist(), strict=True)]
    return _result("zeroshot_classification", loaded, dataset or Path(str(data)).name, metrics,
                   images=len(labelled.items), classes=len(names), templates=len(templates),
                   per_class=per_class, predictions=predictions)


def retrieval(data: str | os.PathLike, *, model: ModelOrName = DEFAULT_REPO, revision: str | None = None,
              embeddings: str | os.PathLike | None = None, dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None, recall_k: Sequence[int] = (1, 5, 10),
              batch_size: int = 32, text_batch_size: int = 256, workers: int = 2,
              progress: bool | None = None, dataset: str | None = None,
              max_num_patches: int | None = None, image_size: int | None = None) -> dict:
    """Text -> image and image -> text recall@k on image-caption pairs (see inputs.read_pairs), with
    clip_benchmark's keys image_retrieval_recall@k and text_retrieval_recall@k. max_num_patches:
    SigLIP 2 NaFlex's patch budget per image (default: the checkpoint's)."""
    if not recall_k or any(k < 1 for k in recall_k):
        raise EvalError("recall@k needs k of at least 1")
    pairs = read_pairs(data)
    towers = ("text",) if embeddings is not None else ("vision", "text")
    loaded = Loaded(model, revision, dtype, device, towers, max_num_patches, embeddings, image_size)
    texts = [c for caps in pairs.captions for c in caps]
    text_image = torch.tensor([i for i, caps in enumerate(pairs.captions) for _ in caps])  # (T,)
    text_emb = _texts(loaded, texts, text_batch_size, progress)  # (T, D)
    image_emb = _images(loaded, pairs.items, embeddings, batch_size, workers, progress)  # (I, D)
    metrics = retrieval_metrics(image_emb, text_emb, text_image, sorted(set(recall_k)))
    return _result("zeroshot_retrieval", loaded, dataset or Path(str(data)).name, metrics,
                   images=len(pairs.items), captions=len(texts))
