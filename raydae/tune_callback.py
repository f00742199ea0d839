"""The Ray Train callback that forwards a stage's reports to Tune inside a sweep trial.

Its own module because it subclasses a class from `ray.tune`; only `launch` imports it, and only when the
stage runs inside a trial, so plain runs never import Tune."""

from __future__ import annotations

from ray.tune.integration.ray_train import TuneReportCallback

from raydae.sweep import ASHA_METRIC, ASHA_TIME


class StageReportCallback(TuneReportCallback):
    """Tune's Train callback, adding what the sweep's scheduler compares: generator step and loss."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def after_report(self, run_context, metrics, checkpoint):
        metrics = [dict(m) for m in metrics]
        first = metrics[0]
        first["stage"] = self.stage
        if self.stage == "generator" and "loss/total" in first:
            first[ASHA_TIME] = first.get("step", 0)
            first[ASHA_METRIC] = first["loss/total"]
        super().after_report(run_context, metrics, checkpoint)
