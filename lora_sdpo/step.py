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

import ctypes
import functools
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import DPOConfig, DPOTrainer

from . import distributed, faults, pairs
from .tracking import StepTracking
from .data import PairSet, tokenize_pair, write_pairs
from .diagnostics import gamma_file, gammas, save_gammas, stats
from .errors import DataError, RunError
from .merge import merge_lora
from .model import lora_config, load_base, sequence_logps
from .recipe import LoadedRecipe
from .rundir import RunDir, atomic_dir, atomic_write_bytes, atomic_write_bytes_if_changed, atomic_write_json, ensure_free_space, file_hashes, read_jsonl, verify_files
from .shards import model_tensors
from .splits import composition


class TrainingDiverged(RunError):
    """The loss became NaN or inf; the message names the step and optimizer step."""


@dataclass
class StepContext:
    recipe: LoadedRecipe
    run: RunDir
    base_dir: Path  # S, as a local folder of safetensors
    tokenizer: object
    samples: dict[str, list[dict]]  # tokenised first pairs of each D_t and of the eval data (gamma matrix)
    matrix_rows_done: set = field(default_factory=set)  # gamma-matrix rows already in the manifest
    save_matrix_rows: Callable[[dict], None] = lambda rows: None
    sample_log: object = None  # samples.SampleLog: what S and each M_t write, for the report (None: off)

    def gamma_row(self, model, label: str) -> dict[str, dict]:
        """One row of the gamma matrix: the model's gamma statistics on every dataset's sample; its
        per-pair gammas go to gamma/LABEL.safetensors, from which reports rebuild the paired differences."""
        t = self.recipe.recipe.training
        per_pair = {name: gammas(model, rows, self.tokenizer, t.max_length, prefix_sharing=t.prefix_sharing)
                    for name, rows in self.samples.items()}
        save_gammas(gamma_file(self.run.root, label), per_pair)
        return {name: stats(g) for name, g in per_pair.items()}


class JsonlMetrics(TrainerCallback):
    """Every TRL log record, one JSON object a line (metrics.jsonl); the first is optimizer step 1."""

    def __init__(self, path: Path | None, keep_until: int = 0):
        """Resuming from the checkpoint of optimizer step `keep_until` keeps the records up to it.
        path None: a process other than the main one, which writes nothing."""
        self.path = path
        self.records = [r for r in read_jsonl(path) if keep_until and r.get("step", 0) <= keep_until] if path else []
        if path is not None:
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.path is None:
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

        self.bar = tqdm(total=state.max_steps, desc=f"step {self.index}: training", unit="update", leave=False,
                        disable=not state.is_world_process_zero)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('rewards/accuracies', 0):.2f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _num(v):
    return float(v) if isinstance(v, (int, float)) else v


def dpo_config(recipe: LoadedRecipe, output_dir: Path, index: int = 1) -> DPOConfig:
    """Step `index`'s training settings ([training] with its [steps.training]) as TRL's DPOConfig; the one
    place they are translated."""
    t = recipe.recipe.step_training(index)
    # With N processes, per-device batch x accumulation x N stays the recipe's global batch.
    batch, accumulation = distributed.split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, distributed.world().size)
    return DPOConfig(
        output_dir=str(output_dir),
        beta=t.beta,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_length=t.max_length,
        loss_type=t.losses,
        loss_weights=t.loss_weights,
        label_smoothing=t.label_smoothing,
        f_divergence_type=t.f_divergence_type,
        f_alpha_divergence_coef=t.f_alpha_divergence_coef,
        use_weighting=t.use_weighting,
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
        # Checkpoints to resume a killed step from (sealed by CheckpointSeal); the last two are kept
        # so that a kill while one is written leaves the one before.
        save_strategy="steps" if recipe.recipe.run.checkpoint_every else "no",
        save_steps=recipe.recipe.run.checkpoint_every or 500,
        save_total_limit=2,
        save_only_model=False,
        # A NaN loss must reach LossGuard as NaN, not be replaced by the window's mean.
        logging_nan_inf_filter=False,
        # Trackers (run.report_to) are given to the trainer as callbacks by tracking.StepTracking, so
        # that each step logs into its own folder or run under the run directory.
        report_to=[],
        run_name=f"{recipe.recipe.run.name}/step-{index}",
        seed=recipe.recipe.run.seed,
        data_seed=recipe.recipe.run.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # Grouping reads a "length" column (added by run_step); TRL would drop it as unused.
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=not t.group_by_length,
        **distributed.trainer_args(recipe.recipe.distributed),
    )


