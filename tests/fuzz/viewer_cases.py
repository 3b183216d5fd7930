"""Mutated files of every viewer format: a seed folder copied, one of its files damaged.

The mutation follows the file's content, not its format name, so a new reader gets
structure-aware cases without changes here: zip archives have one member rewritten
(with pickles and Keras Lambda code planted), JSON documents and length-prefixed JSON
headers are mutated structurally (and file names in them pointed outside the folder),
text is nested and cut, protobuf messages have fields rewritten, other binaries have
integers overwritten; any file may instead be truncated, bit-flipped or spliced.
"""
from __future__ import annotations

import base64
import io
import json
import marshal
import pickle
import random
import shutil
import struct
import zipfile
from pathlib import Path

from fuzz import mutate


class _Open:
    """Unpickling this calls ``open(canary, 'w')``: proof that a reader unpickled file content."""

    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


def evil_pickle(canary: str) -> bytes:
    return pickle.dumps(_Open(canary), protocol=2)


def keras_lambda(canary: str) -> dict:
    """A Keras Lambda layer whose function (marshalled bytecode) creates ``canary`` when deserialized."""
    code = compile(f"lambda x: (open({canary!r}, 'w').close(), x)[1]", "<fuzz>", "eval")
    fn = eval(code)          # noqa: S307 - builds the payload function, runs nothing
    body = base64.b64encode(marshal.dumps(fn.__code__)).decode()
    return {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
            "config": {"name": "evil", "function": {"class_name": "__lambda__", "config":
                       {"code": body, "defaults": None, "closure": None}}, "arguments": {}},
            "inbound_nodes": []}


def _json_like(data: bytes):
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _plant_names(doc, rng: random.Random, names: set[str], secrets: list[str]) -> str | None:
    """Replace a string naming a file of the folder (a weight shard, a companion) with a path outside it."""
    spots = [p for p in mutate.paths(doc) if isinstance(mutate.get(doc, p), str) and mutate.get(doc, p) in names]
    if not spots:
        return None
    where = rng.choice(spots)
    mutate.put(doc, where, rng.choice(secrets + ["/dev/zero", "..", "", "missing.bin"]))
    return "path-plant@" + "/".join(map(str, where))[:80]


def _json_doc(doc, rng: random.Random, names: set[str], secrets: list[str]) -> tuple[bytes, str]:
    label = _plant_names(doc, rng, names, secrets) if rng.random() < 0.3 else None
    if label is None:
        doc, label = mutate.json_mutation(doc, rng)
    return mutate.dumps(doc).encode(), label


