"""The `kiln` command: thin wrappers over the Python API, one module per command (``kiln/cli/<name>.py``,
a Tool registered with ``@register``; see docs/contributing.md).

Heavy modules are imported inside each command's ``run``, so `kiln --help` is instant and a missing
optional dependency breaks only the command that needs it; a command whose module fails to import is
still listed, with the reason. A user error (any KilnError) prints one line and exits 2; anything else
is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Sequence

from kiln.cli.base.args import Parser
from kiln.cli.base.progress import Progress
from kiln.cli.base.tool import MissingTool
from kiln.errors import KilnError


def make_parser() -> argparse.ArgumentParser:
    """The `kiln` parser with every command's subparser (missing commands included)."""
    from kiln.cli.base.registry import tools
    commands = tools()
    while True:
        parser, sub = _root_parser()
        for i, tool in enumerate(commands):
            try:
                tool.add_parser(sub)
            except Exception as exc:     # its flags could not be declared (an import failed): listed as missing
                commands[i] = MissingTool(tool.name, type(tool).__module__, exc)
                break                    # start again without the half-made subparser
        else:
            return parser


def _root_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    from kiln import __version__
    parser = Parser(
        prog="kiln", description="Build fast, device-specific inference engines from ONNX models, run them, "
                                 "benchmark them and look inside them.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `kiln ARGV`; the exit code."""
    try:
        parser = make_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not isinstance(getattr(args, "tool", None), MissingTool):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        try:
            with _kiln_warnings_as_lines():
                code = int(args.func(args) or 0)
        except KilnError as exc:
            if Progress.open_line:
                sys.stderr.write("\n")
            msg = " ".join(str(exc).split())
            print(f"kiln: error: {msg}", file=sys.stderr)
            return 2
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except SystemExit:                   # --help, --version and usage errors exit through argparse
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_to_devnull()
        raise
    except BrokenPipeError:              # the reader went away (`kiln plugins | head -1`): stop quietly
        _stdout_to_devnull()
        return 1


@contextlib.contextmanager
def _kiln_warnings_as_lines() -> Iterator[None]:
    """Warnings Kiln itself raises (a warning class of kiln's, or a warning issued from kiln's code) print as
    one ``kiln: warning:`` line, like the commands' own; other libraries' warnings keep Python's format."""
    import warnings

    from kiln.cli.base.args import warn
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        ours = category.__module__.split(".")[0] == "kiln" or os.sep + "kiln" + os.sep in str(filename)
        if ours:
            if Progress.open_line:
                sys.stderr.write("\n")
                Progress.open_line = False
            warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _stdout_to_devnull() -> None:
    """Output still buffered would fail again at exit, so stdout now points at devnull (the Python docs'
    recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):      # stdout replaced by an object without a descriptor
        sys.stdout = os.fdopen(devnull, "w")
