"""Building the index of an embedded collection: the index type and its parameters chosen for a
memory budget and a target recall, on queries of the kind that will come, as autofaiss does.

    siglip-so400m index emb/                                  # tuned for recall@10 >= 0.95 in 4GB
    siglip-so400m index emb/ --max-memory 200MB --tune-queries texts.npy
    siglip-so400m index clip_retrieval_out/ --model google/siglip-so400m-patch14-384

The queries tuned for, in this order: `--tune-queries FILE.npy` (vectors); the caption embeddings
in text_emb/ (`embed --captions`); the metadata's captions embedded by `--model`; else, and only
then, stored image embeddings held out of the training sample (said so: text queries sit in another
cone than images, the modality gap, and may get less recall than image ones). Half of them tune,
the other half is held out and gives the recall reported.

An exact index (`IndexFlatIP`) that fits the budget and takes at most EXACT_BYTES (32 MiB: so400m's
7,281 vectors) is built outright, without tuning: a scan that small takes about a millisecond and
misses nothing. So is one where too few queries exist to measure an approximate index's recall on
(MIN_RECALL_QUERIES tune, as many are held out); without exact search in the budget that is an error.
A result scoring the k-th exact score (within TIE_TOLERANCE) counts as found, so that copies of one
image, which tie, are never misses.

Otherwise every index type whose memory fits `--max-memory` (exact `IndexFlatIP`; HNSW over
8-bit vectors; IVF-PQ with as many PQ bytes as fit) is built once; for each, the smallest search
breadth (efSearch, nprobe) reaching `--min-recall` is found for each exact re-rank depth (candidates
re-scored against the stored vectors), and the fastest of those (median latency of one query,
measured through the search path) wins. Nothing within the budget reaching the target is an error
that gives the best recall found and the memory that exact search would need. The chosen search
parameters are saved in index/index.json, where `search`, `Index` and the server read them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .collection import INDEX_DIR, INDEX_FILE, INDEX_INFO, Collection, parquet, part_files, parts_record
from .errors import UsageError
from .search import SearchError, _faiss, _rerank, _set_search_params, exact_topk
from .weights import atomic_write, fsync

KINDS = ("auto", "flat", "hnsw", "ivfpq")
HNSW_EF = (16, 32, 64, 128, 256, 512, 1024, 2048)
HNSW_RERANK = (1, 2, 4)
IVF_RERANK = (1, 2, 4, 8, 16, 32, 64)
LATENCY_QUERIES = 50  # single queries timed per configuration compared
# Scores within this of the k-th exact score tie with it: identical vectors (a collection's copies of
# one image) score the same, and which of them fills the last places is no miss. Float32 sums of D
# products taken in another order (BLAS against the re-rank's matmul) differ by about sqrt(D)·6e-8,
# 2e-6 at D = 1152; two distinct images closer than 1e-5 to a query are interchangeable for it.
TIE_TOLERANCE = 1e-5
# An exact index (IndexFlatIP) of at most this many bytes is built without tuning any other: a scan of
# 32 MiB takes about a millisecond a query on one core (faiss, measured: 0.26 ms at 1,500 so400m
# vectors, 1.6 ms at 10,000), and it is exact, so there is no recall to trade for speed.
EXACT_BYTES = 32 * 2**20
# The fewest queries a recall is measured on, held out (and as many to tune on): at 50 queries the
# standard error of a recall near 0.95 is at most 0.03 (when each query finds all or nothing of its
# neighbours), about 0.01 when misses are spread; on fewer, a reported recall says little.
MIN_RECALL_QUERIES = 50


def parse_bytes(text: str | int | float) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    units = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30,
             "T": 2**40, "TB": 2**40}
    s = text.strip().upper().replace("IB", "B")
    num = s.rstrip("KMGTB")
    try:
        return int(float(num) * units[s[len(num):]])
    except (ValueError, KeyError):
        raise SearchError(f"--max-memory {text!r}: give a size such as 8GB or 512MB") from None


def _size_arg(b: int) -> str:
    """A --max-memory value of at least b bytes, rounded up: 4.7GB, 1.3MB."""
    unit, name = (2**30, "GB") if b >= 2**30 else (2**20, "MB")
    return f"{math.ceil(b / unit * 10) / 10}{name}"


def _gb(b: float) -> str:
    return (f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB" if b >= 2**20
            else f"{b / 2**10:.1f} KiB")


# --- the index types and their memory ---------------------------------------------------------

def memory_needed(kind: str, n: int, d: int, *, hnsw_m: int = 32, pq_m: int = 0, nlist: int = 0) -> int:
    """Bytes the faiss index holds in memory (the stored float16 vectors used to re-rank are
    memory-mapped: they cost disk and page cache, not this)."""
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":  # 8-bit scalar-quantized vectors, 2M links of 4 bytes at layer 0, ids/levels
        return n * (d + hnsw_m * 2 * 4 + 8)
    # codes, 8-byte ids, the coarse centroids, the PQ codebooks (256 centroids per sub-space)
    return n * (pq_m + 8) + nlist * d * 4 + 256 * d * 4


def default_nlist(n: int) -> int:
    """About 2·sqrt(n) cells, with at least 39 training vectors each: half of autofaiss' 4·sqrt(n),
    as k-means over nlist·39 vectors costs nlist² and on 2 cores dominates the build; the cells
    are twice as full, which the tuned nprobe makes up for."""
    return max(1, min(int(2 * math.sqrt(n)), n // 39))


def pq_bytes_options(d: int) -> list[int]:
    """PQ bytes per vector that divide d, from d/8 (8-d sub-spaces: 144 for so400m's 1152, near exact
    after re-ranking; finer ones cost training time for little) down to 4."""
    return sorted((m for m in range(4, max(4, d // 8) + 1) if d % m == 0), reverse=True)


def candidates(n: int, d: int, budget: int, kind: str = "auto", *, hnsw_m: int | None = None,
               nlist: int | None = None, pq_m: int | None = None) -> tuple[list[dict], list[dict]]:
    """(index specs within the budget, those over it), each {"kind", build params, "memory_bytes"}."""
    specs = []
    if kind in ("auto", "flat"):
        specs.append({"kind": "flat"})
    if kind in ("auto", "hnsw"):
        specs.append({"kind": "hnsw", "hnsw_m": hnsw_m or 32})
    if kind in ("auto", "ivfpq"):
        cells = nlist or default_nlist(n)
        options = [pq_m] if pq_m else pq_bytes_options(d)
        fit = [m for m in options if memory_needed("ivfpq", n, d, pq_m=m, nlist=cells) <= budget]
        specs.append({"kind": "ivfpq", "nlist": cells, "pq_m": fit[0] if fit else options[-1]})
    for s in specs:
        s["memory_bytes"] = memory_needed(s["kind"], n, d, hnsw_m=s.get("hnsw_m", 32), pq_m=s.get("pq_m", 0),
                                          nlist=s.get("nlist", 0))
    return [s for s in specs if s["memory_bytes"] <= budget], [s for s in specs if s["memory_bytes"] > budget]


def build(coll: Collection, spec: dict, train_ids: np.ndarray, log=print):
    """The faiss index of `spec` over the whole collection, trained on the rows train_ids."""
    faiss = _faiss()
    d = coll.dim
    if spec["kind"] == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec["kind"] == "hnsw":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, spec["hnsw_m"],
                                  faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * spec["hnsw_m"])
    else:
        # 8 bits per code (256 centroids per sub-space) need 256 training vectors; tiny collections
        # get fewer bits.
        spec["pq_bits"] = max(1, min(8, int(math.log2(max(2, len(train_ids))))))
        spec["nlist"] = min(spec["nlist"], len(train_ids))
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, spec["nlist"], spec["pq_m"], spec["pq_bits"],
                                 faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.niter = 10  # not 25: the codes only pick candidates, which are re-ranked exactly
    if not index.is_trained:
        log(f"training the {spec['kind']} index on {len(train_ids)} vectors")
        index.train(coll.vectors(train_ids))
    for _, block in coll.blocks():
        index.add(block)
    return index


def train_sample(n: int, spec_nlist: int, exclude: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows to train on, leaving out the rows used as queries (so that recall is measured on vectors
    the quantizers never saw, as real queries are): 39 per cell and at least 256·39 for the PQ
    codebooks, no more (k-means on 2 cores is the bulk of the build time)."""
    pool = np.setdiff1d(np.arange(n), exclude)
    size = min(len(pool), max(256 * 39, spec_nlist * 39))
    return np.sort(rng.choice(pool, size=size, replace=False))


