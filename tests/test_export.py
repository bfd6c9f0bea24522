"""`siglip-so400m export`: each tower as an ONNX / OpenVINO graph, proven against transformers.

The graphs are run where PyTorch is not: a subprocess that imports onnxruntime and openvino alone,
and asserts at its end that neither torch nor siglip_so400m was ever imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import siglip_so400m
from siglip_so400m import exporting
from siglip_so400m.cli import main
from siglip_so400m.exporting import ExportError
from siglip_so400m.testing import CHECKPOINTS, save_family_checkpoint, train_tokenizer, write_big_vision_npz

SIGLIP, SIGLIP2 = "google/siglip-so400m-patch14-384", "google/siglip2-so400m-patch16-256"
TEXTS = ["a photo of 2 cats", "東京タワー", "Zwei Katzen"]


def _needs_runtimes() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        pytest.importorskip(name, reason="the [export] extra (part of [test]) is not installed")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_tokenizers")
    return {kind: train_tokenizer(kind, root / kind) for kind in ("siglip", "i18n", "gemma")}


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizers):
    """name -> a tiny random checkpoint of that family in its Hub layout, made once."""
    root = tmp_path_factory.mktemp("export_family")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_family_checkpoint(root / name.split("/")[1], name,
                                                tokenizers[CHECKPOINTS[name].tokenizer], seed=len(made))
        return made[name]

    return get


def _hf_reference(folder: Path, B: int = 3):
    """transformers' float32 SiglipModel on B random pixel batches and its tokenizer's ids."""
    from transformers import AutoTokenizer, SiglipModel

    ref = SiglipModel.from_pretrained(str(folder)).eval()
    v, t = ref.config.vision_config, ref.config.text_config
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(B, 3, v.image_size, v.image_size, generator=g) * 2 - 1
    texts = TEXTS[:B]
    if CHECKPOINTS[_name(folder)].tokenizer == "gemma":
        texts = [x.lower() for x in texts]  # SigLIP 2 lowercases, as big_vision trained it
    ids = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", truncation=True,
                                                    max_length=t.max_position_embeddings,
                                                    return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = ref(input_ids=ids, pixel_values=pixels)
    return pixels, ids, out


def _name(folder: Path) -> str:
    return next(n for n in CHECKPOINTS if n.split("/")[1] == folder.name)


# A process with numpy, onnxruntime and openvino only: what a deployment without PyTorch has.
RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    onnx_dir, ov_dir, ref_file = sys.argv[1:4]
    ref = np.load(ref_file)
    out = {}
    for fmt, folder in (("onnx", onnx_dir), ("openvino", ov_dir)):
        info = json.load(open(folder + "/export.json"))
        for tower, x, want in (("vision", ref["pixels"], ref["image_embeds"]),
                               ("text", ref["ids"], ref["text_embeds"])):
            g = info["graphs"][tower]
            path = folder + "/" + g["file"]
            if fmt == "onnx":
                s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                run = lambda a: s.run(None, {g["input"]["name"]: a})[0]
            else:
                c = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                run = lambda a: c([a])[0]
            got3, got1 = run(x), run(x[:1])
            out[f"{fmt}/{tower}"] = [float(np.abs(got3 - want).max()), float(np.abs(got1 - want[:1]).max()),
                                     list(got3.shape), list(got1.shape)]
            out[f"{fmt}/{tower}/embeds"] = got3.tolist()
        out[f"{fmt}/logit"] = [info["logit_scale"], info["logit_bias"]]
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "siglip_so400m"))
    print(json.dumps(out))
""")


