"""One way to open a model: the flags every command declares once, resolved once, opened once.

    p = argparse.ArgumentParser()
    add_model_arguments(p)                           # --model --revision --dtype --device ...
    spec = ModelSpec.from_args(p.parse_args())
    run = spec.resolve()                             # UsageError for a flag that cannot work here
    model, processor = run.open(towers=("vision",))  # the processor already sized, a copy

A job takes the opened model and processor; what it stores records `run.record(processor)`, and
what reads a stored output back compares that record with its own (`check_record`): a mismatch is
refused, naming the field and both values, never reinterpreted.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DTYPES, dtype_name
from .errors import RecordMismatch, SiglipError, UsageError
from .weights import DEFAULT_REPO

if TYPE_CHECKING:
    import torch

    from .api import Processor
    from .weights import Checkpoint

BACKENDS = ("torch", "onnx", "openvino")

# One help text and one default per flag, for every command that takes the model.
_HELP = {
    "model": "Hub id, local folder or .safetensors file (default: %(default)s)",
    "revision": "Hub branch, tag or commit",
    "dtype": "auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 (transformers' numbers "
             "exactly); int8: the linear layers quantized, the rest in float32, CPU only (speed: "
             "docs/performance.md)",
    "device": "auto, cpu, cuda, cuda:N or mps (default: %(default)s: CUDA if there, else the CPU)",
    "threads": "CPU threads for torch (default: torch's choice)",
    "image_size": "run the image tower at NxN pixels (position embeddings resized as transformers "
                  "does; default: the checkpoint's size)",
    "max_num_patches": "SigLIP 2 NaFlex: resize each image, at its own aspect ratio, to at most N "
                       "patches (default: the checkpoint's preprocessor_config.json)",
    "backend": "what runs the towers: torch, or the graphs of --graphs in ONNX Runtime or OpenVINO, "
               "checked against eager float32 at start (default: %(default)s)",
    "graphs": "with --backend onnx/openvino: the folder `siglip-so400m export` made from --model",
}
# What a command that reads a stored output says instead: its defaults are the output's record.
_FROM_RECORD = {
    "model": "the checkpoint for queries (default: the one the collection was embedded with)",
    "dtype": "as in embed (default: the precision the collection was embedded in)",
    "max_num_patches": "SigLIP 2 NaFlex image queries within N patches (default: the budget the "
                       "collection was embedded at)",
}


def add_model_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, images: bool = True,
                        backend: bool = False, dtypes: tuple[str, ...] | None = None,
                        from_record: bool = False, only: tuple[str, ...] | None = None) -> None:
    """The model flags, with the same names, help and defaults in every command. images: the image
    size and patch budget flags (commands that read images). backend: --backend and --graphs.
    dtypes: the --dtype values the command takes (default: all). from_record: the command reads a
    stored output, whose record gives the defaults of --model, --dtype and --max-num-patches (and
    the image size, which it does not take). only: just these flags (fine-tuning sets its
    precision with autocast, not --dtype)."""
    def help_(name: str) -> str:
        return _FROM_RECORD[name] if from_record and name in _FROM_RECORD else _HELP[name]

    wanted = {"model", "revision", "dtype", "device", "threads"}
    if images:
        wanted |= {"max_num_patches"} | (set() if from_record else {"image_size"})
    if backend:
        wanted |= {"backend", "graphs"}
    if only is not None:
        wanted &= set(only)
    choices = [k for k, v in DTYPES.items() if dtypes is None or v in dtypes or k == "auto"]
    flags = {
        "model": dict(default=None if from_record else DEFAULT_REPO),
        "revision": {},
        "dtype": dict(choices=choices, default="auto"),
        "device": dict(default="auto"),
        "threads": dict(type=int, metavar="N"),
        "image_size": dict(type=int, metavar="N"),
        "max_num_patches": dict(type=int, metavar="N"),
        "backend": dict(choices=BACKENDS, default="torch"),
        "graphs": dict(metavar="DIR"),
    }
    for name, kw in flags.items():
        if name in wanted:
            p.add_argument("--" + name.replace("_", "-"), help=help_(name), **kw)


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a model run, as the user gave it (flags, or keyword arguments)."""

    model: str | os.PathLike | None = DEFAULT_REPO
    revision: str | None = None
    dtype: str = "auto"  # a --dtype value: auto, float32, bfloat16, float16, int8 or an alias
    device: str = "auto"
    threads: int | None = None
    image_size: int | None = None
    max_num_patches: int | None = None
    backend: str = "torch"
    graphs: str | os.PathLike | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **override) -> ModelSpec:
        """The spec of parsed add_model_arguments() flags (flags a command lacks keep the defaults)."""
        fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**{**fields, **override})

    def resolve(self) -> ResolvedSpec:
        """The flags checked and made concrete (device, precision), before anything is loaded, so
        that torchrun ranks can compare them and a bad flag is a usage error at once."""
        import torch

        from . import backends

        for name in ("threads", "image_size", "max_num_patches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        try:
            name = dtype_name(str(self.dtype))
        except ValueError as e:
            raise UsageError(f"--dtype: {e}") from None
        try:
            backends.check_args(self.backend, self.graphs)
        except backends.BackendError as e:
            raise UsageError(str(e)) from None
        on_graphs = self.backend != "torch"
        if on_graphs and self.device not in (None, "auto", "cpu"):
            raise UsageError(f"--backend {self.backend} runs the graphs on the CPU; leave --device out "
                             "(or give cpu)")
        # The graphs and int8's kernels run on the CPU: there "auto" means the CPU, GPU or not.
        cpu_only = on_graphs or name == "int8"
        device = torch.device("cpu") if cpu_only and self.device in (None, "auto") else \
            resolve_device(self.device)
        if name == "int8" and device.type != "cpu":
            raise UsageError(f"--dtype int8 runs on the CPU only, not on {device} (--device cpu; or "
                             f"--dtype bfloat16 on {device.type})")
        if name == "int8" or on_graphs:
            # int8: the linear layers' activations and every other layer in float32, wherever it
            # runs (one meaning for every command). Graphs: the eager reference is float32.
            torch_dtype = torch.float32
        elif name is None:
            from .api import pick_dtype

            torch_dtype = pick_dtype(device)
        else:
            torch_dtype = getattr(torch, name)
        precision = "int8" if name == "int8" else str(torch_dtype).removeprefix("torch.")
        return ResolvedSpec(self, device, torch_dtype, "int8" if name == "int8" and not on_graphs else None,
                            precision, graph_dtype=name if on_graphs else None)


def resolve_device(flag: str | None) -> torch.device:
    """--device as a torch.device, refused at once where it cannot run (CUDA on a CPU-only torch)."""
    import torch

    from .api import pick_device

    try:
        device = pick_device(None if flag in (None, "auto") else str(flag))
    except RuntimeError as e:
        raise UsageError(f"--device {flag}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {flag}: CUDA is not available here (torch "
                             f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})")
        if device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU a rank
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA devices")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps and mps.is_available()):
        raise UsageError(f"--device {flag}: MPS is not available here")
    return device


