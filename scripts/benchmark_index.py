"""Benchmark `siglip-so400m index` at scale: for each index type, the parameters the tuning chose,
build time, memory, recall@10 for image-like and for text-like queries, latency; prints a table
and JSON.

The collection is synthetic: n clustered unit vectors (float16 storage, as embed writes), 1000
clusters. Image-like queries are fresh vectors around the same centres; text-like ones the same
plus a shared offset that outweighs them (cosine ~0.3 to the images they match, as SigLIP's
text-image cosines are: the modality gap). The index is tuned on 400 text-like queries (half held
out); recall is then measured against exact search on 200 other queries of each kind.

    flock /tmp/heavy.lock python scripts/benchmark_index.py --n 1000000
    python scripts/benchmark_index.py --n 100000 --kinds ivfpq --max-memory 200MB

Memory: the vectors are written part by part and memory-mapped, never held whole (1M x 1152 is
2.3 GB in float16); the exact ground truth is computed a block at a time.
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

from siglip_so400m.collection import write_synthetic
from siglip_so400m.index_tuning import build_index
from siglip_so400m.search import Index, exact_topk

PARAMS = ("hnsw_m", "ef_search", "nlist", "nprobe", "pq_m", "rerank")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1152)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"])
    p.add_argument("--max-memory", default="64GB", help="budget for each forced kind (default: 64GB)")
    p.add_argument("--min-recall", type=float, default=0.95)
    p.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_index_"))
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((a.clusters, a.dim)).astype(np.float32)
    gap = rng.standard_normal(a.dim).astype(np.float32)
    gap /= np.linalg.norm(gap)

    def around(m: int) -> np.ndarray:
        x = centres[rng.integers(0, a.clusters, m)] + 0.6 * rng.standard_normal((m, a.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def text_like(m: int) -> np.ndarray:
        t = 0.3 * around(m) + gap
        return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)

    rows = []
    try:
        t0 = time.perf_counter()
        folder = write_synthetic(work / "syn", (around(min(10_000, a.n - s)).astype(np.float16)
                                                for s in range(0, a.n, 10_000)))
        print(f"wrote {a.n} x {a.dim} float16 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        np.save(work / "tune.npy", text_like(400))
        evals = {"image": around(200).astype(np.float32), "text": text_like(200)}
        index = Index.load(folder)
        exact = {q: exact_topk(index.collection, v, 10)[1] for q, v in evals.items()}
        for kind in a.kinds:
            shutil.rmtree(folder / "index", ignore_errors=True)
            t0 = time.perf_counter()
            info = build_index(folder, kind=kind, max_memory=a.max_memory, min_recall=a.min_recall,
                               tune_queries=str(work / "tune.npy"), queries=400,
                               log=lambda m: print(m, file=sys.stderr))
            total_s = time.perf_counter() - t0
            index = Index.load(folder)
            rec = {}
            for q, v in evals.items():
                _, ids = index.topk(v, 10)
                rec[q] = float(np.mean([len(set(f) & set(e)) / 10
                                        for f, e in zip(ids, exact[q], strict=True)]))
            rows.append({"n": a.n, "kind": kind,
                         "params": {k: info[k] for k in PARAMS if k in info},
                         "build_s": info["build_seconds"], "build_and_tune_s": round(total_s, 1),
                         "memory_bytes": info["memory_bytes"], "recall_image": rec["image"],
                         "recall_text": rec["text"], "tuned_heldout_recall": info["recall_at_10"],
                         **info["latency_ms"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nindex over {a.n:,} clustered {a.dim}-d vectors ({a.clusters} clusters), tuned for recall@10 "
          f">= {a.min_recall} on text-like queries")
    print("| kind | tuned parameters | build s | build+tune s | memory | recall@10 image | recall@10 text "
          "| 1 query p50 / p99 ms | batch 64 p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items())
        print(f"| {r['kind']} | {params} | {r['build_s']:.0f} | {r['build_and_tune_s']:.0f} "
              f"| {r['memory_bytes'] / 2**30:.2f} GiB | {r['recall_image']:.4f} | {r['recall_text']:.4f} "
              f"| {r['one_p50']:.2f} / {r['one_p99']:.2f} "
              f"| {r['batch64_p50']:.1f} / {r['batch64_p99']:.1f} |")
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
