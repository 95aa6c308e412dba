"""The CPU benchmark set of issue 8 in one command: one printed line per figure.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/run_all.py [--only padding,logprobs,...]

Takes under 10 minutes on an idle 2-core machine (207 s measured idle, BENCHMARKS.md; a heavier
version of this set took 37 minutes at load 7-10 on the shared machine). To fit,
it runs scaled-down versions of the scripts it calls (their defaults, used for BENCHMARKS.md, are
larger):

- logprobs: 2048 tokens at vocab 32064 x hidden 1024 and 128256 x 1024, one repetition
  (BENCHMARKS.md: also hidden 2048 at both vocabularies, two repetitions);
- end_to_end: the quickstart at 16 pairs per step and 1 epoch (shipped: 64 pairs, 2 epochs), one
  round of lora-sdpo and the hand-written TRL + PEFT script;
- plan_check: the pico model and a random h512 Llama (BENCHMARKS.md: also h1024);
- merge: the 1 GB model, one repetition of each contender.

Every line carries the 1-minute load average when its benchmark started: on a shared machine
timings move with it; memory figures do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

BENCHES = {
    "padding": [PY, "bench/padding.py", "--seeds", "10"],
    "logprobs": [PY, "bench/logprobs.py", "--shapes", "32064x1024,128256x1024", "--repeats", "1"],
    "end_to_end": [PY, "bench/end_to_end.py", "--pairs", "16", "--epochs", "1"],
    "plan_check": [PY, "bench/plan_check.py", "--quick"],
    "merge": None,  # below: its output is a JSON report, summarised here
}
PREFIXES = ("padding |", "log-probs |", "end-to-end |", "step anatomy |", "planner |")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def merge_lines() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "merge.json"
        subprocess.run([PY, "bench/merge_bench.py", "memory", "--repeats", "1", "--json", str(out)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        res = json.loads(out.read_text())["results"]
    pick = lambda key: next(v[0] for k, v in res.items() if k.startswith(key))  # noqa: E731
    peft, lo32, lo16, sync = pick("PEFT"), pick("lora-sdpo merge (float32)"), pick("lora-sdpo merge (bfloat16)"), pick("cp of the shards + sync")
    return [
        f"merge | 1.08 GB float32 Llama, rank-16 LoRA on every projection | lora-sdpo float32 {lo32['wall_s']}s {lo32['peak_rss_mb']:.0f} MB, "
        f"bfloat16 {lo16['wall_s']}s {lo16['peak_rss_mb']:.0f} MB | PEFT merge_and_unload {peft['wall_s']}s {peft['peak_rss_mb']:.0f} MB | "
        f"peak RSS vs PEFT {lo32['peak_rss_mb'] / peft['peak_rss_mb']:.2f}x | wall vs cp+sync ({sync['wall_s']}s) {lo32['wall_s'] / sync['wall_s']:.1f}x"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--save", action="store_true", help="keep the scripts' sidecars in bench/results/ (default: a temporary folder, "
                   "since these scaled-down runs are not BENCHMARKS.md's figures)")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(BENCHES)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if not a.save:
        env["LORA_SDPO_BENCH_RESULTS"] = tempfile.mkdtemp(prefix="bench-results-")
        os.environ["LORA_SDPO_BENCH_RESULTS"] = env["LORA_SDPO_BENCH_RESULTS"]
    t0 = time.perf_counter()
    for name in names:
        load, t = loadavg(), time.perf_counter()
        if name == "merge":
            lines = merge_lines()
        else:
            proc = subprocess.run(BENCHES[name], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} | FAILED | {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}", flush=True)
                continue
            lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIXES)]
        for line in lines:
            print(f"{line} | load {load}", flush=True)
        print(f"# {name}: {time.perf_counter() - t:.0f}s", flush=True)
    print(f"# all: {time.perf_counter() - t0:.0f}s, load now {loadavg()}")


if __name__ == "__main__":
    main()
