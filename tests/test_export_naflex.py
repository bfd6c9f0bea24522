"""`siglip-so400m export` of SigLIP 2 NaFlex: the image graph on transformers' three inputs, proven
against transformers' Siglip2Model in a process without torch, and the tensor-only position resize it
rests on, proven against F.interpolate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export import _needs_runtimes
from test_naflex import IMAGES, _hf_inputs

import siglip_so400m
from siglip_so400m import exporting
from siglip_so400m.exporting import ExportError

# Grids (h, w) for the resize: single rows and columns, the table's own size, up and down along
# either side, both at once, and far past the 8x8 or 16x16 table.
GRIDS = [(1, 1), (1, 30), (30, 1), (1, 8), (8, 1), (8, 8), (16, 3), (3, 17), (9, 7), (5, 5), (2, 40),
         (40, 2), (17, 15), (64, 64), (12, 21)]


@pytest.mark.parametrize("antialias", [True, False], ids=["antialias", "plain"])
@pytest.mark.parametrize("g", [8, 16, 5])
def test_tensor_position_resize_equals_f_interpolate_for_every_grid_in_one_batch(g, antialias):
    """model.naflex_positions (grid sizes as a tensor, the export's form) against F.interpolate on
    each grid alone (the eager path's and transformers' resize), every grid in one padded batch."""
    from siglip_so400m.model import naflex_positions

    D = 6
    table = torch.randn(g * g, D, generator=torch.Generator().manual_seed(g))
    N = max(h * w for h, w in GRIDS) + 11
    got = naflex_positions(table, g, torch.tensor(GRIDS), N, antialias=antialias)  # (B, N, D)
    assert got.shape == (len(GRIDS), N, D) and got.dtype == torch.float32
    assert torch.isfinite(got).all()  # padding slots too: a NaN there would reach the attention values
    grid = table.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    for i, (h, w) in enumerate(GRIDS):
        def resize(x: torch.Tensor, h=h, w=w) -> torch.Tensor:
            y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
            return y.permute(0, 2, 3, 1).reshape(h * w, D)

        want, exact = resize(grid), resize(grid.double())
        # float32 rounding: as close to F.interpolate as F.interpolate is to itself in float64.
        torch.testing.assert_close(got[i, : h * w], want, atol=2e-6 * table.abs().max().item(), rtol=0)
        ours_err = (got[i, : h * w].double() - exact).abs().max().item()
        assert ours_err <= 2 * (want.double() - exact).abs().max().item() + 1e-7, (h, w, ours_err)
        # Padding slots repeat the image's first position, as transformers fills them (masked anyway).
        torch.testing.assert_close(got[i, h * w :], got[i, :1].expand(N - h * w, D), atol=1e-6, rtol=0)
    if antialias:  # what transformers' Siglip2 resizes with
        from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

        hf = Siglip2VisionEmbeddings.resize_positional_embeddings(table.reshape(g, g, D),
                                                                  torch.tensor(GRIDS), N)
        own = torch.arange(N)[None] < torch.tensor([h * w for h, w in GRIDS])[:, None]
        torch.testing.assert_close(got[own], hf[own], atol=2e-6 * table.abs().max().item(), rtol=0)


# A process with numpy, onnxruntime and openvino only: what a deployment without PyTorch has.
RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import openvino as ov

    onnx_dir, ov_dir, ref_file = sys.argv[1:4]
    ref = dict(np.load(ref_file))
    out = {}
    names = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
    x3 = tuple(ref[k] for k in names)
    extra = 37  # padded further than the processor pads: another N through the same graph
    longer = (np.pad(x3[0], ((0, 0), (0, extra), (0, 0))), np.pad(x3[1], ((0, 0), (0, extra))), x3[2])
    n0 = int(x3[2][0].prod())
    alone = (x3[0][:1, :n0], x3[1][:1, :n0], x3[2][:1])  # the first image without any padding
    one_patch = tuple(ref["one_patch_" + k] for k in names)  # a 1x1 grid: N = 1
    for fmt, folder in (("onnx", onnx_dir), ("openvino", ov_dir)):
        info = json.load(open(folder + "/export.json"))
        for tower in ("vision", "text"):
            g = info["graphs"][tower]
            path = folder + "/" + g["file"]
            inputs = [i["name"] for i in g["inputs"]]
            if fmt == "onnx":
                s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                run = lambda *a, s=s, inputs=inputs: s.run(None, dict(zip(inputs, a)))[0]
            else:
                c = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                run = lambda *a, c=c, inputs=inputs: c(dict(zip(inputs, a)))[0]
            if tower == "vision":
                assert inputs == list(names), inputs
                want = ref["image_embeds"]
                got = {"batch 3": run(*x3), "batch 1": run(*(a[:1] for a in x3)),
                       "padded further": run(*longer), "batch 1 unpadded": run(*alone),
                       "one patch": run(*one_patch)}
                rows = {"batch 3": want, "batch 1": want[:1], "padded further": want,
                        "batch 1 unpadded": want[:1], "one patch": ref["one_patch_embeds"]}
            else:
                want = ref["text_embeds"]
                got = {"batch 3": run(ref["ids"]), "batch 1": run(ref["ids"][:1])}
                rows = {"batch 3": want, "batch 1": want[:1]}
            for case, y in got.items():
                out[f"{fmt}/{tower}/{case}"] = [float(np.abs(y - rows[case]).max()), list(y.shape)]
            out[f"{fmt}/{tower}/embeds"] = got["batch 3"].tolist()
        out[f"{fmt}/logit"] = [info["logit_scale"], info["logit_bias"]]
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "siglip_so400m"))
    print(json.dumps(out))
""")


