"""Format-blind mutations: of raw bytes, of JSON documents, and of protobuf wire-format messages.

Every function takes a ``random.Random`` and returns ``(new value, label)``; the label names
the mutation kind first (the report groups by it) and then where it struck.
"""
from __future__ import annotations

import json
import math
import random
from typing import Any

# Values that trip type checks, range checks and code generators.
HOSTILE_STRINGS = ["", "<!--<script>", "</script><script>alert(1)</script>", "../../../../etc/passwd", "/etc/passwd",
                   "a" * 5000, "\udcff\ud800", "x\ny", "\x00", "%s%n{0}{__class__}", "i0\n__import__('os')", "∞√ü"]
HOSTILE_NUMBERS = [-1, 0, -(2 ** 31), 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -(10 ** 30), 1.5, -0.0,
                   float("nan"), float("inf"), float("-inf"), 1e308]


# ---- bytes --------------------------------------------------------------------------------
def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    keep = rng.choice([0, 1, 4, 8, 16, 63, 64, rng.randrange(max(1, len(data))), len(data) - 1])
    keep = max(0, min(keep, len(data) - 1))
    return data[:keep], f"truncate@{keep}/{len(data)}"


def bit_flips(data: bytes, rng: random.Random, start: int = 0) -> tuple[bytes, str]:
    buf = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 16])
    where = []
    for _ in range(n):
        i = rng.randrange(min(start, len(buf) - 1), len(buf))
        buf[i] ^= 1 << rng.randrange(8)
        where.append(i)
    return bytes(buf), f"bitflip@{','.join(map(str, where[:4]))}"


def byte_splice(data: bytes, rng: random.Random, start: int = 0) -> tuple[bytes, str]:
    """Overwrite, duplicate or delete a block, or plant 0xFF/0x00 runs (lengths and counts go wild)."""
    i = rng.randrange(min(start, len(data) - 1), len(data))
    n = rng.choice([1, 4, 8, 64])
    kind = rng.choice(["ff", "zero", "dup", "delete", "random"])
    if kind == "ff":
        out = data[:i] + b"\xff" * n + data[i + n:]
    elif kind == "zero":
        out = data[:i] + b"\0" * n + data[i + n:]
    elif kind == "dup":
        out = data[:i + n] + data[i:i + n] * rng.choice([2, 100]) + data[i + n:]
    elif kind == "delete":
        out = data[:i] + data[i + n:]
    else:
        out = data[:i] + rng.randbytes(n) + data[i + n:]
    return out, f"splice-{kind}@{i}+{n}"


def raw(data: bytes, rng: random.Random, start: int = 0) -> tuple[bytes, str]:
    """One of the byte-level mutations; ``start`` keeps a magic prefix intact for bit flips and splices."""
    pick = rng.randrange(3)
    if pick == 0:
        return truncate(data, rng)
    return bit_flips(data, rng, start) if pick == 1 else byte_splice(data, rng, start)


# ---- JSON ---------------------------------------------------------------------------------
def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as key/index tuples (the root is ``()``)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, prefix + (i,))
    return out


def get(doc: Any, where: tuple) -> Any:
    for k in where:
        doc = doc[k]
    return doc


def put(doc: Any, where: tuple, value: Any) -> Any:
    """``doc`` with the value at ``where`` replaced (in place; the root is returned replaced)."""
    if not where:
        return value
    get(doc, where[:-1])[where[-1]] = value
    return doc


class Deep:
    """A value nested ``depth`` lists/objects deep; ``dumps`` writes it as text (json.dumps would recurse)."""

    def __init__(self, depth: int, leaf: Any = 1, seed: int = 0) -> None:
        self.depth, self.leaf, self.seed = depth, leaf, seed

    def text(self) -> str:
        rng = random.Random(self.seed)
        kinds = [rng.random() < 0.5 for _ in range(self.depth)]
        return ("".join('{"k":' if k else "[" for k in kinds) + dumps(self.leaf)
                + "".join("}" if k else "]" for k in reversed(kinds)))


def dumps(doc: Any) -> str:
    """JSON text of ``doc`` (NaN and lone surrogates allowed, escaped), with every ``Deep`` written out."""
    texts: dict[str, str] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, Deep):
            key = f"@@deep{len(texts)}@@"
            texts[key] = v.text()
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v
    out = json.dumps(swap(doc), allow_nan=True, ensure_ascii=True)
    for key, text in texts.items():
        out = out.replace(f'"{key}"', text, 1)
    return out


