"""Speed, accuracy and memory of our SigLIP against its peers, in one run on one machine.

    python -m siglip_so400m.testing /tmp/so400m              # full-size random weights (3.5 GB)
    python scripts/benchmark.py --model /tmp/so400m [--json out.json] [--repeats 3]

Speed: steady-state seconds (median of --repeats after one warm-up) of the image tower at batch 1
and 8 and the text tower at 32 texts, ours in fp32, bf16 and int8 against transformers' SiglipModel
(sdpa, and eager in fp32) and timm / open_clip when they are installed, all on the same weights and
inputs, alternating between implementations so that drift in the machine's speed hits all alike.
Achieved GFLOP/s are model FLOPs over time, compared with a GEMM of the model's own shape measured
in the same run. Accuracy: cosine similarity of bf16 and int8 embeddings to fp32, and whether int8
keeps fp32's zero-shot ranking on test photos. Memory and load time: one fresh process per case.
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import siglip_so400m

LABELS = ["2 cats", "a plane", "a remote", "an astronaut", "a cup of coffee", "a rocket", "a motorcycle"]
PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "motorcycle_left.png"]


def flops_image(cfg, batch: int) -> float:
    """Multiply-adds x 2 of the image tower: linear layers, attention, MAP head."""
    v = cfg.vision_config
    N, D, M, L = v.num_patches, v.hidden_size, v.intermediate_size, v.num_hidden_layers
    per_layer = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D
    head = 2 * N * 2 * D * D + 2 * (D * D + 2 * D * M) + 4 * N * D
    return batch * (L * per_layer + head + 2 * N * 3 * v.patch_size**2 * D)


def flops_text(cfg, batch: int) -> float:
    t = cfg.text_config
    N, D, M, L = t.max_position_embeddings, t.hidden_size, t.intermediate_size, t.num_hidden_layers
    per_layer = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D
    last = 2 * N * 2 * D * D + 2 * (2 * D * D + 2 * D * M) + 4 * N * D  # last token only
    return batch * ((L - 1) * per_layer + last + 2 * D * D)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch of mmap'd weights, allocator, oneDNN primitive caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_peaks(repeats: int) -> dict[str, float]:
    """GFLOP/s of one so400m MLP GEMM (729 x 1152 @ 1152 x 4304), the best kernel for each dtype."""
    from siglip_so400m.kernels import linear

    out = {}
    x32 = torch.randn(729, 1152)
    flops = 2 * 729 * 1152 * 4304
    with torch.inference_mode():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            layer = torch.nn.Linear(1152, 4304).to(dtype)
            x = x32.to(dtype)
            best = min(timed(lambda: F.linear(x, layer.weight, layer.bias), repeats),  # noqa: B023
                       timed(lambda: linear(x, layer), repeats))  # noqa: B023
            out[name] = flops / best / 1e9
        a = torch.randint(-127, 127, (729, 1152), dtype=torch.int8)
        b = torch.randint(-127, 127, (1152, 4304), dtype=torch.int8)
        out["int8"] = flops / timed(lambda: torch._int_mm(a, b), repeats) / 1e9
    return out


def photos() -> list:
    spec = importlib.util.find_spec("skimage")
    if spec:
        data = Path(spec.submodule_search_locations[0]) / "data"
        return [data / p for p in PHOTOS]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (300 + 50 * i, 400, 3), dtype=np.uint8)) for i in range(6)]


def peers(model_dir: str) -> dict[str, dict]:
    """Other implementations on the same weights: name -> {dtype: (image_fn, text_fn or None)}."""
    from transformers import SiglipModel

    out: dict[str, dict] = {}
    per_dtype = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = SiglipModel.from_pretrained(model_dir, dtype=dtype).eval()  # sdpa, its default
        per_dtype[name] = (lambda px, m=m, d=dtype: m.get_image_features(pixel_values=px.to(d)),
                           lambda ids, m=m: m.get_text_features(input_ids=ids))
    out["transformers (sdpa)"] = per_dtype
    eager = SiglipModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    out["transformers (eager)"] = {"fp32": (lambda px: eager.get_image_features(pixel_values=px), None)}
    if importlib.util.find_spec("timm"):
        import timm

        per_dtype = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            m = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False).to(dtype).eval()
            per_dtype[name] = (lambda px, m=m, d=dtype: m(px.to(d)), None)
        out["timm (own random weights)"] = per_dtype
    if importlib.util.find_spec("open_clip"):
        import open_clip

        m = open_clip.create_model("ViT-SO400M-14-SigLIP-384").eval()
        out["open_clip (own random weights)"] = {"fp32": (lambda px, m=m: m.encode_image(px), None)}
    return out


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
MODEL, CASE = sys.argv[1], sys.argv[2]
if CASE.startswith("ours"):
    import siglip_so400m
    precision = CASE.split()[1].strip(",")
    kw = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantize": "int8"}}[precision]
    if "image tower only" in CASE:
        kw["towers"] = ("vision",)
    t1 = time.perf_counter()
    m, p = siglip_so400m.load(MODEL, **kw)
    t2 = time.perf_counter()
    with torch.inference_mode():
        m.encode_image(torch.zeros(1, 3, 384, 384))
else:
    from transformers import SiglipModel
    dtype = torch.bfloat16 if "bf16" in CASE else torch.float32
    t1 = time.perf_counter()
    m = SiglipModel.from_pretrained(MODEL, dtype=dtype)
    t2 = time.perf_counter()
    with torch.inference_mode():
        m.get_image_features(pixel_values=torch.zeros(1, 3, 384, 384, dtype=dtype))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"load_s": t2 - t1, "peak_rss_gib": rss}))
"""

