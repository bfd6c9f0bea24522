"""Fine-tune SigLIP with the sigmoid loss; the loop lives in siglip_so400m.train.

    python scripts/finetune.py --model google/siglip-so400m-patch14-384 --data pairs.csv \\
        --output-dir runs/a --steps 1000 --batch-size 64
    torchrun --nproc_per_node 4 scripts/finetune.py ...   # the same run on 4 processes

Same as `siglip-so400m finetune ...`; `--help` lists the options.
"""

import sys

from siglip_so400m.train import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main(prog="finetune.py"))
