"""PIL-drawn coloured shapes captioned "a red circle" and so on (9 classes), shared by the tests that
fine-tune on them (test_train) and that search with the tuned model (test_search)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}
SHAPES = ["circle", "square", "triangle"]
CAPTIONS = [f"a {c} {s}" for c in COLORS for s in SHAPES]  # 9 classes: chance is 1/9


def draw_shapes(folder: Path, n: int, seed: int) -> list[dict]:
    """PIL-drawn coloured shapes on a grey background, captioned "a red circle" and so on."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        img = Image.new("RGB", (64, 64), (235, 235, 235))
        d = ImageDraw.Draw(img)
        x, y, r = rng.randint(18, 46), rng.randint(18, 46), rng.randint(10, 16)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
        img.save(folder / f"{seed}_{i}.png")
        rows.append({"image": f"{seed}_{i}.png", "caption": f"a {color} {shape}"})
    return rows


def write_csv(path: Path, rows: list[dict], fields=("image", "caption")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(fields))
        w.writeheader()
        w.writerows(rows)
    return path
