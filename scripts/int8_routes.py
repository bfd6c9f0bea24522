"""The maintained int8 routes on so400m encoder layers (729 tokens): time, first-call cost, calibration.

    python scripts/int8_routes.py [--layers 2] [--json out.json]      # needs torchao for two routes
    python scripts/int8_routes.py --smoke                             # tiny shapes, seconds

Each route runs in a fresh process (torch.compile's caches and oneDNN's primitives start cold), on the
same random layers and input, activations in bf16:

- bf16: our bf16 fast path, the reference speed;
- ours-onednn: siglip_so400m.int8 on oneDNN's int8 matmul with fused epilogues (the default);
- ours-int_mm: siglip_so400m.int8 on torch._int_mm with a separate epilogue (the fallback);
- torchao: torchao's Int8DynamicActivationInt8WeightConfig, then torch.compile;
- pt2e: PT2E static quantization with the X86InductorQuantizer (calibrated on 4 random inputs), then
  torch.compile under bf16 autocast.
A route whose package is missing is reported as skipped. Accuracy is the cosine of the output to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from siglip_so400m import int8  # noqa: E402
from siglip_so400m.model import EncoderLayer  # noqa: E402

ROUTES = ["bf16", "ours-onednn", "ours-int_mm", "torchao", "pt2e"]


def layers(n: int, D: int, F_: int, H: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[EncoderLayer(D, H, F_, 1e-6) for _ in range(n)]).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.02)
    return m


def best(fn, repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def run_route(route: str, n: int, N: int, D: int, F_: int, H: int, repeats: int) -> dict:
    base = layers(n, D, F_, H)
    x = torch.randn(1, N, D, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = base(x)
    xb = x.bfloat16()
    t0 = time.perf_counter()
    calibration = "none"
    if route == "bf16":
        m = copy.deepcopy(base).bfloat16()
        fn = lambda: m(xb)  # noqa: E731
    elif route.startswith("ours"):
        m = copy.deepcopy(base)
        int8.quantize_int8(m, torch.bfloat16, onednn=route == "ours-onednn")
        fn = lambda: m(xb)  # noqa: E731
    elif route == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(base).bfloat16().requires_grad_(False)
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        m = torch.compile(m)
        fn = lambda: m(xb)  # noqa: E731
    elif route == "pt2e":
        try:
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError:
            import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        base.requires_grad_(False)
        prepared = prepare_pt2e(torch.export.export(copy.deepcopy(base), (x,)).module(), quantizer)
        with torch.no_grad():
            for i in range(4):
                prepared(torch.randn(1, N, D, generator=torch.Generator().manual_seed(10 + i)))
        calibration = "4 inputs"
        m = torch.compile(convert_pt2e(prepared))

        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(x)
    else:
        raise ValueError(route)
    prepare_s = time.perf_counter() - t0
    # torchao's int8 weights intercept F.linear only, and PT2E traced F.linear: with grad mode on (and
    # no parameter needing a gradient) our layers take the plain ops instead of their oneDNN path.
    grad = contextlib.nullcontext if route in ("torchao", "pt2e") else torch.inference_mode
    with grad():
        t = time.perf_counter()
        y = fn()
        first_s = time.perf_counter() - t
        steady = best(fn, repeats)
    flops = n * (2 * N * (4 * D * D + 2 * D * F_) + 4 * N * N * D)
    return {
        "route": route,
        "prepare_s": prepare_s,
        "first_call_s": first_s,
        "ms_per_layer": steady * 1e3 / n,
        "gops": flops / steady / 1e9,
        "calibration": calibration,
        "cosine_to_fp32": F.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0).item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes")
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per route (compiling is slow)")
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (16, 64, 96, 4) if args.smoke else (729, 1152, 4304, 16)
    if args.one:
        print(json.dumps(run_route(args.one, args.layers, *shape, args.repeats)))
        return
    a = torch.randint(-127, 128, (shape[0], shape[1]), dtype=torch.int8)
    b = torch.randint(-127, 128, (shape[1], shape[2]), dtype=torch.int8)
    torch._int_mm(a, b)
    int_mm = 2 * shape[0] * shape[1] * shape[2] / best(lambda: torch._int_mm(a, b), 20) / 1e9
    print(f"torch._int_mm {shape[0]}x{shape[1]}x{shape[2]}: {int_mm:.0f} GOP/s (torch {torch.__version__})")
    rows = []
    for route in args.routes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            route,
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
        ]
        try:
            r = subprocess.run(
                cmd + (["--smoke"] if args.smoke else []),
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            row = (
                json.loads(r.stdout.splitlines()[-1])
                if r.returncode == 0
                else {
                    "route": route,
                    "skipped": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed",
                }
            )
        except subprocess.TimeoutExpired:
            row = {"route": route, "skipped": f"over {args.timeout} s"}
        if "gops" in row:
            row["of_int_mm"] = row["gops"] / int_mm
            print(
                f"{route:<12} prepare {row['prepare_s']:6.1f} s  first call {row['first_call_s']:6.1f} s  "
                f"{row['ms_per_layer']:7.1f} ms/layer  {row['gops']:6.0f} GOP/s "
                f"({row['of_int_mm']:.0%} of _int_mm)"
                f"  cosine {row['cosine_to_fp32']:.5f}  calibration: {row['calibration']}",
                flush=True,
            )
        else:
            print(f"{route:<12} skipped: {row['skipped']}", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"int_mm_gops": int_mm, "routes": rows}, indent=1))


if __name__ == "__main__":
    main()
