"""Argument handling every command shares: one-line usage errors, checked numbers, repeatable shape and
input flags, output paths checked before any work."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from kiln.errors import KilnError


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error of the CLI."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help.\n")


def number(kind: type, low: float, high: float | None = None, above: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or finite float in [low, high] (``above``: strictly greater than low)."""
    what = "an integer" if kind is int else "a number"
    bound = (f"from {low:g} to {high:g}" if high is not None else f"above {low:g}" if above
             else f"{low:g} or more")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}; give {what} {bound}") from None
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {what} {bound}")
        return value
    return parse


def parse_shapes(specs: str | Sequence[str] | None, flag: str) -> dict[str, tuple[int, ...]]:
    """``['input:1x3x224x224,mask:1x128', 'ids:16']`` → {'input': (1, 3, 224, 224), 'mask': (1, 128), 'ids': (16,)}.

    Repeated flags accumulate; one name given two different shapes is refused. ``name:`` is a scalar.
    """
    out: dict[str, tuple[int, ...]] = {}
    for spec in [specs] if isinstance(specs, str) else specs or ():
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, dims = part.rpartition(":")
            if not sep or not name:
                raise KilnError(f"{flag} takes NAME:DIMS, like input:1x3x224x224; got {part!r}.")
            try:
                shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
            except ValueError:
                raise KilnError(f"{flag} dims must be integers joined by 'x' (1x3x224x224); got {dims!r} for "
                                f"{name!r}.") from None
            if any(d < 0 for d in shape):
                fixed = "x".join(str(max(d, 1)) for d in shape)
                raise KilnError(f"{flag} {name}:{dims} has a negative dim; shapes given on the command line are "
                                f"sizes (0 or more; -1 marks a dynamic dim only inside a model): write the size, "
                                f"e.g. {flag} {name}:{fixed}.")
            if name in out and out[name] != shape:
                raise KilnError(f"{flag} gives input {name!r} two shapes, {_dims(out[name])} and {_dims(shape)}; "
                                f"give each input once.")
            out[name] = shape
    return out


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "(scalar)"


def parse_inputs(items: Sequence[str] | None) -> dict[str, str]:
    """``['x=x.npy', 'sr=sr.npy']`` → {'x': 'x.npy', 'sr': 'sr.npy'}; one name given two files is refused."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise KilnError(f"--input takes NAME=FILE.npy; got {item!r}.")
        if name in out and out[name] != path:
            raise KilnError(f"--input gives input {name!r} two files, {out[name]!r} and {path!r}; give each input "
                            f"once.")
        out[name] = path
    return out


def profiles_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The build profile that --shapes and --min/--opt/--max-shapes give: ``{input: shape}`` or
    ``{input: (min, opt, max)}``, or None when no shape flag is given."""
    static = parse_shapes(args.shapes, "--shapes")
    mins, opts, maxs = (parse_shapes(getattr(args, k), f"--{k.replace('_', '-')}")
                        for k in ("min_shapes", "opt_shapes", "max_shapes"))
    names = set(static) | set(mins) | set(opts) | set(maxs)
    if not names:
        return None
    prof: dict[str, Any] = {}
    for n in sorted(names):
        if n in static:
            if n in mins or n in opts or n in maxs:
                raise KilnError(f"Input {n!r} is given both --shapes and --min/--opt/--max-shapes; give one or the "
                                f"other.")
            prof[n] = static[n]
            continue
        if n not in mins or n not in maxs:
            raise KilnError(f"Input {n!r} needs both --min-shapes and --max-shapes (and optionally --opt-shapes), "
                            f"or one --shapes.")
        prof[n] = (mins[n], opts.get(n, maxs[n]), maxs[n])
    return prof


def check_output_file(path: str, flag: str, keep: Sequence[str] = ()) -> None:
    """Refuse an output path that cannot become a file, before any work: a folder, a missing parent
    folder, an unwritable place, or one of the files in ``keep`` (the inputs of the command)."""
    if not path:
        raise KilnError(f"{flag} needs a file name.")
    if os.path.isdir(path):
        raise KilnError(f"{flag} {path!r} is a folder; give a file name, e.g. {os.path.join(path, 'out.kiln')!r}.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KilnError(f"{flag} {path!r}: the folder {parent!r} does not exist; create it first "
                        f"(mkdir -p {quote(parent)}).")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise KilnError(f"{flag} {path!r} cannot be written (permission denied); give another path.")
    for other in keep:
        if other and os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            raise KilnError(f"{flag} {path!r} is the command's input file; writing it would destroy the input. "
                            f"Give another file name.")


def check_output_dir(path: str, flag: str) -> None:
    """Make folder ``path`` (and its parents) for outputs, or refuse in one line."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise KilnError(f"{flag} {path!r} is an existing file, not a folder; give a folder name.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise KilnError(f"{flag} {path!r} cannot be created ({exc.strerror or exc}); give another folder.") \
            from None
    if not os.access(path, os.W_OK):
        raise KilnError(f"{flag} {path!r} is not writable; give another folder.")


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"kiln: warning: {' '.join(message.split())}", file=sys.stderr)


def quote(s: str) -> str:
    """``s`` quoted for a shell command line."""
    import shlex
    return shlex.quote(s)
