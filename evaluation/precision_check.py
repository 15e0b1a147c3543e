"""Effect of a compressed-weight precision on the evaluation metrics (``train/bench_precision.py``).

Two ``metrics.json`` documents of ``train/evaluate.py`` for the same checkpoint, split, seed and
sampler (the same windows and the same noise) differ only by ``precision``; every metric value
present in both is compared. The relative change is ``(other - ref) / |ref|``; values whose
reference magnitude is below ``floor`` (e.g. a correlation near 0, whose relative change is
meaningless) are compared by absolute difference instead and reported as such.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["MetricChange", "metric_values", "compare_reports", "worst_change", "check_same_setting"]

SETTING_KEYS = ("checkpoint", "dataset", "split", "n_windows", "seed", "steps", "w_speak", "w_listen", "convention")


@dataclass(frozen=True)
class MetricChange:
    metric: str        # path, e.g. all/table1/listening/FDD
    ref: float
    other: float
    relative: bool     # True: ``change`` is relative to |ref|; False: absolute (|ref| below the floor)

    @property
    def change(self) -> float:
        d = self.other - self.ref
        return d / abs(self.ref) if self.relative else d


def metric_values(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every numeric metric ``value`` of a metrics.json section (dicts holding ``value``, or plain numbers)."""
    for key, v in doc.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(v, Mapping):
            if "value" in v:
                if isinstance(v["value"], (int, float)) and not isinstance(v["value"], bool) and math.isfinite(v["value"]):
                    yield path, float(v["value"])
            else:
                yield from metric_values(v, path)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ("n", "n_windows") and math.isfinite(v):
            yield path, float(v)


def check_same_setting(ref: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    """Both reports must score the same windows with the same sampler; else ValueError naming the key."""
    for key in SETTING_KEYS:
        if ref.get(key) != other.get(key):
            raise ValueError(f"the reports differ in {key!r} ({ref.get(key)!r} vs {other.get(key)!r}): "
                             f"only the precision may differ")


def compare_reports(ref: Mapping[str, Any], other: Mapping[str, Any], sections=("all", "expressive"),
                    floor: float = 0.05) -> list[MetricChange]:
    """Changes of every metric present in both reports' ``sections`` (module docstring)."""
    check_same_setting(ref, other)
    out = []
    for sec in sections:
        a = dict(metric_values(ref.get(sec) or {}, sec))
        b = dict(metric_values(other.get(sec) or {}, sec))
        for path in a.keys() & b.keys():
            if path.endswith("/frames/speaking") or path.endswith("/frames/listening"):
                continue  # counts, not metrics
            out.append(MetricChange(path, a[path], b[path], relative=abs(a[path]) >= floor))
    return sorted(out, key=lambda c: c.metric)


def worst_change(changes: list[MetricChange], relative: bool = True) -> MetricChange | None:
    """The change of largest magnitude among the relative (or absolute) ones; None if there is none."""
    sel = [c for c in changes if c.relative == relative]
    return max(sel, key=lambda c: abs(c.change), default=None)
