"""Defects a demanding user can hit (issue 8), each with the test that failed before its fix:
logits in bf16, a broken label cache, the private oneDNN op, devices other than the CPU, autocast,
and the smaller ones (configs, empty batches, stale process groups)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import siglip_so400m


def with_logit_params(src: Path, dst: Path, scale: float, bias: float) -> Path:
    """A copy of a checkpoint with trained-like t' and b."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd["logit_scale"] = torch.tensor([scale])
    sd["logit_bias"] = torch.tensor([bias])
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


# 1. Logits in bf16 must not drift.

# Trained-like values (the real checkpoint's t' is about 4.7, b about -16.5). log 112 and -16.5
# happen to survive bf16 almost exactly (exp(4.71875) rounds back to 112.0 in bf16), so a second
# pair that does not is tested too: bf16 rounds 4.7 to 4.6875, a 1.2% change of t.
@pytest.mark.parametrize(("scale", "bias"), [(math.log(112.0), -16.5), (4.7, -16.54)])
def test_bf16_model_gives_the_fp32_logits_from_the_same_embeddings(tiny_ckpt, tmp_path, scale, bias):
    ckpt = with_logit_params(tiny_ckpt, tmp_path / "trained", scale, bias)
    fp32, _ = siglip_so400m.load(ckpt)
    bf16, _ = siglip_so400m.load(ckpt, dtype=torch.bfloat16)
    img, txt = unit(5, 64, 0), unit(7, 64, 1)
    # Logits near b + t * cos with cos up to 1: a span of about +-112 around -16.5.
    img[0] = txt[0]
    with torch.no_grad():
        ref = fp32.logits(img, txt)
        got = bf16.logits(img, txt)
        from_bf16_embeddings = bf16.logits(img.bfloat16(), txt.bfloat16())
    assert (got - ref).abs().max().item() < 1e-3
    assert got.dtype == from_bf16_embeddings.dtype == torch.float32
    assert bf16.logit_scale.dtype == bf16.logit_bias.dtype == torch.float32
    assert ref[0, 0].item() == pytest.approx(math.exp(scale) + bias, abs=1e-3)
