"""The shared-memory registry in-process: keys, object kinds, peers, lifetimes, and reading into a batch."""
from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from kiln.serve.errors import BadRequest
from kiln.serve.shm import SHM_DIR, ShmRegistry, gather, grpc_peer_host, materialize, object_path

from _serve import run_async

if not os.path.isdir(SHM_DIR):
    pytest.skip("needs POSIX shared memory (/dev/shm)", allow_module_level=True)
LOCAL = "127.0.0.1"


@pytest.fixture
def obj():
    o = shared_memory.SharedMemory(f"kiln-unit-{uuid.uuid4().hex[:12]}", create=True, size=256)
    yield o
    o.close()
    o.unlink()


@pytest.mark.parametrize("key", ["/a/b", "a/b", "/..", "..", "/.", "/", "/x\0y", "//x", "/" + "n" * 256])
def test_keys_naming_anything_but_one_object_are_refused(key):
    with pytest.raises(BadRequest, match="not one POSIX shared-memory object name"):
        object_path(key)


def test_keys_map_into_dev_shm():
    assert object_path("/input0") == object_path("input0") == os.path.join(SHM_DIR, "input0")


def test_fifos_and_links_are_refused_without_blocking():
    """Opening a FIFO for reading would block the event loop forever; a link could lead out of /dev/shm."""
    base = os.path.join(SHM_DIR, f"kiln-unit-{uuid.uuid4().hex[:12]}")
    os.mkfifo(base + "-fifo")
    os.symlink("/etc/hostname", base + "-link")
    try:
        reg = ShmRegistry()
        with pytest.raises(BadRequest, match="is not a shared-memory object"):
            reg.register("f", "/" + os.path.basename(base) + "-fifo", 0, 8, LOCAL)
        with pytest.raises(BadRequest, match="Cannot open shared-memory object"):
            reg.register("l", "/" + os.path.basename(base) + "-link", 0, 8, LOCAL)
        assert reg.regions == {}
    finally:
        os.unlink(base + "-fifo")
        os.unlink(base + "-link")


@pytest.mark.parametrize("mode, peer, ok", [
    ("local", "127.0.0.1", True), ("local", "::1", True), ("local", "::ffff:127.0.0.1", True),
    ("local", "10.1.2.3", False), ("local", None, False), ("local", "not-an-address", False),
    ("any", "10.1.2.3", True), ("off", "127.0.0.1", False),
])
def test_who_may_use_the_extension(obj, mode, peer, ok):
    reg = ShmRegistry(mode)
    if ok:
        reg.register("r", "/" + obj.name, 0, 64, peer)
        assert reg.status(None, peer) == [{"name": "r", "key": "/" + obj.name, "offset": 0, "byte_size": 64}]
    else:
        with pytest.raises(BadRequest, match="--system-shm"):
            reg.register("r", "/" + obj.name, 0, 64, peer)
        assert reg.regions == {}


def test_grpc_peer_addresses():
    assert grpc_peer_host("ipv4:127.0.0.1:5001") == "127.0.0.1"
    assert grpc_peer_host("ipv6:[::1]:5001") == "::1"
    assert grpc_peer_host("unix:/tmp/sock") is None


