"""Each tower as its own ONNX or OpenVINO graph, exact in float32, checked by the runtime at export.

    pip install -e ".[export]"
    siglip-so400m export google/siglip-so400m-patch14-384 --format onnx --output so400m-onnx/
    siglip_so400m.export("google/siglip2-so400m-patch16-256", "out/", format="openvino")

What DIR holds (docs/export.md; the README written into DIR says the same for its checkpoint):

    vision.onnx + vision.onnx.data   pixel_values (B, 3, S, S) float32 -> image_embeds (B, D) float32
      SigLIP 2 NaFlex: pixel_values (B, N, 3*P*P) float32, pixel_attention_mask (B, N) int32,
      spatial_shapes (B, 2) int64 (transformers' Siglip2 inputs) -> image_embeds (B, D) float32
    text.onnx + text.onnx.data       input_ids (B, L) int64 -> text_embeds (B, D) float32
      (OpenVINO: vision.xml + vision.bin, text.xml + text.bin)
      both outputs L2-normalized, so logits = exp(t') * image_embeds @ text_embeds.T + b
    config.json, preprocessor_config.json, the tokenizer files   what a runtime needs beside them
    export.json                      format, precision, inputs and outputs, t' and b, parity measured
    README.md

B is dynamic in every graph; S (the checkpoint's image size) and L (its text length, 64 or 16) are
fixed, since SigLIP pads every text to L and the position table is learned at S. NaFlex's N (patch
slots, an image's own h * w first, then padding) is dynamic too: its graph resizes the position table
to each image's grid from spatial_shapes as a tensor (model.naflex_positions), not from Python ints.

The graphs come from torch.onnx's torch.export-based exporter (the TorchScript one is deprecated and,
traced under no_grad, met our CPU fast paths: an internal assert in torch 2.14.1). They are traced
with grad mode on: our fast paths (kernels.linear's and kernels.attention's private oneDNN ops, the
image tower's image-by-image loop on CPU) run only for CPU inference without grad, so the trace sees
the plain PyTorch ops alone, and no global state is touched. OpenVINO converts the same ONNX graph
and saves it without fp16 compression (its default, which alone moves so400m's normalized
embeddings by 2.6e-4) unless fp16=True.

Nothing leaves the temporary folder until the target runtime has run every graph on sample inputs at
batch 3 and batch 1 and matched the eager model within the tolerance; otherwise export fails with
the numbers and DIR is not made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import DTYPES, dtype_name
from .errors import SiglipError
from .image import NaFlexPixels
from .model import naflex_positions
from .weights import DEFAULT_REPO, TOKENIZER_FILES, Checkpoint, CheckpointError

FORMATS = ("onnx", "openvino")
# Which precisions each runtime is given: float32 everywhere; bfloat16 is OpenVINO's inference
# precision hint (the graph stays float32; CPUs without bf16 compute float32 instead); int8 is ONNX
# Runtime's dynamic quantization of the matmul weights per output channel (see _quantize_int8).
PRECISIONS = {"onnx": ("float32", "int8"), "openvino": ("float32", "bfloat16")}
GRAPH_FILES = {"onnx": ".onnx", "openvino": ".xml"}
INPUTS = {"vision": "pixel_values", "text": "input_ids"}
# SigLIP 2 NaFlex's image graph takes what transformers' Siglip2ImageProcessor returns, by its names
# and dtypes (the mask is int32 there), so its output feeds the graph as it is.
NAFLEX_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
OUTPUTS = {"vision": "image_embeds", "text": "text_embeds"}
OPSET = 18
# The parity gate, on L2-normalized embeddings against the eager float32 model: the largest
# difference of any component (float32: 1e-4, what transformers' own graphs meet) and the smallest
# cosine similarity of a row, for the precisions that round on purpose.
MAX_ABS = {"float32": 1e-4}
MIN_COSINE = {"float32": 0.99999, "fp16": 0.999, "bfloat16": 0.99, "int8": 0.98}
SAMPLE_TEXTS = ("a photo of 2 cats", "a plane in the sky", "une télécommande rouge")


class ExportError(SiglipError, RuntimeError):
    """An export that cannot be made or that failed its parity check; the message says why."""


def _require(fmt: str) -> None:
    """Import what this export needs, or fail naming the [export] extra."""
    needed = ["onnx", "onnxscript"]  # torch.onnx's exporter writes ONNX through onnxscript
    needed.append("onnxruntime" if fmt == "onnx" else "openvino")
    for name in needed:
        try:
            __import__(name)
        except ImportError as e:
            raise ExportError(f"exporting to {fmt} needs {', '.join(needed)}; {name} is missing ({e}). "
                              "Install them with: pip install 'siglip_so400m[export]'") from None


@dataclass
class TowerCheck:
    """What the parity gate measured for one graph: the target runtime against the eager model."""

    tower: str
    graph: str
    max_abs_diff: float  # over every component of the normalized embeddings, batches 3 and 1
    min_cosine: float
    batch_1_vs_3: float  # max |row 0 at batch 1 - row 0 at batch 3|: the dynamic batch is real
    runtime_precision: str  # what the runtime reported it computed in
    inputs: str = "batch 3 and 1"  # what the gate ran (NaFlex: the grids and the padding)

    def line(self) -> str:
        return (f"{self.tower}: {self.graph} max |diff| {self.max_abs_diff:.2e}, min cosine "
                f"{self.min_cosine:.7f} against eager float32 ({self.inputs}; batch 1 vs 3 "
                f"{self.batch_1_vs_3:.1e}; runtime computed in {self.runtime_precision})")


def export(model: str | Path | Checkpoint = DEFAULT_REPO, output: str | Path = "siglip-export", *,
           format: str = "onnx", dtype: str = "float32", fp16: bool = False,
           towers: Sequence[str] = ("vision", "text"), revision: str | None = None,
           config: str | Path | None = None, tokenizer: str | Path | None = None,
           log: Callable[[str], None] | None = None) -> dict:
    """Export the towers of `model` (anything load() takes) into the new folder `output`.

    format: "onnx" or "openvino". dtype: "float32" (exact, the default), "bfloat16" (OpenVINO's
    inference precision) or "int8" (ONNX Runtime's dynamic quantization). fp16: store the weights in
    float16 (half the files; computed in float32 after a cast). towers: ("vision",), ("text",) or
    both. Returns what export.json holds, the parity figures included; raises ExportError."""
    log = log or _stderr
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in PRECISIONS[format]:
        raise ExportError(f"{format} exports take dtype {' or '.join(PRECISIONS[format])}, not {dtype!r}"
                          + (" (int8: use --format onnx)" if dtype == "int8" else "")
                          + (" (bfloat16: use --format openvino)" if dtype == "bfloat16" else ""))
    if fp16 and dtype == "int8":
        raise ExportError("fp16 stores float weights in float16; an int8 export has int8 weights already")
    if isinstance(towers, str):
        towers = (towers,)
    if not towers or set(towers) - {"vision", "text"}:
        raise ExportError(f"towers must be a non-empty subset of ('vision', 'text'), got {towers!r}")
    towers = tuple(t for t in ("vision", "text") if t in towers)
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: export writes a new folder; "
                          "give another --output or remove it")
    _require(format)

    from .api import load

    try:
        sig, processor = load(model, revision=revision, config=config, tokenizer=tokenizer,
                              towers=towers, dtype=torch.float32)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    _clear_stale_partials(out, log)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    precision = "fp16" if fp16 else dtype
    try:
        checks = []
        for tower in towers:
            sample = samples(sig, processor, tower)
            log(f"exporting the {tower} tower to {format} ({precision}) ...")
            graph = _export_tower(sig, tower, sample, work, format, dtype, fp16)
            log(f"checking {graph.name} in {'ONNX Runtime' if format == 'onnx' else 'OpenVINO'} ...")
            check = parity(sig, tower, sample, graph, format, dtype)
            log(check.line())
            _gate(check, precision)
            checks.append(check)
        info = _write_support_files(work, sig, processor, format, dtype, precision, towers, checks)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return info


def _clear_stale_partials(out: Path, log: Callable[[str], None]) -> None:
    """Remove the temporary folders `.OUT.partial-<pid>` of exports into `out` whose process no longer
    runs: one killed (SIGKILL, OOM, a power cut) never reached its own cleanup, and at full size left
    gigabytes. A live process's folder is left alone: two exports into one OUT is its own conflict,
    so a pid of another machine sharing the folder is not a case to guard."""
    import glob

    for d in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = d.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d}, left by an export (process {pid}) that no longer runs")


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: keep everything
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, the process is only looked up
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Embeddings(nn.Module):
    """One tower and the L2 normalization: the graph's whole computation."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower(x), dim=-1)  # (B, D)


class _NaFlexEmbeddings(nn.Module):
    """A SigLIP 2 NaFlex image tower on transformers' three inputs, as one padded batch with the key
    mask: the eager tower's masked path (VisionTower._tokens without packing), except that the
    position table is resized from spatial_shapes as a tensor (model.naflex_positions), since the
    eager resize takes each grid as Python ints and would fix the grids, B and N in the graph."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                spatial_shapes: torch.Tensor) -> torch.Tensor:
        t = self.tower
        emb = t.embeddings
        x = F.linear(pixel_values, emb.patch_embedding.weight, emb.patch_embedding.bias)  # (B, N, D)
        x = x + naflex_positions(emb.position_embedding.weight, emb.grid, spatial_shapes,
                                 pixel_values.shape[1])  # (B, N, D)
        # Padding is hidden as keys in every attention layer and from the MAP head's probe, as
        # transformers hides it (its additive finfo.min mask gives the same zero weights as -inf).
        mask = (pixel_attention_mask != 0)[:, None, None, :]  # (B, 1, 1, N)
        for y in t.encoder.blocks(x, mask=mask):
            x = y
        return F.normalize(t.head(t.post_layernorm(x), mask), dim=-1)  # (B, D)


@dataclass
class _Sample:
    """A graph's inputs for the trace and the parity gate: a batch of 3 and one of 1, in the graph's
    input order, and how they were made (for the report)."""

    names: tuple[str, ...]
    batch3: tuple[torch.Tensor, ...]
    batch1: tuple[torch.Tensor, ...]
    dynamic: tuple[dict, ...]  # torch.export dynamic_shapes, one dict per input
    what: str = "batch 3 and 1"


def _naflex(sig: nn.Module, tower: str) -> bool:
    return tower == "vision" and sig.config.vision_config.naflex


def samples(sig: nn.Module, processor, tower: str) -> _Sample:
    """Three inputs for the trace and the parity gate: pixels in the processor's [-1, 1] range, and
    tokenized texts where the checkpoint has a tokenizer (else random ids over the vocabulary).
    NaFlex: three images of other aspect ratios through the checkpoint's processor (other grids,
    other padding), and the first alone without padding (another N through the same graph)."""
    g = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch")
    if _naflex(sig, tower):
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                  for height, width in ((40, 320), (300, 60), (100, 90))]
        px = processor.image(images)  # padded to the processor's max_num_patches
        one = px.unpadded()[0]

        def inputs(p: NaFlexPixels) -> tuple[torch.Tensor, ...]:
            return p.patches, p.mask.to(torch.int32), p.spatial_shapes.to(torch.int64)

        grids = ", ".join(f"{h}x{w}" for h, w in px.spatial_shapes.tolist())
        n = torch.export.Dim("patches")
        dynamic = ({0: batch, 1: n}, {0: batch, 1: n}, {0: batch})
        h0, w0 = px.spatial_shapes[0].tolist()
        what = f"batch 3 of grids {grids} padded to {px.patches.shape[1]}, batch 1 of {h0}x{w0} unpadded"
        return _Sample(NAFLEX_INPUTS, inputs(px), inputs(one), dynamic, what)
    if tower == "vision":
        v = sig.config.vision_config
        x = torch.rand(3, v.num_channels, v.image_size, v.image_size, generator=g) * 2 - 1
    elif processor.tokenizer is not None:
        x = processor.texts(list(SAMPLE_TEXTS))
    else:
        t = sig.config.text_config
        x = torch.randint(0, t.vocab_size, (3, t.max_position_embeddings), generator=g)
    return _Sample((INPUTS[tower],), (x,), (x[:1],), ({0: batch},))


def _export_tower(sig: nn.Module, tower: str, sample: _Sample, work: Path, fmt: str, dtype: str,
                  fp16: bool) -> Path:
    wrap = _NaFlexEmbeddings if _naflex(sig, tower) else _Embeddings
    module = wrap(sig.vision_model if tower == "vision" else sig.text_model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    onnx_path = work / f"{tower}.onnx"
    # Grad mode on, parameters frozen: the fast paths (CPU inference without grad only) step aside
    # and the trace records the plain ops; nothing is differentiated since nothing requires grad.
    # The exporter reports its steps on stdout: they go to stderr with the other progress lines.
    # Traced at batch 2: a batch of 1 would let the exporter take B for the constant 1.
    with torch.enable_grad(), contextlib.redirect_stdout(sys.stderr), _quiet():
        torch.onnx.export(module, tuple(x[:2] for x in sample.batch3), str(onnx_path), dynamo=True,
                          external_data=True, opset_version=OPSET, input_names=list(sample.names),
                          output_names=[OUTPUTS[tower]], dynamic_shapes=sample.dynamic)
    if fmt == "onnx":
        if dtype == "int8":
            return _quantize_int8(onnx_path)
        if fp16:
            _weights_to_fp16(onnx_path)
        return onnx_path
    graph = onnx_to_openvino(onnx_path, work / f"{tower}.xml", fp16)
    for f in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        f.unlink(missing_ok=True)
    return graph


def onnx_to_openvino(onnx_path: Path, xml_path: Path, fp16: bool = False) -> Path:
    """OpenVINO's IR of an ONNX graph, weights kept in float32 unless fp16 (save_model's default
    compresses them to fp16)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=fp16)
    return xml_path


