"""Image inputs as the jobs that read collections take them: folders, image files, glob patterns,
.txt/.csv/.parquet lists of paths (with an optional caption column) and webdataset .tar shards, each
image an Item, decoded in DataLoader worker processes (Decode). embed and eval read their images
through here."""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .image import IMAGE_COLUMNS, IMAGE_SUFFIXES, ImageReadError, list_columns, load_image

LIST_SUFFIXES = (".txt", ".csv", ".parquet")


class InputError(UsageError):
    """An input that names something wrong (a missing file, a list of no images): found before
    anything is written."""


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("reading a .parquet list needs pyarrow: pip install 'siglip_so400m[embed]'"
                         ) from None
    return pq


@dataclass(frozen=True)
class Item:
    """One image to embed: a file (`path`), or sample `key` of a webdataset tar `shard`, whose
    image bytes lie at `offset` (`size` bytes), its caption in the .txt member and img2dataset's
    fields (url, ...) in the .json one."""

    path: str | None = None
    shard: str | None = None
    key: str | None = None
    offset: int = 0
    size: int = 0
    caption: str | None = None
    txt: tuple[int, int] | None = None  # (offset, size) of the .txt member in a shard
    json: tuple[int, int] | None = None  # (offset, size) of img2dataset's {key}.json (url, ...)
    member: str | None = None  # the image member's name in the shard ("000000001.jpg")
    error: str | None = None  # known before decoding: a shard that cannot be read, a missing member


