"""Counters and gauges, rendered in the Prometheus text format (version 0.0.4) on /metrics.

Counters are incremented by the services; gauges are read from callables at scrape time
so they never go stale. Label sets are bounded by their callers (a device id, a service
name), never by request input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

__all__ = ["Metrics"]

Labels = tuple[tuple[str, str], ...]
GaugeFn = Callable[[], float | Iterable[tuple[Mapping[str, str], float]]]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self, prefix: str = "appliance_") -> None:
        self.prefix = prefix
        self._help: dict[str, tuple[str, str]] = {}
        self._counters: dict[str, dict[Labels, float]] = {}
        self._gauges: dict[str, GaugeFn] = {}

    def describe_counter(self, name: str, help_text: str) -> None:
        self._help.setdefault(name, ("counter", help_text))
        self._counters.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        if name not in self._counters:
            self.describe_counter(name, name.replace("_", " "))
        key = tuple(sorted(labels.items()))
        series = self._counters[name]
        series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def gauge(self, name: str, help_text: str, fn: GaugeFn) -> None:
        """Register a gauge read at scrape time: a number, or (labels, number) pairs."""
        self._help[name] = ("gauge", help_text)
        self._gauges[name] = fn

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text) in sorted(self._help.items()):
            full = self.prefix + name + ("_total" if kind == "counter" else "")
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            if kind == "counter":
                for labels, value in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{full}{_labels(labels)} {value:g}")
            else:
                result = self._gauges[name]()
                if isinstance(result, int | float):
                    lines.append(f"{full} {result:g}")
                else:
                    for label_map, value in result:
                        lines.append(f"{full}{_labels(tuple(sorted(label_map.items())))} {value:g}")
        return "\n".join(lines) + "\n"