@dataclass
class ResolvedSpec:
    """A ModelSpec made concrete: the device, the dtype load() gets, and the precision the towers
    will compute in (what a stored output records)."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    quantize: str | None
    precision: str  # float32, bfloat16, float16, int8; a graph backend's is known once opened
    graph_dtype: str | None = None

    def checkpoint(self, towers: tuple[str, ...] = ("vision", "text")) -> Checkpoint:
        from .weights import resolve

        return resolve(self.spec.model or DEFAULT_REPO, revision=self.spec.revision, towers=towers)

    def processor(self, ckpt: Checkpoint, tokenizer: str | Path | None = None) -> Processor:
        """The checkpoint's processor sized by --image-size / --max-num-patches (a new one), without
        loading any weights: what a job records can be known before the model is read."""
        from .api import Processor

        processor = Processor.from_checkpoint(ckpt, tokenizer)
        try:
            return processor.sized(self.spec.image_size, self.spec.max_num_patches)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def open(self, towers: tuple[str, ...] = ("vision", "text"), ckpt: Checkpoint | None = None,
             tokenizer: str | Path | None = None, log: Callable[[str], None] | None = None):
        """(model, processor): the checkpoint on the device in the resolved precision, or the
        export's graphs (checked against eager float32 first), with the processor sized."""
        import torch

        from . import backends
        from .api import load

        if self.spec.threads:
            torch.set_num_threads(self.spec.threads)
        ckpt = ckpt or self.checkpoint(towers)
        self.processor(ckpt, tokenizer)  # a size this checkpoint cannot take: refused before any weight
        if self.spec.backend != "torch":
            try:
                model, processor = backends.open_graphs(self.spec.graphs, self.spec.backend, ckpt, towers,
                                                        dtype=self.graph_dtype, tokenizer=tokenizer, log=log)
            except backends.GraphMismatch as e:
                raise SiglipError(str(e)) from None
            except backends.BackendError as e:
                raise UsageError(str(e)) from None
            self.precision = model.precision  # the graphs' own
        else:
            model, processor = load(ckpt, dtype=self.dtype, device=self.device, towers=towers,
                                    quantize=self.quantize, tokenizer=tokenizer)
        return model, processor.sized(self.spec.image_size, self.spec.max_num_patches)

    def record(self, ckpt: Checkpoint, processor: Processor) -> dict:
        """What an output computed by this run records (see check_record)."""
        return computed_with(ckpt, processor, self.precision, self.spec.backend)


