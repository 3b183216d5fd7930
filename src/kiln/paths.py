"""Paths found inside model files: resolved inside the model's folder, or refused.

A model file may name other files (ONNX external data, TF.js weight shards,
Core ML package members, checkpoint shards). Those names are data written by
whoever made the file, so each one is resolved against the model's folder,
symlinks included, and refused when it lands anywhere else.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from kiln.errors import KilnError


class PathEscapeError(KilnError):
    """A path read from a model file points outside the model's folder."""


def resolve_inside(base_dir: str | os.PathLike, relpath: Any, what: str) -> Path:
    """``base_dir / relpath`` with every symlink resolved, refused unless it lies inside ``base_dir``.

    ``relpath`` comes from a file, so anything but a relative path string is refused:
    absolute paths (POSIX or Windows), ``..`` that climbs out, NUL bytes, and links whose
    target is outside. ``what`` names the reference in the error (``"weight shard"``).
    The result may not exist; callers say what is missing.
    """
    if isinstance(relpath, os.PathLike):
        relpath = os.fspath(relpath)
    if not isinstance(relpath, str) or not relpath or "\0" in relpath:
        raise PathEscapeError(f"{what} {relpath!r} is not a file name; the model file is damaged.")
    base = Path(base_dir).resolve()
    if (PurePosixPath(relpath).is_absolute() or PureWindowsPath(relpath).is_absolute()
            or PureWindowsPath(relpath).drive):
        raise PathEscapeError(f"{what} {relpath!r} is an absolute path; Kiln reads only files inside the model's "
                              f"folder {str(base)!r}. Move the file next to the model and name it relatively.")
    try:
        target = (base / relpath).resolve()
    except (OSError, RuntimeError, ValueError) as exc:     # a symlink loop, a name the OS refuses
        raise PathEscapeError(f"{what} {relpath!r} cannot be resolved inside {str(base)!r} ({exc}).") from None
    try:
        target.relative_to(base)
    except ValueError:
        raise PathEscapeError(f"{what} {relpath!r} points outside the model's folder {str(base)!r} (to "
                              f"{str(target)!r}); Kiln reads only files inside it. Move the file next to the "
                              f"model.") from None
    return target