def _text(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    text = data.decode("utf-8", "replace")
    kind = rng.choice(["nest", "repeat", "strings", "cut-brace"])
    lines = text.splitlines(keepends=True) or [text]
    i = rng.randrange(len(lines))
    if kind == "nest":
        n = rng.choice([100, 5000, 100_000])
        lines.insert(i, "x {" * n + "}" * n + "\n")
    elif kind == "repeat":
        lines.insert(i, lines[i] * rng.choice([100, 10_000]))
    elif kind == "strings":
        lines.insert(i, f'name: "{rng.choice(mutate.HOSTILE_STRINGS[:6])}" dim: -{2 ** 40} dim: 99999999999999999999\n')
    else:
        lines = [ln.replace("}", "", 1) if rng.random() < 0.3 else ln for ln in lines]
    return "".join(lines).encode("utf-8", "surrogatepass"), f"text-{kind}"


def _integers(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Overwrite an aligned 32- or 64-bit integer (counts, offsets, lengths, dims) with a hostile value."""
    width = rng.choice([4, 8])
    if len(data) < width:
        return mutate.raw(data, rng)
    i = rng.randrange(0, len(data) - width + 1, width) if len(data) >= 2 * width else 0
    value = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 2 ** 40, 2 ** 63, 2 ** 64 - 1, len(data) * 2])
    return data[:i] + (value & (1 << 8 * width) - 1).to_bytes(width, "little") + data[i + width:], f"int{width * 8}@{i}"


def _prefixed_json(data: bytes, rng: random.Random, names: set[str], secrets: list[str]) -> tuple[bytes, str] | None:
    """safetensors-style: a little-endian u64 length, then a JSON header."""
    if len(data) < 9 or data[8:9] != b"{":
        return None
    n = struct.unpack("<Q", data[:8])[0]
    doc = _json_like(data[8:8 + n])
    if doc is None:
        return None
    body, label = _json_doc(doc, rng, names, secrets)
    size = rng.choice([len(body), len(body), len(body) + 4096, 2 ** 63])
    return struct.pack("<Q", size & (1 << 64) - 1) + body + data[8 + n:], "prefixed-" + label


def _zip(data: bytes, rng: random.Random, canary: str, names: set[str], secrets: list[str]) -> tuple[bytes, str]:
    src = zipfile.ZipFile(io.BytesIO(data))
    members = {i.filename: src.read(i) for i in src.infolist()}
    name = rng.choice(sorted(members))
    kind = rng.random()
    if kind < 0.2:
        pick = [m for m in members if m.endswith((".pt", ".pkl", ".pth"))] or [name]
        name = rng.choice(pick)
        members[name] = evil_pickle(canary)
        for m, body in members.items():
            if m.endswith("weights_config.json"):
                members[m] = body.replace(b'"use_pickle": false', b'"use_pickle": true')
        label = "zip-pickle"
    elif kind < 0.3 and "config.json" in members:
        doc = json.loads(members["config.json"])
        doc.setdefault("config", {}).setdefault("layers", []).append(keras_lambda(canary))
        members["config.json"], name, label = json.dumps(doc).encode(), "config.json", "zip-keras-lambda"
    else:
        body, label = mutate_bytes(members[name], rng, canary, names | set(members), secrets)
        members[name] = body
        label = f"zip[{name.rsplit('/', 1)[-1]}]-{label}"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for m, body in members.items():
            z.writestr(m, body)
    return out.getvalue(), label


def mutate_bytes(data: bytes, rng: random.Random, canary: str, names: set[str],
                 secrets: list[str]) -> tuple[bytes, str]:
    """One content-directed mutation of a file's bytes."""
    if rng.random() < 0.3 or not data:
        return mutate.raw(data, rng, start=rng.choice([0, 4, 8]))
    if data[:2] == b"PK":
        try:
            return _zip(data, rng, canary, names, secrets)
        except zipfile.BadZipFile:
            pass
    doc = _json_like(data)
    if doc is not None:
        return _json_doc(doc, rng, names, secrets)
    prefixed = _prefixed_json(data, rng, names, secrets)
    if prefixed is not None:
        return prefixed
    try:
        text = data.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text[:2000]):
            return _text(data, rng)
    except UnicodeDecodeError:
        pass
    fields = mutate.pb_fields(data)
    covered = sum(end - start for start, _, end, _, _ in fields if start < len(data)) if fields else 0
    if fields and covered >= len(data) and rng.random() < 0.7:
        return mutate.pb_mutation(data, rng)
    return _integers(data, rng)


def make(seed_dir: Path, main: str, case_dir: Path, rng: random.Random, canary: str,
         secrets: list[str]) -> tuple[Path, str]:
    """Copy the seed folder into ``case_dir``, damage one file (mostly the one opened, or one inside the
    folder opened); return (path to open, label)."""
    shutil.copytree(seed_dir, case_dir, dirs_exist_ok=True)
    target = case_dir / main
    files = sorted(p for p in case_dir.rglob("*") if p.is_file())
    mains = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    victim = rng.choice(mains if rng.random() < 0.7 else files)
    parts = [p.relative_to(case_dir).parts for p in files]
    names = {"/".join(ps[i:]) for ps in parts for i in range(len(ps))}      # every tail: "weights/weight.bin"
    body, label = mutate_bytes(victim.read_bytes(), rng, canary, names, secrets)
    victim.write_bytes(body)
    return target, f"{victim.relative_to(case_dir)}:{label}"


def calls(target: Path, case_dir: Path) -> list[list[str]]:
    return [["view", str(target), "--export", str(case_dir / "view.html")]]
