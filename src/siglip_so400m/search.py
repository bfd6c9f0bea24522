"""Searching an embedded collection (embed's output folder): the faiss index, search, dedup.

    siglip-so400m index emb/                          # exact below --max-memory, else approximate
    siglip-so400m search emb/ "a red bicycle" --top-k 5 --threshold 0.5
    siglip-so400m dedup emb/ --threshold 0.95 --format csv

    index = siglip_so400m.Index.load("emb/")
    hits = index.search(texts=["a red bicycle"], images=["query.jpg"], k=5)

Text queries are scored with SigLIP's own probability, sigmoid(exp(t')·cos + b), t' and b read in
float32 from the checkpoint, so a threshold of 0.5 means "the model thinks it matches". Image
queries are scored by cosine. Whatever index finds the candidates, they are re-scored exactly
against the stored float16 embeddings, so a quantized index may miss a neighbour but never
misreports a score. faiss is needed only to build and use an index (extra [search]); without an
index the search is exact, in numpy, part by part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

INDEX_DIR = "index"
INDEX_FILE = "knn.index"
INDEX_INFO = "index.json"
KINDS = ("auto", "flat", "hnsw", "ivfpq")


class SearchError(RuntimeError):
    """A folder that cannot be searched or indexed; the message says what to change."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("building and using a faiss index needs faiss: pip install "
                          "'siglip_so400m[search]'") from None
    return faiss


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SearchError("reading the metadata needs pyarrow: pip install 'siglip_so400m[search]'") from None
    return pq


