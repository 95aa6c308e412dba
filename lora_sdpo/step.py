"""One sDPO step, top to bottom: D_t and M_{t-1} in, adapter A_t and M_t out.

    D_t rows -> pairs.jsonl -> TRL tokenisation (chat template)
    M_{t-1} -> NF4 base -> + fresh LoRA (trainable)
    reference log-probs: the same NF4 model with the adapter disabled, computed once by TRL
        (precompute_ref_log_probs) into this step's own dataset cache, saved as ref_logps.safetensors
    TRL DPOTrainer -> A_t
    M_t = M_{t-1} + scale * B_t @ A_t, streamed in float32 (the chain stays in full precision)
    retention: how much of A_t's gamma gain on a fixed sample of D_t survives NF4(M_t)
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from .data import PairSet, write_pairs
from .diagnostics import gammas, stats
from .splits import composition
from .errors import DataError
from .merge import merge_lora
from .model import lora_config, load_base, sequence_logps
from .recipe import LoadedRecipe
from .rundir import RunDir, atomic_dir, atomic_write_bytes


@dataclass
class StepContext:
    recipe: LoadedRecipe
    run: RunDir
    base_dir: Path  # S, as a local folder of safetensors
    tokenizer: object
    samples: dict[str, list[dict]]  # tokenised first pairs of each D_t and of the eval data (gamma matrix)

    def gamma_row(self, model) -> dict[str, dict]:
        """One row of the gamma matrix: the model's gamma statistics on every dataset's sample."""
        max_len = self.recipe.recipe.training.max_length
        return {name: stats(gammas(model, rows, self.tokenizer, max_len)) for name, rows in self.samples.items()}


class JsonlMetrics(TrainerCallback):
    """Every TRL log record, one JSON object a line (metrics.jsonl); the first is optimizer step 1."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, **{k: _num(v) for k, v in logs.items()}}
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


class StepProgress(TrainerCallback):
    """One progress bar for training with the latest loss and reward accuracy, instead of a printed dict a step."""

    def __init__(self, index: int):
        self.index, self.bar = index, None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=f"step {self.index}: training", unit="update", leave=False)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('rewards/accuracies', 0):.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _num(v):
    return float(v) if isinstance(v, (int, float)) else v


