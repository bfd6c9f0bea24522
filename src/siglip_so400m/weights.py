"""Finding a checkpoint (Hub id, local folder, bare .safetensors file, or big_vision .npz) and loading
its weights.

The only module that touches the disk or the Hub. Weights are read from safetensors alone (no
pickle), mmap'd, and assigned straight into a model built on the meta device: no random init and no
second copy. A dtype conversion reads the file in slices of a few hundred MB, so that converting to
bf16 never holds more than the bf16 model plus one slice of fp32. A big_vision .npz (a zip of .npy
arrays, which cannot be mmap'd) is read array by array and renamed by `bigvision`, which holds the
name mapping while this module keeps all file access.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from . import bigvision
from .config import FP32_KEYS, SiglipConfig
from .errors import SiglipError
from .files import atomic_write, fsync  # noqa: F401  (the package's one atomic write; jobs import it from here)

DEFAULT_REPO = "google/siglip-so400m-patch14-384"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# SigLIP's SentencePiece model, SigLIP 2's Gemma tokenizer (tokenizer.json, tokenizer.model), and config.
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
_SLICE_BYTES = 64 * 2**20  # per mmap while converting dtypes: bounds the fp32 pages held at once
_MAX_LISTED = 8


class CheckpointError(SiglipError, ValueError):
    """A checkpoint that cannot be found or does not fit; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's files are: `name` as the user gave it, `revision` the resolved commit for a
    Hub checkpoint (None for local files), `folder` holding config and tokenizer files if any."""

    name: str
    revision: str | None
    folder: Path | None
    weight_files: tuple[Path, ...]
    config: SiglipConfig

    def identity(self) -> str:
        """A string that changes when the weights do (for caches): the commit of a Hub checkpoint;
        path, size and modification time of each local weight file."""
        if self.revision is not None:
            return f"{self.name}@{self.revision}"
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.weight_files]
        return json.dumps(stats)


def resolve(name: str | Path = DEFAULT_REPO, *, revision: str | None = None,
            config: SiglipConfig | str | Path | None = None,
            towers: tuple[str, ...] = ("vision", "text")) -> Checkpoint:
    """A Hub id, a local folder in the Hub layout, or a .safetensors file -> its files and config."""
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub ids, but {name} is a local path")
        if path.is_file():
            return _from_file(path, config)
        return _from_folder(str(name), path, None, config)
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
        folder = _download(name, revision, towers)
        return _from_folder(name, folder, folder.name, config)
    raise CheckpointError(f"{name}: no such file or folder, and not a Hub id like {DEFAULT_REPO}")


def _download(repo_id: str, revision: str | None, towers: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["config.json", "preprocessor_config.json", WEIGHTS, WEIGHTS_INDEX, "model-*.safetensors"]
    if "text" in towers:
        patterns += TOKENIZER_FILES
    at = f"{repo_id}@{revision or 'main'}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hub (or it is private: log in "
                              "with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{at}: no such revision on the Hub") from None
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
        raise CheckpointError(
            f"cannot fetch {at}: the Hub is unreachable or HF_HUB_OFFLINE=1, and it is not in the "
            f"local cache. Either pass a local folder (--model DIR / load('DIR')), or cache the "
            f"repo first on a machine with network: hf download {repo_id}") from None
    except HfHubHTTPError as e:  # IncompleteSnapshotError and other HTTP failures
        raise CheckpointError(f"cannot fetch {at}: {e}") from None


def _from_folder(name: str, folder: Path, revision: str | None,
                 config: SiglipConfig | str | Path | None) -> Checkpoint:
    index = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS).is_file():
        files = (folder / WEIGHTS,)
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = tuple(folder / s for s in shards)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{WEIGHTS_INDEX} in {folder} names shards that are missing: "
                                  + _cut(missing))
    else:
        pickles = [p for p in PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise CheckpointError(
                f"{folder} has only {pickles[0]}, a pickle file: loading one can run arbitrary code, "
                "so siglip_so400m reads safetensors only. Convert it once where you trust the file, "
                "e.g. `SiglipModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)` "
                "with transformers, and load OUT.")
        where = f"{name}@{revision}" if revision else str(folder)
        raise CheckpointError(f"no {WEIGHTS} in {where} (is this a SigLIP checkpoint folder?)")
    if config is None:
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no config.json in {folder}")
        config = folder / "config.json"
    return Checkpoint(name, revision, folder, files, _read_config(config))


def _from_file(path: Path, config: SiglipConfig | str | Path | None) -> Checkpoint:
    if path.suffix == ".npz":
        # big_vision's own checkpoints carry no config: it comes from config= or the array shapes.
        cfg = _read_config(config) if config is not None else bigvision.infer_config(npz_shapes(path))
        return Checkpoint(str(path), None, path.parent, (path,), cfg)
    if path.name in PICKLE_WEIGHTS or path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path} is a pickle file: loading one can run arbitrary code, so "
                              "siglip_so400m reads safetensors only (convert it where you trust it)")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file, a big_vision .npz or a "
                              "checkpoint folder")
    if config is None:
        if not (path.parent / "config.json").is_file():
            raise CheckpointError(f"{path} is a bare weights file: pass its config too, e.g. "
                                  "config=siglip_so400m.config.SO400M_CONFIG (the so400m shape)")
        config = path.parent / "config.json"
    return Checkpoint(str(path), None, path.parent, (path,), _read_config(config))


def _read_config(config: SiglipConfig | str | Path) -> SiglipConfig:
    if isinstance(config, SiglipConfig):
        return config
    try:
        return SiglipConfig.from_json(config)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"bad config: {e}") from None


def _cut(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); delete it and fetch it "
                              "again") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


def load_weights(model: torch.nn.Module, ckpt: Checkpoint, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
    """Check the checkpoint against `model` (built on the meta device), then assign its tensors.

    `model` may hold one tower only, or an image tower cut short (vision_layers): the tensors it
    lacks are then neither read nor checked beyond their names. Every tensor of the checkpoint must
    belong to the full model, every parameter of `model` must be in the checkpoint, and shapes must
    agree. `dtype` applies to the towers; logit_scale and logit_bias are always float32.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ckpt.weight_files[0].suffix == ".npz":
        model.load_state_dict(_npz_state(ckpt, expected, dtype, device), strict=True, assign=True)
        return
    full = _full_key_set(ckpt.config)
    where: dict[str, Path] = {}
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in ckpt.weight_files:
        with _open(file) as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if k.endswith(".position_ids"):
                    continue  # a buffer that older exports saved; we compute positions instead
                s = f.get_slice(k)
                where[k] = file
                found[k] = (tuple(s.get_shape()), s.get_dtype())
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in full]
    wrong = [f"{k}: file {found[k][0]} vs config {expected[k]}"
             for k in expected if k in found and found[k][0] != expected[k]]
    if missing or unexpected or wrong:
        names = ", ".join(f.name for f in ckpt.weight_files)
        lines = [f"{names} does not fit its config:"]
        if missing:
            lines.append(f"  missing keys: {_cut(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_cut(unexpected)}")
        if wrong:
            lines.append(f"  wrong shapes: {_cut(wrong)}")
        lines.append("(is this a SigLIP checkpoint, and does config.json belong to these weights?)")
        raise CheckpointError("\n".join(lines))
    bad_dtype = [f"{k} ({found[k][1]})" for k in expected if found[k][1] not in _FLOAT_DTYPES]
    if bad_dtype:
        raise CheckpointError(f"non-float tensors in the checkpoint: {_cut(bad_dtype)}")

    state: dict[str, torch.Tensor] = {}
    # Read in slices, each through its own mmap: when a tensor is converted, the fp32 pages of
    # its slice are released with the mmap instead of piling up until the whole file is read.
    for file in ckpt.weight_files:
        keys = [k for k in expected if where[k] == file]
        for group in _slices(keys, found):
            with _open(file) as f:
                for k in group:
                    # t' and b stay float32 whatever the dtype (why: config.FP32_KEYS).
                    dt = torch.float32 if k in FP32_KEYS else dtype
                    state[k] = f.get_tensor(k).to(device=device, dtype=dt)
    model.load_state_dict(state, strict=True, assign=True)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _slices(keys: list[str], found: dict[str, tuple[tuple[int, ...], str]]) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        shape, dt = found[k]
        n = _BYTES[dt]
        for d in shape:
            n *= d
        if groups[-1] and size + n > _SLICE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def _full_key_set(cfg: SiglipConfig) -> set[str]:
    from .model import SigLIP

    with torch.device("meta"):
        return set(SigLIP(cfg).state_dict())


