"""How a front-end process and the engine process talk (``kiln serve --frontends N``).

Each front end has one socketpair to the engine process and one slab: an anonymous shared-memory
file (``memfd_create``) cut into equal slots, mapped by both. A front end copies a request's input
tensors into a free slot and sends a small binary request record over the socket; the engine
process views the tensors where they lie (the batcher copies them into the batch, or the engine
reads them in place), writes the outputs into the same slot and answers with an answer record. A
request whose tensors do not fit a slot, or that finds every slot taken, carries them in its record.

Why this design: the bytes of a tensor cross between the processes once, through memory both map,
instead of twice through the kernel; the socket carries only descriptors, and its end-of-file tells
either side at once that the other died. The slab has no name in /dev/shm, so nothing is left
behind however a process ends. A slot belongs to one request until the engine process has answered
for it (also when the client went away). A request that timed out or was cancelled is answered at
once, even while a batch holding it still runs; that run may then read the slot's next contents
into that request's rows only, whose results are discarded (outputs are written into a slot only
for a request that is answered with them).

A frame is ``<BI`` (kind, body length) and the body. A ``JSON`` frame holds one control message (a
JSON object). A ``RECORDS`` frame holds any number of request records (front end to engine) or
answer records (engine to front end): everything one side has to send in one pass of its event
loop goes out in one write. Each record starts with its own length, so a record found malformed is
answered on its own and the frame's other records still are. A request record is ``REQUEST`` (its
length, id, timeout in seconds or 0, slot or -1, model name length, tensor count, payload length),
the model name, the tensors, the payload. An answer record is ``ANSWER`` (length, id, status,
tensor count, payload length), the tensors and the payload; an error answer's payload is its JSON
error. A tensor is ``TENSOR`` (name length, rank, offset), the name and the dims (``<q`` each); its
bytes lie at the offset in the payload when the record has one, else in the slot.

Everything read from the other side is checked: lengths inside the frame and the record, a known
tensor name whose dtype is the model's, whole-number dims, the bytes inside the slot or payload, a
slot inside the slab.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import mmap
import os
import struct
from typing import Any, Callable, Iterator

import numpy as np

from kiln.serve import errors

log = logging.getLogger("kiln.serve")
HEAD = struct.Struct("<BI")             # frame kind, body length
JSON, RECORDS = 1, 2                    # frame kinds
REQUEST = struct.Struct("<IQdiHBI")     # length, id, timeout s (0: none), slot (-1: none), name length, tensors, payload
ANSWER = struct.Struct("<IQBBI")        # length, id, status (OK or ERROR), tensors, payload length
TENSOR = struct.Struct("<BBQ")          # name length, rank, offset
DIM = struct.Struct("<q")
OK, ERROR = 0, 1
SLOTS = 64                              # slots per front end
SLOT_BYTES = 2 << 20                    # bytes per slot; larger requests travel in the record
FLUSH_BYTES = 1 << 20                   # records waiting beyond this go out at once, not at the pass's end
LAYOUTS = 256                           # checked tensor descriptors kept per model and direction
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

    def checked_slot(self, k: int) -> memoryview | None:
        """Slot ``k`` as the other side named it (-1: none); a number outside the slab is refused."""
        if k == -1:
            return None
        if not 0 <= k < self.slots:
            raise ConnectionError(f"slot {k} lies outside the slab of {self.slots}")
        return self.slot(k)

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:             # an array still views it; the mapping goes with the process
            pass
        os.close(self.fd)


# ---- records --------------------------------------------------------------------------------------------
def tensors(arrays: dict[str, Any], order: list[str], slot: memoryview | None) -> tuple[bytes, bytes]:
    """The tensor descriptors of ``arrays`` (in ``order``) and the payload: empty when they were copied into
    ``slot`` (given and large enough), else their bytes. A value may also be a tensor that reads itself
    (``shape``, ``dtype``, ``read_into``, ``array``: a system shared-memory input), read straight into the slot."""
    flat = [a if type(a) is not np.ndarray and hasattr(a, "read_into") else np.ascontiguousarray(a)
            for a in (arrays[n] for n in order)]
    key = (*order, *[a.shape for a in flat], *[a.dtype.itemsize for a in flat])
    known = _DESCRIPTORS.get(key)
    if known is None:
        known = _descriptors([(n, a.shape, a.dtype.itemsize) for n, a in zip(order, flat)])
        if len(_DESCRIPTORS) >= LAYOUTS:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = known
    descs, offsets, total = known
    if slot is not None and total <= len(slot):
        for a, offset in zip(flat, offsets):
            if type(a) is np.ndarray:
                slot[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            else:
                a.read_into(np.frombuffer(slot, a.dtype, math.prod(a.shape), offset).reshape(a.shape))
        return descs, b""
    return descs, b"".join((a if type(a) is np.ndarray else a.array()).tobytes() for a in flat)


_DESCRIPTORS: dict[tuple, tuple[bytes, list[int], int]] = {}


def _descriptors(tensors: list[tuple[str, tuple[int, ...], int]]) -> tuple[bytes, list[int], int]:
    """The descriptor bytes, offsets and total bytes of tensors laid end to end, from (name, shape, itemsize)."""
    descs, offsets, offset = [], [], 0
    for n, shape, itemsize in tensors:
        name = n.encode()
        descs.append(TENSOR.pack(len(name), len(shape), offset) + name + struct.pack(f"<{len(shape)}q", *shape))
        offsets.append(offset)
        offset += math.prod(shape) * itemsize
    return b"".join(descs), offsets, offset


def request_record(n: int, model: str, timeout_s: float | None, slot_no: int | None,
                   arrays: dict[str, np.ndarray], slot: memoryview | None) -> bytes:
    """One infer request: its tensors copied into ``slot`` when they fit, else carried in the record."""
    name = model.encode()
    descs, payload = tensors(arrays, list(arrays), slot)
    if payload or not arrays:
        slot_no = None
    size = REQUEST.size + len(name) + len(descs) + len(payload)
    return REQUEST.pack(size, n, timeout_s or 0.0, -1 if slot_no is None else slot_no, len(name), len(arrays),
                        len(payload)) + name + descs + payload


def answer_record(n: int, outputs: dict[str, np.ndarray], slot: memoryview | None) -> bytes:
    """A request's outputs: copied into its slot when they fit, else carried in the record."""
    descs, payload = tensors(outputs, list(outputs), slot)
    return ANSWER.pack(ANSWER.size + len(descs) + len(payload), n, OK, len(outputs), len(payload)) + descs + payload


