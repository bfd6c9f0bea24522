"""End-to-end zero-shot timing, from process start to exit: our CLI against transformers' pipeline.

    python -m siglip_so400m.testing /tmp/so400m          # a full-size random checkpoint (3.5 GB)
    python scripts/benchmark_zero_shot.py --model /tmp/so400m [--json out.json]

Every run is a fresh process on the same checkpoint, 8 images and 5 labels. The pipeline runs at
its defaults (float32; it re-runs the text tower for every image). Ours runs at its defaults (bf16
where the CPU computes it natively), with --dtype float32 and int8, and a second time with a warm
label cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["2 cats", "a plane", "a remote", "an astronaut", "a cup of coffee"]
PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "logo.png",
          "motorcycle_left.png", "hubble_deep_field.jpg"]
CLI = Path(__file__).parent / "zero_shot.py"
PIPELINE = """
import json, sys
from transformers import pipeline
model, labels, images = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
pipe = pipeline("zero-shot-image-classification", model=model, device="cpu")
out = [pipe(image, candidate_labels=labels) for image in images]
print(json.dumps([[{"label": p["label"], "score": p["score"]} for p in preds] for preds in out]))
"""


def images(folder: Path) -> list[str]:
    """scikit-image's photographs when installed (the test extra has it), else PIL-drawn ones."""
    spec = importlib.util.find_spec("skimage")
    if spec:
        data = Path(spec.submodule_search_locations[0]) / "data"
        return [str(data / name) for name in PHOTOS]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        w, h = 300 + 97 * i, 500 - 31 * i
        path = folder / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def timed(cmd: list[str], env: dict[str, str], repeats: int) -> tuple[float, str]:
    """Median wall time of `repeats` fresh processes, and the last one's output."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if r.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return statistics.median(times), r.stdout


def top1(preds: list[list[dict]]) -> list[str]:
    return [p[0]["label"] for p in preds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder in the Hub layout (full size)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each, the median reported")
    args = ap.parse_args()
    n = args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        imgs = images(Path(tmp))
        env = {**os.environ, "SIGLIP_SO400M_CACHE": str(Path(tmp) / "cache")}
        ours = [sys.executable, str(CLI), *imgs, "--labels", *LABELS, "--model", args.model, "--json"]
        runs = {}
        runs["transformers pipeline (defaults)"] = timed(
            [sys.executable, "-c", PIPELINE, args.model, json.dumps(LABELS), *imgs], env, n)
        runs["ours (defaults)"] = timed([*ours, "--no-cache"], env, n)
        runs["ours --dtype float32"] = timed([*ours, "--no-cache", "--dtype", "float32"], env, n)
        runs["ours --dtype int8"] = timed([*ours, "--no-cache", "--dtype", "int8"], env, n)
        timed(ours, env, 1)  # fills the label cache
        runs["ours (defaults), label cache warm"] = timed(ours, env, n)

    base = runs["transformers pipeline (defaults)"][0]
    ref_top1 = top1(json.loads(runs["transformers pipeline (defaults)"][1]))
    ours_dtype = json.loads(runs["ours (defaults)"][1])[0]["dtype"]
    rows = []
    for name, (seconds, out) in runs.items():
        preds = json.loads(out)
        preds = [r["predictions"] for r in preds] if preds and isinstance(preds[0], dict) else preds
        agree = sum(a == b for a, b in zip(top1(preds), ref_top1, strict=True))
        rows.append({"run": name, "seconds": round(seconds, 2),
                     "speedup_vs_pipeline": round(base / seconds, 2),
                     "top1_same_as_pipeline": f"{agree}/{len(ref_top1)}"})
    cpu = platform.processor() or platform.machine()
    print(f"{len(imgs)} images x {len(LABELS)} labels, full-size so400m, {cpu}, {os.cpu_count()} CPUs; "
          f"our default dtype here: {ours_dtype}")
    print(f"{'run':<38}{'seconds':>9}{'speed-up':>10}{'top-1 = pipeline':>18}")
    for r in rows:
        print(f"{r['run']:<38}{r['seconds']:>9.2f}{r['speedup_vs_pipeline']:>9.2f}x{r['top1_same_as_pipeline']:>18}")
    result = {"images": len(imgs), "labels": LABELS, "our_default_dtype": ours_dtype, "runs": rows}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
