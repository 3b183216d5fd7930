"""oneDNN's C API through ``ctypes``: the library, its CPU engine and streams, and a primitive's plumbing.

The oneDNN tactics (``onednn_cached`` in kernels/cpu_dnnl.py, ``onednn_lstm``/``onednn_gru`` in
kernels/cpu_dnnl_rnn.py) run on a ``libdnnl`` of their own: the PyPI package ``onednn-cpu-gomp``
(``pip install kiln[cpu-onednn]``), or the library named by ``KILN_ONEDNN_LIBRARY``; torch's copy exports no
symbols. ``library()`` is None where there is none, and those tactics are then not offered.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Any

import torch

LIBRARY_ENV = "KILN_ONEDNN_LIBRARY"

# oneDNN v3 C API values (oneapi/dnnl/dnnl_types.h; the same in 3.2 and 3.12)
CPU, STREAM_DEFAULT, F32, ANY, RUNTIME_OMP = 1, 1, 3, 1, 2
FORWARD_INFERENCE, SCRATCHPAD_USER = 96, 1
QUERY_WEIGHTS_MD, QUERY_SCRATCHPAD_MD, QUERY_EXEC_ARG_MD = 131, 136, 255
ARG_SRC, ARG_SRC_1, ARG_SRC_2, ARG_DST, ARG_DST_1, ARG_DST_2 = 1, 2, 3, 17, 18, 19
ARG_WEIGHTS, ARG_WEIGHTS_1, ARG_BIAS, ARG_SCRATCHPAD = 33, 34, 41, 80
ALLOCATE = ctypes.c_void_p(-1 & (2 ** 64 - 1))      # DNNL_MEMORY_ALLOCATE: the library allocates the buffer

Dims = ctypes.c_int64 * 12
P = ctypes.c_void_p


class ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", P)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int), ("hash", ctypes.c_char_p),
                ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class Dnnl:
    """The loaded library and its CPU engine; an in-order stream per calling thread, whose OpenMP thread count
    follows torch's."""

    def __init__(self, path: str) -> None:
        lib = self.lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        v = lib.dnnl_version().contents
        if v.major != 3 or v.cpu_runtime != RUNTIME_OMP:
            raise OSError(f"{path} is oneDNN {v.major}.{v.minor} (CPU runtime {v.cpu_runtime}); Kiln's oneDNN "
                          f"tactics need oneDNN 3 on OpenMP")
        lib.dnnl_primitive_desc_query_md.restype = P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_get_size.argtypes = [P]
        lib.dnnl_memory_set_data_handle.argtypes = [P, P]
        lib.dnnl_primitive_execute.argtypes = [P, P, ctypes.c_int, P]
        lib.dnnl_stream_wait.argtypes = [P]
        self.engine = P()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), CPU, ctypes.c_size_t(0)), "engine")
        self.set_threads = lib.omp_set_num_threads       # the OpenMP runtime libdnnl itself links
        self.local = threading.local()

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN could not create the {what} (status {status})")

    def stream(self, threads: int | None = None) -> P:
        """This thread's stream, its OpenMP thread count (libdnnl's own, per calling thread) set to ``threads``,
        else torch's."""
        local = self.local
        s = getattr(local, "stream", None)
        if s is None:
            s = local.stream = P()
            self.check(self.lib.dnnl_stream_create(ctypes.byref(s), self.engine, STREAM_DEFAULT), "stream")
            local.threads = None
        n = threads or torch.get_num_threads()
        if local.threads != n:
            self.set_threads(n)
            local.threads = n
        return s


_loaded: dict[str, Any] = {}


def library() -> Dnnl | None:
    """The oneDNN library the oneDNN tactics run on (loaded once); None where there is none."""
    if "lib" not in _loaded:
        path = os.environ.get(LIBRARY_ENV) or os.path.join(sys.prefix, "lib", "libdnnl.so.3")
        try:
            _loaded["lib"] = Dnnl(path) if os.path.isfile(path) else None
        except (OSError, AttributeError, RuntimeError):
            _loaded["lib"] = None
    return _loaded["lib"]


