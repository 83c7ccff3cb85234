"""`python converters/merge.py ...` is `qmm merge ...` (see `qmm merge --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen_merge_mcore.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
