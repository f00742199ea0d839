"""Reading a run's metrics.json tree: a dotted path, a metric's value, every number flattened.

One rule for what a metric value is, shared by sweeps, studies and reports: a finite real number. A bool
(a JSON flag), a NaN or an infinity reads as no value, so it is never ranked, averaged or plotted.
"""

from __future__ import annotations

import math
from typing import Any

SAMPLE_METRICS = "eval.samples"  # where a bare metric name (`fd_shapesclf`) is looked up


def dotted_get(tree: Any, path: str, default: Any = None) -> Any:
    """`tree["a"]["b"]` for `a.b`, or `default` where a step is missing or not a mapping."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return default
        tree = tree[key]
    return tree


def is_metric_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_value(metrics: dict | None, metric: str) -> float | None:
    """A bare name (`fd_shapesclf`) in eval.samples, a dotted path (`generator.diffusion_loss`) anywhere."""
    path = metric if "." in metric else f"{SAMPLE_METRICS}.{metric}"
    value = dotted_get(metrics, path)
    return float(value) if is_metric_value(value) else None


def sample_metric_name(metric: str) -> str:
    """The bare name of a path into eval.samples (`eval.samples.fd_shapesclf` -> `fd_shapesclf`), as metric_value
    reads it; any other name as it is."""
    return metric.removeprefix(f"{SAMPLE_METRICS}.")


def flatten_numbers(tree: dict | None, prefix: str = "", sep: str = ".") -> dict[str, float]:
    """Every metric value in a nested tree under its joined path, e.g. {"eval.samples.fid": 3.1}."""
    out: dict[str, float] = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            out.update(flatten_numbers(value, f"{prefix}{key}{sep}", sep))
        elif is_metric_value(value):
            out[f"{prefix}{key}"] = value
    return out
