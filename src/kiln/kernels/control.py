"""If, Loop and Scan: run compiled subgraph programs (ONNX semantics).

The builder appends the outer tensors a body reads to the layer's inputs, so a
maker receives ``attrs["outer"]`` (their names) and the run gets their values
after the regular inputs.

A Loop runs at most ``max_loop_iterations()`` iterations (``KILN_MAX_LOOP_ITERATIONS``, default
100,000): a trip count or a condition that asks for more (a forged or mistaken model) is one error,
not a run that never ends.
"""
from __future__ import annotations

import os

import torch

from kiln.errors import ShapeError
from kiln.kernels.registry import tactic


@tactic("If", dynamic=True)
def make_if(attrs, ctx):
    then_p, else_p = attrs["then_branch"], attrs["else_branch"]
    outer = attrs.get("outer", [])

    def run(cond, *outer_vals):
        env = dict(zip(outer, outer_vals))
        branch = then_p if bool(cond.reshape(-1)[0].item()) else else_p
        return tuple(branch.run_env(env, []))
    return run


DEFAULT_MAX_LOOP_ITERATIONS = 100_000
NUMBERS = 1024           # iteration numbers a Loop run makes up front


def max_loop_iterations() -> int:
    """The iteration limit of one Loop run: ``$KILN_MAX_LOOP_ITERATIONS`` if it is a positive integer."""
    raw = os.environ.get("KILN_MAX_LOOP_ITERATIONS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_MAX_LOOP_ITERATIONS


def _too_many(name: str, limit: int, trip_max: int | None) -> ShapeError:
    asked = f"its trip count is {trip_max:,}" if trip_max is not None and trip_max > limit else \
        "its condition stayed true"
    return ShapeError(f"Loop {name!r} would run past {limit:,} iterations ({asked}); if the model really needs "
                      f"more, set KILN_MAX_LOOP_ITERATIONS.")


@tactic("Loop", dynamic=True)
def make_loop(attrs, ctx):
    body = attrs["body"]
    outer = attrs.get("outer", [])
    n_in = attrs["num_inputs"]

    def run(*args):
        ins, outer_vals = args[:n_in], args[n_in:]
        env = dict(zip(outer, outer_vals))
        max_trip, cond = ins[0], ins[1]
        carried = list(ins[2:])
        trip_max = int(max_trip.reshape(-1)[0].item()) if max_trip is not None else None
        keep = bool(cond.reshape(-1)[0].item()) if cond is not None else True
        n_carried = len(carried)
        limit = max_loop_iterations()
        if keep and cond is None and trip_max is not None and trip_max > limit:
            raise _too_many(ctx.layer_name, limit, trip_max)
        scans: list[list[torch.Tensor]] = []
        i = 0
        # the body's iteration number and incoming condition (always true inside the loop), made once per run:
        # the first numbers from one arange (each a 0-d view), the condition one tensor
        numbers = torch.arange(max(0, min(trip_max if trip_max is not None else NUMBERS, limit, NUMBERS)),
                               dtype=torch.int64)
        true_t = torch.tensor(True)
        while keep and (trip_max is None or i < trip_max):
            if i >= limit:
                raise _too_many(ctx.layer_name, limit, trip_max)
            iter_t = numbers[i] if i < len(numbers) else torch.tensor(i, dtype=torch.int64)
            outs = body.run_env(env, [iter_t, true_t] + carried)
            keep = bool(outs[0].reshape(-1)[0].item())
            carried = list(outs[1:1 + n_carried])
            sc = outs[1 + n_carried:]
            if not scans:
                scans = [[] for _ in sc]
            for lst, v in zip(scans, sc):
                lst.append(v)
            i += 1
        n_scan = len(body.outputs) - 1 - n_carried
        results = carried
        for k in range(n_scan):
            vals = scans[k] if scans else []
            if vals:
                results.append(torch.stack(vals))
            else:
                dt = body.output_dtype(1 + n_carried + k)
                results.append(torch.zeros((0,), dtype=dt))
        return tuple(results)
    return run


def _scan_once(body, env, n_state, state, scans_in, attrs):
    """One ONNX Scan (v9 semantics) over ``scans_in``; returns final states then scan outputs."""
    n_scan_in = len(scans_in)
    in_axes = attrs.get("scan_input_axes") or [0] * n_scan_in
    in_dirs = attrs.get("scan_input_directions") or [0] * n_scan_in
    scans_in = [s.movedim(a if a >= 0 else a + s.dim(), 0) for s, a in zip(scans_in, in_axes)]
    steps = scans_in[0].shape[0] if scans_in else 0
    n_scan_out = len(body.outputs) - n_state
    outs_acc: list[list[torch.Tensor]] = [[] for _ in range(n_scan_out)]
    for t in range(steps):
        xs = [s[steps - 1 - t] if d else s[t] for s, d in zip(scans_in, in_dirs)]
        outs = body.run_env(env, list(state) + xs)
        state = list(outs[:n_state])
        for lst, v in zip(outs_acc, outs[n_state:]):
            lst.append(v)
    out_axes = attrs.get("scan_output_axes") or [0] * n_scan_out
    out_dirs = attrs.get("scan_output_directions") or [0] * n_scan_out
    results = list(state)
    for k, (lst, a, d) in enumerate(zip(outs_acc, out_axes, out_dirs)):
        if d:
            lst = lst[::-1]
        y = torch.stack(lst) if lst else torch.zeros(0, dtype=body.output_dtype(n_state + k))
        results.append(y.movedim(0, a if a >= 0 else a + y.dim()))
    return results


@tactic("Scan", dynamic=True)
def make_scan(attrs, ctx):
    body = attrs["body"]
    outer = attrs.get("outer", [])
    n_in = attrs["num_inputs"]
    n_scan_in = attrs["num_scan_inputs"]
    batched = attrs.get("batched", False)     # Scan v8: leading batch axis, sequence_lens input

    def run(*args):
        ins, outer_vals = args[:n_in], args[n_in:]
        env = dict(zip(outer, outer_vals))
        if not batched:
            n_state = n_in - n_scan_in
            return tuple(_scan_once(body, env, n_state, ins[:n_state], list(ins[n_state:]), attrs))
        lens, ins = ins[0], ins[1:]
        n_state = len(ins) - n_scan_in
        per_batch = []
        for b in range(ins[0].shape[0]):
            scans = [s[b] for s in ins[n_state:]]
            if lens is not None:
                scans = [s[:int(lens.reshape(-1)[b].item())] for s in scans]
            per_batch.append(_scan_once(body, env, n_state, [s[b] for s in ins[:n_state]], scans, attrs))
        return tuple(torch.stack([r[k] for r in per_batch]) for k in range(len(per_batch[0])))
    return run
