"""Command line: `siglip-so400m zero-shot ...`, `python -m siglip_so400m zero-shot ...`, and
`python scripts/zero_shot.py ...` (the same command without the subcommand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .config import DEFAULT_TEMPLATE
from .errors import SiglipError, UsageError
from .image import expand_images
from .modelspec import ModelSpec, add_model_arguments

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
    from .zeroshot import LabelCache, ZeroShotClassifier, default_cache_dir

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
            cache = LabelCache(args.cache_dir or default_cache_dir(), ckpt, processor.tokenizer,
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


def finetune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from .train import TrainConfig

    p = argparse.ArgumentParser(prog=prog, description="Fine-tune SigLIP with the sigmoid loss, in one "
                                "process or under torchrun --nproc_per_node N (same command).")
    add_model_arguments(p, only=("model", "revision", "device", "image_size", "max_num_patches"))
    p.add_argument("--data", required=True, help="a CSV/JSONL of (image path, caption), or a folder")
    p.add_argument("--output-dir", required=True, help="where checkpoints and the result go; a run "
                   "there is resumed")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate (default: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, help="linear warm-up (default: 10%% of --steps, at most "
                   "1000), then cosine decay to 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients (0: off)")
    lock = p.add_mutually_exclusive_group()
    lock.add_argument("--lock-image", action="store_true", help="keep the image tower fixed (LiT)")
    lock.add_argument("--lock-text", action="store_true", help="keep the text tower fixed")
    lock.add_argument("--only-logit-params", action="store_true",
                      help="train only logit_scale and logit_bias")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="data-loading processes per rank")
    args = vars(p.parse_args(argv))
    args["max_grad_norm"] = args["max_grad_norm"] or None
    from .train import train

    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        p.error(str(e))
    try:
        train(cfg)
    except UsageError as e:
        p.error(str(e))
    except SiglipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="siglip-so400m", description="SigLIP So400m/14@384 in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("zero-shot", help="rank labels for images", add_help=False)
    sub.add_parser("finetune", help="fine-tune with the sigmoid loss", add_help=False)
    sub.add_parser("attention-map", help="PNGs of where the pooling head looks", add_help=False)
    sub.add_parser("convert", help="write a big_vision .npz in the Hugging Face layout", add_help=False)
    sub.add_parser("embed", help="embed an image collection (resumable, torchrun)", add_help=False)
    sub.add_parser("index", help="build a faiss index over embed's output", add_help=False)
    sub.add_parser("search", help="search an embedded collection by text or image", add_help=False)
    sub.add_parser("dedup", help="groups of near-duplicate images in an embedded collection",
                   add_help=False)
    sub.add_parser("serve", help="serve embeddings, zero-shot and search over HTTP", add_help=False)
    sub.add_parser("eval", help="benchmark numbers: zero-shot accuracy, retrieval recall@k", add_help=False)
    sub.add_parser("export", help="each tower as an ONNX or OpenVINO graph, checked", add_help=False)
    args, rest = p.parse_known_args(argv)
    prog = f"siglip-so400m {args.command}"
    # The one place that turns an error into an exit status: each command reports its own errors,
    # and whatever reaches here is still one line, never a traceback.
    try:
        return _run_command(args.command, rest, prog)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except SiglipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130


def _run_command(command: str, rest: list[str], prog: str) -> int:
    args = argparse.Namespace(command=command)
    if args.command == "zero-shot":
        return zero_shot_main(rest, prog=prog)
    if args.command == "finetune":
        return finetune_main(rest, prog=prog)
    if args.command == "attention-map":
        from .attention_maps import attention_map_main

        return attention_map_main(rest, prog=prog)
    if args.command == "convert":
        from .convert import convert_main

        return convert_main(rest, prog=prog)
    if args.command == "serve":
        from .serve import serve_main

        return serve_main(rest, prog=prog)
    if args.command == "eval":
        from .evaluate.cli import eval_main

        return eval_main(rest, prog=prog)
    if args.command == "export":
        from .exporting import export_main

        return export_main(rest, prog=prog)
    if args.command == "embed":
        from .embedding import main as embed_main

        return embed_main(rest, prog=prog)
    if args.command == "index":
        from .index_tuning import index_main

        return index_main(rest, prog=prog)
    from . import search  # search, dedup

    return {"search": search.search_main,
            "dedup": search.dedup_main}[args.command](rest, prog=prog)
