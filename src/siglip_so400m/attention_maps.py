"""Where the image tower looks: the MAP head's attention over the patch grid, as numbers and as PNGs.

    weights = siglip_so400m.attention_map(model, processor.images(["cat.jpg"]))  # (B, heads, h, w)
    siglip-so400m attention-map cat.jpg dog.png --output maps/ [--per-head]

SigLIP pools an image with one learned probe that attends over all patch tokens (the MAP head), so
its attention weights say which patches the pooled embedding is made of. The PNGs need Pillow only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .image import NaFlexImageProcessor, NaFlexPixels
from .model import SigLIP
from .modelspec import add_model_arguments

# Anchors of a perceptually ordered dark-to-bright scale (matplotlib's "inferno" at 0, 1/6, ..., 1),
# so that more attention reads as brighter, also in greyscale print.
_SCALE = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                   (245, 125, 21), (250, 193, 39), (252, 255, 164)], dtype=np.float64)
_BAR = 16  # colour bar width in pixels
_THUMB = 192  # longest side of a per-head tile


def attention_map(model: SigLIP, pixel_values: Tensor | NaFlexPixels) -> Tensor | list[Tensor]:
    """(B, 3, H, W) pixels -> (B, heads, h, w) float32: the MAP head's attention to each patch.
    SigLIP 2 NaFlex (NaFlexPixels in): a list of B maps, (heads, h_i, w_i) each on image i's own
    grid, the padding left out (it gets no attention).

    Each head's map sums to 1 over the h x w patches (h = floor(H / P), w = floor(W / P)); they are
    the weights transformers' pooling head returns (`nn.MultiheadAttention` with need_weights=True,
    average_attn_weights=False), laid out on the patch grid. Any image size works, as in
    encode_image. Take `.mean(1)` for the average over heads."""
    tower = model._tower("vision")
    if tower.head is None:
        raise RuntimeError("this model was loaded with vision_layers=... and has no MAP head, so it has "
                           "no attention map; load the full image tower")
    if isinstance(pixel_values, NaFlexPixels):
        with torch.no_grad():
            (tokens,) = tower.features(pixel_values, layers=(-1,), norm=True)  # (h_i * w_i, D) each
            maps = [tower.head.attention_weights(x[None])[0] for x in tokens]  # (heads, h_i * w_i)
        shapes = pixel_values.spatial_shapes.tolist()
        return [m.float().unflatten(-1, (h, w)) for m, (h, w) in zip(maps, shapes, strict=True)]
    with torch.no_grad():
        (x,) = tower.features(pixel_values, layers=(-1,), norm=True)  # (B, N, D), what the head pools
        weights = tower.head.attention_weights(x)  # (B, heads, N)
    P = tower.config.patch_size
    return weights.float().unflatten(-1, (pixel_values.shape[2] // P, pixel_values.shape[3] // P))


def grid_cover(image_proc, patch_size: int) -> tuple[float, float]:
    """The share of an image's width and height that the patch grid covers, for overlay(): the last
    pixels of a fixed-size input that fill no whole patch are not seen by the model."""
    if isinstance(image_proc, NaFlexImageProcessor):
        return (1.0, 1.0)  # NaFlex resizes each image to whole patches: the grid covers it all
    P = patch_size
    return ((image_proc.width // P) * P / image_proc.width, (image_proc.height // P) * P / image_proc.height)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape -> uint8 RGB of the same shape plus a last axis of 3."""
    t = np.clip(values, 0.0, 1.0) * (len(_SCALE) - 1)
    i = np.minimum(t.astype(int), len(_SCALE) - 2)
    f = (t - i)[..., None]
    return np.round(_SCALE[i] * (1 - f) + _SCALE[i + 1] * f).astype(np.uint8)


