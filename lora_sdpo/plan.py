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

from .audit import audit
from .data import check_with_tokenizer, load_eval_pairs, load_step_pairs, token_lengths
from .errors import DataError
from .distributed import split_batch
from .model import load_tokenizer, lora_parameter_count
from .pairs import TILE_BYTES, TILE_BYTES_DEFAULT, tiled_rows
from .splits import apply_split, composition
from .recipe import AdapterConfig, LoadedRecipe, TrainingConfig

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


# Bytes per NF4 weight: 4 bits, plus one absmax per block of 64; with double quantisation the
# absmax is an 8-bit code with one float32 scale per 256 blocks (bitsandbytes' layout).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
# TRL's fused LM head projects [4096 tokens, 32768 vocabulary] tiles (trl.kernels.chunked_logprob).
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768
# Its CPU fallback (torch ops on the whole tile, no Triton) holds about this many fp32 copies of a
# tile at once in the backward: 9.4 alone (bench/logprobs.py: 2357 MB at a 2048 x 32064 tile of
# 250 MB), 7.8 at a 4096 x 32000 tile in a bf16 step (bench/memory_7b.py), 8.2-8.5 in the float32
# steps of bench/plan_check.py.
CPU_HEAD_TILE_COPIES = 8.5
CUDA_CONTEXT = 0.6 * GIB  # CUDA context and cuBLAS workspace, before any tensor
ALLOCATOR_SLACK = 0.10  # the caching allocator's fragmentation, on the memory that comes and goes
GPU_SIZES_GB = (24, 40, 80)
USABLE = 0.95  # of a card's memory, for other processes and the allocator's reserve


def _shapes(config: dict) -> dict[str, int]:
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    return {
        "h": h,
        "i": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
        "q": heads * hd,
        "kv": kv * hd,
        "vocab": config["vocab_size"],
        "hd": hd,
        "tied": bool(config.get("tie_word_embeddings")),
    }