def npz_shapes(path: Path) -> dict[str, np.ndarray]:
    """Array name (without big_vision's "params/" prefix) -> a zero-byte stand-in of its shape, read
    from the .npy headers alone, so that a config can be inferred without reading 3.5 GB."""
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                out[info.filename.removesuffix(".npy")] = np.broadcast_to(np.zeros((), dtype), shape)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable .npz file ({e})") from None
    prefix = bigvision.strip_prefix(list(out))
    out = {k.removeprefix(prefix): v for k, v in out.items()}
    try:
        bigvision.check_names(out, str(path))
    except bigvision.BigVisionError as e:
        raise CheckpointError(str(e)) from None
    return out


class _NpzArrays(Mapping):
    """The arrays of a .npz by their unprefixed names, read on demand; the last one read is kept,
    so a stacked array is read once for all its layers."""

    def __init__(self, npz, prefix: str):
        self._npz, self._prefix = npz, prefix
        self._names = [k.removeprefix(prefix) for k in npz.files]
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if self._last is None or self._last[0] != name:
            self._last = (name, self._npz[self._prefix + name])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _npz_state(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], dtype: torch.dtype | None,
               device: torch.device | str | None) -> dict[str, torch.Tensor]:
    path = ckpt.weight_files[0]
    shapes = npz_shapes(path)
    found = bigvision.infer_config(shapes)
    cfg = ckpt.config
    for what, ours, theirs in (
            ("vision_config.num_hidden_layers", cfg.vision_config.num_hidden_layers,
             found.vision_config.num_hidden_layers),
            ("text_config.num_hidden_layers", cfg.text_config.num_hidden_layers,
             found.text_config.num_hidden_layers)):
        if ours != theirs:
            raise CheckpointError(f"{path} has {theirs} layers where its config has {what} = {ours}: the "
                                  "config does not match these weights (leave config= out to infer it)")
    with np.load(path) as npz:
        prefix = bigvision.strip_prefix(npz.files)
        state = bigvision.to_state_dict(_NpzArrays(npz, prefix), cfg, keys=set(expected))
    wrong = [f"{k}: file {tuple(v.shape)} vs config {expected[k]}"
             for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"{path} does not fit its config: wrong shapes: {_cut(wrong)} (the config "
                              "does not match these weights; leave config= out to infer it)")
    return {k: v.to(device=device, dtype=torch.float32 if k in FP32_KEYS else dtype)  # as load_weights
            for k, v in state.items()}


