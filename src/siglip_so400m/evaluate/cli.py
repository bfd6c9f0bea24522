"""`siglip-so400m eval zero-shot DATA` and `siglip-so400m eval retrieval PAIRS`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from ..errors import SiglipError, UsageError
from ..modelspec import add_model_arguments


def _common(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--embeddings", type=Path, metavar="DIR", help="an `siglip-so400m embed` output folder "
                   "holding these images (made with the same --model): they are not embedded again")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default: 2; 0: none)")
    p.add_argument("--dataset-name", help="the `dataset` of the result JSON (default: DATA's name)")
    p.add_argument("--json", action="store_true", help="print clip_benchmark's result JSON (dataset, "
                   "model, task, metrics) instead of the table")


def eval_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark numbers with clip_benchmark's "
                                "definitions: zero-shot accuracy, retrieval recall@k.")
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    z = sub.add_parser("zero-shot", help="zero-shot classification: acc@1, acc@5, mean per-class recall",
                       description="DATA: an ImageFolder (one folder per class), a .csv/.parquet with an "
                       "image and a label column, or webdataset .tar shards with a .cls member per sample.")
    z.add_argument("data", metavar="DATA")
    z.add_argument("--classes", metavar="FILE|imagenet1k", help="class names, one a line in the order of "
                   "the sorted class folders (or of the label indices), or folder<TAB>name lines; "
                   "imagenet1k: the 1000 shipped names (default: the folder names or labels)")
    templates = z.add_mutually_exclusive_group()
    templates.add_argument("--templates", choices=("siglip", "imagenet"), default="siglip",
                           help="siglip: 'This is a photo of {}.'; imagenet: CLIP's 80 ImageNet prompts "
                           "(default: %(default)s)")
    templates.add_argument("--templates-file", type=Path, help="templates, one a line, {} for the class")
    z.add_argument("--cache-dir", type=Path, help="class-embedding cache, shared with zero-shot "
                   "(default: ~/.cache/siglip_so400m)")
    z.add_argument("--no-cache", action="store_true", help="neither read nor write the class cache")
    z.add_argument("--predictions", type=Path, metavar="FILE", help="write one JSON line per image: path, "
                   "label, top5 (class names, best first)")
    _common(z)
    r = sub.add_parser("retrieval", help="image<->text retrieval: recall@k both ways",
                       description="PAIRS: a .csv/.parquet with an image and a caption column (one row per "
                       "caption, or a list of captions), or webdataset .tar shards whose .txt holds an "
                       "image's captions one a line.")
    r.add_argument("data", metavar="PAIRS")
    r.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K",
                   help="the k of recall@k (default: 1 5 10)")
    _common(r)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be at least 1 and --workers at least 0")
    for flag, value in (("--max-num-patches", args.max_num_patches), ("--threads", args.threads)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1")
    if args.image_size is not None and args.image_size < 1:
        p.error("--image-size must be at least 1")
    if args.task == "retrieval" and any(k < 1 for k in args.recall_k):
        p.error(f"--recall-k {' '.join(map(str, args.recall_k))}: every k must be at least 1")

    import torch

    from . import retrieval, zero_shot

    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(model=args.model, revision=args.revision, embeddings=args.embeddings,
                  dtype=None if args.dtype == "auto" else args.dtype,
                  device=None if args.device == "auto" else args.device, batch_size=args.batch_size,
                  workers=args.workers, dataset=args.dataset_name, max_num_patches=args.max_num_patches,
                  image_size=args.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        try:
            if args.task == "zero-shot":
                from ..files import cache_dir

                cache = None if args.no_cache else args.cache_dir or cache_dir()
                result = zero_shot(args.data, classes=args.classes, cache_dir=cache,
                                   templates=args.templates_file or args.templates, **common)
            else:
                result = retrieval(args.data, recall_k=args.recall_k, **common)
        except UsageError as e:
            p.error(str(e))
        except SiglipError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    predictions = result.pop("predictions", None)
    if args.task == "zero-shot" and args.predictions:
        try:
            with open(args.predictions, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
        except OSError as e:
            print(f"error: cannot write --predictions {args.predictions}: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_table(result)
    return 0


def print_table(result: dict) -> None:
    m = result["metrics"]
    print(f"{result['task']} on {result['dataset']}: model {result['model']}, {result['dtype']}")
    if result["task"] == "zeroshot_classification":
        width = max(12, *(len(row["class"]) for row in result["per_class"]))
        print(f"\n{'class':<{width}}  images  top-1  recall")
        for row in result["per_class"]:
            recall = "" if row["recall"] is None else f"{row['recall']:7.2%}"
            print(f"{row['class']:<{width}}  {row['images']:6d}  {row['top1_correct']:5d}  {recall}")
        print(f"\n{result['images']} images, {result['classes']} classes, {result['templates']} templates")
        print(f"acc@1                  {_percent(m['acc1'])}")
        print(f"acc@5                  {_percent(m['acc5'])}"
              + ("  (fewer than 5 classes: every image would count)" if math.isnan(m["acc5"]) else ""))
        print(f"mean per-class recall  {_percent(m['mean_per_class_recall'])}")
    else:
        print(f"\n{result['images']} images, {result['captions']} captions")
        ks = sorted({int(k.rsplit('@', 1)[1]) for k in m})
        print("recall@k        " + "".join(f"{f'@{k}':>9}" for k in ks))
        print("text -> image   " + "".join(f" {_percent(m[f'image_retrieval_recall@{k}'])}" for k in ks))
        print("image -> text   " + "".join(f" {_percent(m[f'text_retrieval_recall@{k}'])}" for k in ks))


def _percent(value: float) -> str:
    """8 characters: 73.70%, or n/a for a metric that is NaN (acc@5 below 5 classes), not 'nan%'."""
    return f"{'n/a':>8}" if math.isnan(value) else f"{value:8.2%}"
