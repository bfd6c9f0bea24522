"""Benchmark the collection jobs; prints a table and JSON.

(a) embed: `siglip_so400m.embed` over a folder of JPEGs of mixed sizes (decoding and resizing in
    worker processes) against the model-only rate (`encode_image` on pixel values made in advance,
    same dtype, same batch size). The embed rate counts everything from the first decode to the last
    part written (worker start-up included); the model-only rate leaves out one warm-up batch.
(b) index: build time, query latency (p50, p99; one query at a time, candidates re-scored exactly as
    search does) and recall@10 for each index type, on synthetic clustered unit vectors, each tuned
    for image queries with no recall floor; scripts/benchmark_index.py tunes for text-like queries
    and a target recall, the figures docs/embed.md gives.

    python -m siglip_so400m.testing /tmp/so400m                # full-size random weights (3.5 GB)
    python scripts/benchmark_embed.py --model /tmp/so400m --images 32
    python scripts/benchmark_embed.py --skip-embed --sizes 100000 1000000   # index part only
    python scripts/benchmark_embed.py --model DIR --device cuda --dtype bfloat16 --batch-size 64

Memory for (b): the flat index holds n x D x 4 bytes (1M x 1152: 4.6 GB), HNSW-SQ8 about
n x (D + 256) bytes, IVF-PQ n x (m + 8); the vectors themselves stay on disk (float16, memory-mapped).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import siglip_so400m
from siglip_so400m.collection import write_synthetic
from siglip_so400m.index_tuning import build_index
from siglip_so400m.search import Index


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photographs from scikit-image when installed (else smooth noise), resized to mixed sizes
    between 200 and 1600 px a side, as JPEGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = []
    try:
        from skimage import data

        sources = [Image.fromarray(getattr(data, name)()).convert("RGB")
                   for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")]
    except (ImportError, AttributeError, OSError):
        pass
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(200, 1601, 2))
        if sources:
            img = sources[i % len(sources)].resize((w, h))
        else:
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"{i:04d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def bench_embed(args, work: Path) -> dict:
    folder = work / "jpegs"
    paths = make_jpegs(folder, args.images)
    dtype = None if args.dtype == "auto" else args.dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    # Model-only: the same load embed() does, pixels made in advance.
    from siglip_so400m.api import pick_device, pick_dtype

    device = pick_device(args.device)
    quantize = "int8" if dtype == "int8" else None
    torch_dtype = torch.float32 if quantize else (getattr(torch, dtype) if dtype else pick_dtype(device))
    model, proc = siglip_so400m.load(args.model, dtype=None if quantize else torch_dtype, device=device,
                                     towers=("vision",), quantize=quantize)
    pixels = proc.images(paths)  # (N, 3, S, S)
    batches = [pixels[s : s + args.batch_size] for s in range(0, len(paths), args.batch_size)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        model.encode_image(batches[0].to(device))  # warm-up
        sync()
        t0 = time.perf_counter()
        for b in batches:
            model.encode_image(b.to(device)).float().cpu()
        sync()
        model_s = time.perf_counter() - t0
    del model
    out = work / "emb"
    result = siglip_so400m.embed(folder, out, model=args.model, dtype=dtype, device=args.device,
                                 batch_size=args.batch_size, threads=args.threads, workers=args.workers,
                                 progress=False)
    embed_s = result["run"]["seconds"]
    n = len(paths)
    return {"images": n, "dtype": result["dtype"], "batch_size": args.batch_size, "workers": args.workers,
            "device": str(device), "model_only_images_per_s": n / model_s, "embed_images_per_s": n / embed_s,
            "fraction_of_model_only": model_s / embed_s}


def clustered(n: int, dim: int, clusters: int, seed: int, part: int = 10_000):
    """Unit vectors around `clusters` random centres, one part at a time (never all in memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    for s in range(0, n, part):
        m = min(part, n - s)
        x = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, dim)).astype(np.float32)
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def bench_index(args, work: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        folder = write_synthetic(work / f"syn_{n}", clustered(n, args.dim, args.clusters, seed=0))
        queries = np.concatenate(list(clustered(args.latency_queries, args.dim, args.clusters, seed=0)))
        # Same centres (seed 0), fresh noise: queries near the data but not in it.
        queries = queries.astype(np.float32)
        for kind in args.kinds:
            shutil.rmtree(folder / "index", ignore_errors=True)
            t0 = time.perf_counter()
            info = build_index(folder, kind=kind, min_recall=0.0, max_memory="1TB", queries=args.queries,
                               log=lambda m: print(m, file=sys.stderr))
            build_s = time.perf_counter() - t0  # includes the recall measurement
            index = Index.load(folder)
            lat = []
            for q in queries:
                t = time.perf_counter()
                index.topk(q[None], 10)
                lat.append(time.perf_counter() - t)
            rows.append({"n": n, "dim": args.dim, "kind": kind, "build_s": info["build_seconds"],
                         "build_and_recall_s": build_s, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
                         "p99_ms": 1e3 * float(np.percentile(lat, 99)), "recall_at_10": info["recall_at_10"],
                         "memory_gb": info["memory_bytes"] / 1e9,
                         "params": {k: v for k, v in info.items() if k in ("hnsw_m", "ef_search", "nlist",
                                                                             "nprobe", "pq_m", "rerank")}})
        shutil.rmtree(folder)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder for (a); a tiny one: python -m siglip_so400m.testing "
                   "DIR --tiny")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="collection sizes for (b); none to skip it")
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall@10")
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--workdir", help="where to write the images and vectors (default: a temporary folder)")
    args = p.parse_args()
    if not args.skip_embed and not args.model:
        p.error("--model DIR is needed for the embed benchmark (or --skip-embed)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_embed_"))
    result = {}
    try:
        if not args.skip_embed:
            e = result["embed"] = bench_embed(args, work)
            print(f"\n(a) embed {e['images']} JPEGs of mixed sizes, {e['dtype']}, batch {e['batch_size']}, "
                  f"{e['workers']} workers, {e['device']}")
            print("| model-only images/s | embed images/s | fraction |\n|---|---|---|")
            print(f"| {e['model_only_images_per_s']:.3f} | {e['embed_images_per_s']:.3f} | "
                  f"{e['fraction_of_model_only']:.1%} |")
        if args.sizes:
            rows = result["index"] = bench_index(args, work)
            print(f"\n(b) index over clustered {args.dim}-d unit vectors ({args.clusters} clusters)")
            print("| n | kind | build s | p50 ms | p99 ms | recall@10 | memory GB | params |")
            print("|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['n']:,} | {r['kind']} | {r['build_s']:.1f} | {r['p50_ms']:.2f} "
                      f"| {r['p99_ms']:.2f} | {r['recall_at_10']:.4f} | {r['memory_gb']:.2f} "
                      f"| {json.dumps(r['params'])} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
