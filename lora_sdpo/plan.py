"""`lora-sdpo plan`: what a recipe will do, without training.

Steps, sources and rows of each D_t, token lengths after the chat template, optimizer steps, the
LoRA parameter count and a peak GPU memory estimate. Things it cannot reach (a Hub model or
dataset when offline) are named, with what to do, instead of failing the plan.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .data import load_eval_pairs, load_step_pairs, token_lengths
from .distributed import split_batch
from .model import lora_parameter_count
from .splits import apply_split, composition
from .recipe import AdapterConfig, LoadedRecipe

GIB = 2**30


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    def add(self, text: str = "") -> None:
        self.lines.append(text)


def read_model_config(recipe: LoadedRecipe) -> tuple[dict | None, object | None, str | None]:
    """(config.json, tokenizer, problem) of the recipe's model, without downloading weights."""
    location = recipe.model_location()
    try:
        if Path(location).is_dir():
            config = json.loads((Path(location) / "config.json").read_text())
            folder = location
        else:
            from huggingface_hub import hf_hub_download

            cfg_file = hf_hub_download(location, "config.json", revision=recipe.recipe.model.revision)
            config = json.loads(Path(cfg_file).read_text())
            folder = location
        from .model import load_tokenizer

        tok = load_tokenizer(folder, revision=recipe.recipe.model.revision)
        return config, tok, None
    except Exception as e:  # the Hub client's errors all mean: not reachable from here
        return None, None, (
            f"model {location!r} is not reachable ({type(e).__name__}); offline (HF_HUB_OFFLINE=1) or without "
            "network the Hub cannot be read: download the model and set model.path to the folder, or run plan "
            "where the Hub is reachable. Token statistics and the memory estimate need it."
        )


def _stats(xs: list[int]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]
    return f"mean {statistics.fmean(xs):.0f}, median {statistics.median(xs):.0f}, p95 {p95}, max {xs[-1]}"


def memory_estimate(config: dict, adapter: AdapterConfig, recipe: LoadedRecipe, processes: int = 1) -> dict[str, float]:
    """Peak GPU memory of one process in bytes by part: an estimate from the shapes, not a measurement.

    With N processes each runs the per-process batch (see distributed.split_batch). Under ddp every
    process holds the whole model; under fsdp the base weights and the LoRA states are split N
    ways, plus one decoder layer gathered whole at a time (with CPU offload only that layer and
    the LoRA weights in use stay on the GPU).
    """
    t = recipe.recipe.training
    batch, _ = split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, processes)
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    linear = layers * (h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter)
    embed = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    wbytes = 0.516 if adapter.quantization == "nf4" else (2 if adapter.compute_dtype == "bfloat16" else 4)
    act_bytes = 2 if t.precision == "bf16" else 4
    lora = lora_parameter_count(config, adapter)
    tokens = batch * 2 * t.max_length  # chosen and rejected in one batch
    if t.gradient_checkpointing:
        # one saved hidden state per layer, plus one layer's activations being recomputed
        acts = tokens * act_bytes * (layers * h + 10 * h + 4 * inter)
    else:
        acts = tokens * act_bytes * layers * (10 * h + 4 * inter)
    base = linear * wbytes + embed * (2 if adapter.compute_dtype == "bfloat16" else 4)
    lora_states = lora * (2 + 2 + 8)
    d = recipe.recipe.distributed
    if processes > 1 and d.strategy == "fsdp":
        layer = linear / layers * wbytes  # one decoder layer gathered whole for its forward/backward
        base = layer + (0 if d.fsdp_cpu_offload else base / processes)
        lora_states = lora_states / layers if d.fsdp_cpu_offload else lora_states / processes
    return {
        "base weights": base,
        "LoRA weights, grads, AdamW states": lora_states,
        "activations": acts,
        # TRL's fused head projects in tiles: a few thousand positions x vocab in fp32 at most
        "LM head tile": 2 * min(tokens, 4096) * vocab * 4 / 8,
        "CUDA context and allocator slack": 0.8 * GIB,
    }


