"""scripts/gpu_benchmark.py stays runnable without a GPU: its --smoke run on the CPU (tiny shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_on_cpu_from_the_repository(tmp_path):
    out = tmp_path / "gpu.json"
    # No PYTHONPATH: the script must find the package in the repository's src/ by itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = ROOT / "scripts" / "gpu_benchmark.py"
    cmd = [sys.executable, str(script), "--smoke", "--iters", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert Path(res["package"]) == ROOT / "src" / "siglip_so400m"
    impls = {row["impl"] for row in res["speed"]}
    assert {"ours", "transformers (sdpa)"} <= impls
    # timm is timed where it imports and reported as skipped, with the reason, where it does not.
    assert ("timm" in impls) != ("timm" in res["skipped"])
    assert all(row["images_per_s"] > 0 for row in res["speed"])
    assert res["parity"]["fp32"]["max_abs_diff_vs_transformers"] < 1e-5
    assert res["parity"]["bf16"]["cos_min_vs_transformers"] > 0.999
    assert res["oom_search"]["largest_batch"] >= 4
    assert "targets:" in r.stdout and "parity fp32" in r.stdout