def overlay(image: Image.Image, weights: np.ndarray, cover: tuple[float, float], alpha: float = 0.6,
            bar: bool = True) -> Image.Image:
    """The (h, w) map, stretched from its minimum (dark) to its maximum (bright), smoothly resized over
    the part of `image` the patch grid covers (`cover` = the grid's share of the width and height: the
    last pixels that fill no whole patch are not seen by the model), blended in, with a colour bar
    labelled with the smallest and largest weight."""
    image = image.convert("RGB")
    W, H = image.size
    cw, ch = max(1, round(W * cover[0])), max(1, round(H * cover[1]))
    vmin, vmax = float(weights.min()), float(weights.max())
    scaled = (weights - vmin) / max(vmax - vmin, 1e-12)
    heat = Image.fromarray(scaled.astype(np.float32), mode="F").resize((cw, ch), Image.BICUBIC)
    heat = Image.fromarray(colorize(np.asarray(heat)))
    out = image.copy()
    out.paste(Image.blend(image.crop((0, 0, cw, ch)), heat, alpha), (0, 0))
    if not bar:
        return out
    # A colour bar on the right: the top is the largest weight, the bottom the smallest.
    canvas = Image.new("RGB", (W + _BAR + 64, max(H, 48)), (255, 255, 255))
    canvas.paste(out, (0, 0))
    ramp = colorize(np.linspace(1, 0, H)[:, None].repeat(_BAR, 1))
    canvas.paste(Image.fromarray(ramp), (W + 4, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((W + _BAR + 8, 0), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((W + _BAR + 8, H - 12), f"{vmin:.3g}", fill=(0, 0, 0))
    return canvas


def head_grid(image: Image.Image, weights: np.ndarray, cover: tuple[float, float]) -> Image.Image:
    """(heads, h, w) -> one picture: a tile per head, each stretched over its own range, in rows of
    ceil(sqrt(heads)), labelled with the head's index."""
    heads = weights.shape[0]
    cols = int(np.ceil(np.sqrt(heads)))
    rows = int(np.ceil(heads / cols))
    thumb = image.convert("RGB")
    thumb.thumbnail((_THUMB, _THUMB))
    tw, th = thumb.size
    grid = Image.new("RGB", (cols * tw, rows * (th + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k in range(heads):
        r, c = divmod(k, cols)
        grid.paste(overlay(thumb, weights[k], cover, bar=False), (c * tw, r * (th + 14) + 14))
        draw.text((c * tw + 2, r * (th + 14) + 1), f"head {k}", fill=(0, 0, 0))
    return grid


def attention_map_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description="Write, per IMAGE, a PNG of where SigLIP's "
                                "pooling head looks: its attention over the patches, mean over heads.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    p.add_argument("--output", "-o", required=True, type=Path, help="folder for the PNGs (made if missing)")
    p.add_argument("--per-head", action="store_true", help="also a grid with every head's map")
    add_model_arguments(p.add_argument_group("model"), dtypes=("float32", "bfloat16"))
    args = p.parse_args(argv)

    from .errors import SiglipError, UsageError
    from .image import ImageReadError, expand_images, load_image, to_rgb
    from .modelspec import ModelSpec

    try:
        model, processor = ModelSpec.from_args(args).resolve().open(towers=("vision",))
    except UsageError as e:
        p.error(str(e))
    except SiglipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    image_proc = processor.image
    device = model.vision_model.post_layernorm.weight.device
    cover = grid_cover(image_proc, model.vision_model.config.patch_size)
    args.output.mkdir(parents=True, exist_ok=True)
    failed, used = 0, set()
    for path, error in expand_images(args.images):
        try:
            if error is not None:
                raise ImageReadError(f"{path}: {error}")
            original = to_rgb(load_image(path))  # the overlay goes on the image as it is
            pixels = image_proc.collate([image_proc.to_tensor(image_proc.prepare(original))]).to(device)
        except ImageReadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        weights = attention_map(model, pixels)[0].cpu().numpy()  # (heads, h, w), NaFlex too
        stem = Path(path).stem
        name = stem if stem not in used else f"{stem}_{len(used)}"
        used.add(name)
        overlay(original, weights.mean(0), cover).save(args.output / f"{name}.attention.png")
        if args.per_head:
            head_grid(original, weights, cover).save(args.output / f"{name}.heads.png")
        print(args.output / f"{name}.attention.png")
    return 1 if failed else 0
