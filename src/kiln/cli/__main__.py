"""`python -m kiln.cli` runs the `kiln` command."""
from __future__ import annotations

import sys

from kiln.cli import main

sys.exit(main())
