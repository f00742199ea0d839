"""What the bench scripts share: the machine description, the result table and the JSON result file.

Not a raydae module: the scripts in bench/ import it from their own folder (`python bench/<script>.py`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def other_load() -> list[str]:
    """Other CPU-heavy raydae jobs seen at start (a sweep or run would skew a 2-core machine's figures)."""
    found = []
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if ("raydae sweep" in cmd or "raydae run" in cmd) and "bench/" not in cmd:
            found.append(f"{pid}: {cmd[:120]}")
    return found


def machine(device: str) -> dict:
    """The machine a result was measured on: CPU model, cores, memory, versions, device."""
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "other_raydae_jobs_at_start": other_load(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def describe(info: dict) -> str:
    text = f"{info['cpu_model']}, {info['cpu_cores']} cores, {info['memory_gib']} GiB; torch {info['torch']}"
    if info.get("ray"):
        text += f", ray {info['ray']}"
    text += f"; device {info['device']}"
    if info.get("gpu"):
        text += f" ({info['gpu']})"
    return text


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise SystemExit(f"--device {device}: give cpu or cuda")


def warn_other_load(info: dict) -> None:
    if info["other_raydae_jobs_at_start"]:
        print("WARNING: other raydae jobs are running; figures will be skewed by contention:")
        for line in info["other_raydae_jobs_at_start"]:
            print(f"  {line}")


def table(rows: list[tuple], headers: tuple) -> str:
    """A plain fixed-width table (the first column left-aligned, the rest right-aligned)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, len(row))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def default_out(script: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(BENCH_DIR, "results", f"{script}-{stamp}.json")


def write_result(path: str | None, script: str, result: dict) -> str:
    path = path or default_out(script)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = {"script": script, "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv, **result}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def init_ray(num_cpus: int, device: str, dashboard: bool = False) -> None:
    """A new embedded Ray (never a stale cluster), quiet; no dashboard unless asked (`raydae run` has one)."""
    from raydae.ray_env import QUIET_RAY_ENV

    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    kwargs = {}
    if not device.startswith("cuda"):
        kwargs["num_gpus"] = 0
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=True, **kwargs)


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
