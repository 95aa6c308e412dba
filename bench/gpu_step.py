"""GPU check: one sDPO step of a Mistral-7B-shaped model against the same step with plain TRL.

Not run on a GPU yet (BENCHMARKS.md has no figure from it). Everything is built on the
machine, nothing is downloaded:

1. a random-initialised MistralForCausalLM with Mistral-7B's shapes (hidden 4096, 32 layers,
   intermediate 14336, 32 heads, 8 KV heads; the phi-3 vocabulary, 32064, since the tokenizer is
   the pico model's), saved in bfloat16 (14.5 GB);
2. 256 synthetic pairs whose every sequence fills max_length 1024;
3. `lora-sdpo run` of a one-step recipe, twice: with the pair forward (training.prefix_sharing,
   the default) and with TRL's own forward (prefix_sharing = false), with recipes/two_step.toml's settings (zephyr-qlora: NF4,
   r 128 on every projection; beta 0.01, lr 5e-6, batch 4 x 4, paged_adamw_32bit, gradient
   checkpointing, bf16), the gamma matrix off (a diagnostic), retention on: load + quantise,
   reference pass, training, merge into float32 shards, retention;
4. the same step with TRL alone: the model loaded in 4-bit by transformers, DPOTrainer with the
   same DPOConfig settings and LoRA, precomputed reference.

For each it prints tokens/s, peak GPU memory (torch.cuda.max_memory_allocated and _reserved) and
MFU: policy forward+backward counted as 4N and the reference forward as 2N FLOPs per token (N: the
parameters of the linear layers and the LM head), against the card's dense bf16 peak
(--peak-tflops, 989 for H100/H200 SXM); and the planner's estimate for the same shapes.

Expected device time: about 6-8 minutes for both runs at the full shape (not measured); use
--layers 16 to halve it. bench/gpu_accept.sh runs it at 8 layers, 32 pairs, arms pairs,trl. Disk: ~45 GB (the bf16 model and the float32 M_1).

--json is rewritten after the planner's estimate and after every arm, so a failing arm or a time
limit keeps what finished. --rehearse runs the same path on a CPU at toy shapes (bench/gpu_rehearsal.sh).

On a GPU machine without network (torch is there; trl, bitsandbytes, datasets, pydantic... travel as
wheels in .whl/, assembled where pip works by bench/gpu_wheels.py), from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 bench/gpu_step.py --work /tmp/gpu --json $OUT/gpu_step.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PICO = ROOT / "models" / "pico-llama-phi3"
GIB = 2**30
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def empty_cache() -> None:
    """Before an arm: free what the last one left and restart the peak counters (CUDA only)."""
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def write_json(path: str | None, results: dict) -> None:
    """The results so far, replaced atomically after every arm: a failing arm or the time limit keeps the others."""
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(path)

RECIPE = """
adapter = "zephyr-qlora"
[run]
name = "gpu-check"
seed = 42
[model]
path = "{model}"
[training]
beta = 0.01
learning_rate = 5e-6
lr_scheduler_type = "cosine"
warmup_ratio = 0.1
num_train_epochs = 1
per_device_train_batch_size = 4
gradient_accumulation_steps = 4
max_length = {max_length}
optim = "paged_adamw_32bit"
gradient_checkpointing = true
precision = "bf16"
[diagnostics]
gamma_matrix = false
[retention]
sample_size = {retention}
[[steps]]
[[steps.sources]]
path = "{data}"
"""


# --rehearse (bench/gpu_rehearsal.sh, on a CPU): the same code path at toy shapes, without CUDA.
TOY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def build_model(folder: Path, layers: int, rehearse: bool = False) -> tuple[dict, int]:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32064, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    )
    if rehearse:
        cfg.update(TOY)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = MistralForCausalLM(MistralConfig(**cfg)).to(torch.bfloat16)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # layers + LM head
    model.save_pretrained(folder, max_shard_size="4GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(PICO / f, folder / f)
    del model
    empty_cache()
    return cfg, n


def synthetic_pairs(path: Path, n: int, max_length: int) -> None:
    rng = random.Random(0)
    words = "the a of to and in is it that for on with as was at by an be this from or have not are but".split()
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(max_length // 4) + "?", "chosen": text(max_length), "rejected": text(max_length)}) + "\n")


def report(name: str, tokens: int, ref_s: float, train_s: float, n: int, peak_tflops: float) -> dict:
    peak = peak_tflops * 1e12
    out = {
        "run": name,
        "tokens": tokens,
        "reference_s": round(ref_s, 1),
        "train_s": round(train_s, 1),
        "train_tokens_per_s": round(tokens / train_s),
        "reference_tokens_per_s": round(tokens / ref_s),
        "mfu_train": round(4 * n * tokens / train_s / peak, 3),
        "mfu_reference": round(2 * n * tokens / ref_s / peak, 3),
        "mfu_reference_plus_train": round(6 * n * tokens / (ref_s + train_s) / peak, 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if CUDA else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if CUDA else None,
    }
    print(f"gpu | {name} | " + ", ".join(f"{k} {v}" for k, v in out.items() if k != "run"), flush=True)
    return out


def run_lora_sdpo(recipe: Path, out: Path, tokens: int, n: int, peak: float, sharing: bool) -> dict:
    """One step through `lora-sdpo run`; `sharing`: training.prefix_sharing (the pair forward).

    tokens/s and MFU count the two-row layout's tokens for every arm (the same work), so the pair
    forward's figures are 'TRL-equivalent'; the manifest's token accounting is printed beside them."""
    from lora_sdpo import manifest
    from lora_sdpo.cli import main as cli

    empty_cache()
    t = time.perf_counter()
    cli(["run", str(recipe), "--output", str(out), "--set", f"training.prefix_sharing={str(sharing).lower()}"], standalone_mode=False)
    wall = time.perf_counter() - t
    step = manifest.read(out).step(1)
    name = "lora-sdpo run, pair forward" if sharing else "lora-sdpo run, TRL's forward"
    r = report(name, tokens, step.timings["reference"], step.timings["train"], n, peak)
    r.update(wall_s=round(wall, 1), timings=step.timings, first_loss=step.first_loss, retention=step.retention,
             token_accounting=step.tokens)
    print(f"gpu | {name}: timings {step.timings} wall {wall:.1f}s tokens {step.tokens}", flush=True)
    shutil.rmtree(out / "step-1" / "model", ignore_errors=True)  # 29 GB of float32 M_1
    return r


def run_trl(model_dir: Path, data: Path, out: Path, max_length: int, tokens: int, n: int, peak: float) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    empty_cache()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, device_map={"": 0 if CUDA else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=str(out), beta=0.01, learning_rate=5e-6, lr_scheduler_type="cosine", warmup_steps=0.1, num_train_epochs=1,
        per_device_train_batch_size=4, gradient_accumulation_steps=4, max_length=max_length, optim="paged_adamw_32bit",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=True,
        precompute_ref_log_probs=True, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not CUDA,
    )
    lora = LoraConfig(r=128, lora_alpha=128, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.load_dataset("json", data_files=str(data), split="train"),
                         processing_class=tok, peft_config=lora)
    ref_s = time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    r = report("plain TRL DPOTrainer", tokens, ref_s, train_s, n, peak)
    r.update(load_s=round(load_s, 1), wall_s=round(time.perf_counter() - t0, 1))
    del trainer, model
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/gpu-step")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--arms", default="pairs,lora-sdpo,trl",
                   help="comma-separated: pairs (lora-sdpo, pair forward), lora-sdpo (lora-sdpo, TRL's forward), trl (plain TRL)")
    p.add_argument("--json", help="results, rewritten after the planner and after every arm")
    p.add_argument("--rehearse", action="store_true",
                   help="no GPU (bench/gpu_rehearsal.sh): toy shapes (hidden 64), 8 pairs of 64 tokens, on the CPU; "
                        "the same recipe, CLI, manifests and JSON, no figure worth reading")
    a = p.parse_args()
    arms = [x for x in ("pairs", "lora-sdpo", "trl") if x in set(a.arms.split(",")) - ({"trl"} if a.skip_trl else set())]
    assert arms and set(a.arms.split(",")) <= {"pairs", "lora-sdpo", "trl"}, f"--arms {a.arms}: expected pairs, lora-sdpo, trl"
    if a.rehearse:
        a.pairs, a.max_length = min(a.pairs, 8), min(a.max_length, 64)
    else:
        assert CUDA, "this check needs a GPU (--rehearse runs its plumbing on a CPU)"
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.perf_counter()
    cfg, n = build_model(work / "model", a.layers, a.rehearse)
    name = torch.cuda.get_device_name() if CUDA else "cpu (rehearsal)"
    print(f"gpu | {name} | model built and saved in {time.perf_counter() - t:.0f}s, N = {n / 1e9:.2f}e9", flush=True)
    synthetic_pairs(work / "pairs.jsonl", a.pairs, a.max_length)
    tokens = a.pairs * 2 * a.max_length  # every sequence is cut at max_length
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(model=work / "model", data=work / "pairs.jsonl", max_length=a.max_length, retention=min(64, a.pairs)))
    results = {"device": name, "N": n, "tokens": tokens, "layers": a.layers, "pairs": a.pairs, "max_length": a.max_length,
               "rehearsal": a.rehearse, "arms": arms}

    from lora_sdpo.plan import memory_estimate
    from lora_sdpo.recipe import load_recipe

    loaded = load_recipe(recipe)
    est = memory_estimate(cfg, loaded.adapter, loaded.recipe.training)
    results["planner_gib"] = round(sum(est.values()) / GIB, 2)
    print(f"gpu | planner estimate {results['planner_gib']} GiB: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.items()), flush=True)
    write_json(a.json, results)

    for arm in arms:
        if arm == "pairs":
            results["lora_sdpo_pairs"] = run_lora_sdpo(recipe, work / "run-pairs", tokens, n, a.peak_tflops, sharing=True)
        elif arm == "lora-sdpo":
            results["lora_sdpo"] = run_lora_sdpo(recipe, work / "run", tokens, n, a.peak_tflops, sharing=False)
        else:
            results["trl"] = run_trl(work / "model", work / "pairs.jsonl", work / "trl", a.max_length, tokens, n, a.peak_tflops)
        write_json(a.json, results)
    if "trl" in results and "lora_sdpo" in results:
        print(f"gpu | train time lora-sdpo / TRL: {results['lora_sdpo']['train_s'] / results['trl']['train_s']:.2f}", flush=True)
    base = results.get("trl", results.get("lora_sdpo"))
    if base is not None and "lora_sdpo_pairs" in results and CUDA:
        print(f"gpu | pair forward vs {'plain TRL' if 'trl' in results else 'the TRL path'}: training "
              f"{base['train_s'] / results['lora_sdpo_pairs']['train_s']:.2f}x faster, reference pass "
              f"{base['reference_s'] / results['lora_sdpo_pairs']['reference_s']:.2f}x, peak allocated "
              f"{results['lora_sdpo_pairs']['peak_allocated_gib']} vs {base['peak_allocated_gib']} GiB", flush=True)


if __name__ == "__main__":
    main()
