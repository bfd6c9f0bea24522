"""An embedded collection on disk: the one module that knows the layout `siglip-so400m embed` writes
(clip-retrieval's, so autofaiss and embedding-reader read it too). embed writes it through here;
search, index, dedup, eval and the server read it through here.

    DIR/img_emb/img_emb_{i:06d}.npy        float16 (n_i, D), L2-normalised, one row per readable image
    DIR/metadata/metadata_{i:06d}.parquet  n_i rows, row-aligned: image_path, shard, key, caption, w, h
                                           (+ a shard's json fields: url, ...)
    DIR/text_emb/text_emb_{i:06d}.npy      float16 (n_i, D) caption embeddings (embed --captions)
    DIR/errors/errors_{i:06d}.parquet      the images of part i that could not be read, with the error
    DIR/manifest.json                      what the embeddings were computed with (the record:
                                           model, weights, dtype, backend, image size or patch budget),
                                           t' and b, part naming, counts
    DIR/index/knn.index, index.json        the faiss index (`siglip-so400m index`) and the parts it
                                           covers; or index/shard-R-of-W/ for one per rank

Part numbers are zero-padded (manifest["part_digits"] digits) because embedding-reader and autofaiss
read the files in name order: unpadded, part 10 would sort before part 2 and their ids would point at
other images than ours. Folders written before the padding are renamed when a rerun continues them;
an index records the parts it was built over, so one built before such a rename is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SiglipError
from .faults import kill_point
from .weights import atomic_write

MANIFEST = "manifest.json"
FORMAT = "siglip_so400m.embed/1"
# The width of part numbers in file names: 10**6 parts, ten billion images at the default part
# size (a billion need 10**5); a run with more parts gets wider numbers.
PART_DIGITS = 6
INDEX_DIR = "index"
INDEX_FILE = "knn.index"
INDEX_INFO = "index.json"


class CollectionError(SiglipError, RuntimeError):
    """A folder that cannot be searched or indexed; the message says what to change."""


def pyarrow_modules():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CollectionError("writing parquet metadata needs pyarrow: pip install 'siglip_so400m[embed]'"
                         ) from None
    return pa, pq


def parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CollectionError("reading the metadata needs pyarrow: pip install 'siglip_so400m[search]'"
                              ) from None
    return pq


# --- writing (embed) ---------------------------------------------------------------------------

def part_digits(parts: int) -> int:
    """The width of the part numbers in file names: the same for every part of a run, so that name
    order (what embedding-reader and autofaiss read in) is part order."""
    return max(PART_DIGITS, len(str(max(parts - 1, 0))))


KINDS = (("text_emb", "npy"), ("errors", "parquet"), ("img_emb", "npy"),
          ("metadata", "parquet"))  # metadata renamed last: its presence marks the part done


def part_paths(out: Path, i: int, captions: bool, digits: int) -> dict[str, Path]:
    """A part's files; digits=0 gives the unpadded names of folders written before the padding."""
    return {kind: out / kind / f"{kind}_{str(i).zfill(digits)}.{ext}" for kind, ext in KINDS
            if captions or kind != "text_emb"}


def pad_old_names(out: Path, parts: Iterable[int], captions: bool, digits: int) -> None:
    """Rename an unpadded folder's part files to the padded names, metadata last as when written,
    so that a kill half-way leaves each part done under one name or redone."""
    for i in parts:
        for old, new in zip(part_paths(out, i, captions, 0).values(),
                            part_paths(out, i, captions, digits).values(), strict=True):
            if old != new and old.is_file() and not new.exists():
                os.replace(old, new)


def part_done(out: Path, i: int, captions: bool, digits: int) -> bool:
    return all(p.is_file() for p in part_paths(out, i, captions, digits).values())


SCHEMA_FIELDS = (("image_path", "string"), ("shard", "string"), ("key", "string"),
                  ("caption", "string"), ("width", "int32"), ("height", "int32"))


def table(rows: list[dict], extra: tuple[tuple[str, str], ...] = ()):
    """Our columns, then the shards' json fields (row["json"]) in the order first seen, as
    clip-retrieval copies them; a json field named like one of ours (key, caption, width, ...)
    is left out, ours holding the same thing."""
    pa, _ = pyarrow_modules()
    fields = [pa.field(n, getattr(pa, t)()) for n, t in (*SCHEMA_FIELDS, *extra)]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))  # takes only the schema's keys
    ours = set(table.column_names) | {"json"}
    for name in dict.fromkeys(k for r in rows for k in r.get("json", {}) if k not in ours):
        values = [r.get("json", {}).get(name) for r in rows]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # mixed types across samples
            column = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
        table = table.append_column(name, column)
    return table


