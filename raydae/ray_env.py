"""Environment settings that make Ray's console output readable; Ray reads them when it is imported.

Importing this module sets them (where the environment does not already): `cli.py` imports it before
anything that imports Ray, and `launch.connect` sets them again for library use.
"""

import os

QUIET_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints appear once, not twice
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no per-fit preemption-watcher warning
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data's per-dataset "execution plan / progress / finished" lines
    # Ray folds lines that differ only in their numbers into one "[repeated 2x across cluster]": in a sweep
    # that hid one trial's "[stage1] step 200/300 ..." behind another's. raydae's own tagged lines stay whole.
    "RAY_DEDUP_LOGS_ALLOW_REGEX": r"^\[[a-z0-9_]+\] ",
}

for _key, _value in QUIET_RAY_ENV.items():
    os.environ.setdefault(_key, _value)
