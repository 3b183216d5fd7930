"""Shared checks for the format readers: detection, damaged files, headless export."""
from __future__ import annotations

import importlib.util
import os
import random
import signal
import tracemalloc
from pathlib import Path

import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import detect, open_model
from kiln.viewer.graph import ViewModel

_MEMORY_LIMIT = 64 << 20   # a damaged file may not make a reader allocate more than this
_TIME_LIMIT = 20           # seconds; a reader must never hang


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def bounded_open(path: Path) -> ViewModel | ViewerError:
    """Open ``path`` under a time and allocation bound; return the model or the ViewerError."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(_TIME_LIMIT)
    tracemalloc.start()
    try:
        model = open_model(path)
        for g in model.graphs:
            for w in list(g.weights.values())[:50]:
                if w.load is not None:
                    try:
                        w.load()
                    except ViewerError:
                        pass
        return model
    except ViewerError as exc:
        return exc
    except _Hang:
        pytest.fail(f"opening damaged {path.name} did not finish within {_TIME_LIMIT}s")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        assert peak < _MEMORY_LIMIT, f"opening {path.name} allocated {peak >> 20} MiB"


def check_damaged(good: Path, tmp_path: Path, magic_len: int, *, strict_random: bool = True,
                  cuts: tuple[float | int, ...] = (0.5, 0.9), seeds: int = 3) -> None:
    """Truncated copies and random bytes after the magic: a ViewerError, never a crash or hang."""
    data = good.read_bytes()
    for cut in cuts:   # a fraction of the file, or (int) a byte count to drop from the end
        keep = len(data) - cut if isinstance(cut, int) else int(len(data) * cut)
        bad = tmp_path / f"trunc{keep}_{good.name}"
        bad.write_bytes(data[:keep])
        result = bounded_open(bad)
        assert isinstance(result, ViewerError), f"truncated {bad.name} opened without an error"
        assert "\n" not in str(result)
    for seed in range(seeds):
        rnd = random.Random(seed)
        bad = tmp_path / f"rand{seed}_{good.name}"
        bad.write_bytes(data[:magic_len] + rnd.randbytes(max(256, len(data) - magic_len)))
        result = bounded_open(bad)
        if strict_random:
            assert isinstance(result, ViewerError), f"random {bad.name} opened without an error"
        if isinstance(result, ViewerError):
            assert "\n" not in str(result)


def check_detect(good: Path, tmp_path: Path, fmt_name: str, misleading: str = ".bin") -> None:
    """The format is found from content even under a misleading name."""
    other = tmp_path / f"renamed{misleading}"
    other.write_bytes(good.read_bytes())
    assert detect(other).name == fmt_name
    assert open_model(other).format


def check_export(model: ViewModel, tmp_path: Path) -> None:
    """Headless export renders the model to SVG.

    Uses ``kiln.viewer.export.export_svg(model, path)``; until that lands, the
    export module's current ``export(page, panes, out)`` or, failing that, the
    page builder it draws from.
    """
    out = tmp_path / "model.svg"
    export = None
    if importlib.util.find_spec("kiln.viewer.export") is not None:
        import kiln.viewer.export as export
    if export is not None and hasattr(export, "export_svg"):
        export.export_svg(model, out)
    elif importlib.util.find_spec("kiln.viewer.page") is not None:
        from kiln.viewer import page

        pane = page.build_pane(model)
        data = getattr(pane, "data", pane)
        try:   # the page API is settling: panes as Pane objects or as their dicts
            doc = page.page_json([pane])
        except (AttributeError, TypeError):
            doc = page.page_json([data])
        if export is not None and hasattr(export, "export"):
            export.export(doc, [pane], out)
        else:
            text = page.dumps(doc)
            assert not model.graph.nodes or model.graph.nodes[0].name in text
            return
    else:
        pytest.skip("kiln.viewer.export (headless export) is not written yet")
    assert "<svg" in out.read_text()


def edges(graph) -> set[tuple[str, str]]:
    """(producer node name, consumer node name) pairs joined by a tensor."""
    producer = {v: n.name for n in graph.nodes for a in n.outputs for v in a.values}
    return {(producer[v], n.name) for n in graph.nodes for a in n.inputs for v in a.values if v in producer}


def node(graph, name: str):
    for n in graph.nodes:
        if n.name == name:
            return n
    raise AssertionError(f"no node {name!r}; nodes are {[n.name for n in graph.nodes]}")


def input_weight(graph, n, arg: str):
    """The weight feeding argument ``arg`` of node ``n``."""
    for a in n.inputs:
        if a.name == arg:
            return graph.weights[a.values[0]]
    raise AssertionError(f"{n.name} has no input {arg!r}; it has {[a.name for a in n.inputs]}")


os.environ.setdefault("KERAS_BACKEND", "torch")
