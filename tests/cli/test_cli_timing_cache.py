"""The timing cache file: a recognizable format, never overwriting a file that is not one, and
timings remembered by CPU builds too (layers with several valid tactics are timed there)."""
from __future__ import annotations

import json
import os

import pytest
from _cli import assert_user_error, kiln, snapshot

from kiln.builder.timing_cache import FORMAT, VERSION, TimingCache
from kiln.kernels.cpu_threads import usable_cores
from kiln.kernels.dnnl_api import library
from kiln.errors import BuildError


def test_a_file_that_is_no_cache_is_refused_and_kept(models, tmp_path):
    (tmp_path / "notes.txt").write_text("meeting notes, not a cache\n")
    (tmp_path / "other.json").write_text('{"version": 3, "data": [1, 2]}')
    before = snapshot(tmp_path)
    for name in ("notes.txt", "other.json"):
        r = kiln("build", models("lstm"), "-o", "o.kiln", "--device", "cpu", "--timing-cache", name, cwd=tmp_path)
        assert_user_error(r, f"Timing cache '{name}' is not a Kiln timing cache", "will not overwrite")
    assert snapshot(tmp_path) == before


def test_cpu_builds_remember_timings(models, tmp_path):
    """First build: the LSTM's three CPU tactics are timed and written with the format marker (and, on more than
    one thread, its chosen tactic on 1 and on all threads: builder/tactics.py select_threads). Second build: every
    timed layer is a cache hit."""
    cache = tmp_path / "lstm.timing"
    cache.write_bytes(b"")                                   # an empty file is a new cache
    r = kiln("build", models("lstm"), "-o", tmp_path / "a.kiln", "--device", "cpu", "-q", "--timing-cache", cache)
    assert r.returncode == 0, r.stderr
    assert cache.read_bytes().startswith(b'{"format": "kiln-timing-cache", "version": 2')
    entries = json.loads(cache.read_text())["entries"]
    threads = [k for k in entries if "|threads:" in k]
    assert len(threads) == (1 if usable_cores() > 1 else 0)
    (times,) = [v for k, v in entries.items() if k not in threads]
    onednn = {"onednn_lstm"} if library() is not None else set()          # kernels/cpu_dnnl_rnn.py, where installed
    assert set(times) == {"torch", "fused_lstm", "lstm_steps"} | onednn and all(0 < ms < float("inf") for ms in
                                                                                times.values())
    r = kiln("build", models("lstm"), "-o", tmp_path / "b.kiln", "--device", "cpu", "-q", "--timing-cache", cache)
    assert r.returncode == 0, r.stderr
    header = json.loads(kiln("inspect", tmp_path / "b.kiln", "--json").stdout)
    assert header["build"]["timing_cache"] == {"hits": 1 + len(threads), "misses": 0}
    assert sorted(os.listdir(tmp_path)) == ["a.kiln", "b.kiln", "lstm.timing"]       # no temporary files left


def test_cache_file_round_trip_and_merge(tmp_path):
    path = str(tmp_path / "c.timing")
    first = TimingCache(path)                      # a missing file: empty, created on save
    first.put("k1", {"torch": 1.5, "fused": float("inf")})
    first.save()
    second = TimingCache(path)
    assert second.get("k1") == {"torch": 1.5, "fused": float("inf")} and second.hits == 1
    first.put("k2", {"torch": 2.0})
    second.put("k3", {"torch": 3.0})
    first.save()
    second.save()                                  # keeps what the other build wrote meanwhile
    data = json.loads(open(path).read())
    assert data["format"] == FORMAT and data["version"] == VERSION and sorted(data["entries"]) == ["k1", "k2", "k3"]
    assert sorted(os.listdir(tmp_path)) == ["c.timing"]


def test_cache_versions(tmp_path):
    legacy = tmp_path / "legacy.timing"          # written by Kiln before the format marker
    legacy.write_text(json.dumps({"version": 1, "entries": {"k": {"torch": 1.0}, "bad": {"torch": "x"}}}))
    assert TimingCache(str(legacy)).entries == {"k": {"torch": 1.0}}        # malformed entries are dropped
    newer = tmp_path / "newer.timing"
    newer.write_text(json.dumps({"format": FORMAT, "version": VERSION + 1, "entries": {}}))
    with pytest.raises(BuildError, match="newer than this Kiln"):
        TimingCache(str(newer))
    binary = tmp_path / "model.onnx"
    binary.write_bytes(b"\x08\x07\x12\x04kiln" + bytes(range(256)))
    with pytest.raises(BuildError, match="not a Kiln timing cache"):
        TimingCache(str(binary))
    with pytest.raises(BuildError, match="does not exist"):
        TimingCache(str(tmp_path / "missing" / "c.timing"))
