"""Kernels chosen by measurement (siglip_so400m.autotune, kernels): the way that measured fastest
runs, each way computes what the plain op computes, and a choice is kept per machine. The clock is
the test's (no test here times anything): it says which candidate is fast."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from siglip_so400m import autotune, kernels


@pytest.fixture
def clock(monkeypatch, tmp_path):
    """A fresh choice cache in tmp_path, no way chosen yet, and a clock the test sets:
    ms[name] per call of candidate `name` (1 ms for any other)."""
    monkeypatch.setenv("SIGLIP_SO400M_CACHE", str(tmp_path))
    monkeypatch.delenv("SIGLIP_SO400M_AUTOTUNE", raising=False)
    monkeypatch.setattr(kernels, "_ways", {})
    autotune.forget()
    ms: dict[str, float] = {}
    calls: list[str] = []

    def fake(name, fn):
        calls.append(name)
        fn()
        return ms.get(name, 1.0) / 1e3

    monkeypatch.setattr(autotune, "_time", fake)
    monkeypatch.setattr(autotune, "SLOW", float("inf"))  # the test's clock decides, not first calls
    ms_calls = (ms, calls)
    yield ms_calls
    autotune.forget()


def linear_ways(dtype: torch.dtype) -> list[str]:
    ways = ["F.linear"]
    if kernels._onednn(dtype):
        ways += ["oneDNN", "oneDNN, packed"]
    if dtype == torch.float32 and kernels._mkl_packed_available():
        ways.append("MKL, packed")
    return ways


def test_the_candidate_measured_fastest_is_chosen_and_kept_on_disk(clock):
    ms, calls = clock
    ms.update({"a": 3.0, "b": 1.0, "c": 2.0})
    cands = {n: (lambda n=n: n) for n in "abc"}
    assert autotune.choose("op 1", cands, "a") == "b"
    assert sorted(set(calls)) == ["a", "b", "c"] and len(calls) == 3 * autotune.ROUNDS
    # Another process on this machine (forget: nothing in memory) reads the choice, measures nothing.
    autotune.forget()
    calls.clear()
    ms.update({"b": 9.0})
    assert autotune.choose("op 1", cands, "a") == "b" and calls == []
    data = json.loads(autotune.cache_file().read_text())
    assert data["machine"] == autotune.machine() and data["choices"]["op 1"]["use"] == "b"
    assert autotune.measured("op 1") == {"a": 3.0, "b": 1.0, "c": 2.0}


def test_another_machine_or_a_damaged_file_is_measured_again(clock):
    ms, _ = clock
    ms.update({"a": 2.0, "b": 1.0})
    cands = {n: (lambda n=n: n) for n in "ab"}
    path = autotune.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": "another CPU", "choices": {"op": {"use": "a", "ms": {}}}}))
    assert autotune.choose("op", cands, "a") == "b"
    autotune.forget()
    path.write_text("{not json")
    assert autotune.choose("op", cands, "a") == "b"


def test_a_candidate_must_beat_the_reference_by_the_margin(clock):
    ms, _ = clock
    cands = {n: (lambda n=n: n) for n in ("plain", "fast")}
    ms.update({"plain": 1.0, "fast": 1.0 - autotune.MARGIN / 2})  # within the noise: the plain op
    assert autotune.choose("op a", cands, "plain") == "plain"
    ms.update({"fast": 1.0 - 2 * autotune.MARGIN})
    assert autotune.choose("op b", cands, "plain") == "fast"


def test_a_fast_candidate_that_fails_or_computes_something_else_is_never_chosen(clock, caplog):
    ms, _ = clock
    ms.update({"ref": 5.0, "wrong": 1.0, "broken": 0.5})

    def broken():
        raise RuntimeError("no kernel for this CPU")

    cands = {"ref": lambda: 1.0, "wrong": lambda: 2.0, "broken": broken}
    with caplog.at_level("DEBUG", logger="siglip_so400m.autotune"):
        assert autotune.choose("op", cands, "ref", check=lambda ref, got: ref == got) == "ref"
    text = caplog.text
    assert "wrong not used" in text and "no kernel for this CPU" in text and "op: ref" in text


def test_measuring_can_be_turned_off(clock, monkeypatch):
    ms, calls = clock
    monkeypatch.setenv("SIGLIP_SO400M_AUTOTUNE", "0")
    ms.update({"a": 2.0, "b": 1.0})
    assert autotune.choose("op", {"a": lambda: 0, "b": lambda: 0}, "a") == "a" and calls == []


def test_an_unwritable_cache_keeps_the_choice_in_memory(clock, monkeypatch, tmp_path):
    ms, calls = clock
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SIGLIP_SO400M_CACHE", str(tmp_path / "file" / "sub"))  # a file in the way
    ms.update({"a": 2.0, "b": 1.0})
    cands = {"a": lambda: 0, "b": lambda: 0}
    assert autotune.choose("op", cands, "a") == "b"
    calls.clear()
    assert autotune.choose("op", cands, "a") == "b" and calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_linear_layers_take_the_way_measured_fastest(clock, dtype):
    ways = linear_ways(dtype)
    if len(ways) == 1:
        pytest.skip("only F.linear can run here (no oneDNN, no MKL): nothing to choose")
    ms, _ = clock
    for fastest in ways:
        kernels._ways.clear()
        autotune.forget()
        for p in autotune.cache_file().parent.glob("kernels-*.json"):
            p.unlink()
        ms.clear()
        ms.update({w: 5.0 for w in ways} | {fastest: 1.0})
        layer = torch.nn.Linear(64, 96).to(dtype)
        x = torch.randn(2, 9, 64, dtype=dtype)
        with torch.inference_mode():
            kernels.linear(x, layer, gelu=True)
        assert set(kernels._ways.values()) == {fastest}
        # Only the chosen way keeps a packed copy of the weight.
        packed = set(kernels._copies.get(layer, {}))
        assert packed == ({"onednn"} if fastest == "oneDNN, packed" else {"mkl"} if fastest == "MKL, packed"
                          else set())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_linear_way_computes_what_f_linear_computes_and_follows_a_changed_weight(monkeypatch, dtype,
                                                                                        gelu):
    """A packed copy is made from the weight: after the weight changes in place (a training step)
    or is replaced, the next call must use the new weight, not the stale copy."""
    for way in linear_ways(dtype):
        monkeypatch.setattr(kernels, "_linear_way", lambda x, layer, gelu, way=way: way)
        torch.manual_seed(0)
        layer = torch.nn.Linear(96, 200).to(dtype)
        x = torch.randn(3, 17, 96, dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 2**-7  # summation order; bf16's 8-bit mantissa

        def check(way=way, layer=layer, x=x, tol=tol):
            ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            ref = F.gelu(ref, approximate="tanh") if gelu else ref
            with torch.inference_mode():
                got = kernels.linear(x, layer, gelu=gelu)
            assert got.dtype == dtype and got.shape == ref.shape, way
            assert ((got.double() - ref).abs() / (ref.abs() + 1)).max() < tol, way

        check()
        with torch.no_grad():
            layer.weight.mul_(-2)  # in place, as an optimizer step
        check()
        layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))  # replaced
        check()


def test_attention_takes_the_way_measured_fastest_and_both_agree(clock):
    if not kernels._onednn(torch.bfloat16):
        pytest.skip("oneDNN's bf16 matmul does not work here: sdpa is the only way")
    ms, _ = clock
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g).bfloat16() for _ in range(3))
    out = {}
    for fastest in ("per head", "sdpa"):
        kernels._ways.clear()
        autotune.forget()
        for p in autotune.cache_file().parent.glob("kernels-*.json"):
            p.unlink()
        ms.update({"per head": 5.0, "sdpa": 5.0} | {fastest: 1.0})
        with torch.inference_mode():
            out[fastest] = kernels.attention(q, k, v)
        assert set(kernels._ways.values()) == {fastest}
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for way, got in out.items():
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2, way


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_dtype_auto_on_the_cpu_is_bf16_only_where_bf16_measured_faster(clock, monkeypatch, faster):
    from siglip_so400m import api

    ms, _ = clock
    monkeypatch.setattr(api, "_cpu_has_native_bf16", lambda: True)  # bf16 instructions: measure
    ms.update({"float32": 5.0, "bfloat16": 5.0} | {faster: 1.0})
    assert api.pick_dtype(torch.device("cpu")) == getattr(torch, faster)
    # Without bf16 instructions torch would emulate it: float32, and nothing is timed.
    monkeypatch.setattr(api, "_cpu_has_native_bf16", lambda: False)
    autotune.forget()
    for p in autotune.cache_file().parent.glob("kernels-*.json"):
        p.unlink()
    _, calls = clock
    calls.clear()
    assert api.pick_dtype(torch.device("cpu")) == torch.float32 and calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_projections_compute_each_layer_and_follow_a_changed_weight(clock, dtype):
    """Attention's q, k and v as one matmul on a stacked copy of their weights, where that measured
    faster: the same numbers as each layer alone, and a new copy once any weight changed."""
    ms, _ = clock
    ms.update({"one by one": 5.0, "stacked": 1.0})
    torch.manual_seed(0)
    layers = tuple(torch.nn.Linear(64, 48).to(dtype) for _ in range(3))
    x = torch.randn(2, 11, 64, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2**-7

    def check():
        with torch.inference_mode():
            got = kernels.projections(x, layers)
        for m, y in zip(layers, got, strict=True):
            ref = F.linear(x.double(), m.weight.double(), m.bias.double())
            assert y.shape == ref.shape and ((y.double() - ref).abs() / (ref.abs() + 1)).max() < tol

    check()
    assert set(kernels._ways.values()) >= {"stacked"} and "stacked" in kernels._copies.get(layers[0], {})
    with torch.no_grad():
        layers[2].weight.mul_(-3)  # only v's weight changes
    check()


def packed_ways(dtype: torch.dtype) -> list[str]:
    return [w for w in linear_ways(dtype) if "packed" in w]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_copy_is_made_again_after_a_dtype_round_trip_and_forget_drops_it(monkeypatch, dtype):
    """model.bfloat16().float() gives new weights that may land at the old address with a fresh
    version counter; a weight changed through .data bypasses the counter: forget() is the way."""
    ways = packed_ways(dtype)
    if not ways:
        pytest.skip("no packed way here (no oneDNN, no MKL)")
    for way in ways:
        monkeypatch.setattr(kernels, "_linear_way", lambda x, layer, gelu, way=way: way)
        torch.manual_seed(0)
        layer = torch.nn.Linear(96, 200).to(dtype)
        x = torch.randn(4, 96, dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 2**-7

        def check(layer=layer, x=x, tol=tol, way=way):
            ref = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            with torch.inference_mode():
                got = kernels.linear(x, layer)
            assert ((got.double() - ref).abs() / (ref.abs() + 1)).max() < tol, way

        check()
        with torch.no_grad():
            layer.weight.add_(0.3)  # moves every output; then a round trip through another dtype
        layer.to(torch.float16).to(dtype)
        check()
        layer.weight.data.mul_(-1)  # no version counter sees this one
        kernels.forget(layer)
        assert layer not in kernels._copies
        check()
        square = torch.nn.Linear(96, 96).to(dtype)
        check(square, x)
        # The same memory, shape, dtype and version, read transposed: a new weight all the same.
        square.weight = torch.nn.Parameter(square.weight.detach().t(), requires_grad=False)
        check(square, x)


def test_a_model_that_ran_the_packed_ways_still_deep_copies_and_pickles(tiny_ckpt, monkeypatch):
    import copy
    import io

    import siglip_so400m

    ways = packed_ways(torch.float32) + packed_ways(torch.bfloat16)
    if not ways:
        pytest.skip("no packed way here (no oneDNN, no MKL)")
    model, _ = siglip_so400m.load(tiny_ckpt)
    monkeypatch.setattr(kernels, "_linear_way", lambda x, layer, gelu: packed_ways(x.dtype)[0])
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        ref = model.encode_image(px)
    assert kernels._copies  # the packed copies exist
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    with torch.inference_mode():
        torch.testing.assert_close(clone.encode_image(px), ref, rtol=1e-5, atol=1e-5)


def test_a_choice_another_process_wrote_meanwhile_is_read_not_measured_again(clock):
    ms, calls = clock
    ms.update({"a": 1.0, "b": 5.0})
    assert autotune.known("unrelated") is None  # this process has read the (empty) file
    path = autotune.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": autotune.machine(), "choices": {"op": {"use": "b", "ms": {}}}}))
    assert autotune.choose("op", {"a": lambda: 0, "b": lambda: 0}, "a") == "b" and calls == []


def test_a_candidate_far_slower_on_its_first_call_is_not_timed_further(clock, monkeypatch):
    import time

    _, calls = clock
    monkeypatch.setattr(autotune, "SLOW", 2)
    cands = {"ref": lambda: 0, "crawl": lambda: time.sleep(0.25) or 0}
    assert autotune.choose("op", cands, "ref") == "ref"
    assert "crawl" not in calls and autotune.measured("op")["crawl"] >= 250  # its first call, in ms


def test_a_cache_file_of_the_wrong_shape_is_measured_again_not_a_crash(clock):
    ms, _ = clock
    ms.update({"a": 2.0, "b": 1.0})
    path = autotune.cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    for text in (json.dumps({"machine": autotune.machine(), "choices": ["a"]}), "[1, 2]",
                 json.dumps({"machine": autotune.machine(), "choices": {"op": {"use": "a", "ms": "x"}}})):
        path.write_text(text)
        autotune.forget()
        assert autotune.choose("op", {"a": lambda: 0, "b": lambda: 0}, "a") == "b"
        path.unlink()
