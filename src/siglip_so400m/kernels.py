"""Inference fast paths for the linear layers (over 85% of SigLIP's work) and attention.

CPU inference (no gradient needed, no autocast) on x86 runs, for each kind of call, the way that
measured fastest on this machine at that shape (autotune.py): never a way because a CPU flag says
it should be fast. oneDNN's private ops are candidates only where a one-time probe found them
working (bf16 only where oneDNN supports it on this CPU). Training, autocast, other CPUs and other
devices run the plain ops, so they compute exactly what the plain model computes. What the ways
gained where they were measured, by machine and date: docs/results.md.
"""

from __future__ import annotations

import functools
import logging
import platform
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import autotune, int8

_log = logging.getLogger(__name__)
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_FAST = (torch.float32, torch.bfloat16)
_onednn_works: dict[torch.dtype, bool] = {}  # per dtype, probed once at first use


def _cpu_inference(x: Tensor) -> bool:
    # Under autocast the plain ops must run: they are the ones autocast casts (a tower locked for
    # training runs under no_grad and must still compute in the autocast dtype).
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")


def _onednn(dtype: torch.dtype) -> bool:
    """Whether oneDNN's private fused linear works here for `dtype`: probed once, on x86 only."""
    works = _onednn_works.get(dtype)
    if works is None:
        works = _onednn_works[dtype] = _probe_onednn(dtype)
    return works


def _probe_onednn(dtype: torch.dtype) -> bool:
    # torch.ops.mkldnn._linear_pointwise is private: it may be missing, changed or broken in another
    # torch build, and on ARM or Apple CPUs it is not the fast path anyway. The plain ops then run.
    if platform.machine().lower() not in _X86:
        _log.debug("oneDNN linear not used: %s is not an x86 CPU", platform.machine())
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("this torch build has no oneDNN")
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise RuntimeError("this CPU has no bf16 support in oneDNN")
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g).to(dtype) for shape in ((3, 16), (8, 16), (8,)))
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        if got.shape != ref.shape or got.dtype != dtype or not torch.allclose(got.float(), ref, atol=0.05):
            raise RuntimeError("its result differs from F.linear")
    except Exception as e:  # any failure of a private op means: do not use it
        _log.debug("oneDNN linear not used for %s, F.linear instead: %s", dtype, e)
        return False
    return True


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """layer(x), then tanh-GELU if asked.

    CPU inference runs the way measured fastest for this shape on this machine (autotune.py): the
    plain F.linear, oneDNN's matmul with the bias and GELU fused (on the plain weight, or on a copy
    packed once into oneDNN's blocked layout), or MKL's matmul on a packed copy (float32). A layer
    that int8.quantize_int8() prepared runs as an int8 matmul (see int8.py)."""
    packed = getattr(layer, "int8", None)
    if packed is not None:  # prepared by int8.quantize_int8()
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("an int8 model is for inference only (its float weights were released); "
                               "load without quantize= to train")
        return int8.linear(x, packed, gelu)
    if not (_cpu_inference(x) and x.dtype in _FAST and x.dtype == layer.weight.dtype):
        return _plain(x, layer.weight, layer.bias, gelu)
    return _LINEAR[_linear_way(x, layer, gelu)](x, layer, gelu)


def projections(x: Tensor, layers: tuple[nn.Linear, ...]) -> list[Tensor]:
    """[layer(x) for layer in layers] (attention's q, k and v projections of one input).

    In CPU inference, where it measured faster for this shape, as one matmul on the layers' weights
    stacked (one N = 3456 GEMM instead of three of 1152, which keep the cores less busy), on a
    stacked copy of the weights made once; its outputs are views of the one result."""
    if not (_cpu_inference(x) and x.dtype in _FAST and len(layers) > 1
            and all(getattr(m, "int8", None) is None and m.weight.dtype == x.dtype for m in layers)):
        return [linear(x, m) for m in layers]
    if _projections_way(x, layers) == "one by one":
        return [linear(x, m) for m in layers]
    return _stacked_projections(x, layers)


def _stacked_projections(x: Tensor, layers: tuple[nn.Linear, ...]) -> list[Tensor]:
    return list(linear(x, _stacked(layers)).split([m.out_features for m in layers], dim=-1))


def _projections_way(x: Tensor, layers: tuple[nn.Linear, ...]) -> str:
    K = x.shape[-1]
    widths = "+".join(str(m.out_features) for m in layers)
    key = f"projections {str(x.dtype)[6:]} {K}x{widths}"
    memo = (torch.get_num_threads(), key)
    way = _ways.get(memo)
    if way is None:
        x = _sample(x)
        ways = {"one by one": lambda: [linear(x, m) for m in layers],
                "stacked": lambda: _stacked_projections(x, layers)}
        way = _ways[memo] = autotune.choose(key, ways, "one by one", check=_all_close)
        if way != "stacked":
            _drop(layers[0], "stacked")
    return way


