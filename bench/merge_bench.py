"""Benchmarks of `lora-sdpo merge` (figures in BENCHMARKS.md).

    python bench/merge_bench.py memory [--workdir DIR] [--repeats 2]
        A random Llama of >= 1 GB (float32, shards of at most 200 MB) and a rank-16 LoRA on every
        projection. Peak RSS and wall time of `lora-sdpo merge`, of PEFT (from_pretrained +
        merge_and_unload + save_pretrained) and of `cp` of the shards, each in its own process,
        measured from outside with /usr/bin/time -v.

    python bench/merge_bench.py divergence --run runs/quickstart [--pairs 32]
        On a finished run's real adapters and real pairs of D_t: how far each merge base
        (original W, or dequant(NF4(W)) as the QLoRA adapter saw it) lands from the 4-bit + adapter
        model that was trained, before and after re-quantising the merged model to NF4 (what the
        next sDPO step, or a 4-bit deployment, loads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sidecar import Sidecar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="190MB")
"""


# ---------------------------------------------------------------------------------------------
# memory: peak RSS and time on a >= 1 GB model


def build_model(folder: Path, layers: int = 16, shard_mb: int = 190) -> int:
    """A random float32 Llama written shard by shard (never whole in memory); returns its bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sdpo.shards import OutTensor, plan_shards, write_shards

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True)
    cfg.dtype = "float32"
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    shards = plan_shards([OutTensor(n, torch.float32, s) for n, s in names.items()], shard_mb * 2**20)
    write_shards(folder, shards, lambda t: torch.ones(t.shape) if "norm" in t.name else torch.randn(t.shape, generator=gen) * 0.02)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def build_adapter(folder: Path, base: Path, r: int = 16) -> None:
    """A rank-r LoRA on every projection with non-zero B, in PEFT's file format."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lora_sdpo.shards import model_tensors

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, info in model_tensors(base).items():
        if name.removesuffix(".weight").rsplit(".", 1)[-1] in targets:
            out_f, in_f = info.shape
            module = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors")


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (of the process tree's largest member) via GNU time, from outside."""
    subprocess.run(["sync"], check=True)
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1)}


