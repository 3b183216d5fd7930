"""Prometheus text metrics: requests, failures, queue and compute time, batch sizes, per model."""
from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for le, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {_num(self.total)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class ModelStats:
    """What one model's requests did."""

    requests: Counter = field(default_factory=Counter)          # by protocol
    failures: Counter = field(default_factory=Counter)          # by reason
    inferences: int = 0                                          # rows answered
    queue_depth: int = 0
    queue_seconds: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS))
    compute_seconds: Histogram = field(default_factory=lambda: Histogram(TIME_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))


_HELP = (
    ("kiln_requests_total", "counter", "Inference requests received."),
    ("kiln_request_failures_total", "counter", "Inference requests answered with an error, by reason."),
    ("kiln_inferences_total", "counter", "Rows (batch entries) answered."),
    ("kiln_queue_depth", "gauge", "Requests waiting in the model's queue."),
    ("kiln_queue_seconds", "histogram", "Time a request waited in the queue before its batch ran."),
    ("kiln_compute_seconds", "histogram", "Time to run one batch on an execution context."),
    ("kiln_batch_size", "histogram", "Rows per batch the dynamic batcher ran."),
)


class Metrics:
    """Every model's stats (kept across unload and reload) plus failures that name no served model."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}
        self.unknown_model_failures = Counter()                  # by protocol; the name is not a label

    def model(self, name: str) -> ModelStats:
        if name not in self.models:
            self.models[name] = ModelStats()
        return self.models[name]

    def snapshot(self) -> dict:
        """Every counter and histogram as JSON-able data (what ``add`` takes from another process)."""
        hist = ("queue_seconds", "compute_seconds", "batch_size")
        return {"unknown": dict(self.unknown_model_failures), "models": {
            name: {"requests": dict(s.requests), "failures": dict(s.failures), "inferences": s.inferences,
                   "queue_depth": s.queue_depth,
                   **{h: [getattr(s, h).counts, getattr(s, h).total, getattr(s, h).count] for h in hist}}
            for name, s in self.models.items()}}

    def add(self, snap: dict) -> None:
        """Adds another process's ``snapshot``: counters and histograms sum (their buckets are this module's)."""
        for proto, n in snap.get("unknown", {}).items():
            self.unknown_model_failures[str(proto)] += int(n)
        for name, m in snap.get("models", {}).items():
            s = self.model(str(name))
            for field_, counter in (("requests", s.requests), ("failures", s.failures)):
                for k, n in m.get(field_, {}).items():
                    counter[str(k)] += int(n)
            s.inferences += int(m.get("inferences", 0))
            s.queue_depth += int(m.get("queue_depth", 0))
            for h in ("queue_seconds", "compute_seconds", "batch_size"):
                counts, total, count = m[h]
                mine = getattr(s, h)
                if len(counts) != len(mine.counts):
                    raise ValueError(f"histogram {h} has {len(counts)} buckets, not {len(mine.counts)}")
                mine.counts = [a + int(b) for a, b in zip(mine.counts, counts)]
                mine.total += float(total)
                mine.count += int(count)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        rows: dict[str, list[str]] = {name: [] for name, _, _ in _HELP}
        for model, s in sorted(self.models.items()):
            m = f'model="{_label(model)}"'
            for proto, n in sorted(s.requests.items()):
                rows["kiln_requests_total"].append(f'kiln_requests_total{{{m},protocol="{proto}"}} {n}')
            for reason, n in sorted(s.failures.items()):
                rows["kiln_request_failures_total"].append(
                    f'kiln_request_failures_total{{{m},reason="{reason}"}} {n}')
            rows["kiln_inferences_total"].append(f"kiln_inferences_total{{{m}}} {s.inferences}")
            rows["kiln_queue_depth"].append(f"kiln_queue_depth{{{m}}} {s.queue_depth}")
            rows["kiln_queue_seconds"] += s.queue_seconds.lines("kiln_queue_seconds", m)
            rows["kiln_compute_seconds"] += s.compute_seconds.lines("kiln_compute_seconds", m)
            rows["kiln_batch_size"] += s.batch_size.lines("kiln_batch_size", m)
        for proto, n in sorted(self.unknown_model_failures.items()):
            rows["kiln_request_failures_total"].append(
                f'kiln_request_failures_total{{model="",reason="not_found",protocol="{proto}"}} {n}')
        out = []
        for name, kind, text in _HELP:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows[name]]
        return "\n".join(out) + "\n"
