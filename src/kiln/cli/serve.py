"""`kiln serve`: serve engines over the KServe v2 protocol (HTTP and gRPC) with dynamic batching."""
from __future__ import annotations

import argparse

from kiln.cli.base import Plugins, Tool, register


@register
class Serve(Tool):
    name = "serve"
    help = "serve engines over the KServe v2 protocol (HTTP and gRPC) with dynamic batching"
    description = ("Serve every MODEL.kiln in a folder (or one engine file) over the KServe v2 / Open Inference "
                   "protocol: HTTP/REST with binary tensors and gRPC, dynamic batching, /metrics. Listens on "
                   "127.0.0.1 unless --host; Ctrl-C stops taking requests and answers those already taken.")
    groups = (Plugins(),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from kiln.serve.cli import add_arguments
        add_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        from kiln.serve.cli import run
        Plugins.load(args)
        return run(args)
