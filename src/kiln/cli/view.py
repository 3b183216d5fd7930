"""`kiln view`: a model or engine in the browser, or exported as SVG/PNG/HTML. The viewer package owns
the command's flags and its work (kiln.viewer.command, which imports nothing heavy); this module
registers it."""
from __future__ import annotations

import argparse

from kiln.cli.base import Tool, register
from kiln.viewer import command


@register
class View(Tool):
    name = "view"

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = command.add_parser(subparsers)
        parser.set_defaults(func=self.run, tool=self)
        return parser

    def run(self, args: argparse.Namespace) -> int:
        return command.run(args)
