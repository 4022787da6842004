"""What the numbers were measured on: CPU, cores, memory, GPU, Python and library versions."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

_LIBRARIES = ("torch", "nnsight", "transformers", "numpy", "msgpack", "cloudpickle", "dill", "zstandard")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().total


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return ", ".join(names) + f" (CUDA {torch.version.cuda})"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def describe() -> dict:
    """The machine and software, as recorded in latest.json and RESULTS.md."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "libraries": {name: _version(name) for name in _LIBRARIES},
        "load_average_at_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages: on a machine others share, how busy it was."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
