"""SigLIP 2 NaFlex's image tower, ours against transformers' Siglip2VisionModel, in one run.

    flock /tmp/heavy.lock python scripts/benchmark_naflex.py [--dtype float32 bfloat16] [--rounds 3]
        [--layers 27] [--json out.json]

A batch of 8 images of mixed aspect ratios (1:8 to 8:1) at max_num_patches=256 through the So400m
NaFlex shape (width 1152, 16 heads, MLP 4304, 16 px patches, a 16x16 position table; random weights
built in memory, no checkpoint needed). Both implementations hold the very same weight tensors.

Cases, interleaved round by round so that drift in the machine's speed hits all alike, best of
--rounds after one warm-up each:

- ours: `encode_image` as load() gives it; on CPU each image alone at its own length, so nothing is
  computed over padding;
- ours, one padded batch: `per_image_on_cpu = False`, the padding masked as transformers does;
- transformers: Siglip2VisionModel (sdpa) on the processor's padded batch, its pooler_output.

Beside them, the GEMM rate at (256 x 1152 x 4304), one image's MLP matmul, measured in the same run
in each dtype, and each case's useful FLOPs (those on the images' own tokens) as a share of it.
`--layers N` keeps every shape but runs N of the 27 blocks, for machines where the full depth takes
minutes a forward; the ratios are per block alike (every block costs the same), say so when quoting.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from siglip_so400m.config import VisionConfig
from siglip_so400m.image import NaFlexImageProcessor
from siglip_so400m.model import VisionTower
from siglip_so400m.testing import structured_positions

# (height, width) of the 8 images: 1:8, 1:4, 1:2, 3:4, 1:1, 3:2, 4:1, 8:1.
SIZES = [(64, 512), (128, 512), (256, 512), (384, 512), (512, 512), (512, 341), (512, 128), (512, 64)]
D, MLP, HEADS = 1152, 4304, 16


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def build(layers: int, dtype: torch.dtype):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    cfg = VisionConfig(hidden_size=D, intermediate_size=MLP, num_hidden_layers=layers,
                       num_attention_heads=HEADS, patch_size=16, image_size=None, num_patches=256)
    torch.manual_seed(0)
    ours = VisionTower(cfg)
    with torch.no_grad():
        ours.embeddings.position_embedding.weight.copy_(structured_positions(16, D))
    ours = ours.to(dtype).eval()
    hf_cfg = Siglip2VisionConfig(hidden_size=D, intermediate_size=MLP, num_hidden_layers=layers,
                                 num_attention_heads=HEADS, patch_size=16, num_patches=256)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = Siglip2VisionModel(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    return ours, hf.eval()


def best_of(cases: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict[str, float]:
    times = {name: float("inf") for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name] = min(times[name], time.perf_counter() - t)
    return times


def gemm_rate(dtype: torch.dtype, rounds: int = 5) -> float:
    """GFLOP/s of (256 x 1152) @ (1152 x 4304), best of `rounds`."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(256, D, generator=g).to(dtype), torch.randn(MLP, D, generator=g).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)
        for _ in range(rounds):
            t = time.perf_counter()
            torch.nn.functional.linear(a, w)
            best = min(best, time.perf_counter() - t)
    return 2 * 256 * D * MLP / best / 1e9


def useful_flops(lengths: list[int], layers: int) -> float:
    """Matmul FLOPs on the images' own tokens: per block q, k, v, out (4 D^2) and the MLP (2 D MLP)
    per token, attention 2 n D per token, plus the patch embedding and the MAP head."""
    total = 0.0
    for n in lengths:
        block = n * (2 * 4 * D * D + 2 * 2 * D * MLP) + 2 * 2 * n * n * D
        total += layers * block + 2 * n * 768 * D + 2 * n * 2 * D * D
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=27, help="blocks to run (default: all 27)")
    ap.add_argument("--max-num-patches", type=int, default=256)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    pixels = NaFlexImageProcessor(patch_size=16, max_num_patches=args.max_num_patches)(images())
    lengths = pixels.lengths()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    result = {"machine": f"{cpu}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers,
              "max_num_patches": args.max_num_patches, "grids": pixels.spatial_shapes.tolist(),
              "tokens": sum(lengths), "padded_tokens": pixels.patches.shape[0] * pixels.patches.shape[1],
              "bf16_onednn": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "dtypes": {}}
    print(f"{result['machine']}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"8 images, grids {result['grids']}: {result['tokens']} tokens of {result['padded_tokens']} "
          f"padded slots; {args.layers} blocks of So400m width")
    flops = useful_flops(lengths, args.layers)
    for name in args.dtype:
        dtype = getattr(torch, name)
        ours, hf = build(args.layers, dtype)
        mask = pixels.mask.to(torch.int32)

        def hf_fn(hf=hf, mask=mask):
            return hf(pixel_values=pixels.patches, pixel_attention_mask=mask,
                      spatial_shapes=pixels.spatial_shapes).pooler_output

        def switched(name: str, ours=ours) -> Callable[[], torch.Tensor]:
            def fn() -> torch.Tensor:
                setattr(ours, name, False)
                try:
                    return ours(pixels)
                finally:
                    setattr(ours, name, True)
            return fn

        with torch.inference_mode():
            a, b = ours(pixels).float(), hf_fn().float()
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
            diff = (a - b).abs().max()
        rate = gemm_rate(dtype)
        t = best_of({"ours": lambda ours=ours: ours(pixels),
                     "ours, one padded batch": switched("per_image_on_cpu"), "transformers": hf_fn},
                    args.rounds)
        rows = {k: {"seconds": v, "useful_gflops": flops / v / 1e9, "of_gemm": flops / v / 1e9 / rate}
                for k, v in t.items()}
        result["dtypes"][name] = {"gemm_gflops": rate, "cases": rows, "max_abs_diff_normalized": diff.item(),
                                  "speedup_vs_transformers": t["transformers"] / t["ours"]}
        print(f"\n{name}: GEMM 256x1152x4304 {rate:.1f} GFLOP/s; normalized embeddings ours vs "
              f"transformers max |diff| {diff.item():.2e}")
        print(f"{'case':<30}{'seconds':>10}{'GFLOP/s':>10}{'of GEMM':>9}")
        for k, r in rows.items():
            print(f"{k:<30}{r['seconds']:>10.3f}{r['useful_gflops']:>10.1f}{r['of_gemm']:>9.0%}")
        print(f"ours is {t['transformers'] / t['ours']:.2f}x transformers")
        del ours, hf
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