@pytest.mark.parametrize("name", [SIGLIP, SIGLIP2], ids=["siglip", "siglip2"])
def test_onnx_and_openvino_graphs_match_transformers_in_a_process_without_torch(name, family, tmp_path):
    _needs_runtimes()
    folder = family(name)
    for fmt in ("onnx", "openvino"):
        info = siglip_so400m.export(folder, tmp_path / fmt, format=fmt)
        assert info["graphs"]["vision"]["output"]["normalized"] is True
    pixels, ids, out = _hf_reference(folder)
    ref = tmp_path / "ref.npz"
    np.savez(ref, pixels=pixels.numpy(), ids=ids.numpy(), image_embeds=out.image_embeds.numpy(),
             text_embeds=out.text_embeds.numpy())
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "onnx"), str(tmp_path / "openvino"),
                           str(ref)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["imported"] == []  # neither torch nor siglip_so400m ran the graphs
    D = out.image_embeds.shape[1]
    for fmt in ("onnx", "openvino"):
        for tower in ("vision", "text"):
            diff3, diff1, shape3, shape1 = got[f"{fmt}/{tower}"]
            assert (shape3, shape1) == ([3, D], [1, D])  # one graph, two batch sizes
            assert diff3 <= 1e-4 and diff1 <= 1e-4, (fmt, tower, diff3, diff1)
        # t' and b as transformers has them, so the runtime's logits are transformers' logits.
        scale, bias = got[f"{fmt}/logit"]
        img, txt = (np.array(got[f"{fmt}/{t}/embeds"]) for t in ("vision", "text"))
        logits = np.exp(scale) * img @ txt.T + bias
        np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-3, rtol=0)
    # What a runtime needs beside the graphs came along.
    files = {p.name for p in (tmp_path / "onnx").iterdir()}
    tokenizer = {"siglip": {"spiece.model"}, "gemma": {"tokenizer.json"}}[CHECKPOINTS[name].tokenizer]
    assert {"vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "config.json",
            "preprocessor_config.json", "tokenizer_config.json", "export.json", "README.md",
            *tokenizer} <= files
    ov_files = {p.name for p in (tmp_path / "openvino").iterdir()}
    assert {"vision.xml", "vision.bin", "text.xml", "text.bin"} <= ov_files
    from transformers import SiglipImageProcessorPil

    pre = SiglipImageProcessorPil.from_pretrained(str(tmp_path / "onnx"))
    assert pre.resample == CHECKPOINTS[name].resample


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name,tower", [("google/siglip-so400m-patch14-224", "text"),
                                        ("google/siglip-so400m-patch16-256-i18n", "text")],
                         ids=["224px-16-tokens", "i18n"])
def test_other_checkpoints_export_through_the_cli_and_match_transformers(name, tower, family, tmp_path):
    _needs_runtimes()
    folder = family(name)
    assert main(["export", str(folder), "--format", "onnx", "--output", str(tmp_path / "out"),
                 "--towers", tower]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert list(info["graphs"]) == [tower]
    _, ids, out = _hf_reference(folder)
    assert info["graphs"]["text"]["input"]["shape"] == ["batch", CHECKPOINTS[name].text_length]
    got = _ort(tmp_path / "out" / "text.onnx", ids)
    np.testing.assert_allclose(got, out.text_embeds.numpy(), atol=1e-4, rtol=0)


def test_big_vision_npz_exports_and_matches_the_model_it_was_written_from(tokenizers, tmp_path):
    _needs_runtimes()
    from transformers import SiglipModel

    from siglip_so400m.testing import family_hf_config, randomize

    cfg = family_hf_config(CHECKPOINTS["google/siglip2-so400m-patch16-384"], tokenizers["gemma"])
    torch.manual_seed(5)
    ref = SiglipModel(cfg).eval()
    randomize(ref, 5)
    npz = write_big_vision_npz(tmp_path / "model.npz", ref.state_dict(), cfg, stacked=True)
    shutil.copyfile(tokenizers["gemma"], tmp_path / "tokenizer.model")
    siglip_so400m.export(npz, tmp_path / "out", format="onnx", towers=("vision",))
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(3, 3, 48, 48, generator=g) * 2 - 1
    with torch.inference_mode():
        want = ref.get_image_features(pixel_values=pixels)
        want = torch.nn.functional.normalize(want if torch.is_tensor(want) else want.pooler_output, dim=-1)
    got = _ort(tmp_path / "out" / "vision.onnx", pixels)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


# --- the precisions that round: measured and printed at export time ------------------------------

def test_fp16_openvino_weights_are_half_size_and_their_accuracy_is_printed(family, tmp_path, capsys):
    _needs_runtimes()
    from safetensors import safe_open

    folder = family(SIGLIP)
    half = siglip_so400m.export(folder, tmp_path / "fp16", format="openvino", towers=("vision",), fp16=True)
    assert half["precision"] == "fp16"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("vision_model.")]  # noqa: SIM118 (safe_open has no __iter__)
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys)
    # About 2 bytes a weight, where float32 takes 4 (OpenVINO folds a few constants: 0.975 x 4n here).
    assert 1.8 * n <= (tmp_path / "fp16" / "vision.bin").stat().st_size < 2.3 * n
    # Not exact, and the gate measured the rounding and printed it.
    check = half["parity"][0]
    assert 1e-5 < check["max_abs_diff"] < 1e-2 and check["min_cosine"] > 0.999
    assert f"{check['max_abs_diff']:.2e}" in capsys.readouterr().err


