"""Training entry point for torchrun / srun: `python launch/train.py --config launch/stage3.yaml [overrides]`.

The same as `qmm train`; kept as a file for launchers that want a script path.
"""

import sys

from qwen_merge_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
