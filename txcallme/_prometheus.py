"""A small metrics registry and its Prometheus text exposition (format 0.0.4).

Only what txcallme records: counters, gauges (set by increments or read from
callbacks at scrape time) and histograms with fixed buckets. Everything is
updated on the reactor thread, so there are no locks; rendering happens on
the reactor thread too (the ``/metrics`` resource). No dependency on
``prometheus_client``: the tests parse the output with its parser.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

#: Content type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric:
    """One metric family: a name, a help text, label names."""

    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class Counter(Metric):
    """A monotonic count; exposed as ``<name>`` (the name ends in ``_total``)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def samples(self) -> list[str]:
        values = self.values or ({} if self.labelnames else {(): 0.0})  # 0 before the first
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}"
                for k, v in sorted(values.items())]

    def reset(self) -> None:
        self.values.clear()


class Gauge(Counter):
    """A value that goes up and down; *callbacks* add values read at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.callbacks: list[Callable[[], Iterable[tuple[Labels, float]]]] = []

    def dec(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) - amount

    def current(self) -> dict[Labels, float]:
        values = dict(self.values)
        for callback in self.callbacks:
            for labels, value in callback():
                values[labels] = values.get(labels, 0.0) + value
        return values

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}"
                for k, v in sorted(self.current().items())]


class Histogram(Metric):
    """Observations counted in fixed buckets (upper bounds, inclusive), with sum
    and count; exposed as ``<name>_bucket``, ``<name>_sum``, ``<name>_count``."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label values: [count in bucket 0, ..., count over the last bound, sum]
        self.children: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = [0.0] * (len(self.buckets) + 2)
        child[bisect_left(self.buckets, value)] += 1
        child[-1] += value

    def count(self, labels: Labels) -> int:
        child = self.children.get(labels)
        return int(sum(child[:-1])) if child else 0

    def samples(self) -> list[str]:
        lines = []
        bounds = [*(repr(b) for b in self.buckets), "+Inf"]
        for labels, child in sorted(self.children.items()):
            running = 0.0
            for bound, n in zip(bounds, child[:-1], strict=True):
                running += n
                le = 'le="' + bound + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, labels, le)} "
                             f"{_number(running)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, labels)} "
                         f"{_number(child[-1])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, labels)} "
                         f"{_number(running)}")
        return lines

    def reset(self) -> None:
        self.children.clear()


class Registry:
    """The metric families of one process, rendered in registration order."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}

    def register(self, metric: Metric) -> None:
        if metric.name in self.metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self.metrics[metric.name] = metric

    def render(self) -> str:
        """The whole registry in the Prometheus text exposition format."""
        lines: list[str] = []
        for metric in self.metrics.values():
            lines += metric.header()
            lines += metric.samples()
        return "\n".join(lines) + "\n"

    def reset(self) -> None:
        """Forget every recorded value (the families stay)."""
        for metric in self.metrics.values():
            metric.reset()
