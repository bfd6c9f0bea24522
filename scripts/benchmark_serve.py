"""Images per second through `siglip-so400m serve` against the model alone, and latency.

    python -m siglip_so400m.testing /tmp/so400m              # full-size random weights (3.5 GB)
    python scripts/benchmark_serve.py --model /tmp/so400m [--json out.json]

Three measurements, one after the other, on the same JPEGs (mixed sizes, made here):

1. model only: `encode_image` on pixel values made in advance, in batches of --max-batch, in this
   process (the model is then freed before any server starts);
2. the server, batched: 8 concurrent clients (--clients), each posting one image per request to
   /v1/embeddings as a base64 data URI, --requests each; images/s over the wall time, as a fraction
   of the model-only rate (the target is at least 85%), and p50/p99 request latency;
3. the server unbatched (--max-batch 1): the same clients, one image per forward pass.

The server runs as `python -m siglip_so400m serve` with the same --dtype. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

import siglip_so400m
from siglip_so400m.api import pick_dtype

SIZES = [(640, 480), (480, 640), (800, 600), (512, 512), (1024, 768), (384, 384), (300, 200), (1280, 960)]


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photograph-like JPEGs (smooth colour fields plus grain) of mixed sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([128 + 100 * np.sin(x / rng.uniform(20, 200) + c * 2 + i) *
                        np.cos(y / rng.uniform(20, 200)) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def model_only(model_dir: str, dtype: str, jpegs: list[bytes], batch: int) -> dict:
    quantize = "int8" if dtype == "int8" else None
    dt = None if quantize else pick_dtype(torch.device("cpu")) if dtype == "auto" else getattr(torch, dtype)
    # The server picks its device with "auto"; on a CUDA machine pass the same here.
    model, processor = siglip_so400m.load(model_dir, dtype=dt, towers=("vision",), quantize=quantize)
    pixels = processor.images([Image.open(io.BytesIO(b)) for b in jpegs])  # (N, 3, S, S), in advance
    with torch.inference_mode():
        model.encode_image(pixels[:1])  # warm-up
        t = time.perf_counter()
        for i in range(0, len(pixels), batch):
            model.encode_image(pixels[i : i + batch])
        seconds = time.perf_counter() - t
    precision = model.precision
    del model, processor, pixels
    gc.collect()
    return {"case": f"model only, batch {batch}", "images": len(jpegs), "seconds": seconds,
            "images_per_s": len(jpegs) / seconds, "dtype": precision}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_server(model_dir: str, dtype: str, jpegs: list[bytes], clients: int, requests: int,
                   max_batch: int, max_wait_ms: float) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "siglip_so400m", "serve", "--model", model_dir, "--port", str(port),
           "--dtype", dtype, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
           "--max-queue", str(4 * clients * max(1, max_batch)), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(cmd)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        uris = [f"data:image/jpeg;base64,{base64.b64encode(b).decode()}" for b in jpegs]
        with httpx.Client(base_url=url, timeout=600) as c:  # warm-up: every batch size may be new
            c.post("/v1/embeddings", json={"input": uris[:1]}).raise_for_status()
        before = _batch_metrics(url)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                for r in range(requests):
                    uri = uris[(k * requests + r) % len(uris)]
                    t = time.perf_counter()
                    resp = c.post("/v1/embeddings", json={"input": [uri]})
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        if resp.status_code != 200:
                            errors.append(f"{resp.status_code}: {resp.text[:200]}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
        after = _batch_metrics(url)
        batches = after[1] - before[1]
        n = clients * requests
        lat = sorted(latencies)
        return {"case": f"server, --max-batch {max_batch}, {clients} clients", "images": n,
                "seconds": seconds, "images_per_s": n / seconds,
                "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                "mean_batch": (after[0] - before[0]) / batches if batches else None}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def _batch_metrics(url: str) -> tuple[float, float]:
    """(sum, count) of the image batch-size histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return (float(values['siglip_batch_size_sum{kind="image"}']),
            float(values['siglip_batch_size_count{kind="image"}']))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (full size for the real figures)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "int8"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client (one image each)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, help="torch threads here and in the server")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    n = a.clients * a.requests
    jpegs = make_jpegs(n)
    rows = [model_only(a.model, a.dtype, jpegs, a.max_batch)]
    base = rows[0]["images_per_s"]
    rows.append(through_server(a.model, a.dtype, jpegs, a.clients, a.requests, a.max_batch, a.max_wait_ms))
    rows.append(through_server(a.model, a.dtype, jpegs, a.clients, a.requests, 1, 0.0))
    for r in rows:
        r["of_model_only"] = r["images_per_s"] / base
    print(f"{'case':<38} {'images':>6} {'seconds':>8} {'images/s':>9} {'of model':>9} {'p50 s':>7} "
          f"{'p99 s':>7} {'batch':>6}")
    for r in rows:
        p50, p99 = (f"{r[k]:7.3f}" if k in r else f"{'':>7}" for k in ("p50_s", "p99_s"))
        batch = f"{r['mean_batch']:6.2f}" if r.get("mean_batch") else f"{'':>6}"
        print(f"{r['case']:<38} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.3f} "
              f"{r['of_model_only']:>8.1%} {p50} {p99} {batch}")
    ratio = rows[1]["of_model_only"]
    print(f"batched server at {ratio:.1%} of the model-only rate (target >= 85%): "
          f"{'met' if ratio >= 0.85 else 'not met'}")
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": rows[0]["dtype"], "rows": rows}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
