"""`--backend onnx|openvino`: the towers' forward pass through an export folder's graphs, for
`embed` and `serve` (docs/export.md#embed-and-serve-on-the-graphs).

    siglip-so400m export MODEL --format openvino --output so400m-ov/
    siglip-so400m embed photos/ --output emb/ --model MODEL --backend openvino --graphs so400m-ov/

The seam is the model object: GraphModel has what the jobs call on a SigLIP (encode_image,
encode_text, logits, config, checkpoint, precision, parameters() for the device), so their
preprocessing, tokenizer, batching, output layout and limits are the same code as with torch.

Before any work, open_graphs() checks that the folder belongs to the --model checkpoint (export.json's
model and revision for a Hub id, config.json always), then runs every graph it needs and the eager
float32 model on exporting's sample inputs (batch 3 and batch 1) and refuses, with the numbers, a
graph that differs beyond exporting's own tolerance (float32: 1e-4 on any component of the
normalized embeddings). The runtimes (onnxruntime, openvino) are imported here, when a job asks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .config import dtype_name
from .errors import SiglipError
from .image import NaFlexPixels
from .model import match_logits
from .weights import Checkpoint

BACKENDS = ("torch", "onnx", "openvino")
RUNTIME_MODULE = {"onnx": "onnxruntime", "openvino": "openvino"}
RUNTIME_NAME = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}


class BackendError(SiglipError, ValueError):
    """A --backend / --graphs combination that cannot run: a usage error (exit 2), found before
    anything is written."""


class GraphMismatch(BackendError):
    """The start-up check: a graph that does not compute what the eager model of --model computes."""


class GraphModel(nn.Module):
    """The towers as exported graphs, behind the methods the jobs call on a SigLIP model.

    The graphs return L2-normalized embeddings only, so encode_image/encode_text return normalized
    rows whatever `normalize` says (`raw_embeddings` is False: the server refuses normalize=false).
    t' and b are the checkpoint's, as float32 parameters on the CPU (where the graphs run), which
    is also what the jobs read the device from."""

    raw_embeddings = False

    def __init__(self, graphs: dict, ckpt: Checkpoint, backend: str, precision: str,
                 logit_scale: float, logit_bias: float, folder: Path):
        super().__init__()
        self.graphs = graphs  # tower -> exporting.Graph
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.backend = backend
        self.graph_precision = precision  # export.json's: float32, fp16, int8 or bfloat16
        self.folder = folder
        self.towers = tuple(graphs)
        self.logit_scale = nn.Parameter(torch.tensor([logit_scale], dtype=torch.float32), requires_grad=False)
        self.logit_bias = nn.Parameter(torch.tensor([logit_bias], dtype=torch.float32), requires_grad=False)

    @property
    def precision(self) -> str:
        return self.graph_precision

    def _run(self, tower: str, *inputs: np.ndarray) -> Tensor:
        graph = self.graphs.get(tower)
        if graph is None:
            raise RuntimeError(f"{self.folder} has no {tower} graph; export it with --towers vision text")
        return torch.from_numpy(np.ascontiguousarray(graph(*inputs), dtype=np.float32))  # (B, D)

    def encode_image(self, pixel_values: Tensor | NaFlexPixels, normalize: bool = True) -> Tensor:
        """(B, 3, S, S) pixels, or NaFlexPixels -> (B, D) float32, normalized (the graph's output)."""
        if isinstance(pixel_values, NaFlexPixels):
            p = pixel_values
            return self._run("vision", p.patches.float().cpu().numpy(), p.mask.to(torch.int32).cpu().numpy(),
                             p.spatial_shapes.to(torch.int64).cpu().numpy())
        return self._run("vision", pixel_values.float().cpu().contiguous().numpy())

    def encode_text(self, input_ids: Tensor, normalize: bool = True) -> Tensor:
        """(B, L) int64 token ids -> (B, D) float32, normalized."""
        return self._run("text", input_ids.to(torch.int64).cpu().contiguous().numpy())

    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """As SigLIP.logits: exp(t') * cos + b in float32, (B_img, D), (B_txt, D) -> (B_img, B_txt)."""
        return match_logits(image_emb.float() @ text_emb.float().t(), self.logit_scale, self.logit_bias)


def check_args(backend: str, graphs: str | Path | None) -> None:
    """The flags alone: --graphs goes with a graph backend, and a graph backend needs it."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown --backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "torch" and graphs is not None:
        raise BackendError("--graphs DIR is for --backend onnx or openvino; the torch backend runs "
                           "the checkpoint itself")
    if backend != "torch" and graphs is None:
        raise BackendError(f"--backend {backend} needs --graphs DIR, a folder made by "
                           f"`siglip-so400m export MODEL --format {backend} --output DIR`")


def read_export(folder: str | Path, backend: str, towers: Sequence[str]) -> dict:
    """export.json of `folder`, checked to be a complete export of `backend` with `towers`."""
    folder = Path(folder)
    make = f"siglip-so400m export MODEL --format {backend} --output DIR"
    if not folder.is_dir():
        raise BackendError(f"--graphs {folder}: no such folder; make one with `{make}`")
    try:
        info = json.loads((folder / "export.json").read_text())
        fmt, graphs = info["format"], info["graphs"]
    except FileNotFoundError:
        raise BackendError(f"--graphs {folder} has no export.json, so it is not an export folder; make "
                           f"one with `{make}`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackendError(f"--graphs {folder}: export.json is damaged ({type(e).__name__}: {e}); "
                           f"export again with `{make}`") from None
    if fmt != backend:
        raise BackendError(f"--graphs {folder} holds {fmt} graphs (export.json), not {backend}: pass "
                           f"--backend {fmt}, or export with --format {backend}")
    for tower in towers:
        if tower not in graphs:
            raise BackendError(f"--graphs {folder} has no {tower} graph (export.json lists "
                               f"{', '.join(graphs) or 'none'}); this job needs the {' and '.join(towers)} "
                               "tower(s): export with --towers " + " ".join(towers))
        try:
            name = graphs[tower]["file"]
        except (KeyError, TypeError) as e:
            raise BackendError(f"--graphs {folder}: export.json is damaged (the {tower} graph has no "
                               f"file: {type(e).__name__}: {e}); export again with `{make}`") from None
        names = [name] + ([name.removesuffix(".xml") + ".bin"] if backend == "openvino" else [])
        for n in names:  # (an ONNX graph's external data: ONNX Runtime names it if it is missing)
            if not (folder / n).is_file():
                raise BackendError(f"--graphs {folder}: {n} is missing (export.json lists the {tower} "
                                   f"graph); export again with `{make}`")
    return info


def check_model(folder: str | Path, info: dict, ckpt: Checkpoint) -> None:
    """The folder was exported from the checkpoint load() resolves: for a Hub id its name and
    commit, and for any checkpoint the same config.json. (Another checkpoint of the same shape is
    what the start-up check's numbers catch.)"""
    model, revision = info.get("model"), info.get("revision")
    mine = f"{ckpt.name}" + (f" (revision {ckpt.revision})" if ckpt.revision else "")
    theirs = f"{model}" + (f" (revision {revision})" if revision else "")
    hint = f"export this checkpoint with `siglip-so400m export {ckpt.name} --format {info['format']}`"
    if (ckpt.revision or revision) and (model, revision) != (ckpt.name, ckpt.revision):
        raise BackendError(f"--graphs {folder} was exported from {theirs}, not from --model {mine}: "
                           f"pass --model {model}, or {hint}")
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BackendError(f"--graphs {folder}: config.json is missing or damaged ({e}); {hint}") from None
    if cfg != json.loads(json.dumps(ckpt.config.to_dict())):
        raise BackendError(f"--graphs {folder} was exported from {theirs}, whose config.json differs "
                           f"from that of --model {mine}: these graphs belong to another model; {hint}")


def check_dtype(dtype: str | None, info: dict, backend: str) -> str:
    """The graph's own precision (export.json) is what runs; a --dtype that says otherwise is refused."""
    precision = info.get("precision", "float32")
    if dtype is not None and dtype_name(dtype) != dtype_name(precision):
        raise BackendError(f"--dtype {dtype}: the {backend} graphs in --graphs compute in {precision} "
                           f"(export.json); leave --dtype out (or pass {precision}), or "
                           + _export_advice(dtype, backend))
    return precision


def _export_advice(dtype: str, backend: str) -> str:
    """The export that makes graphs computing in `dtype`: only what `export` accepts for a format."""
    from .exporting import PRECISIONS

    name = dtype_name(dtype)
    if name == "float16":  # float16 weights are an option of either format, not a --dtype
        return "export them again with --fp16 (float16 weights, computed in float32)"
    formats = [f for f, precisions in PRECISIONS.items() if name in precisions]
    if backend in formats:
        return f"export them again with --dtype {name}"
    if formats:
        return (f"export with --format {formats[0]} --dtype {name} and run those graphs with --backend "
                f"{formats[0]} ({backend} graphs compute in {' or '.join(PRECISIONS[backend])})")
    return "pass a --dtype that an export computes in: " + "; ".join(
        f"{f}: {', '.join(p)}" for f, p in PRECISIONS.items())


def require_runtime(backend: str) -> None:
    name = RUNTIME_MODULE[backend]
    try:
        __import__(name)
    except ImportError as e:
        raise BackendError(f"--backend {backend} runs the graphs in {RUNTIME_NAME[backend]}, and {name} is "
                           f"missing ({e}): pip install -e \".[export]\" (or 'siglip_so400m[export]')"
                           ) from None


def open_graphs(folder: str | Path, backend: str, ckpt: Checkpoint, towers: Sequence[str],
                dtype: str | None = None, tokenizer: str | Path | None = None,
                log: Callable[[str], None] | None = None):
    """GraphModel of `folder` and the checkpoint's Processor, after every check (the folder, the
    model it belongs to, the dtype, the runtime, and the graphs against the eager float32 model).
    Raises BackendError (GraphMismatch for the numbers)."""
    from . import exporting
    from .api import load

    folder = Path(folder)
    towers = tuple(t for t in ("vision", "text") if t in towers)
    info = read_export(folder, backend, towers)
    check_model(folder, info, ckpt)
    precision = check_dtype(dtype, info, backend)
    require_runtime(backend)
    eager, processor = load(ckpt, dtype=torch.float32, towers=towers, tokenizer=tokenizer)
    graphs = {}
    for tower in towers:
        path = folder / info["graphs"][tower]["file"]
        try:
            graphs[tower] = exporting.Graph(path, backend, precision)
        except exporting.ExportError as e:
            raise BackendError(f"--graphs {folder}: {e}; export again") from None
        sample = exporting.samples(eager, processor, tower)
        check = exporting.parity(eager, tower, sample, graphs[tower], backend, precision)
        bad = exporting.gate_failures(check, precision)
        if bad:
            raise GraphMismatch(f"--graphs {folder}: the {tower} graph {path.name} ({RUNTIME_NAME[backend]}, "
                                f"{precision}) does not compute what --model {ckpt.name} computes in eager "
                                f"float32: {'; '.join(bad)} ({check.inputs}); nothing was embedded. Export "
                                f"this checkpoint again: siglip-so400m export {ckpt.name} --format {backend}")
        if log:
            log(f"checked {path} against eager float32 at start: {check.line()}")
    scale, bias = eager.logit_scale.item(), eager.logit_bias.item()
    del eager  # the graphs run from here on; the eager model was only the reference
    return GraphModel(graphs, ckpt, backend, precision, scale, bias, folder), processor
