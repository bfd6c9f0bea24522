"""Speed of the exported graphs against our eager model, each as a fraction of this machine's limit.

    python -m siglip_so400m.testing /work/so400m          # full-size random weights (3.5 GB)
    flock /tmp/heavy.lock python scripts/benchmark_export.py --model /work/so400m \\
        --exports /tmp/so400m-exports [--batches 1 4 8] [--repeats 3] [--json out.json]

For the image tower and then the text tower of the full-size model (one tower in memory at a time):
ours eager in bf16, fp32 and int8 (load(..., quantize="int8")), ONNX Runtime fp32 (CPU execution
provider) and OpenVINO fp32 and bf16 (the same IR compiled with INFERENCE_PRECISION_HINT f32 / bf16),
at each batch size, interleaved round by round so that drift in the machine's speed hits all alike;
the best of --repeats rounds after a warm-up. Every time is also printed as model FLOPs per second
over the matrix-product rate measured in the same run at the image tower's MLP shape 729x1152x4304
(bf16 and fp32, the faster of F.linear and oneDNN's matmul; scripts/benchmark.py's gemm_rates).

Graphs missing from --exports are exported first (siglip_so400m.export, fp32, with its parity gate;
OpenVINO's IR converted from the same ONNX graphs). Each row also gives the largest difference of its
normalized embeddings from ours in fp32 on the same inputs.
Where a CPU has no native bf16 (AVX2 only), OpenVINO would compute "bf16" in fp32 and torch emulates
it: neither bf16 row is measured there, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import cpu_info, dims_of, flops_image, flops_text, gemm_rates

import siglip_so400m
from siglip_so400m.api import pick_dtype
from siglip_so400m.exporting import Graph, onnx_to_openvino

KEY = "729x1152x4304"


def ensure_exports(model: str, root: Path) -> dict[str, Path]:
    """The fp32 ONNX export (with its parity gate), and OpenVINO's IR converted from the same ONNX
    graphs, as export(format="openvino") makes it, without tracing the model a second time (the
    exporter's decomposition pass takes minutes at full size on 2 cores)."""
    onnx_dir, ov_dir = root / "onnx", root / "openvino"
    if not (onnx_dir / "export.json").is_file():
        t = time.perf_counter()
        siglip_so400m.export(model, onnx_dir, format="onnx")
        print(f"exported onnx in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    ov_dir.mkdir(parents=True, exist_ok=True)
    for tower in ("vision", "text"):
        if not (ov_dir / f"{tower}.xml").is_file():
            onnx_to_openvino(onnx_dir / f"{tower}.onnx", ov_dir / f"{tower}.xml")
    return {"onnx": onnx_dir, "openvino": ov_dir}


def implementations(model: str, tower: str, exports: dict[str, Path]) -> tuple[dict, dict]:
    """name -> fn(numpy batch) -> embeddings, and name -> the precision it computed in."""
    fns, precision = {}, {}
    ours = [("ours fp32", {"dtype": torch.float32}), ("ours int8", {"quantize": "int8"})]
    # Without native bf16 (AVX2 only) torch emulates bf16 about 30x slower than fp32: minutes per call
    # at batch 8, and pick_dtype gives fp32 there anyway. The report says so instead.
    if pick_dtype(torch.device("cpu")) == torch.bfloat16:
        ours.insert(0, ("ours bf16", {"dtype": torch.bfloat16}))
    else:
        print("ours bf16: not measured, this CPU has no native bf16 (torch emulates it, and `embed` "
              "picks fp32 here)", file=sys.stderr)
    for name, kw in ours:
        m, _ = siglip_so400m.load(model, towers=(tower,), **kw)
        encode = m.encode_image if tower == "vision" else m.encode_text

        def run(x, encode=encode):
            with torch.inference_mode():
                return encode(torch.from_numpy(x), normalize=True).float().numpy()

        fns[name], precision[name] = run, m.precision
    ext = {"onnx": ".onnx", "openvino": ".xml"}
    import openvino as ov

    cases = [("onnx", "ONNX Runtime fp32", "float32"), ("openvino", "OpenVINO fp32", "float32")]
    # Without bf16 in the CPU OpenVINO compiles a bf16 hint to fp32: the same model twice, and 1.7 GB
    # more memory, for nothing. The report says so instead.
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        cases.append(("openvino", "OpenVINO bf16", "bfloat16"))
    else:
        print("OpenVINO bf16: not measured, this CPU has no bf16 (OpenVINO would compute in fp32)",
              file=sys.stderr)
    for fmt, label, prec in cases:
        g = Graph(exports[fmt] / f"{tower}{ext[fmt]}", fmt, prec)
        fns[label], precision[label] = g, g.precision
    return fns, precision


def bench(fns: dict, x: np.ndarray, repeats: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    for fn in fns.values():  # warm-up: first touch of the weights, primitive caches
        fn(x[:1])
    best = {name: float("inf") for name in fns}
    outs = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn(x)
            best[name] = min(best[name], time.perf_counter() - t)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a full-size checkpoint folder")
    ap.add_argument("--exports", required=True, type=Path, help="where the exported graphs are (or go)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--towers", nargs="+", default=["vision", "text"], choices=("vision", "text"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    exports = ensure_exports(args.model, args.exports)
    from siglip_so400m.weights import resolve

    cfg = resolve(args.model).config
    d = dims_of(cfg)
    rates = gemm_rates(d, args.repeats, only=KEY)
    limit = {"bf16": rates["bf16"][KEY], "fp32": rates["fp32"][KEY]}
    import onnxruntime
    import openvino as ov

    info = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": ov.__version__,
            "openvino_cpu_capabilities": ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
            "gemm_gflops": {"bf16": limit["bf16"], "fp32": limit["fp32"], "shape": KEY}, "results": []}
    print(f"# {info['cpu']['model']}, {info['threads']} threads; OpenVINO CPU capabilities "
          f"{info['openvino_cpu_capabilities']}; GEMM at {KEY}: bf16 {limit['bf16']:.0f}, "
          f"fp32 {limit['fp32']:.0f} GFLOP/s (same run)")
    g = np.random.default_rng(0)
    for tower in args.towers:
        fns, precision = implementations(args.model, tower, exports)
        print(f"\n## {tower} tower\n")
        print("| batch | implementation | computes in | s per item | of bf16 GEMM | of fp32 GEMM "
              "| vs ours best eager | max diff vs ours fp32 |")
        print("|---|---|---|---|---|---|---|---|")
        for B in args.batches:
            if tower == "vision":
                x = (g.random((B, 3, d["image_size"], d["image_size"]), dtype=np.float32) * 2 - 1)
                flops = flops_image(d, B)
            else:
                x = g.integers(0, d["vocab"], (B, d["text_len"]), dtype=np.int64)
                flops = flops_text(d, B)
            best, outs = bench(fns, x, args.repeats)
            eager = min(v for k, v in best.items() if k.startswith("ours"))
            for name, t in best.items():
                rate = flops / t / 1e9
                row = {"tower": tower, "batch": B, "impl": name, "precision": precision[name], "seconds": t,
                       "of_bf16_gemm": rate / limit["bf16"], "of_fp32_gemm": rate / limit["fp32"],
                       "speedup_vs_best_eager": eager / t,
                       "max_abs_diff_vs_ours_fp32": float(np.abs(outs[name] - outs["ours fp32"]).max())}
                info["results"].append(row)
                print(f"| {B} | {name} | {precision[name]} | {t / B:.3f} | {row['of_bf16_gemm']:.0%} | "
                      f"{row['of_fp32_gemm']:.0%} | {eager / t:.2f}x | "
                      f"{row['max_abs_diff_vs_ours_fp32']:.1e} |", flush=True)
        del fns
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