def test_bad_offsets_and_sizes(obj):
    reg = ShmRegistry()
    for offset, size, words in [(-1, 8, "offset is a whole number"), (0, True, "byte_size is a whole number"),
                                (0, 0, "byte_size 0"), (200, 57, "which has 256"), (0, 1.5, "byte_size is a whole")]:
        with pytest.raises(BadRequest, match=words):
            reg.register("r", "/" + obj.name, offset, size, LOCAL)
    reg.register("r", "/" + obj.name, 200, 56, LOCAL)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": 52}
    with pytest.raises(BadRequest, match="lie outside shared-memory region 'r'"):
        reg.input(params, "Input 'x'", (2,), np.dtype("<f4"), LOCAL)
    with pytest.raises(BadRequest, match="give both"):
        reg.input({"shared_memory_region": "r"}, "Input 'x'", (2,), np.dtype("<f4"), LOCAL)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_unregistered_region_lives_until_its_request_is_done(obj):
    """A queued request holds its regions: unregistering them (even all of them) leaves the request's reads and
    writes working, and the descriptor closes once the request lets go."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=16)[...] = x
    fds = _fds()
    reg = ShmRegistry()
    reg.register("in", "/" + obj.name, 16, 48, LOCAL)
    reg.register("out", "/" + obj.name, 128, 128, LOCAL)
    params = {"shared_memory_region": "in", "shared_memory_byte_size": 48}
    tensor = reg.input(params, "Input 'x'", (3, 4), np.dtype("<f4"), LOCAL)
    slot = reg.output({"shared_memory_region": "out", "shared_memory_byte_size": 128}, "Output 'y'", LOCAL)
    assert _fds() == fds + 2
    reg.unregister(None, LOCAL)
    assert reg.regions == {}
    np.testing.assert_array_equal(tensor.array(), x)
    assert slot.write("y", x * 2) == {"shared_memory_region": "out", "shared_memory_byte_size": 48}
    np.testing.assert_array_equal(np.ndarray((3, 4), np.float32, buffer=obj.buf, offset=128), x * 2)
    del tensor, slot
    assert _fds() == fds


def test_gather_reads_each_part_once_into_the_batch(obj):
    """Arrays and shared-memory inputs of one dtype concatenate along rows, as np.concatenate would."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.standard_normal((n, 3)).astype(np.float32) for n in (2, 1, 3))
    np.ndarray(b.shape, b.dtype, buffer=obj.buf, offset=0)[...] = b
    np.ndarray(c.shape, c.dtype, buffer=obj.buf, offset=100)[...] = c
    reg = ShmRegistry()
    reg.register("r", "/" + obj.name, 0, 256, LOCAL)
    tb = reg.input({"shared_memory_region": "r", "shared_memory_byte_size": 12}, "b", (1, 3), np.dtype("<f4"), LOCAL)
    tc = reg.input({"shared_memory_region": "r", "shared_memory_byte_size": 36, "shared_memory_offset": 100}, "c",
                   (3, 3), np.dtype("<f4"), LOCAL)
    np.testing.assert_array_equal(gather([a, tb, tc]), np.concatenate([a, b, c]))
    feeds = materialize({"x": tc, "k": a})
    np.testing.assert_array_equal(feeds["x"], c)
    assert feeds["k"] is a


def test_shared_memory_inputs_are_read_straight_into_a_slab_slot(obj):
    """A front end puts a shared-memory input into its slab slot with one read (no array of its own first); the
    engine process's view of the slot, or of the record when no slot is free, holds the region's bytes, beside an
    ordinary array; a region shrunk under the request is the request's error, and the front end's slot is free
    again."""
    from kiln.serve import ipc
    from kiln.serve.frontend import EngineLink
    from kiln.serve.model import ModelOptions, ServedModel

    rng = np.random.default_rng(7)
    x, k = rng.standard_normal((2, 5)).astype(np.float32), np.array([[3], [-4]], np.int64)
    np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=24)[...] = x
    reg = ShmRegistry()
    reg.register("in", "/" + obj.name, 24, 40, LOCAL)
    tensor = reg.input({"shared_memory_region": "in", "shared_memory_byte_size": 40}, "x", (2, 5), np.dtype("<f4"),
                       LOCAL)
    dtypes = {"x": np.dtype("<f4"), "k": np.dtype("<i8")}
    slab = ipc.Slab(slots=2, slot_bytes=128)
    try:
        slab.slot(1)[:] = b"\xff" * 128
        for slot_no in (1, None):                       # through the slot; in the record (no free slot)
            rec = ipc.Request(memoryview(ipc.request_record(9, "m", None, slot_no, {"x": tensor, "k": k},
                                                            None if slot_no is None else slab.slot(slot_no))))
            assert rec.slot == (-1 if slot_no is None else slot_no)
            got = rec.arrays(dtypes, slab)
            np.testing.assert_array_equal(got["x"], x)
            np.testing.assert_array_equal(got["k"], k)
            del got

        class Channel:                                  # nothing may be sent for a request that failed
            def add(self, record):
                raise AssertionError("a request whose input could not be read was sent")

        spec = type("Spec", (), {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 5]}],
                                 "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 5]}],
                                 "profiles": [], "device": "cpu"})()
        link = EngineLink(slab)
        link.channel = Channel()
        os.truncate(os.path.join(SHM_DIR, obj.name), 32)   # the client shrinks its object under the request
        with pytest.raises(BadRequest, match="which has 32"):
            run_async(link.infer(ServedModel("m", spec, ModelOptions()), {"x": tensor}, None))
        assert sorted(slab.free) == [0, 1] and link.infers == {}
    finally:
        del tensor
        slab.close()


