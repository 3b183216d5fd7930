"""Flags that several commands take, each declared once as an argument group.

A Tool lists the groups it takes (``groups = (Precision("fp16", "bf16"), Device(), Plugins())``); a group
adds its flags to the command's parser and reads them back from the parsed arguments.
"""
from __future__ import annotations

import argparse
from typing import Any

from kiln.cli.base.args import number, parse_inputs, parse_shapes, profiles_from_args


class ArgGroup:
    """A set of flags shared by several commands."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add this group's flags to ``parser``."""
        raise NotImplementedError


class Precision(ArgGroup):
    """Mutually exclusive --fp16/--bf16/--tf32 flags (those named); none given means FP32."""

    HELP = {"fp16": "FP16 compute (accumulation, softmax and norms in FP32)",
            "bf16": "BF16 compute (accumulation, softmax and norms in FP32)",
            "tf32": "FP32 tensors with TF32 matrix math on the GPU"}

    def __init__(self, *choices: str) -> None:
        unknown = set(choices) - set(self.HELP)
        if unknown:
            raise ValueError(f"unknown precision flags {sorted(unknown)}; known: {sorted(self.HELP)}")
        self.choices = choices

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        for c in self.choices:
            group.add_argument(f"--{c}", action="store_true", help=self.HELP[c])

    @staticmethod
    def of(args: argparse.Namespace) -> str:
        """The precision the flags chose: 'fp16', 'bf16', 'tf32' or 'fp32'."""
        return next((c for c in Precision.HELP if getattr(args, c, False)), "fp32")


class Device(ArgGroup):
    """--device cpu|cuda."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", choices=("cpu", "cuda"), help="target device (default: cuda when available)")


class Shapes(ArgGroup):
    """--shapes, and with ``profile`` --min/--opt/--max-shapes; each repeatable, accumulating."""

    def __init__(self, help: str = "input shapes", profile: bool = False) -> None:
        self.help, self.profile = help, profile

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--shapes", action="append", metavar="NAME:DIMS[,..]",
                            help=f"{self.help}, e.g. input:1x3x224x224 (repeatable; 'name:' is a scalar)")
        if self.profile:
            parser.add_argument("--min-shapes", action="append", metavar="NAME:DIMS[,..]",
                                help="smallest shapes of the optimization profile (repeatable)")
            parser.add_argument("--opt-shapes", action="append", metavar="NAME:DIMS[,..]",
                                help="shapes to optimize for (default: max; repeatable)")
            parser.add_argument("--max-shapes", action="append", metavar="NAME:DIMS[,..]",
                                help="largest shapes of the optimization profile (repeatable)")

    @staticmethod
    def static(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
        """The --shapes given, by input name."""
        return parse_shapes(args.shapes, "--shapes")

    @staticmethod
    def profile_of(args: argparse.Namespace) -> dict[str, Any] | None:
        """The build profile the shape flags give (see ``profiles_from_args``)."""
        return profiles_from_args(args)


class Inputs(ArgGroup):
    """--input NAME=FILE.npy (repeatable) and --seed for the inputs not given."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                            help="an input from a .npy file (repeatable)")
        parser.add_argument("--seed", type=number(int, 0), default=0, help="seed for random inputs (default 0)")

    @staticmethod
    def files(args: argparse.Namespace) -> dict[str, str]:
        """The --input files, by input name."""
        return parse_inputs(args.input)


