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

import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune
from .config import FP32_KEYS
from .errors import SiglipError

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
           and hasattr(torch.ops.onednn, "qlinear_pointwise")
           and hasattr(torch.ops.onednn, "qlinear_prepack"))
_log = logging.getLogger(__name__)
_onednn_works: dict[tuple, int] = {}  # (activations' dtype, zero point) -> onednn_weight_max, probed once
_OFF = ("0", "false", "no", "off")
WEIGHT_MAX = 127  # 8-bit weights; 63 (7 bits) where oneDNN's kernel saturates 8-bit ones


def onednn_weight_max(dtype: torch.dtype, zero_point: int = 0) -> int:
    """The largest |weight level| with which oneDNN's int8 matmul gives the right numbers here for
    activations in `dtype` taken as s8 (zero_point 0) or u8 (128): 127, 63, or 0 (not at all). Probed
    once per dtype and zero point against torch._int_mm on the same int8 operands (exact sums).

    Not an idle check: on an AMD EPYC with AVX2 only (no VNNI, no AVX-512), torch 2.13's
    qlinear_pointwise with float32 activations and 8-bit weights was 11-38% off (bf16 was exact),
    which made `--dtype int8` embeddings silently wrong there; with 7-bit weights it is exact."""
    limit = _onednn_works.get((dtype, zero_point))
    if limit is None:
        limit = _onednn_works[dtype, zero_point] = _probe_onednn(dtype, zero_point)
    return limit


def onednn_works(dtype: torch.dtype, zero_point: int = 0) -> bool:
    """Whether oneDNN's int8 matmul may run for activations in `dtype` (onednn_weight_max)."""
    return onednn_weight_max(dtype, zero_point) > 0


def _probe_onednn(dtype: torch.dtype, zero_point: int) -> int:
    if not _ONEDNN:
        return 0
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(17, 64, generator=g).to(dtype)
    reasons = []
    for limit in (WEIGHT_MAX, 63):
        try:
            with torch.inference_mode():
                w, b = layer.weight, layer.bias
                got = _matmul(x, quantize_weight(w, b, True, dtype, limit, zero_point)).float()
                ref = _matmul(x, quantize_weight(w, b, False, dtype, limit)).float()
            # The same int8 operands: only the output's own rounding may differ (bf16: 2^-8 relative).
            tol = 1e-4 if dtype == torch.float32 else 2**-7
            if torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return limit
            reasons.append(f"with weights within +-{limit} its result is "
                           f"{((got - ref).abs().max() / ref.abs().max()).item():.1%} off torch._int_mm's "
                           "on the same int8 operands")
        except Exception as e:  # a private op that fails or is wrong is not used
            reasons.append(f"with weights within +-{limit}: {e}")
    _log.debug("oneDNN int8 matmul not used for %s activations as %s, torch._int_mm instead: %s", dtype,
               "u8" if zero_point else "s8", "; ".join(reasons))
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
    zero_point: int = 0  # the activations': 128 where oneDNN takes them as u8 (q + 128), else 0 (s8)


def quantize_weight(weight: Tensor, bias: Tensor | None, onednn: bool | None = None,
                    dtype: torch.dtype = torch.float32, weight_max: int | None = None,
                    zero_point: int = 0) -> Int8Weight:
    """(N, K) float weight -> int8, symmetric, one scale per output channel, packed for oneDNN or
    laid out for torch._int_mm: as asked, or (onednn=None) by the route measured fastest here for
    this shape and activations in `dtype` (route()). weight_max: the levels (default: 127, or 63
    where oneDNN needs 7-bit weights, onednn_weight_max); zero_point: oneDNN's activations, 0 (s8)
    or 128 (u8)."""
    if onednn is None:
        chosen = route(weight, dtype)
        onednn, zero_point = chosen != "torch._int_mm", (128 if chosen == "oneDNN, u8" else 0)
    if weight_max is None:
        weight_max = (onednn_weight_max(dtype, zero_point) or WEIGHT_MAX) if onednn else WEIGHT_MAX
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / weight_max).clamp(min=1e-12)  # (N,)
    q = (w / scale[:, None]).round_().clamp_(-weight_max, weight_max).to(torch.int8)  # (N, K)
    if onednn:
        # Packed for the chip's int8 kernel (AMX tiles or VNNI blocks); the batch size is only a hint.
        q = torch.ops.onednn.qlinear_prepack(q, None)
    else:
        q = q.t().contiguous()  # (K, N): _int_mm reads its second operand row-major
    b = None if bias is None else bias.detach().float().clone()  # a copy: must not pin the file's mmap
    return Int8Weight(q, scale, b, torch.zeros(w.shape[0], dtype=torch.long), onednn, w.shape[0], weight_max,
                      zero_point if onednn else 0)


ROUTES = ("oneDNN, u8", "oneDNN, s8", "torch._int_mm")
TOKENS = 729  # the rows the routes are timed at: one so400m image's tokens


