"""How far transformers' default SigLIP image processor (torchvision backend) is from its PIL one,
which siglip_so400m reproduces bit for bit.

torchvision cannot be installed beside the CPU torch 2.13 build, so run this in its own venv:

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers pillow
    /tmp/tv/bin/python scripts/compare_torchvision_preprocessing.py
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
import transformers
from PIL import Image
from transformers import SiglipImageProcessor, SiglipImageProcessorPil


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Smooth low-frequency content plus mild noise, as a photograph has."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def main() -> None:
    print(f"transformers {transformers.__version__}, torchvision {torchvision.__version__}, "
          f"torch {torch.__version__}")
    tv = SiglipImageProcessor(size={"height": 384, "width": 384})
    pil = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    cases = {
        "noise 640x480": Image.fromarray(noise),
        "photo-like 640x480 (down)": photo_like(640, 480, 1),
        "photo-like 1920x1080 (down)": photo_like(1920, 1080, 2),
        "photo-like 200x150 (up)": photo_like(200, 150, 3),
        "photo-like 384x384 (same)": photo_like(384, 384, 4),
    }
    print(f"{'image':30s} {'max |diff|':>11s} {'values off by 1/255':>20s} {'float rounding only':>20s}")
    for name, img in cases.items():
        a, b = (p(img, return_tensors="pt")["pixel_values"] for p in (tv, pil))
        d = (a - b).abs()
        level = (d > 1e-3).float().mean().item()
        rounding = ((d > 0) & (d <= 1e-3)).float().mean().item()
        print(f"{name:30s} {d.max().item():11.4f} {level:20.3%} {rounding:20.1%}")


if __name__ == "__main__":
    main()
