"""Our image tower on a GPU: images/s and model FLOP utilisation against transformers and timm.

    python scripts/gpu_benchmark.py [--json out.json]          # a CUDA machine, under 8 minutes
    python scripts/gpu_benchmark.py --smoke                    # tiny shapes on CPU, seconds (CI)

Needs only torch and transformers (timm if present); no network, no checkpoint, and no install of
this package: it imports it from the repository's src/. It builds random full-size so400m image-tower
weights on the GPU and gives the same weights to every implementation, then, in bf16:

- images/s at batch 64 and 256 for ours, transformers' SiglipVisionModel (sdpa) and timm's
  vit_so400m_patch14_siglip_384 (skipped, with the reason, when timm cannot be imported);
- model FLOP utilisation (MFU): the tower's FLOPs per second over the GPU's dense bf16 peak, from a
  table of datasheet peaks by device name ('unknown' for a GPU not in it);
- the largest batch that runs before CUDA runs out of memory (doubling, then a binary search, capped);
- parity with transformers on the GPU in fp32 and bf16 (same weights, same inputs).
It prints a table, every target with met / not met, and JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the package from this repository, installed or not
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark import build_timm, flops_image, peer_state_dicts  # noqa: E402

import siglip_so400m  # noqa: E402
from siglip_so400m.config import SiglipConfig, VisionConfig  # noqa: E402
from siglip_so400m.model import VisionTower  # noqa: E402

# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets. Matched
# on the device name in this order, so the more specific names come first.
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5
    ("H200 NVL", 835.0),
    ("H200", 989.4),  # SXM
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A10G", None),  # not published by NVIDIA
    ("A10", 125.0),
    ("RTX 4090", 165.2),  # with fp32 accumulation, as PyTorch uses
]
SMOKE_VISION = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=7,
)


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def dims(v: VisionConfig) -> dict:
    return {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_patches": v.num_positions,
        "D": v.hidden_size,
        "F": v.intermediate_size,
        "layers": v.num_hidden_layers,
        "heads": v.num_attention_heads,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_batch(fn, x, iters: int, device: torch.device) -> float:
    """Best of `iters` timed calls after two warm-ups (cuDNN / cuBLAS heuristics, allocator)."""
    for _ in range(2):
        fn(x)
    sync(device)
    best = math.inf
    for _ in range(iters):
        t = time.perf_counter()
        fn(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def build(v: VisionConfig, device: torch.device) -> tuple[VisionTower, dict, dict]:
    """Our tower with random weights (big_vision's init, then every LayerNorm and bias perturbed), the
    transformers and timm towers on the same weights, all fp32; timm is None with a reason if absent."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        ours = VisionTower(v).eval()
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.05)
    sd = ours.state_dict()
    hf_cfg = SiglipVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=v.layer_norm_eps,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = SiglipVisionModel(hf_cfg).eval()
    # transformers 4 nests the tower under vision_model., transformers 5 does not.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    hf.load_state_dict({prefix + k: t for k, t in sd.items()}, strict=True)
    peers = {"transformers (sdpa)": hf}
    skipped = {}
    try:
        with torch.device(device):
            timm_model = build_timm(dims(v)).eval()
        timm_sd, _ = peer_state_dicts({f"vision_model.{k}": t for k, t in sd.items()}, dims(v))
        timm_model.load_state_dict(timm_sd, strict=True)
        peers["timm"] = timm_model
    except Exception as e:  # timm missing, or its torchvision not importable beside this torch
        skipped["timm"] = f"{type(e).__name__}: {str(e)[:300]}"
    return ours, peers, skipped


def call(name: str, model):
    if name.startswith("transformers"):
        return lambda x: model(pixel_values=x).pooler_output
    return model


