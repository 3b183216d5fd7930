"""Pass protocol: each pass rewrites a Network in place and says whether it changed it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kiln.ir.network import Network


@dataclass
class PassResult:
    network: Network
    modified: bool


class Pass:
    """Subclasses implement ``call``; ``name`` shows in progress and logs."""

    name = "pass"
    in_place = True

    def call(self, net: Network) -> PassResult:
        raise NotImplementedError

    def __call__(self, net: Network) -> PassResult:
        return self.call(net)


class PassManager:
    """Runs passes in order, repeating the whole list until nothing changes."""

    def __init__(self, passes: list[Pass], max_iterations: int = 8,
                 on_pass: Callable[[str], None] | None = None) -> None:
        self.passes = passes
        self.max_iterations = max_iterations
        self.on_pass = on_pass

    def __call__(self, net: Network) -> PassResult:
        any_change = False
        for _ in range(self.max_iterations):
            changed = False
            for p in self.passes:
                if self.on_pass:
                    self.on_pass(p.name)
                r = p(net)
                changed |= r.modified
            any_change |= changed
            if not changed:
                break
        return PassResult(net, any_change)