def expand_inputs(specs: Sequence[str | os.PathLike], recursive: bool = False
                  ) -> tuple[list[Item], list[str]]:
    """Files to embed (in a fixed order) and webdataset shards, from folders, globs, lists and tars."""
    import glob

    files: list[Item] = []
    shards: list[str] = []

    def add(path: Path, given: str) -> None:
        suffix = path.suffix.lower()
        if suffix == ".tar":
            shards.append(str(path))
        elif suffix in LIST_SUFFIXES:
            files.extend(read_list(path))
        else:
            files.append(Item(path=str(path)))

    for spec in map(str, specs):
        path = Path(spec)
        if path.is_dir():
            found = sorted(f for f in (path.rglob("*") if recursive else path.iterdir())
                           if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise InputError(f"{spec}: no image files in this folder"
                                 + ("" if recursive else " (--recursive looks in sub-folders)"))
            files.extend(Item(path=str(f)) for f in found)
        elif not path.exists() and glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError(f"{spec}: no files match this pattern")
            for m in matches:
                if not Path(m).is_dir():
                    add(Path(m), spec)
        elif not path.exists():
            # A typo, not a bad image: recording it as one would create the output folder, which
            # then refuses the corrected command as "other inputs". (A missing file named in a
            # list is a bad image: lists are data.)
            raise InputError(f"{spec}: no such file or folder")
        else:
            add(path, spec)
    if not files and not shards:
        raise InputError("no inputs: give folders, image files, globs, .txt/.csv/.parquet lists or "
                         ".tar shards")
    return files, shards


def read_list(path: Path) -> list[Item]:
    """Image paths (relative ones relative to the list's folder) and optional captions from a
    .txt (one path a line), .csv or .parquet (an image column and an optional caption column)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            rows = [{"image_path": line.strip()} for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
            columns = ["image_path"]
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                rows, columns = list(reader), list(reader.fieldnames or [])
        else:
            pq = _parquet()
            table = pq.read_table(path)
            columns = table.column_names
            keep = [c for c in list_columns(columns) if c]
            rows = table.select(keep).to_pylist() if keep else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the list {path}: {e}") from None
    image_col, caption_col = list_columns(columns)
    if image_col is None:
        raise InputError(f"{path}: needs an image column ({' / '.join(IMAGE_COLUMNS)}); found: "
                         f"{', '.join(columns) or 'none'}")
    items = []
    for r in rows:
        if not r.get(image_col):
            continue
        p = Path(str(r[image_col]))
        caption = r.get(caption_col) if caption_col else None
        items.append(Item(path=str(p if p.is_absolute() else path.parent / p),
                          caption=None if caption is None else str(caption)))
    # A list whose entries name no file at all is not a list of images (`embed notes.txt`): refused
    # before anything is written. The scan stops at the first entry that exists, so a real list
    # costs one stat.
    if items and not any(Path(i.path).exists() for i in items):
        first = next(str(r[image_col]) for r in rows if r.get(image_col))
        raise InputError(f"{path}: not one of its {len(items)} entries is an existing file (the first: "
                         f"{first!r}); a {suffix} input is a list of image paths"
                         + (", one a line" if suffix == ".txt" else ""))
    return items


_SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", *sorted(s[1:] for s in IMAGE_SUFFIXES))


def scan_shard(shard: str) -> tuple[list[Item], str | None]:
    """The samples of an img2dataset tar: members grouped by key (`{key}.jpg` + `{key}.txt` +
    `{key}.json`), in the order of their first member. A sample without an image member is an error."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, dot, ext = m.name.rpartition(".")
                if dot:
                    samples.setdefault(key, {})[ext.lower()] = m
    except (OSError, tarfile.TarError) as e:
        return [], f"cannot read the tar shard ({e})"
    items = []
    for key, members in samples.items():
        image = next((members[e] for e in _SHARD_IMAGE_EXTS if e in members), None)
        txt, meta = members.get("txt"), members.get("json")
        items.append(Item(shard=shard, key=key, offset=image.offset_data if image else 0,
                          size=image.size if image else 0,
                          txt=(txt.offset_data, txt.size) if txt else None,
                          json=(meta.offset_data, meta.size) if meta else None,
                          member=image.name if image else None,
                          error=None if image else f"{shard}/{key}: no image member in the shard"))
    return items, None


# --- decoding (in worker processes) ---------------------------------------------------------

class Decode(torch.utils.data.Dataset):
    """Item -> (part, position, pixels or error string, width, height, caption); runs in workers."""

    def __init__(self, work: list[tuple[int, int, Item]], image_processor):
        self.work, self.proc = work, image_processor

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, n: int):
        part, pos, item = self.work[n]
        caption, fields = item.caption, {}
        try:
            if item.error is not None:
                raise ImageReadError(item.error)
            if item.shard is not None:
                name = f"{item.shard}/{item.key}"
                with open(item.shard, "rb") as f:
                    if item.txt is not None:
                        f.seek(item.txt[0])
                        caption = f.read(item.txt[1]).decode("utf-8", "replace").strip()
                    if item.json is not None:
                        f.seek(item.json[0])
                        fields = json_fields(f.read(item.json[1]))
                    f.seek(item.offset)
                    img = load_image(name, data=f.read(item.size))
            else:
                img = load_image(item.path)
            w, h = img.size
            pixels = self.proc.to_tensor(self.proc.prepare(img))  # (3, S, S) float32, or NaFlexPixels
            return part, pos, pixels, w, h, caption, fields
        except ImageReadError as e:
            return part, pos, str(e), 0, 0, caption, fields
        except Exception as e:  # a bad image must never stop the run, whatever PIL raises
            return part, pos, f"{item.path or item.key}: {type(e).__name__}: {e}", 0, 0, caption, fields


def json_fields(data: bytes) -> dict:
    """img2dataset's {key}.json as metadata columns, flattened as clip-retrieval's pandas
    json_normalize does ({"exif": {"Make": ..}} -> "exif.Make"). One that is not a JSON object
    gives no columns: the image is still embedded."""
    try:
        obj = json.loads(data)
    except ValueError:
        return {}

    def flat(d: dict, prefix: str) -> Iterable[tuple[str, object]]:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return dict(flat(obj, "")) if isinstance(obj, dict) else {}


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is one image per worker; the model keeps the cores