def make_plan(recipe: LoadedRecipe, processes: int = 1) -> Plan:
    cfg = recipe.recipe
    plan = Plan()
    a = recipe.adapter
    plan.add(f"recipe {recipe.path} (sha256 {recipe.sha256[:12]})")
    plan.add(f"model S: {cfg.model.path}  target_init = {cfg.model.target_init}")
    plan.add(
        f"adapter: {recipe.adapter_source}: r={a.r} alpha={a.alpha} dropout={a.dropout} "
        f"quantization={a.quantization} compute={a.compute_dtype} targets={','.join(a.target_modules)}"
    )
    t = cfg.training
    eff = t.per_device_train_batch_size * t.gradient_accumulation_steps
    plan.add(
        f"training: beta={t.beta} lr={t.learning_rate} {t.lr_scheduler_type} warmup={t.warmup_ratio} "
        f"epochs={t.num_train_epochs} batch={t.per_device_train_batch_size}x{t.gradient_accumulation_steps}={eff} "
        f"max_length={t.max_length} optim={t.optim} precision={t.precision}"
    )
    if processes > 1:
        b, acc = split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, processes)
        plan.add(
            f"processes: {processes} ({cfg.distributed.strategy}), per-process batch {b} x accumulation {acc} "
            f"x {processes} processes = global batch {b * acc * processes}"
        )
    config, tok, problem = read_model_config(recipe)
    if problem:
        plan.unreachable.append(problem)
    plan.add("")
    natural: list = []
    for i in range(len(cfg.steps)):
        try:
            natural.append(load_step_pairs(recipe, i))
        except DataError as e:
            if not any(s.dataset for s in cfg.steps[i].sources):
                raise
            plan.unreachable.append(f"step {i + 1}: {e}")
            natural.append(None)
    split = cfg.data.split
    steps_data = natural
    if split != "natural":
        plan.add(f"split: {split}" + (f", fractions {cfg.data.fractions}" if cfg.data.fractions else ", fractions of the natural steps' sizes"))
        if split == "curriculum":
            plan.add("  (pairs are ranked by S's gamma when the run starts; the sizes below are exact, the members are not)")
        if all(ps is not None for ps in natural):
            steps_data = apply_split("stratified" if split == "curriculum" else split, natural, cfg.data.fractions, cfg.run.seed)
    for i, pairs in enumerate(steps_data):
        ref = "S" if i == 0 else f"M_{i}"
        plan.add(f"step {i + 1}: D_{i + 1} -> M_{i + 1} (reference {ref})")
        if pairs is None:
            for s in cfg.steps[i].sources:
                plan.add(f"  source {s.label}: not reachable here")
            continue
        if split == "natural":
            for rep in pairs.reports:
                plan.add(f"  source {rep.summary()}")
        elif split == "stratified":
            plan.add("  " + ", ".join(f"{n} from {src}" for src, n in composition(pairs).items()))
        n = len(pairs.rows)
        b, acc = split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, processes)
        per_epoch = math.ceil(math.ceil(math.ceil(n / b) / processes) / acc)
        steps = per_epoch * t.num_train_epochs
        repeated = per_epoch * b * acc * processes - n if processes > 1 else 0
        plan.add(f"  {n} pairs, {steps:g} optimizer steps" + (
            f" ({repeated} pairs repeated per epoch to fill the last batch of all {processes} processes)" if repeated > 0 else ""))
        if tok is not None:
            lens = token_lengths(pairs.rows, tok)
            plan.add(f"  prompt tokens: {_stats([p for p, _, _ in lens])}")
            plan.add(f"  prompt+chosen tokens: {_stats([c for _, c, _ in lens])}")
            plan.add(f"  prompt+rejected tokens: {_stats([r for _, _, r in lens])}")
            cut = sum(1 for _, c, r in lens if max(c, r) > t.max_length)
            full = sum(1 for p, _, _ in lens if p >= t.max_length)
            plan.add(f"  truncated at max_length {t.max_length}: {cut} of {n} pairs; prompts with no room left: {full}")
    try:
        ev = load_eval_pairs(recipe)
    except DataError as e:
        plan.unreachable.append(f"eval data: {e}")
        ev = None
    if ev is not None:
        plan.add(f"held-out eval: {len(ev.rows)} pairs ({'; '.join(r.summary() for r in ev.reports)})")
    plan.add("")
    if config is not None and "hidden_size" in config:
        lora = lora_parameter_count(config, a)
        plan.add(f"LoRA parameters: {lora:,}")
        parts = memory_estimate(config, a, recipe, processes)
        total = sum(parts.values())
        who = "" if processes == 1 else f" per process ({processes} processes, {cfg.distributed.strategy})"
        plan.add(f"peak GPU memory estimate{who}: {total / GIB:.1f} GiB (" + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items()) + ")")
        fits = [f"{g} GB: {'fits' if total < g * 1e9 * 0.95 else 'does not fit'}" for g in (24, 40, 80)]
        plan.add("  " + "; ".join(fits))
    for u in plan.unreachable:
        plan.add(f"NOT REACHABLE: {u}")
    return plan
