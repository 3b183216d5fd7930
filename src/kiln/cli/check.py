"""`kiln check`: every ONNX node Kiln cannot build, and what a build at the given shapes would refuse."""
from __future__ import annotations

import argparse
import json
from typing import Any

from kiln.cli.base import Device, Fallback, Json, Plugins, Shapes, Tool, register


@register
class Check(Tool):
    name = "check"
    help = "list every ONNX node Kiln cannot build, before building"
    description = ("Check MODEL for unsupported nodes (name, op, domain, opset) and, when the input shapes are "
                   "known (the model's own, or given as kiln build takes them), for what a build at those shapes "
                   "for the target device would refuse. Exit 1 if anything would fail (with --fallback onnxruntime: "
                   "unsupported nodes count only when ONNX Runtime cannot run them either).")
    groups = (Json(), Shapes("shapes to check at (as kiln build takes them)", profile=True), Device(), Plugins(),
              Fallback())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="the .onnx model")

    def run(self, args: argparse.Namespace) -> int:
        profile = Shapes.profile_of(args)
        import kiln
        Plugins.load(args)
        problems = kiln.onnx.check(args.model, fallback=args.fallback, shapes=profile, device=args.device)
        blocking = [p for p in problems if not p.get("fallback")]
        if args.json:
            print(json.dumps(problems, indent=1))
            return 1 if blocking else 0
        if not problems:
            print(f"{args.model}: every node is supported.")
            return 0
        unsupported = [p for p in problems if p.get("stage") != "build"]
        refused = [p for p in problems if p.get("stage") == "build"]
        if unsupported:
            print(f"{args.model}: {len(unsupported)} unsupported node(s):")
            for p in unsupported:
                why = "falls back to ONNX Runtime" if p.get("fallback") else "; ".join(
                    r.rstrip(".") for r in (p.get("reason"), p.get("fallback_reason") and
                                            f"cannot fall back to ONNX Runtime: {p['fallback_reason']}") if r)
                print(f"  {_node(p)}" + (f"  ({why})" if why else ""))
        if refused:
            where = "the given shapes" if profile else "the model's input shapes"
            print(f"{args.model}: a build at {where} would fail:")
            for p in refused:
                reason = " ".join(str(p.get("reason", "")).split())
                print(f"  {_node(p)}: {reason}" if p.get("op_type") else f"  {reason}")
        if not blocking:
            print(f"All {len(unsupported)} run as ONNX Runtime islands (on the CPU) with kiln build --fallback "
                  f"onnxruntime.")
            return 0
        if any(not p.get("fallback") for p in unsupported):
            print("Supply a plugin for each (kiln.Plugin subclass, registered) and pass --plugins file.py"
                  + (", or build with --fallback onnxruntime to run them in ONNX Runtime." if not args.fallback
                     else "."))
        return 1


def _node(p: dict[str, Any]) -> str:
    return f"{p['name']}  op {p['op_type']}  domain {p.get('domain') or 'ai.onnx'}  opset {p['opset']}"
