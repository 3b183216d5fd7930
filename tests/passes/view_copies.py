"""Which steps of an engine copy memory, step by step.

For each step of the engine's program: does each output share storage with an input (a view) or is
it new memory, and which copy ops (clone, copy_, _to_copy, or a reshape/contiguous that had to
copy) ran inside the step — so a copy hidden in a tactic (``.contiguous()``, ``F.linear`` on a
non-contiguous input, a dtype cast) shows too. The program runs under ``torch.no_grad`` rather than
inference mode, so composite ops decompose where the dispatch mode sees them; ops that a backend
kernel calls internally (inside cuDNN attention, say) stay invisible — for those, on a GPU, ``--kernels``
lists the CUDA kernels each step launched.

    python tests/passes/view_copies.py model.onnx --shapes x:2x10x64 [--precision fp16] [--device cuda]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    """Run ``engine`` once on ``feeds`` (eagerly, no CUDA graph) and report every step."""
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
    try:
        for step in program.steps:
            step.fn = wrap(step, step.fn)
        with torch.no_grad():
            if kernels:
                _attribute_kernels(program, tensors, rows)
            else:
                program.run_env({}, tensors)
    finally:
        for step, fn in zip(program.steps, originals):
            step.fn = fn
    return rows


def _attribute_kernels(program, tensors, rows: list[StepCopies]) -> None:
    """Run once under torch.profiler and give each step the CUDA kernels launched inside it."""
    from torch.profiler import ProfilerActivity, profile
    program.run_env({}, tensors)                 # warm-up (lazy loads, cuDNN plans)
    rows.clear()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        program.run_env({}, tensors)
        torch.cuda.synchronize()
    def launched(event) -> list[str]:
        names = [k.name for k in getattr(event, "kernels", [])]
        for child in event.cpu_children:
            names += launched(child)
        return names
    by_step = {e.name[len("kiln::"):]: launched(e) for e in prof.events() if e.name.startswith("kiln::")}
    for row in rows:
        row.kernels = by_step.get(row.name, [])


def main() -> int:
    import kiln
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--shapes", required=True, help="name:AxBxC[,name:...] (also the profile)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernels", action="store_true", help="CUDA kernels per step (GPU only)")
    ap.add_argument("--all", action="store_true", help="every step, not only those that copy")
    args = ap.parse_args()
    shapes = {n: tuple(int(d) for d in s.split("x")) for n, s in (p.split(":") for p in args.shapes.split(","))}
    engine = kiln.build(kiln.onnx.parse(args.model), kiln.BuildConfig(device=args.device, precision=args.precision,
                                                                       profiles=shapes))
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in engine.inputs:
        shape = shapes[spec["name"]]
        feeds[spec["name"]] = rng.integers(0, 2, shape) if spec["dtype"].startswith("int") else \
            rng.standard_normal(shape).astype(spec["dtype"])
    rows = count_copies(engine, feeds, kernels=args.kernels)
    for r in rows:
        copy_kernels = [k for k in r.kernels if "copy" in k.lower()]
        if args.all or r.copies or copy_kernels:
            print(f"{r.kind:14s} {r.tactic:12s} {'COPY ' if r.copies else '     '}{','.join(r.copy_ops):20s} "
                  f"{len(copy_kernels)} copy kernels  {r.name}")
    print(f"{sum(r.copies for r in rows)} of {len(rows)} steps copy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