def error_record(n: int, exc: errors.ServeError) -> bytes:
    body = json.dumps(error_message(exc), separators=(",", ":")).encode()
    return ANSWER.pack(ANSWER.size + len(body), n, ERROR, 0, len(body)) + body


def records(body: bytearray, head: struct.Struct) -> Iterator[memoryview]:
    """The records of a RECORDS frame body, each at least ``head`` long (ConnectionError: the frame is broken)."""
    view, pos = memoryview(body), 0
    while pos < len(body):
        if len(body) - pos < 4:
            raise ConnectionError("a frame that ends inside a record's length")
        size = int.from_bytes(body[pos:pos + 4], "little")
        if size < head.size or pos + size > len(body):
            raise ConnectionError(f"a record of {size} bytes in a frame of {len(body)}")
        yield view[pos:pos + size]
        pos += size


class Request:
    """A request record, read: its fixed fields now, its tensors when the model is known (``arrays``)."""

    def __init__(self, rec: memoryview) -> None:
        _, self.id, timeout, self.slot, name_len, self.count, payload_len = REQUEST.unpack_from(rec)
        pos = REQUEST.size + name_len
        if pos > len(rec) - payload_len:
            raise ConnectionError("a request record shorter than its fields")
        self.model = _text(rec[REQUEST.size:pos])
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ConnectionError(f"a request timeout of {timeout} s")
        self.timeout_s = timeout or None
        self.rec, self.pos, self.end = rec, pos, len(rec) - payload_len

    def arrays(self, dtypes: dict[str, np.dtype], slab: Slab, layouts: dict | None = None) -> dict[str, np.ndarray]:
        """The request's tensors, each checked and viewed where it lies (a payload is copied out of the frame)."""
        slot = slab.checked_slot(self.slot)
        payload = bytearray(self.rec[self.end:]) if self.end < len(self.rec) else None
        return place(self.rec, self.pos, self.end, self.count, dtypes, payload if payload is not None else slot,
                     layouts)


class Answer:
    """An answer record, read: its status and, for an error, the ServeError it names."""

    def __init__(self, rec: memoryview) -> None:
        _, self.id, self.status, self.count, payload_len = ANSWER.unpack_from(rec)
        self.rec, self.end = rec, len(rec) - payload_len
        if self.end < ANSWER.size:
            raise ConnectionError("an answer record shorter than its payload")

    def error(self) -> errors.ServeError | None:
        if self.status == OK:
            return None
        try:
            return error_from(json.loads(bytes(self.rec[self.end:])))
        except ValueError:
            return errors.InternalError("The engine process answered with a malformed error; please report it.")

    def arrays(self, dtypes: dict[str, np.dtype], slot: memoryview | None,
               layouts: dict | None = None) -> dict[str, np.ndarray]:
        """The outputs, checked and copied (the slot is reused once the answer is read)."""
        buf = self.rec[self.end:] if self.end < len(self.rec) else slot
        got = place(self.rec, ANSWER.size, self.end, self.count, dtypes, buf, layouts)
        return {n: a.copy() for n, a in got.items()}


