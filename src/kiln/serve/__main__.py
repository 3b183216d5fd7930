"""``python -m kiln.serve PATH [flags]``: the same as ``kiln serve``."""
from __future__ import annotations

import sys

from kiln.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