@contextlib.contextmanager
def _quiet():
    """The exporter's notes that concern nothing we use (torchvision ops, constant folding of Split,
    its own deprecations), silenced while it runs; real errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _weights_to_fp16(path: Path) -> None:
    """Store every float32 weight matrix as float16 with a Cast back to float32 before its use: half
    the file, computed in float32 (what OpenVINO's compress_to_fp16 does to its weights)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    casts, keep = [], []
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            weight = numpy_helper.to_array(init).astype(np.float16)
            half = numpy_helper.from_array(weight, init.name + ".fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(m, str(path), save_as_external_data=True, location=data.name)


def _quantize_int8(path: Path) -> Path:
    """ONNX Runtime's dynamic int8: matmul weights 8-bit per output channel, activations quantized per
    tensor at run time (as our own int8 mode does; no calibration data), so a row depends a little
    on the rest of its batch.

    Weights unsigned (u8 x u8): with signed weights, x86 CPUs without VNNI (AVX2 only, like this
    project's EPYC) saturate the int16 sums of u8 x s8 products; on the tiny test model that alone
    took the cosine to fp32 from 0.9998 down to 0.965."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    with _quiet():  # it asks for a pre-processing pass that the dynamo exporter's graph does not need
        quantize_dynamic(str(path), str(tmp), per_channel=True, weight_type=QuantType.QUInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink()
    # Rename the graph to vision.onnx / text.onnx; its external data keeps the name it points to.
    os.replace(tmp, path)
    return path


class Graph:
    """One exported tower run by its runtime: numpy arrays in (one per graph input, in the graph's
    order: NaFlex's image graph takes three), (B, D) float32 normalized out.

    ONNX Runtime runs on the CPU execution provider with its threads' spinning off; OpenVINO on the
    CPU with the inference precision of the export ("f32" unless the export asked for bf16:
    OpenVINO's default on CPUs with bf16 is bf16, which would not be exact)."""

    def __init__(self, path: str | Path, runtime: str, precision: str = "float32"):
        self.path = Path(path)
        self.runtime = runtime
        if runtime == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # Spinning threads keep their cores busy between calls, which slows every other runtime
            # in the process (torch's preprocessing in the server; a benchmark's other runtimes).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            try:
                self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own pybind error types
                raise ExportError(f"ONNX Runtime cannot load {self.path}: {e}") from None
            self.inputs = [i.name for i in self._session.get_inputs()]
            self.precision = "float32" if precision != "int8" else "int8 matmuls, float32 elsewhere"
        else:
            import openvino as ov

            hint = "bf16" if precision == "bfloat16" else "f32"
            try:
                self._compiled = ov.Core().compile_model(str(self.path), "CPU",
                                                          {"INFERENCE_PRECISION_HINT": hint})
            except Exception as e:
                raise ExportError(f"OpenVINO cannot load {self.path}: {e}") from None
            got = self._compiled.get_property("INFERENCE_PRECISION_HINT")
            # An ov.Type: f32, bf16 or f16 (numpy has no bf16, so no to_dtype()).
            self.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(
                got.get_type_name(), got.get_type_name())
            self.inputs = [i.get_any_name() for i in self._compiled.inputs]
            self._request = self._compiled.create_infer_request()

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), "
                             f"got {len(inputs)}")
        feed = dict(zip(self.inputs, inputs, strict=True))
        if self.runtime == "onnx":
            return self._session.run(None, feed)[0]
        return self._request.infer(feed)[0].copy()


def _eager(sig: nn.Module, tower: str, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """The eager model's normalized embeddings of a graph's inputs, (B, D) float32."""
    with torch.inference_mode():
        if _naflex(sig, tower):
            patches, mask, shapes = inputs
            x = sig.encode_image(NaFlexPixels(patches, mask.bool(), shapes), normalize=True)
            return x.float().numpy()
        encode = sig.encode_image if tower == "vision" else sig.encode_text
        return encode(inputs[0], normalize=True).float().numpy()


def parity(sig: nn.Module, tower: str, sample: _Sample, graph: Path | Graph, fmt: str,
            dtype: str) -> TowerCheck:
    """The gate's figures; `graph` a path, or a Graph already open (backends' start-up check runs
    the very session the job then uses)."""
    ref3, ref1 = _eager(sig, tower, sample.batch3), _eager(sig, tower, sample.batch1)  # (3, D), (1, D)
    run = graph if isinstance(graph, Graph) else Graph(graph, fmt, dtype)
    graph = run.path
    got3 = run(*(x.numpy() for x in sample.batch3))
    got1 = run(*(x.numpy() for x in sample.batch1))
    if got3.shape != ref3.shape or got1.shape != ref1.shape:
        raise ExportError(f"{graph.name} returned shapes {got3.shape} and {got1.shape} for batches of 3 "
                          f"and 1; expected {ref3.shape} and {ref1.shape}")
    got = np.concatenate([got3, got1])
    want = np.concatenate([ref3, ref1])
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return TowerCheck(tower, graph.name, float(np.abs(got - want).max()), float(cos.min()),
                      float(np.abs(got1[0] - got3[0]).max()), run.precision, sample.what)


def gate_failures(check: TowerCheck, precision: str) -> list[str]:
    """What the parity gate finds wrong with a check at `precision` (empty: it passes); the export's
    gate and embed/serve's start-up check on --graphs (backends.py) apply this one rule."""
    max_abs, min_cos = MAX_ABS.get(precision), MIN_COSINE[precision]
    bad = []
    if not np.isfinite(check.max_abs_diff) or (max_abs is not None and check.max_abs_diff > max_abs):
        bad.append(f"max |diff| {check.max_abs_diff:.3e} > {max_abs:g}" if max_abs else "non-finite output")
    if not check.min_cosine >= min_cos:
        bad.append(f"min cosine {check.min_cosine:.7f} < {min_cos}")
    return bad


def _gate(check: TowerCheck, precision: str) -> None:
    bad = gate_failures(check, precision)
    if bad:
        raise ExportError(f"the exported {check.tower} graph {check.graph} does not match the eager model "
                          f"({precision}): {'; '.join(bad)}. Nothing was written.")


def _write_support_files(work: Path, sig: nn.Module, processor, fmt: str, dtype: str, precision: str,
                         towers: tuple[str, ...], checks: list[TowerCheck]) -> dict:
    cfg = sig.config
    (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if "vision" in towers:
        im = processor.image
        common = {"do_resize": im.do_resize, "resample": int(im.resample), "do_rescale": im.do_rescale,
                  "rescale_factor": im.rescale_factor, "do_normalize": im.do_normalize,
                  "image_mean": list(im.image_mean), "image_std": list(im.image_std)}
        if cfg.naflex:  # what transformers' Siglip2ImageProcessor reads
            pre = {"image_processor_type": "Siglip2ImageProcessor", "patch_size": im.patch_size,
                   "max_num_patches": im.max_num_patches, **common}
        else:
            pre = {"image_processor_type": "SiglipImageProcessor",
                   "size": {"height": im.height, "width": im.width}, **common}
        (work / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    tokenizer_files = []
    if "text" in towers and processor.tokenizer is not None:
        src = Path(processor.tokenizer.path)
        for f in sorted({src, *(src.parent / n for n in TOKENIZER_FILES)}):
            if f.is_file():
                shutil.copyfile(f, work / f.name)
                tokenizer_files.append(f.name)
    v, t = cfg.vision_config, cfg.text_config
    ext = GRAPH_FILES[fmt]
    graphs = {}
    # "inputs" lists every input in the graph's order; single-input graphs also keep "input".
    if "vision" in towers and cfg.naflex:
        P, C = v.patch_size, v.num_channels
        graphs["vision"] = {"file": f"vision{ext}", "inputs": [
            {"name": "pixel_values", "dtype": "float32", "shape": ["batch", "patches", C * P * P]},
            {"name": "pixel_attention_mask", "dtype": "int32", "shape": ["batch", "patches"]},
            {"name": "spatial_shapes", "dtype": "int64", "shape": ["batch", 2]}]}
    elif "vision" in towers:
        graphs["vision"] = {"file": f"vision{ext}", "input": {"name": INPUTS["vision"], "dtype": "float32",
                            "shape": ["batch", v.num_channels, v.image_size, v.image_size]}}
    if "vision" in towers:
        graphs["vision"]["output"] = {"name": OUTPUTS["vision"], "dtype": "float32",
                                      "shape": ["batch", v.hidden_size], "normalized": True}
    if "text" in towers:
        graphs["text"] = {"file": f"text{ext}", "input": {"name": INPUTS["text"], "dtype": "int64",
                          "shape": ["batch", t.max_position_embeddings]},
                          "output": {"name": OUTPUTS["text"], "dtype": "float32",
                                     "shape": ["batch", t.projection_size], "normalized": True}}
    for g in graphs.values():
        g.setdefault("inputs", [g.get("input")])
    ckpt = getattr(sig, "checkpoint", None)
    import onnx

    versions = {"torch": torch.__version__, "onnx": onnx.__version__}
    if fmt == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    else:
        import openvino

        versions["openvino"] = openvino.__version__
    info = {
        "format": fmt, "precision": precision, "opset": OPSET,
        "weights": "float16, cast to float32" if precision == "fp16" else
                   "int8 matmul weights per output channel" if dtype == "int8" else "float32",
        "model": ckpt.name if ckpt else None, "revision": ckpt.revision if ckpt else None,
        "graphs": graphs,
        "logit_scale": sig.logit_scale.item(), "logit_bias": sig.logit_bias.item(),
        "tokenizer_files": tokenizer_files,
        "runtime_config": {"INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32"}
                          if fmt == "openvino" else {"providers": ["CPUExecutionProvider"]},
        "parity": [asdict(c) for c in checks],
        "versions": versions,
    }
    (work / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    (work / "README.md").write_text(_readme(info, processor, cfg))
    return info


def _readme(info: dict, processor, cfg) -> str:
    fmt, runtime = info["format"], "ONNX Runtime" if info["format"] == "onnx" else "OpenVINO"
    lines = [f"# {info['model'] or 'SigLIP'}: {', '.join(info['graphs'])} tower(s) as {fmt} graphs", "",
             f"Made by `siglip-so400m export` (siglip_so400m). Precision: {info['precision']} "
             f"(weights: {info['weights']}). Every graph has a dynamic batch B and returns "
             "L2-normalized float32 embeddings.", "",
             "| graph | inputs | output |", "|---|---|---|"]
    for g in info["graphs"].values():
        o = g["output"]
        ins = ", ".join(f"`{i['name']}` {i['dtype']} ({', '.join(map(str, i['shape']))})"
                        for i in g["inputs"])
        lines.append(f"| `{g['file']}` | {ins} "
                     f"| `{o['name']}` {o['dtype']} ({', '.join(map(str, o['shape']))}), normalized |")
    lines += ["", f"Scores: `logits = exp({info['logit_scale']:.6f}) * image_embeds @ text_embeds.T + "
              f"({info['logit_bias']:.6f})` (t' and b, also in export.json); `sigmoid(logits)` is the "
              "probability that an image and a text match, each pair on its own.", ""]
    if "vision" in info["graphs"] and cfg.naflex:
        lines += _naflex_readme(processor.image, cfg.vision_config)
    elif "vision" in info["graphs"]:
        im = processor.image
        lines += [f"Pixels (preprocessor_config.json): RGB, with any transparency composited onto white "
                  "first (as transformers converts RGBA and palette images; dropping the alpha channel "
                  f"instead gives other embeddings), resized to {im.height}x{im.width} with PIL "
                  f"filter {int(im.resample)} (no crop), times {im.rescale_factor:.6g}, minus "
                  f"{list(im.image_mean)}, divided by {list(im.image_std)}, channels first.", ""]
    if "text" in info["graphs"]:
        L = cfg.text_config.max_position_embeddings
        files = ", ".join(info["tokenizer_files"]) or "none were found: bring the checkpoint's own"
        lines += [f"Token ids (tokenizer files: {files}): padded to exactly {L} tokens as the "
                  "checkpoint was trained (the text tower reads the last position); no attention mask"
                  + ("; texts lowercased first, as in training" if processor.tokenizer is not None
                     and getattr(processor.tokenizer, "do_lower_case", False) else "") + ".", ""]
    if fmt == "openvino":
        hint = info["runtime_config"]["INFERENCE_PRECISION_HINT"]
        lines += [f"Compile with `{{'INFERENCE_PRECISION_HINT': '{hint}'}}`: on CPUs with bf16 OpenVINO "
                  "otherwise computes in bf16 by default.", ""]
    lines += [f"Parity measured at export, {runtime} against the eager float32 model, batches 3 and 1:", ""]
    lines += [f"- {TowerCheck(**c).line()}" for c in info["parity"]]
    return "\n".join(lines) + "\n"


def _naflex_readme(im, v) -> list[str]:
    """How to make the NaFlex image graph's three inputs without Python (docs/naflex.md, docs/export.md)."""
    P = v.patch_size
    return [
        "SigLIP 2 NaFlex: each image at its own aspect ratio, as up to N patches (N is dynamic; "
        f"preprocessor_config.json says max_num_patches {im.max_num_patches}, the checkpoint's default). "
        "transformers' `Siglip2ImageProcessor` makes the three inputs exactly (its `pixel_values`, "
        "`pixel_attention_mask` and `spatial_shapes`, dtypes included). Without it, per image:", "",
        "1. RGB, with any transparency composited onto white (as transformers converts RGBA and palette "
        "images). Find the largest scale s (bisection on [1e-6, 100] until the interval is under 1e-5) "
        f"such that H = max({P}, ceil(height*s/{P})*{P}) and W = max({P}, ceil(width*s/{P})*{P}) give "
        f"(H/{P})*(W/{P}) <= max_num_patches; resize to W x H with PIL filter {int(im.resample)}.",
        f"2. times {im.rescale_factor:.6g} (in float64, then float32), minus {list(im.image_mean)}, "
        f"divided by {list(im.image_std)}.",
        f"3. Cut into h = H/{P} rows and w = W/{P} columns of {P}x{P} patches, row-major; flatten each "
        f"patch channel-last (y, x, channel) to {P * P * v.num_channels} values.",
        "4. Pad the batch to a common N >= every h*w with zero patches: `pixel_values` (B, N, "
        f"{P * P * v.num_channels}) float32; `pixel_attention_mask` (B, N) int32, 1 on an image's own h*w "
        "patches (they come first), 0 on padding; `spatial_shapes` (B, 2) int64, each image's (h, w).", "",
        "Padding changes nothing (it is masked as keys everywhere, the pooling included): pad to the "
        "longest image of a batch, or to max_num_patches. Every image needs h*w >= 1 and its mask to say "
        "exactly its h*w patches; the graph does not check this.", ""]


def export_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Export the image and text towers as separate "
                                "ONNX or OpenVINO graphs (dynamic batch, normalized embeddings), checked "
                                "against the eager model in the target runtime (docs/export.md).")
    p.add_argument("model", nargs="?", help="Hub id, folder, .safetensors or big_vision .npz (default: "
                   f"{DEFAULT_REPO})")
    # --model as every other command takes it (embed, eval, serve, ...), or the positional MODEL.
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as MODEL")
    p.add_argument("--format", required=True, help="onnx or openvino")
    p.add_argument("--output", "-o", required=True, type=Path, help="a new (or empty) folder")
    p.add_argument("--dtype", default="float32",
                   choices=[k for k, v in DTYPES.items() if v in ("float32", "bfloat16", "int8")],
                   help="float32 (exact, default); bf16: OpenVINO's inference precision; int8: ONNX "
                        "Runtime's dynamic quantization")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size, "
                   "not exact); off by default")
    p.add_argument("--towers", nargs="+", default=["vision", "text"], choices=("vision", "text"))
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--config", type=Path, help="config.json for a bare .safetensors or .npz")
    p.add_argument("--tokenizer", type=Path, help="tokenizer file for a checkpoint without one beside it")
    args = p.parse_args(argv)
    if args.model and args.model_flag and args.model != args.model_flag:
        p.error(f"two models given: MODEL {args.model} and --model {args.model_flag}; give one")
    dtype = dtype_name(args.dtype)
    try:
        export(args.model_flag or args.model or DEFAULT_REPO, args.output, format=args.format, dtype=dtype,
               fp16=args.fp16, towers=args.towers, revision=args.revision, config=args.config,
               tokenizer=args.tokenizer)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

