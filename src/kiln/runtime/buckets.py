"""Which shape bucket a run is in: chosen from the input shapes alone (host ints, no device sync).

The engine's bucket table lists points of its optimization profiles in order (kiln.builder.buckets
makes them; the engine schema checks them). A run's bucket is the first point whose profile holds
the input shapes and which is at least as large as them in every dim; the profile's max point
holds every shape of the profile, so a shape inside some profile always has one.
"""
from __future__ import annotations

from typing import Any, Sequence

_MEMO = 256         # shapes remembered per table


class BucketTable:
    """An engine's bucket table, ready to pick a bucket for a list of input shapes."""

    def __init__(self, header: dict[str, Any], input_names: Sequence[str]) -> None:
        profiles = header.get("profiles", [])
        position = {n: i for i, n in enumerate(input_names)}
        self.rows: list[list[tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = []
        for b in header["buckets"]:
            prof = profiles[b["profile"]]
            self.rows.append([(position[n], tuple(prof[n]["min"]), tuple(prof[n]["max"]), tuple(point))
                              for n, point in b["shapes"].items()])
        self._memo: dict[tuple, int | None] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def pick(self, shapes: Sequence[tuple[int, ...] | None]) -> int | None:
        """The bucket of these input shapes (in the engine's input order), or None when no profile holds them."""
        key = tuple(shapes)
        if key in self._memo:
            return self._memo[key]
        found = None
        for j, row in enumerate(self.rows):
            if all(shapes[k] is not None and len(shapes[k]) == len(point)
                   and all(a <= d <= p <= c for a, d, p, c in zip(lo, shapes[k], point, hi))
                   for k, lo, hi, point in row):
                found = j
                break
        if len(self._memo) >= _MEMO:
            self._memo.clear()
        self._memo[key] = found
        return found
