"""Embedding a whole image collection into clip-retrieval's layout: resumable, sharded, exact.

    siglip-so400m embed photos/ --recursive --output emb/
    torchrun --nproc_per_node 4 -m siglip_so400m embed shards/{00000..00099}.tar --output emb/

Output (clip-retrieval's, so autofaiss and embedding-reader read it):

    emb/img_emb/img_emb_{i:06d}.npy        float16 (n_i, D), L2-normalised, one row per readable image
    emb/metadata/metadata_{i:06d}.parquet  n_i rows, row-aligned: image_path, shard, key, caption, w, h
                                           (+ a shard's json fields: url, ...)
    emb/text_emb/text_emb_{i:06d}.npy      float16 (n_i, D) caption embeddings (with --captions)
    emb/errors/errors_{i:06d}.parquet      the images of part i that could not be read, with the error
    emb/manifest.json                      model, revision, dtype, backend, image size, logit_scale/bias,
                                           counts

Part numbers are zero-padded (manifest["part_digits"] digits) because embedding-reader and autofaiss
read the files in name order: unpadded, part 10 would sort before part 2 and their ids would point at
other images than ours. Folders written before the padding are renamed when a rerun continues them.

Bad images get no embedding row and no metadata row (readers pair row r of img_emb_i with row r of
metadata_i, so a metadata row without an embedding would shift every later pairing); they are
recorded in errors/ instead, with their position in the input, and counted in the manifest.

Parts: the inputs are expanded and sorted into one list, cut into parts of `part_size` images
(each webdataset .tar is one part of its own). A part is the unit of work, of resume and of
sharding: rank r of W processes takes the parts i with i % W == r. A part's files are written under
temporary names and renamed when complete (metadata last, so its presence marks the part done); a
rerun skips complete parts and redoes the rest. Inside a part the readable images are cut into
batches at fixed positions, and the output depends on nothing else (on CPU the image tower even
runs image by image), so the bytes are the same for any number of processes and after any kill.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import items
from .collection import (
    FORMAT,
    MANIFEST,
    pad_old_names,
    part_digits,
    part_done,
    part_paths,
    pyarrow_modules,
    write_json,
    write_part,
)
from .errors import RecordMismatch, SiglipError, UsageError
from .faults import kill_point
from .items import Decode, Item, expand_inputs, scan_shard, worker_init
from .modelspec import add_model_arguments
from .weights import DEFAULT_REPO

# Settings that must match for a rerun to continue a run: the rest (batch size excepted, see
# below) only changes speed.
IDENTITY_KEYS = ("format", "model", "revision", "weights", "dtype", "quantization", "backend", "image_size",
                 "embedding_dim", "part_size", "captions", "batch_size", "inputs_sha256", "parts",
                 "max_num_patches")
# What a manifest written before a key existed meant by it: runs before --backend ran on torch.
IDENTITY_DEFAULTS = {"backend": "torch"}


class EmbedError(SiglipError, RuntimeError):
    """A run that cannot start: bad inputs, a locked or incompatible output folder, no pyarrow."""


class InputError(EmbedError, items.InputError):
    """A command that names something wrong (a missing input, a file as --output): a usage error,
    found before anything is written."""


# --- parts ------------------------------------------------------------------------------------

@dataclass
class Part:
    index: int
    items: list[Item] = field(default_factory=list)
    shard: str | None = None  # webdataset input: the .tar this part is; scanned when needed


def make_parts(files: list[Item], shards: list[str], part_size: int) -> list[Part]:
    """Files cut into parts of part_size in their order, then one part per tar shard."""
    parts = [Part(i, files[s : s + part_size]) for i, s in enumerate(range(0, len(files), part_size))]
    parts += [Part(len(parts) + k, shard=shard) for k, shard in enumerate(shards)]
    return parts


def _inputs_sha256(parts: list[Part]) -> str:
    """A fingerprint of part membership, so a rerun with other inputs cannot mix its parts with ours."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps([p.index, p.shard, [(i.path, i.caption) for i in p.items]]).encode())
    return h.hexdigest()


# --- the run --------------------------------------------------------------------------------

