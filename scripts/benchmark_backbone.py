"""Speed of the image tower as a backbone, every ratio measured in one run on one machine.

    python -m siglip_so400m.testing /tmp/so400m              # full-size random weights (3.5 GB)
    python scripts/benchmark_backbone.py --model /tmp/so400m [--dtype bfloat16] [--json out.json]

Cases (steady-state seconds, median of --repeats after one warm-up, the cases alternating so that
drift in the machine's speed hits all alike):

- the image tower (encode_image) at the native size (384) against 224 px (256 vs 729 tokens;
  target: at least 2.5x faster at 224);
- image_features(layers=(-2,)) against layers=(-1,): the last block is not run (blocks counted);
- feature extraction against transformers' SiglipVisionModel(output_hidden_states=True,
  interpolate_pos_encoding=True) at the same size (target: at least 1.1x);
- at batch 8, the image tower one image at a time (VisionTower.per_image_on_cpu = True) against the
  batch run whole (False): which wins decides the switch's default.

Sizes scale with the checkpoint: "224" means the grid so400m gets at 224 px (16x16 patches), so a
tiny checkpoint from `python -m siglip_so400m.testing DIR --tiny` runs the same cases in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import siglip_so400m
from siglip_so400m.model import VisionTower


def run(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per case; one warm-up each, then the cases in turn, `repeats` rounds."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()
        for _ in range(repeats):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def blocks_run(model: siglip_so400m.SigLIP, fn: Callable[[], object]) -> int:
    count = [0]
    hooks = [b.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
             for b in model.vision_model.encoder.layers]
    with torch.inference_mode():
        fn()
    for h in hooks:
        h.remove()
    return count[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local checkpoint folder")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-batch", type=int, default=8, help="batch for the per-image loop case")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from transformers import SiglipVisionModel

    model, _ = siglip_so400m.load(args.model, towers=("vision",), dtype=dtype)
    hf = SiglipVisionModel.from_pretrained(args.model, dtype=dtype).eval()  # sdpa, its default
    cfg = model.config.vision_config
    P, S, L = cfg.patch_size, cfg.image_size, cfg.num_hidden_layers
    small = P * round(cfg.grid_size * 224 / 384)  # so400m: 14 * 16 = 224
    g = torch.Generator().manual_seed(0)
    x = {s: (torch.rand(1, 3, s, s, generator=g) * 2 - 1) for s in (S, small)}
    batch = torch.rand(args.loop_batch, 3, S, S, generator=g) * 2 - 1
    every = tuple(range(L + 1))
    tower = model.vision_model

    def per_image(on: bool) -> Callable[[], object]:
        def fn():
            tower.per_image_on_cpu = on
            try:
                return model.encode_image(batch)
            finally:
                tower.per_image_on_cpu = VisionTower.per_image_on_cpu

        return fn

    cases = {
        f"encode_image {S}px": lambda: model.encode_image(x[S]),
        f"encode_image {small}px": lambda: model.encode_image(x[small]),
        f"image_features(layers=(-1,)) {S}px": lambda: model.image_features(x[S], layers=(-1,)),
        f"image_features(layers=(-2,)) {S}px": lambda: model.image_features(x[S], layers=(-2,), norm=False),
        f"image_features(all {L + 1} layers) {S}px": lambda: model.image_features(
            x[S], layers=every, norm=False),
        f"transformers output_hidden_states {S}px": lambda: hf(
            pixel_values=x[S], output_hidden_states=True, interpolate_pos_encoding=True),
        f"image_features(all {L + 1} layers) {small}px": lambda: model.image_features(
            x[small], layers=every, norm=False),
        f"transformers output_hidden_states {small}px": lambda: hf(
            pixel_values=x[small], output_hidden_states=True, interpolate_pos_encoding=True),
        f"encode_image batch {args.loop_batch}, one image at a time": per_image(True),
        f"encode_image batch {args.loop_batch}, whole batch": per_image(False),
    }
    t = run(cases, args.repeats)
    names = list(cases)
    ratios = {
        f"{small}px vs {S}px image tower (target >= 2.5x)": t[names[0]] / t[names[1]],
        "layers=(-2,) vs (-1,) (skips the last block)": t[names[2]] / t[names[3]],
        f"ours all layers vs transformers output_hidden_states, {S}px (target >= 1.1x)":
            t[names[5]] / t[names[4]],
        f"ours all layers vs transformers output_hidden_states, {small}px (target >= 1.1x)":
            t[names[7]] / t[names[6]],
        f"ours layers=(-2,) vs transformers output_hidden_states, {S}px": t[names[5]] / t[names[3]],
        f"one image at a time vs whole batch, batch {args.loop_batch} (> 1: the loop wins)":
            t[names[9]] / t[names[8]],
    }
    blocks = {"layers=(-1,)": blocks_run(model, cases[names[2]]),
              "layers=(-2,)": blocks_run(model, cases[names[3]])}

    print(f"{args.model}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("\n| case | seconds |\n|---|---|")
    for name, s in t.items():
        print(f"| {name} | {s:.4f} |")
    print("\n| ratio | speed-up |\n|---|---|")
    for name, r in ratios.items():
        print(f"| {name} | {r:.2f}x |")
    print(f"\nblocks run: {blocks}")
    result = {"model": args.model, "dtype": args.dtype, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "repeats": args.repeats,
              "seconds": t, "ratios": ratios, "blocks_run": blocks}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