class Fp32Layers(ArgGroup):
    """--fp32-layers PATTERN[,..]: layers kept in FP32 in a reduced-precision build."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fp32-layers", metavar="PATTERN[,..]",
                            help="with --fp16/--bf16: keep the layers whose ONNX node names match these fnmatch "
                                 "patterns in FP32 (weights too), e.g. '/conv1/*,/layer1/*'; with --int8/--fp8 "
                                 "they are also left unquantized")


class Quantize(ArgGroup):
    """--int8/--fp8 post-training quantization, its calibration data, calibrator and cache."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--int8", action="store_true",
                           help="post-training INT8 quantization of convolutions and GEMMs, calibrated with --calib")
        group.add_argument("--fp8", action="store_true", help="post-training FP8 (E4M3) quantization (GPUs of compute "
                                                              "capability 8.9+)")
        parser.add_argument("--calib", metavar="DIR|FILE.npz|FILE.npy",
                            help="calibration inputs: a .npy (one input), an .npz (one array per input name) or a "
                                 "folder of them; samples along the first axis, preprocessed as the model expects")
        parser.add_argument("--calibrator", choices=("max", "percentile", "entropy", "mse"),
                            help="how activation ranges are found (default: mse for --int8, the least squared "
                                 "quantization error; max for --fp8, the largest magnitude seen; entropy is "
                                 "TensorRT's KL calibrator; see docs/quantization.md)")
        parser.add_argument("--no-bias-correction", action="store_true",
                            help="keep the float biases (default: correct conv/FC biases for the mean shift "
                                 "quantization adds, from the calibration data)")
        parser.add_argument("--no-smoothing", action="store_true",
                            help="keep the activations' channels as they are (default: fold SmoothQuant factors "
                                 "into ReLU chains before calibrating; see docs/quantization.md)")
        parser.add_argument("--percentile", type=number(float, 0, 100, above=True), default=99.99, metavar="P",
                            help="the percentile calibrator's percent (default 99.99)")
        parser.add_argument("--calib-cache", metavar="FILE",
                            help="calibration cache (JSON): read when it exists (no calibration), else written")
        parser.add_argument("--fp16-layers", metavar="PATTERN[,..]",
                            help="with --int8/--fp8: leave the layers whose ONNX node names match these fnmatch "
                                 "patterns unquantized (in the build's float precision)")
        parser.add_argument("--accuracy", metavar="TARGET",
                            help="with --int8/--fp8: keep the fewest, most sensitive layers unquantized until TARGET "
                                 "holds on the calibration data against FP32: rel_l2<=X, max_abs<=X or top1_agree>=X")
        parser.add_argument("--calib-resize", metavar="HxW", help="calibration images: resize to HxW (bilinear)")
        parser.add_argument("--calib-mean", metavar="R,G,B", default="0,0,0",
                            help="calibration images: mean subtracted after scaling (default 0,0,0)")
        parser.add_argument("--calib-std", metavar="R,G,B", default="1,1,1",
                            help="calibration images: std divided by after the mean (default 1,1,1)")
        parser.add_argument("--calib-scale", type=number(float, 0, above=True), default=1 / 255, metavar="X",
                            help="calibration images: pixel values (0-255) times X first (default 1/255)")
        parser.add_argument("--calib-layout", choices=("nchw", "nhwc"), default="nchw",
                            help="calibration images: the input's layout (default nchw)")

    @staticmethod
    def config(args: argparse.Namespace) -> dict[str, Any]:
        """The BuildConfig fields the flags give (none without --int8/--fp8; those flags alone are refused)."""
        from kiln.errors import KilnError
        mode = "int8" if args.int8 else "fp8" if args.fp8 else None
        if mode is None:
            given = [f for f, v in (("--calib", args.calib), ("--calib-cache", args.calib_cache),
                                    ("--fp16-layers", args.fp16_layers), ("--calib-resize", args.calib_resize),
                                    ("--accuracy", args.accuracy)) if v]
            if given:
                raise KilnError(f"{given[0]} belongs to a quantized build; add --int8 (or --fp8), or drop it.")
            return {}
        from kiln.builder.quant.images import Preprocess
        size = None
        if args.calib_resize:
            dims = parse_shapes(f"x:{args.calib_resize}", "--calib-resize")["x"]
            if len(dims) != 2:
                raise KilnError(f"--calib-resize takes HxW, like 224x224; got {args.calib_resize!r}.")
            size = (dims[0], dims[1])
        prep = Preprocess(size=size, mean=_floats(args.calib_mean, "--calib-mean"),
                          std=_floats(args.calib_std, "--calib-std"), scale=args.calib_scale, layout=args.calib_layout)
        return {"quantize": mode, "calibration": args.calib, "calibrator": args.calibrator,
                "percentile": args.percentile, "calib_cache": args.calib_cache, "fp16_layers": args.fp16_layers or (),
                "calib_preprocess": prep, "accuracy": args.accuracy, "bias_correction": not args.no_bias_correction,
                "smoothing": not args.no_smoothing}


def _floats(text: str, flag: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' → (0.485, 0.456, 0.406); one line naming the flag otherwise."""
    from kiln.errors import KilnError
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise KilnError(f"{flag} takes numbers joined by commas, like 0.485,0.456,0.406; got {text!r}.") from None


class Threads(ArgGroup):
    """--threads N: CPU threads for the engine's runs (and a build that comes first)."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=number(int, 1), metavar="N",
                            help="CPU threads (default: the physical cores this process may use)")

    @staticmethod
    def apply(args: argparse.Namespace) -> None:
        """Make --threads the process's default for CPU engines, when given."""
        if getattr(args, "threads", None) is not None:
            from kiln.kernels.cpu_threads import set_default_threads
            set_default_threads(args.threads)


class Plugins(ArgGroup):
    """--plugins FILE.py|MODULE (repeatable): plugins loaded before the command's work."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--plugins", action="append", metavar="FILE.py|MODULE",
                            help="load plugins first (repeatable)")

    @staticmethod
    def load(args: argparse.Namespace) -> None:
        """Load every plugin file or module given with --plugins."""
        if args.plugins:
            from kiln.plugins import load
            for p in args.plugins:
                load(p)


class Fallback(ArgGroup):
    """--fallback onnxruntime: nodes Kiln cannot run become ONNX Runtime islands."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--fallback", choices=("onnxruntime",),
                            help="run nodes Kiln has no converter or plugin for in ONNX Runtime (CPU) islands")


class Json(ArgGroup):
    """--json: machine-readable output."""

    def __init__(self, help: str = "machine-readable output") -> None:
        self.help = help

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help=self.help)
