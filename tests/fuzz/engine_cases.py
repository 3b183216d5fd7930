"""Mutated and forged engine files.

Most cases rewrite the JSON header and then recompute both CRCs (the layout is the one
documented in ``kiln/engine/format.py``, written here independently), so what is tested is the
header's schema check and everything behind it, not the checksum. The rest flip or cut raw
bytes without fixing the checksums, or change weight bytes with a fixed weight CRC.
"""
from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

from fuzz import mutate

PRELUDE = struct.Struct("<8sII QQQ II 16s")
ALIGN = 64

# Layer kinds and tactic names an attacker would try (names only; any kind/tactic outside the registry must be refused).
KINDS = ["Pointwise", "Convolution", "FullyConnected", "Plugin", "If", "Loop", "Shuffle", "Gather", "Resize", "Cast",
         "ElementWise", "Reduce", "__import__", "Pointwise\nimport os", ""]
TACTICS = ["triton", "torch", "cudnn", "cublas", "igemm", "os.system", "../../x", "", None, 7]


def split(data: bytes) -> tuple[tuple, dict, bytes]:
    """(prelude fields, decoded header, weights bytes) of a valid engine file."""
    fields = PRELUDE.unpack(data[:PRELUDE.size])
    h_len, w_off, w_len = fields[3], fields[4], fields[5]
    header = json.loads(data[PRELUDE.size:PRELUDE.size + h_len])
    return fields, header, data[w_off:w_off + w_len]


def forge(fields: tuple, header_text: bytes, weights: bytes) -> bytes:
    """An engine file around ``header_text`` and ``weights`` with correct lengths and CRCs."""
    w_off = (PRELUDE.size + len(header_text) + ALIGN - 1) // ALIGN * ALIGN
    pre = PRELUDE.pack(fields[0], fields[1], fields[2], len(header_text), w_off, len(weights),
                       zlib.crc32(header_text), zlib.crc32(weights), fields[8])
    return pre + header_text + b"\0" * (w_off - PRELUDE.size - len(header_text)) + weights


def _layers(plan: Any) -> list[dict]:
    """Every layer dict in a plan, sub-plans of If/Loop included."""
    out = []
    for layer in plan.get("layers", []) if isinstance(plan, dict) else []:
        if isinstance(layer, dict):
            out.append(layer)
            for v in (layer.get("attrs") or {}).values():
                if isinstance(v, dict) and "__graph__" in v:
                    out += _layers(v["__graph__"])
    return out


def injections(canary: str) -> list[str]:
    """Strings that run code if pasted into generated Python: each creates ``canary``."""
    act = f"open({canary!r}, 'w').close()"
    return [f"i0\n{act}\nif 0:\n    x0 = 0",
            f"i0 + (__import__('os').system('touch {canary}') or 0)",
            f"v0\n{act}\ndef _f():\n    x0 = 0",
            f"0)\n{act}\n#",
            f"neg\n{act}\n"]


def malicious_pointwise(header: dict, rng: random.Random, canary: str) -> str:
    """Give one layer (or a new Pointwise layer) a program whose strings are code, with tactic 'triton'."""
    layers = _layers(header.get("plan"))
    point = [la for la in layers if la.get("kind") == "Pointwise"] or layers
    layer = rng.choice(point)
    payload = rng.choice(injections(canary))
    where = rng.choice(["args", "args", "args", "op", "alpha", "key", "second-step"])
    step: dict[str, Any] = {"op": "neg", "args": ["i0"]}
    if where == "args":
        step["args"] = [payload]
    elif where == "op":
        step["op"] = payload
    elif where == "alpha":
        step = {"op": "leaky_relu", "args": ["i0"], "alpha": payload}
    elif where == "key":
        step[payload] = 1
    program = [step]
    if where == "second-step":
        program = [{"op": "exp", "args": ["i0"]}, {"op": "sum", "args": ["v0", payload]}]
    layer["kind"] = "Pointwise"
    layer["tactic"] = rng.choice(["triton", "triton", "triton", "torch"])
    layer.setdefault("attrs", {})["program"] = program
    return f"pointwise-inject-{where}"


