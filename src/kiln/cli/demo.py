"""`kiln demo`: build and run a small built-in example model end to end."""
from __future__ import annotations

import argparse

from kiln.cli.base import Device, Precision, Tool, register
from kiln.cli.base.args import check_output_dir


@register
class Demo(Tool):
    name = "demo"
    help = "build and run a small built-in example model end to end"
    description = ("Create a small ONNX model, build it, save and reload the engine, run it, check it against "
                   "ONNX Runtime when installed, and print timing and the engine's layers.")
    groups = (Device(), Precision("fp16"))

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output-dir", default=".", help="where to write demo.onnx and demo.kiln (default: .)")

    def run(self, args: argparse.Namespace) -> int:
        from kiln.demo import run_demo
        check_output_dir(args.output_dir, "--output-dir")
        return run_demo(device=args.device, precision=Precision.of(args), out_dir=args.output_dir)
