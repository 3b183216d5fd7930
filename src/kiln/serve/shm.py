"""The system shared-memory extension: POSIX shared-memory objects as request inputs and outputs.

A client registers a region (a name, the key of an object under /dev/shm, an offset and a byte
size); an infer request then names region, offset and byte size for a tensor instead of carrying
its bytes. The server reads and writes regions through a file descriptor (``pread``/``pwrite``),
never through a mapping, so a client that shrinks or deletes its object gets an error instead of
crashing the server with SIGBUS. The descriptor is opened read-write where the server may, else
read-only (such a region can hold inputs only). Every region and offset is checked against the
object's size at registration and again at each use. A request keeps its regions alive until it
finishes, so unregistering a region in use never pulls it from under a batch.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import os
import stat
import weakref
from typing import Any

import numpy as np

from kiln.serve.errors import BadRequest

SHM_DIR = "/dev/shm"
MAX_REGIONS = 1024                      # registered at once (each holds one file descriptor)
PARAMS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")
MODES = ("local", "any", "off")         # who may use the extension: loopback peers, anyone, nobody


def object_path(key: Any) -> str:
    """The /dev/shm path of a POSIX shared-memory key (``/name`` or ``name``; one path component)."""
    if not isinstance(key, str) or not key:
        raise BadRequest(f"The shared-memory key is the name of a POSIX shared-memory object such as '/input0', "
                         f"got {key!r}.")
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\0" in name or name in (".", "..") or len(name) > 255:
        raise BadRequest(f"The shared-memory key {key!r} is not one POSIX shared-memory object name; give "
                         f"'/name' with no other '/', no '..' and no NUL (the object lives in {SHM_DIR}).")
    return os.path.join(SHM_DIR, name)


def _whole(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise BadRequest(f"{what} is a whole number of bytes (0 or more), got {value!r}.")
    return value


class Region:
    """A registered region: ``byte_size`` bytes from ``offset`` of the object ``key``, held open by fd."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        path = object_path(key)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK       # never block on a FIFO, never follow a link
        try:
            try:
                fd = os.open(path, os.O_RDWR | flags)
                self.writable = True
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | flags)
                self.writable = False
        except OSError as exc:
            raise BadRequest(f"Cannot open shared-memory object {key!r} for region {name!r} "
                             f"({exc.strerror or exc}); create it (tritonclient.utils.shared_memory) before "
                             f"registering.") from None
        self._close = weakref.finalize(self, os.close, fd)        # once neither registry nor request holds it
        self.fd, self.name, self.key, self.offset, self.byte_size = fd, name, key, offset, byte_size
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            self._close()
            raise BadRequest(f"{key!r} is not a shared-memory object; give the key of one made with shm_open.")
        try:
            self.check(0, byte_size)
        except BadRequest:
            self._close()
            raise

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def check(self, offset: int, nbytes: int) -> int:
        """The object offset of ``nbytes`` bytes at ``offset`` in the region, after checking that the range is
        inside the region and the object still exists and still holds the whole region."""
        if offset + nbytes > self.byte_size:
            raise BadRequest(f"Bytes {offset}..{offset + nbytes} lie outside shared-memory region {self.name!r} "
                             f"({self.byte_size} bytes); give an offset and size inside it.")
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            raise BadRequest(f"The shared-memory object {self.key!r} of region {self.name!r} was deleted; "
                             f"unregister the region and register a new object.")
        if self.offset + self.byte_size > st.st_size:
            raise BadRequest(f"Shared-memory region {self.name!r} needs bytes {self.offset}.."
                             f"{self.offset + self.byte_size} of {self.key!r}, which has {st.st_size}; make the "
                             f"object larger or register a smaller region.")
        return self.offset + offset


def _io(region: Region, what: str, call: Any, *args: Any) -> int:
    """An os.pread/pwrite-style call on the region's descriptor; an OSError is the request's error."""
    try:
        return call(*args)
    except OSError as exc:
        raise BadRequest(f"Shared-memory region {region.name!r} failed while {what} ({exc.strerror or exc}); "
                         f"check its object {region.key!r}.") from None


