"""Speed, accuracy and memory of our SigLIP against its peers, each as a fraction of this machine's limit.

    python -m siglip_so400m.testing /tmp/so400m              # full-size random weights (3.5 GB)
    python scripts/benchmark.py --model /tmp/so400m --peer-python /work/peers/bin/python \\
        [--json out.json] [--repeats 3]

Speed: steady-state seconds (median of --repeats after a warm-up) of the image tower at batch 1 and 8
and the text tower at 32 texts, for ours (fp32, bf16, int8), transformers' SiglipModel (sdpa, and
eager in fp32), timm (`vit_so400m_patch14_siglip_384`) and open_clip (`ViT-SO400M-14-SigLIP-384`),
all on the same weights (ours are converted to timm's and open_clip's names) and the same inputs.

timm and open_clip need torchvision, which may not import beside this interpreter's torch; they run
in a child process of the interpreter given by --peer-python (default: this one), which reads the
same weights and inputs and measures its own matrix-product rate, since its torch build may differ.
A peer that cannot be imported there is reported as skipped, with the reason.

The limit: the rate of a matrix product at the model's own shapes, measured in the same run by the
same torch build (fp32 and bf16: the faster of F.linear and oneDNN's matmul; int8: torch._int_mm,
int8 x int8 -> int32), at 729x1152x4304 (an MLP layer of the image tower, the issue's reference) and
at the other linear shapes of both towers. Every time is also printed as model FLOPs per second over
that rate. Then every target of issue 13, with its value, and whether it is met.

Accuracy: cosine similarity of bf16 and int8 embeddings (and of timm's / open_clip's, a check of the
weight conversion) to ours in fp32; whether int8 keeps fp32's zero-shot ranking on test photos.
Memory and load time: one fresh process per case.
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

import torch
import torch.nn.functional as F

LABELS = ["2 cats", "a plane", "a remote", "an astronaut", "a cup of coffee", "a rocket", "a motorcycle"]
PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "motorcycle_left.png"]
TEXTS = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Shared by this process and the peer child process (which may run another torch and must not import
# siglip_so400m): plain functions of torch and a dict of model dimensions.


def dims_of(cfg) -> dict:
    v, t = cfg.vision_config, cfg.text_config
    return {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_patches": v.num_positions,
        "D": v.hidden_size,
        "F": v.intermediate_size,
        "layers": v.num_hidden_layers,
        "heads": v.num_attention_heads,
        "text_D": t.hidden_size,
        "text_F": t.intermediate_size,
        "text_layers": t.num_hidden_layers,
        "text_heads": t.num_attention_heads,
        "text_len": t.max_position_embeddings,
        "vocab": t.vocab_size,
        "proj": t.projection_size,
    }


def flops_image(d: dict, batch: int) -> float:
    """Multiply-adds x 2 of the image tower: linear layers, attention, MAP head, patch conv."""
    N, D, M, L = d["num_patches"], d["D"], d["F"], d["layers"]
    per_layer = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D
    head = 2 * N * 2 * D * D + 2 * (D * D + 2 * D * M) + 4 * N * D
    return batch * (L * per_layer + head + 2 * N * 3 * d["patch_size"] ** 2 * D)


def flops_text(d: dict, batch: int) -> float:
    """The work our text tower does: every position in every layer but the last, where only the
    pooled (last) position is computed. Peers compute all positions there (3% more work); the same
    count is used for all, as in issue 13's baseline figures, so times compare directly."""
    N, D, M, L = d["text_len"], d["text_D"], d["text_F"], d["text_layers"]
    per_layer = 2 * N * (4 * D * D + 2 * D * M) + 4 * N * N * D
    last = 2 * N * 2 * D * D + 2 * (2 * D * D + 2 * D * M) + 4 * N * D  # last token only
    return batch * ((L - 1) * per_layer + last + 2 * D * d["proj"])