class PrimitiveBase:
    """The handles one primitive owns (destroyed with it, newest first) and the calls every primitive makes:
    memory descriptors and memories, a reorder run once, and execution with bound arguments. A primitive is made
    for ``threads`` (None: torch's thread count at its making) and runs on that count whatever the count when it
    executes (oneDNN splits the work when it makes the primitive)."""

    def __init__(self, lib: Dnnl, threads: int | None = None) -> None:
        self.threads = threads
        lib.stream(threads)     # libdnnl's OpenMP thread count set now: a primitive keeps the count it is made at
        self.lib, d = lib, lib.lib
        self.handles: list[tuple[str, P]] = []
        self.nargs, self.args = 0, None
        self._set, self._exec, self._wait = d.dnnl_memory_set_data_handle, d.dnnl_primitive_execute, d.dnnl_stream_wait

    def _md(self, dims: list[int] | tuple[int, ...], tag: int) -> P:
        md = P()
        self.lib.check(self.lib.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(dims), Dims(*dims), F32,
                                                                      tag), "memory descriptor")
        self.handles.append(("memory_desc", md))
        return md

    def _attr_user_scratchpad(self) -> P:
        attr = P()
        d = self.lib.lib
        self.lib.check(d.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
        self.handles.append(("primitive_attr", attr))
        self.lib.check(d.dnnl_primitive_attr_set_scratchpad_mode(attr, SCRATCHPAD_USER), "scratchpad mode")
        return attr

    def _query(self, pd: P, what: int, index: int) -> P:
        return P(self.lib.lib.dnnl_primitive_desc_query_md(pd, what, index))

    def _primitive(self, pd: P) -> P:
        prim = P()
        self.lib.check(self.lib.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "primitive")
        self.handles.append(("primitive", prim))
        return prim

    def _memory(self, md: P, handle) -> P:
        mem = P()
        self.lib.check(self.lib.lib.dnnl_memory_create(ctypes.byref(mem), md, self.lib.engine, handle), "memory")
        self.handles.append(("memory", mem))
        return mem

    def _reorder(self, src: P, src_md: P, dst: P, dst_md: P) -> None:
        d, pd = self.lib.lib, P()
        self.lib.check(d.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), src_md, self.lib.engine, dst_md,
                                                             self.lib.engine, None), "weight reorder")
        self.handles.append(("primitive_desc", pd))
        prim = self._primitive(pd)
        args = (ExecArg * 2)(ExecArg(ARG_SRC, src), ExecArg(ARG_DST, dst))
        stream = self.lib.stream(self.threads)
        self.lib.check(d.dnnl_primitive_execute(prim, stream, 2, args), "weight reorder run")
        d.dnnl_stream_wait(stream)

    def _reordered(self, values: torch.Tensor, user_md: P, md: P) -> P:
        """A memory the library allocates in ``md``'s layout, holding ``values`` (contiguous, laid out as
        ``user_md`` says) reordered once."""
        mem = self._memory(md, ALLOCATE)
        self._reorder(self._memory(user_md, ctypes.c_void_p(values.data_ptr())), user_md, mem, md)
        return mem

    def _bind(self, bound: list[tuple[int, P]]) -> None:
        self.nargs = len(bound)
        self.args = (ExecArg * self.nargs)(*(ExecArg(a, m) for a, m in bound))

    def _execute(self) -> None:
        stream = self.lib.stream(self.threads)
        self._exec(self.prim, stream, self.nargs, self.args)
        self._wait(stream)

    def __del__(self) -> None:
        d = getattr(getattr(self, "lib", None), "lib", None)
        try:
            for kind, h in reversed(getattr(self, "handles", [])):
                if d is not None and h:
                    getattr(d, f"dnnl_{kind}_destroy")(h)
        except (AttributeError, TypeError):       # at interpreter exit, ctypes may be gone before us
            pass
