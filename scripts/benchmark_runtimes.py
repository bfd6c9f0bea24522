"""The image tower against every runtime a user could pick instead, in one process, as ratios.

    python -m siglip_so400m.testing /tmp/so400m                  # full-size random weights (3.5 GB)
    python scripts/benchmark_runtimes.py --model /tmp/so400m --exports /tmp/so400m-exports \\
        [--batches 1 8] [--dtypes bf16 fp32 int8] [--rounds 4] [--pause 1] [--json out.json]

Seconds per batch of the image tower for ours (`load(dtype=...)`, `load(quantize="int8")`), OpenVINO
(the exported IR compiled with INFERENCE_PRECISION_HINT bf16 / f32), ONNX Runtime (fp32, CPU execution
provider, thread spinning off) and transformers' SiglipVisionModel (sdpa), all on the same weights and
the same inputs, all in this process. Each round runs every implementation once per batch size, in
an order shuffled anew each round, with a pause after each call so that the last runtime's threads
settle; the figure is the best of --rounds rounds after a warm-up. The matrix-product rate at the
image tower's MLP shape (729x1152x4304) is measured in the same run, before the rounds and again
after them (bf16 and fp32: the faster of F.linear and oneDNN's matmul; int8: the faster of
torch._int_mm and oneDNN's int8 matmul), and every time is also printed as the model's FLOPs per
second over the rate before.

Printed at the end: for each batch size and precision, ours against each peer (the peer's time over
ours: above 1 is ours ahead) and int8 against ours in fp32. Without native bf16 (AVX2 only) no bf16
row is measured (torch emulates it, OpenVINO would compute in fp32), and the report says so.
Missing graphs in --exports are exported first (scripts/benchmark_export.py's ensure_exports).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from benchmark import cpu_info, dims_of, flops_image, gemm_rates
from benchmark_export import ensure_exports

import siglip_so400m
from siglip_so400m.api import pick_dtype
from siglip_so400m.exporting import Graph

KEY = "729x1152x4304"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def int8_gemm_rate(repeats: int) -> dict[str, float]:
    """GOP/s at KEY of torch._int_mm and of oneDNN's int8 matmul (u8 activations, as our int8 may use)."""
    M, K, N = (int(v) for v in KEY.split("x"))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    wt = w.t().contiguous()
    out = {}
    fns = {"torch._int_mm": lambda: torch._int_mm(a, wt)}
    if hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise"):
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        ua = (a.to(torch.int16) + 128).to(torch.uint8)
        scale, zp = torch.ones(N), torch.zeros(N, dtype=torch.long)
        fns["oneDNN u8 x s8"] = lambda: torch.ops.onednn.qlinear_pointwise(
            ua, 1.0, 128, packed, scale, zp, None, 1.0, 0, torch.float32, "none", [], "")
    with torch.inference_mode():
        for name, fn in fns.items():
            fn()
            best = min(_timed(fn) for _ in range(repeats))
            out[name] = 2 * M * K * N / best / 1e9
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def implementations(model: str, exports: dict[str, Path], dtypes: list[str]) -> dict[str, tuple[str, object]]:
    """label -> (precision key, fn(numpy batch) -> (B, D) normalized float32 numpy)."""
    from transformers import SiglipVisionModel

    out: dict[str, tuple[str, object]] = {}
    for key in dtypes:
        if key == "int8":
            m, _ = siglip_so400m.load(model, towers=("vision",), quantize="int8")
        else:
            m, _ = siglip_so400m.load(model, towers=("vision",), dtype=DTYPES[key])

        def ours(x, m=m):
            with torch.inference_mode():
                return m.encode_image(torch.from_numpy(x), normalize=True).float().numpy()

        out[f"ours {key}"] = (key, ours)
        if key == "int8":
            continue
        hf = SiglipVisionModel.from_pretrained(model, dtype=DTYPES[key], attn_implementation="sdpa").eval()

        def transformers(x, hf=hf, d=DTYPES[key]):
            with torch.inference_mode():
                y = hf(pixel_values=torch.from_numpy(x).to(d)).pooler_output.float()
                return torch.nn.functional.normalize(y, dim=-1).numpy()

        out[f"transformers {key}"] = (key, transformers)
        ov = Graph(exports["openvino"] / "vision.xml", "openvino", "bfloat16" if key == "bf16" else "float32")
        out[f"OpenVINO {key}"] = (key, ov)
        if key == "fp32":
            out["ONNX Runtime fp32"] = (key, Graph(exports["onnx"] / "vision.onnx", "onnx", "float32"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a full-size checkpoint folder")
    ap.add_argument("--exports", required=True, type=Path, help="where the exported graphs are (or go)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32", "int8"], choices=["bf16", "fp32", "int8"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle after each call")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    dtypes = list(args.dtypes)
    if "bf16" in dtypes and pick_dtype(torch.device("cpu")) != torch.bfloat16:
        dtypes.remove("bf16")
        print("bf16: not measured, this CPU has no native bf16 (torch emulates it; OpenVINO would "
              "compute in fp32)", file=sys.stderr)
    exports = ensure_exports(args.model, args.exports)
    from siglip_so400m.weights import resolve

    d = dims_of(resolve(args.model).config)
    rates = gemm_rates(d, 5, only=KEY)
    limit = {"bf16": rates["bf16"][KEY], "fp32": rates["fp32"][KEY]}
    limit_int8 = int8_gemm_rate(5)
    limit["int8"] = max(limit_int8.values())
    import onnxruntime
    import openvino

    info = {"cpu": cpu_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "gemm": {"shape": KEY, "bf16_gflops": limit["bf16"], "fp32_gflops": limit["fp32"],
                     "int8_gops": limit_int8},
            "rounds": args.rounds, "results": []}
    print(f"# {info['cpu']['model']}, {info['threads']} threads, torch {torch.__version__}, "
          f"OpenVINO {openvino.__version__}, ONNX Runtime {onnxruntime.__version__}, {info['date']}")
    print(f"# GEMM at {KEY} in this run: bf16 {limit['bf16']:.0f}, fp32 {limit['fp32']:.0f} GFLOP/s; int8 "
          + ", ".join(f"{k} {v:.0f}" for k, v in limit_int8.items()) + " GOP/s")
    impls = implementations(args.model, exports, dtypes)
    rng = np.random.default_rng(0)
    inputs = {B: (rng.random((B, 3, d["image_size"], d["image_size"]), dtype=np.float32) * 2 - 1)
              for B in args.batches}
    for fn in impls.values():  # warm-up: first touch of the weights, primitives, kernel choices
        fn[1](inputs[min(args.batches)][:1])
    best = {(B, name): float("inf") for B in args.batches for name in impls}
    outs = {}
    for r in range(args.rounds):
        for B in args.batches:
            order = list(impls)
            random.Random(r * 100 + B).shuffle(order)
            for name in order:
                gc.collect()
                time.sleep(args.pause)
                t = time.perf_counter()
                outs[(B, name)] = impls[name][1](inputs[B])
                best[(B, name)] = min(best[(B, name)], time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    # The machine's speed drifts (other tenants of a shared host): the rates again, after the rounds.
    after = gemm_rates(d, 5, only=KEY)
    info["gemm_after"] = {"bf16_gflops": after["bf16"][KEY], "fp32_gflops": after["fp32"][KEY]}
    print(f"# GEMM at {KEY} after the rounds: bf16 {after['bf16'][KEY]:.0f}, fp32 {after['fp32'][KEY]:.0f} "
          "GFLOP/s (the table uses the rates before)")
    print("\n| batch | implementation | seconds | of GEMM | max diff vs ours fp32 |")
    print("|---|---|---|---|---|")
    for B in args.batches:
        for name, (key, _) in impls.items():
            t = best[(B, name)]
            of = flops_image(d, B) / t / 1e9 / limit[key]
            ref = outs.get((B, "ours fp32"))
            diff = float(np.abs(outs[(B, name)] - ref).max()) if ref is not None else float("nan")
            info["results"].append({"batch": B, "impl": name, "precision": key, "seconds": t,
                                    "of_gemm": of, "max_abs_diff_vs_ours_fp32": diff})
            print(f"| {B} | {name} | {t:.3f} | {of:.0%} | {diff:.1e} |")
    print("\n| batch | precision | peer | peer s / ours s | ours at least as fast |")
    print("|---|---|---|---|---|")
    info["ratios"] = []
    for B in args.batches:
        for key in dtypes:
            ours = best[(B, f"ours {key}")]
            peers = [n for n, (k, _) in impls.items() if k == key and not n.startswith("ours")]
            if key == "int8" and (B, "ours fp32") in best:
                peers = ["ours fp32"]
            for peer in peers:
                ratio = best[(B, peer)] / ours
                info["ratios"].append({"batch": B, "precision": key, "peer": peer, "ratio": ratio})
                print(f"| {B} | {key} | {peer} | {ratio:.2f}x | {'yes' if ratio >= 1 else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