def _plant_paths(header: dict, rng: random.Random, secrets: list[str]) -> str:
    """Put a path outside the model's folder where a string was (build source, names, plugin fields)."""
    spots = [p for p in mutate.paths(header) if isinstance(mutate.get(header, p), str)]
    where = rng.choice(spots)
    mutate.put(header, where, rng.choice(secrets))
    return "plant-path@" + "/".join(map(str, where))[:80]


def _retarget(header: dict, rng: random.Random) -> str:
    """Swap a layer's kind or tactic for another registry name (a CUDA-only tactic on a CPU engine too)."""
    layer = rng.choice(_layers(header.get("plan")))
    if rng.random() < 0.5:
        layer["tactic"] = rng.choice(TACTICS)
        return f"tactic-swap={layer['tactic']!r}"
    layer["kind"] = rng.choice(KINDS)
    return f"kind-swap={layer['kind']!r}"


FOCUS = [("plan", "layers"), ("plan", "inputs"), ("plan", "outputs"), ("plan", "tensors"), ("plan", "weights"),
         ("weights",), ("device",), ("profiles",), ("build",), ("plugins",), ("memory",)]


def _structural(header: dict, rng: random.Random) -> tuple[dict, str]:
    prefix = rng.choice(FOCUS + [()])
    doc, labels = header, []
    for _ in range(rng.choice([1, 1, 2, 3])):
        focus = [p for p in mutate.paths(doc) if p[:len(prefix)] == prefix] or None
        doc, one = mutate.json_mutation(doc, rng, focus)
        labels.append(one)
    return doc, "+".join(labels)


def _text_damage(text: str, rng: random.Random) -> tuple[bytes, str]:
    """Header text that is not quite JSON (or not UTF-8) but has valid CRCs."""
    kind = rng.choice(["utf8", "dupkey", "bignum", "nan", "cut", "bom"])
    if kind == "utf8":
        i = rng.randrange(len(text))
        return text[:i].encode() + b"\xff\xc3(" + text[i:].encode(), "header-invalid-utf8"
    if kind == "dupkey":
        return text.replace('"plan":', '"plan":{},"plan":', 1).replace('"device":', '"device":7,"device":', 1) \
            .encode(), "header-duplicate-keys"
    if kind == "bignum":
        return text.replace('"shape":[', '"shape":[1e999,', 1).replace("[2,", "[99999999999999999999999,", 1) \
            .encode(), "header-big-numbers"
    if kind == "nan":
        return text.replace("0.0", "NaN").replace("[2,", "[Infinity,", 1).encode(), "header-nan"
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode(), "header-bom"
    return text[:rng.randrange(len(text))].encode(), "header-cut"


def make(seed_file: Path, out: Path, rng: random.Random, canary: str, secrets: list[str]) -> str:
    """Write one mutated engine to ``out``; return the mutation label."""
    data = seed_file.read_bytes()
    fields, header, weights = split(data)
    pick = rng.random()
    if pick < 0.2:
        body, label = mutate.raw(data, rng, start=8)
        out.write_bytes(body)
        return "raw-" + label
    if pick < 0.35:
        label = malicious_pointwise(header, rng, canary)
    elif pick < 0.42:
        label = _plant_paths(header, rng, secrets)
    elif pick < 0.52:
        label = _retarget(header, rng)
    elif pick < 0.57 and weights:
        buf = bytearray(weights)
        for _ in range(rng.choice([1, 8, 64])):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        out.write_bytes(forge(fields, mutate.dumps(header).encode(), bytes(buf)))
        return "weights-bytes-crc-fixed"
    elif pick < 0.65:
        text, label = _text_damage(mutate.dumps(header), rng)
        out.write_bytes(forge(fields, text, weights))
        return label
    else:
        header, label = _structural(header, rng)
    text = mutate.dumps(header)
    out.write_bytes(forge(fields, text.encode("utf-8", "surrogatepass"), weights))
    return label


def calls(path: Path) -> list[list[str]]:
    """The CLI commands run on a mutated engine."""
    return [["inspect", str(path)], ["inspect", "--json", str(path)],
            ["run", str(path), "--output-dir", str(path.parent / "outputs")],
            ["view", str(path), "--export", str(path.parent / "view.html")]]
