"""The per-user cache of generated code (Triton kernels): a private folder, content-addressed files.

The folder is ``$KILN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiln``, else ``~/.cache/kiln``; each kind
of generated code has a subfolder. Folders are created with mode 0700 and refused when another user
owns them or others may write to them. A file is named by the SHA-256 of its exact bytes, written
atomically (a private temporary file renamed into place), and read back and checked against its name
before use; a module is executed from the bytes that passed that check, never from whatever the path
holds later.
"""
from __future__ import annotations

import hashlib
import linecache
import os
import stat
import tempfile
import types
from pathlib import Path

from kiln.errors import KilnError

_FIX = "remove it, or set KILN_CACHE_DIR to a folder only you can write"


def cache_root() -> Path:
    """The cache root this process uses (not created here)."""
    override = os.environ.get("KILN_CACHE_DIR")
    if override:
        return Path(override).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base.absolute() / "kiln"


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 if missing; refuse it unless it is a folder that only we can write."""
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)                # the umask may have cleared bits; never widen an existing folder
    except FileExistsError:
        pass
    except OSError as exc:
        raise KilnError(f"Cannot create the kernel cache folder {str(path)!r} ({exc.strerror}); "
                        f"set KILN_CACHE_DIR to a folder you can write.") from None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KilnError(f"Cannot read the kernel cache folder {str(path)!r} ({exc.strerror}); {_FIX}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KilnError(f"The kernel cache path {str(path)!r} is not a folder; {_FIX}.")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KilnError(f"The kernel cache folder {str(path)!r} belongs to another user (uid {st.st_uid}), so "
                        f"Kiln runs no code from it; {_FIX}.")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KilnError(f"The kernel cache folder {str(path)!r} is writable by other users "
                        f"(mode {stat.S_IMODE(st.st_mode):o}), so Kiln runs no code from it; run chmod 700 on it, "
                        f"or set KILN_CACHE_DIR to a folder only you can write.")


def cache_dir(sub: str) -> Path:
    """The checked per-user folder for one kind of generated code, created if missing."""
    root = cache_root()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KilnError(f"Cannot create {str(root.parent)!r} for the kernel cache ({exc.strerror}); "
                        f"set KILN_CACHE_DIR to a folder you can write.") from None
    _private_dir(root)
    folder = root / sub
    _private_dir(folder)
    return folder


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None if it is missing, a link or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError:
        return None


def _write_atomic(folder: Path, path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise KilnError(f"Cannot write {str(path)!r} to the kernel cache ({exc.strerror}); {_FIX}.") from None


def store(data: bytes, sub: str, suffix: str) -> Path:
    """Put ``data`` in the cache as ``<sha256><suffix>`` and return its path, checked to hold exactly ``data``.

    A file of that name with other content (planted or damaged) is replaced atomically.
    """
    folder = cache_dir(sub)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}{suffix}"
    held = _read(path)
    if held is None or hashlib.sha256(held).hexdigest() != digest:
        _write_atomic(folder, path, data)
        held = _read(path)
    if held is None or hashlib.sha256(held).hexdigest() != digest:
        raise KilnError(f"The kernel cache file {str(path)!r} does not hold what Kiln wrote to it; {_FIX}.")
    return path


def import_source(source: str, sub: str, module_name: str) -> types.ModuleType:
    """Cache ``source`` and execute it as a module from the checked bytes.

    The module's file is the cache file (so ``inspect.getsource``, which Triton's JIT uses, works);
    ``linecache`` is primed with the same bytes, so source lookups never re-read the file.
    """
    data = source.encode("utf-8")
    path = str(store(data, sub, ".py"))
    code = compile(data, path, "exec", dont_inherit=True)
    module = types.ModuleType(module_name)
    module.__file__ = path
    linecache.cache[path] = (len(data), None, source.splitlines(keepends=True), path)
    exec(code, module.__dict__)        # noqa: S102 (Kiln's own generated source, the bytes checked above)
    return module
