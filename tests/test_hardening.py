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


# 3. The CPU fast paths must be safe on every machine and every torch.

@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget what the oneDNN probe found, and forget it again afterwards."""
    from siglip_so400m import kernels

    monkeypatch.setattr(kernels, "_onednn_works", {}, raising=False)
    monkeypatch.setattr(kernels, "_ways", {})  # and the ways measured with it
    return kernels


def linear_inputs(dtype: torch.dtype):
    torch.manual_seed(0)
    return torch.nn.Linear(32, 48).to(dtype), torch.randn(2, 5, 32, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_linear_falls_back_to_f_linear_when_the_onednn_probe_fails(fresh_probe, monkeypatch, caplog,
                                                                          dtype):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("mkldnn::_linear_pointwise: no kernel for this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    # Reach the probe's call on every CPU: without this, a CPU with no oneDNN bf16 (an AVX2 EPYC)
    # is refused before the broken op is tried, and the test would not test the fallback.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(fresh_probe, "_mkl_packed_available", lambda: False)  # F.linear: the one way left
    layer, x = linear_inputs(dtype)
    with caplog.at_level("DEBUG", logger="siglip_so400m.kernels"), torch.inference_mode():
        first = fresh_probe.linear(x, layer, gelu=True)
        second = fresh_probe.linear(x, layer)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(second, ref)
    assert torch.equal(first, torch.nn.functional.gelu(ref, approximate="tanh"))
    assert len(calls) == 1  # probed once, then never called again
    notes = [r for r in caplog.records if "F.linear instead" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "DEBUG"


@pytest.mark.parametrize("machine", ["aarch64", "arm64"])
def test_fast_paths_are_not_used_on_arm_and_apple_cpus(fresh_probe, monkeypatch, machine):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr("platform.machine", lambda: machine)
    layer, x = linear_inputs(torch.bfloat16)
    q = k = v = torch.randn(1, 2, 300, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = fresh_probe.linear(x, layer)
        att = fresh_probe.attention(q, k, v)
    assert calls == []
    assert torch.equal(got, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert torch.equal(att, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_bf16_fast_path_needs_onednn_bf16_support(fresh_probe, monkeypatch):
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    layer, x = linear_inputs(torch.bfloat16)
    with torch.inference_mode():
        got = fresh_probe.linear(x, layer)
    assert calls == []
    assert torch.equal(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


# 5. Training under autocast.

def test_locked_tower_under_bf16_autocast_computes_in_bf16(tiny_ckpt):
    """A tower locked with --lock-image runs under no_grad inside the training step's autocast: it
    must compute what autocast computes (bf16 matmuls), not take the fp32 inference fast path."""
    model, proc = siglip_so400m.load(tiny_ckpt)  # fp32 weights, as train() loads them
    px = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = proc.texts(["a cat", "a red circle", "two dogs"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained_img, trained_txt = model.encode_image(px), model.encode_text(ids)  # grad enabled
        with torch.no_grad():
            locked_img, locked_txt = model.encode_image(px), model.encode_text(ids)
    assert locked_img.dtype == locked_txt.dtype == torch.bfloat16
    torch.testing.assert_close(locked_img, trained_img.detach(), atol=0, rtol=0)
    torch.testing.assert_close(locked_txt, trained_txt.detach(), atol=0, rtol=0)


# 4. CUDA correctness, checked without a GPU.

@pytest.mark.parametrize(("capability", "dtype"), [
    ((7, 0), torch.float16),  # V100: bf16 only emulated
    ((7, 5), torch.float16),  # T4
    ((8, 0), torch.bfloat16),  # A100
    ((9, 0), torch.bfloat16),  # H100
])
def test_pick_dtype_uses_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, capability, dtype):
    from siglip_so400m.api import pick_dtype

    seen = []

    def capability_of(device=None):
        seen.append(device)
        return capability

    def bf16_supported(including_emulation: bool = True) -> bool:
        # As torch does: with emulation every GPU "supports" bf16.
        return including_emulation or capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability_of)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_dtype(torch.device("cuda", 1)) == dtype
    assert seen and all(d in (1, torch.device("cuda", 1)) for d in seen)  # the target GPU, not GPU 0


def test_int8_on_a_gpu_is_refused_before_anything_is_loaded(tmp_path):
    # The path does not exist: the device check must come first, with its own message.
    with pytest.raises(ValueError, match="CPU only"):
        siglip_so400m.load(tmp_path / "nothing", device="cuda", quantize="int8")


@pytest.fixture(scope="module")
def meta_model(tiny_ckpt):
    """The tiny model on the meta device: a stand-in for a GPU, with no CPU fallback possible."""
    model, proc = siglip_so400m.load(tiny_ckpt, device="meta")
    return model, proc


def test_encoders_and_zero_shot_logits_take_cpu_inputs_to_the_models_device(meta_model):
    from siglip_so400m.zeroshot import ZeroShotClassifier

    model, proc = meta_model
    px = torch.rand(2, 3, 32, 32)  # CPU, as processor.images() returns them
    ids = proc.texts(["a cat", "a plane"])  # CPU
    img, txt = model.encode_image(px, normalize=True), model.encode_text(ids, normalize=True)
    assert img.device.type == txt.device.type == "meta"
    assert img.shape == txt.shape == (2, 64)
    assert model(px, ids).shape == (2, 2)
    clf = ZeroShotClassifier.__new__(ZeroShotClassifier)  # label embeddings below, not from the tower
    clf.model, clf.processor, clf.labels = model, proc, ["a", "b", "c"]
    clf.label_emb = torch.nn.functional.normalize(torch.randn(3, 64, device="meta"), dim=-1)
    logits = clf.logits(torch.rand(2, 3, 32, 32))
    assert logits.device.type == "meta" and logits.shape == (2, 3) and logits.dtype == torch.float32


def test_zero_shot_scores_copy_the_logits_to_the_cpu_once(tiny_ckpt):
    """On a GPU every .item() is a device sync; the scores must come back in one copy, not three
    per image and label."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from siglip_so400m.zeroshot import ZeroShotClassifier

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model, proc = siglip_so400m.load(tiny_ckpt)
    clf = ZeroShotClassifier(model, proc, ["a cat", "a dog", "a plane", "a remote"])
    logits = clf.logits(torch.rand(3, 3, 32, 32) * 2 - 1)
    with Count() as count:
        scores = clf.scores(logits)
    reads = [op for op in count.ops if "_local_scalar_dense" in op]  # what .item() dispatches to
    assert reads == []
    assert [len(s) for s in scores] == [4, 4, 4]
    for s, row in zip(scores, logits, strict=True):
        assert [p["logit"] for p in s] == sorted(row.tolist(), reverse=True)


