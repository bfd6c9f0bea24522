"""Good clients' latency through `siglip-so400m serve`, with and without hostile clients beside them.

    python -m siglip_so400m.testing /tmp/tiny --tiny
    python scripts/load_test_serve.py --model /tmp/tiny [--clients 64 --duration 60 --json out.json]

Two runs, each against a fresh server on 127.0.0.1 (float32, an index of a few images so /v1/search
runs, --allow-urls): first the good clients alone (48 of the 64), then the same good clients with
the hostile ones (--hostile, default a quarter of --clients) beside them, cycling through the
attacks below. The load generator runs on the same machine: on few cores, its own threads share
the CPUs with the server, and the latencies include that.

- good: /v1/embeddings with 1-4 texts or images (data URIs), each answer compared with the
  embedding computed in this process (max |difference| <= 1e-4 after normalizing): a request
  lost (no answer, an error status) or wrong is counted, never retried;
- stalled bodies: a socket that sends `Content-Length: 100` and one byte, then waits for the answer
  (408 at --body-timeout);
- template expansion: /v1/classify with the template "{:>40000000}" (422);
- hanging URLs: 32 image URLs to an HTTP server here that accepts and never answers (400 at
  --url-timeout). The server refuses loopback addresses by default; this script starts it with
  --allow-private-urls, its own flag for fetching from private hosts, so the fetches happen;
- huge k: /v1/search with k = 10^9 (422);
- a decompression bomb: a PNG header that claims 40000 x 40000 pixels (400);
- deeply nested JSON: 100000 `[` (400).

Prints a table and JSON: the good requests' p50/p99 latency, lost and wrong counts, the hostile
requests' statuses, and the server's peak resident memory (VmHWM). A script, not a test: timings
depend on the machine and never decide pass or fail.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import siglip_so400m

ATTACKS = ("stalled_body", "template", "hanging_urls", "huge_k", "bomb", "nested_json")


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb_png(side: int = 40_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


class HangingHost:
    """An HTTP host on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            if len(self.held) > 4096:  # the fetcher gave up on the oldest long ago
                self.held.pop(0).close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, index: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "siglip_so400m", "serve", "--model", model, "--index", index,
           "--port", str(port), "--dtype", "float32", "--log-level", "warning", "--allow-urls",
           "--allow-private-urls", *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not answer /health in 120 s:\n{log.read_text()}")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hostile_request(kind: str, url: str, hanging: str) -> str:
    """One attack; returns its outcome (the status, or the error's name)."""
    if kind == "stalled_body":
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=120) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            reply = s.recv(64)
            return reply.split(b" ")[1].decode() if reply.startswith(b"HTTP/") else "closed"
    bodies = {
        "template": ("/v1/classify", {"images": [data_uri(png(0))], "labels": ["a", "b", "c"],
                                      "template": "{:>40000000}"}),
        "hanging_urls": ("/v1/embeddings",
                         {"input": [{"image_url": f"{hanging}/{i}.png"} for i in range(32)]}),
        "huge_k": ("/v1/search", {"texts": ["a cat"], "k": 10**9}),
        "bomb": ("/v1/embeddings", {"input": [data_uri(bomb_png())]}),
    }
    try:
        if kind == "nested_json":
            r = httpx.post(f"{url}/v1/embeddings", content=b"[" * 100_000, timeout=120,
                           headers={"Content-Type": "application/json"})
        else:
            path, body = bodies[kind]
            r = httpx.post(url + path, json=body, timeout=120)
        return str(r.status_code)
    except httpx.HTTPError as e:
        return type(e).__name__