def _release_memory() -> None:
    """Return freed models' memory now, before the next model is loaded or training starts.

    Freed heap memory stays in glibc's arenas (RSS) unless trimmed: without the trim a run's RSS
    at each step's start grew by ~100 MB a step (bench/quickstart_memory.py), and training's peak
    sat on top of it.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


SEAL = "lora-sdpo-complete.json"


class CheckpointSeal(TrainerCallback):
    """Seal each trainer checkpoint once it is written whole; resume trusts sealed checkpoints only.

    transformers writes a checkpoint's files one by one into its final folder, so a kill in the
    middle leaves a folder that looks like a checkpoint. The seal (written atomically, after the
    files are fsynced) is what tells a complete one.
    """

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                files = {}
                for f in sorted(ckpt.rglob("*")):
                    if f.is_file():
                        with open(f, "rb") as fh:
                            os.fsync(fh.fileno())
                        files[str(f.relative_to(ckpt))] = f.stat().st_size
                atomic_write_json(ckpt / SEAL, {"global_step": state.global_step, "files": files})
        faults.point(f"train:{state.global_step}")


TOKENS = "lora-sdpo-tokens.json"


class TokenTally(TrainerCallback):
    """The step's token accounting: tokens the training forwards put through the backbone, what TRL's
    padded two-row layout would have put through it for the same batches, and completion tokens
    (pairs.py counts them). Saved in every checkpoint before its seal, so that a resumed step's
    tally is the uninterrupted one's; summed over the processes."""

    def __init__(self, model, start: dict | None = None):
        self.model, self.start = model, start

    def on_train_begin(self, args, state, control, **kwargs):
        pairs.reset_tokens(self.model, self.start if state.is_world_process_zero else None)

    def on_save(self, args, state, control, **kwargs):
        total = self.total()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            atomic_write_json(ckpt / TOKENS, total)

    def total(self) -> dict:
        """(distributed) collective: every process calls it."""
        out: dict[str, int] = {}
        for share in distributed.gather_object(pairs.tokens_of(self.model)):
            for k, v in share.items():
                out[k] = out.get(k, 0) + v
        return out


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped batches in an order that depends on (seed, epoch) only."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it at every epoch
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class ResumableDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, resumable to the same result.

    - TRL trains QLoRA adapters in bfloat16 (it casts them after get_peft_model), but transformers
      resumes a PEFT checkpoint through PeftModel.load_adapter, which upcasts the adapter to float32:
      a resumed step would go on in another precision than the one it started in, and its adapter
      would not match the uninterrupted run's (tests/test_resume.py checks bit-equality). The trainable
      parameters get back the dtype they had before the checkpoint was loaded, before the optimizer
      is built.
    - Every forward of a pair, the reference pass in __init__ included, goes through lora-sdpo's
      pair forward (pairs.py) when training.prefix_sharing is on; TRL's own otherwise.
    - transformers' LengthGroupedSampler (training.group_by_length) draws its order from the global
      RNG when the epoch starts, which a resumed run is not in; here the order comes from the seed
      and the epoch alone, as the random sampler's does.
    """

    def __init__(self, *args, prefix_sharing: bool = True, **kwargs):
        self._lora_sdpo_prefix_sharing = prefix_sharing
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, *args, **kwargs):
        # TRL has just put its fused LM head on the models (add_fused_lm_head, in __init__), and the
        # reference pass comes next: from here on, every forward of a pair goes through pairs.py.
        pairs.install(self.model.get_base_model(), enabled=self._lora_sdpo_prefix_sharing)
        if self.ref_model is not None:
            pairs.install(self.ref_model, enabled=self._lora_sdpo_prefix_sharing)
        return super()._precompute_ref_logps(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=self.args.data_seed or self.args.seed)
        return sampler

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = model if model is not None else self.model
        dtypes = {n: p.dtype for n, p in target.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        for n, p in target.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])


def sealed_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete trainer checkpoint; unsealed (interrupted) ones are removed."""
    best = None
    for d in sorted(trainer_dir.glob("checkpoint-*")) if trainer_dir.is_dir() else []:
        seal = d / SEAL
        ok = seal.exists() and all(
            (d / rel).is_file() and (d / rel).stat().st_size == size for rel, size in json.loads(seal.read_text())["files"].items()
        )
        if not ok:
            shutil.rmtree(d, ignore_errors=True)
        elif best is None or int(d.name.split("-")[1]) > int(best.name.split("-")[1]):
            best = d
    return best


