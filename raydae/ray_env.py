"""Environment settings that make Ray's console output readable; they must be set before `import ray`."""

QUIET_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # worker prints appear once, not twice (RAY.md)
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # no per-fit preemption-watcher warning
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",  # Ray Data's per-dataset "execution plan / progress / finished" lines
}