def _all_close(ref: list[Tensor], got: list[Tensor]) -> bool:
    return len(ref) == len(got) and all(_close(r, g) for r, g in zip(ref, got, strict=True))


class _Stacked:
    """The stacked weight and bias of several linear layers, shaped as one layer for linear()."""

    def __init__(self, layers: tuple[nn.Linear, ...]):
        self.weight = torch.cat([m.weight.detach() for m in layers])  # (sum N, K)
        self.bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
        self.out_features = self.weight.shape[0]


def _stacked(layers: tuple[nn.Linear, ...]) -> _Stacked:
    """The layers' weights stacked (kept for the first layer), made again if any of them changed."""
    return _copy(layers[0], "stacked", [t for m in layers for t in (m.weight, m.bias) if t is not None],
                 lambda: _Stacked(layers))


def _plain(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if gelu else y


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                              "tanh" if gelu else "")


def _mkl_linear(x: Tensor, layer: nn.Linear, gelu: bool) -> Tensor:
    # MKL's packed operand is for the rows it was packed for: with other rows the op runs the plain
    # weight (the same numbers, unpacked speed).
    rows, packed = _packed(layer, "mkl", x)
    y = torch.ops.mkl._mkl_linear(x, packed, layer.weight, layer.bias, rows)
    return F.gelu(y, approximate="tanh") if gelu else y


_LINEAR = {
    "F.linear": lambda x, layer, gelu: _plain(x, layer.weight, layer.bias, gelu),
    "oneDNN": lambda x, layer, gelu: _onednn_linear(x, layer.weight, layer.bias, gelu),
    "oneDNN, packed": lambda x, layer, gelu: _onednn_linear(x, _packed(layer, "onednn", x)[1], layer.bias,
                                                            gelu),
    "MKL, packed": _mkl_linear,
}
_ways: dict[tuple, str] = {}  # (threads, key) -> the way chosen, this process


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


# One way per layer shape, whatever the rows: a text's embedding must not change with the number of
# texts batched with it (the server batches clients together), and the ways round differently (bf16
# GELU fused into the matmul or after its rounded output). So each shape is timed at TOKENS rows
# (one So400m image's tokens, int8.TOKENS) of a made-up input, not at whatever rows came first.


def _sample(x: Tensor, rows: int = int8.TOKENS) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, x.shape[-1], generator=g).to(x.dtype)


def _linear_way(x: Tensor, layer: nn.Linear, gelu: bool) -> str:
    N, K = layer.weight.shape
    key = f"linear {str(x.dtype)[6:]} {K}x{N}{' gelu' if gelu else ''}"
    memo = (torch.get_num_threads(), key)
    way = _ways.get(memo)
    if way is None:
        x = _sample(x)
        names = ["F.linear"]
        if _onednn(x.dtype):
            names += ["oneDNN", "oneDNN, packed"]
        if x.dtype == torch.float32 and _mkl_packed_available():
            names.append("MKL, packed")
        way = "F.linear"
        if len(names) > 1:
            way = autotune.choose(key, {n: functools.partial(_LINEAR[n], x, layer, gelu) for n in names},
                                  "F.linear", check=_close)
            for way_, kind in (("oneDNN, packed", "onednn"), ("MKL, packed", "mkl")):
                if way != way_:  # a way that lost keeps no copy of the weight
                    _drop(layer, kind)
        _ways[memo] = way
    return way


def _close(ref: Tensor, got: Tensor) -> bool:
    """Whether another way's result is the reference's up to rounding: float32 summation order, or
    bf16's 8-bit mantissa."""
    tol = 1e-4 if ref.dtype == torch.float32 else 2**-6
    return got.shape == ref.shape and got.dtype == ref.dtype and bool(
        ((got.float() - ref.float()).abs() <= tol * (ref.float().abs() + ref.float().abs().mean())).all())


@functools.cache
def _mkl_packed_available() -> bool:
    ops = getattr(torch.ops, "mkl", None)
    return (platform.machine().lower() in _X86 and torch._C.has_mkl and hasattr(ops, "_mkl_linear")
            and hasattr(ops, "_mkl_reorder_linear_weight"))


# Copies of weights made for a faster way (packed, stacked), per layer: {layer: {kind: (the tensors
# they were made from, their versions, the copy)}}. Beside the model, not on it, so that a model
# still deep-copies and pickles (oneDNN's packed tensors do neither), and freed with the layer.
_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_copies_lock = threading.Lock()


def _versions(tensors: list[Tensor]) -> tuple:
    out = []
    for t in tensors:
        try:
            out.append(t._version)
        except RuntimeError:  # an inference tensor keeps no version counter
            out.append(None)
    return tuple(out)


