"""Image-caption data for fine-tuning: reading the pairs, and the batches each process takes.

Sources: a CSV or JSONL file with an image-path column and a caption column (paths relative to the
file), or a folder holding either such a `metadata.csv` / `metadata.jsonl` or image files each with
a caption in a `.txt` file of the same name (`cat.jpg` + `cat.txt`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .api import Processor
from .errors import SiglipError
from .image import CAPTION_COLUMNS, IMAGE_COLUMNS, IMAGE_SUFFIXES, ImageReadError, list_columns


class DataError(SiglipError, ValueError):
    """A dataset that cannot be used at all (as opposed to single bad images, which are skipped)."""


def read_pairs(source: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a CSV/JSONL file or a folder."""
    source = Path(source)
    if source.is_dir():
        for name in ("metadata.csv", "metadata.jsonl"):
            if (source / name).is_file():
                return read_pairs(source / name)
        pairs = [(f, f.with_suffix(".txt").read_text(encoding="utf-8").strip())
                 for f in sorted(source.iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES and f.with_suffix(".txt").is_file()]
        pairs = [(f, caption) for f, caption in pairs if caption]
        if not pairs:
            raise DataError(f"{source}: no image with a caption (.txt of the same name) and no "
                            "metadata.csv / metadata.jsonl")
        return pairs
    if not source.is_file():
        raise DataError(f"{source}: no such file or folder")
    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), reader.fieldnames or []
    elif source.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{n}: not a JSON object ({e})") from None
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
    else:
        raise DataError(f"{source}: expected a .csv or .jsonl file, or a folder")
    image_col, caption_col = list_columns(columns)
    if image_col is None or caption_col is None:
        raise DataError(f"{source}: needs an image column ({' / '.join(IMAGE_COLUMNS)}) and a caption "
                        f"column ({' / '.join(CAPTION_COLUMNS)}); found: {', '.join(columns) or 'none'}")
    pairs = [(source.parent / str(r[image_col]), str(r[caption_col]).strip()) for r in rows
             if isinstance(r, dict) and r.get(image_col) and str(r.get(caption_col) or "").strip()]
    if not pairs:
        raise DataError(f"{source}: no rows with both an image path and a caption")
    return pairs


class ImageTextDataset(Dataset):
    """Pixels and token ids per pair. An image that cannot be read is replaced by the next one that
    can, so batches stay full; the replaced paths come back with the item, to be counted."""

    def __init__(self, pairs: list[tuple[Path, str]], processor: Processor):
        if processor.tokenizer is None:
            raise DataError("the checkpoint has no spiece.model to tokenize captions with")
        self.pairs = pairs
        self.processor = processor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        bad = []
        for k in range(len(self.pairs)):
            path, caption = self.pairs[(i + k) % len(self.pairs)]
            try:
                pixels = self.processor.image.to_tensor(self.processor.image.prepare(path))
            except ImageReadError as e:
                bad.append(str(e))
                continue
            return pixels, torch.tensor(self.processor.tokenizer.encode(caption)), bad
        raise DataError(f"not one of the dataset's {len(self.pairs)} images could be read: "
                        + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))

    def collate(self, items: list[tuple[Any, torch.Tensor, list[str]]]):
        """Items -> (pixels as the model takes them, (B, L) ids, the replaced paths); the image
        processor batches its own output (a stack, or padded NaFlex patches)."""
        pixels, ids, bad = zip(*items, strict=True)
        return self.processor.image.collate(pixels), torch.stack(ids), [b for group in bad for b in group]


def rank_share(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, end) of a global batch that a rank takes: as even as possible, earlier ranks
    taking one more when it does not divide."""
    base, extra = divmod(batch_size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class GlobalBatches(Sampler[list[int]]):
    """Step s's global batch is positions [s*B, (s+1)*B) of an endless stream of seeded random
    permutations of the dataset, one per epoch; each rank takes its share. The batches depend on the
    step alone, so one process and N processes see the same global batches, and a resumed run
    continues exactly where the interrupted one was."""

    def __init__(self, n: int, batch_size: int, steps: int, *, start_step: int = 0, rank: int = 0,
                 world: int = 1, seed: int = 0):
        if batch_size < world:
            raise DataError(f"global batch size {batch_size} is smaller than the {world} processes")
        self.n, self.batch_size, self.steps, self.start_step = n, batch_size, steps, start_step
        self.lo, self.hi = rank_share(batch_size, rank, world)
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _index(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[pos]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            first = step * self.batch_size
            yield [self._index(first + j) for j in range(self.lo, self.hi)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)