def route(weight: Tensor, dtype: torch.dtype) -> str:
    """The int8 route for a layer of this weight's shape with activations in `dtype`, measured once
    per shape on this machine (autotune.py) at TOKENS rows: oneDNN's int8 matmul with the
    activations as u8 (q + 128, zero point 128: the form oneDNN's fast kernels on VNNI CPUs without
    AMX take; s8 activations ran its reference kernel there, one image in over 290 s) or as s8, or
    torch._int_mm. oneDNN only where its probe found it exact (onednn_weight_max); each route's
    result must equal torch._int_mm's on the same int8 operands (timed with the same weight levels;
    where oneDNN needs 7-bit weights, its routes then use them and torch._int_mm 8-bit ones). With
    measuring off (SIGLIP_SO400M_AUTOTUNE=0): oneDNN with s8 activations where exact."""
    limits = {name: onednn_weight_max(dtype, zp) for name, zp in (("oneDNN, u8", 128), ("oneDNN, s8", 0))}
    if not autotune.enabled():
        return "oneDNN, s8" if limits["oneDNN, s8"] else "torch._int_mm"
    if not any(limits.values()):
        return "torch._int_mm"
    N, K = weight.shape
    key = f"int8 {str(dtype)[6:]} {TOKENS}x{K}x{N}"
    known = autotune.known(key)
    if known == "torch._int_mm" or limits.get(known):  # a oneDNN route only where its probe passes now
        return known
    levels = min(v for v in limits.values() if v)
    x = torch.randn(TOKENS, K, generator=torch.Generator().manual_seed(0)).to(dtype)
    ways = {name: quantize_weight(weight, None, True, dtype, levels, 128 if name == "oneDNN, u8" else 0)
            for name, limit in limits.items() if limit}
    ways["torch._int_mm"] = quantize_weight(weight, None, False, dtype, levels)
    with torch.inference_mode():
        return autotune.choose(
            key, {name: functools.partial(_matmul, x, w) for name, w in ways.items()}, "torch._int_mm",
            check=lambda ref, got: _exact(ref, got, dtype))