def dpo_config(recipe: LoadedRecipe, output_dir: Path) -> DPOConfig:
    """The recipe's training settings as TRL's DPOConfig; the one place they are translated."""
    t = recipe.recipe.training
    return DPOConfig(
        output_dir=str(output_dir),
        beta=t.beta,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        optim=t.optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=t.precision == "bf16",
        disable_dropout=t.disable_dropout,
        # The ln 2 invariant needs the loss of the very first optimizer step, not a mean.
        logging_steps=1,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=t.precompute_ref_batch_size,
        save_strategy="no",
        report_to=[],
        seed=recipe.recipe.run.seed,
        data_seed=recipe.recipe.run.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


def _release_memory() -> None:
    """Return freed models' memory now, before the next model is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_step(ctx: StepContext, index: int, pairs: PairSet) -> tuple[dict, dict]:
    """Run step `index` (1-based) on D_t = `pairs`; return its manifest entry and gamma-matrix rows."""
    recipe, run = ctx.recipe, ctx.run
    cfg = recipe.recipe
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    prev_dir = ctx.base_dir if index == 1 else run.model_dir(index - 1)
    target_dir = prev_dir if cfg.model.target_init == "previous" else ctx.base_dir

    matrix: dict[str, dict] = {}
    # Data: D_t, normalised and written into the step folder, tokenised by TRL there.
    data_dir = run.data_dir(index)
    write_pairs(pairs, data_dir / "pairs.jsonl")
    import datasets

    dataset = datasets.load_dataset(
        "json", data_files=str(data_dir / "pairs.jsonl"), split="train", cache_dir=str(data_dir / "hf_cache")
    )

    # Models: the target, and the reference (the same model with the adapter off unless the
    # target starts from S, the paper's ablation, where the reference M_{t-1} is loaded apart).
    t = time.perf_counter()
    model = load_base(target_dir, recipe.adapter)
    ref_model = None if target_dir == prev_dir else load_base(prev_dir, recipe.adapter)
    timings["load"] = time.perf_counter() - t

    metrics = JsonlMetrics(run.metrics_path(index))
    set_seed(cfg.run.seed)  # LoRA's A is drawn inside DPOTrainer.__init__ (get_peft_model)
    t = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(recipe, run.step(index) / "trainer"),
        train_dataset=dataset,
        processing_class=ctx.tokenizer,
        peft_config=lora_config(recipe.adapter),
        callbacks=[metrics, StepProgress(index)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # used instead when logging is quiet
    # TRL has patched its fused LM head into both; lora-sdpo's own gamma passes reuse it.
    trainer.model.get_base_model()._lora_sdpo_fused = True
    if ref_model is not None:
        ref_model._lora_sdpo_fused = True
    timings["reference"] = time.perf_counter() - t
    if index == 1 and cfg.diagnostics.gamma_matrix:
        t = time.perf_counter()
        if ref_model is None:
            with trainer.model.disable_adapter():  # exactly S
                matrix["S"] = ctx.gamma_row(trainer.model)
        else:
            matrix["S"] = ctx.gamma_row(ref_model)
        timings["diagnostics"] = time.perf_counter() - t
    train_ds = trainer.train_dataset
    if len(train_ds) != len(pairs.rows):
        raise DataError(f"step {index}: TRL kept {len(train_ds)} of {len(pairs.rows)} pairs; expected all")
    ref_chosen = torch.tensor(train_ds["ref_chosen_logps"], dtype=torch.float32)
    ref_rejected = torch.tensor(train_ds["ref_rejected_logps"], dtype=torch.float32)
    atomic_write_bytes(
        data_dir / "ref_logps.safetensors",
        _safetensors_bytes({"chosen": ref_chosen, "rejected": ref_rejected, "row": torch.tensor([r["row"] for r in pairs.rows])}),
    )
    gamma_ref = ref_chosen - ref_rejected

    t = time.perf_counter()
    trainer.train()
    timings["train"] = time.perf_counter() - t

    # Retention, part 1: gamma of the adapter model and of its starting point on a fixed sample.
    t = time.perf_counter()
    k = min(cfg.retention.sample_size, len(train_ds))
    sample = [train_ds[i] for i in range(k)]
    pad_id, max_len = ctx.tokenizer.pad_token_id, cfg.training.max_length
    c, r = sequence_logps(trainer.model, sample, pad_id, max_len)
    g_adapter = c - r
    if ref_model is None:
        g_start = gamma_ref[:k]
    else:
        with trainer.model.disable_adapter():
            c, r = sequence_logps(trainer.model, sample, pad_id, max_len)
        g_start = c - r
    timings["retention"] = time.perf_counter() - t

    with atomic_dir(run.adapter_dir(index)) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
    del trainer, model, ref_model
    _release_memory()

    t = time.perf_counter()
    merge_lora(target_dir, run.adapter_dir(index), run.model_dir(index), dtype="float32")
    timings["merge"] = time.perf_counter() - t

    # Retention, part 2: the merged M_t, re-quantised exactly as the next step will load it.
    t = time.perf_counter()
    merged = load_base(run.model_dir(index), recipe.adapter)
    c, r = sequence_logps(merged, sample, pad_id, max_len)
    g_merged = c - r
    timings["retention"] += time.perf_counter() - t
    if cfg.diagnostics.gamma_matrix:
        t = time.perf_counter()
        matrix[f"M_{index}"] = ctx.gamma_row(merged)
        timings["diagnostics"] = timings.get("diagnostics", 0.0) + time.perf_counter() - t
    del merged
    _release_memory()
    retention = retention_stats(g_start, g_adapter, g_merged)

    logs = [m for m in metrics.records if "loss" in m and "train_runtime" not in m]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    tail = logs[-max(1, len(logs) // 4) :]
    timings["total"] = time.perf_counter() - t0
    return {
        "index": index,
        "status": "done",
        "sources": [rep.summary() for rep in pairs.reports],
        "rows": len(pairs.rows),
        "composition": composition(pairs),
        "data_fingerprint": pairs.fingerprint,
        "reference": "S" if index == 1 else f"M_{index - 1}",
        "target_init": cfg.model.target_init,
        "first_loss": first.get("loss"),
        "first_reward_margin": first.get("rewards/margins"),
        "last_loss": last.get("loss"),
        "reward_accuracy": _mean([m.get("rewards/accuracies") for m in tail]),
        "reward_margin": _mean([m.get("rewards/margins") for m in tail]),
        "optimizer_steps": len(logs),
        "gamma_ref_mean": float(gamma_ref.mean()),
        "gamma_ref_std": float(gamma_ref.std()) if len(gamma_ref) > 1 else 0.0,
        "retention": retention["retention"],
        "retention_detail": retention,
        "adapter": run.rel(run.adapter_dir(index)),
        "model": run.rel(run.model_dir(index)),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }, matrix


def retention_stats(g_start: torch.Tensor, g_adapter: torch.Tensor, g_merged: torch.Tensor) -> dict:
    """Share of the adapter's gamma gain that survives the merge and re-quantisation.

    retention = (gamma(NF4(M_t)) - gamma(start)) / (gamma(start + A_t) - gamma(start)), means over
    the sample. It means something only when the gain is clearly above the noise of the merged
    model's deviation from the adapter model (3 standard errors), and says so when it is not.
    """
    gain = float((g_adapter - g_start).mean())
    kept = float((g_merged - g_start).mean())
    dev = g_merged - g_adapter
    noise = float(dev.std() / math.sqrt(len(dev))) if len(dev) > 1 else float("inf")
    reliable = abs(gain) > 3 * noise and gain != 0
    return {
        "retention": kept / gain if gain != 0 else None,
        "reliable": bool(reliable),
        "gain": gain,
        "kept": kept,
        "noise": noise,
        "sample": len(dev),
        "gamma_start": float(g_start.mean()),
        "gamma_adapter": float(g_adapter.mean()),
        "gamma_merged": float(g_merged.mean()),
    }


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})