class LossGuard(TrainerCallback):
    """Stop at the first NaN or inf loss, before a checkpoint of the broken weights is saved."""

    def __init__(self):
        self.bad: tuple[int, str, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):  # a non-finite gradient norm means the update already broke the weights
            v = (logs or {}).get(key)
            if isinstance(v, (int, float)) and not math.isfinite(v) and self.bad is None:
                self.bad = (state.global_step, "loss" if key == "loss" else "gradient norm", float(v))
                control.should_training_stop = True
                control.should_save = False


def _free_space_for_model(run: RunDir, index: int, source_dir: Path) -> None:
    """M_t is written as float32 shards; stop now, not after hours of training, if it cannot fit."""
    need = sum(math.prod(t.shape) * 4 if t.is_float else t.nbytes for t in model_tensors(source_dir).values())
    ensure_free_space(run.step(index), need, f"step {index}: writing M_{index} (float32)")


def run_step(ctx: StepContext, index: int, pairs: PairSet, entry: dict, save) -> tuple[dict, dict]:
    """Run step `index` (1-based) on D_t = `pairs`; return its manifest entry and gamma-matrix rows.

    The manifest entry's `phase` says which phase a killed step was in, and resume redoes only it:
      reference  D_t tokenised and its reference log-probs computed (TRL's cache in data/hf_cache,
                 kept across a kill, and ref_logps.safetensors)
      train      the DPO training of A_t, resumed from the last sealed trainer checkpoint; ends with
                 A_t saved (its files' sha256 in the manifest) and the retention sample's gammas
      merge      M_t written (its files' sha256 in the manifest)
      retention  retention on NF4(M_t) and the gamma-matrix row; then the step is done.
    `entry` is the step's manifest entry so far; `save(entry)` writes it into the manifest.
    """
    recipe, run = ctx.recipe, ctx.run
    cfg = recipe.recipe.for_step(index)  # [training] as this step runs it
    faults.set_step(index)
    t0 = time.perf_counter()
    timings: dict[str, float] = dict(entry.get("timings_partial", {}))  # phases timed before a resume
    before = timings.pop("total", 0.0)
    prev_dir = ctx.base_dir if index == 1 else run.model_dir(index - 1)
    target_dir = prev_dir if cfg.model.target_init == "previous" else ctx.base_dir
    data_dir = run.data_dir(index)
    matrix: dict[str, dict] = {}
    pad_id, max_len = ctx.tokenizer.pad_token_id, cfg.training.max_length
    retention_path = run.step(index) / "retention_sample.safetensors"

    def mark(phase: str, **extra):
        partial = {**timings, "total": before + time.perf_counter() - t0}
        entry.update(phase=phase, timings_partial={k: round(v, 2) for k, v in partial.items()}, **extra)
        save(entry)

    adapter_ok = verify_files(run.adapter_dir(index), entry.get("adapter_files")) is None and retention_path.exists()
    adapter_ok = distributed.broadcast(adapter_ok)  # (distributed) the main process's view of the files decides
    if not adapter_ok:
        entry.pop("model_files", None)  # an M_t merged from another A_t is not this step's
        if distributed.is_main():
            _free_space_for_model(run, index, target_dir)
            write_pairs(pairs, data_dir / "pairs.jsonl")
        _train(ctx, index, pairs, target_dir, prev_dir, timings, matrix, retention_path, mark)
        faults.point("adapter")
    _release_memory()
    if not distributed.is_main():  # (distributed) merge, retention and the gamma matrix are the main process's
        return None, {}

    if verify_files(run.model_dir(index), entry.get("model_files")) is not None:
        t = time.perf_counter()
        merge_lora(target_dir, run.adapter_dir(index), run.model_dir(index), dtype="float32")
        timings["merge"] = time.perf_counter() - t
        mark("retention", model_files=file_hashes(run.model_dir(index)))

    # Retention, part 2: the merged M_t, re-quantised exactly as the next step will load it.
    from safetensors.torch import load_file

    kept = load_file(retention_path)
    sample = _retention_sample(data_dir, ctx, cfg.retention.sample_size)
    t = time.perf_counter()
    merged = load_base(run.model_dir(index), recipe.adapter)
    c, r = sequence_logps(merged, sample, pad_id, max_len, prefix_sharing=cfg.training.prefix_sharing)
    g_merged = c - r
    timings["retention"] = timings.get("retention", 0.0) + time.perf_counter() - t
    if cfg.diagnostics.gamma_matrix:
        t = time.perf_counter()
        matrix[f"M_{index}"] = ctx.gamma_row(merged, f"M_{index}")
        timings["diagnostics"] = timings.get("diagnostics", 0.0) + time.perf_counter() - t
    if ctx.sample_log is not None:
        timings["samples"] = timings.get("samples", 0.0) + ctx.sample_log.record(f"M_{index}", merged, ctx.tokenizer)
    del merged
    _release_memory()
    retention = retention_stats(kept["start"], kept["adapter"], g_merged)

    records = read_jsonl(run.metrics_path(index))
    logs = [m for m in records if "loss" in m and "train_runtime" not in m]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    tail = logs[-max(1, len(logs) // 4) :]
    timings["total"] = before + time.perf_counter() - t0
    ref = load_file(data_dir / "ref_logps.safetensors")
    gamma_ref = ref["chosen"] - ref["rejected"]
    result = {
        "index": index,
        "status": "done",
        "sources": [rep.summary() for rep in pairs.reports],
        "rows": len(pairs.rows),
        "composition": composition(pairs),
        "data_fingerprint": pairs.fingerprint,
        "reference": "S" if index == 1 else f"M_{index - 1}",
        "target_init": cfg.model.target_init,
        "training": cfg.training.model_dump(mode="json"),  # the step's effective settings
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
        "adapter_files": entry["adapter_files"],
        "model_files": entry["model_files"],
        "resumed": entry.get("resumed", []),
        "processes": entry.get("processes"),
        # training's tokens: through the backbone, in TRL's padded two-row layout, completion tokens
        "prefix_sharing": cfg.training.prefix_sharing,
        "tokens": entry.get("tokens"),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    StepTracking(recipe, run, index).log_step_end(result, matrix)
    return result, matrix


def _retention_sample(data_dir: Path, ctx: StepContext, k: int) -> list[dict]:
    """The first k pairs of D_t, tokenised as TRL tokenised them for training."""
    rows = [json.loads(line) for line in (data_dir / "pairs.jsonl").read_text().splitlines()[:k]]
    return [tokenize_pair(r, ctx.tokenizer) for r in rows]


def _train(ctx, index, pairs, target_dir, prev_dir, timings, matrix, retention_path, mark) -> None:
    """Phases reference and train: A_t saved, with the retention sample's start and adapter gammas."""
    recipe, run = ctx.recipe, ctx.run
    cfg = recipe.recipe.for_step(index)  # [training] as this step runs it
    data_dir = run.data_dir(index)
    import datasets

    with distributed.main_first():  # (distributed) the others read pairs.jsonl and the cache once it is written
        dataset = datasets.load_dataset(
            "json", data_files=str(data_dir / "pairs.jsonl"), split="train", cache_dir=str(data_dir / "hf_cache")
        )

    # Models: the target, and the reference (the same model with the adapter off unless the
    # target starts from S, the paper's ablation, where the reference M_{t-1} is loaded apart).
    t = time.perf_counter()
    storage = distributed.quant_storage(cfg, recipe.adapter)  # fsdp shards floats only
    model = load_base(target_dir, recipe.adapter, quant_storage=storage)
    ref_model = None if target_dir == prev_dir else load_base(prev_dir, recipe.adapter, quant_storage=storage)
    timings["load"] = time.perf_counter() - t

    trainer_dir = run.step(index) / "trainer"
    with distributed.main_first():  # the main process removes unsealed checkpoints first
        checkpoint = sealed_checkpoint(trainer_dir)
    resume_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    metrics = JsonlMetrics(run.metrics_path(index) if distributed.is_main() else None, keep_until=resume_step)
    guard = LossGuard()
    ledger = distributed.BatchLedger()
    tokens_file = checkpoint / TOKENS if checkpoint else None
    tally = TokenTally(None, json.loads(tokens_file.read_text()) if tokens_file and tokens_file.exists() else None)
    tracking = StepTracking(recipe, run, index) if distributed.is_main() else None  # only the main process tracks
    set_seed(cfg.run.seed)  # LoRA's A is drawn inside DPOTrainer.__init__ (get_peft_model)
    t = time.perf_counter()
    args = dpo_config(recipe, trainer_dir, index)
    distributed.prepare_accelerate(args)  # FSDP2 on CPU processes too (accelerate enables it on accelerators only)
    trainer = ResumableDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=ctx.tokenizer,
        peft_config=lora_config(recipe.adapter),
        # the tally writes into a checkpoint before CheckpointSeal seals it
        callbacks=[metrics, guard, tally, CheckpointSeal(), StepProgress(index), ledger],
        prefix_sharing=cfg.training.prefix_sharing,
    )
    tally.model = trainer.model.get_base_model()
    distributed.check_trainer(trainer, cfg.distributed)  # no silent fallback to one process or to DDP
    distributed.compute_as_ddp(trainer)  # FSDP2: the training forward in the reference pass's dtypes
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # used instead when logging is quiet
    # TRL has patched its fused LM head into both; lora-sdpo's own gamma passes reuse it.
    trainer.model.get_base_model()._lora_sdpo_fused = True
    if ref_model is not None:
        ref_model._lora_sdpo_fused = True
    timings["reference"] = time.perf_counter() - t
    train_ds = trainer.train_dataset
    if cfg.training.group_by_length:  # a pair's padded width in TRL's collator
        trainer.train_dataset = train_ds.add_column(
            "length", [len(p) + max(len(c), len(r)) for p, c, r in zip(train_ds["prompt_ids"], train_ds["chosen_ids"], train_ds["rejected_ids"])]
        )
    if len(train_ds) != len(pairs.rows):
        raise DataError(f"step {index}: TRL kept {len(train_ds)} of {len(pairs.rows)} pairs; expected all")
    ref_chosen = torch.tensor(train_ds["ref_chosen_logps"], dtype=torch.float32)
    ref_rejected = torch.tensor(train_ds["ref_rejected_logps"], dtype=torch.float32)
    faults.point("reference")
    ref_path = data_dir / "ref_logps.safetensors"
    ref_bytes = _safetensors_bytes({"chosen": ref_chosen, "rejected": ref_rejected, "row": torch.tensor([r["row"] for r in pairs.rows])})
    if distributed.is_main():
        atomic_write_bytes_if_changed(ref_path, ref_bytes)
    if index == 1 and cfg.diagnostics.gamma_matrix and "S" not in ctx.matrix_rows_done and distributed.is_main():
        t = time.perf_counter()
        if ref_model is None:
            with trainer.model.disable_adapter():  # exactly S
                matrix["S"] = ctx.gamma_row(trainer.model, "S")
        else:
            matrix["S"] = ctx.gamma_row(ref_model, "S")
        timings["diagnostics"] = time.perf_counter() - t
        ctx.save_matrix_rows(matrix)
    if index == 1 and distributed.is_main() and ctx.sample_log is not None and ctx.sample_log.wanted("S"):
        if ref_model is None:
            with trainer.model.disable_adapter():  # exactly S
                timings["samples"] = timings.get("samples", 0.0) + ctx.sample_log.record("S", trainer.model, ctx.tokenizer)
        else:
            timings["samples"] = timings.get("samples", 0.0) + ctx.sample_log.record("S", ref_model, ctx.tokenizer)
    mark("train", **({"resumed": [f"train from checkpoint-{resume_step}"]} if checkpoint else {}))

    _release_memory()  # the load's and the reference pass's leftovers, before training's peak
    t = time.perf_counter()
    for cb in tracking.trainer_callbacks(resume_step) if tracking else []:
        trainer.add_callback(cb)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if tracking:
            tracking.end_training()
    timings["train"] = timings.get("train", 0.0) + time.perf_counter() - t
    if guard.bad is not None:
        step, what, value = guard.bad
        kept = sealed_checkpoint(trainer_dir)
        raise TrainingDiverged(
            f"step {index}: the {what} became {value} at optimizer step {step}; training stopped and nothing of it "
            f"was merged. {'The last good checkpoint, ' + str(kept) + ', is kept.' if kept else 'No checkpoint was saved before it.'} "
            "Usual causes: fp16 overflow (use training.precision = \"bf16\" or \"fp32\"), a learning rate too "
            f"high for this model (training.learning_rate = {cfg.training.learning_rate:g}; try 10x lower), or "
            "max_grad_norm too loose. Fix the recipe and run with --restart (or another --output)."
        )

    # Retention, part 1: gamma of the adapter model and of its starting point on a fixed sample.
    t = time.perf_counter()
    pad_id, max_len = ctx.tokenizer.pad_token_id, cfg.training.max_length
    k = min(cfg.retention.sample_size, len(train_ds))
    sample = [train_ds[i] for i in range(k)]
    shared = cfg.training.prefix_sharing
    c, r = sequence_logps(trainer.model, sample, pad_id, max_len, prefix_sharing=shared)
    g_adapter = c - r
    if ref_model is None:
        g_start = (ref_chosen - ref_rejected)[:k]
    else:
        with trainer.model.disable_adapter():
            c, r = sequence_logps(trainer.model, sample, pad_id, max_len, prefix_sharing=shared)
        g_start = c - r
    timings["retention"] = time.perf_counter() - t

    # (distributed) Every process ran the retention sample (under FSDP the model's forward is
    # collective); what each trained on is gathered, and the main process alone writes.
    shares = distributed.gather_object(ledger.summary(distributed.world().rank))
    tokens = tally.total()
    adapter_state = distributed.adapter_state_dict(trainer)
    if not distributed.is_main():
        del trainer, model, ref_model
        return
    atomic_write_bytes(run.step(index) / "ranks.json", json.dumps(shares, indent=1).encode())
    atomic_write_bytes(retention_path, _safetensors_bytes({"start": g_start, "adapter": g_adapter}))

    with atomic_dir(run.adapter_dir(index)) as tmp:
        trainer.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
    del trainer, model, ref_model
    mark("merge", adapter_files=file_hashes(run.adapter_dir(index)), tokens=tokens,
         processes=distributed.batch_report(cfg, shares, len(pairs.rows)))
    shutil.rmtree(trainer_dir, ignore_errors=True)  # checkpoints are not needed once A_t is saved


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
