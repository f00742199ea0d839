"""Sweep callbacks: the Ray Train callback that forwards a stage's reports to Tune inside a trial, and the
driver's Tune callback that reclaims placement groups a stopped trial left behind.

Its own module because both subclass classes from `ray.tune`; only `sweep` imports it (a trial hands
`StageReportCallback` to its stages through `RunOptions.stage_callbacks`), so plain runs never import Tune."""

from __future__ import annotations

import time

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from raydae.sweep_spec import scheduler_metrics


class StageReportCallback(TuneReportCallback):
    """Tune's Train callback, adding what the sweep's scheduler may compare: generator step, the sample
    probe's distance and (not comparable across latents) the training loss."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def after_report(self, run_context, metrics, checkpoint):
        metrics = [dict(m) for m in metrics]
        first = metrics[0]
        first["stage"] = self.stage
        first.update(scheduler_metrics(self.stage, first))
        super().after_report(run_context, metrics, checkpoint)


class ReclaimLeakedPlacementGroups(Callback):
    """Driver-side: remove placement groups whose creator actor died, that no live actor uses.

    Why: Ray Train creates each run's worker placement group from its controller actor and relies on a
    PlacementGroupCleaner actor to remove it when the controller dies (a placement group outlives a dead
    creator actor while the creating job lives). When ASHA stopped a trial on a 2-core laptop the cleaner's
    monitor thread died on an exception it does not catch (Ray 2.60: its state-API lookup found no
    dashboard, or a stale /tmp/ray/ray_current_cluster address), the group stayed reserved, and the next
    trial's Ray Data waited forever for that CPU ("Cluster resources are not enough").

    Reads the GCS tables directly (no dashboard needed). Only groups created by this job, whose creator
    actor is dead and in which no actor that is not DEAD (pending ones included) is placed, are removed.
    """

    def __init__(self, every_s: float = 15.0):
        self.every_s = every_s
        self._last_check = 0.0
        self.removed: list[str] = []

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last_check >= self.every_s:
            self._last_check = time.monotonic()
            self._check_quietly()

    def on_experiment_end(self, trials, **info):
        # A last look: a trial stopped in the final seconds would otherwise keep its CPUs reserved for as
        # long as this driver's Ray lives (a notebook, a test session, a driver on a shared cluster).
        self._check_quietly()

    def _check_quietly(self) -> None:
        try:
            self.check()
        except Exception as err:  # a busy GCS can time out; the sweep goes on either way
            print(f"[sweep] placement-group check skipped: {type(err).__name__}: {err}", flush=True)

    def check(self) -> list[str]:
        import ray
        from ray._private.state import state
        from ray._raylet import PlacementGroupID
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = state._connect_and_get_accessor()
        job = bytes.fromhex(ray.get_runtime_context().get_job_id())
        actors = [gcs_pb2.ActorTableData.FromString(b) for b in accessor.get_actor_table(None, None)]
        used = {a.placement_group_id for a in actors if a.state != gcs_pb2.ActorTableData.DEAD}
        no_actor = {b"", ray.ActorID.nil().binary()}  # made by a driver: it lives as long as the job
        removed = []
        for raw in accessor.get_placement_group_table():
            group = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (group.state == gcs_pb2.PlacementGroupTableData.CREATED and group.creator_job_id == job
                    and group.creator_actor_id not in no_actor and group.creator_actor_dead
                    and not group.is_detached
                    and group.placement_group_id not in used):
                remove_placement_group(PlacementGroup(PlacementGroupID(group.placement_group_id)))
                removed.append(group.placement_group_id.hex())
                print(f"[sweep] removed placement group {removed[-1]}: its creator (a stopped trial's Train "
                      "controller) is dead and no actor uses it", flush=True)
        self.removed += removed
        return removed
