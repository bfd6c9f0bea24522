"""The int8 mode (siglip_so400m.int8): what it computes, with stated tolerances, and that it stays off
PyTorch's deprecated quantized-tensor API. Timings live in scripts/benchmark.py, never here."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import siglip_so400m
from siglip_so400m import int8

TEXTS = ["a photo of 2 cats", "a red circle", "Café naïve résumé", "東京 猫 😀"]
# Each route (oneDNN with s8 or u8 activations, torch._int_mm), and the one the model measures
# fastest by itself (onednn=None): each must be right on every CPU.
ROUTES = {"onednn-s8": (True, 0), "onednn-u8": (True, 128), "int_mm": (False, 0), "default": (None, 0)}


def pixels(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def onednn_or_skip(onednn: bool | None, dtype: torch.dtype = torch.float32, zero_point: int = 0) -> None:
    if onednn and not int8._ONEDNN:
        pytest.skip("this torch build has no oneDNN int8 matmul (torch.ops.onednn.qlinear_pointwise)")
    if onednn and not int8.onednn_works(dtype, zero_point):
        pytest.skip(f"oneDNN's int8 matmul gives wrong results on this CPU for {dtype} activations, so the "
                    "model does not use it here (int8.onednn_works); the 'default' case tests what runs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("route", ROUTES)
def test_int8_linear_is_within_the_rounding_bound_of_f_linear(route, gelu, dtype):
    onednn, zero_point = ROUTES[route]
    onednn_or_skip(onednn, dtype, zero_point)
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(160, 200)
    x = torch.randn(3, 17, 160, generator=g).to(dtype)
    w = int8.quantize_weight(layer.weight, layer.bias, onednn, dtype, zero_point=zero_point)
    with torch.inference_mode():
        got = int8.linear(x, w, gelu=gelu)
    assert got.dtype == dtype and got.shape == (3, 17, 200)
    xd, wd, bd = x.double(), layer.weight.double(), layer.bias.double()
    ref = F.linear(xd, wd, bd)
    # Rounding to the nearest step moves each x by at most s_x/2 and each weight by s_w[n]/2, so
    # |y - y_ref| <= sum_k |x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4; tanh-GELU's slope is at most 1.13;
    # a bf16 output adds its own rounding, 2^-8 relative.
    # One scale per row, at the full scale; 1 / s_x is rounded to x's dtype (bf16: 2^-8 relative).
    s_x = int8.quantize_activation(x.reshape(-1, 160))[1].double().view(3, 17, 1)
    full = xd.abs().amax(-1, keepdim=True) / (127 * (1 - 2**-8))
    torch.testing.assert_close(s_x, full, rtol=1e-6 if dtype == torch.float32 else 2**-8, atol=0)
    s_w = wd.abs().amax(1) / w.weight_max  # 127, or 63 where oneDNN needs 7-bit weights
    assert w.weight_max == (int8.onednn_weight_max(dtype, w.zero_point) if w.onednn else 127)
    bound = (xd.abs() @ wd.new_ones(160, 1)) * s_w / 2 + (s_x / 2) * wd.abs().sum(1) + 160 * s_x * s_w / 4
    if gelu:
        ref, bound = F.gelu(ref, approximate="tanh"), 1.13 * bound
    slack = 1e-5 + (2**-8 * ref.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - ref).abs() <= bound + slack).all()
    # And typically far inside it: about 1.5% relative error on Gaussian data.
    assert (got.double() - ref).norm() / ref.norm() < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_never_wraps_around(dtype):
    """Each value lands within half a step of itself (plus its own bf16 rounding), never past +-127:
    in bf16, x / scale rounds up to 128 for the largest values, which an int8 cast wraps to -128."""
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        x = (torch.randn(16, 64, generator=g) * 10.0 ** (i % 7 - 3)).to(dtype)
        q, s = int8.quantize_activation(x)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        err = (q.float() * s - x.float()).abs() / s
        assert (err <= 0.5 + 127 * 2**-8).all(), err.max()
        u, su = int8.quantize_activation(x, 128)  # oneDNN's u8 activations: the same levels + 128
        assert u.dtype == torch.uint8 and torch.equal(u.int() - 128, q.int()) and torch.equal(su, s)


@pytest.mark.parametrize("route", ROUTES)
def test_a_new_activation_is_quantized_anew(route):
    onednn, zero_point = ROUTES[route]
    """int8.linear reuses the last activation's quantization (q, k and v read the same x); a
    different tensor, or the same one written in place, must not get the stale one."""
    onednn_or_skip(onednn, torch.float32, zero_point)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32)
    w = int8.quantize_weight(layer.weight, layer.bias, onednn, zero_point=zero_point)
    x1, x2 = torch.randn(5, 64), 3 * torch.randn(5, 64)
    with torch.no_grad():
        y1, y2 = int8.linear(x1, w), int8.linear(x2, w)
        for x, y in ((x1, y1), (x2, y2)):
            torch.testing.assert_close(y, layer(x), atol=0.05 * layer(x).abs().max().item(), rtol=0)
        x1.mul_(-2)  # same object, new contents
        torch.testing.assert_close(int8.linear(x1, w), -2 * y1 + 3 * layer.bias, atol=0.1, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ROUTES)
def test_int8_embeddings_stay_close_to_fp32_tiny(tiny_ckpt, route, dtype):
    onednn, zero_point = ROUTES[route]
    onednn_or_skip(onednn, dtype, zero_point)
    ref, proc = siglip_so400m.load(tiny_ckpt)
    model, _ = siglip_so400m.load(tiny_ckpt)
    int8.quantize_int8(model, dtype, onednn, zero_point)
    assert model.precision == "int8"
    px, ids = pixels(4, 32), proc.texts(TEXTS)
    with torch.inference_mode():
        img = F.cosine_similarity(model.encode_image(px).float(), ref.encode_image(px), dim=-1).min().item()
        txt = F.cosine_similarity(model.encode_text(ids).float(), ref.encode_text(ids), dim=-1).min().item()
    # 8-bit weights per output channel and 8-bit activations per row: about 1.5% relative error
    # per matmul on Gaussian data; the bar for the embeddings is a cosine of 0.99.
    assert img >= 0.99 and txt >= 0.99, (img, txt)
    assert img < 1 - 1e-7  # the int8 path really ran
    # The linear layers' float weights are gone (inference only); the rest is in the asked dtype,
    # but t' and b, which stay float32 (bf16 would move the logits).
    meta = {k for k, v in model.state_dict().items() if v.is_meta}
    assert meta and all(".mlp." in k or "_proj." in k or k.startswith("text_model.head.") for k in meta)
    assert {p.dtype for n, p in model.named_parameters() if not p.is_meta and "logit" not in n} == {dtype}
    assert model.logit_scale.dtype == model.logit_bias.dtype == torch.float32
    with pytest.raises(RuntimeError, match="inference only"):
        model.encode_image(pixels(1, 32).requires_grad_())


@pytest.mark.parametrize("zero_point", [0, 128], ids=["s8", "u8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_onednn_route_is_exact_with_its_weight_range_at_so400m_shapes(dtype, zero_point):
    """oneDNN's int8 matmul, with s8 or u8 (q + 128) activations, with 8-bit weights or with 7-bit
    ones where the CPU's kernel saturates 8-bit products (AVX2 without VNNI, for float32
    activations): its result equals torch._int_mm's exact integer sums on the same operands at the
    image MLP's widths, 1152 -> 4304 (64 tokens, not 729: _int_mm is the slow reference), for
    activations of both signs."""
    if not int8._ONEDNN:
        pytest.skip("this torch build has no oneDNN int8 matmul (torch.ops.onednn.qlinear_pointwise)")
    limit = int8.onednn_weight_max(dtype, zero_point)
    if zero_point and not limit:
        pytest.skip("oneDNN's int8 matmul is not exact here for u8 activations: its probe keeps it out "
                    "of the routes (the s8 case asserts that oneDNN works at all)")
    assert limit in (127, 63), f"oneDNN's int8 matmul is not exact here for {dtype} with either weight range"
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(1152, 4304)
    x = (3 * torch.randn(64, 1152, generator=g)).to(dtype)
    w = int8.quantize_weight(layer.weight, layer.bias, True, dtype, zero_point=zero_point)
    assert w.onednn and w.weight_max == limit and w.zero_point == zero_point
    exact = int8.quantize_weight(layer.weight, layer.bias, False, dtype, weight_max=limit)
    with torch.inference_mode():
        got, ref = int8.linear(x, w).float(), int8.linear(x.clone(), exact).float()
    tol = 1e-4 if dtype == torch.float32 else 2**-7  # the output's own rounding
    assert ((got - ref).abs().max() / ref.abs().max()).item() < tol


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """A fresh kernel-choice cache, and a clock the test sets: fake_ms[name] per call of candidate
    `name` (1 ms for any other)."""
    from siglip_so400m import autotune

    monkeypatch.setenv("SIGLIP_SO400M_CACHE", str(tmp_path))
    monkeypatch.delenv("SIGLIP_SO400M_AUTOTUNE", raising=False)
    autotune.forget()
    fake_ms: dict[str, float] = {}

    def clock(name, fn):
        fn()
        return fake_ms.get(name, 1.0) / 1e3

    monkeypatch.setattr(autotune, "_time", clock)
    monkeypatch.setattr(autotune, "SLOW", float("inf"))  # the test's clock decides, not first calls
    yield fake_ms
    autotune.forget()


@pytest.mark.parametrize("fastest", ["oneDNN, u8", "oneDNN, s8", "torch._int_mm"])
def test_the_default_route_is_the_one_measured_fastest_not_the_one_a_flag_suggests(measuring, fastest):
    if fastest != "torch._int_mm" and not int8.onednn_works(torch.float32, 128 if "u8" in fastest else 0):
        pytest.skip("oneDNN's int8 matmul is not exact (or missing) here, so it is never a candidate")
    measuring.update({name: 5.0 for name in int8.ROUTES} | {fastest: 1.0})
    layer = torch.nn.Linear(96, 40)
    w = int8.quantize_weight(layer.weight, layer.bias)
    assert (w.onednn, w.zero_point) == {"oneDNN, u8": (True, 128), "oneDNN, s8": (True, 0),
                                        "torch._int_mm": (False, 0)}[fastest]


def test_int8_measured_slower_than_float32_is_refused_naming_both_times(measuring, tiny_ckpt, monkeypatch):
    """Where int8's kernels are slow (oneDNN's reference kernel for s8 activations on a VNNI CPU
    without AMX took minutes for one image), --dtype int8 is refused with the measured times, not
    run at a fraction of float32's speed."""
    monkeypatch.delenv("SIGLIP_SO400M_INT8_SPEED_CHECK", raising=False)  # the suite turns it off
    measuring.update({"int8": 9.0, "float32": 2.0})
    with pytest.raises(int8.Int8Slower) as e:
        siglip_so400m.load(tiny_ckpt, quantize="int8")
    msg = str(e.value)
    # Six linear layers of one So400m encoder layer: 6 x 9 ms against 6 x 2 ms.
    assert "54.0 ms in int8 against 12.0 ms in float32" in msg and "--dtype float32" in msg
    from siglip_so400m.errors import SiglipError

    assert isinstance(e.value, SiglipError)  # one line and exit 1 on the command line
    measuring.update({"int8": 1.0, "float32": 2.0})
    from siglip_so400m import autotune

    autotune.forget()
    (next(iter(autotune.cache_file().parent.glob("kernels-*.json")))).unlink()
    model, _ = siglip_so400m.load(tiny_ckpt, quantize="int8")  # faster: loads
    assert model.precision == "int8"


