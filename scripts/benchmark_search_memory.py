"""Metadata memory of search over a large collection: RSS, traced Python memory and the metadata
cache while many searches run, each hit's row read from the parquet parts (the path the server's
/v1/search takes: Server.search -> Index.search -> Collection.metadata). Prints a table and JSON.

    flock /tmp/heavy.lock python scripts/benchmark_search_memory.py --rows 1000000 --searches 10000

The vectors are 64-d (the metadata is what is measured; their width only changes the search time)
in parts of 10,000 rows; queries are random, so hits come from every part.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from siglip_so400m.collection import write_synthetic
from siglip_so400m.search import Index


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--searches", type=int, default=10_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--cache-mib", type=float, default=64)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_meta_"))
    rng = np.random.default_rng(0)

    def parts():
        for s in range(0, a.rows, 10_000):
            x = rng.standard_normal((min(10_000, a.rows - s), a.dim)).astype(np.float32)
            yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    rows = []
    try:
        folder = write_synthetic(work / "syn", parts())
        index = Index.load(folder)  # exact search: no faiss index needed for the metadata path
        index.collection.metadata_cache_bytes = int(a.cache_mib * 2**20)
        tracemalloc.start()
        base_rss, (base_traced, _) = rss_mib(), tracemalloc.get_traced_memory()
        step = max(1, a.searches // 10)
        for done in range(0, a.searches, step):
            q = rng.standard_normal((step, a.dim)).astype(np.float32)
            for s in range(0, step, 100):  # 100 queries a call, as a busy server's batches
                index.search(vectors=q[s : s + 100], k=a.k)
            c = index.collection.metadata_cache()
            rows.append({"searches": done + step, "rss_mib": round(rss_mib(), 1),
                         "rss_growth_mib": round(rss_mib() - base_rss, 1),
                         "traced_growth_mib": round((tracemalloc.get_traced_memory()[0] - base_traced)
                                                    / 2**20, 2),
                         "cache_groups": c["groups"], "cache_rows": c["rows"],
                         "cache_mib": round(c["bytes"] / 2**20, 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{a.rows:,} rows in {a.rows // 10_000} parts, {a.searches:,} searches of k={a.k}, cache bound "
          f"{a.cache_mib} MiB")
    print("| searches | RSS MiB | RSS growth MiB | traced growth MiB | cached groups | cached rows "
          "| cache MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['searches']:,} | {r['rss_mib']} | {r['rss_growth_mib']} | {r['traced_growth_mib']} "
              f"| {r['cache_groups']} | {r['cache_rows']:,} | {r['cache_mib']} |")
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