# --- the queries tuned for --------------------------------------------------------------------

def read_tune_queries(file: str | os.PathLike, d: int) -> np.ndarray:
    """--tune-queries FILE.npy, memory-mapped: (Q, d) vectors, or a usage error naming the file."""
    try:
        q = np.load(file, mmap_mode="r")
    except FileNotFoundError:
        raise UsageError(f"--tune-queries {file}: no such file") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--tune-queries {file}: not a .npy array of (Q, {d}) query vectors "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(q, np.ndarray):  # an .npz archive
        raise UsageError(f"--tune-queries {file}: not a .npy array of (Q, {d}) query vectors")
    if q.ndim != 2 or q.shape[1] != d:
        raise SearchError(f"--tune-queries {file}: expected (Q, {d}) vectors, found shape {q.shape}")
    return q


def tuning_queries(coll: Collection, *, file: str | os.PathLike | None = None, model: str | None = None,
                   count: int = 600, rng: np.random.Generator, log=print
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """(queries (Q, D) float32 unit rows, own (Q,) the collection row each query is (-1: none),
    what they are). See the module docstring for the order of the sources."""
    n, d = len(coll), coll.dim
    if file is not None:
        q = read_tune_queries(file, d)
        pick = np.sort(rng.choice(len(q), size=min(count, len(q)), replace=False))
        return _unit(np.asarray(q[pick], np.float32)), np.full(len(pick), -1), f"vectors from {file}"
    text_files = part_files(coll.folder, "text_emb")
    if text_files:
        parts = [np.load(p, mmap_mode="r") for p in text_files]
        sizes = np.cumsum([0] + [len(p) for p in parts])
        ids = rng.choice(sizes[-1], size=min(4 * count, sizes[-1]), replace=False)
        rows = np.stack([parts[j][i - sizes[j]] for i in ids
                         for j in [int(np.searchsorted(sizes, i, side="right") - 1)]]) if len(ids) else None
        if rows is not None:
            # Items without a caption all got the embedding of "": one such query is enough.
            rows = np.unique(rows, axis=0)
            rows = rows[rng.permutation(len(rows))[:count]]
            return _unit(rows.astype(np.float32)), np.full(len(rows), -1), "caption embeddings from text_emb/"
    if model is not None:
        captions = _captions(coll, 20 * count, rng)
        if captions:
            captions = captions[:count]
            log(f"embedding {len(captions)} captions from the metadata with {model} to tune for text queries")
            return (_embed_texts(coll, model, captions), np.full(len(captions), -1),
                    f"{len(captions)} captions embedded by {model}")
    # A tenth of the rows (the rest train the quantizers), but at least the queries a recall needs
    # where the collection has them, and never more than half of it.
    own = np.sort(rng.choice(n, size=min(count, max(2 * MIN_RECALL_QUERIES, n // 10), max(1, n // 2)),
                             replace=False))
    log("tuning on held-out image embeddings (no --tune-queries, no text_emb/, no --model with captions "
        "in the metadata): text queries sit apart from images (the modality gap) and may get less "
        "recall than reported")
    return coll.vectors(own), own, "held-out image embeddings"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _captions(coll: Collection, at_most: int, rng: np.random.Generator) -> list[str]:
    """Distinct non-empty captions from the metadata: only the caption column is read."""
    pq = parquet()
    seen: set[str] = set()
    for i in rng.permutation(len(coll.meta_files)):
        f = pq.ParquetFile(coll.meta_files[i])
        if "caption" not in f.schema_arrow.names:
            return []
        seen.update(c for c in f.read(columns=["caption"]).column(0).to_pylist() if c)
        if len(seen) >= at_most:
            break
    out = sorted(seen)
    return [out[i] for i in rng.permutation(len(out))]


def _embed_texts(coll: Collection, model: str, texts: list[str], batch: int = 32) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from .api import load
    from .modelspec import check_record, checkpoint_record
    from .weights import resolve

    m = coll.manifest
    # The collection's own checkpoint: at the revision it was embedded with, as search takes it.
    named = str(Path(model).resolve()) if Path(model).exists() else model
    revision = m.get("revision") if m.get("model") == named else None
    ckpt = resolve(model, revision=revision, towers=("text",))
    if coll.manifest.get("model") is not None:
        # Queries from another checkpoint than the collection's would tune for another space.
        check_record(coll.manifest, checkpoint_record(ckpt), str(coll.folder),
                     fields=("model", "revision", "weights"),
                     advice="give the --model the collection was embedded with")
    net, proc = load(ckpt, towers=("text",))
    with torch.inference_mode():
        out = [F.normalize(net.encode_text(proc.texts(texts[s : s + batch])).float(), dim=-1).numpy()
               for s in range(0, len(texts), batch)]
    return np.concatenate(out)


# --- measuring a configuration ----------------------------------------------------------------

def truth(coll: Collection, q: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (cosines, ids), (Q, k) each, each query's own row (if it is one) left out."""
    scores, ids = exact_topk(coll, q, min(len(coll), k + 1))
    return _drop_own(scores, ids, own, k)


def _drop_own(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_s, out_i = np.full((len(ids), k), -np.inf, np.float32), np.full((len(ids), k), -1, np.int64)
    for r, (row_s, row, o) in enumerate(zip(scores, ids, own, strict=True)):
        keep = (row != o) & (row >= 0)
        out_s[r, : keep.sum()], out_i[r, : keep.sum()] = row_s[keep][:k], row[keep][:k]
    return out_s, out_i


def approx(coll: Collection, index, params: dict, q: np.ndarray, own: np.ndarray, k: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The search path's top-k (cosines, ids), (Q, k) each: the index's k·rerank candidates re-scored
    exactly."""
    kk = min(len(coll), k + 1)
    _, cand = index.search(q, min(len(coll), kk * params["rerank"]))
    scores, ids = _rerank(coll, q, cand, kk)
    return _drop_own(scores, ids, own, k)


def recall_per_query(found: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]
                     ) -> np.ndarray:
    """Per query, the share of its exact top k that the search found, each (cosines, ids) (Q, k). A
    result scoring the k-th exact score or more (within TIE_TOLERANCE) is one of the k best: of six
    copies of an image, any that come back are right, whichever ids exact search listed. The found
    cosines are exact (the search path re-scores its candidates), so they can be compared."""
    (found_s, found_i), (exact_s, exact_i) = found, exact
    valid = exact_i >= 0
    want = valid.sum(1)  # (Q,) neighbours there are (k, or fewer in a tiny collection)
    kth = np.where(want > 0, exact_s[np.arange(len(want)), np.maximum(want - 1, 0)], np.inf)
    hits = ((found_i >= 0) & (found_s >= kth[:, None] - TIE_TOLERANCE)).sum(1)
    return np.where(want > 0, np.minimum(hits, want) / np.maximum(want, 1), 1.0)


def _bound(r: np.ndarray) -> float:
    """The recall tested against the target: mean - 2 standard errors over the queries."""
    return float(r.mean() - 2 * r.std() / math.sqrt(len(r)))


def latency(coll: Collection, index, params: dict, q: np.ndarray, k: int, batch: int = 1,
            rounds: int | None = None) -> np.ndarray:
    """Seconds per call of the search path on `batch` queries at a time."""
    times = []
    steps = range(0, len(q) - batch + 1, batch) if rounds is None else [
        (r * batch) % max(1, len(q) - batch + 1) for r in range(rounds)]
    for s in steps:
        t = time.perf_counter()
        _, cand = index.search(q[s : s + batch], min(len(coll), k * params["rerank"]))
        _rerank(coll, q[s : s + batch], cand, k)
        times.append(time.perf_counter() - t)
    return np.array(times)


def _breadth(spec: dict) -> tuple[str | None, tuple[int, ...]]:
    if spec["kind"] == "hnsw":
        return "ef_search", HNSW_EF
    if spec["kind"] == "ivfpq":
        grid = tuple(2**i for i in range(13) if 2**i < spec["nlist"])
        return "nprobe", (*grid, spec["nlist"])
    return None, (0,)


def tune_search(coll: Collection, index, spec: dict, q: np.ndarray, own: np.ndarray, exact: np.ndarray,
                k: int, target: float, fixed: dict, log=print) -> tuple[dict | None, list[dict]]:
    """The fastest search parameters of one built index that reach `target` on the tuning queries
    (a lower confidence bound on them: mean - 2 standard errors, so that the held-out queries reach
    it too), and every trial made. `exact` is the exact top k, (cosines, ids)."""
    name, grid = _breadth(spec)
    reranks = [fixed["rerank"]] if fixed.get("rerank") else (
        [1] if spec["kind"] == "flat" else HNSW_RERANK if spec["kind"] == "hnsw" else IVF_RERANK)
    if name and fixed.get(name):
        grid = (fixed[name],)
    trials: list[dict] = []

    def trial(rerank: int, breadth: int) -> dict:
        params = {"rerank": rerank} | ({name: breadth} if name else {})
        _set_search_params(index, {"kind": spec["kind"], **params})
        r = recall_per_query(approx(coll, index, params, q, own, k), exact)
        t = {**params, "recall": float(r.mean()), "bound": _bound(r), "queries": len(r)}
        trials.append(t)
        return t

    done: dict[tuple[int, int], dict] = {}

    def passes(rerank: int, at: int) -> bool:
        if (rerank, at) not in done:
            done[rerank, at] = trial(rerank, grid[at])
        return done[rerank, at]["bound"] >= target

    # Recall grows with the breadth and with the re-rank depth, so: the deepest re-rank first, a
    # binary search for the smallest breadth reaching the target, then each shallower depth searched
    # only from there up (it needs at least as much breadth); one that fails at full breadth ends it.
    reached, lo = [], 0
    for rerank in sorted(reranks, reverse=True):
        if not passes(rerank, len(grid) - 1):
            break
        hi = len(grid) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(rerank, mid):
                hi = mid
            else:
                lo = mid + 1
        reached.append(done[rerank, lo])
    for t in reached:
        _set_search_params(index, {"kind": spec["kind"], **t})
        rounds = LATENCY_QUERIES if spec["kind"] != "flat" else 10
        t["p50_ms"] = 1e3 * float(np.median(latency(coll, index, t, q, k, rounds=rounds)))
    best = min(reached, key=lambda t: t["p50_ms"]) if reached else None
    if best:
        log(f"{spec['kind']}: fastest reaching recall@{k} {target}: "
            + ", ".join(f"{a} {best[a]}" for a in ("ef_search", "nprobe", "rerank") if a in best)
            + f" (recall {best['recall']:.4f}, {best['p50_ms']:.2f} ms a query)")
    else:
        top = max(trials, key=lambda t: t["bound"])
        log(f"{spec['kind']}: best recall@{k} {top['bound']:.4f} (mean {top['recall']:.4f} less 2 standard "
            f"errors) is below {target}")
    return best, trials


# --- the whole build --------------------------------------------------------------------------

def build_index(folder: str | os.PathLike, *, max_memory: str | int = "4GB", min_recall: float = 0.95,
                kind: str = "auto", k: int = 10, queries: int = 600, tune_queries: str | None = None,
                model: str | None = None, hnsw_m: int | None = None, ef_search: int | None = None,
                nlist: int | None = None, nprobe: int | None = None, pq_m: int | None = None,
                rerank: int | None = None, shard: tuple[int, int] | None = None, seed: int = 0,
                log=print) -> dict:
    """Build the fastest index within `max_memory` whose recall@k reaches `min_recall` on held-out
    queries of the kind that will come, and save it with its search parameters in folder/index/.
    Parameters given (hnsw_m, nlist, pq_m; ef_search, nprobe, rerank) are kept, the others tuned.
    shard (r, w): only the parts at positions r, r + w, ... (what torchrun rank r of w embedded),
    saved in folder/index/shard-r-of-w/; `Index` searches all w shards together and merges their
    top-k. Returns what index.json records."""
    coll = Collection(folder, shard=shard)
    n, d = len(coll), coll.dim
    if n == 0:
        raise SearchError(f"{coll.folder} holds no embeddings")
    if kind not in KINDS:
        raise SearchError(f"kind must be one of {', '.join(KINDS)}")
    if not 0 <= min_recall <= 1:
        raise SearchError(f"--min-recall {min_recall}: give a fraction between 0 and 1")
    budget = parse_bytes(max_memory)
    fits, over = candidates(n, d, budget, kind, hnsw_m=hnsw_m, nlist=nlist, pq_m=pq_m)
    if not fits:
        smallest = min(over, key=lambda s: s["memory_bytes"])
        raise SearchError(f"no {'' if kind == 'auto' else kind + ' '}index fits --max-memory {_gb(budget)}: "
                          f"the smallest ({smallest['kind']}) needs {_gb(smallest['memory_bytes'])}")
    rng = np.random.default_rng(seed)
    if tune_queries is not None:  # a flag naming a bad file is refused whatever gets built
        read_tune_queries(tune_queries, d)
    exact_bytes = memory_needed("flat", n, d)
    flat = next((s for s in fits if s["kind"] == "flat"), None)
    if flat is not None and (kind == "flat" or exact_bytes <= EXACT_BYTES):
        why = "--kind flat" if kind == "flat" else (
            f"{n} vectors take {_gb(exact_bytes)} as an exact index, at most {_gb(EXACT_BYTES)}, which a "
            "scan reads in about a millisecond a query: no approximate index is worth its missed neighbours")
        return _build_exact(coll, flat, over, why, budget, min_recall, k, shard, rng, log)
    q, own, source = tuning_queries(coll, file=tune_queries, model=model, count=queries, rng=rng, log=log)
    order = rng.permutation(len(q))
    tune_at, held_at = order[: len(q) // 2], order[len(q) // 2 :]
    if len(tune_at) < MIN_RECALL_QUERIES:
        m = MIN_RECALL_QUERIES
        few = (f"{len(q)} queries ({source}) are too few to measure an approximate index's recall on: "
               f"that takes {2 * m} ({m} to tune, {m} held out)")
        if flat is not None:
            return _build_exact(coll, flat, over, few, budget, min_recall, k, shard, rng, log)
        raise SearchError(few + f"; give --queries {2 * m} or more, --tune-queries with more vectors, or "
                          + _exact_advice(exact_bytes, budget) + "; nothing was saved")
    log(f"tuning for {source}: {len(tune_at)} queries tune, {len(held_at)} held out report")
    exact_s, exact_i = truth(coll, q, own, min(k, n - 1 if (own >= 0).any() else n))
    kk = exact_i.shape[1]
    fixed = {"ef_search": ef_search, "nprobe": nprobe, "rerank": rerank}
    results = []
    for spec in fits:
        t0 = time.perf_counter()
        # (HNSW's 8-bit quantizer trains too: each dimension's range.)
        train = train_sample(n, spec.get("nlist", 0), own[own >= 0], rng)
        index = build(coll, spec, train, log=log)
        build_s = time.perf_counter() - t0
        log(f"built {spec['kind']} in {build_s:.1f} s ({_gb(spec['memory_bytes'])})")
        best, trials = tune_search(coll, index, spec, q[tune_at], own[tune_at],
                                   (exact_s[tune_at], exact_i[tune_at]), kk, min_recall, fixed, log=log)
        results.append({"spec": spec, "index": index, "best": best, "trials": trials, "build_s": build_s})
        if best is None:
            del index
    reached = [r for r in results if r["best"] is not None]
    if not reached:
        # What is reported is what was tested against the target: the lower bound, not the mean.
        r, t = max(((r, t) for r in results for t in r["trials"]), key=lambda rt: rt[1]["bound"])
        params = ", ".join(f"{a} {t[a]}" for a in ("ef_search", "nprobe", "rerank") if a in t)
        raise SearchError(
            f"no {'' if kind == 'auto' else kind + ' '}index within --max-memory {_gb(budget)} reaches "
            f"recall@{k} {min_recall} on {source}: the best found is {t['bound']:.3f} ({r['spec']['kind']}, "
            f"{params}, {_gb(r['spec']['memory_bytes'])}: recall {t['recall']:.3f} on {t['queries']} tuning "
            f"queries less 2 standard errors, the margin the target is tested with); exact search reaches "
            f"1.0 and needs {_gb(exact_bytes)}: give {_exact_advice(exact_bytes, budget)}, or lower "
            "--min-recall; nothing was saved")
    win = min(reached, key=lambda r: r["best"]["p50_ms"])
    spec, best, index = win["spec"], win["best"], win["index"]
    _set_search_params(index, {"kind": spec["kind"], **best})
    search = {a: best[a] for a in ("ef_search", "nprobe", "rerank") if a in best}
    held = recall_per_query(approx(coll, index, search, q[held_at], own[held_at], kk),
                            (exact_s[held_at], exact_i[held_at]))
    info = {"kind": spec["kind"], "n": n, "dim": d, "row_order": "name", "parts": parts_record(coll.folder),
            **{a: spec[a] for a in ("hnsw_m", "nlist", "pq_m", "pq_bits") if a in spec}, **search,
            "memory_bytes": spec["memory_bytes"], "max_memory_bytes": budget,
            "build_seconds": round(win["build_s"], 3), "min_recall": min_recall, "k": k,
            "queries": source, "recall_at_10": round(float(held.mean()), 4), "recall_queries": len(held_at),
            "tune_recall": round(best["recall"], 4),
            "latency_ms": _latency_ms(coll, index, search, q, kk, spec["kind"]),
            "tried": [{"kind": r["spec"]["kind"], "memory_bytes": r["spec"]["memory_bytes"],
                       "build_seconds": round(r["build_s"], 3),
                       "chosen": r["best"] and {a: v for a, v in r["best"].items() if a != "bound"}}
                      for r in results],
            "over_budget": [{"kind": s["kind"], "memory_bytes": s["memory_bytes"]} for s in over]}
    log(f"chose {spec['kind']} (" + ", ".join(f"{a} {v}" for a, v in search.items())
        + f"): recall@{k} {info['recall_at_10']:.4f} on {len(held_at)} held-out queries ({source}), "
        f"{_gb(spec['memory_bytes'])}, built in {win['build_s']:.1f} s, one query p50 "
        f"{info['latency_ms']['one_p50']} ms p99 {info['latency_ms']['one_p99']} ms, batch of 64 p50 "
        f"{info['latency_ms']['batch64_p50']} ms")
    if info["recall_at_10"] < min_recall:
        log(f"warning: on the held-out queries recall@{k} is {info['recall_at_10']:.4f}, below "
            f"{min_recall} (on the tuning ones {best['recall']:.4f}): give more --queries")
    if shard is not None:
        info["shard"] = list(shard)
    save(coll.folder, index, info, shard)
    return info


def _exact_advice(exact_bytes: int, budget: int) -> str:
    """How to get exact search: the budget it needs (always more than the one given), or, where it
    fits already, the kind that was ruled out."""
    return ("--kind flat (exact search fits this --max-memory)" if exact_bytes <= budget
            else f"--max-memory {_size_arg(exact_bytes)}")


def _build_exact(coll: Collection, spec: dict, over: list[dict], why: str, budget: int, min_recall: float,
                 k: int, shard: tuple[int, int] | None, rng: np.random.Generator, log=print) -> dict:
    """Exact search (IndexFlatIP), saved as build_index saves a tuned index. Nothing is tuned or
    measured: every query gets its true top k, so the recall is 1 by construction."""
    n, d = len(coll), coll.dim
    log(f"building exact search: {why}")
    t0 = time.perf_counter()
    index = build(coll, spec, np.zeros(0, np.int64), log=log)
    build_s = time.perf_counter() - t0
    # A scan costs the same whatever the query: stored rows time it.
    q = coll.vectors(np.sort(rng.choice(n, size=min(n, 64), replace=False)))
    info = {"kind": "flat", "n": n, "dim": d, "row_order": "name", "parts": parts_record(coll.folder),
            "rerank": 1,
            "memory_bytes": spec["memory_bytes"], "max_memory_bytes": budget,
            "build_seconds": round(build_s, 3), "min_recall": min_recall, "k": k, "queries": None,
            "recall_at_10": 1.0, "recall_queries": 0, "exact": why,
            "latency_ms": _latency_ms(coll, index, {"rerank": 1}, q, min(k, n), "flat"),
            "tried": [{"kind": "flat", "memory_bytes": spec["memory_bytes"],
                       "build_seconds": round(build_s, 3), "chosen": {"rerank": 1, "recall": 1.0}}],
            "over_budget": [{"kind": s["kind"], "memory_bytes": s["memory_bytes"]} for s in over]}
    lat = info["latency_ms"]
    log(f"chose flat (exact search: recall 1 by construction), {_gb(spec['memory_bytes'])}, built in "
        f"{build_s:.1f} s, one query p50 {lat['one_p50']} ms p99 {lat['one_p99']} ms, batch of 64 p50 "
        f"{lat['batch64_p50']} ms")
    if shard is not None:
        info["shard"] = list(shard)
    save(coll.folder, index, info, shard)
    return info


def _latency_ms(coll: Collection, index, search: dict, q: np.ndarray, k: int, kind: str) -> dict:
    """One query and a batch of 64 through the search path, p50 and p99 in ms."""
    flat = kind == "flat"  # 1M exact scans take a third of a second each: fewer rounds
    one = latency(coll, index, search, q, k, rounds=20 if flat else min(200, max(20, len(q))))
    b64 = latency(coll, index, search, q, k, batch=min(64, len(q)), rounds=3 if flat else 10)
    return {"one_p50": _ms(one, 50), "one_p99": _ms(one, 99),
            "batch64_p50": _ms(b64, 50), "batch64_p99": _ms(b64, 99)}


def _ms(t: np.ndarray, p: float) -> float:
    return round(1e3 * float(np.percentile(t, p)), 3)


def save(folder: Path, index, info: dict, shard: tuple[int, int] | None = None) -> None:
    """index/knn.index and index/index.json (or index/shard-r-of-w/...), each renamed into place
    when complete. One kind replaces the other: a whole index removes the shards, a shard the
    whole index, so that `Index` never finds both."""
    import shutil

    faiss = _faiss()
    top = folder / INDEX_DIR
    top.mkdir(exist_ok=True)
    if shard is None:
        out = top
        for d in top.glob("shard-*-of-*"):
            shutil.rmtree(d, ignore_errors=True)
    else:
        out = top / f"shard-{shard[0]}-of-{shard[1]}"
        out.mkdir(exist_ok=True)
        for f in (top / INDEX_INFO, top / INDEX_FILE):
            f.unlink(missing_ok=True)
        for d in top.glob("shard-*-of-*"):
            if not d.name.endswith(f"-of-{shard[1]}"):  # shards of an earlier, other split
                shutil.rmtree(d, ignore_errors=True)
    # index.json holds knn.index's search parameters: it goes first, so that a build killed between
    # the two files leaves an index-less folder (searched exactly), never the old parameters applied
    # to the new index. Each file is replaced whole (weights.atomic_write).
    (out / INDEX_INFO).unlink(missing_ok=True)
    fsync(out)
    atomic_write(out / INDEX_FILE, lambda p: faiss.write_index(index, str(p)))
    text = json.dumps(info, indent=1) + "\n"
    atomic_write(out / INDEX_INFO, lambda p: p.write_text(text))


# --- command line ---------------------------------------------------------------------------

def index_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Build the fastest faiss index over an embedded "
                                "folder that fits --max-memory and reaches --min-recall on held-out queries "
                                "of the kind that will come (text, when known).")
    p.add_argument("folder", metavar="DIR", help="the --output of `siglip-so400m embed`, or clip-retrieval's "
                   "(img_emb/*.npy and metadata/*.parquet)")
    p.add_argument("--max-memory", default="4GB", help="memory the index may take (default: 4GB)")
    p.add_argument("--min-recall", type=float, default=0.95, help="recall@10 to reach (default: 0.95)")
    p.add_argument("--kind", choices=KINDS, default="auto",
                   help="only this index type (default: the fastest that reaches --min-recall)")
    p.add_argument("--tune-queries", metavar="FILE.npy", help="(Q, D) query embeddings to tune for (default: "
                   "text_emb/, else captions embedded by --model, else held-out image embeddings)")
    p.add_argument("--model", help="checkpoint to embed the metadata's captions with, to tune for text "
                   "queries")
    p.add_argument("--queries", type=int, default=600, help="tuning + held-out queries (default: 600; an "
                   f"approximate index needs at least {2 * MIN_RECALL_QUERIES})")
    p.add_argument("--hnsw-m", type=int, help="HNSW links per node (default: 32)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (default: tuned)")
    p.add_argument("--nlist", type=int, help="IVF cells (default: about 2·sqrt(n))")
    p.add_argument("--nprobe", type=int, help="IVF cells visited per query (default: tuned)")
    p.add_argument("--pq-m", type=int, help="PQ bytes per vector (default: the most that fit)")
    p.add_argument("--rerank", type=int, help="candidates per result re-scored exactly (default: tuned)")
    p.add_argument("--shard", metavar="R/W", help="index only shard R of W (the parts rank R of W embedded), "
                   "into index/shard-R-of-W/; search merges all W. 'torchrun': R and W from RANK, WORLD_SIZE")
    a = p.parse_args(argv)
    shard = None
    if a.shard == "torchrun":
        shard = (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    elif a.shard:
        try:
            shard = tuple(int(v) for v in a.shard.split("/"))
            assert len(shard) == 2 and 0 <= shard[0] < shard[1]
        except (ValueError, AssertionError):
            p.error(f"--shard {a.shard}: give R/W with 0 <= R < W, e.g. 0/4, or 'torchrun'")
    if a.queries < 2:
        p.error("--queries must be at least 2 (half tune, half report)")
    from .weights import CheckpointError

    try:
        info = build_index(a.folder, max_memory=a.max_memory, min_recall=a.min_recall, kind=a.kind,
                           queries=a.queries, tune_queries=a.tune_queries, model=a.model, hnsw_m=a.hnsw_m,
                           ef_search=a.ef_search, nlist=a.nlist, nprobe=a.nprobe, pq_m=a.pq_m,
                           rerank=a.rerank, shard=shard, log=lambda m: print(m, file=sys.stderr))
    except UsageError as e:
        p.error(str(e))
    except (SearchError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(index_main())