def _exact(ref: Tensor, got: Tensor, dtype: torch.dtype) -> bool:
    # The same int8 operands: only the output's own rounding may differ (bf16: 2^-8 relative).
    tol = 1e-4 if dtype == torch.float32 else 2**-7
    ref, got = ref.float(), got.float()
    return got.shape == ref.shape and torch.allclose(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


# Activations are scaled to at most 127 * (1 - 2^-8), not 127: x / s_x, even with s_x and the
# product each rounded to bf16 (steps of 0.5 near 127), can then reach 127 but never 128, which the
# int8 cast would wrap to -128, and no clamp pass is needed. The step is 0.4% coarser, far below the
# rounding error itself.
_FULL_SCALE = 127 * (1 - 2**-8)


def quantize_activation(x: Tensor, zero_point: int = 0) -> tuple[Tensor, Tensor]:
    """(M, K) float -> (M, K) int8 (zero_point 0) or uint8 (q + zero_point, 128) and its (M, 1)
    float32 scales, symmetric, one scale per row.

    The row's 1 / s_x is rounded to x's dtype first and s_x is its exact inverse, so that x / s_x is
    one multiply in x's dtype (a float32 product of bf16 x would be a new (M, K) float32 tensor,
    which cost 5x the whole quantization in page faults) and a value comes back within half a step
    plus the product's own rounding. Three passes over x (max and min per row, which need no (M, K)
    temporary as |x| would; scale and round; cast), four for u8 (the zero point is added to the
    rounded value, which any integer up to 255 is exactly, in bf16 too): on AMX the int8 matmul is
    so fast that these passes cost about as much as it does for the MLP's 4304-wide input."""
    peak = torch.maximum(x.amax(-1, keepdim=True), -x.amin(-1, keepdim=True)).float()  # (M, 1)
    inv = (_FULL_SCALE / peak.clamp_(min=1e-10)).to(x.dtype)  # (M, 1) 1 / s_x
    q = x.mul(inv).round_()
    if zero_point:
        return q.add_(zero_point).to(torch.uint8), 1 / inv.float()
    return q.to(torch.int8), 1 / inv.float()


# The last activation quantized, (x, its version, q, scale): attention's q, k and v projections read
# the same x, and quantizing it once instead of three times saves a third of a layer's quantizing.
# Holding x keeps its memory from being reused by another tensor while it is cached.
_last = threading.local()


def _quantize_cached(x: Tensor, zero_point: int) -> tuple[Tensor, Tensor]:
    # Inference tensors keep no version counter; the model never writes into x between the calls.
    version = None if x.is_inference() else x._version
    hit = getattr(_last, "entry", None)
    if hit is not None and hit[0] is x and hit[1] == version and hit[2] == zero_point:
        return hit[3], hit[4]
    q, s = quantize_activation(x.reshape(-1, x.shape[-1]), zero_point)  # (M, K)
    _last.entry = (x, version, zero_point, q, s)
    return q, s


def linear(x: Tensor, w: Int8Weight, gelu: bool = False) -> Tensor:
    """x @ W^T + b (then tanh-GELU if asked) on int8 weights; (..., K) -> (..., N) in x's dtype."""
    return _matmul(x, w, gelu, _quantize_cached(x, w.zero_point)).view(*x.shape[:-1], w.out_features)


def _matmul(x: Tensor, w: Int8Weight, gelu: bool = False, qs: tuple[Tensor, Tensor] | None = None) -> Tensor:
    q, s = qs or quantize_activation(x.reshape(-1, x.shape[-1]), w.zero_point)  # (M, K) int8/uint8, (M, 1)
    if w.onednn:
        # s_w[n] * sum_k (q_x - zero point) q_w in float32; oneDNN takes one activation scale, so 1
        # here, and the rows' own scales below.
        acc = torch.ops.onednn.qlinear_pointwise(q, 1.0, w.zero_point, w.weight, w.scale, w.zero_points,
                                                 None, 1.0, 0, torch.float32, "none", [], "")
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


class Int8Slower(SiglipError):
    """int8 measured slower than float32 on this machine: refused, with the measured times."""


# The shapes int8 is timed at against float32: one So400m encoder layer (four 1152 x 1152
# projections, the MLP's two layers), the family's own (the towers of every checkpoint here share
# them), at one image's tokens. A smaller model (the tests') is judged by the kernels at these
# shapes too: at tiny shapes the passes around any matmul dominate and the comparison says nothing
# about the CPU's int8 kernels.
SPEED_SHAPES = ((1152, 1152, 4), (1152, 4304, 1), (4304, 1152, 1))  # (K, N, layers of this shape)


def check_speed(dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Refuse int8 (Int8Slower) where its linear layers, each shape on its measured route with the
    activations' quantization and epilogue, take longer than the same layers in float32 (F.linear):
    one So400m encoder layer at TOKENS rows (SPEED_SHAPES), random weights, measured once per shape
    on this machine (autotune.py). Returns the milliseconds of that layer's linear layers,
    {"int8": .., "float32": ..} ({} where measuring is off, SIGLIP_SO400M_AUTOTUNE=0)."""
    total = {"int8": 0.0, "float32": 0.0}
    routes = set()
    g = torch.Generator().manual_seed(0)
    for K, N, count in SPEED_SHAPES:
        key = f"int8 {str(dtype)[6:]} against float32 {TOKENS}x{K}x{N}"
        if not autotune.measured(key):
            weight, bias = torch.randn(N, K, generator=g) * K**-0.5, torch.randn(N, generator=g)
            w8 = quantize_weight(weight, bias, None, dtype)
            x = torch.randn(TOKENS, K, generator=g)
            x8 = x.to(dtype)
            with torch.inference_mode():
                # _matmul quantizes x8 on every call (linear() would reuse the first call's).
                autotune.choose(key, {"float32": functools.partial(F.linear, x, weight, bias),
                                      "int8": functools.partial(_matmul, x8, w8)}, "float32")
        ms = autotune.measured(key)
        if ms.get("float32") is None:  # measuring is off
            return {}
        if ms.get("int8") is None:  # int8 failed at this shape: no faster than float32
            ms = {**ms, "int8": float("inf")}
        routes.add(autotune.known(f"int8 {str(dtype)[6:]} {TOKENS}x{K}x{N}") or "torch._int_mm")
        for name in total:
            total[name] += ms[name] * count
    if total["int8"] > total["float32"]:
        raise Int8Slower(
            f"int8 is slower than float32 on this CPU ({autotune.machine()}): one So400m encoder layer's "
            f"linear layers took {total['int8']:.1f} ms in int8 against {total['float32']:.1f} ms in float32 "
            f"for one image's {TOKENS} tokens, measured here (int8 route: {', '.join(sorted(routes))}). "
            "Use --dtype float32 (or --dtype auto, which takes bf16 where this CPU has it).")
    return total


def quantize_int8(module: nn.Module, dtype: torch.dtype = torch.float32, onednn: bool | None = None,
                  zero_point: int = 0) -> int:
    """Turn every nn.Linear of `module` into an int8 layer for CPU inference; returns how many.

    The other parameters (LayerNorms, embeddings, the patch conv, the MAP head's packed projection)
    go to `dtype`, in which activations also flow between the int8 matmuls. The float weights and
    biases of the quantized layers are released (replaced by meta tensors): the model is for inference
    only. The remaining parameters are copied out of the checkpoint's mmap, so that the file's pages,
    all read once to quantize, are unmapped and leave the process's memory.

    onednn=None (load's way): each layer takes its measured route (route()), and int8 is refused
    where it measured slower than float32 (check_speed, Int8Slower); True / False force oneDNN
    (activations with `zero_point`: 0, s8, or 128, u8) / torch._int_mm without measuring.
    SIGLIP_SO400M_INT8_SPEED_CHECK=0 skips check_speed (int8 wanted for its memory, not its speed)."""
    if onednn is None and os.environ.get("SIGLIP_SO400M_INT8_SPEED_CHECK", "1") not in _OFF:
        check_speed(dtype)
    count = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.int8 = quantize_weight(m.weight, m.bias, onednn, dtype, zero_point=zero_point)
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
