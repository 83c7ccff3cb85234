"""`python converters/hf2mcore.py ...` is `qmm hf2mcore ...` (see `qmm hf2mcore --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen_merge_mcore.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["hf2mcore", *sys.argv[1:]]))