def test_fp16_onnx_weights_are_half_size_and_int8_reports_its_accuracy(family, tmp_path, capsys):
    _needs_runtimes()
    import onnx

    folder = family(SIGLIP)
    half = siglip_so400m.export(folder, tmp_path / "fp16", format="onnx", towers=("vision",), fp16=True)
    m = onnx.load(str(tmp_path / "fp16" / "vision.onnx"), load_external_data=False)
    kinds = {i.data_type for i in m.graph.initializer if len(i.dims) >= 2}
    assert kinds == {onnx.TensorProto.FLOAT16}, kinds
    assert 1e-6 < half["parity"][0]["max_abs_diff"] < 1e-2
    q = siglip_so400m.export(folder, tmp_path / "int8", format="onnx", towers=("vision",), dtype="int8")
    graph = onnx.load(str(tmp_path / "int8" / "vision.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
    check = q["parity"][0]
    assert check["min_cosine"] >= exporting.MIN_COSINE["int8"] and check["max_abs_diff"] > 1e-5
    assert f"min cosine {check['min_cosine']:.7f}" in capsys.readouterr().err


def test_bf16_openvino_says_what_the_cpu_computed_in(family, tmp_path):
    _needs_runtimes()
    import openvino as ov

    info = siglip_so400m.export(family(SIGLIP), tmp_path / "bf16", format="openvino", dtype="bfloat16",
                                towers=("text",))
    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert info["runtime_config"] == {"INFERENCE_PRECISION_HINT": "bf16"}
    # Without bf16 in the CPU (this AVX2 EPYC), OpenVINO runs float32 and the report says so.
    assert info["parity"][0]["runtime_precision"] == ("bfloat16" if native else "float32")
    assert "runtime computed in" in (tmp_path / "bf16" / "README.md").read_text()


def test_import_siglip_so400m_imports_no_runtime_until_export_runs():
    """Neither the package, the CLI, export itself, nor the jobs that take --backend (embed, serve,
    backends) import a runtime until a graph is run."""
    code = ("import sys, siglip_so400m, siglip_so400m.cli, siglip_so400m.exporting, siglip_so400m.embedding, "
            "siglip_so400m.backends, siglip_so400m.serve; "
            "assert siglip_so400m.export is siglip_so400m.exporting.export; "
            "print(sorted(m for m in ('onnx', 'onnxscript', 'onnxruntime', 'openvino') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --- bad input: one clear message each ------------------------------------------------------------

def test_unknown_format_is_refused_naming_the_choices(tiny_ckpt, tmp_path, capsys):
    assert main(["export", str(tiny_ckpt), "--format", "tflite", "--output", str(tmp_path / "o")]) == 1
    assert "unknown format 'tflite': choose one of onnx, openvino" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ExportError, match="onnx exports take dtype float32 or int8, not 'bfloat16'"):
        siglip_so400m.export(tiny_ckpt, tmp_path / "o", format="onnx", dtype="bfloat16")


def test_missing_extra_names_it(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ExportError, match=r"openvino is missing .*pip install 'siglip_so400m\[export\]'"):
        siglip_so400m.export(tiny_ckpt, tmp_path / "o", format="openvino")
    assert not (tmp_path / "o").exists()


def test_output_folder_that_is_not_empty_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        siglip_so400m.export(tiny_ckpt, out, format="onnx")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_graph_the_runtime_cannot_load_fails_the_export_and_writes_nothing(tiny_ckpt, tmp_path,
                                                                              monkeypatch):
    _needs_runtimes()

    def broken(sig, tower, sample, work, fmt, dtype, fp16):
        path = work / f"{tower}.onnx"
        path.write_bytes(b"\x08\x07not a protobuf at all")
        return path

    monkeypatch.setattr(exporting, "_export_tower", broken)
    with pytest.raises(ExportError, match=r"ONNX Runtime cannot load .*vision\.onnx"):
        siglip_so400m.export(tiny_ckpt, tmp_path / "o", format="onnx")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the temporary folder is left


def test_a_graph_that_computes_something_else_fails_with_the_numbers(tiny_ckpt, tmp_path, monkeypatch):
    _needs_runtimes()
    import onnx
    from onnx import TensorProto, helper

    def wrong(sig, tower, sample, work, fmt, dtype, fp16):
        # Valid, loadable, right shapes: (B, 3, S, S) -> the first D pixels, normalized.
        D = sig.config.vision_config.hidden_size
        S = sig.config.vision_config.image_size
        nodes = [helper.make_node("Flatten", ["pixel_values"], ["f"], axis=1),
                 helper.make_node("Slice", ["f", "zero", "d", "one"], ["s"]),
                 helper.make_node("LpNormalization", ["s"], ["image_embeds"], axis=-1, p=2)]
        inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v])
                 for n, v in (("zero", 0), ("d", D), ("one", 1))]
        x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, S, S])
        y = helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["B", D])
        graph = helper.make_graph(nodes, "wrong", [x], [y], inits)
        path = work / "vision.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        return path

    monkeypatch.setattr(exporting, "_export_tower", wrong)
    with pytest.raises(ExportError, match=r"vision graph vision\.onnx does not match the eager model "
                                          r"\(float32\): max \|diff\| \d\.\d+e[-+]\d+ > 0\.0001"):
        siglip_so400m.export(tiny_ckpt, tmp_path / "o", format="onnx", towers=("vision",))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_exports_temporary_folder_is_cleared_by_the_next_export(tiny_ckpt, tmp_path, monkeypatch):
    _needs_runtimes()
    # A process that has ended (as a killed export has) and one that still runs (this test's).
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead, live = int(done.stdout), os.getppid()
    stale, running = tmp_path / f".o.partial-{dead}", tmp_path / f".o.partial-{live}"
    other = tmp_path / f".other.partial-{dead}"  # another output's: not this export's to judge
    for d in (stale, running, other):
        d.mkdir()
        (d / "vision.onnx.data").write_bytes(b"\0" * 4096)
    logged: list[str] = []

    def broken(sig, tower, sample, work, fmt, dtype, fp16):
        raise ExportError("stop here: only the clearing is under test")

    monkeypatch.setattr(exporting, "_export_tower", broken)
    with pytest.raises(ExportError, match="stop here"):
        siglip_so400m.export(tiny_ckpt, tmp_path / "o", format="onnx", log=logged.append)
    assert not stale.exists() and running.is_dir() and other.is_dir()
    assert f"removed {stale}, left by an export (process {dead}) that no longer runs" in logged


