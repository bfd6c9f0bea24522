"""int8 inference for the linear layers: int8 weights per output channel, int8 activations per row.

    y[m, n] = s_x[m] * (s_w[n] * sum_k q_x[m, k] q_w[n, k]) + b[n]      q = round(v / s)
    s_w[n] = max_k |w[n, k]| / 127 (or 63, below)   s_x[m] = max_k |x[m, k]| / (127 (1 - 2^-8))

Weights are quantized once, at load, symmetrically with one scale per output channel. Activations are
quantized on the fly (dynamic quantization: no calibration data), symmetrically with one scale per row
(a token of one input). Not one scale for the whole tensor, although that would let the activation
scale, the bias and the GELU run inside the matmul's epilogue: the server batches inputs from
different clients, and with a tensor-wide scale one client's input moved another's embedding (cosine
0.99974 alone against batched on the tiny model). Per row, a row's int8 operands and its exact
integer sums depend on that row alone, so an embedding is bit-identical whatever it is batched with.

Two kernels, both on plain int8 tensors (not the deprecated quantized-tensor API, whose
`torch.quantize_per_channel` and `torch.ops.quantized.*` functions torch 2.14 warns will be removed):

- oneDNN's int8 matmul (`torch.ops.onednn.qlinear_pointwise`, the kernel PyTorch's own x86 Inductor
  quantization lowers to) on a weight packed once for it, with scale, bias and GELU fused, writing
  the output in the activations' dtype. At so400m's shapes on an AMX Xeon it measured faster than
  `torch._int_mm` itself (microbenchmarks; scripts/int8_routes.py compares the routes).
  On x86 CPUs without VNNI (an AVX2-only EPYC) its float32-activation kernel multiplies u8 by s8
  with `vpmaddubsw`, whose int16 sums of two products saturate for 8-bit weights: there the weights
  get 7 bits (|q| <= 63, ONNX Runtime's `reduce_range`), which keeps every sum exact at fp32 speed.
- elsewhere (no oneDNN: ARM, builds without mkldnn; or where a one-time probe finds oneDNN's result
  wrong for the activations' dtype with either weight range), `torch._int_mm` (int8 x int8 ->
  int32) on the pre-transposed weight, then the scales and bias as for oneDNN. Without VNNI or
  AMX that kernel is about 50x slower than a float32 matmul.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import FP32_KEYS

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
           and hasattr(torch.ops.onednn, "qlinear_pointwise")
           and hasattr(torch.ops.onednn, "qlinear_prepack"))
_log = logging.getLogger(__name__)
_onednn_works: dict[torch.dtype, int] = {}  # activations' dtype -> onednn_weight_max, probed once
WEIGHT_MAX = 127  # 8-bit weights; 63 (7 bits) where oneDNN's kernel saturates 8-bit ones


def onednn_weight_max(dtype: torch.dtype) -> int:
    """The largest |weight level| with which oneDNN's int8 matmul gives the right numbers here for
    activations in `dtype`: 127, 63, or 0 (not at all: torch._int_mm is used). Probed once per
    dtype against torch._int_mm on the same int8 operands (exact integer sums).

    Not an idle check: on an AMD EPYC with AVX2 only (no VNNI, no AVX-512), torch 2.13's
    qlinear_pointwise with float32 activations and 8-bit weights was 11-38% off (bf16 was exact),
    which made `--dtype int8` embeddings silently wrong there; with 7-bit weights it is exact."""
    limit = _onednn_works.get(dtype)
    if limit is None:
        limit = _onednn_works[dtype] = _probe_onednn(dtype)
    return limit


def onednn_works(dtype: torch.dtype) -> bool:
    """Whether the model uses oneDNN's int8 matmul for activations in `dtype` (onednn_weight_max)."""
    return onednn_weight_max(dtype) > 0


def _probe_onednn(dtype: torch.dtype) -> int:
    if not _ONEDNN:
        return 0
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(17, 64, generator=g).to(dtype)
    reasons = []
    for limit in (WEIGHT_MAX, 63):
        try:
            with torch.inference_mode():
                got = _matmul(x, quantize_weight(layer.weight, layer.bias, True, weight_max=limit)).float()
                ref = _matmul(x, quantize_weight(layer.weight, layer.bias, False, weight_max=limit)).float()
            # The same int8 operands: only the output's own rounding may differ (bf16: 2^-8 relative).
            tol = 1e-4 if dtype == torch.float32 else 2**-7
            if torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return limit
            reasons.append(f"with weights within +-{limit} its result is "
                           f"{((got - ref).abs().max() / ref.abs().max()).item():.1%} off torch._int_mm's "
                           "on the same int8 operands")
        except Exception as e:  # a private op that fails or is wrong is not used
            reasons.append(f"with weights within +-{limit}: {e}")
    _log.debug("oneDNN int8 matmul not used for %s activations, torch._int_mm instead: %s", dtype,
               "; ".join(reasons))
    return 0


@dataclass
class Int8Weight:
    """A linear layer's weight in int8, ready for one kernel; its float weight is gone."""

    weight: Tensor  # oneDNN: packed (opaque layout); _int_mm: (K, N) int8, contiguous
    scale: Tensor  # (N,) float32, per output channel
    bias: Tensor | None  # (N,) float32
    zero_points: Tensor  # (N,) int64 zeros, oneDNN's symmetric weight zero points
    onednn: bool
    out_features: int
    weight_max: int = WEIGHT_MAX  # the weight levels: -weight_max..weight_max


