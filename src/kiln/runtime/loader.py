"""kiln.load: an engine file, checked by kiln.engine, as a runnable Engine."""
from __future__ import annotations

import os
import warnings

from kiln.engine import check_compatible, read_engine, rebuild_command


def load(path: str | os.PathLike):
    """Load an engine file for this device; refuses foreign, damaged or plugin-less files."""
    path = os.fspath(path)
    header, weights = read_engine(path)
    for w in check_compatible(header["device"], path, rebuild_command(header, path)):
        warnings.warn(w, stacklevel=2)
    from kiln.runtime.engine import Engine          # torch loads only for a file that passed the checks
    engine = Engine(header, weights, path=path)
    engine.check_plugins()
    return engine