def write_part(out: Path, i: int, captions: bool, digits: int, emb: np.ndarray, txt: np.ndarray | None,
                meta: list[dict], errors: list[dict], commit_no: int) -> None:
    _, pq = pyarrow_modules()
    files = part_paths(out, i, captions, digits)
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    # Plain writes, no statistics or timestamps that vary: the bytes depend on the rows alone.
    # Each file is fsync'd before its rename, in the order of `files`, metadata last: after a
    # power cut a part that looks done has all its bytes.
    writers = {"text_emb": lambda p: save_npy(p, txt), "img_emb": lambda p: save_npy(p, emb),
               "errors": lambda p: pq.write_table(table(errors, (("position", "int64"),
                                                                  ("error", "string"))), p),
               "metadata": lambda p: pq.write_table(table(meta), p)}
    for n, (kind, path) in enumerate(files.items()):
        atomic_write(path, writers[kind])
        if n == 0:
            kill_point("IN_COMMIT", commit_no)


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
        np.save(f, array)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1) + "\n"))


def write_synthetic(out: str | os.PathLike, parts: Iterable[np.ndarray],
                    logit_scale: float = math.log(10), logit_bias: float = -10.0) -> Path:
    """An embed-shaped folder of given unit vectors, one (n_i, D) array per part, with made-up paths
    and no model: for index benchmarks and tests, which need collections larger than anyone would
    embed for them. Parts are written one at a time, so a million rows never sit in memory."""
    out = Path(out)
    # A generator's length is unknown until its end: the default width, which holds 10**6 parts.
    digits = part_digits(len(parts)) if isinstance(parts, Sized) else PART_DIGITS
    n, D, i = 0, 0, -1
    for i, vectors in enumerate(parts):
        if len(str(i)) > digits:
            raise ValueError(f"more than {10**digits} parts from a generator: pass a list")
        D = vectors.shape[1]
        meta = [{"image_path": f"synthetic/{j:09d}.jpg", "width": 1, "height": 1}
                for j in range(n, n + len(vectors))]
        write_part(out, i, False, digits, np.ascontiguousarray(vectors, np.float16), None, meta, [], 0)
        n += len(vectors)
    write_json(out / MANIFEST, {"format": FORMAT, "model": None, "dtype": "float16",
                                  "embedding_dim": D, "captions": False, "parts": i + 1,
                                  "part_digits": digits,
                                  "logit_scale": logit_scale, "logit_bias": logit_bias,
                                  "complete": True, "counts": {"images": n, "errors": 0}})
    return out


# --- reading (search, index, dedup, eval, the server) ---------------------------------------

def part_files(folder: Path, kind: str = "img_emb") -> list[Path]:
    """`folder/kind/kind_*.npy` in file-name order, the order embedding-reader and autofaiss read
    them in (and so the order of our row ids): zero-padded names sort as their numbers do;
    unpadded ones (older embed runs, clip-retrieval below 10 parts) sort 0, 1, 10, 11, ..., 2."""
    return sorted((folder / kind).glob(f"{kind}_*.npy"), key=lambda p: p.name)


def parts_record(folder: Path) -> list[list]:
    """[[file name, rows], ...] of img_emb/ in name order: what an index's row ids point into. An
    index records it and is refused once it changes (parts renamed, added or rewritten)."""
    return [[p.name, int(np.load(p, mmap_mode="r").shape[0])] for p in part_files(folder)]