def quantize_weight(weight: Tensor, bias: Tensor | None, onednn: bool | None = None,
                    dtype: torch.dtype = torch.float32, weight_max: int | None = None) -> Int8Weight:
    """(N, K) float weight -> int8, symmetric, one scale per output channel, packed for oneDNN where
    it works for activations in `dtype` (onednn=None) or where asked, else laid out for torch._int_mm.
    weight_max: the levels (default: 127, or 63 where oneDNN needs 7-bit weights, onednn_weight_max)."""
    if onednn is None:
        onednn = onednn_works(dtype)
    if weight_max is None:
        weight_max = (onednn_weight_max(dtype) or WEIGHT_MAX) if onednn else WEIGHT_MAX
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / weight_max).clamp(min=1e-12)  # (N,)
    q = (w / scale[:, None]).round_().clamp_(-weight_max, weight_max).to(torch.int8)  # (N, K)
    if onednn:
        # Packed for the chip's int8 kernel (AMX tiles or VNNI blocks); the batch size is only a hint.
        q = torch.ops.onednn.qlinear_prepack(q, None)
    else:
        q = q.t().contiguous()  # (K, N): _int_mm reads its second operand row-major
    b = None if bias is None else bias.detach().float().clone()  # a copy: must not pin the file's mmap
    return Int8Weight(q, scale, b, torch.zeros(w.shape[0], dtype=torch.long), onednn, w.shape[0], weight_max)


# Activations are scaled to at most 127 * (1 - 2^-8), not 127: x / s_x, even with s_x and the
# product each rounded to bf16 (steps of 0.5 near 127), can then reach 127 but never 128, which the
# int8 cast would wrap to -128, and no clamp pass is needed. The step is 0.4% coarser, far below the
# rounding error itself.
_FULL_SCALE = 127 * (1 - 2**-8)


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) float -> (M, K) int8 and its (M, 1) float32 scales, symmetric, one scale per row.

    The row's 1 / s_x is rounded to x's dtype first and s_x is its exact inverse, so that x / s_x is
    one multiply in x's dtype (a float32 product of bf16 x would be a new (M, K) float32 tensor,
    which cost 5x the whole quantization in page faults) and a value comes back within half a step
    plus the product's own rounding. Three passes over x (max and min per row, which need no (M, K)
    temporary as |x| would; scale and round; cast): on AMX the int8 matmul is so fast that these
    passes cost about as much as it does for the MLP's 4304-wide input."""
    peak = torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).float()  # (M, 1)
    inv = (_FULL_SCALE / peak.clamp_(min=1e-10)).to(x.dtype)  # (M, 1) 1 / s_x
    return x.mul(inv).round_().to(torch.int8), 1 / inv.float()


# The last activation quantized, (x, its version, q, scale): attention's q, k and v projections read
# the same x, and quantizing it once instead of three times saves a third of a layer's quantizing.
# Holding x keeps its memory from being reused by another tensor while it is cached.
_last = threading.local()


def _quantize_cached(x: Tensor) -> tuple[Tensor, Tensor]:
    # Inference tensors keep no version counter; the model never writes into x between the calls.
    version = None if x.is_inference() else x._version
    hit = getattr(_last, "entry", None)
    if hit is not None and hit[0] is x and hit[1] == version:
        return hit[2], hit[3]
    q, s = quantize_activation(x.reshape(-1, x.shape[-1]))  # (M, K)
    _last.entry = (x, version, q, s)
    return q, s


def linear(x: Tensor, w: Int8Weight, gelu: bool = False) -> Tensor:
    """x @ W^T + b (then tanh-GELU if asked) on int8 weights; (..., K) -> (..., N) in x's dtype."""
    return _matmul(x, w, gelu, _quantize_cached(x)).view(*x.shape[:-1], w.out_features)


def _matmul(x: Tensor, w: Int8Weight, gelu: bool = False, qs: tuple[Tensor, Tensor] | None = None) -> Tensor:
    q, s = qs or quantize_activation(x.reshape(-1, x.shape[-1]))  # (M, K) int8, (M, 1) scales
    if w.onednn:
        # s_w[n] * sum_k q_x q_w in float32; oneDNN takes one activation scale, so 1 here, and the
        # rows' own scales below.
        acc = torch.ops.onednn.qlinear_pointwise(
            q, 1.0, 0, w.weight, w.scale, w.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    else:
        acc = torch._int_mm(q, w.weight) * w.scale  # (M, N) int32 sums -> float32, s_w[n] applied
    # In place: a new (M, N) tensor costs more in page faults than these passes cost in arithmetic
    # (at the image MLP's 2916 x 4304, addcmul took 24 ms where mul_ and add_ took 2).
    y = acc.mul_(s)  # s_x[m] per row
    if w.bias is not None:
        y.add_(w.bias)
    if gelu:
        torch.ops.aten.gelu_(y, approximate="tanh")
    return y.to(x.dtype)  # (M, N)


def quantize_int8(module: nn.Module, dtype: torch.dtype = torch.float32, onednn: bool | None = None) -> int:
    """Turn every nn.Linear of `module` into an int8 layer for CPU inference; returns how many.

    The other parameters (LayerNorms, embeddings, the patch conv, the MAP head's packed projection)
    go to `dtype`, in which activations also flow between the int8 matmuls. The float weights and
    biases of the quantized layers are released (replaced by meta tensors): the model is for inference
    only. The remaining parameters are copied out of the checkpoint's mmap, so that the file's pages,
    all read once to quantize, are unmapped and leave the process's memory."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.int8 = quantize_weight(m.weight, m.bias, onednn, dtype)
            m.weight = nn.Parameter(m.weight.to("meta"), requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.to("meta"), requires_grad=False)
            count += 1
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.requires_grad_(False)
            if not p.is_meta:
                # t' and b stay float32 whatever the dtype (why: config.FP32_KEYS).
                keep = torch.float32 if name in FP32_KEYS else dtype
                p.data = p.data.to(keep, copy=True)
    return count