def _copy(owner: object, kind: str, sources: list[Tensor], make):
    """The copy `make()` makes from `sources`, made once and again whenever a source was replaced
    (model.to(), a new Parameter, load_state_dict(assign=True)) or changed in place through autograd's
    version counter (an optimizer step, copy_ under no_grad). The entry holds the source tensors
    themselves, so that a freed weight's memory cannot come back at the same address and pass for
    it. A change made through `.data` bypasses the version counter: forget(model) after one."""
    with _copies_lock:
        hit = _copies.setdefault(owner, {}).get(kind)
    if hit is not None and len(hit[0]) == len(sources) and hit[1] == _versions(sources) and all(
            _same(a, b) for a, b in zip(hit[0], sources, strict=True)):
        return hit[2]
    copy = make()
    with _copies_lock:
        _copies.setdefault(owner, {})[kind] = ([t.detach() for t in sources], _versions(sources), copy)
    return copy


def _same(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def _drop(owner: object, kind: str) -> None:
    with _copies_lock:
        _copies.get(owner, {}).pop(kind, None)


def forget(module: nn.Module | None = None) -> None:
    """Drop the packed and stacked weight copies of `module`'s layers (all, without one), to free
    their memory, or after changing weights through `.data`, which no version counter records."""
    with _copies_lock:
        if module is None:
            _copies.clear()
        else:
            for m in module.modules():
                _copies.pop(m, None)


def _packed(layer: nn.Linear, kind: str, x: Tensor) -> tuple[int, Tensor]:
    """The rows it was packed for and the layer's weight packed for `kind`'s matmul ("onednn":
    oneDNN's blocked layout; "mkl": MKL's packed GEMM operand), made once. A copy beside the weight:
    the memory this costs is in docs/performance.md."""
    rows = _rows(x)

    def pack():
        w = layer.weight.detach()
        if kind == "onednn":
            return rows, torch.ops.mkldnn._reorder_linear_weight(w, rows)
        return rows, torch.ops.mkl._mkl_reorder_linear_weight(w, rows)

    return _copy(layer, kind, [layer.weight], pack)


def attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for (B, H, N, Dh) tensors; q may have fewer positions than k;
    `mask` (B, 1, 1, N) bool keeps the keys where it is True (padded NaFlex batches, to sdpa).

    F.scaled_dot_product_attention, or, for CPU inference without a mask where it measured faster
    for this shape on this machine (autotune.py; it did on an AVX512-BF16 CPU without AMX, not with
    AMX), each head as two oneDNN matmuls around a float32 softmax. In bf16 that rounds the scores
    to bf16 before the softmax, as transformers' eager bf16 attention does; sdpa keeps them in
    float32, so its output error is about half (2e-3 vs 5e-3 relative to fp32), both far below what
    moves a normalized embedding (tests/test_fast_paths.py)."""
    if mask is None and dropout == 0.0 and _cpu_inference(q) and q.dtype in _FAST \
            and _onednn(q.dtype) and _attention_way(q, k, v) == "per head":
        return _per_head(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def _attention_way(q: Tensor, k: Tensor, v: Tensor) -> str:
    # Not by batch size (a text's bits must not depend on its batch-mates): H heads, the lengths
    # rounded up to a power of two (a NaFlex image's own length decides), the head width.
    _, H, Nq, Dh = q.shape
    bucket = autotune.rows_bucket
    key = f"attention {str(q.dtype)[6:]} {H}x{bucket(Nq)}x{bucket(k.shape[2])}x{Dh}"
    memo = (torch.get_num_threads(), key)
    way = _ways.get(memo)
    if way is None:
        ways = {"sdpa": functools.partial(F.scaled_dot_product_attention, q, k, v),
                "per head": functools.partial(_per_head, q, k, v)}
        way = _ways[memo] = autotune.choose(key, ways, "sdpa", check=_attention_close)
    return way


def _attention_close(ref: Tensor, got: Tensor) -> bool:
    # bf16 scores rounded before the softmax: about 5e-3 relative (see attention()); fp32: rounding.
    tol = 2e-2 if ref.dtype == torch.bfloat16 else 1e-4
    return got.shape == ref.shape and bool((got.float() - ref.float()).norm() <= tol * ref.float().norm())


def _per_head(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    B, H, _, Dh = q.shape
    mm = torch.ops.mkldnn._linear_pointwise  # mm(a, b) = a @ b^T
    q = (q * Dh**-0.5).contiguous()
    k = k.contiguous()
    vt = v.transpose(-1, -2).contiguous()  # (B, H, Dh, N)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            scores = mm(q[b, h], k[b, h], None, "none", [], "")  # (Nq, N)
            probs = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
            out[b, h] = mm(probs, vt[b, h], None, "none", [], "")
    return out
