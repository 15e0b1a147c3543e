"""evaluation/precision_check.py: every metric of two evaluation reports compared; only the precision may differ."""
from __future__ import annotations

import pytest

from gdpo_listener.evaluation.precision_check import compare_reports, metric_values, worst_change


def report(fdd: float, corr: float, **setting) -> dict:
    base = {"checkpoint": "c", "dataset": "d", "split": "test", "n_windows": 4, "seed": 0, "steps": 10, "w_speak": 1.0,
            "w_listen": 1.0, "convention": "velocity", "precision": "fp32"}
    section = {"n_windows": 4, "frames": {"speaking": 10, "listening": 12},
               "table1": {"listening": {"FDD": {"value": fdd, "n": 4}, "LVE": {"value": None, "n": 0}}},
               "supplementary": {"listening": {"rPCC": {"exp": {"value": corr}}}}}
    return {**base, **setting, "all": section, "expressive": section}


def test_metric_values_skip_counts_and_missing_values():
    vals = dict(metric_values(report(50.0, 0.01)["all"], "all"))
    assert vals == {"all/frames/speaking": 10.0, "all/frames/listening": 12.0, "all/table1/listening/FDD": 50.0,
                    "all/supplementary/listening/rPCC/exp": 0.01}


def test_compare_reports_relative_and_absolute_changes():
    changes = compare_reports(report(50.0, 0.01), report(51.5, 0.02, precision="bf16"))
    by = {c.metric: c for c in changes}
    assert set(by) == {f"{s}/{m}" for s in ("all", "expressive")
                       for m in ("table1/listening/FDD", "supplementary/listening/rPCC/exp")}  # no frame counts
    fdd = by["all/table1/listening/FDD"]
    assert fdd.relative and fdd.change == pytest.approx(0.03)
    corr = by["all/supplementary/listening/rPCC/exp"]
    assert not corr.relative and corr.change == pytest.approx(0.01)  # near zero: absolute difference
    assert worst_change(changes).metric.endswith("FDD") and worst_change(changes, relative=False).change == pytest.approx(0.01)


def test_reports_of_different_settings_are_refused():
    with pytest.raises(ValueError, match="'seed'"):
        compare_reports(report(50.0, 0.1), report(50.0, 0.1, seed=1))
