"""The engine file: write it, read it back, and refuse foreign or damaged files.

``kiln.load`` (kiln.runtime) turns a file read here into a runnable Engine; this package never
imports the runtime.
"""
from __future__ import annotations

import os
import shlex
from typing import Any

import numpy as np

from kiln.engine.device import DEVICE_KINDS, check_compatible, fingerprint
from kiln.engine.format import FORMAT_VERSION, MAGIC, read_engine, read_prelude, write_engine

__all__ = ["FORMAT_VERSION", "MAGIC", "check_compatible", "fingerprint", "read_engine", "read_header", "read_weight",
           "rebuild_command", "write_engine"]


def rebuild_command(header: dict[str, Any], path: str) -> str:
    """The command that rebuilds this engine here, from a header that passed the engine schema."""
    b = header.get("build", {})
    if b.get("command"):
        return b["command"]
    parts = ["kiln", "build", b.get("source") or "model.onnx", "-o", os.path.basename(path)]
    if header["precision"] != "fp32":
        parts.append(f"--{header['precision']}")
    if header["device"]["kind"] in DEVICE_KINDS:
        parts += ["--device", header["device"]["kind"]]     # the CLI's default is cuda when available, so say which
    profiles = header.get("profiles") or []
    if profiles and profiles[0]:
        for flag, key in (("--min-shapes", "min"), ("--opt-shapes", "opt"), ("--max-shapes", "max")):
            parts += [flag, ",".join(f"{n}:{'x'.join(str(d) for d in r[key])}" for n, r in profiles[0].items())]
    return " ".join(shlex.quote(p) for p in parts)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The validated header with the plan's tables at top level (for inspect and the viewer)."""
    path = os.fspath(path)
    header, _, _, _ = read_prelude(path)
    plan = header["plan"]
    by_key = header.get("weights", {})
    out = dict(header)
    out["format_version"] = FORMAT_VERSION
    out["kiln_version"] = header["device"].get("kiln")
    out["inputs"], out["outputs"] = plan["inputs"], plan["outputs"]
    out["layers"], out["tensors"] = plan["layers"], plan.get("tensors", {})
    out["weights"] = {name: by_key.get(key, {}) for name, key in plan.get("weights", {}).items()}
    from kiln.plugins.registry import plugin_records
    out["plugins"] = plugin_records(plan)
    return out


def read_weight(path: str | os.PathLike, name: str) -> np.ndarray:
    """One weight (by tensor name) as a numpy array."""
    header, weights = read_engine(os.fspath(path), verify_weights=False)
    key = header["plan"].get("weights", {}).get(name, name)
    if key not in weights:
        from kiln.errors import EngineFormatError
        raise EngineFormatError(f"The engine has no weight named {name!r}.")
    return np.array(weights[key])