def largest_batch(
    fn, v: VisionConfig, device: torch.device, dtype, start: int, cap: int, deadline: float
) -> dict:
    """The largest batch that runs without an out-of-memory error: doubling from `start`, then a
    binary search between the last success and the first failure; stops at `cap` or the deadline."""
    S = v.image_size

    def fits(b: int) -> bool:
        try:
            with torch.inference_mode():
                fn(torch.randn(b, 3, S, S, device=device, dtype=dtype))
            sync(device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    lo, hi = 0, None
    b = start
    while b <= cap and time.perf_counter() < deadline:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return {
            "largest_batch": lo,
            "note": f"reached the cap ({cap})" if lo * 2 > cap else "stopped at the deadline",
        }
    while hi - lo > max(1, lo // 32) and time.perf_counter() < deadline:  # to within 3%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_batch": lo, "first_failure": hi}


def parity(ours, hf, v: VisionConfig, device: torch.device) -> dict:
    """Normalized embeddings of the same 4 images, ours vs transformers, in fp32 and in bf16."""
    g = torch.Generator().manual_seed(1)
    px = (torch.rand(4, 3, v.image_size, v.image_size, generator=g) * 2 - 1).to(device)
    out = {}
    with torch.inference_mode():
        ref32 = F.normalize(hf(pixel_values=px).pooler_output.float(), dim=-1)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = F.normalize(ours.to(dtype)(px.to(dtype)).float(), dim=-1)
            b = F.normalize(hf.to(dtype)(pixel_values=px.to(dtype)).pooler_output.float(), dim=-1)
            out[name] = {
                "max_abs_diff_vs_transformers": (a - b).abs().max().item(),
                "cos_min_vs_transformers": F.cosine_similarity(a, b).min().item(),
                "cos_min_vs_transformers_fp32": F.cosine_similarity(a, ref32).min().item(),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    ap.add_argument("--device", help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; smoke 2,4)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case (default 10; smoke 2)")
    ap.add_argument("--oom-cap", type=int, default=None, help="largest batch tried (default 8192; smoke 16)")
    ap.add_argument("--budget-s", type=float, default=420, help="stop optional steps after this many seconds")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time ours under torch.compile (adds a minute or two of compiling per batch size)",
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    if args.smoke:
        v = VisionConfig(**SMOKE_VISION)
        device = torch.device(args.device or "cpu")
    else:
        v = SiglipConfig.from_json(ROOT / "configs" / "siglip-so400m-patch14-384.json").vision_config
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda" and not args.device:
            sys.exit(
                "no CUDA device here: run with --smoke to check the script on the CPU "
                "(or --device cpu to time the full size on the CPU, slowly)"
            )
    batches = [int(b) for b in (args.batches or ("2,4" if args.smoke else "64,256")).split(",")]
    iters = args.iters or (2 if args.smoke else 10)
    cap = args.oom_cap or (16 if args.smoke else 8192)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = bf16_peak(name) if device.type == "cuda" else None
    import transformers

    results: dict = {
        "device": name,
        "bf16_peak_tflops": peak if peak is not None else "unknown",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": args.smoke,
        "package": str(Path(siglip_so400m.__file__).parent),
        "shape": SMOKE_VISION if args.smoke else "so400m image tower",
    }
    ours, peers, skipped = build(v, device)
    results["skipped"] = skipped
    results["transformers_attention"] = peers["transformers (sdpa)"].config._attn_implementation
    results["build_s"] = time.perf_counter() - t0
    results["parity"] = parity(ours, peers["transformers (sdpa)"], v, device)

    # bf16 copies for the timings; each runs the whole batch at once (our CPU path's one-image loop
    # is for CPUs only, the GPU takes the batch whole).
    impls = {"ours": ours.to(torch.bfloat16)}
    if args.compile:
        if device.type == "cpu":
            # Our CPU path calls oneDNN's linear, which Inductor lowers only on frozen (constant) weights.
            from torch._inductor import config as inductor_config

            inductor_config.freezing = True
        impls["ours (torch.compile)"] = torch.compile(impls["ours"])
    impls.update({k: m.to(torch.bfloat16) for k, m in peers.items()})
    d = dims(v)
    rows = []
    with torch.inference_mode():
        for B in batches:
            x = torch.randn(B, 3, v.image_size, v.image_size, device=device, dtype=torch.bfloat16)
            for impl, m in impls.items():
                s = seconds_per_batch(call(impl, m), x, iters, device)
                tflops = flops_image(d, B) / s / 1e12
                rows.append(
                    {
                        "batch": B,
                        "impl": impl,
                        "seconds": s,
                        "images_per_s": B / s,
                        "tflops": tflops,
                        "mfu": tflops / peak if peak else None,
                    }
                )
            if device.type == "cuda":
                del x
                torch.cuda.empty_cache()
    results["speed"] = rows
    for impl in list(impls):
        if not impl.startswith("ours"):
            impls[impl].to("cpu")  # free the GPU for the out-of-memory search
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["oom_search"] = largest_batch(
        impls["ours"], v, device, torch.bfloat16, start=max(batches), cap=cap, deadline=deadline
    )
    results["targets"] = targets(results)
    results["wall_s"] = time.perf_counter() - t0
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def targets_for(ours: dict, peers: list[dict]) -> list[dict]:
    """Speed-ups of one of our rows (eager or compiled) over each peer at its batch, and its MFU."""
    out = []
    B, name = ours["batch"], ours["impl"]
    for r in peers:
        goal = 1.2 if r["impl"].startswith("transformers") else 1.0
        value = r["seconds"] / ours["seconds"]
        out.append(
            {
                "target": f"batch {B}: {name} speed-up over {r['impl']}",
                "value": value,
                "goal": goal,
                "met": value >= goal,
            }
        )
    mfu = ours["mfu"]
    out.append(
        {
            "target": f"batch {B}: {name} MFU (bf16)",
            "value": mfu,
            "goal": 0.60,
            "met": None if mfu is None else mfu >= 0.60,
        }
    )
    return out


def targets(results: dict) -> list[dict]:
    """Issue 13's GPU aims: at least 1.2x transformers and 60% MFU (bf16), and parity."""
    out = []
    rows = results["speed"]
    for B in sorted({r["batch"] for r in rows}):
        for ours in (r for r in rows if r["batch"] == B and r["impl"].startswith("ours")):
            out += targets_for(
                ours, [r for r in rows if r["batch"] == B and not r["impl"].startswith("ours")]
            )
    p = results["parity"]
    # fp32: the same math in another order on the GPU; bf16: 8-bit mantissas, both sides rounded.
    out.append(
        {
            "target": "parity fp32: max |diff| of normalized embeddings",
            "value": p["fp32"]["max_abs_diff_vs_transformers"],
            "goal": "<= 1e-4",
            "met": p["fp32"]["max_abs_diff_vs_transformers"] <= 1e-4,
        }
    )
    out.append(
        {
            "target": "parity bf16: min cosine to transformers bf16",
            "value": p["bf16"]["cos_min_vs_transformers"],
            "goal": ">= 0.999",
            "met": p["bf16"]["cos_min_vs_transformers"] >= 0.999,
        }
    )
    return out


def report(results: dict) -> None:
    print(
        f"\n{results['device']} (bf16 peak {results['bf16_peak_tflops']} TFLOP/s); torch {results['torch']}, "
        f"transformers {results['transformers']}{'; SMOKE (tiny shapes)' if results['smoke'] else ''}"
    )
    print(f"{'batch':>6}  {'implementation':<22}{'s/batch':>10}{'images/s':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for r in results["speed"]:
        mfu = "unknown" if r["mfu"] is None else f"{r['mfu']:.0%}"
        print(
            f"{r['batch']:>6}  {r['impl']:<22}{r['seconds']:10.4f}{r['images_per_s']:10.1f}{r['tflops']:9.1f}"
            f"{mfu:>7}"
        )
    for k, why in results["skipped"].items():
        print(f"skipped {k}: {why}")
    print(f"largest bf16 batch before out of memory (ours): {results['oom_search']}")
    for k, p in results["parity"].items():
        print(f"parity {k}: {p}")
    print("targets:")
    for t in results["targets"]:
        status = "n/a (peak unknown)" if t["met"] is None else "met" if t["met"] else "NOT met"
        value = "unknown" if t["value"] is None else f"{t['value']:.4g}"
        print(f"  {t['target']:<64} {value:>10}  goal {t['goal']}  {status}")
    print(f"wall time {results['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