def run(model: str, index: str, refs: dict, clients: int, hostile: int, duration: float, log: Path,
        extra: list[str], seed: int) -> dict:
    proc, url = start_server(model, index, log, extra)
    hanging = HangingHost()
    hanging_url = f"http://127.0.0.1:{hanging.port}"
    lock = threading.Lock()
    latencies: list[float] = []
    lost: Counter[str] = Counter()
    wrong, worst = 0, 0.0
    attacks: Counter[tuple[str, str]] = Counter()
    stop = time.monotonic() + duration
    keys = list(refs)

    def good(c: int) -> None:
        nonlocal wrong, worst
        rng = random.Random(seed * 1000 + c)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < stop:
                kind = "image" if rng.random() < 0.25 else "text"
                items = rng.sample([k for k in keys if k[0] == kind], rng.randint(1, 4))
                t = time.perf_counter()
                try:
                    r = http.post("/v1/embeddings", json={"input": [k[1] for k in items]})
                except httpx.HTTPError as e:
                    with lock:
                        lost[type(e).__name__] += 1
                    continue
                took = time.perf_counter() - t
                if r.status_code != 200:
                    with lock:
                        lost[str(r.status_code)] += 1
                    continue
                got = torch.tensor([d["embedding"] for d in r.json()["data"]])
                diff = (got - torch.stack([refs[k] for k in items])).abs().max().item()
                with lock:
                    latencies.append(took)
                    worst = max(worst, diff)
                    wrong += diff > 1e-4

    def bad(c: int) -> None:
        i = c
        while time.monotonic() < stop:
            kind = ATTACKS[i % len(ATTACKS)]
            i += 1
            outcome = hostile_request(kind, url, hanging_url)
            with lock:
                attacks[kind, outcome] += 1

    threads = [threading.Thread(target=good, args=(c,)) for c in range(clients - hostile)]
    threads += [threading.Thread(target=bad, args=(c,)) for c in range(hostile)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads[: clients - hostile]:
        t.join()
    good_wall = time.monotonic() - start
    for t in threads[clients - hostile:]:
        t.join(180)  # the last attacks end at their deadlines (--body-timeout, --url-timeout)
    rss = peak_rss_mib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
    lat = np.array(latencies) * 1000
    return {"clients": clients, "hostile": hostile, "duration_s": duration,
            "good_wall_s": round(good_wall, 1),
            "good_requests": len(latencies), "lost": dict(lost), "wrong": wrong, "max_abs_diff": worst,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "max_ms": round(float(lat.max()), 1) if len(lat) else None,
            "server_peak_rss_mib": round(rss, 1), "server_exit": proc.returncode,
            "attacks": {f"{k} -> {o}": n for (k, o), n in sorted(attacks.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="a checkpoint folder (python -m siglip_so400m.testing DIR --tiny)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--hostile", type=int, help="hostile clients in the second run (default: a quarter)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per run (default: 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("server_args", nargs="*", help="after --: more `serve` flags for both runs")
    args = p.parse_args()
    hostile = args.clients // 4 if args.hostile is None else args.hostile

    model, processor = siglip_so400m.load(args.model, dtype=torch.float32)
    rng = random.Random(args.seed)
    words = "a photo of the small red big blue cat dog car tree house on in under beside".split()
    texts = sorted({" ".join(rng.choices(words, k=rng.randint(2, 9))) for _ in range(300)})
    images = [png(i) for i in range(24)]
    with torch.inference_mode():
        t_emb = model.encode_text(processor.texts(texts), normalize=True)
        pixels = processor.images([Image.open(io.BytesIO(b)) for b in images])
        i_emb = model.encode_image(pixels, normalize=True)
    refs = {("text", t): e for t, e in zip(texts, t_emb, strict=True)}
    refs |= {("image", data_uri(b)): e for b, e in zip(images, i_emb, strict=True)}
    del model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "photos")
        folder.mkdir()
        for i, b in enumerate(images[:8]):
            (folder / f"{i}.png").write_bytes(b)
        index = str(Path(tmp, "index"))
        siglip_so400m.embed(str(folder), index, model=args.model, dtype="float32", workers=0)
        results = {}
        # The same good clients both times; the second run adds the hostile ones beside them.
        for name, clients, n_hostile in (("baseline", args.clients - hostile, 0),
                                         ("hostile", args.clients, hostile)):
            print(f"{name}: {clients} clients ({n_hostile} hostile) for {args.duration:g} s ...",
                  file=sys.stderr, flush=True)
            results[name] = run(args.model, index, refs, clients, n_hostile, args.duration,
                                Path(tmp, f"{name}.log"), args.server_args, args.seed)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "runs": results}
    print(f"\n{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'run':<9} {'clients':>7} {'hostile':>7} {'good':>6} {'lost':>5} {'wrong':>5} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'peak RSS MiB':>12}")
    for name, r in results.items():
        print(f"{name:<9} {r['clients']:>7} {r['hostile']:>7} {r['good_requests']:>6} "
              f"{sum(r['lost'].values()):>5} {r['wrong']:>5} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['max_ms']:>8} {r['server_peak_rss_mib']:>12}")
    for line, n in results["hostile"]["attacks"].items():
        print(f"  {line}: {n}")
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
