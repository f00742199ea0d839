"""A node lost during stage 1 on a (simulated) multi-node cluster: the stage finishes from its checkpoint.

`ray.cluster_utils.Cluster` needs a Ray of its own, so the scenario runs in a child process and prints
what the test checks.
"""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

SCENARIO = r"""
import json, os, sys, threading, time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
import ray
from ray.cluster_utils import Cluster

from raydae.checkpoints import load_state
from raydae.config import load_config
from raydae.pipeline import RunOptions, run_pipeline

storage = Path(sys.argv[1])
# The head holds no CPUs, so the Train worker (and Ray Data) must run on the worker node.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
doomed = cluster.add_node(num_cpus=2)
ray.init(address=cluster.address)
config = load_config("tiny", overrides=["train.mode=joint", "train.joint_steps=40", "train.checkpoint_every=4",
                                        "train.log_every=4", "scaling.max_failures=2"])
outcome = {}

def train():
    try:
        outcome["metrics"] = run_pipeline(config, RunOptions(storage=str(storage), name="lost-node"))
    except BaseException as err:
        outcome["error"] = repr(err)

thread = threading.Thread(target=train)
thread.start()
stage = storage / "lost-node" / "joint"
deadline = time.time() + 120
while not list(stage.glob("checkpoint_*")) and time.time() < deadline:
    time.sleep(0.2)
time.sleep(1.5)  # let the controller register the checkpoint
cluster.remove_node(doomed)
cluster.add_node(num_cpus=2)  # the replacement an autoscaler would bring
thread.join(240)
if "metrics" in outcome:
    history = load_state(outcome["metrics"]["stages"]["joint"]["checkpoint"])["history"]
    outcome = {"steps": outcome["metrics"]["stages"]["joint"]["steps"], "history": history}
print("OUTCOME " + json.dumps(outcome, default=str), flush=True)
"""


def test_a_lost_worker_node_resumes_stage_one_from_its_checkpoint(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path)], capture_output=True, text=True,
                          timeout=280)
    lines = [line for line in done.stdout.splitlines() if line.startswith("OUTCOME ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    outcome = json.loads(lines[-1][len("OUTCOME "):])
    assert "error" not in outcome, outcome
    assert outcome["steps"] == 40
    starts = [attempt["attempt_start_step"] for attempt in outcome["history"]]
    assert starts[0] == 0 and len(starts) >= 2 and starts[-1] >= 4  # resumed from a checkpoint, not step 0
