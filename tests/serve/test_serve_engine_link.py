"""The engine process's side of `--frontends` (kiln.serve.frontends.Link) fed raw frames over a socketpair: several
requests in one frame each answered on its own, malformed records answered with an error, broken frames closing the
connection, timeouts and cancels answered at once."""
from __future__ import annotations

import asyncio
import json
import socket
import struct

import numpy as np
import pytest
from _serve import run_async

from kiln.serve import frontends, ipc
from kiln.serve.errors import InternalError
from kiln.serve.model import ModelOptions
from kiln.serve.server import ServeConfig, load_repository

OUT = {"y": np.dtype(np.float32)}


class Peer:
    """The test's end of the socketpair: a stand-in front end writing raw frames and reading answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slab: ipc.Slab) -> None:
        self.reader, self.writer, self.slab = reader, writer, slab

    def send(self, kind: int, body: bytes) -> None:
        self.writer.write(ipc.HEAD.pack(kind, len(body)) + body)

    async def answers(self, n: int) -> dict[int, ipc.Answer]:
        """The next ``n`` answer records, by request id (control messages skipped)."""
        got: dict[int, ipc.Answer] = {}
        while len(got) < n:
            kind, size = ipc.HEAD.unpack(await self.reader.readexactly(ipc.HEAD.size))
            body = bytearray(await self.reader.readexactly(size))
            if kind == ipc.RECORDS:
                for rec in ipc.records(body, ipc.ANSWER):
                    answer = ipc.Answer(rec)
                    got[answer.id] = answer
        return got

    def outputs(self, answer: ipc.Answer, slot: int | None) -> np.ndarray:
        assert answer.error() is None, answer.error()
        return answer.arrays(OUT, None if slot is None else self.slab.slot(slot))["y"]


async def with_link(folder, body, **options):
    """Runs ``body(peer, repo)`` against a Link over the repository's engines (mlp: x [N,8] -> y [N,4])."""
    repo = await load_repository(ServeConfig(path=str(folder), frontends=2, model=ModelOptions(**options)))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    slab = ipc.Slab(slots=4, slot_bytes=4096)
    link = frontends.Link(0, None, slab, repo, [])          # type: ignore[arg-type]
    link.links.append(link)
    await link.open(ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        return await body(Peer(reader, writer, slab), repo, link)
    finally:
        writer.close()
        link.channel.close()
        await repo.close()
        del link
        slab.close()


def request(n: int, x: np.ndarray, slot: int | None, slab: ipc.Slab, model: str = "mlp", timeout: float | None = None):
    return ipc.request_record(n, model, timeout, slot, {"x": x}, None if slot is None else slab.slot(slot))


def test_a_frame_of_several_requests_is_answered_request_by_request(repo):
    folder, mlp = repo
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((rows, 8)).astype(np.float32) for rows in (1, 3, 2)]

    async def body(peer, repo_, link):
        records = [request(10, xs[0], 0, peer.slab), request(11, xs[1], None, peer.slab),     # in the record
                   request(12, xs[2], 2, peer.slab),
                   request(13, xs[0], 3, peer.slab, model="nosuch")]
        bad = bytearray(request(14, xs[0], 1, peer.slab))
        struct.pack_into("<i", bad, 20, 99)                  # its slot: outside the slab
        peer.send(ipc.RECORDS, b"".join(records[:2]) + bytes(bad) + b"".join(records[2:]))
        got = await peer.answers(5)
        stats = repo_.metrics.model("mlp").batch_size
        return ({k: (peer.outputs(got[k], s) if got[k].error() is None else got[k].error())
                 for k, s in ((10, 0), (11, None), (12, 2), (13, 3), (14, 1))}, (stats.count, stats.total), link)

    got, (batches, rows), link = run_async(with_link(folder, body, max_queue_delay_us=20000))
    for k, x in ((10, xs[0]), (11, xs[1]), (12, xs[2])):
        mlp.check(x, got[k])
    assert type(got[13]).__name__ == "NotFound" and "nosuch" in str(got[13])
    assert type(got[14]).__name__ == "InternalError" and "outside the slab" in str(got[14])
    assert (batches, rows) == (1, 6)                         # the frame's requests were queued together
    assert not link.requests                                 # nothing left held for the front end


@pytest.mark.parametrize("frame", [
    ipc.HEAD.pack(ipc.JSON, 2) + b"[]",                                          # not an object
    ipc.HEAD.pack(ipc.JSON, 3) + b"{x:",                                         # not JSON
    ipc.HEAD.pack(7, 0),                                                         # an unknown kind
    ipc.HEAD.pack(7, 1 << 31),                             # an unknown kind: refused before its body comes
    ipc.HEAD.pack(ipc.RECORDS, 8) + struct.pack("<I", 500) + bytes(4),           # a record past its frame
])
def test_a_broken_frame_closes_the_connection(repo, frame):
    folder, _ = repo

    async def body(peer, repo_, link):
        peer.writer.write(frame)
        return await asyncio.wait_for(peer.reader.read(), 30), await asyncio.wait_for(link.channel.closed, 30)

    assert run_async(with_link(folder, body)) == (b"", None)   # end of file: the front end would exit


def test_a_timeout_and_a_cancel_are_answered_at_once_and_the_slot_stays_untouched(repo):
    folder, mlp = repo
    x = np.ones((1, 8), np.float32)

    async def body(peer, repo_, link):
        peer.send(ipc.RECORDS, request(1, x, 0, peer.slab, timeout=0.001) + request(2, x, 1, peer.slab))
        peer.send(ipc.JSON, json.dumps({"op": "cancel", "id": 2}).encode())
        got = await peer.answers(2)
        before = bytes(peer.slab.slot(0)[:64]), bytes(peer.slab.slot(1)[:64])
        repo_.loaded["mlp"].batcher.hurry()                        # no more queue delay
        peer.send(ipc.RECORDS, request(3, x, 2, peer.slab))        # the queue still works
        y = peer.outputs((await peer.answers(1))[3], 2)
        return got, before, y, repo_.loaded["mlp"].batcher.depth

    # a 10 s queue delay: without the timeout and the cancel both would wait in the queue
    got, before, y, depth = run_async(with_link(folder, body, max_queue_delay_us=10_000_000))
    assert type(got[1].error()).__name__ == "DeadlineExceeded"
    assert type(got[2].error()).__name__ == "Unavailable" and "cancelled" in str(got[2].error())
    assert before == (x.tobytes() + bytes(32), x.tobytes() + bytes(32))   # no outputs written for them
    mlp.check(x, y)
    assert depth == 0


def test_answers_for_a_front_end_that_has_gone_are_dropped_quietly(repo):
    folder, _ = repo
    x = np.ones((1, 8), np.float32)

    async def body(peer, repo_, link):
        loop, failures = asyncio.get_running_loop(), []
        loop.set_exception_handler(lambda _, context: failures.append(context))
        peer.send(ipc.RECORDS, request(1, x, 0, peer.slab))
        await peer.answers(1)
        peer.writer.close()
        await asyncio.wait_for(link.channel.closed, 30)
        link.channel.add(ipc.error_record(2, InternalError("late")))     # as a batch finishing now would
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionError):
            link.channel.send_json({"op": "models"})                      # a control call is told at once
        return failures

    assert run_async(with_link(folder, body)) == []
