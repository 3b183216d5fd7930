"""The converter registry: one entry per (domain, op type, since-version).

``@converter("Conv", since=11)`` registers a function ``fn(ctx, node) -> outputs``;
lookups pick the newest version not above the model's opset for that domain, as
tinygrad's and onnx2torch's frontends do. Registering a key twice is an error.
"""
from __future__ import annotations

from typing import Callable

from kiln.errors import ParseError

Converter = Callable[..., list]
CONVERTERS: dict[tuple[str, str], dict[int, Converter]] = {}
MIN_OPSET, MAX_OPSET = 1, 23


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def converter(op_type: str, since: int = 1, domain: str = "") -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        versions = CONVERTERS.setdefault((_norm_domain(domain), op_type), {})
        if since in versions:
            raise ParseError(f"Converter for {domain or 'ai.onnx'}::{op_type} since opset {since} is registered twice "
                             f"({versions[since].__module__}.{versions[since].__name__} and {fn.__module__}.{fn.__name__}).")
        versions[since] = fn
        return fn
    return deco


def lookup(op_type: str, opset: int, domain: str = "") -> Converter | None:
    _load_all()
    versions = CONVERTERS.get((_norm_domain(domain), op_type))
    if not versions:
        return None
    ok = [v for v in versions if v <= opset]
    return versions[max(ok)] if ok else None


def supported_ops() -> dict[tuple[str, str], list[int]]:
    _load_all()
    return {k: sorted(v) for k, v in sorted(CONVERTERS.items())}


def _load_all() -> None:
    from kiln._discovery import import_submodules
    import_submodules("kiln.onnx.ops")
