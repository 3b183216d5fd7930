"""`kiln diff`: two models, or a model and the engine built from it, compared (exit 1 when they differ)."""
from __future__ import annotations

import argparse

from kiln.cli.base import Json, Tool, register


@register
class Diff(Tool):
    name = "diff"
    help = "compare two models, or a model and its engine; exit 1 when they differ"
    description = ("Compare two models (any files kiln view opens): nodes matched by name, then by structure, each "
                   "one added, removed, changed (attributes, shapes, dtypes, weights) or unchanged; counts first, "
                   "then each change. A model and its Kiln engine: which nodes each layer was built from, which "
                   "were folded away or run as plugins, each layer's precision and tactic. Exit status 0 when "
                   "equal (or the engine was built from the model), 1 when they differ, 2 on bad input.")
    groups = (Json(),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("a", help="first model or engine file")
        parser.add_argument("b", help="second model or engine file")
        parser.add_argument("--no-weights", action="store_true",
                            help="compare weights by shape and dtype only, without reading their values")
        parser.add_argument("--export", metavar="OUT",
                            help="also write the diff page as OUT (.html, or a .svg/.png picture drawn headless)")

    def run(self, args: argparse.Namespace) -> int:
        from kiln.viewer import diff_report
        return diff_report.run(args.a, args.b, json_out=args.json, weights=not args.no_weights, export=args.export)
