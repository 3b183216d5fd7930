"""``python -m kiln.serve PATH [flags]``: the same as ``kiln serve``."""
from __future__ import annotations

import argparse
import sys

from kiln.errors import KilnError
from kiln.serve.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln serve", description="Serve Kiln engines over the KServe v2 "
                                                                    "protocol (HTTP and gRPC).")
    add_arguments(parser)
    parser.add_argument("--plugins", nargs="+", metavar="FILE", help="plugin modules the engines need")
    args = parser.parse_args(argv)
    try:
        if args.plugins:
            from kiln.plugins import load
            for p in args.plugins:
                load(p)
        return run(args)
    except KilnError as exc:
        print(f"kiln: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