def test_the_exported_readme_says_transparency_is_composited_on_white_as_the_library_does(
        tiny_ckpt, tmp_path):
    _needs_runtimes()
    from PIL import Image

    siglip_so400m.export(tiny_ckpt, tmp_path / "out", format="onnx", towers=("vision",), log=lambda m: None)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Pixels (preprocessor_config.json): RGB, with any transparency composited onto white first" \
        in readme
    # What the README says is what the library does: an RGBA PNG's pixels are those of the PNG laid
    # on white, not of its RGB channels alone.
    rgba = Image.new("RGBA", (40, 40), (200, 30, 30, 0))
    rgba.paste((30, 30, 200, 128), (0, 0, 20, 40))
    rgba.save(tmp_path / "rgba.png")
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    _, proc = siglip_so400m.load(tiny_ckpt, towers=("vision",))
    got = proc.images([str(tmp_path / "rgba.png")])
    torch.testing.assert_close(got, proc.images([on_white]), atol=0, rtol=0)
    assert (got - proc.images([rgba.convert("RGB")])).abs().max() > 0.5


# --- full size ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_image_tower_in_onnx_runtime_matches_transformers(so400m_ckpt, tmp_path, capsys):
    _needs_runtimes()
    from transformers import SiglipModel

    info = siglip_so400m.export(so400m_ckpt, tmp_path / "onnx", format="onnx", towers=("vision",))
    check = info["parity"][0]
    print(f"full-size image tower, ONNX Runtime vs eager fp32: {check}", file=sys.stderr)
    assert check["max_abs_diff"] <= 1e-4
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, 384, 384, generator=g) * 2 - 1
    got = _ort(tmp_path / "onnx" / "vision.onnx", pixels)
    ref = SiglipModel.from_pretrained(str(so400m_ckpt)).eval()
    with torch.inference_mode():
        want = ref.get_image_features(pixel_values=pixels)
        want = torch.nn.functional.normalize(want if torch.is_tensor(want) else want.pooler_output, dim=-1)
    diff = float(np.abs(got - want.numpy()).max())
    print(f"full-size image tower, ONNX Runtime vs transformers fp32: max |diff| {diff:.2e}", file=sys.stderr)
    assert diff <= 1e-4


def test_export_takes_the_model_as_model_flag_as_every_command_does(tiny_ckpt, tmp_path, capsys):
    _needs_runtimes()
    # As docs/embed.md writes it: `export --model ... --format ... --output DIR`.
    assert main(["export", "--model", str(tiny_ckpt), "--format", "onnx", "--output", str(tmp_path / "out"),
                 "--towers", "text"]) == 0
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["model"] == str(Path(tiny_ckpt).resolve()) and list(info["graphs"]) == ["text"]
    # Two different models are a usage error, named.
    with pytest.raises(SystemExit) as e:
        main(["export", str(tiny_ckpt), "--model", str(tmp_path / "other"), "--format", "onnx", "--output",
              str(tmp_path / "o2")])
    assert e.value.code == 2
    assert f"two models given: MODEL {tiny_ckpt} and --model {tmp_path / 'other'}" in capsys.readouterr().err