MEMORY_CASES = ["ours fp32", "ours bf16", "ours bf16, image tower only", "ours int8",
                "transformers fp32", "transformers bf16"]


def memory(model_dir: str) -> list[dict]:
    rows = []
    for case in MEMORY_CASES:
        r = subprocess.run([sys.executable, "-c", CHILD, model_dir, case], capture_output=True, text=True,
                           check=True)
        rows.append({"case": case, **json.loads(r.stdout.splitlines()[-1])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="full-size checkpoint folder (Hub layout)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                     "cpu": _cpu_name()}
    mem = [] if args.skip_memory else memory(args.model)  # before anything else fills the page cache

    results["gemm_gflops"] = peaks = gemm_peaks(args.repeats)
    ours = {"fp32": siglip_so400m.load(args.model)[0],
            "bf16": siglip_so400m.load(args.model, dtype=torch.bfloat16)[0],
            "int8": siglip_so400m.load(args.model, quantize="int8")[0]}
    cfg = ours["fp32"].config
    others = peers(args.model)
    px1, px8 = torch.randn(1, 3, 384, 384), torch.randn(8, 3, 384, 384)
    ids = torch.randint(0, cfg.text_config.vocab_size, (32, 64))
    # (case, input, 0 image / 1 text, FLOPs, repeats): batch 8 is long enough to time once.
    cases = [("image, batch 1", px1, 0, flops_image(cfg, 1), args.repeats),
             ("image, batch 8", px8, 0, flops_image(cfg, 8), 1),
             ("text, 32 texts", ids, 1, flops_text(cfg, 32), args.repeats)]
    rows = []
    with torch.inference_mode():
        for case, x, which, flops, repeats in cases:
            for dtype in ("fp32", "bf16", "int8"):
                fns = {"ours": ours[dtype].encode_image if which == 0 else ours[dtype].encode_text}
                for name, per in others.items():
                    if dtype in per and per[dtype][which] is not None and (name != "transformers (eager)"
                                                                           or case == "image, batch 1"):
                        fns[name] = per[dtype][which]
                times = {name: [] for name in fns}
                for fn in fns.values():
                    fn(x[:1])  # warm-up: first touch of mmap'd weights, oneDNN primitive caches
                for _ in range(repeats):  # alternate, so that drift hits every implementation
                    for name, fn in fns.items():
                        t = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - t)
                for name in fns:
                    s = statistics.median(times[name])
                    rows.append({"case": case, "dtype": dtype, "impl": name, "seconds": round(s, 3),
                                 "items_per_s": round(x.shape[0] / s, 2), "gflops": round(flops / s / 1e9),
                                 "of_gemm_peak": round(flops / s / 1e9 / peaks[dtype], 2)})
                print_rows([r for r in rows if r["case"] == case and r["dtype"] == dtype], rows)
    results["speed"] = rows

    # Accuracy of the fast paths against fp32, on the same inputs.
    with torch.inference_mode():
        ref_img = ours["fp32"].encode_image(px8, normalize=True)
        ref_txt = ours["fp32"].encode_text(ids, normalize=True)
        acc = {}
        for dtype in ("bf16", "int8"):
            img = ours[dtype].encode_image(px8, normalize=True).float()
            txt = ours[dtype].encode_text(ids, normalize=True).float()
            acc[dtype] = {"image_cos_min": F.cosine_similarity(img, ref_img).min().item(),
                          "text_cos_min": F.cosine_similarity(txt, ref_txt).min().item()}
        acc["int8"]["zero_shot"] = zero_shot_agreement(args.model, ours)
    results["accuracy"] = acc
    results["memory"] = mem
    print(json.dumps(results, indent=1))
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def zero_shot_agreement(model_dir: str, ours: dict) -> dict:
    """Do fp32 and int8 rank the labels the same way on the photos?"""
    _, proc = siglip_so400m.load(model_dir, towers=("vision",))
    imgs = photos()
    out = {}
    ranks, logits = {}, {}
    for dtype in ("fp32", "int8"):
        res = siglip_so400m.zero_shot(ours[dtype], proc, imgs, LABELS)
        ranks[dtype] = [[r["label"] for r in per_image] for per_image in res]
        logits[dtype] = [{r["label"]: r["logit"] for r in per_image} for per_image in res]
    out["photos"] = len(imgs)
    # With random weights the labels' logits lie close together; compare the gaps with the error.
    gaps = [sorted(d.values())[-1] - sorted(d.values())[-2] for d in logits["fp32"]]
    out["fp32_top1_top2_gap_median"] = statistics.median(gaps)
    out["int8_logit_error_max"] = max(abs(a[k] - b[k]) for a, b in zip(logits["fp32"], logits["int8"],
                                                                       strict=True) for k in a)
    out["same_top1"] = sum(a[0] == b[0] for a, b in zip(ranks["fp32"], ranks["int8"], strict=True))
    out["same_full_ranking"] = sum(a == b for a, b in zip(ranks["fp32"], ranks["int8"], strict=True))
    return out


def print_rows(new: list[dict], rows: list[dict]) -> None:
    for r in new:
        base = next((x for x in rows if x["case"] == r["case"] and x["impl"] == "transformers (sdpa)"
                     and x["dtype"] == ("bf16" if r["dtype"] == "int8" else r["dtype"])), None)
        ratio = f"{base['seconds'] / r['seconds']:.2f}x vs transformers {base['dtype']}" if base else ""
        print(f"{r['case']:<16}{r['dtype']:<6}{r['impl']:<32}{r['seconds']:>8.3f} s "
              f"{r['items_per_s']:>7.2f}/s {r['gflops']:>5} GFLOP/s ({r['of_gemm_peak']:.0%} of GEMM) "
              f"{ratio}", flush=True)


def print_summary(results: dict) -> None:
    print(f"\n{results['cpu']}; {results['machine']}")
    gemm = results["gemm_gflops"]
    print("GEMM 729x1152x4304: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()))
    for r in results["memory"]:
        print(f"{r['case']:<34} load {r['load_s']:5.2f} s, peak RSS with one image encoded "
              f"{r['peak_rss_gib']:.2f} GiB")
    for k, v in results["accuracy"].items():
        print(f"{k}: {v}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
