"""The inference fast paths (oneDNN linear, int8) and bf16: what they compute, with stated tolerances.
Timings live in scripts/benchmark.py, never here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import bf16_is_native
from PIL import Image

import siglip_so400m
from siglip_so400m.kernels import linear

TEXTS = ["a photo of 2 cats", "a red circle", "Café naïve résumé", "東京 猫 😀"]


def pixels(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_linear_computes_what_f_linear_computes(dtype, gelu):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200).to(dtype)
    x = torch.randn(3, 17, 96, dtype=dtype)
    ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    ref = F.gelu(ref, approximate="tanh") if gelu else ref
    with torch.inference_mode():
        got = linear(x, layer, gelu=gelu)
    assert got.dtype == dtype and got.shape == ref.shape
    # fp32: summation order only; bf16: the output is rounded to 8 bits of mantissa (2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((got.double() - ref).abs() / (ref.abs() + 1)).max() < tol


def test_inference_and_training_paths_give_the_same_embeddings(tiny_ckpt):
    model, proc = siglip_so400m.load(tiny_ckpt)
    px, ids = pixels(3, 32), proc.texts(TEXTS)
    with torch.inference_mode():  # oneDNN linears, last-token-only final text layer
        fast_img, fast_txt = model.encode_image(px), model.encode_text(ids)
    slow_img, slow_txt = model.encode_image(px), model.encode_text(ids)  # autograd: F.linear
    torch.testing.assert_close(fast_img, slow_img.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_txt, slow_txt.detach(), atol=1e-5, rtol=1e-5)


def cosines(model, ref, px, ids):
    with torch.inference_mode():
        img = F.cosine_similarity(model.encode_image(px).float(), ref.encode_image(px), dim=-1)
        txt = F.cosine_similarity(model.encode_text(ids).float(), ref.encode_text(ids), dim=-1)
    return img.min().item(), txt.min().item()


def so400m_inputs(proc):
    import importlib.util
    from pathlib import Path

    data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    photos = [Image.open(data / n) for n in ("chelsea.png", "rocket.jpg")]
    rng = np.random.default_rng(0)
    photos.append(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    return proc.images(photos), proc.texts(TEXTS)


@pytest.mark.slow
def test_bf16_stays_close_to_fp32_so400m(so400m_ckpt):
    if not bf16_is_native():
        pytest.skip("this CPU has no native bf16: torch emulates it about 30x slower than fp32 (minutes "
                    "a 384 px image at full size), and pick_dtype gives fp32 here; bf16's accuracy is "
                    "tested on the tiny model (test_bf16_attention_is_as_accurate_as_transformers_eager_bf16 "
                    "and tests/test_int8.py), and at full size on CPUs with AVX512-BF16 or AMX")
    ref, proc = siglip_so400m.load(so400m_ckpt)
    px, ids = so400m_inputs(proc)
    bf16, _ = siglip_so400m.load(so400m_ckpt, dtype=torch.bfloat16)
    # bf16 keeps 8 bits of mantissa, about 0.4% relative error per operation, which leaves the
    # direction of a 1152-d embedding almost untouched: 0.999 is a bound with room to spare.
    img, txt = cosines(bf16, ref, px, ids)
    print(f"\nso400m bf16 vs fp32 cosine: image {img:.6f}, text {txt:.6f}")
    assert img >= 0.999 and txt >= 0.999


@pytest.mark.slow
def test_int8_stays_close_to_fp32_so400m(so400m_ckpt):
    ref, proc = siglip_so400m.load(so400m_ckpt)
    px, ids = so400m_inputs(proc)
    int8, _ = siglip_so400m.load(so400m_ckpt, quantize="int8")
    img, txt = cosines(int8, ref, px, ids)
    print(f"\nso400m int8 vs fp32 cosine: image {img:.6f}, text {txt:.6f}")
    assert img >= 0.99 and txt >= 0.99


@pytest.mark.parametrize("way", ["per head", "sdpa"])
def test_bf16_attention_is_as_accurate_as_transformers_eager_bf16(monkeypatch, way):
    from siglip_so400m import kernels
    from siglip_so400m.kernels import attention

    # Each way the measurement may choose (kernels._attention_way), on any CPU.
    monkeypatch.setattr(kernels, "_attention_way", lambda q, k, v: way)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real_sdpa(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 72, generator=g).mul(2).bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    calls.clear()
    with torch.inference_mode():
        ours = attention(q, k, v).double()
    # transformers' eager attention in bf16: bf16 scores, softmax in float32, bf16 probabilities.
    scores = torch.matmul(q, k.transpose(-1, -2)) * 72**-0.5
    eager = torch.matmul(scores.softmax(-1, dtype=torch.float32).bfloat16(), v).double()

    def err(x):
        return ((x - ref).norm() / ref.norm()).item()

    assert err(ours) < 1e-2 and err(ours) <= 1.2 * err(eager), (err(ours), err(eager))
    assert ours.shape == ref.shape
    assert bool(calls) == (way == "sdpa" or not kernels._onednn(torch.bfloat16))
