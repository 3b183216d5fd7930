"""`kiln run`: run an engine once on given or random inputs and summarize each output."""
from __future__ import annotations

import argparse
import os
import time

from kiln.cli.base import Inputs, Plugins, Shapes, Threads, Tool, register
from kiln.cli.base.args import check_output_dir
from kiln.errors import KilnError


@register
class Run(Tool):
    name = "run"
    help = "run an engine once on given or random inputs and summarize each output"
    description = "Run ENGINE once. Inputs come from .npy files or are random (seeded)."
    groups = (Inputs(), Shapes("shapes for random inputs (default: profile opt)"), Plugins(), Threads())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("engine", help="the .kiln engine file")
        parser.add_argument("--output-dir", metavar="DIR", help="save each output as DIR/<name>.npy")

    def run(self, args: argparse.Namespace) -> int:
        from kiln.runtime.inputs import default_shape, random_input, summary
        import numpy as np

        import kiln
        inputs = Inputs.files(args)
        shapes = Shapes.static(args)
        if args.output_dir:
            check_output_dir(args.output_dir, "--output-dir")
        Plugins.load(args)
        Threads.apply(args)
        engine = kiln.load(args.engine)
        feeds = {}
        for name, path in inputs.items():
            try:
                feeds[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise KilnError(f"Cannot read {path!r} for input {name!r}: {exc}; save it with numpy.save.") \
                    from None
        rng = np.random.default_rng(args.seed)
        for spec in engine.inputs:
            if spec["name"] in feeds:
                continue
            shape = shapes[spec["name"]] if spec["name"] in shapes else default_shape(engine, spec)
            feeds[spec["name"]] = random_input(rng, spec["dtype"], shape)
            print(f"random input {summary(spec['name'], feeds[spec['name']])}")
        ctx = engine.context()
        t0 = time.perf_counter()
        outputs = ctx.run(feeds)
        ms = (time.perf_counter() - t0) * 1e3
        for name, value in outputs.items():
            print(summary(name, value))
        if args.output_dir:
            for name, value in outputs.items():
                safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
                try:
                    np.save(os.path.join(args.output_dir, f"{safe}.npy"), np.asarray(value))
                except OSError as exc:
                    raise KilnError(f"Cannot write output {name!r} to {args.output_dir!r} "
                                    f"({exc.strerror or exc}).") from None
            print(f"wrote {len(outputs)} outputs to {args.output_dir}")
        print(f"first run {ms:.2f} ms on {engine.header['device']['name']}")
        return 0
