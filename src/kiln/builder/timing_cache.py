"""The timing cache file: measured tactic times that later builds reuse.

The file is JSON that starts with a format marker and a version:
``{"format": "kiln-timing-cache", "version": 2, "entries": {key: {tactic: ms}}}``.
A path that holds anything else (a user's notes, an engine, a folder) is refused and
never overwritten; a missing or empty file starts an empty cache. Saving merges with
what another build may have written meanwhile and replaces the file atomically.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading

from kiln.errors import BuildError

FORMAT = "kiln-timing-cache"
VERSION = 2
_LEGACY_VERSIONS = (1,)           # {"version": 1, "entries": ...}: written before the format marker
_SNIFF = 256                      # bytes read to tell a Kiln cache from another file
_LOCK = threading.Lock()


def check_cache_path(path: str) -> None:
    """Refuse a timing-cache path that cannot be read and written as a Kiln cache, before any work."""
    _read(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK):
        raise BuildError(f"Timing cache {path!r} cannot be written: the folder {parent!r} is not writable; "
                         f"give a path in a folder you can write to.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise BuildError(f"Timing cache {path!r} is read-only; make it writable or give another file.")


def _not_ours(path: str, why: str) -> BuildError:
    return BuildError(f"Timing cache {path!r} is not a Kiln timing cache ({why}); Kiln will not overwrite it. "
                      f"Give a new file name (it is created) or an existing Kiln timing cache.")


def _read(path: str) -> dict[str, dict[str, float]]:
    """The entries of the cache at ``path`` ({} when the file is missing or empty)."""
    if not path:
        raise BuildError("The timing cache path is empty; give a file name such as model.timing.")
    if os.path.isdir(path):
        raise BuildError(f"Timing cache {path!r} is a folder; give a file name inside it, such as "
                         f"{os.path.join(path, 'model.timing')!r}.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BuildError(f"The folder {parent!r} for timing cache {path!r} does not exist; create it first.")
    if not os.path.exists(path):
        return {}
    if not os.path.isfile(path):
        raise _not_ours(path, "not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
            if not head:
                return {}
            if not (head.startswith(b'{"format": "' + FORMAT.encode() + b'"')
                    or any(head.startswith(b'{"version": %d,' % v) for v in _LEGACY_VERSIONS)):
                raise _not_ours(path, "no Kiln timing-cache header")
            f.seek(0)
            data = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise BuildError(f"Timing cache {path!r} cannot be read ({exc.strerror or exc}); check its permissions.") \
            from None
    except (UnicodeDecodeError, ValueError):
        raise _not_ours(path, "not valid JSON") from None
    if not isinstance(data, dict):
        raise _not_ours(path, "not a JSON object")
    version = data.get("version")
    if data.get("format") == FORMAT:
        if not isinstance(version, int) or version > VERSION:
            raise BuildError(f"Timing cache {path!r} has version {version!r}, newer than this Kiln's {VERSION}; "
                             f"give this build its own cache file.")
    elif set(data) != {"version", "entries"} or version not in _LEGACY_VERSIONS:
        raise _not_ours(path, "no Kiln timing-cache header")
    return _valid_entries(data.get("entries"))


def _valid_entries(raw: object) -> dict[str, dict[str, float]]:
    """Entries of the form {key: {tactic: ms}}; malformed ones are dropped (they only cost a re-timing)."""
    out: dict[str, dict[str, float]] = {}
    if not isinstance(raw, dict):
        return out
    for key, times in raw.items():
        if isinstance(key, str) and isinstance(times, dict) and all(
                isinstance(t, str) and isinstance(ms, (int, float)) and not isinstance(ms, bool)
                and (math.isfinite(ms) and ms >= 0 or ms == math.inf) for t, ms in times.items()):
            out[key] = {t: float(ms) for t, ms in times.items()}
    return out


class TimingCache:
    """Measured tactic times, ``{key: {tactic: milliseconds}}``, kept in a file between builds."""

    VERSION = VERSION

    def __init__(self, path: str | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.hits = self.misses = 0
        self.entries: dict[str, dict[str, float]] = _read(self.path) if self.path is not None else {}

    def get(self, key: str) -> dict[str, float] | None:
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key: str, times: dict[str, float]) -> None:
        self.entries[key] = times

    def save(self) -> None:
        """Write the cache (merged with the file's current entries; ours win) through a temporary file."""
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        with _LOCK:
            merged = {**_read(self.path), **self.entries}
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": FORMAT, "version": VERSION, "entries": merged}, f)
                os.chmod(tmp, os.stat(self.path).st_mode & 0o777 if os.path.exists(self.path) else 0o644)
                os.replace(tmp, self.path)
            except OSError as exc:
                raise BuildError(f"Cannot write timing cache {self.path!r} ({exc.strerror or exc}); check the "
                                 f"disk and the file's permissions.") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self.entries = merged
