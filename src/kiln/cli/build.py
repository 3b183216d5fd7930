"""`kiln build`: parse an ONNX model and build an engine file for this device."""
from __future__ import annotations

import argparse
import os
import sys
import time

from kiln.cli.base import Device, Fallback, Fp32Layers, Plugins, Precision, Quantize, Shapes, Tool, register
from kiln.cli.base.args import check_output_file, number, quote, warn
from kiln.cli.base.progress import Progress
from kiln.errors import KilnError


@register
class Build(Tool):
    name = "build"
    help = "parse an ONNX model and build an engine file for this device"
    description = "Parse MODEL, optimize it for the target device and write an engine file."
    groups = (Precision("fp16", "bf16", "tf32"), Device(), Shapes("static input shapes", profile=True), Fp32Layers(),
              Plugins(), Fallback(), Quantize())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="the .onnx model (external data files beside it are read too)")
        parser.add_argument("-o", "--output", required=True, help="engine file to write (.kiln)")
        parser.add_argument("--workspace", type=number(float, 0, above=True), metavar="MB",
                            help="memory limit for activations and scratch, in MB")
        parser.add_argument("--opt-level", type=number(int, 0, 5), default=3, metavar="0-5",
                            help="0: first valid tactic per layer; 3 (default): time likely candidates; "
                                 "5: time everything")
        parser.add_argument("--timing-cache", metavar="FILE",
                            help="read and update measured tactic timings in FILE (created when missing; a file "
                                 "that is not a Kiln timing cache is refused, never overwritten)")
        parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def run(self, args: argparse.Namespace) -> int:
        check_output_file(args.output, "-o", keep=[args.model, args.timing_cache or "", args.calib_cache or ""])
        profiles = Shapes.profile_of(args)
        precision = Precision.of(args)
        workspace = max(1, int(args.workspace * (1 << 20))) if args.workspace is not None else None
        import kiln
        config = kiln.BuildConfig(precision=precision, device=args.device, profiles=profiles, workspace=workspace,
                                  optimization_level=args.opt_level, timing_cache=args.timing_cache,
                                  fp32_layers=args.fp32_layers or (), fallback=args.fallback,
                                  **Quantize.config(args))
        note = config.precision_note(config.resolved_device())
        Plugins.load(args)
        progress = Progress(not args.quiet)
        progress("parse", 0.0)
        import gc
        gc.freeze()     # this process's imports (torch's millions of objects) leave the collector's scans
        network = kiln.onnx.parse(args.model, fallback=args.fallback)
        engine = kiln.build(network, config, progress=progress)
        progress("serialize", 0.0)
        engine.header.setdefault("build", {})["command"] = "kiln " + " ".join(
            quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["build"] else None
        try:
            engine.save(args.output)
        except OSError as exc:
            raise KilnError(f"Cannot write the engine to {args.output!r} ({exc.strerror or exc}); check the disk "
                            f"and the path.") from None
        progress("serialize", 1.0)
        progress.done()
        if note:
            warn(f"--{precision}: {note}")
        from kiln.builder.quant import dequantized_note
        qnote = dequantized_note(engine.layers, engine.device)
        if qnote:
            warn(qnote)
        size = os.path.getsize(args.output)
        print(f"Built {args.output} ({size / 1e6:.1f} MB): {len(engine.layers)} layers, {precision}"
              f"{' + ' + config.quantize + ' Q/DQ' if config.quantize else ''}, "
              f"{engine.header['device']['name']} ({engine.device}), {time.perf_counter() - progress.t0:.1f} s")
        accuracy = engine.header["build"].get("quantization", {}).get("accuracy")
        if accuracy:
            from kiln.engine.quant_record import accuracy_text
            print(accuracy_text(accuracy, precision))
        return 0
