"""Fixtures for the viewer tests: sample models written at test time, a local server, headless Chromium."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx
import pytest

from kiln.viewer import samples

CHROMIUM = os.environ.get("KILN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("viewer-models")


@pytest.fixture(scope="session")
def yolo_path(model_dir) -> Path:
    p = model_dir / "yolo.onnx"
    onnx.save(samples.mini_yolo(), p)
    return p


@pytest.fixture(scope="session")
def control_flow_path(model_dir) -> Path:
    p = model_dir / "control.onnx"
    onnx.save(samples.control_flow(), p)
    return p


@pytest.fixture(scope="session")
def big_path(model_dir) -> Path:
    p = model_dir / "encoder10k.onnx"
    onnx.save(samples.transformer(10_000), p)
    return p


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session (Debian's chromium; Playwright never downloads one)."""
    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                              args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    ctx.close()