def layer_activation_bytes(config: dict, adapter: AdapterConfig, act_bytes: int, pair_forward: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer of a Llama/Mistral block under LoRA.

    What the forward saves for the backward (counted with saved-tensor hooks at Mistral-7B's layer
    shapes by bench/memory_7b.py; frozen weights and norm scales save nothing for themselves):
    the rotated q and k and v (the attention kernel's inputs) and the attention output (o_proj's
    input is a view of it in TRL's layout; the pair forward concatenates its segments' outputs
    into a copy); gate, up, SiLU(gate) and down_proj's input; each LoRA's r-wide A output; RoPE's
    cos and sin; and per RMSNorm a float32 copy of its input (it computes in float32) and its
    output (the next projections' input). Flash/memory-efficient attention keeps no seq x seq
    matrix. Dropout is off (TRL's disable_dropout), so LoRA's dropout keeps nothing. The pair
    forward also keeps the rejected tail's keys and values concatenated to the shared prefix's (at
    most one more k and v per token); TRL's padded rows carry an attention mask, with which
    transformers' SDPA call repeats k and v to every query head (grouped-query models), and the
    repeated copies are what is kept.
    """
    s = _shapes(config)
    if pair_forward:  # q, the per-segment outputs and their concatenation (o_proj's input); k, v and the rejected tail's concatenated k, v
        attention = 3 * s["q"] + 4 * s["kv"]
    else:  # q and SDPA's output (o_proj's input is a view of it); k and v repeated to every query head
        attention = 4 * s["q"]
    elements = attention + 4 * s["i"] + len(adapter.target_modules) * adapter.r + 2 * s["h"] + 2 * s["hd"]
    return act_bytes * elements + 2 * s["h"] * 4


def lora_bytes_per_parameter(adapter, optim: str) -> int:
    """Bytes per LoRA parameter: weight, gradient and the optimizer's two moments.

    TRL trains a QLoRA adapter in bfloat16 (it casts the adapter after get_peft_model) and a LoRA on
    an unquantised base in float32. bitsandbytes' 32-bit optimizers keep the moments in float32,
    its 8-bit ones in one byte each; torch's AdamW keeps them in the parameter's dtype.
    """
    p = 2 if adapter.quantization == "nf4" else 4
    if "8bit" in optim:
        moments = 2
    elif "32bit" in optim:
        moments = 8
    else:
        moments = 2 * p
    return 2 * p + moments


def memory_estimate(
    config: dict,
    adapter: AdapterConfig,
    training: TrainingConfig,
    device: str = "cuda",
    gradient_checkpointing: bool | None = None,
    processes: int = 1,
    distributed=None,
    tokens: int | None = None,
) -> dict[str, float]:
    """Peak memory of a training step in bytes, by part: an estimate from the shapes, not a measurement.

    The peak is the training step (the precomputed reference pass runs without gradients and
    keeps no activations). `device="cpu"` swaps in what differs on a CPU (no CUDA context, TRL's
    torch fallback for the LM head) so that the same formula can be checked against measured peaks
    on machines without a GPU (BENCHMARKS.md). `gradient_checkpointing` overrides the recipe's.

    With N processes each runs the per-process batch (see distributed.split_batch) and this is one
    process's peak. Under ddp every process holds the whole model; under fsdp (`distributed`, the
    recipe's section) the base weights and the LoRA states are split N ways, plus one decoder layer
    gathered whole at a time (with CPU offload only that layer and the LoRA weights in use stay on
    the GPU). `tokens` replaces the tokens of one micro-batch through the backbone (default: batch
    x 2 x max_length, every sequence full) to compare with a measured step.
    """
    s = _shapes(config)
    h, layers = s["h"], s["layers"]
    gc = training.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    compute = 2 if adapter.compute_dtype == "bfloat16" else 4
    act = 2 if training.precision == "bf16" else compute
    linear = layers * (2 * h * s["q"] + 2 * h * s["kv"] + 3 * h * s["i"])
    other = s["vocab"] * h * (1 if s["tied"] else 2) + (2 * layers + 1) * h  # embeddings, LM head, norms
    per_weight = NF4_BYTES[adapter.double_quant] if adapter.quantization == "nf4" else compute
    batch, _ = split_batch(training.per_device_train_batch_size, training.gradient_accumulation_steps, processes)
    if tokens is None:
        tokens = batch * 2 * training.max_length  # chosen and rejected, full length
    per_layer = layer_activation_bytes(config, adapter, act, pair_forward=training.prefix_sharing)
    # Outside the layers: the final norm's float32 input and the hidden states the head keeps (the
    # frozen embedding keeps only the token ids).
    outside = tokens * h * (act + 4)
    if gc:  # each layer's input is kept; one layer's activations exist again while it is recomputed
        acts = tokens * (layers * h * act + per_layer) + outside
    else:
        acts = tokens * layers * per_layer + outside
    if training.prefix_sharing:  # pairs.py sizes the vocabulary tile to a byte budget (float32 tile)
        if device == "cpu":
            head_tiles = tiled_rows(s["vocab"], device) * s["vocab"] * 4 * CPU_HEAD_TILE_COPIES
        else:
            head_tiles = TILE_BYTES.get(device, TILE_BYTES_DEFAULT) * compute / 4
    else:
        tile = min(tokens, HEAD_TILE_TOKENS) * min(s["vocab"], HEAD_TILE_VOCAB)
        head_tiles = tile * CPU_HEAD_TILE_COPIES * 4 if device == "cpu" else tile * compute
    # bitsandbytes dequantises one 4-bit weight at a time for the matmul, and its transpose in the backward
    largest = max(h * s["q"], h * s["i"])
    base = linear * per_weight + other * compute
    lora_states = lora_parameter_count(config, adapter) * lora_bytes_per_parameter(adapter, training.optim)
    fsdp = processes > 1 and distributed is not None and distributed.strategy == "fsdp"
    if fsdp:
        # FSDP2 as accelerate wraps it (distributed.trainer_args): the packed 4-bit storage, the
        # embeddings, norms and head are split N ways; bitsandbytes keeps each weight's absmax and
        # scales on its module, outside FSDP, so they stay whole on every process. Gathered whole
        # while they compute: a decoder layer and the next one (prefetched), and the final norm + LM
        # head unit, kept from the end of the forward to the start of the backward.
        packed = 0.5 if adapter.quantization == "nf4" else per_weight
        scales = linear * (per_weight - packed)
        gathered = 2 * linear / layers * per_weight + (s["vocab"] * h + h) * compute
        shard = (linear * packed + other * compute) / processes
        base = scales + (0 if distributed.fsdp_cpu_offload else shard)
        lora_states = lora_states * 2 / layers if distributed.fsdp_cpu_offload else lora_states / processes
    parts = {
        ("base weights (a 1/N shard" + (" in CPU memory" if distributed.fsdp_cpu_offload else "") + ", NF4 scales whole)"
         if fsdp else "base weights"): base,
        **({"base units gathered whole (2 decoder layers, LM head)": gathered} if fsdp else {}),
        "LoRA weights, grads, optimizer states": lora_states,
        "activations" + (" (gradient checkpointing)" if gc else ""): acts,
        # the head's tile, and its float32 gradient of the hidden states
        "LM head tile": head_tiles + tokens * h * 4,
        "dequantised weight": 2 * largest * compute if adapter.quantization == "nf4" else 0.0,
    }
    if device != "cpu":
        parts["CUDA context, allocator slack"] = CUDA_CONTEXT + ALLOCATOR_SLACK * (acts + parts["LM head tile"])
    return parts


def fits(total: float) -> dict[int, bool]:
    """Whether a peak of `total` bytes fits a card of each size (24, 40, 80 GB cards hold that many GiB)."""
    return {g: total <= USABLE * g * GIB for g in GPU_SIZES_GB}


def memory_lines(config: dict, adapter: AdapterConfig, training: TrainingConfig, processes: int = 1, distributed=None) -> list[str]:
    """The plan's memory section: the estimate by part, the verdicts, and the other checkpointing choice."""
    kw = {"processes": processes, "distributed": distributed}
    parts = memory_estimate(config, adapter, training, **kw)
    total = sum(parts.values())
    other = sum(memory_estimate(config, adapter, training, gradient_checkpointing=not training.gradient_checkpointing, **kw).values())
    verdict = "; ".join(f"{g} GB: {'fits' if ok else 'does not fit'}" for g, ok in fits(total).items())
    batch, _ = split_batch(training.per_device_train_batch_size, training.gradient_accumulation_steps, processes)
    who = "" if processes == 1 else f" per process ({processes} processes, {distributed.strategy if distributed else 'ddp'})"
    loading = []
    if processes > 1 and distributed is not None and distributed.strategy == "fsdp":
        # accelerate shards a 4-bit model after each process has loaded it whole onto its GPU
        # (fsdp2_prepare_model keeps bitsandbytes weights off the meta device)
        load = fsdp_load_bytes(config, adapter)
        ok = {g: a and b for (g, a), b in zip(fits(total).items(), fits(load).values())}
        verdict = "; ".join(f"{g} GB: {'fits' if v else 'does not fit'}" for g, v in ok.items())
        loading = [f"  loading, before FSDP shards it: every process holds the whole base once, {load / GIB:.1f} GiB "
                   "(accelerate shards a 4-bit model only after each process has loaded it onto its GPU; "
                   "the verdicts above count it)"]
    return [
        f"peak GPU memory estimate{who}: {total / GIB:.1f} GiB at batch {batch} x "
        f"max_length {training.max_length} ({verdict})",
        *(f"  {k}: {v / GIB:.2f} GiB" for k, v in parts.items()),
        *loading,
        f"  with gradient_checkpointing = {str(not training.gradient_checkpointing).lower()}: {other / GIB:.1f} GiB",
    ]


def fsdp_load_bytes(config: dict, adapter: AdapterConfig) -> float:
    """GPU memory of one process while it loads the base under fsdp: the whole 4-bit model (and the
    CUDA context), before accelerate shards it."""
    s = _shapes(config)
    h, layers = s["h"], s["layers"]
    compute = 2 if adapter.compute_dtype == "bfloat16" else 4
    linear = layers * (2 * h * s["q"] + 2 * h * s["kv"] + 3 * h * s["i"])
    other = s["vocab"] * h * (1 if s["tied"] else 2) + (2 * layers + 1) * h
    per_weight = NF4_BYTES[adapter.double_quant] if adapter.quantization == "nf4" else compute
    return linear * per_weight + other * compute + CUDA_CONTEXT


def backbone_tokens(lens: list[tuple[int, int, int]], max_length: int, batch: int) -> tuple[float, float]:
    """Mean tokens per pair through the backbone: the pair forward (shared prefix counted as the
    prompt, so at most) and TRL's two rows padded to the longest row of each batch."""
    rows = [(min(p, max_length), min(c, max_length), min(r, max_length)) for p, c, r in lens]
    if not rows:
        return 0.0, 0.0
    packed = sum(c + r - min(p, c, r) for p, c, r in rows)
    padded = sum(2 * len(g) * max(max(c, r) for _, c, r in g) for g in (rows[i : i + batch] for i in range(0, len(rows), batch)))
    return packed / len(rows), padded / len(rows)


def overlap_lines(steps_data: list, ev, allow_eval_overlap: bool, exact_members: bool = True) -> list[str]:
    """The overlap audit as `run` makes it before writing anything (lora_sdpo.audit); a held-out set
    that overlaps a step is refused here too. Steps that cannot be read here are left out."""
    known = [ps for ps in steps_data if ps is not None]
    if not known:
        return []
    found = audit([ps.rows if ps is not None else None for ps in steps_data], ev.rows if ev else None, allow_eval_overlap)
    found.check()
    lines = [f"warning: {w}" for w in found.warnings()]
    if not found.overlaps:
        lines.append(f"overlap audit: no pair or prompt shared between {'the steps' if len(known) > 1 else 'the step'}"
                     + (" and the held-out set" if ev else ""))
    if not exact_members and found.between_steps:
        lines.append("  (curriculum split: the steps' members are fixed when the run starts; the run audits them again)")
    return lines


def compute_line(adapter, training) -> str:
    """Which dtype the recipe computes in: the base's matmuls (adapter.compute_dtype) and training's autocast."""
    base = f"{'NF4 base dequantised to ' if adapter.quantization == 'nf4' else 'base weights in '}{adapter.compute_dtype}"
    autocast = "bf16 autocast" if training.precision == "bf16" else "no autocast"
    if adapter.compute_dtype == "bfloat16" and training.precision == "bf16":
        head = "bfloat16"
    elif adapter.compute_dtype == "float32" and training.precision == "fp32":
        head = "float32"
    else:
        head = "mixed bfloat16/float32"
    # TRL casts a QLoRA adapter to bfloat16 (DPOTrainer, for quantised models), so its matmuls run in
    # bfloat16 whatever the base computes in; an adapter on an unquantised base stays float32 (PEFT)
    lora = "LoRA weights in bfloat16 (TRL's QLoRA default)" if adapter.quantization == "nf4" else "LoRA weights in float32"
    return f"computes in: {head} ({base}, {autocast} in training; {lora}; the LM head's log-softmax in float32)"


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
    plan.add(compute_line(a, t))
    eff = t.per_device_train_batch_size * t.gradient_accumulation_steps
    plan.add(
        f"training: beta={t.beta} lr={t.learning_rate} {t.lr_scheduler_type} warmup={t.warmup_ratio} "
        f"epochs={t.num_train_epochs} batch={t.per_device_train_batch_size}x{t.gradient_accumulation_steps}={eff} "
        f"max_length={t.max_length} optim={t.optim} precision={t.precision}"
    )
    plan.add(
        "forward: lora-sdpo's pair forward (training.prefix_sharing = true): the prompt once per pair, pairs packed "
        "without padding, the LM head on completion tokens only"
        if t.prefix_sharing else
        "forward: TRL's own (training.prefix_sharing = false): chosen and rejected as two padded rows, each with the prompt"
    )
    plan.add(f"loss: {t.loss_label}")
    if cfg.run.report_to:
        plan.add(f"tracking: {', '.join(cfg.run.report_to)} (one tracked run per step)")
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
        st = cfg.step_training(i + 1)  # this step's settings: [training] with its [steps.training]
        if cfg.step_overrides(i + 1):
            plan.add("  training (this step): " + ", ".join(
                f"{k}={st.loss_label if k == 'loss_type' else v}" for k, v in cfg.step_overrides(i + 1).items()))
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
        steps = per_epoch * st.num_train_epochs
        repeated = per_epoch * b * acc * processes - n if processes > 1 else 0
        plan.add(f"  {n} pairs, {steps:g} optimizer steps" + (
            f" ({repeated} pairs repeated per epoch to fill the last batch of all {processes} processes)" if repeated > 0 else ""))
        if tok is not None:
            check_with_tokenizer(pairs, tok)
            lens = token_lengths(pairs.rows, tok)
            plan.add(f"  prompt tokens: {_stats([p for p, _, _ in lens])}")
            plan.add(f"  prompt+chosen tokens: {_stats([c for _, c, _ in lens])}")
            plan.add(f"  prompt+rejected tokens: {_stats([r for _, _, r in lens])}")
            cut = sum(1 for _, c, r in lens if max(c, r) > t.max_length)
            full = sum(1 for p, _, _ in lens if p >= t.max_length)
            plan.add(f"  truncated at max_length {t.max_length}: {cut} of {n} pairs; prompts with no room left: {full}")
            packed, padded = backbone_tokens(lens, t.max_length, b)
            plan.add(f"  backbone tokens per pair: {packed:.0f} with the pair forward (at most; prompt once, no padding), "
                     f"{padded:.0f} in TRL's two padded rows (batches of {b} in file order)"
                     + ("  <- this recipe's path" if not t.prefix_sharing else ""))
    try:
        ev = load_eval_pairs(recipe)
    except DataError as e:
        if not any(s.dataset for s in cfg.data.eval):  # a local file's problem is the user's to fix, as run says
            raise
        plan.unreachable.append(f"eval data: {e}")
        ev = None
    if ev is not None and tok is not None:
        check_with_tokenizer(ev, tok)
    if ev is not None:
        plan.add(f"held-out eval: {len(ev.rows)} pairs ({'; '.join(r.summary() for r in ev.reports)})")
    for line in overlap_lines(steps_data, ev, cfg.data.allow_eval_overlap, exact_members=split != "curriculum"):
        plan.add(line)
    plan.add("")
    if config is not None and "hidden_size" in config:
        lora = lora_parameter_count(config, a)
        plan.add(f"LoRA parameters: {lora:,}")
        for line in memory_lines(config, a, t, processes, cfg.distributed):
            plan.add(line)
    for u in plan.unreachable:
        plan.add(f"NOT REACHABLE: {u}")
    return plan