def gemm_shapes(d: dict) -> list[tuple[int, int, int]]:
    """(M, K, N) of every linear layer of both towers: attention projections and the two MLP layers."""
    out = []
    for M, D, F_ in ((d["num_patches"], d["D"], d["F"]), (TEXTS * d["text_len"], d["text_D"], d["text_F"])):
        out += [(M, D, F_), (M, F_, D), (M, D, D)]
    return out


def min_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rates(d: dict, repeats: int, only: str | None = None) -> dict[str, dict[str, float]]:
    """GFLOP/s (GOP/s for int8) per dtype and 'MxKxN' shape (only: that one shape); the best of
    several runs, since the limit is what the hardware can do. fp32/bf16: the faster of MKL
    (F.linear) and oneDNN's matmul (bf16 only where oneDNN has it: not on AVX2-only CPUs, where
    bf16 is emulated); int8: torch._int_mm on a (K, N) row-major second operand, its fast layout."""
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    rates: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}, "int8": {}}
    qlinear = onednn and hasattr(torch.ops.onednn, "qlinear_pointwise")
    with torch.inference_mode():
        for M, K, N in gemm_shapes(d):
            key, flops = f"{M}x{K}x{N}", 2 * M * K * N
            if only is not None and key != only:
                continue
            for name, dtype in DTYPES.items():
                x, w, b = (
                    torch.randn(M, K, dtype=dtype),
                    torch.randn(N, K, dtype=dtype),
                    torch.randn(N, dtype=dtype),
                )
                t = min_time(lambda: F.linear(x, w, b), repeats)  # noqa: B023
                if onednn and (dtype != torch.bfloat16 or onednn_bf16):
                    t = min(
                        t,
                        min_time(
                            lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""),  # noqa: B023
                            repeats,
                        ),
                    )
                rates[name][key] = flops / t / 1e9
            a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
            b8 = torch.randint(-127, 128, (K, N), dtype=torch.int8)
            rates["int8"][key] = flops / min_time(lambda: torch._int_mm(a, b8), repeats) / 1e9  # noqa: B023
            if qlinear:  # for information: the oneDNN int8 kernel our int8 mode uses, bf16 out
                w = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), None)
                scale, zero = torch.rand(N), torch.zeros(N, dtype=torch.long)
                args = (a, 0.1, 0, w, scale, zero, None, 1.0, 0, torch.bfloat16, "none", [], "")
                t = min_time(lambda args=args: torch.ops.onednn.qlinear_pointwise(*args), repeats)
                rates.setdefault("int8 oneDNN (info)", {})[key] = flops / t / 1e9
    return rates


def alternate(fns: dict, x, repeats: int) -> dict[str, dict[str, float]]:
    """Median and best seconds of each fn(x), alternating between them so that drift in the machine's
    speed hits all alike; one warm-up each (first touch of mmap'd weights, oneDNN primitive caches)."""
    for fn in fns.values():
        fn(x[:1])
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t)
    return {n: {"seconds": statistics.median(ts), "best": min(ts)} for n, ts in times.items()}