def test_a_wrong_onednn_int8_result_falls_back_to_int_mm(monkeypatch, caplog):
    """The probe compares oneDNN with torch._int_mm on the same int8 operands; a kernel that is off
    (as oneDNN's was by 11-38% for float32 activations on an AVX2-only EPYC) is not used."""
    if not int8._ONEDNN:
        pytest.skip("this torch build has no oneDNN int8 matmul to probe")
    real = torch.ops.onednn.qlinear_pointwise
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", lambda *a: real(*a) * 1.1)
    monkeypatch.setattr(int8, "_onednn_works", {})
    layer = torch.nn.Linear(32, 16)
    with caplog.at_level("DEBUG", logger="siglip_so400m.int8"):
        w = int8.quantize_weight(layer.weight, layer.bias, dtype=torch.bfloat16)
    assert not w.onednn and not int8.onednn_works(torch.bfloat16)
    assert any("torch._int_mm instead" in r.getMessage() for r in caplog.records)


def test_load_int8_uses_no_deprecated_quantized_api(tiny_ckpt, monkeypatch):
    """torch 2.14 deprecates the quantized-tensor API (torch.quantize_per_channel, the
    torch.ops.quantized ops); the int8 mode must neither call it nor trigger its warnings."""
    def removed(*args, **kwargs):
        raise AssertionError("the deprecated quantized-tensor API was called")

    for name in ("quantize_per_channel", "quantize_per_tensor", "quantize_per_tensor_dynamic"):
        monkeypatch.setattr(torch, name, removed)
    for name in ("linear_prepack", "linear_dynamic", "linear"):
        monkeypatch.setattr(torch.ops.quantized, name, removed, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        warnings.filterwarnings("error", message=".*quantiz.*")
        model, _ = siglip_so400m.load(tiny_ckpt, quantize="int8")
        with torch.inference_mode():
            emb = model.encode_image(pixels(2, 32))
    assert model.precision == "int8" and torch.isfinite(emb).all()


def test_int8_runs_the_other_layers_in_float32_unless_told_as_every_command_does(tiny_ckpt):
    model, _ = siglip_so400m.load(tiny_ckpt, quantize="int8")
    assert model.vision_model.post_layernorm.weight.dtype == torch.float32
    model, _ = siglip_so400m.load(tiny_ckpt, quantize="int8", dtype=torch.bfloat16)
    assert model.vision_model.post_layernorm.weight.dtype == torch.bfloat16


def test_quantize_options_are_checked(tiny_ckpt):
    with pytest.raises(ValueError, match="quantize must be"):
        siglip_so400m.load(tiny_ckpt, quantize="int4")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        siglip_so400m.load(tiny_ckpt, quantize="int8", dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", ROUTES)
def test_an_int8_embedding_is_bit_identical_alone_and_in_a_mixed_batch(tiny_ckpt, route, dtype):
    """The server batches texts and images from different clients: one client's input must not move
    another's vector. Activations are quantized per row (token), so a row's int8 operands, and so its
    exact integer sums, do not depend on its batch-mates."""
    onednn, zero_point = ROUTES[route]
    onednn_or_skip(onednn, dtype, zero_point)
    model, proc = siglip_so400m.load(tiny_ckpt)
    int8.quantize_int8(model, dtype, onednn, zero_point)
    loud = ["!!!! " * 12, "東京 猫 😀 " * 8]  # batch-mates whose activations differ from the text's
    with torch.inference_mode():
        alone = model.encode_text(proc.texts(TEXTS[:1]))
        mixed = model.encode_text(proc.texts([loud[0], TEXTS[0], loud[1], *TEXTS[1:]]))
        img_alone = model.encode_image(pixels(1, 32))
        img_mixed = model.encode_image(torch.cat([10 * pixels(3, 32)[1:], pixels(1, 32)]))
    assert torch.equal(alone[0], mixed[1]), (alone[0] - mixed[1]).abs().max()
    assert torch.equal(img_alone[0], img_mixed[-1]), (img_alone[0] - img_mixed[-1]).abs().max()


def test_the_speed_check_times_int8_with_its_activation_quantizing(measuring, monkeypatch):
    """Every timed int8 call must quantize its input, as every layer of the model does: a cached
    quantization would time the matmul alone and pass int8 where it is slower than float32."""
    from siglip_so400m import autotune

    real = int8.quantize_activation
    count = [0]

    def counting(*a, **kw):
        count[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(int8, "quantize_activation", counting)
    quantized_per_call = []

    def clock(name, fn):
        before = count[0]
        fn()
        if name == "int8":
            quantized_per_call.append(count[0] - before)
        return 1e-3

    monkeypatch.setattr(autotune, "_time", clock)
    monkeypatch.setattr(autotune, "SLOW", float("inf"))
    int8.check_speed(torch.float32)
    assert quantized_per_call and all(n == 1 for n in quantized_per_call), quantized_per_call