def _Lock(out: Path):
    from .weights import FolderInUse, FolderLock

    try:
        return FolderLock(out, "embed run", "run again with --no-lock (lock=False)")
    except FolderInUse as e:
        raise EmbedError(str(e)) from None


def embed(inputs: str | os.PathLike | Sequence[str | os.PathLike], output: str | os.PathLike, *,
          model: str = DEFAULT_REPO, revision: str | None = None, dtype: str | torch.dtype | None = None,
          device: str | torch.device | None = None, batch_size: int = 8, threads: int | None = None,
          workers: int = 2, part_size: int = 10_000, recursive: bool = False, captions: bool = False,
          progress: bool | None = None, max_num_patches: int | None = None, lock: bool = True,
          backend: str = "torch", graphs: str | os.PathLike | None = None,
          image_size: int | None = None) -> dict:
    """Embed every image of `inputs` into `output` (clip-retrieval's layout); returns the manifest.

    inputs: folders, image files, glob patterns, .txt/.csv/.parquet lists of paths (with an
        optional caption column) and webdataset .tar shards. dtype: "float32", "bfloat16",
        "float16", "int8" or None for the fast default of the device. workers: decoding processes
        (0: decode in this process). max_num_patches: SigLIP 2 NaFlex's patch budget per image
        (None: the checkpoint's). Under torchrun every rank calls this with the same arguments
        and takes its share of the parts. A rerun after an interruption continues; a second run on
        `output` while one is active raises EmbedError. lock=False skips that check (the flock on
        output/.lock), for filesystems without flock: then nothing stops two runs mixing their parts.
    backend: "torch" (the checkpoint, in `dtype`), or "onnx" / "openvino" to run the towers through
        the export folder `graphs` of the same checkpoint (siglip-so400m export), on the CPU, in the
        graphs' own precision; they are checked against the eager float32 model before anything is
        embedded (backends.open_graphs). The manifest records the backend: a rerun with another
        one is refused.
    """
    import torch.distributed as dist

    from .modelspec import ModelSpec
    from .weights import Checkpoint, file_in_the_way, logit_params

    pyarrow_modules()  # fail at once, not after the first part
    if batch_size < 1 or part_size < 1 or workers < 0:
        raise InputError("batch_size and part_size must be at least 1, workers at least 0")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    spec = ModelSpec(model=model, revision=revision, dtype=dtype or "auto", device=device or "auto",
                     threads=threads, image_size=image_size, max_num_patches=max_num_patches,
                     backend=backend, graphs=graphs)
    try:
        run = spec.resolve()
    except UsageError as e:
        raise InputError(str(e)) from None
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out = Path(output)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # only flags and barriers travel; the data stays on disk
    rank = dist.get_rank() if dist.is_initialized() else 0
    towers = ("vision", "text") if captions else ("vision",)
    opened = None  # (model, processor): a graph backend's are opened (and checked) in prepare()

    def prepare() -> tuple[list[Part], Checkpoint, dict]:
        nonlocal opened
        if (above := file_in_the_way(out)) is not None:
            raise InputError(f"--output {out}: {above} is a file, not a folder; give a new folder or "
                             "one an embed run wrote")
        try:
            files, shards = expand_inputs(specs, recursive)
        except items.InputError as e:
            raise InputError(str(e)) from None
        parts = make_parts(files, shards, part_size)
        ckpt = run.checkpoint(towers)
        cfg = ckpt.config
        # Sized before the output folder exists: a budget this checkpoint cannot take is refused
        # with nothing written.
        try:
            processor = run.processor(ckpt)
        except UsageError as e:
            raise InputError(str(e)) from None
        if on_graphs:
            # Before the output folder exists too: a graph of another model, or one that computes
            # something else than this checkpoint, is refused with nothing written.
            try:
                opened = run.open(towers, ckpt=ckpt, log=lambda m: print(m, file=sys.stderr, flush=True))
            except UsageError as e:
                raise InputError(str(e)) from None
            except SiglipError as e:  # the graphs' numbers
                raise EmbedError(str(e)) from None
        identity = {
            "format": FORMAT, **run.record(ckpt, processor),
            "embedding_dim": cfg.vision_config.hidden_size, "part_size": part_size, "captions": captions,
            # Batches are cut at fixed positions, so another batch size may round a GPU result
            # differently; on CPU images run one by one anyway, but we keep the promise simple.
            "batch_size": batch_size, "inputs_sha256": _inputs_sha256(parts), "parts": len(parts),
        }
        # NaFlex has no fixed size: the field keeps the config's value, as runs before the record did.
        identity.setdefault("image_size", cfg.vision_config.image_size)
        return parts, ckpt, identity

    on_graphs = backend != "torch"
    if world == 1:
        parts, ckpt, identity = prepare()
    else:
        # Each rank sees the inputs and the model through its own filesystem and picks its own
        # dtype: a rank that differs from rank 0 would write parts of another run into the folder,
        # and one that fails alone would leave the others waiting forever. So all compare first.
        failure, parts, ckpt, identity = None, [], None, None
        try:
            parts, ckpt, identity = prepare()
        except SiglipError as e:
            failure = str(e)
        _agree_across_ranks(failure, identity, world)
    scale, bias = logit_params(ckpt)
    digits = part_digits(len(parts))

    # Rank 0 takes the lock and checks the folder; the others learn the verdict through a flag.
    held, problem, already = None, "", 0
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            held = _Lock(out) if lock else None
            _check_manifest(out, identity, ckpt)
            pad_old_names(out, [p.index for p in parts], captions, digits)
            already = sum(part_done(out, p.index, captions, digits) for p in parts)
            for tmp in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:  # a killed run's unfinished files
                tmp.unlink()
            write_json(out / MANIFEST, {**identity, "part_digits": digits, "logit_scale": scale,
                                          "logit_bias": bias, "complete": False})
        except (EmbedError, OSError) as e:
            problem = str(e)
            kind = type(e) if isinstance(e, EmbedError) else EmbedError  # SettingsChanged exits 2
            if held:
                held.release()
    if world > 1:
        flag = [(problem, kind.__name__ if problem else None)]
        dist.broadcast_object_list(flag, src=0)
        problem, name = flag[0]
        kind = SettingsChanged if name == "SettingsChanged" else EmbedError
    if problem:
        raise kind(problem)

    try:
        net, processor = opened or run.open(towers, ckpt=ckpt)
        if captions and processor.tokenizer is None:
            raise EmbedError(f"{ckpt.name} has no spiece.model to tokenize captions with")
        mine = [p for p in parts if p.index % world == rank
                and not part_done(out, p.index, captions, digits)]
        for p in mine:
            if p.shard is not None:
                p.items, error = scan_shard(p.shard)
                if error:  # the whole shard is one bad input: recorded, not fatal
                    p.items = [Item(shard=p.shard, key="", error=f"{p.shard}: {error}")]
        stats = _run(net, processor, mine, out, captions, digits, batch_size, workers, run.device, rank,
                     progress)
        if world > 1:
            done = torch.tensor([stats["done"]], dtype=torch.int64)
            dist.all_reduce(done)  # also the barrier before rank 0 reads every part
            stats["done"] = int(done)
        manifest = None
        if rank == 0:
            manifest = _finish(out, identity, scale, bias, parts, captions, digits)
            ok, bad = manifest["counts"]["images"], manifest["counts"]["errors"]
            print(f"embedded {_count(ok, 'image')} into {_count(len(parts), 'part')} in {out} "
                  f"({stats['done']} embedded now, {_count(already, 'part')} "
                  f"{'was' if already == 1 else 'were'} already done); {_count(bad, 'bad image')} "
                  f"(listed in {out / 'errors'})", file=sys.stderr)
        if world > 1:
            box = [manifest]
            dist.broadcast_object_list(box, src=0)
            manifest = box[0]
        # Timings vary from run to run, so they go to the caller and never into the folder.
        return {**manifest, "run": {"embedded": stats["done"], "seconds": stats["seconds"]}}
    finally:
        if held:
            held.release()