class Collection:
    """embed's output read back: the parts' embeddings (memory-mapped float16) in part order."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise SearchError(f"{self.folder} has no manifest.json: is it the --output of "
                              "`siglip-so400m embed`?")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise SearchError(f"{self.folder}: the embed run is not complete; run the same embed "
                              "command again to finish it")
        # Part numbers are padded to part_digits (name order = part order, as embedding-reader
        # reads); folders written before the padding have none.
        self.digits = int(self.manifest.get("part_digits", 0))
        self.parts = [np.load(self.part_file("img_emb", i), mmap_mode="r")
                      for i in range(self.manifest["parts"])]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # global row -> part
        self.dim = int(self.manifest["embedding_dim"])
        self._meta: dict[int, list[dict]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_file(self, kind: str, i: int) -> Path:
        """Part i's file of `kind` (img_emb, metadata, text_emb, errors)."""
        ext = "npy" if kind.endswith("_emb") else "parquet"
        return self.folder / kind / f"{kind}_{str(i).zfill(self.digits)}.{ext}"

    def blocks(self, rows: int = 65536):
        """(first row, float32 block) over all embeddings, a bounded block at a time."""
        for i, part in enumerate(self.parts):
            for s in range(0, len(part), rows):
                yield int(self.offsets[i]) + s, np.asarray(part[s : s + rows], dtype=np.float32)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32 rows by global id."""
        out = np.empty((len(ids), self.dim), np.float32)
        where = np.searchsorted(self.offsets, ids, side="right") - 1
        for n, (i, part) in enumerate(zip(ids, where, strict=True)):
            out[n] = self.parts[part][i - self.offsets[part]]
        return out

    def metadata(self, i: int) -> dict:
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if part not in self._meta:
            self._meta[part] = _pq().read_table(self.part_file("metadata", part)).to_pylist()
        return self._meta[part][i - int(self.offsets[part])]


def exact_topk(coll: Collection, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (cosine, id) per query over the whole collection, in float32: (Q, k) each."""
    Q = len(queries)
    best_s = np.full((Q, 0), -np.inf, np.float32)
    best_i = np.zeros((Q, 0), np.int64)
    for first, block in coll.blocks():
        s = queries @ block.T  # (Q, rows)
        if s.shape[1] > k:  # the block's own k best first, so that only (Q, 2k) are ever merged
            ids = np.argpartition(-s, k, axis=1)[:, :k]
            s, ids = np.take_along_axis(s, ids, 1), ids + first
        else:
            ids = np.broadcast_to(np.arange(first, first + block.shape[0]), s.shape)
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k, axis=1)[:, :k]
            best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else np.zeros((Q, 0), np.int64)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _rerank(coll: Collection, queries: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of an index's candidates (-1 = none), the k best kept: (Q, k) each."""
    scores = np.full(cand.shape, -np.inf, np.float32)
    for q in range(len(queries)):
        valid = cand[q] >= 0
        scores[q, valid] = coll.vectors(cand[q, valid]) @ queries[q]
    order = np.lexsort((cand, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)


class Index:
    """A searchable embedded collection: embed's output folder, with the faiss index that
    `siglip-so400m index` built there if any (exact search without one).

    `search(texts=[...], images=[...], vectors=None, k=10, threshold=None)` returns one list per
    query, texts first, then images, then vectors, each list best first (at most k), each hit a dict:

        {"id": 1234,                      # row over all parts (part order, then row order)
         "path": "photos/cat.jpg",        # image_path, or "shard.tar/key" for webdataset input
         "caption": "a cat" | None,
         "metadata": {...},               # the whole metadata row (image_path, shard, key, caption,
                                          #   width, height)
         "score": 0.93,                   # text: the sigmoid; image/vector: the cosine
         "cosine": 0.12,
         "logit": 2.61, "sigmoid": 0.93}  # text queries only: exp(t')·cos + b and its sigmoid

    `threshold` keeps hits whose score is at least it (a probability for texts, a cosine for
    images). Images are paths, PIL images, uint8 arrays or the bytes of an encoded file; vectors are
    (D,) or (Q, D) embeddings. Text and image queries load the model (from the manifest, or `model=`)
    on first use; an ImageReadError names an image that cannot be decoded.
    """

    def __init__(self, folder: str | os.PathLike, *, model: str | None = None,
                 device: str | None = None, dtype: str | None = None):
        self.collection = Collection(folder)
        self.folder = self.collection.folder
        self.manifest = self.collection.manifest
        self._model_name = model or self.manifest["model"]
        self._device, self._dtype = device, dtype
        self.max_num_patches: int | None = None  # NaFlex image queries; None: the manifest's
        self._model = self._processor = None
        self._logit = (float(self.manifest["logit_scale"]), float(self.manifest["logit_bias"]))
        self.info: dict | None = None
        self.faiss_index = None
        info = self.folder / INDEX_DIR / INDEX_INFO
        if info.is_file():
            self.info = json.loads(info.read_text())
            if self.info["n"] != len(self.collection):
                raise SearchError(f"{info} covers {self.info['n']} embeddings but the folder holds "
                                  f"{len(self.collection)}: run `siglip-so400m index {self.folder}` again")
            self.faiss_index = _faiss().read_index(str(self.folder / INDEX_DIR / INDEX_FILE))
            _set_search_params(self.faiss_index, self.info)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, model: str | None = None, device: str | None = None,
             dtype: str | None = None) -> Index:
        """Open an embedded folder. model: the checkpoint for text and image queries (default the
        one in manifest.json), loaded on the first such query. dtype: as in embed (default the
        manifest's)."""
        return cls(folder, model=model, device=device, dtype=dtype)

    def __len__(self) -> int:
        return len(self.collection)

    def _load_model(self, tower: str):
        import torch

        from .api import load
        from .weights import resolve

        if self._model is not None and tower in self._model.towers:
            return self._model, self._processor
        revision = self.manifest.get("revision") if self._model_name == self.manifest["model"] else None
        ckpt = resolve(self._model_name, revision=revision)
        precision = self._dtype or self.manifest.get("dtype") or "float32"
        aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        precision = aliases.get(precision, precision)
        towers = tuple({tower, *(self._model.towers if self._model is not None else ())})
        quantize = "int8" if precision == "int8" else None
        self._model, self._processor = load(
            ckpt, dtype=None if quantize else getattr(torch, precision), device=self._device,
            towers=towers, quantize=quantize)
        # t' and b as the checkpoint stores them: every load keeps them in float32.
        self._logit = (self._model.logit_scale.item(), self._model.logit_bias.item())
        return self._model, self._processor

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        model, proc = self._load_model("text")
        with torch.inference_mode():
            x = model.encode_text(proc.texts(list(texts)).to(model.logit_scale.device)).float()
            return F.normalize(x, dim=-1).cpu().numpy()

    def embed_images(self, images: Sequence) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from .image import load_image

        model, proc = self._load_model("vision")
        # Encoded files (an upload to a server) are decoded as files are: EXIF orientation included.
        images = [load_image("<image bytes>", data=bytes(im)) if isinstance(im, (bytes, bytearray)) else im
                  for im in images]
        with torch.inference_mode():
            # NaFlex: queries within the patch budget the collection was embedded with.
            budget = self.max_num_patches or self.manifest.get("max_num_patches")
            pixels = proc.images(list(images), max_num_patches=budget)
            x = model.encode_image(pixels.to(model.logit_scale.device)).float()
            return F.normalize(x, dim=-1).cpu().numpy()

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, ids), (Q, k) each: the index's candidates re-scored exactly, or exact search."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.faiss_index is None or k == 0:
            return exact_topk(self.collection, queries, k)
        _, cand = self.faiss_index.search(queries, min(len(self), k * int(self.info["rerank"])))
        return _rerank(self.collection, queries, cand, k)

    def search(self, texts: Sequence[str] | str | None = None, images: Sequence | None = None,
               k: int = 10, threshold: float | None = None, vectors: np.ndarray | None = None
               ) -> list[list[dict]]:
        """See the class docstring for the result."""
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        images = list(images or []) if isinstance(images, (list, tuple)) else (
            [] if images is None else [images])
        vecs = np.zeros((0, self.collection.dim), np.float32) if vectors is None else \
            np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if k < 1:
            raise ValueError("k must be at least 1")
        groups = []
        if texts:
            groups.append(("text", self.embed_texts(texts)))
        if images:
            groups.append(("image", self.embed_images(images)))
        if len(vecs):
            groups.append(("vector", vecs / np.linalg.norm(vecs, axis=1, keepdims=True)))
        results = []
        scale, bias = (np.float32(v) for v in self._logit)
        for kind, q in groups:
            cos, ids = self.topk(q, k)
            for row_c, row_i in zip(cos, ids, strict=True):
                hits = []
                for c, i in zip(row_c, row_i, strict=True):
                    if i < 0 or not np.isfinite(c):
                        continue
                    meta = self.collection.metadata(int(i))
                    hit = {"id": int(i), "path": _path(meta), "caption": meta.get("caption"),
                           "metadata": meta, "cosine": float(c)}
                    if kind == "text":
                        # float32 throughout: exp(t') * cos + b, then the logistic function.
                        logit = np.exp(scale) * np.float32(c) + bias
                        hit |= {"logit": float(logit), "sigmoid": float(1 / (1 + np.exp(-logit))),
                                "score": float(1 / (1 + np.exp(-logit)))}
                    else:
                        hit["score"] = float(c)
                    if threshold is None or hit["score"] >= threshold:
                        hits.append(hit)
                results.append(hits)
        return results


