"""Which steps of an engine copy memory, step by step.

For each step of the engine's program: does each output share storage with an input (a view) or is
it new memory, and which copy ops (clone, copy_, _to_copy, or a reshape/contiguous that had to
copy) ran inside the step — so a copy hidden in a tactic (``.contiguous()``, ``F.linear`` on a
non-contiguous input, a dtype cast) shows too. The program runs under ``torch.no_grad`` rather than
inference mode, so composite ops decompose where the dispatch mode sees them; ops that a backend
kernel calls internally (inside cuDNN attention, say) stay invisible — for those, on a GPU, ``--kernels``
lists the CUDA kernels each step launched.

    python tests/passes/view_copies.py model.onnx --shapes x:2x10x64 [--precision fp16] [--device cuda]
    python tests/passes/view_copies.py --zoo bert_base:32 --precision fp16 --device cuda --kernels
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.runtime import slots

VIEW_KINDS = {"Shuffle", "Squeeze", "Unsqueeze", "Select", "Flatten", "Identity", "Slice", "Expand"}
_ALWAYS_COPY = {"clone", "copy_", "_to_copy"}
_MAYBE_VIEW = {"reshape", "contiguous", "flatten", "to", "unflatten", "view_as", "reshape_as"}


@dataclass
class StepCopies:
    name: str
    kind: str
    tactic: str
    new_outputs: list[bool]                            # per output: new memory (True) or a view of an input
    copy_ops: list[str] = field(default_factory=list)  # copy ops run inside the step
    kernels: list[str] = field(default_factory=list)   # CUDA kernels (with ``kernels=True``)

    @property
    def copies(self) -> bool:
        """A view-kind step that made new memory, or a step that ran a copy op."""
        return bool(self.copy_ops) or (self.kind in VIEW_KINDS and any(self.new_outputs))


class _CopyOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        copied = name in _MAYBE_VIEW and isinstance(out, torch.Tensor) and bool(args) \
            and isinstance(args[0], torch.Tensor) and out.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr()
        if name in _ALWAYS_COPY or copied:
            self.ops.append(name)
        return out


def _storages(values) -> set[int]:
    return {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor)}


def count_copies(engine, feeds: dict[str, np.ndarray], kernels: bool = False) -> list[StepCopies]:
    """Run ``engine`` on ``feeds`` (eagerly, no CUDA graph) once untimed, then once more reporting every step."""
    ctx = engine.context(cuda_graph=False)
    program = ctx.program
    rows: list[StepCopies] = []
    originals = [step.fn for step in program.steps]

    def wrap(step, fn):
        def run(*args):
            mode = _CopyOps()
            with mode:
                if kernels:
                    with torch.profiler.record_function(f"kiln::{step.name}"):
                        outs = fn(*args)
                else:
                    outs = fn(*args)
            ins = _storages(args)
            rows.append(StepCopies(step.name, step.kind, step.tactic,
                                   [isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins
                                    for o in outs], mode.ops))
            return outs
        return run

    device = torch.device(engine.device if engine.device != "cuda" else "cuda")
    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[spec["name"]])).to(device) for spec in engine.inputs]
    with torch.no_grad():       # one run first: a tactic's one-time preparation (a weight laid out) is not a run's copy
        program.run_env({}, tensors)
    # a CPU run replays a view layer's earlier view without calling the layer (kiln.runtime.slots): here every
    # run calls every layer, so that each one's copies are seen
    replays, slots._replays_view = slots._replays_view, lambda step: False
    program._slot_plan = None
    try:
        for step in program.steps:
            step.fn = wrap(step, step.fn)
        with torch.no_grad():
            if kernels:
                _attribute_kernels(program, tensors, rows)
            else:
                program.run_env({}, tensors)
    finally:
        slots._replays_view = replays
        program._slot_plan = None
        for step, fn in zip(program.steps, originals):
            step.fn = fn
    return rows


def _attribute_kernels(program, tensors, rows: list[StepCopies]) -> None:
    """Run once under torch.profiler and give each step the CUDA kernels launched inside it."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    program.run_env({}, tensors)                 # warm-up (lazy loads, cuDNN plans)
    rows.clear()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        program.run_env({}, tensors)
        if cuda:
            torch.cuda.synchronize()

    def launched(event) -> list[str]:
        names = [k.name for k in getattr(event, "kernels", [])]
        for child in event.cpu_children:
            names += launched(child)
        return names
    by_step = {e.name[len("kiln::"):]: launched(e) for e in prof.events() if e.name.startswith("kiln::")}
    for row in rows:
        row.kernels = by_step.get(row.name, [])


def _zoo(spec: str, folder: str) -> tuple[str, dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Export a model of benchmarks/harness.py ("bert_base:32") as the benchmarks do: ONNX path, shapes, feeds."""
    import os
    import sys
    name, batch = spec.split(":")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
    import harness
    torch.manual_seed(0)
    model, make_inputs, in_names, out_names, _ = harness.build_model(name)
    harness.calibrate(model, make_inputs)
    path = os.path.join(folder, f"{name}.onnx")
    with torch.no_grad():
        torch.onnx.export(model.eval(), make_inputs(1), path, input_names=in_names, output_names=out_names[:1],
                          dynamic_axes={n: {harness.batch_axis(name): "b"} for n in in_names}, opset_version=17,
                          dynamo=False)
    inputs = make_inputs(int(batch))
    return path, {n: tuple(t.shape) for n, t in zip(in_names, inputs)}, \
        {n: t.numpy() for n, t in zip(in_names, inputs)}


def main() -> int:
    import tempfile

    import kiln
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="an ONNX file (or --zoo)")
    ap.add_argument("--shapes", help="name:AxBxC[,name:...] (also the profile)")
    ap.add_argument("--zoo", help="a benchmarks/harness.py model and batch, e.g. bert_base:32")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", action="store_true", help="the CUDA kernels each step launched (on a GPU)")
    ap.add_argument("--all", action="store_true", help="every step, not only those that copy")
    args = ap.parse_args()
    feeds: dict[str, np.ndarray] = {}
    if args.zoo:
        path, shapes, feeds = _zoo(args.zoo, tempfile.mkdtemp())
    elif args.model and args.shapes:
        path = args.model
        shapes = {n: tuple(int(d) for d in s.split("x")) for n, s in (p.split(":") for p in args.shapes.split(","))}
    else:
        ap.error("give an ONNX file with --shapes, or --zoo")
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device=args.device, precision=args.precision,
                                                                 profiles=shapes))
    rng = np.random.default_rng(0)
    for spec in engine.inputs:
        shape = shapes[spec["name"]]
        if spec["name"] not in feeds:
            feeds[spec["name"]] = rng.integers(0, 2, shape) if spec["dtype"].startswith("int") else \
                rng.standard_normal(shape).astype(spec["dtype"])
    rows = count_copies(engine, feeds, kernels=args.kernels)
    for r in rows:
        copy_kernels = [k for k in r.kernels if "copy" in k.lower()]
        if args.all or r.copies or copy_kernels:
            kernels = f"{len(r.kernels)} kernels ({len(copy_kernels)} copies)  " if args.kernels else ""
            print(f"{r.kind:14s} {r.tactic:12s} {'COPY ' if r.copies else '     '}{','.join(r.copy_ops):20s} "
                  f"{kernels}{r.name}")
    print(f"{sum(r.copies for r in rows)} of {len(rows)} steps copy"
          + (f"; {sum(any('copy' in k.lower() for k in r.kernels) for r in rows)} launch a copy kernel"
             if args.kernels else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