class ShmTensor:
    """An input tensor held in a registered region: its shape and dtype, read when the batch is formed."""

    def __init__(self, region: Region, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.region, self.offset, self.shape, self.dtype = region, offset, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize

    def read_into(self, out: np.ndarray) -> None:
        """Copies the tensor from the region into ``out`` (C-contiguous, this shape and dtype)."""
        at = self.region.check(self.offset, self.nbytes)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < self.nbytes:
            n = _io(self.region, "reading an input", os.preadv, self.region.fd, [view[done:]], at + done)
            if n <= 0:
                raise BadRequest(f"Shared-memory region {self.region.name!r} ended while reading an input; keep "
                                 f"the object's size while requests use it.")
            done += n

    def array(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out


def materialize(feeds: dict[str, Any]) -> dict[str, np.ndarray]:
    """The feeds as writable arrays: a shared-memory input read into an array of its own, an array over a
    request's immutable bytes copied (the engine shares writable host arrays; a read-only one would take its
    slower converting copy instead)."""
    return {n: v.array() if isinstance(v, ShmTensor) else v if v.flags.writeable else v.copy()
            for n, v in feeds.items()}


def gather(parts: list[Any]) -> np.ndarray:
    """The parts (arrays or shared-memory inputs of one dtype) concatenated along the first axis, each
    copied once, straight into the result."""
    first = parts[0]
    out = np.empty((sum(p.shape[0] for p in parts), *first.shape[1:]), first.dtype)
    gather_into(parts, out)
    return out


def gather_into(parts: list[Any], out: np.ndarray) -> int:
    """Copies the parts (arrays or shared-memory inputs) one after another along the first axis into the
    first rows of ``out`` (C-contiguous), each once; returns the rows filled. A single part of ``out``'s
    whole shape (a model without a batch axis) fills all of it."""
    if len(parts) == 1 and parts[0].shape == out.shape:
        p = parts[0]
        if isinstance(p, ShmTensor):
            p.read_into(out)
        else:
            out[...] = p
        return out.shape[0] if out.ndim else 0
    start = 0
    for p in parts:
        stop = start + p.shape[0]
        if isinstance(p, ShmTensor):
            p.read_into(out[start:stop])
        else:
            out[start:stop] = p
        start = stop
    return start


class OutputSlot:
    """Where an output goes: a region, an offset in it, and the most bytes it may take."""

    def __init__(self, region: Region, offset: int, byte_size: int) -> None:
        self.region, self.offset, self.byte_size = region, offset, byte_size

    def write(self, name: str, arr: np.ndarray) -> dict[str, Any]:
        """Writes ``arr`` into the slot; returns the output's shared-memory parameters for the response."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes > self.byte_size:
            raise BadRequest(f"Output {name!r} ({list(arr.shape)}) takes {arr.nbytes} bytes, but its shared-memory "
                             f"byte size is {self.byte_size}; give it a larger region.")
        if not self.region.writable:
            raise BadRequest(f"Shared-memory region {self.region.name!r} is read-only for the server; give outputs "
                             f"a region in an object the server may write.")
        at = self.region.check(self.offset, arr.nbytes)
        view = memoryview(arr.reshape(-1).view(np.uint8))
        done = 0
        while done < arr.nbytes:
            done += _io(self.region, f"writing output {name!r}", os.pwrite, self.region.fd, view[done:], at + done)
        return {"shared_memory_region": self.region.name, "shared_memory_byte_size": arr.nbytes,
                **({"shared_memory_offset": self.offset} if self.offset else {})}


class ShmRegistry:
    """The regions registered with this server, by name."""

    def __init__(self, mode: str = "local") -> None:
        if mode not in MODES:
            raise ValueError(f"system shared memory mode is one of {MODES}, got {mode!r}")
        self.mode = mode
        self.regions: dict[str, Region] = {}

    def allowed(self, peer: str | None) -> None:
        """Refuses peers the mode excludes: everyone when off; under ``local`` all but loopback addresses."""
        if self.mode == "any":
            return
        if self.mode == "local" and is_loopback(peer):
            return
        raise BadRequest(f"System shared memory is {'off' if self.mode == 'off' else 'for clients on this machine'} "
                         f"here (kiln serve --system-shm {self.mode}); send tensors in the request instead.")

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any, peer: str | None) -> None:
        self.allowed(peer)
        if not isinstance(name, str) or not name:
            raise BadRequest(f"A shared-memory region needs a non-empty name, got {name!r}.")
        if name in self.regions:
            raise BadRequest(f"Shared-memory region {name!r} is already registered; unregister it first or pick "
                             f"another name.")
        if len(self.regions) >= MAX_REGIONS:
            raise BadRequest(f"{MAX_REGIONS} shared-memory regions are registered, the most this server holds; "
                           f"unregister some first.")
        offset, byte_size = _whole(offset, "offset"), _whole(byte_size, "byte_size")
        if byte_size == 0:
            raise BadRequest(f"Shared-memory region {name!r} has byte_size 0; give the region's size in bytes.")
        self.regions[name] = Region(name, key, offset, byte_size)

    def unregister(self, name: str | None, peer: str | None) -> None:
        """Forgets one region (none if it is not registered) or, with no name, all of them."""
        self.allowed(peer)
        if name:
            self.regions.pop(name, None)
        else:
            self.regions.clear()

    def status(self, name: str | None, peer: str | None) -> list[dict[str, Any]]:
        self.allowed(peer)
        if name:
            return [self.get(name).status()]
        return [r.status() for r in self.regions.values()]

    def get(self, name: Any) -> Region:
        region = self.regions.get(name) if isinstance(name, str) else None
        if region is None:
            raise BadRequest(f"No shared-memory region named {name!r} is registered; register it first "
                             f"(POST /v2/systemsharedmemory/region/NAME/register).")
        return region

    def tensor_params(self, params: dict[str, Any], where: str, peer: str | None) -> tuple[Region, int, int] | None:
        """(region, offset, byte size) when a tensor's parameters name a region, else None."""
        if not any(k in params for k in PARAMS):
            return None
        self.allowed(peer)
        if "shared_memory_region" not in params or "shared_memory_byte_size" not in params:
            raise BadRequest(f"{where} names shared memory without both shared_memory_region and "
                             f"shared_memory_byte_size; give both.")
        region = self.get(params["shared_memory_region"])
        offset = _whole(params.get("shared_memory_offset", 0), f"shared_memory_offset of {where}")
        size = _whole(params["shared_memory_byte_size"], f"shared_memory_byte_size of {where}")
        region.check(offset, size)
        return region, offset, size

    def input(self, params: dict[str, Any], where: str, shape: tuple[int, ...], dtype: np.dtype,
              peer: str | None) -> ShmTensor | None:
        """The input a tensor's parameters place in shared memory (its size checked), else None."""
        found = self.tensor_params(params, where, peer)
        if found is None:
            return None
        region, offset, size = found
        tensor = ShmTensor(region, offset, shape, dtype)
        if size != tensor.nbytes:
            raise BadRequest(f"{where} ({list(shape)}, {dtype.name}) is {tensor.nbytes} bytes, but its "
                             f"shared_memory_byte_size is {size}; give the tensor's exact size.")
        return tensor

    def output(self, params: dict[str, Any], where: str, peer: str | None) -> OutputSlot | None:
        found = self.tensor_params(params, where, peer)
        return None if found is None else OutputSlot(*found)


@functools.lru_cache(maxsize=1024)
def is_loopback(peer: str | None) -> bool:
    """Whether a peer address (``127.0.0.1``, ``[::1]``, ``::ffff:127.0.0.1``) is a loopback address; None or
    anything that is not an address is not (answers are kept per address: the parse costs more than a request's
    other checks)."""
    try:
        addr = ipaddress.ip_address(peer.strip("[]")) if peer else None
    except ValueError:
        return False
    if addr is not None and getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    return addr is not None and addr.is_loopback


def grpc_peer_host(peer: str) -> str | None:
    """The address of a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``), None if it has none."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return None
    return rest.rsplit(":", 1)[0].strip("[]")


def shm_input(registry: ShmRegistry | None, peer: str | None, params: dict[str, Any], where: str,
              shape: tuple[int, ...], dtype: np.dtype) -> ShmTensor | None:
    """The input a tensor's parameters place in shared memory, else None (refused where there is no registry)."""
    if registry is None:
        _no_shm(params, where)
        return None
    return registry.input(params, where, shape, dtype, peer)


def shm_output(registry: ShmRegistry | None, peer: str | None, params: dict[str, Any], where: str) -> OutputSlot | None:
    """The slot a requested output's parameters place in shared memory, else None."""
    if registry is None:
        _no_shm(params, where)
        return None
    return registry.output(params, where, peer)


def _no_shm(params: dict[str, Any], where: str) -> None:
    if any(k in params for k in PARAMS):
        raise BadRequest(f"{where} names a shared-memory region, but this endpoint has no system shared memory; "
                         f"send the tensor in the request.")