def test_without_a_registry_shared_memory_is_refused(repo):
    """The Ray Serve deployment decodes with no registry: a region name is an error, not ignored."""
    import json

    import kiln
    from kiln.serve.model import ModelOptions, ServedModel
    from kiln.serve.protocol import decode_http
    model = ServedModel("mlp", kiln.load(str(repo[0] / "mlp.kiln")), ModelOptions())
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "parameters": {
        "shared_memory_region": "r", "shared_memory_byte_size": 32}}]}).encode()
    with pytest.raises(BadRequest, match="has no system shared memory"):
        decode_http(model, body, None)


@pytest.mark.parametrize("mode, advertised", [("local", True), ("any", True), ("off", False)])
def test_extension_advertised_unless_off(mode, advertised):
    from kiln.serve.core import ServerCore
    assert ("system_shared_memory" in ServerCore(None, None, mode).server_metadata()["extensions"]) == advertised


def test_region_count_is_bounded(obj, monkeypatch):
    import kiln.serve.shm as shm_mod
    monkeypatch.setattr(shm_mod, "MAX_REGIONS", 2)
    reg = ShmRegistry()
    reg.register("a", "/" + obj.name, 0, 8, LOCAL)
    reg.register("b", "/" + obj.name, 8, 8, LOCAL)
    with pytest.raises(BadRequest, match="2 shared-memory regions are registered"):
        reg.register("c", "/" + obj.name, 16, 8, LOCAL)
    reg.unregister("a", LOCAL)
    reg.register("c", "/" + obj.name, 16, 8, LOCAL)
    assert sorted(reg.regions) == ["b", "c"]


def test_batcher_reads_queued_inputs_after_their_region_is_unregistered(obj):
    """Requests queued behind a running batch hold their region: unregistering every region meanwhile leaves
    their inputs readable, and the batcher merges them straight from shared memory."""
    import asyncio

    from test_serve_batcher import FakeEngine, FakeInstance, expected

    from kiln.serve.batcher import Batcher
    from kiln.serve.metrics import ModelStats
    from kiln.serve.model import ModelOptions, ServedModel
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (2, 3, 1)]
    for i, x in enumerate(xs):
        np.ndarray(x.shape, x.dtype, buffer=obj.buf, offset=64 * i)[...] = x
    fds = _fds()
    reg = ShmRegistry()
    reg.register("r", "/" + obj.name, 0, 256, LOCAL)
    tensors = [reg.input({"shared_memory_region": "r", "shared_memory_byte_size": x.nbytes,
                          "shared_memory_offset": 64 * i}, "x", x.shape, np.dtype("<f4"), LOCAL)
               for i, x in enumerate(xs)]
    model = ServedModel("fake", FakeEngine(), ModelOptions())
    inst = FakeInstance(delay=0.3)

    async def main():
        batcher = Batcher(model, [inst], ModelStats())
        submit = [lambda t=t: batcher.infer({"x": t}, *model.check_request({"x": t})[:2], None) for t in tensors]
        first = asyncio.create_task(submit[0]())
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(s()) for s in submit[1:]]
        for _ in range(3):
            await asyncio.sleep(0)
        depth = batcher.depth
        reg.unregister(None, LOCAL)
        out = await asyncio.gather(first, *rest)
        await batcher.close()
        return depth, out
    depth, out = run_async(main())
    assert depth >= 2 and reg.regions == {}
    for x, r in zip(xs, out):
        np.testing.assert_array_equal(r["y"], expected(x))
    assert sum(inst.batches) == 6 and len(inst.batches) < 3, inst.batches      # the queued two ran merged
    tensors = out = None                 # drop the views on the region before counting descriptors
    assert _fds() == fds
