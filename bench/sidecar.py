"""The JSON sidecar every benchmark script writes: what was run, where, under what load, and every figure.

A script builds one `Sidecar` when it starts (the load sampler starts with it) and calls `save()` at
the end; `bench/render.py` turns the sidecars under bench/results/ into BENCHMARKS.md. The page
shows a sidecar's tables and lines as they are, so a script formats its own cells; the raw numbers
go into `figures` beside them, for whoever wants to recompute a cell.

    {"name", "command", "commit", "dirty", "date", "wall_s",
     "machine": {"cpu", "cores", "isa", "ram_gb", "python", "torch", "threads", ...},
     "load": {"start", "end", "max"},          # 1-minute load average, sampled every 5 s
     "headline": "...",                        # one line for the page's summary table
     "tables": [{"title", "header", "rows"}], "lines": [...], "figures": {...}}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"  # $LORA_SDPO_BENCH_RESULTS overrides (bench/run_all.py writes elsewhere)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
LIBRARIES = ("torch", "transformers", "trl", "peft", "bitsandbytes")


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    ram = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    out = {"cpu": model, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags], "ram_gb": round(ram / 2**20, 1),
           "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        out["threads"] = sys.modules["torch"].get_num_threads()
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        out["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    return out


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class Sidecar:
    def __init__(self, name: str, argv: list[str] | None = None):
        self.name = name
        argv = sys.argv if argv is None else argv
        script = Path(argv[0]).resolve()
        rel = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
        isa = f"ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']} " if os.environ.get("ONEDNN_MAX_CPU_ISA") else ""
        self.command = f"{isa}HF_HUB_OFFLINE=1 .venv/bin/python " + shlex.join([str(rel), *argv[1:]])
        self.tables: list[dict] = []
        self.lines: list[str] = []
        self.figures: dict = {}
        self.headline = ""
        self._t0 = time.perf_counter()
        self._load = [loadavg()]
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(5.0):
            self._load.append(loadavg())

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        self.tables.append({"title": title, "header": header, "rows": [[str(c) for c in r] for r in rows]})

    def line(self, text: str) -> None:
        self.lines.append(text)

    def save(self, folder: Path | None = None) -> Path:
        """Write bench/results/NAME.json under a temporary name, then rename; returns the path."""
        folder = folder or Path(os.environ.get("LORA_SDPO_BENCH_RESULTS", RESULTS))
        self._stop.set()
        self._load.append(loadavg())
        doc = {
            "name": self.name,
            "command": self.command,
            "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "machine": machine(),
            "load": {"start": self._load[0], "end": self._load[-1], "max": max(self._load)},
            "headline": self.headline,
            "tables": self.tables,
            "lines": self.lines,
            "figures": self.figures,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
        print(f"sidecar: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
        return path
