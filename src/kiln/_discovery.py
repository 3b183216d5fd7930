"""Registration by import: each family package registers its members when its modules load."""
from __future__ import annotations

import importlib
import pkgutil
import threading

_done: set[str] = set()
_lock = threading.Lock()


def import_submodules(package: str, skip: tuple[str, ...] = ()) -> None:
    """Import every public module of ``package`` once (decorators in them register converters,
    tactics or plugins). Modules starting with ``_`` and those in ``skip`` are left alone."""
    with _lock:
        if package in _done:
            return
        _done.add(package)
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
