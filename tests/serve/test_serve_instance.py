"""The capture lock: runs that may record a CUDA graph run alone; replays share."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from kiln.serve.instance import SharedExclusiveLock, may_record


def test_exclusive_waits_for_shared_holders_and_blocks_new_ones():
    lock = SharedExclusiveLock()
    events: list[str] = []
    inside = threading.Event()

    def reader(tag: str, hold: float) -> None:
        with lock.shared():
            events.append(f"{tag}+")
            inside.set()
            time.sleep(hold)
            events.append(f"{tag}-")

    def writer() -> None:
        with lock.exclusive():
            events.append("W+")
            time.sleep(0.05)
            events.append("W-")
    r1 = threading.Thread(target=reader, args=("r1", 0.2))
    r1.start()
    inside.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    r2 = threading.Thread(target=reader, args=("r2", 0.0))    # arrives while the writer waits: goes after it
    r2.start()
    for t in (r1, w, r2):
        t.join(5)
    assert events == ["r1+", "r1-", "W+", "W-", "r2+", "r2-"], events


def test_may_record_until_the_bound_graph_exists():
    runner = SimpleNamespace(graphs={})
    shapes = ((4, 3, 8, 8),)
    assert may_record(runner, shapes)                                   # never seen: records
    runner.graphs[(((4, 3, 8, 8), "float16"),)] = {"graph": 1}
    assert may_record(runner, shapes)                                   # the bound graph is still to come
    runner.graphs[(((4, 3, 8, 8), "float16"),)]["bound"] = {"graph": 2}
    assert not may_record(runner, shapes)                               # replays only
    runner.graphs[(((4, 3, 8, 8), "float16"),)]["bound"]["where"] = ("here",)
    assert not may_record(runner, shapes, ("here",))                    # bound to these buffers: replays
    assert may_record(runner, shapes, ("elsewhere",))                   # other buffers: may bind anew
    assert may_record(runner, ((2, 3, 8, 8),))
    assert not may_record(None, shapes)                                 # eager context: never records
    assert may_record(SimpleNamespace(graphs=None), shapes)             # unknown layout: assume it may
