"""The soak, scaled to CI: 2,000 requests (10% malformed) through benchmarks/serve_bench.py soak.

The script checks every good answer against numpy and every bad one for a 4xx with a message; the
server's RSS growth after the first 10% of requests must stay under 20 MB, and it must still be ready
and drain cleanly. (The 50,000-request run is the same command with its defaults.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from _serve import triton_client  # noqa: E402
triton_client("tritonclient.http")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"


def test_soak_2000_requests_with_10_percent_malformed(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "soak", "--requests", "2000", "--bad-fraction", "0.1",
                        "--concurrency", "6", "--rss-limit-mb", "20", "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert out.exists(), r.stderr[-3000:]
    v = json.loads(out.read_text())
    assert v["good"] == 1800 and v["bad"] == 200, v
    assert v["good_ok"] == v["good"] and v["bad_ok"] == v["bad"], v["failures"]
    assert v["rss_growth_mb"] < 20 and v["ready_after"] and v["exit_code"] == 0, v
    assert v["passed"] and r.returncode == 0