def test_naflex_graphs_match_transformers_siglip2_at_mixed_shapes_in_a_process_without_torch(naflex_ckpt,
                                                                                             tmp_path):
    _needs_runtimes()
    from transformers import Siglip2ImageProcessorPil, Siglip2Model

    for fmt in ("onnx", "openvino"):
        info = siglip_so400m.export(naflex_ckpt, tmp_path / fmt, format=fmt)
        assert [i["name"] for i in info["graphs"]["vision"]["inputs"]] == list(exporting.NAFLEX_INPUTS)
        assert info["graphs"]["vision"]["output"]["normalized"] is True
    # 1:8, 2:1 tall and 7x60 px (under one patch high) through transformers' own processor at the
    # checkpoint's 256 patches: grids 6x42, 22x11 and 5x43, padded by 4, 14 and 41 slots.
    images = [IMAGES[0], IMAGES[5], IMAGES[10]]
    inputs = _hf_inputs(naflex_ckpt, images)
    grids = [tuple(s) for s in inputs["spatial_shapes"].tolist()]
    N = inputs["pixel_values"].shape[1]
    assert len(set(grids)) == 3 and len({h * w for h, w in grids}) == 3 and min(h * w for h, w in grids) < N
    ref = Siglip2Model.from_pretrained(str(naflex_ckpt)).eval()
    texts = ["a photo of 2 cats", "東京タワー", "a receipt"]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(naflex_ckpt))(texts, padding="max_length", max_length=64,
                                                           truncation=True, return_tensors="pt")["input_ids"]
    one_patch = _hf_inputs(naflex_ckpt, [IMAGES[6]], max_num_patches=1)  # a 1x1 grid, N = 1
    assert one_patch["spatial_shapes"].tolist() == [[1, 1]] and one_patch["pixel_values"].shape[1] == 1
    with torch.inference_mode():
        out = ref(input_ids=ids, **inputs)
        one_embeds = F.normalize(ref.get_image_features(**one_patch).pooler_output, dim=-1)
    ref_file = tmp_path / "ref.npz"
    np.savez(ref_file, ids=ids.numpy(), image_embeds=out.image_embeds.numpy(),
             text_embeds=out.text_embeds.numpy(), one_patch_embeds=one_embeds.numpy(),
             **{k: v.numpy() for k, v in inputs.items()},
             **{f"one_patch_{k}": v.numpy() for k, v in one_patch.items()})
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "onnx"), str(tmp_path / "openvino"),
                           str(ref_file)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    assert got["imported"] == []  # neither torch nor siglip_so400m ran the graphs
    D = out.image_embeds.shape[1]
    for fmt in ("onnx", "openvino"):
        for case in ("batch 3", "batch 1", "padded further", "batch 1 unpadded", "one patch"):
            diff, shape = got[f"{fmt}/vision/{case}"]
            assert shape == [3 if "3" in case or case == "padded further" else 1, D], (fmt, case, shape)
            assert diff <= 1e-4, (fmt, case, diff)
        for case in ("batch 3", "batch 1"):
            diff, shape = got[f"{fmt}/text/{case}"]
            assert shape == [3 if case == "batch 3" else 1, D] and diff <= 1e-4, (fmt, case, diff)
        scale, bias = got[f"{fmt}/logit"]
        img, txt = (np.array(got[f"{fmt}/{t}/embeds"]) for t in ("vision", "text"))
        np.testing.assert_allclose(np.exp(scale) * img @ txt.T + bias, out.logits_per_image.numpy(),
                                   atol=1e-3, rtol=0)
    # The folder's preprocessor_config.json makes transformers' processor give the same inputs.
    written = Siglip2ImageProcessorPil.from_pretrained(str(tmp_path / "onnx"))
    again = written(images=images, return_tensors="pt")
    for k, v in inputs.items():
        assert torch.equal(again[k], v), k
    readme = (tmp_path / "onnx" / "README.md").read_text()
    assert "pixel_attention_mask` int32 (batch, patches)" in readme and "spatial_shapes" in readme


def test_naflex_export_gate_fails_with_the_numbers_when_the_graph_resizes_positions_wrongly(
        naflex_ckpt, tmp_path, monkeypatch, capsys):
    """The gate runs NaFlex graphs on mixed grids: a graph built with the non-antialiased resize (right
    when enlarging, wrong when shrinking the 8x8 table) is refused with its numbers, nothing written."""
    _needs_runtimes()
    from siglip_so400m.model import naflex_positions

    def plain(table, g, spatial_shapes, length, antialias=True):
        return naflex_positions(table, g, spatial_shapes, length, antialias=False)

    monkeypatch.setattr(exporting, "naflex_positions", plain)
    with pytest.raises(ExportError, match=r"vision graph vision\.onnx does not match the eager model "
                                          r"\(float32\): max \|diff\| \d\.\d+e[-+]\d+ > 0\.0001"):
        siglip_so400m.export(naflex_ckpt, tmp_path / "o", format="onnx", towers=("vision",))
    assert list(tmp_path.iterdir()) == []
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("vision: "))
    assert "batch 3 of grids" in line and "unpadded" in line  # what it ran, in the report