def memory(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        t = time.perf_counter()
        size = build_model(base, args.layers)
        print(f"built {base}: {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards ({time.perf_counter() - t:.0f}s)")
        build_adapter(adapter, base)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    shards = sorted(str(p) for p in base.glob("*.safetensors"))
    runs = {
        "cp of the shards": lambda out: ["cp", *shards, str(out)],
        "cp of the shards + sync": lambda out: ["sh", "-c", f"cp {' '.join(shards)} {out} && sync"],
        "lora-sdpo merge (float32)": lambda out: [py, "-m", "lora_sdpo", "merge", str(base), str(adapter), "--output", str(out),
                                                  "--dtype", "float32", "--max-shard-size", "190MB"],
        "lora-sdpo merge (bfloat16)": lambda out: [py, "-m", "lora_sdpo", "merge", str(base), str(adapter), "--output", str(out),
                                                   "--max-shard-size", "190MB"],
        "lora-sdpo merge --merge-base nf4-roundtrip (float32)": lambda out: [
            py, "-m", "lora_sdpo", "merge", str(base), str(adapter), "--output", str(out), "--dtype", "float32",
            "--max-shard-size", "190MB", "--merge-base", "nf4-roundtrip"],
        "PEFT from_pretrained + merge_and_unload + save_pretrained (float32)": lambda out: [py, "-c", PEFT_MERGE, str(base), str(adapter), str(out)],
    }
    results = {}
    for name, make in runs.items():
        results[name] = []
        for _ in range(args.repeats):
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            if name.startswith("cp"):
                out.mkdir()
            results[name].append(measure(make(out), env))
            print(f"{name}: {results[name][-1]}", flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)
    report = {
        "model": {"bytes": size, "shards": len(shards), "largest_shard_bytes": largest, "dtype": "float32",
                  "shape": f"Llama hidden 1024, intermediate 2816, {args.layers} layers, vocab 32000, untied"},
        "adapter": f"rank 16, alpha 32, q,k,v,o,gate,up,down ({7 * args.layers} LoRA pairs)",
        "machine": machine(),
        "results": results,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(int(mem) / 2**20, 1), "python": platform.python_version(),
            "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# divergence: original vs nf4-roundtrip merge base, on a real run


def _pairs(path: Path, n: int, tok, max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of the first n usable pairs, through the chat template."""
    from lora_sdpo.data import normalise

    out = []
    for line in path.read_text().splitlines():
        _, pair, problem = normalise(json.loads(line))
        if problem is not None:
            continue
        p = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        ids = [tok.apply_chat_template(pair["prompt"] + pair[k], tokenize=True, return_dict=True)["input_ids"][:max_len] for k in ("chosen", "rejected")]
        if len(p) + 8 <= max_len and all(x[: len(p)] == p for x in ids):
            out.append((p, *ids))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def _logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def divergence(args) -> dict:
    from peft import PeftModel

    from lora_sdpo import manifest
    from lora_sdpo.merge import merge_lora
    from lora_sdpo.model import load_base, load_tokenizer
    from lora_sdpo.recipe import AdapterConfig

    run = Path(args.run)
    m = manifest.read(run)
    if m is None or m.status != "done":
        raise SystemExit(f"{run}: not a finished run; make one with: lora-sdpo run recipes/quickstart.toml --output runs/quickstart")
    adapter_cfg = AdapterConfig(**m.adapter)
    fp32 = adapter_cfg.model_copy(update={"quantization": "none", "compute_dtype": "float32"})
    nf4 = adapter_cfg.model_copy(update={"compute_dtype": "float32"})
    recipe = __import__("tomllib").loads((run / "recipe.toml").read_text())
    base_dir = Path(json.loads((run / "step-1" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"])
    tok = load_tokenizer(base_dir)
    work = Path(tempfile.mkdtemp(prefix="merge-div-"))
    report = {"run": str(run), "pairs": args.pairs, "steps": []}
    for step in m.steps:
        i = step.index
        start = base_dir if i == 1 else run / f"step-{i - 1}" / "model"
        source = recipe["steps"][i - 1]["sources"][0]["path"]
        data = (ROOT / "recipes" / source).resolve() if not Path(source).is_absolute() else Path(source)
        pairs = _pairs(data, args.pairs, tok, recipe["training"]["max_length"])
        trained = PeftModel.from_pretrained(load_base(start, nf4), run / f"step-{i}" / "adapter").eval()
        models = {}
        for merge_base in ("original", "nf4-roundtrip"):
            out = work / f"{i}-{merge_base}"
            merge_lora(start, run / f"step-{i}" / "adapter", out, dtype="float32", merge_base=merge_base)
            models[f"{merge_base}, float32"] = load_base(out, fp32).eval()
            models[f"{merge_base}, re-quantised to NF4"] = load_base(out, nf4).eval()
        rows = {name: {"kl": [], "top1": [], "gamma": []} for name in models}
        gamma_trained, gamma_start = [], []
        for p, chosen, rejected in pairs:
            g = {}
            for label, ids in (("c", chosen), ("r", rejected)):
                ref = _logprobs(trained, ids)
                tgt = torch.tensor(ids[1:])
                sl = slice(len(p) - 1, None)
                g[("trained", label)] = float(ref[sl].gather(1, tgt[sl, None]).sum())
                with trained.disable_adapter():  # the step's starting point, NF4(M_{t-1})
                    g[("start", label)] = float(_logprobs(trained, ids)[sl].gather(1, tgt[sl, None]).sum())
                for name, m in models.items():
                    lp = _logprobs(m, ids)
                    if label == "c":  # divergence on the chosen completions' tokens
                        rows[name]["kl"].append(float((ref[sl].exp() * (ref[sl] - lp[sl])).sum(-1).mean()))
                        rows[name]["top1"].append(float((ref[sl].argmax(-1) == lp[sl].argmax(-1)).float().mean()))
                    g[(name, label)] = float(lp[sl].gather(1, tgt[sl, None]).sum())
            gamma_trained.append(g[("trained", "c")] - g[("trained", "r")])
            gamma_start.append(g[("start", "c")] - g[("start", "r")])
            for name in models:
                rows[name]["gamma"].append(g[(name, "c")] - g[(name, "r")])
        gt, gs = torch.tensor(gamma_trained), torch.tensor(gamma_start)
        gain = float((gt - gs).mean())
        entry = {"step": i, "data": source, "pairs": len(pairs), "gamma_start_mean": round(float(gs.mean()), 3),
                 "gamma_trained_mean": round(float(gt.mean()), 3), "models": {}}
        for name, r in rows.items():
            gm = torch.tensor(r["gamma"])
            entry["models"][name] = {
                "kl_per_token": float(torch.tensor(r["kl"]).mean()),
                "top1_agreement": round(float(torch.tensor(r["top1"]).mean()), 4),
                "mean_abs_gamma_diff": round(float((gm - gt).abs().mean()), 4),
                "gamma_mean": round(float(gm.mean()), 3),
                "gain_kept": round(float((gm - gs).mean()) / gain, 3) if gain else None,
            }
        report["steps"].append(entry)
        print(json.dumps(entry, indent=2), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report


def memory_sidecar(car: Sidecar, report: dict) -> None:
    res = report["results"]
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in res.items()}
    peak = {k: max(r["peak_rss_mb"] for r in v) for k, v in res.items()}
    walls = lambda k: " / ".join(f"{r['wall_s']:.2f}" for r in res[k])  # noqa: E731
    car.table(f"{report['model']['bytes'] / 1e9:.2f} GB float32 model in {report['model']['shards']} shards; {report['adapter']}",
              ["contender", "wall time (s), each repeat", "peak RSS (MB)"],
              [[k, walls(k), f"{peak[k]:,.0f}"] for k in res])
    lo, peft, sync = "lora-sdpo merge (float32)", next(k for k in res if k.startswith("PEFT")), "cp of the shards + sync"
    car.headline = (f"peak RSS {peak[lo]:,.0f} MB against PEFT's {peak[peft]:,.0f} MB ({peak[lo] / peak[peft]:.2f}x); "
                    f"wall {best[lo]['wall_s'] / best[sync]['wall_s']:.1f}x `cp` + `sync` (best of each)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--workdir", help="Where to build the model (default: a temporary folder).")
    m.add_argument("--repeats", type=int, default=2)
    m.add_argument("--layers", type=int, default=16, help="16 layers: 1.08 GB in float32 (fewer for a quick try).")
    m.add_argument("--keep", action="store_true", help="Keep the built model.")
    d = sub.add_parser("divergence")
    d.add_argument("--run", required=True, help="A finished run directory, e.g. runs/quickstart.")
    d.add_argument("--pairs", type=int, default=32)
    for p in (m, d):
        p.add_argument("--json", help="Also write the results here.")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    car = Sidecar(f"merge_{args.what}")
    report = memory(args) if args.what == "memory" else divergence(args)
    car.figures = report
    if args.what == "memory":
        memory_sidecar(car, report)
    car.save()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
