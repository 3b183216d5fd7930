"""The device fingerprint an engine is built for, and the check at load."""
from __future__ import annotations

import platform
from typing import Any

from kiln.errors import IncompatibleEngineError

DEVICE_KINDS = ("cpu", "cuda")      # what an engine can be built for and run on


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: str) -> dict[str, Any]:
    """What makes an engine valid only here: device kind, GPU and library versions."""
    import torch

    from kiln import __version__
    fp: dict[str, Any] = {"kind": device, "arch": platform.machine(), "kiln": __version__,
                          "torch": torch.__version__.split("+")[0], "cuda": None, "cudnn": None,
                          "name": _cpu_name(), "compute_capability": None}
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        fp["name"] = props.name
        fp["compute_capability"] = f"{props.major}.{props.minor}"
        fp["cuda"] = torch.version.cuda
        v = torch.backends.cudnn.version()
        fp["cudnn"] = str(v) if v else None
    return fp


def check_compatible(built: dict[str, Any], path: str, rebuild: str) -> list[str]:
    """Raise IncompatibleEngineError if this machine cannot run the engine; return soft warnings."""
    import torch
    kind = built.get("kind")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise IncompatibleEngineError(
                f"{path!r} was built for CUDA on {built.get('name')} (compute capability "
                f"{built.get('compute_capability')}), but this machine has no CUDA GPU; rebuild it here with: {rebuild}")
        here = fingerprint("cuda")
        if (here["name"], here["compute_capability"]) != (built.get("name"), built.get("compute_capability")):
            raise IncompatibleEngineError(
                f"{path!r} was built for {built.get('name')} (compute capability {built.get('compute_capability')}), "
                f"but this GPU is {here['name']} (compute capability {here['compute_capability']}); "
                f"rebuild it here with: {rebuild}")
    elif kind == "cpu":
        here = fingerprint("cpu")
        if here["arch"] != built.get("arch"):
            raise IncompatibleEngineError(
                f"{path!r} was built for a {built.get('arch')} CPU, but this machine is {here['arch']}; "
                f"rebuild it here with: {rebuild}")
    else:
        raise IncompatibleEngineError(f"{path!r} was built for device kind {kind!r}, which this Kiln does not know; "
                                      f"rebuild it with: {rebuild}")
    warnings = []
    here_torch = torch.__version__.split("+")[0]
    if built.get("torch") and built["torch"].split(".")[:2] != here_torch.split(".")[:2]:
        warnings.append(f"{path!r} was built with torch {built['torch']}, this is torch {here_torch}; "
                        f"rebuild for the best tactics: {rebuild}")
    return warnings
