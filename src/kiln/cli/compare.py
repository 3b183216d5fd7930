"""`kiln compare`: run a model with Kiln and with ONNX Runtime on the same inputs; find where they differ."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kiln.cli.base import Device, Fp32Layers, Inputs, Plugins, Precision, Quantize, Shapes, Threads, Tool, register
from kiln.cli.base.args import check_output_file, number, quote, warn


@register
class Compare(Tool):
    name = "compare"
    help = "run a model with Kiln and ONNX Runtime on the same inputs; find where they differ"
    description = ("Build (or load --engine) and run MODEL with Kiln and with ONNX Runtime (CPU, the reference) on "
                   "the same inputs. Per output: shape, max/mean absolute and relative error, pass/fail and an error "
                   "histogram. A tensor passes when STAT(|kiln-ref|) <= atol + rtol*STAT(|ref|). Exit 0 when all "
                   "pass, 1 when any fails, 2 on a usage error.")
    groups = (Device(), Precision("fp16", "bf16"), Fp32Layers(), Shapes("shapes of random inputs with dynamic dims"),
              Inputs(), Plugins(), Threads(), Quantize())

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        p = parser
        p.add_argument("model", help="the .onnx model")
        p.add_argument("--engine", help="use this built engine instead of building one")
        p.add_argument("--data", metavar="DIR|FILE.npz", help="inputs from a folder of NAME.npy (or input_N.pb) files")
        p.add_argument("--atol", type=number(float, 0), default=None,
                       help="absolute tolerance (default: fp32 1e-5, fp16 1e-2, bf16 and --int8/--fp8 5e-2)")
        p.add_argument("--rtol", type=number(float, 0), default=None,
                       help="relative tolerance (default: fp32 1e-4, fp16 1e-2, bf16 and --int8/--fp8 5e-2)")
        p.add_argument("--check-error-stat", choices=("max", "mean", "median"), default="max",
                       help="the error statistic checked against the tolerances (default max)")
        p.add_argument("--per-layer", action="store_true",
                       help="compare every intermediate tensor too and name the first layer whose error jumps")
        p.add_argument("--growth", type=number(float, 0, above=True), default=10.0, metavar="X",
                       help="a layer 'jumps' when its error is X times its inputs' (default 10)")
        p.add_argument("--save-errors", metavar="FILE.json",
                       help="where --per-layer writes the errors for kiln view --errors (default MODEL.errors.json)")
        p.add_argument("--reduce", action="store_true",
                       help="shrink a failing model to the smallest subgraph that still fails and save it")
        p.add_argument("--reduce-output", metavar="FILE.onnx", help="where --reduce saves (default MODEL.reduced.onnx)")
        p.add_argument("--no-histogram", action="store_true", help="leave out the error histograms")
        p.add_argument("-v", "--verbose", action="store_true", help="log each --reduce step")

    def run(self, args: argparse.Namespace) -> int:
        from kiln.comparison import compare
        inputs = Inputs.files(args)
        shapes = Shapes.static(args)
        precision = Precision.of(args)
        per_layer = args.per_layer or bool(args.save_errors)
        errors_out = args.save_errors or os.path.splitext(os.path.basename(args.model))[0] + ".errors.json"
        if per_layer:
            check_output_file(errors_out, "--save-errors", keep=[args.model])
        quant = Quantize.config(args)
        if per_layer and quant:
            check_output_file(sensitivity_path(errors_out), "--save-errors", keep=[args.model])
        if args.reduce and args.reduce_output:
            check_output_file(args.reduce_output, "--reduce-output", keep=[args.model])
        Plugins.load(args)
        Threads.apply(args)
        progress = (lambda msg: print(f"  reduce: {msg}", file=sys.stderr)) if args.verbose else None
        engine = args.engine
        sensitivity = sens_errors = None
        if quant:
            engine, inputs, sensitivity, sens_errors = quantized_engine(args, precision, inputs, shapes, quant,
                                                                       per_layer)
            args.atol = QUANT_TOL if args.atol is None else args.atol
            args.rtol = QUANT_TOL if args.rtol is None else args.rtol
        result = compare(args.model, precision=precision, device=args.device, engine=engine, inputs=inputs,
                         data=args.data, shapes=shapes, atol=args.atol, rtol=args.rtol,
                         check_error_stat=args.check_error_stat, per_layer=per_layer, growth=args.growth,
                         reduce=args.reduce, reduce_output=args.reduce_output, seed=args.seed,
                         log=progress, fp32_layers=args.fp32_layers or ())
        if args.engine is None:
            import kiln
            note = kiln.BuildConfig(precision=precision).precision_note(result.device)
            if note:
                warn(f"--{precision}: {note}")
            if quant:
                from kiln.builder.quant import dequantized_note
                warn(f"--{quant['quantize']}: {dequantized_note(engine.layers, result.device)}")
        print(result.report(histogram=not args.no_histogram))
        if sensitivity:
            print(sensitivity)
        if per_layer:
            result.save_errors(errors_out)
            print(f"wrote per-layer errors to {errors_out}; see them on the graph: kiln view {quote(args.model)} "
                  f"--errors {quote(errors_out)}")
        if sens_errors is not None:
            sens_out = sensitivity_path(errors_out)
            with open(sens_out, "w") as f:
                json.dump(sens_errors, f, indent=1)
            print(f"wrote each quantized layer's error alone to {sens_out}; see them on the graph: kiln view "
                  f"{quote(args.model)} --errors {quote(sens_out)}")
        if result.reduced is not None:
            print("reproduce: " + reproduce_command(args, result))
        return 0 if result.passed else 1


QUANT_TOL = 5e-2     # default atol and rtol against the FP32 reference for --int8/--fp8


def sensitivity_path(errors_out: str) -> str:
    """Where --per-layer writes the sensitivity report beside the per-tensor errors file."""
    stem = errors_out[:-len(".errors.json")] if errors_out.endswith(".errors.json") else os.path.splitext(errors_out)[0]
    return stem + ".sensitivity.json"


def quantized_engine(args: argparse.Namespace, precision: str, inputs: dict, shapes: dict, quant: dict,
                     per_layer: bool = False) -> tuple[Any, dict, str | None, dict | None]:
    """The --int8/--fp8 engine of args.model, built for the inputs the comparison feeds (returned with it), the
    text to print after the comparison (with ``per_layer`` each quantized layer's error on the calibration
    data, with --accuracy what the search kept) and, with ``per_layer``, that per-layer error as a
    ``kiln view --errors`` report."""
    from kiln.errors import KilnError
    if args.engine:
        raise KilnError("--engine is compared as it was built; drop --int8/--fp8 (or --engine to build one here).")
    import onnx

    import kiln
    from kiln.comparison import make_feeds
    try:
        proto = onnx.load(args.model)
    except Exception as exc:
        raise KilnError(f"{args.model!r} is not a readable ONNX model ({type(exc).__name__}); give an .onnx file.") \
            from None
    feeds = make_feeds(proto, inputs, args.data, shapes, args.seed)
    profiles = {n: tuple(v.shape) for n, v in feeds.items()} or None
    config = kiln.BuildConfig(precision=precision, device=args.device, fp32_layers=args.fp32_layers or (),
                              profiles=profiles, **quant)
    network = kiln.onnx.parse(proto)
    from kiln.builder.quant import evaluator, plan, quantize
    from kiln.builder.quant.accuracy import (parse_target, samples, sensitivity, sensitivity_errors,
                                             sensitivity_report)
    from kiln.engine.quant_record import accuracy_text
    planned = plan(network, config, need_batches=per_layer or bool(config.accuracy))
    lines = []
    report = None
    if per_layer:
        metric = parse_target(config.accuracy).metric if config.accuracy else "rel_l2"
        sens = sensitivity(evaluator(network, planned, config), planned.layers, metric, alone=True)
        lines.append(sensitivity_report(sens, metric, config.quantize, samples(planned.batches)))
        report = sensitivity_errors(sens, metric, config.quantize, args.model, samples(planned.batches))
    qnet = quantize(network, config, planned=planned)
    if config.accuracy:
        lines.append(accuracy_text(qnet.metadata["quantization"]["accuracy"], precision))
    low = precision in ("fp16", "bf16")
    engine = kiln.build(qnet, kiln.BuildConfig(precision=precision, device=args.device, profiles=profiles,
                                               fp32_layers=(args.fp32_layers or ()) if low else ()))
    return engine, feeds, "\n".join(lines) or None, report


def reproduce_command(args: argparse.Namespace, result: Any) -> str:
    """The `kiln compare` command that checks the reduced model as this run checked the full one:
    its saved inputs, the same precision, device, tolerances, error statistic, FP32 layers and plugins."""
    data = os.path.splitext(result.reduced_path)[0] + "-data"
    parts = ["kiln", "compare", result.reduced_path, "--data", data, "--device", result.device]
    if result.precision in ("fp16", "bf16"):
        parts.append(f"--{result.precision}")
    parts += ["--atol", repr(float(result.atol)), "--rtol", repr(float(result.rtol)),
              "--check-error-stat", result.check_error_stat]
    if args.fp32_layers:
        parts += ["--fp32-layers", args.fp32_layers]
    for plugin in args.plugins or ():
        parts += ["--plugins", plugin]
    return " ".join(quote(p) for p in parts)
