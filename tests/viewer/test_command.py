"""`kiln view`: headless export and one-line errors (exit 2) for files it cannot show."""
from __future__ import annotations

import json
import re

import pytest

from kiln.viewer import command, view
from kiln.viewer.export import html_document


def run(capsys, *argv) -> tuple[int, str, str]:
    code = command.main(["view", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_svg(capsys, yolo_path, tmp_path):
    out = tmp_path / "yolo.svg"
    code, stdout, _ = run(capsys, yolo_path, "--export", out)
    assert code == 0 and "wrote" in stdout
    svg = out.read_text()
    assert svg.startswith("<svg") and svg.count('class="node ') == 217 and "model.24" in svg
    assert "<style>" in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")


def test_export_lr_differs(capsys, yolo_path, tmp_path):
    run(capsys, yolo_path, "--export", tmp_path / "tb.svg")
    run(capsys, yolo_path, "--export", tmp_path / "lr.svg", "--rankdir", "LR")
    size = lambda p: tuple(map(float, re.search(r'width="([\d.]+)" height="([\d.]+)"', p.read_text()).groups()))
    (wt, ht), (wl, hl) = size(tmp_path / "tb.svg"), size(tmp_path / "lr.svg")
    assert ht > wt and wl > hl


def test_export_html_is_self_contained(capsys, yolo_path, tmp_path):
    out = tmp_path / "yolo.html"
    code, _, _ = run(capsys, yolo_path, "--export", out)
    html = out.read_text()
    assert code == 0
    assert '<script src=' not in html and '<link rel="stylesheet"' not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    data = json.loads(re.search(r'<script id="kiln-data" type="application/json">(.*?)</script>', html, re.S).group(1))
    w = data["panes"][0]["weights"][0]
    assert data["server"] is False and "min" in w["stats"] and "preview" in w["stats"]


def test_python_api_export_and_model_proto(tmp_path):
    from kiln.viewer import samples
    out = view(samples.control_flow(), export=tmp_path / "cf.html")
    assert out.exists() and "then_branch" in out.read_text()


@pytest.mark.parametrize("content,name,pattern", [
    (b"\x00\x01\x02 not a model at all " * 50, "random.bin", "not a model format Kiln can open"),
    (b"\x08\x07\x12\x05hello:" + b"\xff" * 200, "broken.onnx", "broken.onnx"),
    (b"", "empty.onnx", "empty.onnx"),
])
def test_unreadable_files_are_one_line_errors(capsys, tmp_path, content, name, pattern):
    p = tmp_path / name
    p.write_bytes(content)
    code, out, err = run(capsys, p, "--export", tmp_path / "x.svg")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("kiln: error: ") and re.search(pattern, err)
    assert "Traceback" not in err
    code, _, err = run(capsys, p, "--no-browser")           # the server refuses to start on it too
    assert code == 2 and err.count("\n") == 1


def test_bad_arguments(capsys, yolo_path, tmp_path):
    assert run(capsys, tmp_path / "missing.onnx", "--export", tmp_path / "x.svg")[2].count("does not exist") == 1
    code, _, err = run(capsys, yolo_path, "--export", tmp_path / "x.txt")
    assert code == 2 and ".svg, .png or .html" in err
    code, _, err = run(capsys, yolo_path, "--export", tmp_path / "no" / "dir" / "x.svg")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, yolo_path, "--profile", tmp_path / "nope.json", "--export", tmp_path / "x.svg")
    assert code == 2 and "nope.json" in err
    (tmp_path / "p.json").write_text('{"layers": 3}')
    code, _, err = run(capsys, yolo_path, "--profile", tmp_path / "p.json", "--export", tmp_path / "x.svg")
    assert code == 2 and "kiln bench --export-profile" in err
    code, _, err = run(capsys, yolo_path, "--engine", yolo_path, "--export", tmp_path / "x.svg")
    assert code == 2 and "Kiln engine" in err


def test_error_document_embeds_the_message():
    html = html_document(error="'x.onnx' is not a model format Kiln can open.")
    assert '"error":' in html and "x.onnx" in html


def test_cli_registers_view():
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    command.add_parser(sub)
    args = parser.parse_args(["view", "m.onnx", "--port", "8123", "--no-browser", "--rankdir", "LR"])
    assert args.func is command.run and args.port == 8123 and args.no_browser and args.rankdir == "LR"


def test_notebook_gets_an_inline_page(monkeypatch, yolo_path):
    import sys
    import types
    shell = types.SimpleNamespace(kernel=object())
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setitem(sys.modules, "IPython.display", None)      # no display module: our own object
    shown = view(yolo_path)
    html = shown._repr_html_()
    assert html.startswith("<iframe srcdoc=") and "kiln-data" in html and "&lt;script" in html
    assert "/model.24/m.0/Conv" in html


def test_picture_export_without_playwright_is_one_line(capsys, monkeypatch, yolo_path, tmp_path):
    """SVG and PNG are drawn by the page in headless Chromium: without Playwright, one line says what to install;
    the .html export needs neither."""
    import sys
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)          # `import playwright.sync_api` fails
    for name in ("x.svg", "x.png"):
        code, out, err = run(capsys, yolo_path, "--export", tmp_path / name)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "pip install kiln[viewer]" in err and "chromium" in err and not (tmp_path / name).exists()
    assert run(capsys, yolo_path, "--export", tmp_path / "x.html")[0] == 0


def test_picture_export_without_chromium_is_one_line(capsys, monkeypatch, yolo_path, tmp_path):
    from kiln.viewer import export
    pytest.importorskip("playwright.sync_api")
    fresh = export._Chromium()                            # the process's browser may already be running
    monkeypatch.setattr(export, "CHROMIUM", fresh)
    monkeypatch.setattr(export, "find_chromium", lambda: str(tmp_path / "no-such-chromium"))
    try:
        code, out, err = run(capsys, yolo_path, "--export", tmp_path / "x.svg")
    finally:
        fresh.close()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "could not start headless Chromium" in err and "apt-get install chromium" in err
    assert not (tmp_path / "x.svg").exists()