class SettingsChanged(EmbedError, RecordMismatch):
    """The output folder holds a run with other settings, which this one cannot continue (exit 2)."""


class RanksDisagree(EmbedError):
    """The ranks of a torchrun run see different inputs or settings: every rank raises this, with
    the same message (which only rank 0 prints)."""


# What every rank must share with rank 0. Not "weights": path, size and mtime of a local file,
# which differ between the machines' own copies of the same checkpoint.
RANK_KEYS = tuple(k for k in IDENTITY_KEYS if k != "weights")


def _agree_across_ranks(failure: str | None, identity: dict | None, world: int) -> None:
    import torch.distributed as dist

    views: list = [None] * world
    dist.all_gather_object(views, (failure, identity))  # (failure, identity) of every rank
    ref = views[0][1]
    problems = []
    for r, (fail, ident) in enumerate(views):
        if fail is not None:
            problems.append(f"rank {r}: {fail}")
        elif r and ref is not None:
            diff = [f"{k} {ident[k]!r} (rank 0: {ref[k]!r})" for k in RANK_KEYS if ident[k] != ref[k]]
            if diff:
                problems.append(f"rank {r} differs from rank 0: " + ", ".join(diff))
    if problems:
        raise RanksDisagree(f"the {world} ranks do not agree, so none starts: " + "; ".join(problems)
                            + ". Every rank must see the same inputs at the same paths and use the same "
                            "model, dtype and settings")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_manifest(out: Path, identity: dict, ckpt) -> None:
    from .modelspec import stored_record

    path = out / MANIFEST
    if not path.is_file():
        if any((out / d).is_dir() and any((out / d).iterdir()) for d in ("img_emb", "metadata")):
            raise EmbedError(f"{out} holds embeddings but no {MANIFEST}; give an empty or new --output")
        return
    old = stored_record(json.loads(path.read_text()), ckpt)
    diff = [f"{k}: {old.get(k, IDENTITY_DEFAULTS.get(k))!r} there, {identity[k]!r} now"
            for k in IDENTITY_KEYS if old.get(k, IDENTITY_DEFAULTS.get(k)) != identity[k]]
    if diff:
        raise SettingsChanged(f"{out} holds a run with other settings, which this one cannot continue ("
                         + "; ".join(diff) + "); rerun with the same inputs and settings, or give "
                         "another --output")


