"""How far apart the three ways of resizing SigLIP's position table are, on a table of so400m's shape.

    python scripts/compare_pos_resampling.py [--json out.json]

- ours = transformers' `interpolate_pos_encoding=True`: F.interpolate bicubic, align_corners=False,
  no antialias, in the weights' dtype (siglip_so400m.model._resize_positions);
- timm's `resample_abs_pos_embed` (what `dynamic_img_size=True` and loading at another img_size do):
  bicubic with antialias=True, align_corners=False, computed in float32 (its formula is reimplemented
  here; where timm is installed the script checks that it equals timm's own function);
- big_vision's `resample_posemb` (applied once, at load, to fine-tune at another size):
  scipy.ndimage.zoom(grid, (h/g, w/g, 1), order=1), a linear zoom that maps corner to corner.

No checkpoint is needed: the table is random, 27x27x1152 as so400m's. Two kinds: i.i.d. normal (no
spatial structure, the worst case) and smooth (a sum of random low-frequency waves, closer to what
learned position tables look like). Differences are relative to the table's own scale.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from siglip_so400m.model import _resize_positions

G, D = 27, 1152  # so400m: 384 px / 14 px patches, width 1152
SIZES = {"224x224 (16x16)": (16, 16), "448x448 (32x32)": (32, 32), "336x476 (24x34)": (24, 34),
         "518x518 (37x37)": (37, 37)}


def timm_resample(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """timm.layers.resample_abs_pos_embed(posemb, (h, w), num_prefix_tokens=0), op for op."""
    dtype = table.dtype
    x = table.float().reshape(1, G, G, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=None, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(h * w, -1).to(dtype)


def big_vision_resample(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """big_vision's resample_posemb (square there; the same zoom per axis here)."""
    grid = table.float().numpy().reshape(G, G, -1)
    grid = scipy.ndimage.zoom(grid, (h / G, w / G, 1), order=1)
    return torch.from_numpy(grid.reshape(h * w, -1)).to(table.dtype)


def tables(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    iid = torch.randn(G * G, D, generator=g)
    # Smooth: per channel, a sum of 4 waves with up to 3 cycles across the grid.
    yy, xx = torch.meshgrid(torch.arange(G) / G, torch.arange(G) / G, indexing="ij")
    freq = torch.rand(4, D, 2, generator=g) * 3
    phase = torch.rand(4, D, generator=g) * 2 * math.pi
    waves = torch.cos(2 * math.pi * (freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx)
                      + phase[..., None, None])  # (4, D, G, G)
    smooth = waves.sum(0).permute(1, 2, 0).reshape(G * G, D) / 2
    return {"iid normal": iid, "smooth": smooth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    try:  # timm imports torchvision, which may be installed yet broken beside a CPU torch
        from timm.layers import resample_abs_pos_embed
    except Exception:
        resample_abs_pos_embed = None
    have_timm = resample_abs_pos_embed is not None
    rows = []
    for kind, table in tables().items():
        scale_max, scale_mean = table.abs().max().item(), table.abs().mean().item()
        for name, (h, w) in SIZES.items():
            ours = _resize_positions(table, G, h, w)
            for other, fn in (("timm", timm_resample), ("big_vision", big_vision_resample)):
                theirs = fn(table, h, w)
                diff = (ours - theirs).abs()
                rows.append({"table": kind, "size": name, "vs": other,
                             "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                             "max_rel": diff.max().item() / scale_max,
                             "mean_rel": diff.mean().item() / scale_mean})
            if have_timm:
                ref = resample_abs_pos_embed(table[None], [h, w], num_prefix_tokens=0)[0]
                assert torch.equal(ref, timm_resample(table, h, w)), "timm's formula changed"
    # In bf16 weights, ours resizes in bf16 (as transformers does), timm in fp32 and rounds after.
    table = tables()["smooth"]
    bf = table.bfloat16()
    for name, (h, w) in SIZES.items():
        diff = (_resize_positions(bf, G, h, w).float() - _resize_positions(table, G, h, w)).abs()
        rows.append({"table": "smooth, bf16 weights", "size": name, "vs": "ours in fp32",
                     "max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
                     "max_rel": diff.max().item() / table.abs().max().item(),
                     "mean_rel": diff.mean().item() / table.abs().mean().item()})

    print(f"table 27x27x1152, torch {torch.__version__}, scipy {scipy.__version__}, "
          f"timm {'checked' if have_timm else 'not installed (formula reimplemented)'}\n")
    print("| table | target grid | ours vs | max abs | mean abs | max / max abs(table) "
          "| mean / mean abs(table) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['table']} | {r['size']} | {r['vs']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
              f"{r['max_rel']:.1%} | {r['mean_rel']:.1%} |")
    result = {"torch": torch.__version__, "scipy": scipy.__version__, "timm_checked": have_timm,
              "numpy": np.__version__, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
