"""`kiln serve --event-loop`: the front-end processes on asyncio's own loop or uvloop answer alike; the choice
is refused in one line where uvloop is missing."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import threading

import numpy as np
import pytest
from _serve import ServerProcess, triton_client

from kiln.errors import KilnError
from kiln.serve import cli
from kiln.serve.frontend import loop_runner

httpclient = triton_client("tritonclient.http")
grpcclient = triton_client("tritonclient.grpc")
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_loop_runner_picks_the_loop_asked_for():
    assert loop_runner("asyncio") is asyncio.run
    if HAVE_UVLOOP:
        import uvloop
        assert loop_runner("auto") is uvloop.run and loop_runner("uvloop") is uvloop.run

        async def kind() -> str:
            return type(asyncio.get_running_loop()).__module__
        # on a thread of its own: an earlier test in this worker may have left its thread's loop marked running
        found: list[str] = []
        worker = threading.Thread(target=lambda: found.append(loop_runner("auto")(kind())))
        worker.start()
        worker.join(30)
        assert found and found[0].startswith("uvloop"), found
    else:
        assert loop_runner("auto") is asyncio.run
    with pytest.raises(ValueError, match="one of"):
        loop_runner("trio")


def test_uvloop_asked_for_but_missing_is_one_line(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--frontends", "2", "--event-loop", "uvloop"])
    with pytest.raises(KilnError, match=r"needs the uvloop package: pip install uvloop, or use --event-loop asyncio"):
        cli.run(args)


def test_frontends_on_asyncios_own_loop_answer_like_the_reference(repo):
    """The default (uvloop where installed) is what test_serve_frontends runs; this is the other loop."""
    root, mlp = repo
    server = ServerProcess(root, "--frontends", "2", "--event-loop", "asyncio")
    try:
        rng = np.random.default_rng(11)
        for rows in (1, 3):
            x = rng.standard_normal((rows, 8)).astype(np.float32)
            g = grpcclient.InferenceServerClient(server.grpc)
            gi = grpcclient.InferInput("x", [rows, 8], "FP32")
            gi.set_data_from_numpy(x)
            mlp.check(x, g.infer("mlp", [gi]).as_numpy("y"))
            g.close()
            h = httpclient.InferenceServerClient(server.http)
            hi = httpclient.InferInput("x", [rows, 8], "FP32")
            hi.set_data_from_numpy(x, binary_data=True)
            mlp.check(x, h.infer("mlp", [hi]).as_numpy("y"))
            h.close()
    finally:
        assert server.stop() == 0, server.stderr()[-2000:]
    assert "Traceback" not in server.stderr()