def place(rec: memoryview, pos: int, end: int, count: int, dtypes: dict[str, np.dtype], buf: Any,
          layouts: dict | None = None) -> dict[str, np.ndarray]:
    """The ``count`` tensors described in ``rec[pos:end]`` as arrays over ``buf``, each checked: a known name
    given once, with the dtype ``dtypes`` gives it, whole-number dims, its bytes inside ``buf``. ``layouts``
    (one dict per ``dtypes``) keeps descriptors already checked, by their bytes."""
    if layouts is None:
        tensors = _layout(rec, pos, end, count, dtypes)
    else:
        key = (count, bytes(rec[pos:end]))
        tensors = layouts.get(key)
        if tensors is None:
            tensors = _layout(rec, pos, end, count, dtypes)
            if len(layouts) >= LAYOUTS:
                layouts.clear()
            layouts[key] = tensors
    buf = b"" if buf is None else buf
    size, out = len(buf), {}
    for name, dt, n, offset, shape, stop in tensors:
        if stop > size:
            raise ConnectionError(f"tensor {name!r} lies outside its buffer")
        out[name] = np.frombuffer(buf, dt, n, offset).reshape(shape)
    return out


def _layout(rec: memoryview, pos: int, end: int, count: int, dtypes: dict[str, np.dtype]) -> list[tuple]:
    """(name, dtype, elements, offset, shape, end offset) of each described tensor, checked but for its buffer."""
    out: list[tuple] = []
    try:
        for _ in range(count):
            name_len, rank, offset = TENSOR.unpack_from(rec, pos)
            pos += TENSOR.size
            name = _text(rec[pos:pos + name_len])
            pos += name_len
            shape = struct.unpack_from(f"<{rank}q", rec, pos)
            pos += rank * DIM.size
            dt = dtypes.get(name)
            if dt is None or any(t[0] == name for t in out):
                raise ConnectionError(f"a tensor descriptor for an unknown or repeated tensor {name[:100]!r}")
            if min(shape, default=0) < 0:
                raise ConnectionError(f"tensor {name!r} has shape {list(shape)}")
            n = math.prod(shape)
            out.append((name, dt, n, offset, shape, offset + n * dt.itemsize))
    except struct.error:
        raise ConnectionError("a record shorter than its tensor descriptors") from None
    if pos != end:
        raise ConnectionError(f"a record whose tensor descriptors end at {pos}, not {end}")
    return out


def _text(raw: memoryview) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise ConnectionError("a name that is not UTF-8") from None


def error_message(exc: errors.ServeError) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def error_from(msg: Any) -> errors.ServeError:
    """The ServeError an answer names (InternalError for a name outside the closed table)."""
    kind = ERRORS.get(msg.get("type") if isinstance(msg, dict) else None, errors.InternalError)
    return kind(str(msg.get("message", "")) if isinstance(msg, dict) else "The engine process failed.")


# ---- the socket -----------------------------------------------------------------------------------------
class Channel(asyncio.Protocol):
    """One end of a front end's socketpair: frames in (handed to ``on_json`` / ``on_records``), frames out.

    Records to send wait until the end of the event loop's pass (or ``FLUSH_BYTES``) and go out in one frame;
    a JSON message first sends the records before it, so the other side sees them in order. A broken frame
    closes the connection (the other side's process is then at fault, and goes).
    """

    def __init__(self, on_json: Callable[[dict[str, Any]], None], on_records: Callable[[bytearray], None]) -> None:
        self.on_json, self.on_records = on_json, on_records
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._in = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0

    @classmethod
    async def open(cls, sock: Any, on_json: Callable[[dict[str, Any]], None],
                   on_records: Callable[[bytearray], None]) -> Channel:
        channel = cls(on_json, on_records)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: channel, sock)
        return channel

    # ---- out
    def send_json(self, msg: dict[str, Any]) -> None:
        self.flush()
        body = json.dumps(msg, separators=(",", ":")).encode()
        self._write(HEAD.pack(JSON, len(body)) + body)

    def add(self, record: bytes) -> None:
        """Queues a record for this pass's RECORDS frame."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self.flush)
        self._out.append(record)
        self._out_bytes += len(record)
        if self._out_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Sends the records queued so far (dropped once the other process is gone: no one is left to read them)."""
        if self._out:
            body = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(HEAD.pack(RECORDS, len(body)) + body)

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the other process is gone")
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---- in (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport                  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._out.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        pos = 0
        try:
            while len(buf) - pos >= HEAD.size:
                kind, n = HEAD.unpack_from(buf, pos)
                if kind != JSON and kind != RECORDS:
                    raise ConnectionError(f"a frame of unknown kind {kind}")
                start = pos + HEAD.size
                if len(buf) - start < n:
                    break
                body, pos = buf[start:start + n], start + n
                if kind == RECORDS:
                    self.on_records(body)
                    continue
                msg = json.loads(body)
                if not isinstance(msg, dict):
                    raise ConnectionError("a JSON frame that is not an object")
                self.on_json(msg)
        except (ConnectionError, ValueError) as exc:
            log.error("kiln serve: the other process sent a broken frame (%s); closing its connection", exc)
            buf.clear()
            self.close()
            return
        del buf[:pos]
