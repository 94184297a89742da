"""This process's memory, read from ``/proc/self/status``, and the machine's available memory (Linux; no torch,
so deployment code can use it).

``VmHWM`` is the process's own peak: unlike ``ru_maxrss`` it does not carry a parent's peak across fork and
exec, so a child launched by a large parent reports its own.
"""

from __future__ import annotations


def _status_mib(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process in MiB (``VmHWM``), or ``None`` where /proc is missing."""
    return _status_mib("VmHWM")


def rss_mib() -> float | None:
    """Current resident memory of this process in MiB (``VmRSS``), or ``None`` where /proc is missing."""
    return _status_mib("VmRSS")


def available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (what can be allocated without swapping); a huge number where
    /proc is missing (the callers then assume it fits)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