def _finish(out: Path, identity: dict, scale: float, bias: float, parts: list[Part], captions: bool,
            digits: int) -> dict:
    _, pq = pyarrow_modules()
    counts = []
    for p in parts:
        f = part_paths(out, p.index, captions, digits)
        counts.append([pq.read_metadata(f["metadata"]).num_rows, pq.read_metadata(f["errors"]).num_rows])
    manifest = {**identity, "part_digits": digits, "logit_scale": scale, "logit_bias": bias, "complete": True,
                "counts": {"images": sum(c[0] for c in counts), "errors": sum(c[1] for c in counts),
                           "per_part": counts}}
    write_json(out / MANIFEST, manifest)
    return manifest


def _run(net, processor, mine: list[Part], out: Path, captions: bool, digits: int, batch_size: int,
         workers: int, dev: torch.device, rank: int, progress: bool | None) -> dict:
    """Decode (in workers) and embed this rank's unfinished parts, writing each as it completes."""
    from tqdm import tqdm

    work = [(k, pos, item) for k, p in enumerate(mine) for pos, item in enumerate(p.items)]
    loader = torch.utils.data.DataLoader(
        Decode(work, processor.image), batch_size=None, shuffle=False, num_workers=workers,
        worker_init_fn=worker_init if workers else None, prefetch_factor=4 if workers else None,
        persistent_workers=False)
    shown = progress if progress is not None else (rank == 0 and sys.stderr.isatty()
                                                     and os.environ.get("TERM") != "dumb")
    bar = tqdm(total=len(work), unit="img", file=sys.stderr, disable=not shown, smoothing=0.1)
    stats = {"done": 0}
    embedded = 0

    def encode(pixels: list[torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            x = net.encode_image(processor.image.collate(pixels).to(dev)).float()
            return F.normalize(x, dim=-1).cpu().numpy().astype(np.float16)  # (B, D)

    def encode_text(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            ids = processor.texts(texts).to(dev)
            x = net.encode_text(ids).float()
            return F.normalize(x, dim=-1).cpu().numpy().astype(np.float16)

    D = net.config.vision_config.hidden_size
    commits = 0

    def commit(k: int, chunks: list[np.ndarray], meta: list[dict], errors: list[dict]) -> None:
        nonlocal commits
        emb = np.concatenate(chunks) if chunks else np.zeros((0, D), np.float16)
        txt = None
        if captions:
            texts = [m["caption"] or "" for m in meta]
            # Fixed batch boundaries for the texts too, so that the bytes never depend on the run.
            txt_chunks = [encode_text(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]
            txt = np.concatenate(txt_chunks) if txt_chunks else np.zeros((0, D), np.float16)
        commits += 1
        write_part(out, mine[k].index, captions, digits, emb, txt, meta, errors, commits)

    # Empty parts (an empty shard) are done at once; the others as their last item arrives.
    state: dict[int, dict] = {}
    for k, p in enumerate(mine):
        if not p.items:
            commit(k, [], [], [])
    t0 = time.perf_counter()
    for k_part, pos, result, w, h, caption, fields in loader:
        item = mine[k_part].items[pos]
        s = state.setdefault(k_part, {"pending": [], "chunks": [], "meta": [], "errors": [], "seen": 0})
        s["seen"] += 1
        # A shard row's image_path is the shard's path and the image member's name
        # (shards/00000.tar/000000001.jpg): never empty, and what `search` shows.
        path = item.path if item.shard is None else (item.member and f"{item.shard}/{item.member}")
        row = {"image_path": path, "shard": item.shard, "key": item.key, "caption": caption,
               "json": fields}
        if isinstance(result, str):
            s["errors"].append({**row, "width": None, "height": None, "position": pos, "error": result})
        else:
            s["pending"].append(result)
            s["meta"].append({**row, "width": w, "height": h})
            if len(s["pending"]) == batch_size:
                s["chunks"].append(encode(s["pending"]))
                embedded += len(s["pending"])
                s["pending"] = []
                kill_point("AFTER_IMAGES", embedded)
        bar.update(1)
        if s["seen"] == len(mine[k_part].items):
            if s["pending"]:
                s["chunks"].append(encode(s["pending"]))
                embedded += len(s["pending"])
                kill_point("AFTER_IMAGES", embedded)
            commit(k_part, s["chunks"], s["meta"], s["errors"])
            del state[k_part]
    bar.close()
    stats["done"] = embedded
    stats["seconds"] = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Embed a whole image collection into "
                                "clip-retrieval's layout (img_emb/, metadata/, manifest.json); resumable, "
                                "and under torchrun each process takes its share of the parts.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders, image files, glob patterns, "
                   ".txt/.csv/.parquet lists of paths (optional caption column), webdataset .tar shards")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="where the parts go; a run there "
                   "is continued")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default: 2; 0: none)")
    p.add_argument("--part-size", type=int, default=10_000, help="images per part file (default: 10000; "
                   "each .tar shard is one part)")
    p.add_argument("--recursive", action="store_true", help="look into sub-folders of folder inputs")
    p.add_argument("--captions", action="store_true", help="also embed the captions into text_emb/")
    add_model_arguments(p.add_argument_group("model"), backend=True)
    p.add_argument("--no-lock", action="store_true", help="do not flock DIR/.lock (for filesystems "
                   "without flock, e.g. Lustre without -o flock): make sure no other run writes to DIR")
    args = p.parse_args(argv)
    try:
        embed(args.inputs, args.output, model=args.model, revision=args.revision,
              dtype=None if args.dtype == "auto" else args.dtype,
              device=None if args.device == "auto" else args.device, batch_size=args.batch_size,
              threads=args.threads, workers=args.workers, part_size=args.part_size,
              recursive=args.recursive, captions=args.captions, max_num_patches=args.max_num_patches,
              image_size=args.image_size, lock=not args.no_lock, backend=args.backend, graphs=args.graphs)
    except UsageError as e:
        p.error(str(e))  # exits 2
    except SiglipError as e:
        if not isinstance(e, RanksDisagree) or os.environ.get("RANK", "0") == "0":  # said once
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished parts are kept; run the same command again to continue "
              f"{args.output}", file=sys.stderr)
        return 130
    return 0
