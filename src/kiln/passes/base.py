"""Pass protocol and pass manager: each pass rewrites a Network in place and says whether it changed
it; the manager repeats the list until nothing changes, names a failing pass with those that ran
before it, and with ``KILN_LOG=passes`` prints what each pass and rewrite rule did."""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NoReturn

from kiln.errors import KilnError
from kiln.ir.network import Network


@dataclass
class PassResult:
    network: Network
    modified: bool


class RewriteError(RuntimeError):
    """A pass or rewrite rule raised: a bug in Kiln, named with the passes and rules that ran before."""


def log_enabled(topic: str) -> bool:
    """Whether ``KILN_LOG`` (a comma-separated list of topics, or ``all``) names ``topic``."""
    topics = {t.strip() for t in os.environ.get("KILN_LOG", "").split(",")}
    return topic in topics or "all" in topics


class Stats:
    """What passes and rules did: passes run (and whether each changed the network), rule fires,
    and the matches rules declined where they settled (their last sweep), with the reasons."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, bool]] = []
        self.fires: Counter[str] = Counter()
        self.declines: dict[str, Counter[str]] = {}

    def fired(self, rule: str) -> None:
        self.fires[rule] += 1

    def declined(self, rule: str, reason: str, times: int = 1) -> None:
        self.declines.setdefault(rule, Counter())[reason] += times

    def report(self) -> list[str]:
        lines = []
        runs: dict[str, list[bool]] = {}
        for name, changed in self.ran:
            runs.setdefault(name, []).append(changed)
        for name, changes in runs.items():
            lines.append(f"pass {name}: ran {len(changes)}x, changed the network {sum(changes)}x")
        for rule in dict.fromkeys([*self.fires, *self.declines]):
            why = self.declines.get(rule, Counter())
            lines.append(f"rule {rule}: fired {self.fires[rule]}, left declined {sum(why.values())}")
            lines += [f"  declined {n}x: {reason}" for reason, n in why.most_common()]
        return lines

    def print(self) -> None:
        for line in self.report():
            print(f"kiln passes: {line}", file=sys.stderr)


def history(stats: Stats) -> str:
    """What ran before a failure, for its message."""
    passes = ", ".join(dict.fromkeys(name for name, _ in stats.ran)) or "none"
    fired = ", ".join(f"{r} x{n}" for r, n in stats.fires.items()) or "none"
    return f"passes run before it: {passes}; rules fired before it: {fired}"


def reraise(exc: Exception, what: str, stats: Stats) -> NoReturn:
    """Raise ``exc`` again naming ``what`` and what ran before it: a KilnError (bad input) keeps its
    one-line message and gets a note, anything else (a bug) becomes a RewriteError."""
    if isinstance(exc, RewriteError):
        raise exc
    if isinstance(exc, KilnError):
        exc.add_note(f"raised in {what}; {history(stats)}")
        raise exc
    raise RewriteError(f"{what} failed ({type(exc).__name__}: {exc}); {history(stats)}") from exc


class Pass:
    """Subclasses implement ``call``; ``name`` shows in progress and logs. A pass that applies rewrite
    rules reports them into the ``stats`` it is given."""

    name = "pass"
    devices: tuple[str, ...] | None = None      # where the layers it makes have kernels that pay; None: everywhere

    def call(self, net: Network) -> PassResult:
        raise NotImplementedError

    def __call__(self, net: Network, stats: Stats | None = None) -> PassResult:
        return self.call(net)


class PassManager:
    """Runs passes in order, repeating the whole list until nothing changes."""

    def __init__(self, passes: list[Pass], max_iterations: int = 8,
                 on_pass: Callable[[str], None] | None = None) -> None:
        self.passes = passes
        self.max_iterations = max_iterations
        self.on_pass = on_pass

    def __call__(self, net: Network, stats: Stats | None = None) -> PassResult:
        log = stats is None and log_enabled("passes")
        stats = stats if stats is not None else Stats()
        any_change = False
        for _ in range(self.max_iterations):
            changed = False
            for p in self.passes:
                if self.on_pass:
                    self.on_pass(p.name)
                try:
                    r = p(net, stats)
                except Exception as exc:
                    reraise(exc, f"Pass {p.name!r}", stats)
                stats.ran.append((p.name, r.modified))
                changed |= r.modified
            any_change |= changed
            if not changed:
                break
        if log:
            stats.print()
        return PassResult(net, any_change)
