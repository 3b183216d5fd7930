"""The front-end/engine link's pieces: tensors through a slab slot or the message, checked descriptors,
errors from a closed table, metrics summed over processes."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from kiln.serve import errors, ipc
from kiln.serve.metrics import Metrics


@pytest.fixture
def slab():
    s = ipc.Slab(slots=2, slot_bytes=256)
    yield s
    s.close()


def arrays():
    return {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([[7, -8]], np.int64)}


DTYPES = {"a": np.dtype("<f4"), "b": np.dtype("<i8")}


def raw_request(tensors: list[tuple[bytes, list[int], int]], slot: int = 0, payload: bytes = b"", model: bytes = b"m",
                timeout: float = 0.0, count: int | None = None, extra: bytes = b"") -> memoryview:
    """A request record written by hand: (name, shape, offset) per tensor."""
    descs = b"".join(ipc.TENSOR.pack(len(n), len(shape), off) + n + struct.pack(f"<{len(shape)}q", *shape)
                     for n, shape, off in tensors) + extra
    size = ipc.REQUEST.size + len(model) + len(descs) + len(payload)
    return memoryview(ipc.REQUEST.pack(size, 5, timeout, slot, len(model), len(tensors) if count is None else count,
                                       len(payload)) + model + descs + payload)


def test_tensors_that_fit_go_through_the_slot_and_come_back_equal(slab):
    a = arrays()
    req = ipc.Request(memoryview(ipc.request_record(3, "m", 0.5, 1, a, slab.slot(1))))
    assert (req.id, req.model, req.timeout_s, req.slot, req.end) == (3, "m", 0.5, 1, len(req.rec))   # no payload
    other = ipc.Slab(os.dup(slab.fd), 2, 256)            # the other process's mapping of the same memory
    got = req.arrays(DTYPES, other)
    for n in a:
        np.testing.assert_array_equal(got[n], a[n])
        assert got[n].dtype == DTYPES[n]
    answer = ipc.Answer(memoryview(ipc.answer_record(3, a, other.slot(1))))
    copied = answer.arrays(DTYPES, slab.slot(1))
    assert answer.error() is None and answer.id == 3
    slab.slot(1)[:8] = bytes(8)                          # the slot is refilled: a copy keeps its values
    np.testing.assert_array_equal(copied["a"], a["a"])
    assert got["a"][0, 0] == 0 and got["a"][0, 1] == 0  # a view sees the new bytes
    del got, copied
    other.close()


def test_tensors_too_large_for_a_slot_travel_in_the_record(slab):
    big = {"a": np.arange(100, dtype=np.float32).reshape(25, 4), "b": np.array([[1, 2]], np.int64)}
    rec = ipc.request_record(4, "m", None, 0, big, slab.slot(0))
    req = ipc.Request(memoryview(rec))
    assert req.slot == -1 and req.timeout_s is None and len(rec) - req.end == 400 + 16
    got = req.arrays(DTYPES, slab)
    np.testing.assert_array_equal(got["a"], big["a"])
    np.testing.assert_array_equal(got["b"], big["b"])
    assert got["a"].flags.writeable                      # the engine takes it without a converting copy
    answer = ipc.Answer(memoryview(ipc.answer_record(4, big, slab.slot(0))))
    np.testing.assert_array_equal(answer.arrays(DTYPES, slab.slot(0))["a"], big["a"])
    req = ipc.Request(memoryview(ipc.request_record(5, "m", None, None, arrays(), None)))     # no free slot
    np.testing.assert_array_equal(req.arrays(DTYPES, slab)["b"], arrays()["b"])


@pytest.mark.parametrize("rec, why", [
    (raw_request([(b"zz", [1], 0)]), "unknown or repeated"),
    (raw_request([(b"a", [2], 0), (b"a", [2], 8)]), "unknown or repeated"),
    (raw_request([(b"a", [1000], 0)]), "outside its buffer"),
    (raw_request([(b"a", [2], 250)]), "outside its buffer"),
    (raw_request([(b"a", [2], 0)], slot=-1), "outside its buffer"),           # no slot, no payload
    (raw_request([(b"a", [4], 0)], slot=-1, payload=bytes(8)), "outside its buffer"),
    (raw_request([(b"a", [-1], 0)]), "has shape"),
    (raw_request([(b"a", [2], 0)], slot=2), "outside the slab"),
    (raw_request([(b"a", [2], 0)], slot=-7), "outside the slab"),
    (raw_request([(b"\xff", [2], 0)]), "not UTF-8"),
    (raw_request([(b"a", [2], 0)], count=2), "shorter than its tensor"),
    (raw_request([(b"a", [2], 0)], extra=b"junk"), "end at"),
])
def test_tensor_descriptors_are_checked_against_the_buffer(slab, rec, why):
    for layouts in (None, {}):
        with pytest.raises(ConnectionError, match=why):
            ipc.Request(rec).arrays(DTYPES, slab, layouts)
        assert not layouts or why == "outside its buffer"   # only descriptors that passed are kept


def test_checked_descriptors_are_kept_but_every_buffer_is_still_checked(slab):
    layouts: dict = {}
    got = ipc.Request(raw_request([(b"a", [2], 4)])).arrays(DTYPES, slab, layouts)
    assert got["a"].shape == (2,) and len(layouts) == 1
    slab.slot(0)[4:12] = np.array([1.5, -2], np.float32).tobytes()
    np.testing.assert_array_equal(ipc.Request(raw_request([(b"a", [2], 4)])).arrays(DTYPES, slab, layouts)["a"],
                                  [1.5, -2])
    with pytest.raises(ConnectionError, match="outside its buffer"):   # the same descriptors, a shorter buffer
        ipc.Request(raw_request([(b"a", [2], 4)], slot=-1, payload=bytes(8))).arrays(DTYPES, slab, layouts)
    assert len(layouts) == 1


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0])
def test_a_timeout_that_is_not_a_duration_is_refused(timeout):
    with pytest.raises(ConnectionError, match="timeout"):
        ipc.Request(raw_request([(b"a", [2], 0)], timeout=timeout))


def test_a_record_running_past_its_frame_breaks_the_frame():
    good = bytes(raw_request([(b"a", [2], 0)]))
    assert [len(r) for r in ipc.records(bytearray(good * 2), ipc.REQUEST)] == [len(good)] * 2
    for body, why in ((good + good[:-1], "a record of"), (good + good[:3], "inside a record's length"),
                      (struct.pack("<I", 4) + bytes(40), "a record of")):
        with pytest.raises(ConnectionError, match=why):
            list(ipc.records(bytearray(body), ipc.REQUEST))


def test_errors_come_back_as_their_own_kind_and_unknown_kinds_as_internal():
    for exc in (errors.BadRequest("bad"), errors.Unavailable("full"), errors.DeadlineExceeded("late")):
        back = ipc.error_from(ipc.error_message(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert type(ipc.error_from({"type": "SystemExit", "message": "x"})) is errors.InternalError
    assert type(ipc.error_from("nonsense")) is errors.InternalError


def test_metrics_from_several_processes_sum():
    a, b = Metrics(), Metrics()
    a.model("m").requests["http"] += 3
    b.model("m").requests["http"] += 4
    b.model("m").requests["grpc"] += 1
    a.model("m").failures["bad_request"] += 2
    b.model("m").batch_size.observe(8)
    a.model("m").batch_size.observe(1)
    b.model("m").compute_seconds.observe(0.002)
    b.unknown_model_failures["grpc"] += 5
    total = Metrics()
    total.add(a.snapshot())
    total.add(b.snapshot())
    s = total.model("m")
    assert s.requests == {"http": 7, "grpc": 1} and s.failures == {"bad_request": 2}
    assert s.batch_size.count == 2 and s.batch_size.total == 9 and s.compute_seconds.count == 1
    assert total.unknown_model_failures["grpc"] == 5
    text = total.render()
    assert 'kiln_requests_total{model="m",protocol="http"} 7' in text
    assert 'kiln_batch_size_bucket{model="m",le="8"} 2' in text and 'kiln_batch_size_bucket{model="m",le="1"} 1' in text
