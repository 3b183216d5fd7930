"""The front-end/engine link's pieces: tensors through a slab slot or the message, checked descriptors,
errors from a closed table, metrics summed over processes."""
from __future__ import annotations

import os

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


def test_tensors_that_fit_go_through_the_slot_and_come_back_equal(slab):
    a = arrays()
    descs, payload = ipc.pack(a, slab.slot(1), ["a", "b"])
    assert payload == b"" and [d["offset"] for d in descs] == [0, 48]
    other = ipc.Slab(os.dup(slab.fd), 2, 256)            # the other process's mapping of the same memory
    got = ipc.unpack(descs, DTYPES, other.slot(1), payload)
    for n in a:
        np.testing.assert_array_equal(got[n], a[n])
        assert got[n].dtype == DTYPES[n]
    copied = ipc.unpack(descs, DTYPES, other.slot(1), payload, copy=True)
    slab.slot(1)[:8] = bytes(8)                          # the slot is refilled: a copy keeps its values
    np.testing.assert_array_equal(copied["a"], a["a"])
    assert got["a"][0, 0] == 0 and got["a"][0, 1] == 0  # a view sees the new bytes
    del got, copied
    other.close()


def test_tensors_too_large_for_a_slot_travel_in_the_message(slab):
    big = {"a": np.arange(100, dtype=np.float32).reshape(25, 4), "b": np.array([[1, 2]], np.int64)}
    descs, payload = ipc.pack(big, slab.slot(0), ["a", "b"])
    assert len(payload) == 400 + 16
    got = ipc.unpack(descs, DTYPES, slab.slot(0), payload)
    np.testing.assert_array_equal(got["a"], big["a"])
    np.testing.assert_array_equal(got["b"], big["b"])
    descs, payload = ipc.pack(arrays(), None, ["a", "b"])     # no free slot
    np.testing.assert_array_equal(ipc.unpack(descs, DTYPES, None, payload)["b"], arrays()["b"])


@pytest.mark.parametrize("descs, why", [
    ([{"name": "zz", "shape": [1], "offset": 0}], "unknown tensor"),
    ([{"name": "a", "shape": [1000], "offset": 0}], "outside its buffer"),
    ([{"name": "a", "shape": [2], "offset": 250}], "outside its buffer"),
    ([{"name": "a", "shape": [-1], "offset": 0}], "malformed"),
    ([{"name": "a", "shape": [2], "offset": -4}], "malformed"),
    ([{"name": "a", "shape": "2", "offset": 0}], "malformed"),
    ({"name": "a"}, "not a list"),
])
def test_descriptors_are_checked_against_the_buffer(slab, descs, why):
    with pytest.raises(ConnectionError, match=why):
        ipc.unpack(descs, DTYPES, slab.slot(0), b"")


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
