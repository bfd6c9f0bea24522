"""Time and peak memory of loading a checkpoint, ours against transformers, each in a fresh process.

    python scripts/benchmark_load.py --model DIR [--json out.json]

Each row runs in its own Python process, so peak RSS (ru_maxrss) is that load alone, imports
included; "+1 image" rows also encode one 384 px image, which touches the image tower's pages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASES = {
    "ours fp32": "m, p = siglip_so400m.load(MODEL)",
    "ours bf16": "m, p = siglip_so400m.load(MODEL, dtype=torch.bfloat16)",
    "ours bf16, vision only": "m, p = siglip_so400m.load(MODEL, dtype=torch.bfloat16, towers=('vision',))",
    "transformers fp32": "m = SiglipModel.from_pretrained(MODEL)",
    "transformers bf16": "m = SiglipModel.from_pretrained(MODEL, dtype=torch.bfloat16)",
}

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
MODEL, CASE, ENCODE = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if CASE.startswith("ours"):
    import siglip_so400m
else:
    from transformers import SiglipModel
t1 = time.perf_counter()
exec(CASES[CASE])
t2 = time.perf_counter()
if ENCODE:
    x = torch.zeros(1, 3, 384, 384)
    with torch.inference_mode():
        if CASE.startswith("ours"):
            m.encode_image(x)
        else:
            m.get_image_features(pixel_values=x.to(m.dtype))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder in the Hub layout")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rows = []
    for encode in (False, True):
        for case in CASES:
            code = f"CASES = {CASES!r}\n{CHILD}"
            out = subprocess.run([sys.executable, "-c", code, args.model, case, str(int(encode))],
                                 capture_output=True, text=True, check=True)
            r = {"case": case + (" +1 image" if encode else ""), **json.loads(out.stdout.splitlines()[-1])}
            rows.append(r)
            print(f"{r['case']:<36} load {r['load_s']:6.2f} s   peak RSS {r['peak_rss_gib']:5.2f} GiB",
                  flush=True)
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