def _path(meta: dict) -> str:
    return meta["image_path"] if meta.get("image_path") else f"{meta.get('shard')}/{meta.get('key')}"


# --- building the index ---------------------------------------------------------------------

def _parse_bytes(text: str | int | float) -> int:
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


def _set_search_params(index, info: dict) -> None:
    faiss = _faiss()
    if info["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    elif info["kind"] == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = info["ef_search"]


def _memory_needed(kind: str, n: int, d: int, hnsw_m: int, pq_m: int, nlist: int) -> int:
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":  # 8-bit scalar-quantized vectors plus the graph (2M links at layer 0)
        return n * (d + hnsw_m * 2 * 4) + n * 8
    return n * (pq_m + 8) + nlist * d * 4  # codes, ids, centroids


def _pq_m(d: int, budget_per_vector: float) -> int:
    """The most PQ sub-quantizers (bytes per vector) that divide d and fit, between 4 and d // 8
    (8-d sub-spaces: 144 bytes for so400m's 1152, where recall@10 after re-scoring is near exact;
    finer ones cost training time for little)."""
    options = [m for m in range(4, max(4, d // 8) + 1) if d % m == 0 and m <= budget_per_vector]
    return max(options) if options else 4


def build_index(folder: str | os.PathLike, *, max_memory: str | int = "4GB", min_recall: float = 0.9,
                kind: str = "auto", queries: int = 1000, hnsw_m: int = 32, ef_search: int = 128,
                nlist: int | None = None, nprobe: int = 32, pq_m: int | None = None, rerank: int = 4,
                seed: int = 0, log=print) -> dict:
    """Build a faiss inner-product index over the folder's embeddings and save it in folder/index/.

    kind "auto": exact (flat) when its n·D·4 bytes fit in max_memory, else HNSW over 8-bit vectors
    when that fits, else IVF-PQ sized to fit. An approximate index's recall@10 is measured against
    exact search on `queries` held-out embeddings (left out of the training sample; each query's
    own row left out of both answers), through the search path (candidates re-scored exactly), and
    an index below min_recall is not saved. Returns what index.json records."""
    faiss = _faiss()
    coll = Collection(folder)
    n, d = len(coll), coll.dim
    if n == 0:
        raise SearchError(f"{coll.folder} holds no embeddings")
    if kind not in KINDS:
        raise SearchError(f"kind must be one of {', '.join(KINDS)}")
    budget = _parse_bytes(max_memory)
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    pq_m = pq_m or _pq_m(d, max(4, budget / n - 8))
    if kind == "auto":
        kind = next((k for k in ("flat", "hnsw") if _memory_needed(k, n, d, hnsw_m, pq_m, nlist) <= budget),
                    "ivfpq")
    need = _memory_needed(kind, n, d, hnsw_m, pq_m, nlist)
    if need > budget:
        log(f"warning: the {kind} index needs about {need / 2**30:.2f} GiB, over --max-memory")
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(n, size=min(queries, max(1, n // 10)), replace=False))
    t0 = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * hnsw_m)
    else:
        quantizer = faiss.IndexFlatIP(d)
        # 8 bits per code (256 centroids per sub-space) need 256 training vectors; tiny
        # collections get fewer bits.
        pq_bits = max(1, min(8, int(math.log2(max(2, n - len(held))))))
        index = faiss.IndexIVFPQ(quantizer, d, min(nlist, n - len(held)), pq_m, pq_bits,
                                 faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # Train on a sample that leaves out the held-out queries, so recall is measured on vectors
        # the quantizers never saw (as real queries are).
        pool = np.setdiff1d(np.arange(n), held)
        size = min(len(pool), max(256 * 39 if kind == "ivfpq" else 1, nlist * 39, 50_000))
        sample = np.sort(rng.choice(pool, size=size, replace=False))
        index.train(coll.vectors(sample))
    for _, block in coll.blocks():
        index.add(block)
    build_s = time.perf_counter() - t0
    info = {"kind": kind, "n": n, "dim": d, "rerank": rerank, "build_seconds": round(build_s, 3),
            "memory_bytes": need}
    if kind == "hnsw":
        info |= {"hnsw_m": hnsw_m, "ef_search": ef_search}
    if kind == "ivfpq":
        info |= {"nlist": index.nlist, "nprobe": min(nprobe, index.nlist), "pq_m": pq_m,
                 "pq_bits": pq_bits}
    _set_search_params(index, info)
    recall = 1.0
    if kind != "flat":
        recall = measure_recall(coll, index, info, held)
        log(f"recall@10 of the {kind} index on {len(held)} held-out queries: {recall:.4f}")
        if recall < min_recall:
            if kind == "hnsw":
                hint = f"raise --ef-search (now {ef_search}) or --hnsw-m (now {hnsw_m})"
            else:
                hint = (f"raise --nprobe (now {info['nprobe']}), --pq-m (now {pq_m}) or --rerank "
                        f"(now {rerank})")
            raise SearchError(
                f"recall@10 of the {kind} index is {recall:.3f}, below --min-recall {min_recall}; not "
                f"saved. To fix: {hint}, or give --max-memory {math.ceil(n * d * 4 / 2**30 * 10) / 10}GB "
                "for exact search, or lower --min-recall")
    info["recall_at_10"] = round(recall, 4)
    out = coll.folder / INDEX_DIR
    out.mkdir(exist_ok=True)
    tmp = out / f".{INDEX_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)
    (out / f".{INDEX_INFO}.tmp").write_text(json.dumps(info, indent=1) + "\n")
    os.replace(out / f".{INDEX_INFO}.tmp", out / INDEX_INFO)
    return info


def measure_recall(coll: Collection, index, info: dict, held: np.ndarray, k: int = 10) -> float:
    """Mean |approx top-k ∩ exact top-k| / k, each query's own row excluded from both."""
    q = coll.vectors(held)
    _, exact = exact_topk(coll, q, k + 1)
    _, cand = index.search(q, min(len(coll), (k + 1) * info["rerank"]))
    _, approx = _rerank(coll, q, cand, k + 1)
    hits = 0
    for own, e, a in zip(held, exact, approx, strict=True):
        e_set = [i for i in e if i != own][:k]
        a_set = [i for i in a if i != own][:k]
        hits += len(set(e_set) & set(a_set))
    return hits / (k * len(held))


# --- dedup ----------------------------------------------------------------------------------

def dedup(index: Index, threshold: float, neighbours: int = 16) -> list[list[dict]]:
    """Groups (of 2 or more) of images joined by cosine >= threshold, through each image's
    `neighbours` nearest: a union-find over the pairs. Each group is sorted by id, each member
    {"id", "path", "caption", "cosine"} with its cosine to the group's first member."""
    coll = index.collection
    parent = list(range(len(coll)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for first, block in coll.blocks(rows=4096):
        cos, ids = index.topk(block, neighbours + 1)
        for r in range(len(block)):
            for c, j in zip(cos[r], ids[r], strict=True):
                if j >= 0 and j != first + r and c >= threshold:
                    a, b = find(first + r), find(int(j))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(coll)):
        groups.setdefault(find(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) > 1:
            vecs = coll.vectors(np.array(members))
            cos = vecs @ vecs[0]
            out.append([{"id": m, "path": _path(coll.metadata(m)), "caption": coll.metadata(m).get("caption"),
                         "cosine": round(float(c), 6)} for m, c in zip(members, cos, strict=True)])
    return sorted(out, key=lambda g: g[0]["id"])


# --- command line ---------------------------------------------------------------------------

def index_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Build a faiss index over an embedded folder: "
                                "exact below --max-memory, else approximate with its recall@10 measured.")
    p.add_argument("folder", metavar="DIR", help="the --output of `siglip-so400m embed`")
    p.add_argument("--max-memory", default="4GB", help="memory the index may take (default: 4GB)")
    p.add_argument("--min-recall", type=float, default=0.9, help="refuse an approximate index whose "
                   "recall@10 is lower (default: 0.9)")
    p.add_argument("--kind", choices=KINDS, default="auto", help="force an index type (default: auto)")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall (default: 1000)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node (default: 32)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth (default: 128)")
    p.add_argument("--nlist", type=int, help="IVF cells (default: about 4·sqrt(n))")
    p.add_argument("--nprobe", type=int, default=32, help="IVF cells visited per query (default: 32)")
    p.add_argument("--pq-m", type=int, help="PQ bytes per vector (default: the most that fit)")
    p.add_argument("--rerank", type=int, default=4, help="candidates per result re-scored exactly "
                   "(default: 4)")
    a = p.parse_args(argv)
    try:
        info = build_index(a.folder, max_memory=a.max_memory, min_recall=a.min_recall, kind=a.kind,
                           queries=a.queries, hnsw_m=a.hnsw_m, ef_search=a.ef_search, nlist=a.nlist,
                           nprobe=a.nprobe, pq_m=a.pq_m, rerank=a.rerank,
                           log=lambda m: print(m, file=sys.stderr))
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info))
    return 0


def search_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Search an embedded folder by text (scored with "
                                "SigLIP's sigmoid probability) or by image (cosine).")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="text queries")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image query "
                   "(repeatable)")
    p.add_argument("--top-k", type=int, default=10, metavar="K")
    p.add_argument("--threshold", type=float, metavar="P", help="only hits scoring at least P (a "
                   "probability for text, a cosine for images)")
    p.add_argument("--json", action="store_true", help="one JSON list of per-query results")
    p.add_argument("--model", help="the checkpoint for queries (default: the one in manifest.json)")
    p.add_argument("--dtype", help="as in embed (default: the manifest's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--max-num-patches", type=int, metavar="N", help="SigLIP 2 NaFlex image queries "
                   "within N patches (default: what the collection was embedded with)")
    a = p.parse_args(argv)
    if not a.texts and not a.image:
        p.error("give a TEXT query or --image FILE")
    if a.top_k < 1:
        p.error("--top-k must be at least 1")
    from .image import ImageReadError

    try:
        index = Index.load(a.folder, model=a.model, device=a.device, dtype=a.dtype)
        index.max_num_patches = a.max_num_patches
        results = index.search(texts=a.texts, images=a.image, k=a.top_k, threshold=a.threshold)
    except (SearchError, ValueError, ImageReadError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    queries = [{"text": t} for t in a.texts] + [{"image": i} for i in a.image]
    if a.json:
        print(json.dumps([{"query": q, "hits": h} for q, h in zip(queries, results, strict=True)],
                         indent=1, ensure_ascii=False, default=str))
        return 0
    for q, hits in zip(queries, results, strict=True):
        print(f"{'text' if 'text' in q else 'image'}: {q.get('text') or q.get('image')}")
        if not hits:
            print("  (no hit" + (f" scoring at least {a.threshold})" if a.threshold is not None else ")"))
        for h in hits:
            value = f"{h['score']:8.2%}" if "sigmoid" in h else f"{h['score']:8.4f}"
            print(f"  {value}  {h['path']}" + (f"  ({h['caption']})" if h["caption"] else ""))
    if a.texts:
        print("(text: SigLIP's sigmoid probability that the image matches; image: cosine)")
    return 0


def dedup_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Groups of near-duplicate images in an embedded "
                                "folder (through its index if built, else exact).")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--threshold", type=float, required=True, metavar="COS", help="join images whose "
                   "embeddings have at least this cosine (e.g. 0.95)")
    p.add_argument("--neighbours", type=int, default=16, help="neighbours looked at per image (default: 16)")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    a = p.parse_args(argv)
    try:
        groups = dedup(Index.load(a.folder), a.threshold, a.neighbours)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.format == "json":
        print(json.dumps([{"group": g, "members": m} for g, m in enumerate(groups)], indent=1,
                         ensure_ascii=False))
    else:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["group", "id", "path", "caption", "cosine"])
        for g, members in enumerate(groups):
            for m in members:
                w.writerow([g, m["id"], m["path"], m["caption"] or "", m["cosine"]])
    print(f"{len(groups)} groups, {sum(len(g) for g in groups)} images", file=sys.stderr)
    return 0
