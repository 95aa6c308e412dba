"""Where a run's memory goes: RSS sampled every 50 ms with phase marks, and which models outlive their step.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quickstart_memory.py                  # 4 steps of 16 pairs on the quickstart's model and data
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quickstart_memory.py --quickstart     # recipes/quickstart.toml itself
    HF_HUB_OFFLINE=1 .venv/bin/python bench/quickstart_memory.py --steps 6 --pairs 8 --set KEY=VALUE ...

Runs `lora-sdpo run` in this process (the CLI's own entry point) with a thread that reads VmRSS from
/proc every 50 ms. Phase marks come from wrapping lora-sdpo's step functions (model loads, the
trainer's construction with the reference pass, training, the retention passes, the merge, the
gamma rows, the samples); nothing in the run changes. Prints, per step and phase, the RSS when the
phase starts and ends and its peak; the run's peak (VmHWM) and in which phase it fell; and, when
each step starts, how many of the models loaded by earlier steps are still alive after a
gc.collect() (weak references: a step's models should be gone by the next step).

The generated N-step recipe is the quickstart's (model, adapter, training settings) with N steps of
`--pairs` pairs each, alternating Orca and UltraFeedback rows without overlap, gamma matrix and
samples as the quickstart has them. The peak of a run of many steps must not grow with N.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
MB = 2**20


def recipe_text(steps: int, pairs: int) -> str:
    base = (ROOT / "recipes" / "quickstart.toml").read_text().split("[[steps]]")[0]
    base = base.replace('"../models/', f'"{ROOT}/models/').replace('"../data/', f'"{ROOT}/data/')
    data = [ROOT / "data" / "orca_dpo_pairs" / "validation.jsonl", ROOT / "data" / "ultrafeedback" / "train_clean.jsonl"]
    out = [base]
    for i in range(steps):
        out.append(f'[[steps]]\n[[steps.sources]]\npath = "{data[i % 2]}"\noffset = {(i // 2) * pairs}\nlimit = {pairs}\n')
    out.append("[retention]\nsample_size = 16\n\n[diagnostics]\ngamma_sample = 8\n")
    return "\n".join(out)


class Sampler:
    def __init__(self, interval: float):
        from memwatch import status

        self.status, self.interval = status, interval
        self.stack: list[str] = ["start"]
        self.trim = None
        self.samples: list[tuple[float, int, str]] = []
        self.events: list[tuple[float, int, str, str]] = []  # (t, rss, "enter"/"exit", label)
        self.t0 = time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def label(self) -> str:
        return " > ".join(self.stack)

    def _loop(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.status("VmRSS"), self.label()))
            time.sleep(self.interval)

    def mark(self, kind: str, label: str):
        self.events.append((time.perf_counter() - self.t0, self.status("VmRSS"), kind, label))

    def wrap(self, owner, attr: str, label):
        """Mark entry and exit of owner.attr (owner[attr] for a dict, e.g. step.PHASES)."""
        fn = owner[attr] if isinstance(owner, dict) else getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            name = label(*a, **k) if callable(label) else label
            self.stack.append(name)
            self.mark("enter", self.label())
            try:
                return fn(*a, **k)
            finally:
                if self.trim is not None:
                    self.trim(0)
                self.mark("exit", self.label())
                self.stack.pop()

        if isinstance(owner, dict):
            owner[attr] = wrapped
        else:
            setattr(owner, attr, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", action="store_true", help="run recipes/quickstart.toml instead of the generated recipe")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--trim-phases", action="store_true", help="an experiment: glibc malloc_trim(0) after every marked phase")
    ap.add_argument("--json")
    args = ap.parse_args()

    from memwatch import status
    from sidecar import Sidecar

    car = Sidecar("quickstart_memory" + ("" if args.quickstart else f"-{args.steps}x{args.pairs}"))
    from lora_sdpo import cli, step as step_mod
    from lora_sdpo.samples import SampleLog

    s = Sampler(args.interval)
    if args.trim_phases:
        import ctypes

        s.trim = ctypes.CDLL("libc.so.6").malloc_trim
    models: list[tuple[int, str, weakref.ref]] = []  # (step, what, model)
    alive_at_start: dict[int, list[str]] = {}
    current = {"step": 0}

    def step_label(step):
        current["step"] = index = step.index
        gc.collect()
        alive_at_start[index] = [f"step {st} {what}" for st, what, r in models if r() is not None]
        return f"step {index} start"

    load_base = step_mod.load_base

    def tracked_load_base(*a, **k):
        m = load_base(*a, **k)
        models.append((current["step"], str(Path(a[0]).name), weakref.ref(m)))
        return m

    step_mod.load_base = tracked_load_base
    s.wrap(step_mod, "first_phase", step_label)
    for name in step_mod.PHASE_NAMES:  # each phase of each step
        s.wrap(step_mod.PHASES, name, lambda step, *a, name=name: f"step {step.index} {name}")
    s.wrap(step_mod, "load_base", "load model")
    s.wrap(step_mod.ResumableDPOTrainer, "__init__", "trainer")
    s.wrap(step_mod, "reference_logps", "reference pass")
    s.wrap(step_mod.ResumableDPOTrainer, "train", "train")
    s.wrap(step_mod, "sequence_logps", "retention pass")
    s.wrap(step_mod, "merge_lora", "merge")
    s.wrap(step_mod.StepContext, "gamma_row", "gamma row")
    s.wrap(SampleLog, "record", "samples")

    with tempfile.TemporaryDirectory() as d:
        if args.quickstart:
            recipe = ROOT / "recipes" / "quickstart.toml"
        else:
            recipe = Path(d) / "recipe.toml"
            recipe.write_text(recipe_text(args.steps, args.pairs))
        argv = ["run", str(recipe), "--output", str(Path(d) / "run")] + [x for o in args.overrides for x in ("--set", o)]
        s.mark("enter", "start")
        s.thread.start()
        t = time.perf_counter()
        try:
            cli.main(argv, standalone_mode=False)
        finally:
            s.stop.set()
            s.thread.join()
        wall = time.perf_counter() - t
        peak = status("VmHWM")

    # per (top two levels of the phase stack): rss at first enter, at last exit, and the peak sample
    phases: dict[str, dict] = {}
    for t_, rss, kind, label in s.events:
        key = " > ".join(label.split(" > ")[:3])
        p = phases.setdefault(key, {"enter": rss, "exit": rss, "peak": rss})
        if kind == "exit":
            p["exit"] = rss
    for t_, rss, label in s.samples:
        key = " > ".join(label.split(" > ")[:3])
        p = phases.setdefault(key, {"enter": rss, "exit": rss, "peak": rss})
        p["peak"] = max(p["peak"], rss)
    top = max(s.samples, key=lambda x: x[1]) if s.samples else (0, 0, "")
    print(f"quickstart memory | {'recipes/quickstart.toml' if args.quickstart else f'{args.steps} steps x {args.pairs} pairs'} "
          f"{' '.join(args.overrides)} | peak RSS {peak / MB:,.0f} MB (VmHWM); highest sample {top[1] / MB:,.0f} MB at "
          f"{top[0]:.0f}s in '{top[2]}'; {len(s.samples)} samples, {wall:.0f}s")
    print("| phase | RSS at start | peak | at end |\n|---|---|---|---|")
    for k, p in phases.items():
        print(f"| {k} | {p['enter'] / MB:,.0f} | {p['peak'] / MB:,.0f} | {p['exit'] / MB:,.0f} |")
    steps = sorted({int(k.split(" > ")[1].split()[1]) for k in phases if k.startswith("start > step ")})
    per_step = {i: max(p["peak"] for k, p in phases.items() if k.startswith(f"start > step {i}")) for i in steps}
    print("peak per step (MB): " + ", ".join(f"{i}: {v / MB:,.0f}" for i, v in per_step.items()))
    for i, alive in alive_at_start.items():
        print(f"models alive when step {i} starts: {len(alive)}" + (f" ({', '.join(alive)})" if alive else ""))
    car.figures = {"peak": peak, "phases": phases, "per_step": per_step, "alive": alive_at_start}
    car.table("RSS by phase (MB; the sub-phases are in the sidecar's figures)", ["phase", "at start", "peak", "at end"],
              [[k.removeprefix("start > "), f"{p['enter'] / MB:,.0f}", f"{p['peak'] / MB:,.0f}", f"{p['exit'] / MB:,.0f}"]
               for k, p in phases.items() if k.count(" > ") <= 1])
    car.line(f"models alive when a step starts: {', '.join(f'step {i}: {len(a)}' for i, a in alive_at_start.items())}")
    car.headline = f"peak RSS {peak / MB:,.0f} MB (VmHWM), in '{top[2]}'"
    car.save()
    if args.json:
        Path(args.json).write_text(json.dumps({"peak": peak, "phases": phases, "per_step": per_step, "alive": alive_at_start,
                                               "samples": s.samples, "events": s.events}, indent=0))


if __name__ == "__main__":
    main()
