"""Calibration images: a folder of image files read with Pillow and preprocessed as the model declares it
(resize, scale, mean/std, layout), one float32 tensor per image for a single-input model."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kiln.errors import BuildError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input: resized to ``size`` (H, W) when given (else it must already have the
    input's size), RGB values times ``scale``, minus ``mean``, divided by ``std`` (per channel), laid out
    ``nchw`` or ``nhwc``."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: float = 1.0 / 255.0
    layout: str = "nchw"

    def __post_init__(self) -> None:
        if self.layout not in ("nchw", "nhwc"):
            raise BuildError(f"Image layout {self.layout!r} is not nchw or nhwc.")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise BuildError(f"Image mean and std take 3 values each (R,G,B; std above 0); got mean {list(self.mean)}, "
                             f"std {list(self.std)}.")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BuildError(f"Image size is HxW with both at least 1; got {self.size}.")


def image_files(folder: str) -> list[str]:
    """The image files of ``folder``, by name."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]


def read_images(files: Sequence[str], dims: Sequence[object], prep: Preprocess) -> np.ndarray:
    """The images as one float32 array [N, ...] matching the input dims ``dims`` (rank 4, 3 channels)."""
    try:
        from PIL import Image
    except ImportError:
        raise BuildError("Reading calibration images needs Pillow; install it: pip install 'kiln[quant]' (or give "
                         ".npy/.npz tensors).") from None
    if len(dims) != 4:
        raise BuildError(f"Calibration images feed a rank-4 image input; this model's input has dims {list(dims)}; "
                         f"give .npy/.npz tensors instead.")
    hw = (dims[2], dims[3]) if prep.layout == "nchw" else (dims[1], dims[2])
    c = dims[1] if prep.layout == "nchw" else dims[3]
    if isinstance(c, int) and c != 3:
        raise BuildError(f"Calibration images are RGB but the input has {c} channels ({prep.layout}); give .npy/.npz "
                         f"tensors, or the right --calib-layout.")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if prep.size is not None:
                    im = im.resize((prep.size[1], prep.size[0]), Image.BILINEAR)
                arr = np.asarray(im, np.float32)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise BuildError(f"Calibration image {path!r} cannot be read ({type(exc).__name__}); remove it or "
                             f"replace it.") from None
        want = tuple(d if isinstance(d, int) else arr.shape[i] for i, d in enumerate(hw))
        if arr.shape[:2] != want:
            raise BuildError(f"Calibration image {path!r} is {arr.shape[0]}x{arr.shape[1]} but the model takes "
                             f"{want[0]}x{want[1]}; give --calib-resize {want[0]}x{want[1]}.")
        arr = (arr * np.float32(prep.scale) - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        out.append(arr.transpose(2, 0, 1) if prep.layout == "nchw" else arr)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise BuildError(f"Calibration images have different sizes ({sorted(shapes)[:2]}...); give --calib-resize HxW.")
    return np.stack(out).astype(np.float32)
