#!/usr/bin/env python
"""Fuzz Kiln's file readers through the real CLI; print cases, tracebacks, hangs, escapes, code execution per target.

    python scripts/fuzz.py --engines 10000 --models 1000 --seed 1 --workers 8     # the numbers in docs/security.md
    python scripts/fuzz.py --engines 0 --models 0 --format tflite --per-format 200
    python scripts/fuzz.py --case engine:17 --seed 1      # rerun one case and keep its folder

``--models N`` is N mutated ONNX models and N mutated files of every other viewer format
(``--per-format`` overrides the latter). Failing cases keep their folder under
``RUN_DIR/cases`` (``case.json`` there lists the commands); ``--json`` writes every result.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fuzz import runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, default=1000, help="mutated engine files (default 1000)")
    ap.add_argument("--models", type=int, default=100, help="mutated ONNX models (default 100)")
    ap.add_argument("--per-format", type=int, help="mutated files per viewer format (default: --models)")
    ap.add_argument("--format", action="append", metavar="X",
                    help="only these viewer formats (reader module names: tflite, tfjs, ...; repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="run seed: the same seed makes the same cases")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--memory-gb", type=int, default=4, help="address-space limit per worker in GiB (0: none)")
    ap.add_argument("--run-dir", help="where seeds, cases and logs go (default: a new temporary folder)")
    ap.add_argument("--case", action="append", metavar="TARGET:INDEX", help="run only this case (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep every case folder, not only failing ones")
    ap.add_argument("--json", metavar="FILE", help="write every result as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failing case as it comes")
    args = ap.parse_args(argv)

    per_format = args.models if args.per_format is None else args.per_format
    targets = {"engine": args.engines, "onnx": args.models}
    if args.format:
        targets.update({f"view:{f}": per_format for f in args.format})
    else:
        targets["view"] = per_format
    only = None
    if args.case:
        only = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in args.case]
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="kiln-fuzz-"))
    done = [0]
    t0 = time.monotonic()

    def progress(r: runner.Result) -> None:
        done[0] += 1
        if r.failures and (args.verbose or only):
            for f in r.failures:
                print(f"{r.target}:{r.index} {r.label[:70]}  {f['kind']}  kiln {f['command'][:80]}\n"
                      f"    {f.get('where') or '-'} | {f['detail'][:200]}", flush=True)
        elif done[0] % 200 == 0:
            print(f"  {done[0]} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    report = runner.run(targets, run_dir, seed=args.seed, workers=args.workers, timeout=args.timeout,
                        keep=args.keep or bool(only), memory_gb=args.memory_gb, progress=progress, only=only)
    print(f"kiln fuzz: seed {args.seed}, {args.workers} workers, timeout {args.timeout:.0f} s, run dir {run_dir}")
    print(report.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "seconds": report.seconds,
                                               "seed_failures": report.seed_failures,
                                               "results": [r.__dict__ for r in report.results]}, indent=1))
    return 1 if report.failed() or report.seed_failures else 0


if __name__ == "__main__":
    sys.exit(main())