# 2. A read-only or broken cache is not fatal, and concurrent writers lose nothing.

SHAPE_LABELS = ["a red circle", "a blue square", "a green triangle"]


def test_cli_with_an_unwritable_label_cache_warns_once_and_prints_the_results(tiny_ckpt, tmp_path, capsys):
    from siglip_so400m.zeroshot import zero_shot_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # the cache folder cannot be created below a file, even as root
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(png)
    code = zero_shot_main([str(png), "--labels", *SHAPE_LABELS, "--model", str(tiny_ckpt), "--json",
                           "--dtype", "float32", "--cache-dir", str(blocker / "cache")])
    out, err = capsys.readouterr()
    assert code == 0, err
    import json

    (record,) = json.loads(out)
    assert sorted(p["label"] for p in record["predictions"]) == sorted(SHAPE_LABELS)
    warnings = [line for line in err.splitlines() if "label cache not written" in line]
    assert len(warnings) == 1 and "Traceback" not in err, err


def _cache(ckpt: Path, root: Path):
    from siglip_so400m.text import Tokenizer
    from siglip_so400m.weights import resolve
    from siglip_so400m.zeroshot import LabelCache

    return LabelCache(root, resolve(ckpt), Tokenizer.from_folder(ckpt), ["{}"], "float32")


def _writer(ckpt: str, root: str, name: str, n: int, barrier) -> None:
    import threading

    def put(thread: int) -> None:
        cache = _cache(Path(ckpt), Path(root))
        for j in range(n):
            cache.put({f"{name}-{thread}-{j}": torch.full((8,), float(j))})

    barrier.wait()
    threads = [threading.Thread(target=put, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_cache_writers_lose_no_labels(tiny_ckpt, tmp_path):
    """Three processes of two threads each write labels to one cache at the same moment."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    n = 15
    procs = [ctx.Process(target=_writer, args=(str(tiny_ckpt), str(tmp_path), f"p{i}", n, barrier))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    labels = [f"p{i}-{t}-{j}" for i in range(3) for t in range(2) for j in range(n)]
    got = _cache(tiny_ckpt, tmp_path).get(labels)
    assert sorted(got) == sorted(labels)
    assert all(torch.equal(got[k], torch.full((8,), float(k.rsplit("-", 1)[1]))) for k in labels)
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_warm_cache_reads_each_label_embedding_once(tiny_ckpt, tmp_path, capsys, record_reads):
    from siglip_so400m import zeroshot
    from siglip_so400m.zeroshot import zero_shot_main

    args = [str(tiny_ckpt / "nothing.png"), "--labels", *SHAPE_LABELS, "--model", str(tiny_ckpt),
            "--dtype", "float32", "--cache-dir", str(tmp_path)]
    zero_shot_main(args)  # fills the cache (the image is missing: reported, exit 1)
    reads = record_reads(zeroshot)
    zero_shot_main(args)
    capsys.readouterr()
    assert len(reads) == len(SHAPE_LABELS)


# 9. The smaller items.

def test_a_vision_config_written_with_token_ids_loads():
    """transformers 4 wrote pad/bos/eos_token_id into every sub-config, the vision one too."""
    import json

    from siglip_so400m.config import SO400M_CONFIG, SiglipConfig

    d = json.loads(SO400M_CONFIG.read_text())
    d["vision_config"].update(pad_token_id=None, bos_token_id=None, eos_token_id=None)
    assert SiglipConfig.from_dict(d) == SiglipConfig.from_json(SO400M_CONFIG)


def test_the_so400m_config_ships_in_the_package_and_configs_holds_the_same_file():
    import siglip_so400m
    from siglip_so400m.config import SO400M_CONFIG
    from siglip_so400m.testing import SO400M_CONFIG as used_by_testing

    package = Path(siglip_so400m.__file__).parent
    assert used_by_testing == SO400M_CONFIG and SO400M_CONFIG.is_relative_to(package)
    # The copy at the repository root, for readers browsing the repo, must not drift.
    top = Path(__file__).parents[1] / "configs" / SO400M_CONFIG.name
    assert top.read_bytes() == SO400M_CONFIG.read_bytes()


def test_the_installed_wheel_carries_the_config(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("siglip_so400m-*.whl")
    assert "siglip_so400m/configs/siglip-so400m-patch14-384.json" in zipfile.ZipFile(wheel).namelist()
