"""How a front-end process and the engine process talk (``kiln serve --frontends N``).

Each front end has one socketpair to the engine process and one slab: an anonymous shared-memory
file (``memfd_create``) cut into equal slots, mapped by both. A front end copies a request's input
tensors into a free slot and sends a small descriptor (JSON) over the socket; the engine process
views the tensors where they lie (the batcher copies them into the batch, or the engine reads them
in place), writes the outputs into the same slot and answers with their descriptors. A request
whose tensors do not fit a slot, or that finds every slot taken, carries them in the message
itself, after the descriptor.

Why this design: the bytes of a tensor cross between the processes once, through memory both map,
instead of twice through the kernel; the socket carries only descriptors, and its end-of-file tells
either side at once that the other died. The slab has no name in /dev/shm, so nothing is left
behind however a process ends. A slot belongs to one request until the engine process has answered
for it (also when the client went away). A request that timed out or was cancelled is answered at
once, even while a batch holding it still runs; that run may then read the slot's next contents
into that request's rows only, whose results are discarded (outputs are written into a slot only
for a request that is answered with them).

Frames are ``!II`` (JSON length, payload length), the JSON, then the payload. Everything read from
the other side is checked: a descriptor's dtype must be the model's, and its bytes inside the slot
or the payload.
"""
from __future__ import annotations

import asyncio
import json
import math
import mmap
import os
import struct
from typing import Any

import numpy as np

from kiln.serve import errors

HEAD = struct.Struct("!II")
SLOTS = 32                              # slots per front end
SLOT_BYTES = 2 << 20                    # bytes per slot; larger requests travel in the message
MAX_FRAME = 1 << 31                     # the most either length field may say
ERRORS = {c.__name__: c for c in (errors.BadRequest, errors.NotFound, errors.TooLarge, errors.Unavailable,
                                  errors.DeadlineExceeded, errors.InternalError)}


class Slab:
    """``SLOTS`` slots of ``SLOT_BYTES`` in one shared mapping (created by the engine process, inherited by fd)."""

    def __init__(self, fd: int | None = None, slots: int = SLOTS, slot_bytes: int = SLOT_BYTES) -> None:
        if fd is None:
            fd = os.memfd_create("kiln-serve-slab")          # given to the front end with pass_fds
            os.ftruncate(fd, slots * slot_bytes)
        self.fd, self.slots, self.slot_bytes = fd, slots, slot_bytes
        self.map = mmap.mmap(fd, slots * slot_bytes)
        self.view = memoryview(self.map)
        self.free = list(range(slots))

    def slot(self, k: int) -> memoryview:
        return self.view[k * self.slot_bytes:(k + 1) * self.slot_bytes]

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:             # an array still views it; the mapping goes with the process
            pass
        os.close(self.fd)


async def send(writer: asyncio.StreamWriter, msg: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    head = json.dumps(msg, separators=(",", ":")).encode()
    writer.write(HEAD.pack(len(head), len(payload)) + head)
    if len(payload):
        writer.write(payload)
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes] | None:
    """The next frame, or None at end of file."""
    try:
        n, m = HEAD.unpack(await reader.readexactly(HEAD.size))
        if n > MAX_FRAME or m > MAX_FRAME:
            raise ConnectionError(f"a frame of {n} + {m} bytes")
        msg = json.loads(await reader.readexactly(n))
        payload = await reader.readexactly(m) if m else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    if not isinstance(msg, dict):
        raise ConnectionError("a frame that is not a JSON object")
    return msg, payload


def pack(arrays: dict[str, np.ndarray], slot: memoryview | None, order: list[str]) -> tuple[list[dict], bytes]:
    """Descriptors of ``arrays`` (in ``order``) copied into ``slot`` when given and large enough, else into
    the returned payload."""
    total = sum(arrays[n].nbytes for n in order)
    out, chunks, offset = [], [], 0
    for n in order:
        a = np.ascontiguousarray(arrays[n])
        out.append({"name": n, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes})
        if slot is not None and total <= len(slot):
            np.frombuffer(slot, np.uint8, a.nbytes, offset)[...] = a.reshape(-1).view(np.uint8)
        else:
            chunks.append(a.tobytes())
        offset += a.nbytes
    return out, b"".join(chunks) if slot is None or total > len(slot) else b""


def unpack(descs: Any, dtypes: dict[str, np.dtype], slot: memoryview | None, payload: bytes,
           copy: bool = False) -> dict[str, np.ndarray]:
    """The arrays the descriptors place in the payload (when it has bytes) or the slot, each checked: a known
    name with the dtype given for it, whole-number dims, its bytes inside the buffer."""
    buf = payload if payload or slot is None else slot
    if not isinstance(descs, list):
        raise ConnectionError("tensor descriptors are not a list")
    out = {}
    for d in descs:
        if not isinstance(d, dict) or d.get("name") not in dtypes:
            raise ConnectionError(f"a tensor descriptor for an unknown tensor: {str(d)[:100]}")
        shape, offset, dt = d.get("shape"), d.get("offset"), dtypes[d["name"]]
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) \
                or type(offset) is not int or offset < 0:
            raise ConnectionError(f"a malformed tensor descriptor: {str(d)[:100]}")
        nbytes = math.prod(shape) * dt.itemsize
        if offset + nbytes > len(buf):
            raise ConnectionError(f"tensor {d['name']!r} lies outside its buffer")
        arr = np.frombuffer(buf, dt, nbytes // dt.itemsize if dt.itemsize else 0, offset).reshape(shape)
        out[d["name"]] = arr.copy() if copy else arr
    return out


def error_message(exc: errors.ServeError) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def error_from(msg: Any) -> errors.ServeError:
    """The ServeError an answer names (InternalError for a name outside the closed table)."""
    kind = ERRORS.get(msg.get("type") if isinstance(msg, dict) else None, errors.InternalError)
    return kind(str(msg.get("message", "")) if isinstance(msg, dict) else "The engine process failed.")
