#!/usr/bin/env python
"""Run the ONNX backend suite on Kiln and regenerate docs/operators.md and src/kiln/onnx/support.json.

    python scripts/conformance_report.py                      # CPU run → results, docs, support data
    python scripts/conformance_report.py --device cuda --results-only   # on a GPU machine
        → docs/conformance/cuda.json; commit it, then rerun the first command to fill the CUDA column

Every case runs, excluded or not (the report says which exclusions now pass). Per-op counts
attribute a node case to the op in its name; model cases (real, simple, pytorch-*) are summed
separately.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "conformance"
EXCLUSIONS = ROOT / "tests" / "onnx" / "conformance_exclusions.toml"
DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.preview")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--results-only", action="store_true", help="write the results JSON, not the docs")
    ap.add_argument("--pattern", help="only cases matching this regex (for debugging; no docs written)")
    ap.add_argument("--prune", action="store_true",
                    help="delete exclusions whose cases all pass now (edits the exclusion file)")
    args = ap.parse_args(argv)

    from kiln.onnx.conformance import load_exclusions, run_suite
    exclusions = load_exclusions(EXCLUSIONS)
    t0 = time.perf_counter()
    results = run_suite([args.device], pattern=args.pattern)
    wall = time.perf_counter() - t0
    results = {k: v for k, v in results.items() if k.endswith(f"_{args.device}")}
    summary = _summary(results, exclusions, args.device)
    print(f"{args.device}: {summary['pass']} pass, {summary['fail']} fail, {summary['error']} error, "
          f"{summary['skip']} skip of {summary['total']} cases in {wall:.1f}s "
          f"(of the failures, {summary['excluded_failing']} are excluded with a reason)")
    if args.pattern:
        for k, v in sorted(results.items()):
            if v["outcome"] != "pass":
                print(f"  {k}: {v['outcome']}: {v['message']}")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"device": args.device, "wall_seconds": round(wall, 1), "summary": summary,
               "environment": _environment(args.device), "results": results}
    (RESULTS / f"{args.device}.json").write_text(_dump_results(payload))
    if args.results_only:
        return 0
    runs = {"cpu": payload}
    cuda = RESULTS / "cuda.json"
    if args.device == "cpu" and cuda.exists():
        runs["cuda"] = _load_results(cuda)
    table = _by_op(runs, exclusions)
    (ROOT / "src" / "kiln" / "onnx" / "support.json").write_text(json.dumps(_support(table, runs), indent=1,
                                                                              sort_keys=True) + "\n")
    (ROOT / "docs" / "operators.md").write_text(_markdown(table, runs, exclusions))
    stale = [k for k, v in results.items() if v["outcome"] == "pass" and v.get("excluded")]
    if stale:
        print("These excluded cases now pass:", ", ".join(sorted(stale)))
        if args.prune:
            _prune(results, exclusions, args.device)
    return 0


def _prune(results: dict, exclusions, device: str) -> None:
    """Drop each exclusion none of whose cases still fails; name the ones that only partly pass."""
    from kiln.onnx.conformance import split_device
    text = EXCLUSIONS.read_text()
    for e in exclusions:
        hits = [r["outcome"] for name, r in results.items() if e.matches(split_device(name)[0], device)]
        if hits and all(o == "pass" for o in hits):
            block = f'[[exclude]]\npattern = "{e.pattern}"\n'
            start = text.find(block)
            if start < 0:
                print(f"  could not find {e.pattern!r} in {EXCLUSIONS.name}; remove it by hand")
                continue
            end = text.find("\n\n", start)
            text = text[:start] + (text[end + 2:] if end >= 0 else "")
            print(f"  removed exclusion {e.pattern!r} ({len(hits)} cases pass)")
        elif any(o == "pass" for o in hits):
            print(f"  {e.pattern!r}: {hits.count('pass')} of {len(hits)} cases pass; narrow the pattern")
    EXCLUSIONS.write_text(text)


def _dump_results(payload: dict) -> str:
    """One line per case (diffs stay readable); passing cases carry no message or timing."""
    head = {k: v for k, v in payload.items() if k != "results"}
    lines = ["{", f' "meta": {json.dumps(head, sort_keys=True)},', ' "results": {']
    items = sorted(payload["results"].items())
    for i, (name, r) in enumerate(items):
        slim = {k: v for k, v in r.items() if k in ("outcome", "category")
                or (k in ("message", "excluded") and v and r["outcome"] != "pass")}
        lines.append(f"  {json.dumps(name)}: {json.dumps(slim, sort_keys=True)}{',' if i < len(items) - 1 else ''}")
    lines += [" }", "}", ""]
    return "\n".join(lines)


def _load_results(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {**data["meta"], "results": data["results"]}


def _environment(device: str) -> dict:
    import onnx
    import torch

    import kiln
    env = {"onnx": onnx.__version__, "torch": torch.__version__, "kiln": getattr(kiln, "__version__", "?"),
           "python": sys.version.split()[0], "date": datetime.date.today().isoformat()}
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _summary(results: dict, exclusions, device: str) -> dict:
    from kiln.onnx.conformance import exclusion_for, split_device
    s = defaultdict(int)
    by_cat: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, r in results.items():
        case, _ = split_device(name)
        ex = exclusion_for(case, device, exclusions)
        r["excluded"] = ex.reason if ex else None
        s[r["outcome"]] += 1
        s["total"] += 1
        by_cat[r["category"]][r["outcome"]] += 1
        by_cat[r["category"]]["total"] += 1
        if ex and r["outcome"] in ("fail", "error"):
            s["excluded_failing"] += 1
    return {**{k: s[k] for k in ("pass", "fail", "error", "skip", "total", "excluded_failing")},
            "by_category": {k: dict(v) for k, v in sorted(by_cat.items())}}


def _by_op(runs: dict, exclusions) -> dict:
    """op key → {op, domain, kiln versions, latest ONNX version, per-device counts, notes, failing cases}."""
    import onnx.defs

    from kiln.onnx.conformance import op_of_case, split_device
    from kiln.onnx.registry import supported_ops
    kiln_ops = supported_ops()
    latest: dict[tuple[str, str], int] = {}
    for s in onnx.defs.get_all_schemas_with_history():
        dom = "" if s.domain in ("", "ai.onnx") else s.domain
        if dom in DOMAINS and not s.deprecated:
            latest[(dom, s.name)] = max(latest.get((dom, s.name), 0), s.since_version)
    domain_of = {name: dom for (dom, name) in latest}
    table: dict[tuple[str, str], dict] = {}

    def row(dom: str, name: str) -> dict:
        return table.setdefault((dom, name), {
            "op": name, "domain": dom, "kiln_versions": kiln_ops.get((dom, name), []),
            "onnx_latest": latest.get((dom, name)), "counts": {}, "notes": [], "failing": []})

    for key in set(latest) | set(kiln_ops):
        row(*key)
    for device, payload in runs.items():
        for name, r in payload["results"].items():
            case, _ = split_device(name)
            op = op_of_case(case, r["category"])
            entry = row(domain_of.get(op, ""), op)
            c = entry["counts"].setdefault(device, {"pass": 0, "total": 0})
            c["total"] += 1
            c["pass"] += r["outcome"] == "pass"
            if r["outcome"] != "pass":
                note = r.get("excluded") or f"{r['outcome']}: {r.get('message', '')}"
                if note not in entry["notes"]:
                    entry["notes"].append(note)
                if not r.get("excluded"):
                    entry["failing"].append(f"{case} ({device})")
    return table


def _support(table: dict, runs: dict) -> dict:
    ops = []
    for (dom, name), e in sorted(table.items()):
        if name.startswith("("):
            continue
        ops.append({"op": name, "domain": dom or "ai.onnx", "versions": e["kiln_versions"],
                    "onnx_latest": e["onnx_latest"],
                    **{dev: e["counts"].get(dev) for dev in ("cpu", "cuda") if dev in runs},
                    "notes": e["notes"][:6]})
    env = runs["cpu"]["environment"]
    return {"generated_by": "scripts/conformance_report.py", "onnx": env["onnx"], "date": env["date"],
            "summary": {dev: {k: v for k, v in p["summary"].items() if k != "by_category"}
                        for dev, p in runs.items()},
            "ops": ops}


def _cell(counts: dict | None) -> str:
    if not counts:
        return "–"
    return f"{counts['pass']}/{counts['total']}"


def _markdown(table: dict, runs: dict, exclusions) -> str:
    cpu = runs["cpu"]
    env = cpu["environment"]
    cuda = runs.get("cuda")
    lines = [
        "# ONNX operator support",
        "",
        "Generated by `python scripts/conformance_report.py` from a run of the ONNX backend test suite "
        f"(onnx {env['onnx']}, torch {env['torch']}, {env['date']}). Do not edit by hand.",
        "",
        "Each case builds a Kiln engine through `kiln.onnx.backend` and compares with ONNX's expected outputs. "
        "Cases excluded from CI are listed, with their reasons, in `tests/onnx/conformance_exclusions.toml`; "
        "they still run here, so the counts below are what Kiln actually does.",
        "",
        "## Summary",
        "",
        "| device | pass | fail | error | skip | total | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dev in ("cpu", "cuda"):
        p = runs.get(dev)
        if p is None:
            lines.append(f"| {dev} | not run | | | | | |")
            continue
        s = p["summary"]
        where = f" ({p['environment'].get('gpu')})" if p["environment"].get("gpu") else ""
        lines.append(f"| {dev}{where} | {s['pass']} | {s['fail']} | {s['error']} | {s['skip']} | {s['total']} | "
                     f"{p['wall_seconds']} s |")
    if cuda is None:
        lines += ["", "To fill the CUDA column: on a GPU machine run `python scripts/conformance_report.py --device cuda "
                      "--results-only`, commit `docs/conformance/cuda.json`, then rerun the script on CPU."]
    lines += ["", "By suite (CPU):", "", "| suite | pass | total |", "| --- | ---: | ---: |"]
    for cat, c in cpu["summary"]["by_category"].items():
        lines.append(f"| {cat} | {c.get('pass', 0)} | {c['total']} |")
    lines += ["", "## Operators", "",
              "Kiln versions: the opset versions from which Kiln has a converter (the newest one not above the "
              "model's opset is used). Cases: passing/total node cases named after the op (including its "
              "`_expanded` function-body variants).", "",
              "| op | domain | Kiln versions | ONNX latest | CPU | CUDA | notes |",
              "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for (dom, name), e in sorted(table.items(), key=lambda kv: (kv[0][0] != "", kv[0][0], kv[0][1].lower())):
        if name.startswith("("):
            continue
        versions = ", ".join(str(v) for v in e["kiln_versions"]) or "not supported"
        cuda_cell = _cell(e["counts"].get("cuda")) if cuda else "not run"
        notes = "; ".join(_short(n) for n in e["notes"][:3])
        lines.append(f"| {name} | {dom or 'ai.onnx'} | {versions} | {e['onnx_latest'] or ''} | "
                     f"{_cell(e['counts'].get('cpu'))} | {cuda_cell} | {notes} |")
    models = table.get(("", "(models)"))
    if models:
        lines += ["", f"Model cases (real, simple, pytorch-converted, pytorch-operator): CPU "
                      f"{_cell(models['counts'].get('cpu'))}, CUDA "
                      f"{_cell(models['counts'].get('cuda')) if cuda else 'not run'}."]
    failing = [(name, e["failing"]) for (dom, name), e in sorted(table.items()) if e["failing"]]
    lines += ["", "## Failing cases not excluded", ""]
    if not failing:
        lines.append("None.")
    for name, cases in failing:
        lines.append(f"- **{name}**: {', '.join(sorted(cases))}")
    lines.append("")
    return "\n".join(lines)


def _short(note: str, n: int = 160) -> str:
    note = note.replace("|", "\\|").replace("\n", " ")
    return note if len(note) <= n else note[:n - 1] + "…"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