# --- the record of what a stored output was computed with ---------------------------------------

def checkpoint_record(ckpt: Checkpoint) -> dict:
    """The checkpoint as stored outputs name it: a Hub checkpoint by its id and commit; a local one
    by its absolute path, with its weights' path, size and modification time hashed into `weights`
    (a copy elsewhere, or a retrained file at the same path, is another model)."""
    return {"model": ckpt.name if ckpt.revision is not None else str(Path(ckpt.name).resolve()),
            "revision": ckpt.revision,
            "weights": None if ckpt.revision else hashlib.sha256(ckpt.identity().encode()).hexdigest()[:16]}


# What --dtype int8 computes: activations quantized per row, everything between the int8 matmuls in
# float32. Records before it (per-tensor activations) have no `quantization`, read as None.
INT8_SCHEME = "int8 per-row activations, float32 between"


def computed_with(ckpt: Checkpoint, processor: Processor, precision: str, backend: str = "torch") -> dict:
    """The record: checkpoint, precision the towers computed in (and int8's scheme), backend, and
    the image preprocessing that decides the embeddings (fixed size, or NaFlex patch budget)."""
    return {**checkpoint_record(ckpt), "dtype": precision,
            "quantization": INT8_SCHEME if precision == "int8" and backend == "torch" else None,
            "backend": backend, **processor.image_record()}


def stored_record(stored: Mapping, ckpt: Checkpoint) -> dict:
    """A record as written, read as this version means it: an output that recorded no patch budget
    (None, from before the record held the budget in force) was computed at the checkpoint's own,
    and one without `quantization` with none, or with int8's earlier scheme."""
    from .api import Processor

    record = dict(stored)
    if "max_num_patches" in record and record["max_num_patches"] is None:
        record["max_num_patches"] = Processor.from_checkpoint(ckpt).image_record()["max_num_patches"]
    record.setdefault("quantization", None)
    return record


def as_eager(record: Mapping) -> dict:
    """A record as a reader that embeds its queries eagerly compares it: embeddings that a graph
    backend computed were checked against the eager float32 model when they were made (backends.py),
    so they are float32's, whatever the graphs' own precision label (fp16 weights, bf16, int8)."""
    out = dict(record)
    if out.get("backend", "torch") != "torch":
        out.update(dtype="float32", backend="torch", quantization=None)
    return out


def fixed_size(record: Mapping, ckpt: Checkpoint) -> int | tuple[int, int] | None:
    """The image size a fixed-size checkpoint's output was computed at (None for NaFlex, or when
    the record has none), as --image-size takes it."""
    size = record.get("image_size")
    if ckpt.config.vision_config.naflex or size is None:
        return None
    return tuple(size) if isinstance(size, list) else size


# Fields that two records must share for outputs to be comparable, in the order a refusal lists them.
RECORD_FIELDS = ("model", "revision", "weights", "dtype", "quantization", "backend", "image_size",
                 "max_num_patches")
# What a reader that embeds queries (search, eval --embeddings, serve --index) compares: not the
# backend (see as_eager).
QUERY_FIELDS = tuple(f for f in RECORD_FIELDS if f != "backend")


def check_record(stored: Mapping, current: Mapping, where: str, *, fields: tuple[str, ...] = RECORD_FIELDS,
                 advice: str = "") -> None:
    """Refuse (RecordMismatch) when `stored`, the record of the output at `where`, differs from
    `current` in any of `fields` that both records carry, naming each field and both values."""
    diff = [f"{f}: {stored[f]!r} there, {current[f]!r} now" for f in fields
            if f in stored and f in current and stored[f] != current[f]]
    if diff:
        raise RecordMismatch(f"{where} was computed with other settings than this run's ("
                             + "; ".join(diff) + ")" + (f": {advice}" if advice else ""))
