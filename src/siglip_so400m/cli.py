"""Command line: `siglip-so400m COMMAND ...` and `python -m siglip_so400m COMMAND ...`. This module
only wires: each command's code lives in its job, and the exit status of an error is decided here
(errors.py), so a user never sees a traceback for something they typed."""

from __future__ import annotations

import argparse
import sys

from .errors import SiglipError, UsageError


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


# Each command's entry point, imported only when that command runs (so `--help` and usage errors
# never wait for torch, and a command never imports another's optional dependencies).
COMMANDS = {
    "zero-shot": "zeroshot:zero_shot_main", "finetune": "train:finetune_main",
    "attention-map": "attention_maps:attention_map_main", "convert": "convert:convert_main",
    "embed": "embedding:main", "index": "index_tuning:index_main", "search": "search:search_main",
    "dedup": "search:dedup_main", "serve": "serve:serve_main", "eval": "evaluate.cli:eval_main",
    "export": "exporting:export_main",
}


def _run_command(command: str, rest: list[str], prog: str) -> int:
    import importlib

    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)(rest, prog=prog)
