"""The memory planner's formula against measured peaks of real DPO steps on the CPU.

For each model (the shipped pico model, and random-initialised Llamas built here with the phi-3
vocabulary), one child process per setting: load the model as a step does (NF4 from float32,
float32 compute), precompute the reference with TRL's DPOTrainer and run one optimizer step on
synthetic pairs whose every sequence fills max_length (the worst case the planner assumes). From
/proc/self/status: the RSS the weights add to the interpreter, and the peak RSS of training above
the RSS before it (clear_refs resets the high-water mark). Against them: `memory_estimate(...,
device="cpu")` of lora_sdpo/plan.py, the GPU formula with the CPU's LM head path and no CUDA
context.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/plan_check.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sidecar import Sidecar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PICO = ROOT / "models" / "pico-llama-phi3"
MB = 2**20

# (name, config overrides of a random Llama or None for the pico model, batch, max_length, checkpointing)
SETTINGS = [
    ("pico (quickstart)", None, 8, 256, False),
    ("pico (quickstart)", None, 8, 256, True),
    ("llama h512 x8 layers", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4), 2, 512, False),
    ("llama h512 x8 layers", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4), 2, 512, True),
    ("llama h1024 x8 layers", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4), 2, 512, False),
    ("llama h1024 x8 layers", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4), 2, 512, True),
]


def status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(overrides: dict, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((PICO / "config.json").read_text())
    cfg.update(overrides, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PICO / f, folder / f)


def child(model: str, batch: int, max_length: int, gc: bool) -> dict:
    import datasets

    from lora_sdpo.model import load_base, load_tokenizer, lora_config
    from lora_sdpo.recipe import load_recipe
    from lora_sdpo.trainer import dpo_config
    from trl import DPOTrainer

    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.toml",
        [f"training.per_device_train_batch_size={batch}", f"training.max_length={max_length}",
         f"training.gradient_checkpointing={str(gc).lower()}", "training.group_by_length=false"],
    )
    tok = load_tokenizer(model)
    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from or have not are but".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    # prompts of a quarter of max_length, completions longer than the rest: every sequence is cut at max_length
    rows = [{"prompt": text(max_length // 4), "chosen": text(max_length), "rejected": text(max_length)} for _ in range(batch)]
    before = status("VmRSS")
    model_ = load_base(model, recipe.adapter)
    weights = status("VmRSS") - before
    with tempfile.TemporaryDirectory() as out:
        args = dpo_config(recipe.step_settings(1), Path(out))
        args.precompute_ref_log_probs = True  # plain TRL here: its own reference pass, as before training
        args.max_steps = 1
        trainer = DPOTrainer(model=model_, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, peft_config=lora_config(recipe.adapter))
        lens = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset]
        assert min(lens) >= max_length, lens
        base = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        trainer.train()
        train_peak = status("VmHWM") - base
    return {"weights": weights, "train_peak": train_peak}


def estimate(model: str, batch: int, max_length: int, gc: bool) -> dict:
    from lora_sdpo.plan import memory_estimate
    from lora_sdpo.recipe import load_recipe

    # the child trains on TRL's own path (two rows, TRL's head), so the planner is asked about that path
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", [f"training.per_device_train_batch_size={batch}", f"training.max_length={max_length}",
                                                                "training.prefix_sharing=false"])
    config = json.loads((Path(model) / "config.json").read_text())
    return memory_estimate(config, recipe.adapter, recipe.recipe.training, device="cpu", gradient_checkpointing=gc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the pico model and the h512 model only")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--json")
    a = p.parse_args()
    if a.child:
        model, batch, length, gc = a.child
        print(json.dumps(child(model, int(batch), int(length), gc == "1")))
        return
    car = Sidecar("plan_check-quick" if a.quick else "plan_check")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="sdpo-plan-"))
    built: dict[str, Path] = {}
    results = []
    for name, overrides, batch, length, gc in SETTINGS[:4] if a.quick else SETTINGS:
        if overrides is None:
            model = PICO
        else:
            if name not in built:
                built[name] = work / name.replace(" ", "_")
                build(overrides, built[name])
            model = built[name]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(model), str(batch), str(length), "1" if gc else "0"],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        e = estimate(str(model), batch, length, gc)
        e_weights = e["base weights"]
        e_train = sum(v for k, v in e.items() if k != "base weights")
        act = next(v for k, v in e.items() if k.startswith("activations"))
        results.append({"model": name, "batch": batch, "max_length": length, "gc": gc, "measured": m, "estimate": e})
        print(
            f"planner | {name}, {batch}x2x{length} tokens, gradient checkpointing {'on' if gc else 'off'} | "
            f"weights measured {m['weights'] / MB:.0f} MB, estimated {e_weights / MB:.0f} MB | "
            f"training peak measured {m['train_peak'] / MB:.0f} MB, estimated {e_train / MB:.0f} MB "
            f"({e_train / m['train_peak']:.2f}x; activations {act / MB:.0f}, LM head {e['LM head tile'] / MB:.0f})"
        )
        rows.append([name, f"{batch} x 2 x {length}", "on" if gc else "off", f"{m['weights'] / MB:.0f} / {e_weights / MB:.0f} MB",
                     f"{m['train_peak'] / MB:,.0f} MB", f"{e_train / MB:,.0f} MB", f"{e_train / m['train_peak']:.2f}x"])
        prev = results[-2] if len(results) > 1 else None
        if prev and prev["model"] == name and not prev["gc"] and gc:
            # same model and shapes: the difference is the activations checkpointing does not keep
            m_d = prev["measured"]["train_peak"] - m["train_peak"]
            e_d = sum(prev["estimate"].values()) - sum(e.values())
            print(f"planner | {name} | activations freed by checkpointing: measured {m_d / MB:.0f} MB, estimated {e_d / MB:.0f} MB ({e_d / m_d:.2f}x)")
    shutil.rmtree(work, ignore_errors=True)
    car.figures["results"] = results
    car.table("", ["model", "batch x rows x max_length", "gradient checkpointing", "weights measured / estimated",
                   "training peak measured", "estimated", "estimate / measured"], rows)
    ratios = [sum(v for k, v in r["estimate"].items() if k != "base weights") / r["measured"]["train_peak"] for r in results]
    car.headline = f"training peak estimated at {min(ratios):.2f}-{max(ratios):.2f}x the measured peak ({len(ratios)} settings)"
    car.save()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
