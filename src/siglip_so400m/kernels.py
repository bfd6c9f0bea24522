"""Inference fast paths for the linear layers, which do over 85% of SigLIP's work.

Each takes a faster kernel only for CPU inference (no gradient needed, no autocast) on x86, where a
one-time probe found oneDNN's private fused linear working (bf16 only where oneDNN supports it on
this CPU), and otherwise falls back to the plain op, so training, autocast, other CPUs and other
devices compute exactly what the plain model computes. The paths are chosen by CPU features, not
by a measurement on this machine; what they gained where they were measured, by machine and date:
docs/results.md (scripts/benchmark.py).
"""

from __future__ import annotations

import functools
import logging
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int8

_log = logging.getLogger(__name__)
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
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


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """layer(x), then tanh-GELU if asked.

    CPU inference goes through oneDNN's matmul with bias and GELU fused, on the plain weight (no
    repacked copy), which measured faster than MKL's F.linear in fp32 and a few percent faster in
    bf16 (docs/results.md). A layer that int8.quantize_int8() prepared runs as an int8 matmul (see
    int8.py)."""
    packed = getattr(layer, "int8", None)
    if packed is not None:  # prepared by int8.quantize_int8()
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("an int8 model is for inference only (its float weights were released); "
                               "load without quantize= to train")
        return int8.linear(x, packed, gelu)
    if _cpu_inference(x) and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == layer.weight.dtype \
            and _onednn(x.dtype):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias,
                                                  "gelu" if gelu else "none", [], "tanh" if gelu else "")
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y, approximate="tanh") if gelu else y


def attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for (B, H, N, Dh) tensors; q may have fewer positions than k;
    `mask` (B, 1, 1, N) bool keeps the keys where it is True (padded NaFlex batches, to sdpa).

    bf16 CPU inference over long sequences (the image tower's 729 patches) on CPUs without AMX
    computes each head with two oneDNN matmuls around a float32 softmax, which measured faster than
    sdpa's flash kernel on an AVX512-BF16 CPU without AMX; with AMX sdpa's kernel wins by far, so it
    runs there (docs/results.md).
    The scores are rounded to bf16 before the softmax, as in transformers' eager bf16 attention;
    sdpa keeps them in float32, so its output error is about half (2e-3 vs 5e-3 relative to fp32),
    both far below what moves a normalized embedding (tests/test_fast_paths.py). Everything else,
    fp32 included (where parity with transformers matters), goes to sdpa."""
    B, H, Nq, Dh = q.shape
    if not (mask is None and _cpu_inference(q) and q.dtype == torch.bfloat16 and Nq >= 256
            and dropout == 0.0 and not _cpu_has_amx() and _onednn(torch.bfloat16)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
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
