"""How many pairs the gamma matrix needs: the standard error of the paper's paired comparison by n.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/gamma_sample.py RUN_DIR [--recipe recipes/quickstart.toml]

From a finished run: per-pair gammas of S and of each step's reference M_{t-1} on ALL of D_t
(M_{t-1}'s come from the step's own reference pass, step-t/data/ref_logps.safetensors; S's are
measured here, one NF4 pass per step), then for the first n pairs (n = 4, 8, 16, 32, 64, all)
the paired difference M_{t-1} - S with its standard error, against the unpaired standard error
the matrix's two cells would give. Prints one JSON document. Nothing in RUN_DIR is written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from safetensors.torch import load_file

from lora_sdpo import manifest
from lora_sdpo.data import tokenize_pair
from lora_sdpo.diagnostics import gammas, paired_difference
from lora_sdpo.fetch import local_model_dir
from lora_sdpo.model import load_base, load_tokenizer
from lora_sdpo.recipe import load_recipe
from sidecar import Sidecar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--recipe", default="recipes/quickstart.toml")
    args = ap.parse_args()
    car = Sidecar("gamma_sample")
    rec = load_recipe(args.recipe)
    m = manifest.read(args.run)
    if m is None:
        raise SystemExit(f"{args.run}: no manifest.json; give a run directory (lora-sdpo run ... --output DIR)")
    base = local_model_dir(rec.model_location())
    tok = load_tokenizer(base)
    model = load_base(base, rec.adapter)
    out = {"run": str(args.run), "steps": {}}
    for s in m.steps[1:]:
        t = s.index
        rows = [json.loads(x) for x in (args.run / f"step-{t}" / "data" / "pairs.jsonl").read_text().splitlines()]
        ref = load_file(args.run / f"step-{t}" / "data" / "ref_logps.safetensors")
        g_ref = ref["chosen"] - ref["rejected"]
        c0 = time.process_time()
        g_s = gammas(model, [tokenize_pair(r, tok) for r in rows], tok, rec.recipe.training.max_length)
        cpu = time.process_time() - c0
        by_n = {}
        for n in sorted({4, 8, 16, 32, 64, len(rows)} & set(range(2, len(rows) + 1))):
            p = paired_difference(g_ref[:n], g_s[:n])
            unpaired = math.sqrt(float(g_ref[:n].var()) / n + float(g_s[:n].var()) / n)
            by_n[n] = {"mean": round(p["mean"], 2), "se": round(p["se"], 2), "share_positive": round(p["frac_positive"], 2),
                       "se_unpaired": round(unpaired, 2)}
        d = (g_ref - g_s).tolist()
        out["steps"][f"M_{t - 1} - S on D_{t}"] = {
            "pairs": len(rows),
            "sd_S": round(float(g_s.std()), 1), "sd_reference": round(float(g_ref.std()), 1),
            "sd_paired": round(statistics.stdev(d), 2),
            "pairs_for_se_2.5": math.ceil((statistics.stdev(d) / 2.5) ** 2),
            "cpu_s_for_S_pass": round(cpu, 1),
            "by_n": by_n,
        }
    print(json.dumps(out, indent=1))
    car.figures = out
    car.table(f"paired difference M_(t-1) - S on D_t by sample size, {args.recipe}", ["comparison", "n", "mean", "paired s.e.",
              "unpaired s.e.", "share positive"], [[k if i == 0 else "", str(n), str(v["mean"]), str(v["se"]), str(v["se_unpaired"]),
              str(v["share_positive"])] for k, st in out["steps"].items() for i, (n, v) in enumerate(st["by_n"].items())])
    car.headline = "; ".join(f"{k}: {st['pairs_for_se_2.5']} pairs for a paired s.e. of 2.5 (paired s.d. {st['sd_paired']})"
                             for k, st in out["steps"].items())
    car.save()


if __name__ == "__main__":
    main()
