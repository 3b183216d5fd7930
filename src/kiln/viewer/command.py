"""The ``kiln view`` subcommand."""
from __future__ import annotations

import argparse
import sys
import warnings

from kiln.errors import ViewerError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``view`` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "view", help="show a model or engine in the browser, or export it as SVG/PNG/HTML",
        description="Show a model (ONNX and the other formats Kiln reads) or a Kiln engine: a local server on "
                    "127.0.0.1 and the browser, or a headless export with --export.")
    p.add_argument("file", help="model or engine file (.onnx, .kiln, ...)")
    p.add_argument("other", nargs="?", metavar="OTHER",
                   help="a second model or engine: show both with their differences (kiln diff prints them)")
    p.add_argument("--port", type=int, help="port to listen on (default: a free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser; print the URL")
    p.add_argument("--export", metavar="OUT", help="write OUT (.svg, .png or .html) instead of serving")
    p.add_argument("--profile", metavar="PROF.json", help="per-layer times from kiln bench --export-profile")
    p.add_argument("--errors", metavar="ERRORS.json",
                   help="colour nodes by accuracy error, from kiln compare --per-layer")
    p.add_argument("--engine", metavar="MODEL.kiln", help="show this engine beside the model, linked to its nodes")
    p.add_argument("--rankdir", choices=("TB", "LR"), default="TB", help="top-to-bottom (default) or left-to-right")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; user errors raise ViewerError (the CLI prints one line and exits 2)."""
    from kiln.viewer import ViewerWarning, page, serve, view
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ViewerError(f"--port must be between 0 and 65535, not {args.port}.")
    target = (args.file, args.other) if args.other else args.file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ViewerWarning)
        if args.export:
            out = view(target, export=args.export, profile=args.profile, engine=args.engine, errors=args.errors,
                       rankdir=args.rankdir)
        else:
            page.FREEZE_AFTER_BUILD = True          # from here on this process lives for one model
            try:
                server = serve(target, port=args.port, open_browser=not args.no_browser, profile=args.profile,
                               engine=args.engine, errors=args.errors, rankdir=args.rankdir)
            except BaseException:
                page.FREEZE_AFTER_BUILD = False
                raise
    _report(caught)
    if args.export:
        print(f"wrote {out}")
        return 0
    print(f"Serving {args.file} at {server.url}  (Ctrl+C to stop)", flush=True)
    server.wait()
    return 0


def _report(caught: list[warnings.WarningMessage]) -> None:
    """Viewer warnings as one stderr line each; any other warning as Python would show it."""
    from kiln.viewer import ViewerWarning
    for w in caught:
        if issubclass(w.category, ViewerWarning):
            print(f"kiln: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ViewerError as exc:
        print(f"kiln: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