def peer_state_dicts(sd: dict, d: dict) -> tuple[dict, dict]:
    """Our (Hugging Face) state dict -> timm's VisionTransformer and open_clip's CustomTextCLIP (an
    empty dict for a state dict of the image tower alone)."""
    D = d["D"]
    has_text = "text_model.head.weight" in sd
    timm_sd = {
        "patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": sd["vision_model.embeddings.patch_embedding.bias"],
        "pos_embed": sd["vision_model.embeddings.position_embedding.weight"][None],
        "norm.weight": sd["vision_model.post_layernorm.weight"],
        "norm.bias": sd["vision_model.post_layernorm.bias"],
        "attn_pool.latent": sd["vision_model.head.probe"],
    }
    w_q, w_kv = sd["vision_model.head.attention.in_proj_weight"].split([D, 2 * D])
    b_q, b_kv = sd["vision_model.head.attention.in_proj_bias"].split([D, 2 * D])
    timm_sd.update(
        {
            "attn_pool.q.weight": w_q,
            "attn_pool.q.bias": b_q,
            "attn_pool.kv.weight": w_kv,
            "attn_pool.kv.bias": b_kv,
        }
    )
    for ours, theirs in (
        ("attention.out_proj", "proj"),
        ("layernorm", "norm"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
    ):
        for p in ("weight", "bias"):
            timm_sd[f"attn_pool.{theirs}.{p}"] = sd[f"vision_model.head.{ours}.{p}"]
    clip_sd = (
        {}
        if not has_text
        else {
            "logit_scale": sd["logit_scale"].reshape(()),
            "logit_bias": sd["logit_bias"].reshape(()),
            "text.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "text.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
            "text.ln_final.weight": sd["text_model.final_layer_norm.weight"],
            "text.ln_final.bias": sd["text_model.final_layer_norm.bias"],
            "text.text_projection.weight": sd["text_model.head.weight"],
            "text.text_projection.bias": sd["text_model.head.bias"],
        }
    )
    for tower, n_layers, prefix, names in (
        (
            "vision_model",
            d["layers"],
            "blocks.{}.",
            ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
        ),
        (
            "text_model",
            d["text_layers"],
            "text.transformer.resblocks.{}.",
            ("ln_1", "ln_2", "attn.in_proj_", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"),
        ),
    ):
        out = timm_sd if tower == "vision_model" else clip_sd
        for i in range(n_layers if out is timm_sd or has_text else 0):
            src, dst = f"{tower}.encoder.layers.{i}.", prefix.format(i)
            for ours, theirs in zip(
                ("layer_norm1", "layer_norm2", None, "self_attn.out_proj", "mlp.fc1", "mlp.fc2"),
                names,
                strict=True,
            ):
                for p in ("weight", "bias"):
                    key = dst + (f"{theirs}{p}" if theirs.endswith("_") else f"{theirs}.{p}")
                    if ours is None:  # q, k, v packed in one matrix
                        out[key] = torch.cat([sd[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"])
                    else:
                        out[key] = sd[f"{src}{ours}.{p}"]
    if has_text:
        clip_sd.update({f"visual.trunk.{k}": v for k, v in timm_sd.items()})
    return timm_sd, clip_sd


def is_so400m(d: dict) -> bool:
    """The so400m image tower's shape (the text tower is checked by open_clip's strict load)."""
    return (d["image_size"], d["patch_size"], d["D"], d["F"], d["layers"]) == (384, 14, 1152, 4304, 27)


def build_timm(d: dict):
    """timm's so400m by name; for another shape (a tiny checkpoint) the same class with its sizes."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if is_so400m(d):
        return timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0)
    return VisionTransformer(
        img_size=d["image_size"],
        patch_size=d["patch_size"],
        embed_dim=d["D"],
        depth=d["layers"],
        num_heads=d["heads"],
        mlp_ratio=d["F"] / d["D"],
        class_token=False,
        global_pool="map",
        num_classes=0,
    )


def build_open_clip(d: dict):
    """open_clip's ViT-SO400M-14-SigLIP-384 by name; for another shape its CustomTextCLIP with that
    shape's text tower and a timm trunk of that shape (open_clip's image tower is timm's model)."""
    import open_clip

    if is_so400m(d):
        return open_clip.create_model("ViT-SO400M-14-SigLIP-384", pretrained=None)
    from open_clip.model import CustomTextCLIP

    m = CustomTextCLIP(
        embed_dim=d["proj"],
        vision_cfg={
            "image_size": d["image_size"],
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        text_cfg={
            "context_length": d["text_len"],
            "vocab_size": d["vocab"],
            "width": d["text_D"],
            "heads": d["text_heads"],
            "layers": d["text_layers"],
            "mlp_ratio": d["text_F"] / d["text_D"],
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
        init_logit_bias=-10,
    )
    m.visual.trunk = build_timm(d)
    return m


def peer_worker(args) -> None:
    """In the --peer-python interpreter: time timm and open_clip, write rows and rates as JSON."""
    spec = json.loads(Path(args.worker).read_text())
    d, repeats = spec["dims"], spec["repeats"]
    out: dict = {
        "torch": torch.__version__,
        "python": sys.executable,
        "skipped": {},
        "rows": [],
        "embeddings": {},
    }
    builders = {}
    for name, module, build in (("timm", "timm", build_timm), ("open_clip", "open_clip", build_open_clip)):
        try:
            mod = importlib.import_module(module)
            builders[name] = (build, mod.__version__)
        except Exception as e:
            out["skipped"][name] = f"cannot import {module} in {sys.executable}: {type(e).__name__}: {e}"
    out["versions"] = {n: v for n, (_, v) in builders.items()}
    if builders:
        out["gemm"] = gemm_rates(d, repeats)
        inputs = torch.load(spec["inputs"], weights_only=True)
        from safetensors.torch import load_file

        timm_sd, clip_sd = peer_state_dicts(load_file(spec["weights"]), d)
        torch.manual_seed(0)
        for dname, dtype in DTYPES.items():
            models = {}
            for name, (build, _) in builders.items():
                m = build(d)
                try:
                    m.load_state_dict(timm_sd if name == "timm" else clip_sd, strict=True)
                    weights = "same weights as ours"
                except RuntimeError as e:
                    weights = f"own random weights (conversion failed: {str(e)[:200]})"
                models[name] = (m.to(dtype).eval(), weights)
            fns_img = {}
            for name, (m, _) in models.items():
                fns_img[name] = (
                    (lambda x, m=m, t=dtype: m(x.to(t)))
                    if name == "timm"
                    else (lambda x, m=m, t=dtype: m.encode_image(x.to(t)))
                )
            with torch.inference_mode():
                if dname == "fp32":
                    for name, fn in fns_img.items():
                        out["embeddings"][name] = {"image": fn(inputs["px1"]).float().tolist()}
                    if "open_clip" in models:
                        out["embeddings"]["open_clip"]["text"] = (
                            models["open_clip"][0].encode_text(inputs["ids"]).float().tolist()
                        )
                for case, x, reps in (
                    ("image, batch 1", inputs["px1"], repeats),
                    ("image, batch 8", inputs["px8"], 1),
                ):
                    for name, r in alternate(fns_img, x, reps).items():
                        out["rows"].append(
                            {"case": case, "dtype": dname, "impl": name, **r, "weights": models[name][1]}
                        )
                if "open_clip" in models:
                    m = models["open_clip"][0]
                    r = alternate({"open_clip": lambda ids, m=m: m.encode_text(ids)}, inputs["ids"], repeats)
                    out["rows"].append(
                        {
                            "case": f"text, {TEXTS} texts",
                            "dtype": dname,
                            "impl": "open_clip",
                            **r["open_clip"],
                            "weights": models["open_clip"][1],
                        }
                    )
            del models, fns_img
    Path(args.worker_out).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------
# The main process.


def run_peers(peer_python: str, model_dir: str, d: dict, inputs_path: Path, repeats: int) -> dict:
    """Run peer_worker in `peer_python`; its rows, GEMM rates, torch version, and skips."""
    weights = Path(model_dir) / "model.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(
            json.dumps({"dims": d, "repeats": repeats, "inputs": str(inputs_path), "weights": str(weights)})
        )
        env = {**os.environ, "PYTHONPATH": ""}  # the peer interpreter keeps its own packages
        r = subprocess.run(
            [peer_python, __file__, "--worker", str(spec), "--worker-out", str(out)],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0 or not out.exists():
            reason = f"{peer_python} failed (exit {r.returncode}): {r.stderr.strip()[-600:]}"
            return {"skipped": {"timm": reason, "open_clip": reason}, "rows": [], "embeddings": {}}
        return json.loads(out.read_text())


def transformers_peers(model_dir: str) -> dict[str, dict]:
    """name -> {dtype: (image_fn, text_fn or None)} on the same weights, in this process."""
    from transformers import SiglipModel

    out: dict[str, dict] = {"transformers (sdpa)": {}}
    for name, dtype in DTYPES.items():
        m = SiglipModel.from_pretrained(model_dir, dtype=dtype).eval()  # sdpa, its default
        out["transformers (sdpa)"][name] = (
            lambda px, m=m, d=dtype: m.get_image_features(pixel_values=px.to(d)),
            lambda ids, m=m: m.get_text_features(input_ids=ids),
        )
    eager = SiglipModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    out["transformers (eager)"] = {"fp32": (lambda px: eager.get_image_features(pixel_values=px), None)}
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

MEMORY_CASES = [
    "ours fp32",
    "ours bf16",
    "ours bf16, image tower only",
    "ours int8",
    "transformers fp32",
    "transformers bf16",
]


def memory(model_dir: str, size: int) -> list[dict]:
    rows = []
    for case in MEMORY_CASES:
        child = CHILD.replace("384, 384", f"{size}, {size}")
        r = subprocess.run(
            [sys.executable, "-c", child, model_dir, case], capture_output=True, text=True, check=True
        )
        rows.append({"case": case, **json.loads(r.stdout.splitlines()[-1])})
    return rows


def first_call_int8(model_dir: str, px) -> dict:
    """What the int8 mode costs before its first answer: quantizing at load, then the first call."""
    import siglip_so400m

    t = time.perf_counter()
    m, _ = siglip_so400m.load(model_dir, quantize="int8", towers=("vision",))
    t_load = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        m.encode_image(px)
        t_first = time.perf_counter() - t
    return {"load_and_quantize_s": t_load, "first_call_s": t_first, "calibration": "none (dynamic)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder in the Hub layout (full size for real figures)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--peer-python",
        default=sys.executable,
        help="interpreter that can import timm and open_clip (default: this one)",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return peer_worker(args)
    if not args.model:
        ap.error("--model DIR is required")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import siglip_so400m
    from siglip_so400m.weights import resolve

    torch.manual_seed(0)
    d = dims_of(resolve(args.model).config)
    S = d["image_size"]
    results: dict = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads",
    }
    mem = [] if args.skip_memory else memory(args.model, S)  # before anything fills the page cache
    px1, px8 = torch.randn(1, 3, S, S), torch.randn(8, 3, S, S)
    ids = torch.randint(0, d["vocab"], (TEXTS, d["text_len"]))

    with tempfile.TemporaryDirectory() as tmp:  # peers first, so their memory is gone before ours loads
        inputs_path = Path(tmp) / "inputs.pt"
        torch.save({"px1": px1, "px8": px8, "ids": ids}, inputs_path)
        peer = run_peers(args.peer_python, args.model, d, inputs_path, args.repeats)
    results["peers_process"] = {k: peer.get(k) for k in ("torch", "python", "versions", "skipped")}
    results["gemm"] = {"this process": gemm_rates(d, max(args.repeats, 5))}
    if peer.get("gemm"):
        results["gemm"]["peer process"] = peer["gemm"]
    ref_shape = f"{d['num_patches']}x{d['D']}x{d['F']}"
    results["reference_shape"] = ref_shape

    ours = {
        "fp32": siglip_so400m.load(args.model)[0],
        "bf16": siglip_so400m.load(args.model, dtype=torch.bfloat16)[0],
        "int8": siglip_so400m.load(args.model, quantize="int8")[0],
    }
    others = transformers_peers(args.model)
    cases = [
        ("image, batch 1", px1, 0, flops_image(d, 1), args.repeats),
        ("image, batch 8", px8, 0, flops_image(d, 8), 1),
        (f"text, {TEXTS} texts", ids, 1, flops_text(d, TEXTS), args.repeats),
    ]
    flops = {c[0]: c[3] for c in cases}
    rows = []
    with torch.inference_mode():
        for case, x, which, _, repeats in cases:
            for dtype in ("fp32", "bf16", "int8"):
                fns = {"ours": ours[dtype].encode_image if which == 0 else ours[dtype].encode_text}
                for name, per in others.items():
                    if (
                        dtype in per
                        and per[dtype][which] is not None
                        and (name != "transformers (eager)" or case == "image, batch 1")
                    ):
                        fns[name] = per[dtype][which]
                for name, r in alternate(fns, x, repeats).items():
                    rows.append({"case": case, "dtype": dtype, "impl": name, **r})
    for r in peer["rows"]:
        rows.append({**r, "impl": f"{r['impl']} (torch {peer['torch']})", "process": "peer"})
    for r in rows:
        gemm = results["gemm"]["peer process" if r.get("process") == "peer" else "this process"]
        r["items_per_s"] = (
            1 if r["case"] == "image, batch 1" else 8 if "batch 8" in r["case"] else TEXTS
        ) / r["seconds"]
        r["gflops"] = flops[r["case"]] / r["seconds"] / 1e9
        r["of_gemm"] = r["gflops"] / gemm[r["dtype"]][ref_shape]
    results["speed"] = rows

    with torch.inference_mode():
        ref_img = ours["fp32"].encode_image(px8, normalize=True)
        ref_txt = ours["fp32"].encode_text(ids, normalize=True)
        acc: dict = {}
        for dtype in ("bf16", "int8"):
            img = ours[dtype].encode_image(px8, normalize=True).float()
            txt = ours[dtype].encode_text(ids, normalize=True).float()
            acc[dtype] = {
                "image_cos_min": F.cosine_similarity(img, ref_img).min().item(),
                "text_cos_min": F.cosine_similarity(txt, ref_txt).min().item(),
            }
        ref_img1 = ours["fp32"].encode_image(px1)
        for name, emb in peer["embeddings"].items():  # checks the weight conversion, fp32
            acc[name] = {"image_cos_min": cos_min(emb["image"], ref_img1)}
            if "text" in emb:
                acc[name]["text_cos_min"] = cos_min(emb["text"], ref_txt)
    acc["int8"]["zero_shot"] = zero_shot_agreement(args.model, ours)
    results["accuracy"] = acc
    results["int8_first_call"] = first_call_int8(args.model, px1)
    results["memory"] = mem
    results["targets"] = targets(results)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def cos_min(a: list, b: torch.Tensor) -> float:
    return F.cosine_similarity(torch.tensor(a), b.float()).min().item()


def zero_shot_agreement(model_dir: str, ours: dict) -> dict:
    """Do fp32 and int8 rank the labels the same way on the photos?"""
    import siglip_so400m

    _, proc = siglip_so400m.load(model_dir, towers=("vision",))
    imgs = photos()
    ranks, logits = {}, {}
    for dtype in ("fp32", "int8"):
        res = siglip_so400m.zero_shot(ours[dtype], proc, imgs, LABELS)
        ranks[dtype] = [[r["label"] for r in per_image] for per_image in res]
        logits[dtype] = [{r["label"]: r["logit"] for r in per_image} for per_image in res]
    # With random weights the labels' logits lie close together; compare the gaps with the error.
    gaps = [sorted(d.values())[-1] - sorted(d.values())[-2] for d in logits["fp32"]]
    return {
        "photos": len(imgs),
        "fp32_top1_top2_gap_median": statistics.median(gaps),
        "int8_logit_error_max": max(
            abs(a[k] - b[k]) for a, b in zip(logits["fp32"], logits["int8"], strict=True) for k in a
        ),
        "same_top1": sum(a[0] == b[0] for a, b in zip(ranks["fp32"], ranks["int8"], strict=True)),
        "same_full_ranking": sum(a == b for a, b in zip(ranks["fp32"], ranks["int8"], strict=True)),
    }


def targets(results: dict) -> list[dict]:
    """Every ratio issue 13 sets, with its target and whether it is met."""
    rows = results["speed"]

    def get(case, dtype, impl="ours"):
        return next(
            (r for r in rows if r["case"] == case and r["dtype"] == dtype and r["impl"] == impl), None
        )

    out = []

    def add(name, value, target, note=""):
        out.append(
            {
                "target": name,
                "value": value,
                "goal": target,
                "met": None if value is None else value >= target,
                "note": note,
            }
        )

    text = f"text, {TEXTS} texts"
    for dtype in ("fp32", "bf16"):
        r = get("image, batch 1", dtype)
        add(f"image batch 1 {dtype}: fraction of the {dtype} GEMM rate", r["of_gemm"], 0.90)
        peers = [
            p for p in rows if p["case"] == "image, batch 1" and p["dtype"] == dtype and p["impl"] != "ours"
        ]
        if peers:
            fastest = min(peers, key=lambda p: p["seconds"])
            add(
                f"image batch 1 {dtype}: speed-up over the fastest peer",
                fastest["seconds"] / r["seconds"],
                1.10,
                f"fastest peer: {fastest['impl']}",
            )
            fastest_frac = max(peers, key=lambda p: p["of_gemm"])
            add(
                f"image batch 1 {dtype}: our GEMM fraction over the best peer's (each vs its own torch)",
                r["of_gemm"] / fastest_frac["of_gemm"],
                1.10,
                f"best peer by fraction: {fastest_frac['impl']}",
            )
        add(
            f"text {TEXTS} texts {dtype}: fraction of the {dtype} GEMM rate",
            get(text, dtype)["of_gemm"],
            0.93,
        )
    r8 = get("image, batch 1", "int8")
    add("image batch 1 int8: fraction of the int8 GEMM rate (torch._int_mm)", r8["of_gemm"], 0.70)
    tb = get("image, batch 1", "bf16", "transformers (sdpa)")
    add(
        "image batch 1 int8: speed-up over transformers bf16 (about 2x expected)",
        tb["seconds"] / r8["seconds"],
        2.0,
        "the issue's 'roughly 2x'; informational",
    )
    acc = results["accuracy"]["int8"]
    add("int8 image embeddings: min cosine to fp32", acc["image_cos_min"], 0.99)
    add("int8 text embeddings: min cosine to fp32", acc["text_cos_min"], 0.99)
    return out


def print_report(results: dict) -> None:
    cpu = results["cpu"]
    print(
        f"\n{cpu['model']}; AMX {'yes' if cpu['amx'] else 'no'}, "
        f"AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'};"
        f" {results['machine']}; torch {results['torch']}"
    )
    for proc, rates in results["gemm"].items():
        torch_v = results["torch"] if proc == "this process" else results["peers_process"]["torch"]
        print(f"GEMM rates, {proc} (torch {torch_v}), GFLOP/s (int8: GOP/s), M x K x N:")
        for dtype, per in rates.items():
            print(f"  {dtype:<5}" + "  ".join(f"{k} {v:6.0f}" for k, v in per.items()))
    ref = results["reference_shape"]
    print(
        f"\n{'case':<16}{'dtype':<6}{'implementation':<36}{'seconds':>9}{'items/s':>9}{'GFLOP/s':>9}"
        f"  of GEMM {ref} (same torch)"
    )
    for r in results["speed"]:
        print(
            f"{r['case']:<16}{r['dtype']:<6}{r['impl']:<36}{r['seconds']:9.3f}{r['items_per_s']:9.2f}"
            f"{r['gflops']:9.0f}  {r['of_gemm']:.0%}"
        )
    for name, why in (results["peers_process"].get("skipped") or {}).items():
        print(f"skipped {name}: {why}")
    print("\nAccuracy (cosine to ours fp32):")
    for k, v in results["accuracy"].items():
        print(f"  {k}: {v}")
    print(f"int8 first call: {results['int8_first_call']}")
    for r in results["memory"]:
        print(
            f"{r['case']:<34} load {r['load_s']:5.2f} s, "
            f"peak RSS with one image encoded {r['peak_rss_gib']:.2f} GiB"
        )
    print("\nIssue 13 targets:")
    for t in results["targets"]:
        status = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(
            f"  {t['target']:<88} {t['value']:6.3f}  goal >= {t['goal']:<5} {status}"
            + (f"  ({t['note']})" if t["note"] else "")
        )


def cpu_info() -> dict:
    name, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "model": name,
        "amx": {"amx_bf16", "amx_int8"} <= flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
    }


if __name__ == "__main__":
    main()
