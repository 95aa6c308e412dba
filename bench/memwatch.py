"""Memory helpers for the benchmarks: run a child under an RSS cap, and read RSS figures.

`run_capped` starts a command and samples its resident set every 50 ms from /proc; when it passes
the cap the child is killed (SIGKILL) and reported as out of memory with the RSS it reached, before
the kernel's OOM killer would pick a process of the machine (possibly someone else's). The cap
defaults to the memory available when the benchmark starts, less a margin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MB = 2**20
GB = 2**30


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (MemAvailable, MemTotal, ...)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def status(field: str, pid: int | str = "self") -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def default_cap(margin: int = 2 * GB) -> int:
    """The memory available now, less `margin`: what a child may take without pushing others out."""
    return max(GB, meminfo("MemAvailable") - margin)


@dataclass
class Capped:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # the highest RSS sampled (bytes)
    out_of_memory: bool  # killed at the cap by run_capped


def run_capped(cmd: list[str], cap: int, sample_s: float = 0.05, **popen) -> Capped:
    """Run `cmd`, killing it when its RSS passes `cap` bytes; its output is captured."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
        max_rss, killed = 0, False
        while proc.poll() is None:
            try:
                rss = status("VmRSS", proc.pid)
            except (FileNotFoundError, KeyError, ProcessLookupError):
                rss = 0  # exiting
            max_rss = max(max_rss, rss)
            if rss > cap:
                killed = True
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(sample_s)
        out.seek(0)
        err.seek(0)
        return Capped(proc.returncode, out.read(), err.read(), max_rss, killed)
