"""Zero-shot classification from the command line:

    python scripts/zero_shot.py image.jpg --labels "2 cats" "a plane" "a remote"

Same as `siglip-so400m zero-shot ...`; `--help` lists the options.
"""

import sys

from siglip_so400m.zeroshot import zero_shot_main

if __name__ == "__main__":
    sys.exit(zero_shot_main(prog="zero_shot.py"))