def logit_params(ckpt: Checkpoint) -> tuple[float, float]:
    """(t', b): the checkpoint's logit_scale and logit_bias as stored, in float32 whatever dtype the
    model was loaded in (a bf16 t' = 4.72 would move exp(t') by 0.4%, and every sigmoid with it)."""
    if ckpt.weight_files[0].suffix == ".npz":  # big_vision stores them as params/t and params/b
        with np.load(ckpt.weight_files[0]) as npz:
            prefix = bigvision.strip_prefix(npz.files)
            if prefix + "t" in npz.files and prefix + "b" in npz.files:
                return (float(np.asarray(npz[prefix + "t"], np.float32).reshape(-1)[0]),
                        float(np.asarray(npz[prefix + "b"], np.float32).reshape(-1)[0]))
    for file in ckpt.weight_files:
        if file.suffix == ".npz":
            continue
        with _open(file) as f:
            if "logit_scale" in f.keys() and "logit_bias" in f.keys():  # noqa: SIM118
                return (float(f.get_tensor("logit_scale").float().reshape(-1)[0]),
                        float(f.get_tensor("logit_bias").float().reshape(-1)[0]))
    raise CheckpointError(f"{ckpt.name} has no logit_scale / logit_bias (is this a SigLIP checkpoint?)")


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that keeps an output folder from being made there (the folder itself, or its nearest
    existing parent), if any: found before anything is written."""
    for above in (Path(folder), *Path(folder).parents):
        if above.exists():
            return None if above.is_dir() else above
    return None


class FolderInUse(SiglipError):
    """Another process holds an output folder's lock."""


class FolderLock:
    """An exclusive flock on DIR/.lock, so that one run at a time writes an output folder (embed's,
    fine-tuning's). The OS drops it when the process dies, so a killed run never blocks its rerun."""

    def __init__(self, folder: str | os.PathLike, what: str, unlocked: str = ""):
        import errno
        import fcntl

        folder = Path(folder)
        self.file = open(folder / ".lock", "a+")  # noqa: SIM115 -- held for the run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderInUse(f"{folder} is in use by another {what} (it holds {folder / '.lock'}); "
                                  "wait for it to end, or give another output folder") from None
            if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK):
                raise FolderInUse(
                    f"{folder}: its filesystem does not support flock ([Errno {e.errno}] {e.strerror}; "
                    "e.g. Lustre mounted without -o flock, or NFS without a lock daemon), so this run "
                    "cannot make sure it is the only one writing there"
                    + (f". If no other {what} writes to it, {unlocked}" if unlocked else "")
                    + "; or give an output folder on a filesystem with locks") from None
            raise

    def release(self) -> None:
        self.file.close()