def shard_dirs(folder: Path) -> list[Path]:
    """index/shard-R-of-W folders (`siglip-so400m index --shard R/W`), in shard order."""
    found = [d for d in (folder / INDEX_DIR).glob("shard-*-of-*") if (d / INDEX_INFO).is_file()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def _name_order_is_part_order(files: list[Path]) -> bool:
    numbers = [p.stem.rpartition("_")[2] for p in files]
    return all(n.isdigit() for n in numbers) and [int(n) for n in numbers] == sorted(int(n) for n in numbers)


class Collection:
    """embed's output, or clip-retrieval's (no manifest.json), read back: the parts' embeddings
    (memory-mapped float16 or float32) in file-name order, and their row-aligned metadata.

    Metadata rows are read from the parquet parts through Arrow, one row group at a time, and kept
    in an LRU cache of Arrow tables bounded by `metadata_cache_bytes`: a server answering hits from
    every part holds at most that much, never whole parts as Python dicts."""

    def __init__(self, folder: str | os.PathLike, metadata_cache_bytes: int = 64 * 2**20,
                 shard: tuple[int, int] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CollectionError(f"{self.folder}: no such folder" if not self.folder.exists() else
                                  f"{self.folder} is a file: give the folder that `siglip-so400m embed` "
                                  "wrote")
        path = self.folder / "manifest.json"
        files = part_files(self.folder)
        if path.is_file():
            self.manifest = json.loads(path.read_text())
            if not self.manifest.get("complete"):
                raise CollectionError(f"{self.folder}: the embed run is not complete; run the same embed "
                                      "command again to finish it")
            if len(files) != self.manifest["parts"]:
                raise CollectionError(f"{self.folder}: manifest.json lists {self.manifest['parts']} parts "
                                      f"but img_emb/ holds {len(files)} img_emb_*.npy files")
        elif files:
            self.manifest = None  # clip-retrieval's layout: filled in below from what the files say
        else:
            raise CollectionError(f"{self.folder} has neither manifest.json nor img_emb/img_emb_*.npy: is it "
                                  "the --output of `siglip-so400m embed` (or of clip-retrieval inference)?")
        self.shard = shard
        if shard is not None:
            # Shard r of w: the parts at positions r, r + w, ... in name order, as rank r of w
            # embedded them (embed's part i goes to rank i % w); rows keep their global ids.
            r, w = shard
            if not 0 <= r < w:
                raise CollectionError(f"shard {r}/{w}: give R/W with 0 <= R < W")
            sizes = [np.load(p, mmap_mode="r").shape[0] for p in files]
            self.global_starts = np.cumsum([0, *sizes])[:-1][r::w]
            files = files[r::w]
        self.files = files
        self.parts = [np.load(p, mmap_mode="r") for p in files]
        for p, a in zip(files, self.parts, strict=True):
            if a.ndim != 2 or a.dtype not in (np.float16, np.float32):
                raise CollectionError(f"{p}: expected a 2-d float16 or float32 array, found {a.dtype} "
                                      f"{a.shape}")
        dims = {a.shape[1] for a in self.parts}
        if len(dims) > 1:
            raise CollectionError(f"{self.folder}/img_emb: parts of different widths {sorted(dims)}")
        self.meta_files = [self.folder / "metadata" / f"metadata_{p.stem.removeprefix('img_emb_')}.parquet"
                           for p in files]
        missing = [m for m in self.meta_files if not m.is_file()]
        if missing:
            raise CollectionError(f"{missing[0]} is missing: every img_emb_X.npy needs its row-aligned "
                                  "metadata_X.parquet")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])  # global row -> part
        self.dim = int(dims.pop()) if dims else int((self.manifest or {}).get("embedding_dim", 0))
        self.name_order_is_part_order = _name_order_is_part_order(files)
        if self.manifest is None:
            # What is known of a folder someone else embedded: the model stays unknown (text and
            # image queries need --model), and so do t' and b until that model is loaded.
            self.manifest = {"format": "clip-retrieval", "model": None, "revision": None,
                             "dtype": None, "storage_dtype": str(self.parts[0].dtype),
                             "embedding_dim": self.dim,
                             "parts": len(files), "logit_scale": None, "logit_bias": None,
                             "complete": True, "counts": {"images": len(self), "errors": None}}
        self.metadata_cache_bytes = metadata_cache_bytes
        self._meta: OrderedDict[tuple[int, int], Any] = OrderedDict()  # (part, row group) -> Arrow table
        self._meta_bytes = 0
        self._row_groups: dict[int, np.ndarray] = {}  # part -> first row of each row group

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def part_file(self, kind: str, i: int) -> Path:
        """Part i's file of `kind` (img_emb, metadata, text_emb, errors), named as its img_emb file is
        (padded or not)."""
        ext = "npy" if kind.endswith("_emb") else "parquet"
        return self.folder / kind / f"{kind}_{self.files[i].stem.removeprefix('img_emb_')}.{ext}"

    def global_ids(self, ids: np.ndarray) -> np.ndarray:
        """A shard's row ids -> the whole collection's (-1 stays -1)."""
        if self.shard is None:
            return ids
        part = np.clip(np.searchsorted(self.offsets, ids, side="right") - 1, 0, len(self.parts) - 1)
        return np.where(ids >= 0, self.global_starts[part] + ids - self.offsets[part], -1)

    def blocks(self, rows: int = 65536):
        """(first row, float32 block) over all embeddings, a bounded block at a time."""
        for i, part in enumerate(self.parts):
            for s in range(0, len(part), rows):
                yield int(self.offsets[i]) + s, np.asarray(part[s : s + rows], dtype=np.float32)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32 rows by global id."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        where = np.searchsorted(self.offsets, ids, side="right") - 1
        for part in np.unique(where):
            sel = where == part
            out[sel] = self.parts[part][ids[sel] - self.offsets[part]]
        return out

    def metadata(self, i: int) -> dict:
        """Row i's metadata as a dict, read through the bounded cache of row groups."""
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = i - int(self.offsets[part])
        if part not in self._row_groups:
            md = parquet().ParquetFile(self.meta_files[part]).metadata
            self._row_groups[part] = np.cumsum([0] + [md.row_group(g).num_rows
                                                      for g in range(md.num_row_groups)])
        starts = self._row_groups[part]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        key = (part, group)
        table = self._meta.get(key)
        if table is None:
            table = parquet().ParquetFile(self.meta_files[part]).read_row_group(group)
            self._meta[key] = table
            self._meta_bytes += table.nbytes
            # Evict least recently used groups, but keep the one just read even if it alone is larger.
            while self._meta_bytes > self.metadata_cache_bytes and len(self._meta) > 1:
                _, old = self._meta.popitem(last=False)
                self._meta_bytes -= old.nbytes
        else:
            self._meta.move_to_end(key)
        rec = table.slice(row - int(starts[group]), 1).to_pylist()[0]
        return {k: v for k, v in rec.items() if not k.startswith("__index_level_")}  # pandas' index

    def metadata_cache(self) -> dict:
        """What the metadata cache holds now: {"groups", "rows", "bytes"}."""
        return {"groups": len(self._meta), "rows": sum(t.num_rows for t in self._meta.values()),
                "bytes": self._meta_bytes}
