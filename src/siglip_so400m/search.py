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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .collection import (
    INDEX_DIR,
    INDEX_FILE,
    INDEX_INFO,
    Collection,
    CollectionError,
    parts_record,
    shard_dirs,
)
from .errors import RecordMismatch, SiglipError, UsageError
from .modelspec import add_model_arguments

# A folder that cannot be searched or indexed: the collection's own error (the message says what to
# change), under the name the search job has always raised.
SearchError = CollectionError


class StaleIndex(CollectionError, RecordMismatch):
    """An index built over other parts than the folder holds now: rebuild it (exit 2)."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("building and using a faiss index needs faiss: pip install "
                          "'siglip_so400m[search]'") from None
    return faiss


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
    for s in range(0, len(queries), 64):  # (64, C, D) rows at a time at most
        c = cand[s : s + 64]
        valid = c >= 0
        rows = np.zeros((*c.shape, coll.dim), np.float32)  # (q, C, D)
        rows[valid] = coll.vectors(c[valid])
        scores[s : s + 64] = np.where(valid, np.matmul(rows, queries[s : s + 64, :, None])[..., 0], -np.inf)
    order = np.lexsort((cand, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)


class Index:
    """A searchable embedded collection: embed's output folder, with the faiss index that
    `siglip-so400m index` built there if any (exact search without one).

    `search(texts=[...], images=[...], vectors=None, k=10, threshold=None)` returns one list per
    query, texts first, then images, then vectors, each list best first (at most k), each hit a dict:

        {"id": 1234,                      # row over all parts (part order, then row order)
         "path": "photos/cat.jpg",        # image_path: "shard.tar/key.jpg" for webdataset input
         "caption": "a cat" | None,
         "metadata": {...},               # the whole metadata row (image_path, shard, key, caption,
                                          #   width, height, and a shard's json fields: url, ...)
         "score": 0.93,                   # text: the sigmoid; image/vector: the cosine
         "cosine": 0.12,
         "logit": 2.61, "sigmoid": 0.93}  # text queries only: exp(t')·cos + b and its sigmoid

    `threshold` keeps hits whose score is at least it (a probability for texts, a cosine for
    images). Images are paths, PIL images, uint8 arrays or the bytes of an encoded file; vectors are
    (D,) or (Q, D) embeddings. Text and image queries load the model (from the manifest, or `model=`)
    on first use; an ImageReadError names an image that cannot be decoded.
    """

    def __init__(self, folder: str | os.PathLike, *, model: str | None = None,
                 device: str | None = None, dtype: str | None = None, revision: str | None = None):
        self.collection = Collection(folder)
        self.folder = self.collection.folder
        self.manifest = self.collection.manifest
        self._model_name = model or self.manifest["model"]
        self._device, self._dtype, self._revision = device, dtype, revision
        self.max_num_patches: int | None = None  # NaFlex image queries; None: the manifest's
        self._model = self._processor = None
        # t' and b: from the manifest, or (clip-retrieval's layout) from the model once loaded.
        self._logit = None if self.manifest["logit_scale"] is None else (
            float(self.manifest["logit_scale"]), float(self.manifest["logit_bias"]))
        self.info: dict | None = None
        self.faiss_index = None
        self.shards: list[tuple[Any, dict, Collection]] = []  # per-rank indexes searched together
        info = self.folder / INDEX_DIR / INDEX_INFO
        if info.is_file():
            self.info = self._open(info, self.collection)
            self.faiss_index = _faiss().read_index(str(self.folder / INDEX_DIR / INDEX_FILE))
            _set_search_params(self.faiss_index, self.info)
        elif shard_dirs(self.folder):
            dirs = shard_dirs(self.folder)
            w = int(dirs[0].name.rpartition("-of-")[2])
            names = [d.name for d in dirs]
            missing = [f"shard-{r}-of-{w}" for r in range(w) if f"shard-{r}-of-{w}" not in names]
            if missing or len(dirs) != w:
                raise SearchError(f"{self.folder / INDEX_DIR} holds {', '.join(names)}: missing "
                                  f"{', '.join(missing) or 'none'}, or shards of another count; build every "
                                  f"shard with `siglip-so400m index {self.folder} --shard R/{w}`")
            for r in range(w):
                d = self.folder / INDEX_DIR / f"shard-{r}-of-{w}"
                sub = Collection(self.folder, shard=(r, w))
                sinfo = self._open(d / INDEX_INFO, sub)
                index = _faiss().read_index(str(d / INDEX_FILE))
                _set_search_params(index, sinfo)
                self.shards.append((index, sinfo, sub))
            self.info = {"kind": "shards", "shards": [s[1] for s in self.shards]}

    def _open(self, info: Path, coll: Collection) -> dict:
        data = json.loads(info.read_text())
        if data["n"] != len(coll):
            raise StaleIndex(f"{info} covers {data['n']} embeddings but the folder holds "
                              f"{len(coll)}: run `siglip-so400m index {self.folder}` again")
        # Row ids are positions in the parts' name order: the same count over renamed parts (an
        # embed run that padded old part numbers) would point every id at another image.
        now = parts_record(self.folder)
        if data.get("parts") is None:
            raise StaleIndex(f"{info} does not record which parts it was built over (an index made "
                              "before indexes recorded them), so its row ids cannot be checked against "
                              f"img_emb/: run `siglip-so400m index {self.folder}` again")
        if data["parts"] != now:
            was = {n: r for n, r in data["parts"]}
            diff = [f"{n} ({r} rows) not indexed" for n, r in now if was.get(n) != r][:3] + \
                   [f"{n} indexed but gone" for n in was if n not in dict(now)][:3]
            raise StaleIndex(f"{info} was built over other img_emb/ parts than the folder holds now ("
                              + ", ".join(diff) + f"): its row ids would point at other images; run "
                              f"`siglip-so400m index {self.folder}` again")
        if data.get("row_order") != "name" and not coll.name_order_is_part_order:
            # Built when ids followed part numbers, which unpadded names sort apart from.
            raise StaleIndex(f"{info} was built with row ids in part-number order, which the "
                              f"file names here do not sort in: run `siglip-so400m index {self.folder}` "
                              "again")
        return data

    @classmethod
    def load(cls, folder: str | os.PathLike, *, model: str | None = None, device: str | None = None,
             dtype: str | None = None, revision: str | None = None) -> Index:
        """Open an embedded folder. model: the checkpoint for text and image queries (default the
        one in manifest.json), loaded on the first such query. dtype: as in embed (default the
        manifest's)."""
        return cls(folder, model=model, device=device, dtype=dtype, revision=revision)

    def __len__(self) -> int:
        return len(self.collection)

    def _load_model(self, tower: str):
        from .modelspec import (
            QUERY_FIELDS,
            ModelSpec,
            as_eager,
            check_record,
            computed_with,
            fixed_size,
            stored_record,
        )
        from .weights import resolve

        if self._model is not None and tower in self._model.towers:
            return self._model, self._processor
        if self._model_name is None:
            raise SearchError(f"{self.folder} has no manifest.json naming its model (clip-retrieval's "
                              "layout): give the checkpoint that embedded it for text and image queries "
                              "(--model, or Index.load(..., model=...))")
        m = self.manifest
        revision = self._revision or (m.get("revision") if self._model_name == m["model"] else None)
        towers = tuple({tower, *(self._model.towers if self._model is not None else ())})
        ckpt = resolve(self._model_name, revision=revision, towers=towers)
        # Queries in the collection's own precision, image size and patch budget unless told
        # otherwise; told otherwise, the record check below refuses what would not match.
        stored = as_eager(stored_record(m, ckpt)) if m.get("model") is not None else dict(m)
        dtype = self._dtype if self._dtype not in (None, "auto") else stored.get("dtype") or "float32"
        naflex = ckpt.config.vision_config.naflex
        budget = self.max_num_patches if self.max_num_patches is not None else \
            stored.get("max_num_patches") if naflex else None
        run = ModelSpec(model=self._model_name, revision=revision, dtype=dtype,
                        device=str(self._device or "auto"), image_size=fixed_size(stored, ckpt),
                        max_num_patches=budget).resolve()
        processor = run.processor(ckpt)
        if m.get("model") is not None:
            # A query embedded by another checkpoint, precision, size or budget lives in another
            # space than the collection's rows: every hit would be wrong without a word.
            check_record(stored, computed_with(ckpt, processor, run.precision), str(self.folder),
                         fields=QUERY_FIELDS,
                         advice="query it with the model and settings that embedded it (leave --model, "
                                "--dtype and --max-num-patches out to take them from its manifest.json)")
        self._model, self._processor = run.open(towers, ckpt=ckpt)
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
            pixels = proc.images(list(images))  # NaFlex: within the budget checked in _load_model
            x = model.encode_image(pixels.to(model.logit_scale.device)).float()
            return F.normalize(x, dim=-1).cpu().numpy()

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines, ids), (Q, k) each: the index's candidates re-scored exactly, or exact search."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if k == 0 or (self.faiss_index is None and not self.shards):
            return exact_topk(self.collection, queries, k)
        if self.shards:
            # Each shard's candidates (its own k·rerank, by its own tuned parameters) in global ids,
            # merged and re-scored exactly: the merged top-k is the best k of their union.
            cand = np.hstack([sub.global_ids(index.search(queries, min(len(sub), k * int(info["rerank"])))[1])
                              for index, info, sub in self.shards])
            return _rerank(self.collection, queries, cand, k)
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
        _check_threshold(threshold, bool(texts))
        if any(not t.strip() for t in texts):
            raise ValueError("an empty text query: give the words to search for")
        if vecs.shape[1] != self.collection.dim:
            raise ValueError(f"the query vectors have {vecs.shape[1]} values each, the embeddings of "
                             f"{self.folder} {self.collection.dim}: give (D,) or (Q, D) vectors with "
                             f"D = {self.collection.dim}")
        groups = []
        if texts:
            groups.append(("text", self.embed_texts(texts)))
        if images:
            groups.append(("image", self.embed_images(images)))
        if len(vecs):
            groups.append(("vector", vecs / np.linalg.norm(vecs, axis=1, keepdims=True)))
        results = []
        for kind, q in groups:
            cos, ids = self.topk(q, k)
            for row_c, row_i in zip(cos, ids, strict=True):
                hits = []
                for c, i in zip(row_c, row_i, strict=True):
                    if i < 0 or not np.isfinite(c):
                        continue
                    meta = self.collection.metadata(int(i))
                    hits.append({"id": int(i), "path": _path(meta), "caption": meta.get("caption"),
                                 "metadata": meta, "cosine": float(c), "score": float(c)})
                if kind == "text":
                    self.score_text_hits(hits)
                results.append([h for h in hits if threshold is None or h["score"] >= threshold])
        return results

    def score_text_hits(self, hits: list[dict]) -> list[dict]:
        """Give a text query's hits SigLIP's logit and sigmoid (which becomes the score), from their
        cosines and the checkpoint's t' and b: the one scoring of text hits, the server's too."""
        import torch

        from .model import match_logits

        if hits:
            # t' and b: set by the manifest, or by loading the model for a text query (a
            # clip-retrieval folder has no manifest values).
            logits = match_logits(torch.tensor([h["cosine"] for h in hits], dtype=torch.float32),
                                  *(self._logit or (0.0, 0.0)))
            for hit, logit, p in zip(hits, logits.tolist(), logits.sigmoid().tolist(), strict=True):
                hit |= {"logit": logit, "sigmoid": p, "score": p}
        return hits


