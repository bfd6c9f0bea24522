"""Kernels chosen by measurement, not by CPU flags.

The first time a CPU fast path meets a kind of call (an op, a dtype and a shape: the callers decide
what the key holds), every candidate that computes the same thing is timed on that shape, and the
fastest is used from then on. A candidate that fails, or whose result is not the
reference candidate's within the op's tolerance, is not used. The reference candidate (the plain
PyTorch op) is kept unless another one is at least `MARGIN` faster, so that noise does not flip a
choice between two equals.

Choices are kept in memory for the process and on disk, one JSON file per CPU model, thread count
and torch version (`$SIGLIP_SO400M_CACHE`, else `$XDG_CACHE_HOME/siglip_so400m`, else
`~/.cache/siglip_so400m`), so the next process starts with them: two processes on one machine pick the
same kernels, and the same input gives the same bits. A cache that cannot be read is measured again;
one that cannot be written is only kept in memory. Every choice is logged at DEBUG level
(logger `siglip_so400m.autotune`), with each candidate's time. `SIGLIP_SO400M_AUTOTUNE=0` turns the
measuring off: the reference candidates run everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .files import atomic_write, cache_dir

_log = logging.getLogger(__name__)
MARGIN = 0.03  # another candidate must be this much faster than the reference to replace it
SLOW = 20  # a candidate whose first call takes this many times the reference's is not timed further
ROUNDS = 5  # timed calls per candidate (after one untimed call), in a shuffled order each round
_lock = threading.RLock()
_choices: dict[str, dict] = {}  # key -> {"use": candidate, "ms": {candidate: ms or None}}, this process
_loaded: str | None = None  # the cache file whose choices are in _choices
_lock_depth = 0  # how many choose() calls of this process are measuring (under _lock)


def enabled() -> bool:
    return os.environ.get("SIGLIP_SO400M_AUTOTUNE", "1") not in ("0", "false", "no", "off")


def rows_bucket(m: int) -> int:
    """The number of rows a choice is made for: m rounded up to a power of two (at least 16)."""
    return max(16, 1 << max(0, m - 1).bit_length())


@functools.cache
def _cpu() -> str:
    name, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    return f"{name} | flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def machine() -> str:
    """What a choice depends on: the CPU model and its features, the thread count, the torch build."""
    return f"{_cpu()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_file() -> Path:
    """This machine's choices, in the package's cache folder (files.cache_dir)."""
    return cache_dir() / f"kernels-{hashlib.sha256(machine().encode()).hexdigest()[:16]}.json"


def _load(path: Path | None, again: bool = False) -> None:
    """The choices on disk into _choices (once per file; again: re-read, keeping this process's)."""
    global _loaded
    if path is None or (_loaded == str(path) and not again):
        return
    if _loaded != str(path):
        _choices.clear()
    _loaded = str(path)
    _choices.update({k: v for k, v in _read(path).items() if k not in _choices})


def _read(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        choices = data.get("choices") if isinstance(data, dict) and data.get("machine") == machine() else None
        if not isinstance(choices, dict):
            return {}
        return {k: v for k, v in choices.items() if isinstance(v, dict) and isinstance(v.get("use"), str)
                and isinstance(v.get("ms", {}), dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _log.debug("kernel choices in %s not read (%s): measuring again", path, e)
        return {}


def _save(path: Path | None, key: str, choice: dict) -> None:
    try:
        if path is None:
            raise OSError("no cache folder: neither $SIGLIP_SO400M_CACHE nor a home folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), key: choice}  # another process may have added its choices
        text = json.dumps({"machine": machine(), "choices": merged}, indent=1, sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text), durable=False)
    except OSError as e:
        _log.warning("kernel choice %s = %s kept in memory only, %s cannot be written (%s): the next "
                     "process measures again and may choose another kernel, whose last bits differ",
                     key, choice["use"], path, e)


@contextlib.contextmanager
def _across_processes(path: Path | None):
    """Held while a process measures and writes a choice: a second process waits, then reads the
    first one's choice instead of measuring the same thing at the same time (where the two would
    slow each other down and might choose differently). POSIX only; elsewhere, nothing."""
    global _lock_depth
    try:
        import fcntl
    except ImportError:
        fcntl = None
    lock = None
    # Nested measuring (stacked projections time linear layers, which choose their own way) holds
    # the lock already: a second flock on a new descriptor of the same file would wait for ever.
    _lock_depth += 1
    try:
        if fcntl is not None and path is not None and _lock_depth == 1:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (held across the yield)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                if lock is not None:
                    lock.close()
                lock = None
        yield
    finally:
        _lock_depth -= 1
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def _cache_file_or_none() -> Path | None:
    try:
        return cache_file()
    except (RuntimeError, KeyError) as e:  # no home folder (Path.home() fails) and no $SIGLIP_SO400M_CACHE
        _log.debug("no folder for kernel choices (%s): they stay in memory", e)
        return None


def choose(key: str, candidates: dict[str, Callable[[], object]], reference: str,
           check: Callable[[object, object], bool] | None = None) -> str:
    """The name of the candidate to use for `key`: remembered, or measured now.

    candidates: name -> a call that runs it once on the shape of `key` (inputs made by the caller);
    reference: the candidate that is always correct (the plain op), kept unless another is MARGIN
    faster; check(reference's result, candidate's result): whether the candidate may be used."""
    if not enabled():
        return reference
    with _lock:
        path = _cache_file_or_none()
        _load(path)
        hit = _choices.get(key)
        if hit is not None and hit["use"] in candidates:
            return hit["use"]
        with _across_processes(path):
            _load(path, again=True)  # another process may have measured it meanwhile
            hit = _choices.get(key)
            if hit is not None and hit["use"] in candidates:
                return hit["use"]
            choice, times = _measure(candidates, reference, check)
            _choices[key] = hit = {"use": choice, "ms": {n: None if t is None else round(t * 1e3, 4)
                                                         for n, t in times.items()}}
            _log.debug("%s: %s (%s)", key, choice, ", ".join(
                f"{n} {t:.3g} ms" if t is not None else f"{n} not usable" for n, t in hit["ms"].items()))
            _save(path, key, hit)
        return choice


def known(key: str) -> str | None:
    """The candidate chosen for `key` in this process or on disk, without measuring (None: not yet,
    or measuring is off)."""
    if not enabled():
        return None
    with _lock:
        _load(_cache_file_or_none())
        return _choices.get(key, {}).get("use")


def measured(key: str) -> dict[str, float | None]:
    """The milliseconds each candidate took when `key` was chosen (None: not usable), {} if unknown
    or measuring is off."""
    if not enabled():
        return {}
    with _lock:
        _load(_cache_file_or_none())
        ms = _choices.get(key, {}).get("ms", {})
        return {n: t for n, t in ms.items() if t is None or isinstance(t, (int, float))}


def _time(name: str, fn: Callable[[], object]) -> float:
    """Seconds one call of candidate `name` takes (tests replace this to decide the measurement)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _measure(candidates: dict[str, Callable[[], object]], reference: str,
             check: Callable[[object, object], bool] | None) -> tuple[str, dict[str, float | None]]:
    start = time.perf_counter()
    ref_out = candidates[reference]()  # the reference must work: its errors are the caller's
    ref_first = time.perf_counter() - start
    usable = {reference: candidates[reference]}
    slow: dict[str, float] = {}  # first-call seconds of the candidates too slow to time further
    for name, fn in candidates.items():
        if name == reference:
            continue
        try:
            start = time.perf_counter()
            out = fn()  # also its untimed first call (primitive creation, first touch)
            first = time.perf_counter() - start
            if check is not None and not check(ref_out, out):
                _log.debug("%s not used: its result differs from %s's", name, reference)
            elif first > max(SLOW * ref_first, 0.2):  # no need to time it ROUNDS times more
                _log.debug("%s not used: its first call took %.3g s, %s's %.3g s", name, first, reference,
                           ref_first)
                slow[name] = first
            else:
                usable[name] = fn
        except Exception as e:  # a private op that fails here is simply not a candidate
            _log.debug("%s not used: %s", name, e)
    best: dict[str, float | None] = {name: slow.get(name) for name in candidates}
    names = list(usable)
    for _ in range(ROUNDS if len(usable) > 1 else 0):
        random.shuffle(names)  # drift in the machine's speed hits every candidate alike
        for name in names:
            t = _time(name, usable[name])
            best[name] = t if best[name] is None else min(best[name], t)
    if len(usable) == 1:
        best[reference] = ref_first  # its one call: enough to compare with the slow ones' first
        return reference, best
    fastest = min(usable, key=lambda n: best[n])
    if fastest != reference and best[fastest] > (1 - MARGIN) * best[reference]:
        fastest = reference
    return fastest, best


def forget() -> None:
    """Drop this process's choices (tests; a changed cache location)."""
    global _loaded
    with _lock:
        _choices.clear()
        _loaded = None
