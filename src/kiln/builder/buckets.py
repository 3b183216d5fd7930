"""Shape buckets: the points of each optimization profile at which a range engine's tactics are timed.

A profile's points are its min, opt and max shapes and the power-of-two steps between them: step k
sets every dynamic dim (one whose min and max differ) to the k-th power of two above its min,
clamped at its max, so all dynamic dims grow together (batch 1..64 x sequence 16..512 gives
(2, 32), (4, 64), ... (32, 512)). A profile keeps at most ``MAX_POINTS`` points: min, opt and max
always, and steps evenly spaced among the rest. Points are sorted by their number of elements.

Bucket i is the set of shapes that point i is the first (in that order) to hold in every dim; a
shape within the profile always has one, since the max holds them all. The runtime picks it from
the shapes alone (``kiln.runtime.buckets``), and each layer runs the tactic timed fastest at its
bucket's point.
"""
from __future__ import annotations

import math

from kiln.builder.config import Profile

MAX_POINTS = 6

Shapes = dict[str, tuple[int, ...]]


def _step(lo: int, hi: int, k: int) -> int:
    """The k-th power of two above ``lo`` (k >= 1), clamped at ``hi``."""
    return min(hi, 1 << (lo.bit_length() - 1 + k)) if lo < hi else lo


def profile_points(profile: Profile) -> list[Shapes]:
    """The profile's timing points (shapes of the profile's inputs), sorted; at most ``MAX_POINTS``."""
    names = sorted(profile.shapes)
    lo = {n: profile.shapes[n][0] for n in names}
    opt = {n: profile.shapes[n][1] for n in names}
    hi = {n: profile.shapes[n][2] for n in names}
    must = []
    for p in (lo, opt, hi):
        if p not in must:
            must.append(p)
    steps = []
    for k in range(1, 64):
        p = {n: tuple(_step(a, b, k) for a, b in zip(lo[n], hi[n])) for n in names}
        if p == hi:
            break
        if p not in must and p not in steps:
            steps.append(p)
    room = MAX_POINTS - len(must)
    if len(steps) > room:
        steps = [steps[round((i + 1) * (len(steps) + 1) / (room + 1)) - 1] for i in range(room)]
    return sorted(must + steps, key=_order)


def _order(p: Shapes) -> tuple:
    return sum(math.prod(s) for s in p.values()), tuple(d for n in sorted(p) for d in p[n])


def timing_points(profiles: list[Profile], opt: Shapes) -> tuple[list[Shapes], int, list[dict]]:
    """Every profile's points, profile by profile, as shapes of every input (``opt`` for the inputs a
    profile leaves out); the index of the default point (``opt`` itself); and the engine header's bucket
    table, ``[{"profile": i, "shapes": {input: dims}}]`` in the same order."""
    table = [{"profile": i, "shapes": {n: list(s) for n, s in p.items()}}
             for i, prof in enumerate(profiles) for p in profile_points(prof)]
    points = [{**opt, **{n: tuple(s) for n, s in b["shapes"].items()}} for b in table] or [dict(opt)]
    return points, points.index(opt) if opt in points else 0, table
