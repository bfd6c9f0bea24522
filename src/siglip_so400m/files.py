"""Files written whole or not at all (the one atomic write of the package and the fsync it needs),
and the package's cache folder. Imports nothing of the package, so every module may use it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to the disk: a rename is only as durable as what it
    renames, so after a power cut the new name must not point at unwritten data."""
    if os.name == "nt" and Path(path).is_dir():
        return  # Windows cannot open a folder; NTFS journals its entries
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *, durable: bool = True) -> None:
    """Replace `path` all at once or not at all. write(tmp) fills a temporary file beside it (hidden,
    ending in .tmp, named by mkstemp so that no other writer picks it), which is fsync'd, renamed
    over `path`, and the folder fsync'd: after a kill or a power cut `path` is the old file or the
    whole new one, never a truncated one. durable=False skips the fsyncs, for a cache that is
    rebuilt when damaged: still atomic for readers, not across a power cut. The one atomic write
    of the package (embed's parts and manifest, the faiss index and its index.json, fine-tuning's
    weights, the label cache, the kernel choices)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        # mkstemp makes the file 0600 whatever the umask; the output gets the mode open() would give
        # it, so that a collection embedded for a team can be read by the team.
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync(path.parent)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (another thread's
    os.umask(0) window would make its own files world-writable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """$SIGLIP_SO400M_CACHE, else $XDG_CACHE_HOME/siglip_so400m, else ~/.cache/siglip_so400m: where
    zero-shot's label embeddings and the kernel choices (autotune.py) are kept."""
    if os.environ.get("SIGLIP_SO400M_CACHE"):
        return Path(os.environ["SIGLIP_SO400M_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siglip_so400m"
