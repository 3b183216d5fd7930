"""The converter registry: one entry per (domain, op type, since-version).

``@converter("Conv", since=11)`` registers a function ``fn(ctx, node) -> outputs``;
lookups pick the newest version not above the model's opset for that domain, as
tinygrad's and onnx2torch's frontends do. Registering a key twice is an error.

The ONNX schema in force at the model's opset comes from ``kiln.onnx.schemas`` (onnx.defs' table, as
onnx2torch resolves versions). A converter covers ONNX's versions of its op up to CHECKED_OPSET, the
newest opset the converters were written against; an op that ONNX changed later, in a version newer than its
converter's ``since``, is not handed to that converter: it is unsupported, and ``stale_reason``
says why.
"""
from __future__ import annotations

import functools
from typing import Callable

from kiln.errors import ParseError
from kiln.onnx import schemas

Converter = Callable[..., list]
CONVERTERS: dict[tuple[str, str], dict[int, Converter]] = {}
CHECKED_OPSET = 28    # ai.onnx: every operator version up to this opset is handled by the converters


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
    """The converter for ``op_type`` at the model's ``opset``, or None (none registered, or the op
    changed after its converter: see ``stale_reason``)."""
    since = _since(op_type, opset, domain)
    if since is None or _changed_after(op_type, since, opset, domain) is not None:
        return None
    return CONVERTERS[(_norm_domain(domain), op_type)][since]


def stale_reason(op_type: str, opset: int, domain: str = "") -> str | None:
    """Why a registered converter is not used at ``opset`` (a phrase), or None."""
    since = _since(op_type, opset, domain)
    changed = None if since is None else _changed_after(op_type, since, opset, domain)
    if changed is None:
        return None
    return (f"ONNX changed {op_type} in opset {changed}, after the opsets Kiln's converter (since opset {since}) was "
            f"written for (up to {CHECKED_OPSET})")


def schema_since(op_type: str, opset: int, domain: str = "") -> int | None:
    """The since-version of the ONNX schema in force for ``op_type`` at ``opset`` (kiln.onnx.schemas), or None
    for ops onnx does not define (contrib and custom domains)."""
    return _schema_since(op_type, opset, _norm_domain(domain))


@functools.lru_cache(maxsize=4096)
def _schema_since(op_type: str, opset: int, domain: str) -> int | None:
    schema = schemas.get(op_type, opset, domain)
    return schema.since if schema is not None else None


def _since(op_type: str, opset: int, domain: str) -> int | None:
    """The newest registered version of the op not above ``opset``."""
    _load_all()
    versions = CONVERTERS.get((_norm_domain(domain), op_type))
    ok = [v for v in versions or () if v <= opset]
    return max(ok) if ok else None


def _changed_after(op_type: str, since: int, opset: int, domain: str) -> int | None:
    """The opset of an ai.onnx schema change in force at ``opset`` that is newer than both the converter
    (``since``) and CHECKED_OPSET; None when the converter covers it."""
    if _norm_domain(domain) != "":
        return None
    changed = schema_since(op_type, opset)
    return changed if changed is not None and changed > max(since, CHECKED_OPSET) else None


def supported_ops() -> dict[tuple[str, str], list[int]]:
    _load_all()
    return {k: sorted(v) for k, v in sorted(CONVERTERS.items())}


def _load_all() -> None:
    from kiln._discovery import import_submodules
    import_submodules("kiln.onnx.ops")
