"""TRL's DPOTrainer as lora-sdpo runs it: one step's DPOConfig and the callbacks that log, seal
checkpoints, count tokens and stop on a broken loss.

step.py builds one `trl_compat.ResumableDPOTrainer` per step from these; nothing here knows about
phases or the manifest.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import DPOConfig

from . import distributed, faults, memory, pairs
from .recipe import StepSettings
from .rundir import atomic_write_bytes, atomic_write_json, read_jsonl


def dpo_config(step: StepSettings, output_dir: Path) -> DPOConfig:
    """The step's training settings ([training] with its [steps.training]) as TRL's DPOConfig; the one
    place they are translated."""
    t = step.training
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
        # The reference log-probs are computed by step.py's reference phase and handed to TRL as
        # dataset columns (trl_compat.use_reference_logps): TRL computes none of its own.
        precompute_ref_log_probs=False,
        # Checkpoints to resume a killed step from (sealed by CheckpointSeal); the last two are kept
        # so that a kill while one is written leaves the one before.
        save_strategy="steps" if step.checkpoint_every else "no",
        save_steps=step.checkpoint_every or 500,
        save_total_limit=2,
        save_only_model=False,
        # A NaN loss must reach LossGuard as NaN, not be replaced by the window's mean.
        logging_nan_inf_filter=False,
        # Trackers (run.report_to) are given to the trainer as callbacks by tracking.StepTracking, so
        # that each step logs into its own folder or run under the run directory.
        report_to=[],
        run_name=step.run_name,
        seed=step.seed,
        data_seed=step.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # Grouping reads a "length" column (added by step.py); TRL would drop it as unused.
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=not t.group_by_length,
        **distributed.trainer_args(step.distributed),
    )



class JsonlMetrics(TrainerCallback):
    """Every TRL log record, one JSON object a line (metrics.jsonl); the first is optimizer step 1."""

    def __init__(self, path: Path | None, keep_until: int = 0):
        """Resuming from the checkpoint of optimizer step `keep_until` keeps the records up to it.
        path None: a process other than the main one, which writes nothing."""
        self.path = path
        # (the summary record of a finished train() goes: the resumed one writes its own)
        self.records = [r for r in read_jsonl(path) if keep_until and r.get("step", 0) <= keep_until and "train_runtime" not in r] if path else []
        if path is not None:
            atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.path is None:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, **{k: _num(v) for k, v in logs.items()}}
        self.records.append(rec)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


class TrimEachUpdate(TrainerCallback):
    """On the CPU, glibc's free heap pages handed back after every optimizer update: each update's
    temporaries (hundreds of MB at the quickstart's shapes) are freed into pieces of the heap that the
    next update does not fill exactly, so without it the RSS rose through training (memory.py)."""

    def __init__(self):
        self.on_cpu = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.on_cpu = model is not None and next(model.parameters()).device.type == "cpu"

    def on_step_end(self, args, state, control, **kwargs):
        if self.on_cpu:
            memory.trim()


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