def _check_threshold(threshold: float | None, texts: bool) -> None:
    """A text hit's score is a probability, an image hit's a cosine: a threshold outside their
    range would silently keep every hit or none."""
    lo = 0.0 if texts else -1.0
    if threshold is not None and not lo <= threshold <= 1:
        raise ValueError(f"threshold {threshold}: " + ("text queries are scored by a probability, between 0 "
                         "and 1" if texts else "image queries are scored by a cosine, between -1 and 1"))


def _path(meta: dict) -> str:
    return meta["image_path"] if meta.get("image_path") else f"{meta.get('shard')}/{meta.get('key')}"


# --- the index built by `siglip-so400m index` (index_tuning.py) --------------------------------

def _set_search_params(index, info: dict) -> None:
    faiss = _faiss()
    if info["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    elif info["kind"] == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = info["ef_search"]


# --- dedup ----------------------------------------------------------------------------------

def dedup(index: Index, threshold: float, neighbours: int = 16) -> list[list[dict]]:
    """Groups (of 2 or more) of images joined by cosine >= threshold, through each image's
    `neighbours` nearest: a union-find over the pairs. Each group is sorted by id, each member
    {"id", "path", "caption", "cosine"} with its cosine to the group's first member."""
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold {threshold}: a cosine, between -1 and 1 (e.g. 0.95)")
    if neighbours < 1:
        raise ValueError(f"neighbours {neighbours}: at least 1 neighbour per image is looked at")
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
            # Unit vectors stored in float16 are not quite unit: a copy's cosine can come out as
            # 1.000124. A cosine is at most 1.
            cos = np.clip(vecs @ vecs[0], -1.0, 1.0)
            out.append([{"id": m, "path": _path(coll.metadata(m)), "caption": coll.metadata(m).get("caption"),
                         "cosine": round(float(c), 6)} for m, c in zip(members, cos, strict=True)])
    return sorted(out, key=lambda g: g[0]["id"])


def fold_duplicates(coll: Collection, hits: list[dict], threshold: float) -> list[dict]:
    """dedup's test along a ranked list: a hit whose embedding has cosine >= threshold with a better
    hit that is not itself a duplicate gets `duplicate_of`, the first such hit's id (the others get
    None). The order stays; a reader shows each group under its best hit."""
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold {threshold}: a cosine, between -1 and 1 (e.g. 0.95)")
    vecs = coll.vectors(np.array([h["id"] for h in hits], dtype=np.int64))  # (n, D)
    leaders: list[int] = []  # positions of the hits that start a group
    for n, hit in enumerate(hits):
        close = [m for m in leaders if float(vecs[m] @ vecs[n]) >= threshold]
        hit["duplicate_of"] = hits[close[0]]["id"] if close else None
        if not close:
            leaders.append(n)
    return hits


# --- command line ---------------------------------------------------------------------------

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
    add_model_arguments(p.add_argument_group("model"), from_record=True)
    a = p.parse_args(argv)
    if not a.texts and not a.image:
        p.error("give a TEXT query or --image FILE")
    if a.top_k < 1:
        p.error("--top-k must be at least 1")
    if any(not t.strip() for t in a.texts):
        p.error("an empty TEXT query: give the words to search for")
    try:
        _check_threshold(a.threshold, bool(a.texts))
    except ValueError as e:
        p.error(f"--{e}")
    from .image import ImageReadError

    for flag, value in (("--threads", a.threads), ("--max-num-patches", a.max_num_patches)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    try:
        index = Index.load(a.folder, model=a.model, device=a.device, dtype=a.dtype, revision=a.revision)
        index.max_num_patches = a.max_num_patches
        results = index.search(texts=a.texts, images=a.image, k=a.top_k, threshold=a.threshold)
    except UsageError as e:
        p.error(str(e))
    except (SiglipError, ValueError, ImageReadError) as e:
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
    if not -1 <= a.threshold <= 1:
        p.error(f"--threshold {a.threshold}: a cosine, between -1 and 1 (e.g. 0.95)")
    if a.neighbours < 1:
        p.error("--neighbours must be at least 1")
    try:
        groups = dedup(Index.load(a.folder), a.threshold, a.neighbours)
    except UsageError as e:
        p.error(str(e))
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