def hostile_value(rng: random.Random, like: Any = None) -> Any:
    """A value of the wrong type, out of range, or with dangerous content."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.choice(HOSTILE_NUMBERS)
    if kind == 1:
        return rng.choice(HOSTILE_STRINGS)
    if kind == 2:
        return rng.choice([None, True, False, [], {}, [None], {"": None}])
    if kind == 3:
        return Deep(rng.choice([50, 1000, 100_000]), seed=rng.randrange(1 << 30))
    if kind == 4:
        return [rng.choice(HOSTILE_NUMBERS)] * rng.choice([1, 3, 7])
    if kind == 5 and isinstance(like, (int, float)) and not isinstance(like, bool) and math.isfinite(like):
        return -like if like else rng.choice([-1, 2 ** 40])
    if kind == 5 and isinstance(like, str):
        return str(like) + rng.choice(["\udcff", "\n", "/../x", "<!--<script>"])
    return {"__graph__": None} if rng.random() < 0.5 else [like, like]


def json_mutation(doc: Any, rng: random.Random, focus: list[tuple] | None = None) -> tuple[Any, str]:
    """One structural mutation of a decoded JSON document: retype, delete, insert, nest, swap or duplicate."""
    spots = focus or paths(doc)
    where = rng.choice(spots)
    kind = rng.choice(["retype", "retype", "delete", "insert", "nest", "swap", "dup"])
    target = get(doc, where)
    label = "/".join(map(str, where))[:120]
    if kind == "delete" and where:
        parent = get(doc, where[:-1])
        del parent[where[-1]]
        return doc, f"json-delete@{label}"
    if kind == "insert" and isinstance(target, (dict, list)):
        if isinstance(target, dict):
            target[rng.choice(HOSTILE_STRINGS[:6] + ["name", "kind", "__graph__", "__plugin__"])] = hostile_value(rng)
        else:
            target.insert(rng.randrange(len(target) + 1), hostile_value(rng, target[0] if target else None))
        return doc, f"json-insert@{label}"
    if kind == "nest":
        nested = Deep(rng.choice([30, 2000, 200_000]), target, rng.randrange(1 << 30))
        return put(doc, where, nested), f"json-nest@{label}"
    if kind == "swap":
        other = rng.choice(spots)
        if other[:len(where)] != where and where[:len(other)] != other:
            return put(doc, where, get(doc, other)), f"json-swap@{label}"
    if kind == "dup" and isinstance(target, list) and target:
        target.extend(target * rng.choice([1, 50]))
        return doc, f"json-dup@{label}"
    return put(doc, where, hostile_value(rng, target)), f"json-retype@{label}"


# ---- protobuf wire format -------------------------------------------------------------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def encode_varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_fields(data: bytes, base: int = 0, depth: int = 0) -> list[tuple[int, int, int, int, int]]:
    """(start, value start, end, field number, wire type) of every field that parses, recursing into
    length-delimited fields that parse as messages themselves."""
    out, i = [], 0
    try:
        while i < len(data):
            start = i
            key, i = _varint(data, i)
            num, wt = key >> 3, key & 7
            if num == 0:
                return out
            vstart = i
            if wt == 0:
                _, i = _varint(data, i)
            elif wt == 1:
                i += 8
            elif wt == 5:
                i += 4
            elif wt == 2:
                n, vstart = _varint(data, i)
                i = vstart + n
            else:
                return out
            if i > len(data):
                return out
            out.append((base + start, base + vstart, base + i, num, wt))
            if wt == 2 and depth < 12 and i - vstart > 1:
                out += pb_fields(data[vstart:i], base + vstart, depth + 1)
    except ValueError:
        pass
    return out


def pb_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Change one field of a protobuf message in place: a varint to a huge/negative value, a length prefix
    to a lie, a payload to deep nesting, or a field repeated many times."""
    fields = pb_fields(data)
    if not fields:
        return raw(data, rng)
    start, vstart, end, num, wt = rng.choice(fields)
    key_end = start + len(encode_varint(num << 3 | wt))
    kind = rng.choice(["varint", "length", "nest", "repeat"] if wt == 2 else ["varint", "repeat"])
    if kind == "varint":
        value = rng.choice([0, 1, 2 ** 31 - 1, 2 ** 32 + 5, 2 ** 40, 2 ** 63, 2 ** 64 - 1, 2 ** 64 - 7])
        if wt == 0:
            body = encode_varint(value)
        elif wt == 2:
            body = encode_varint(value) + data[vstart:end]       # length lies
        else:
            body = value.to_bytes(16, "little")[:8 if wt == 1 else 4]
        out = data[:key_end] + body + data[end:]
    elif kind == "length":
        payload = data[vstart:end]
        cut = payload[:rng.randrange(len(payload) + 1)]
        out = data[:key_end] + encode_varint(len(cut)) + cut + data[end:]
    elif kind == "nest":
        inner = data[vstart:end]
        for _ in range(rng.choice([100, 3000])):
            inner = encode_varint(num << 3 | 2) + encode_varint(len(inner)) + inner
        out = data[:key_end] + encode_varint(len(inner)) + inner + data[end:]
    else:
        out = data[:end] + data[start:end] * rng.choice([2, 1000]) + data[end:]
    return out, f"pb-{kind}@field{num}+{start}"
