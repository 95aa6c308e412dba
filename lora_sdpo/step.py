"""One sDPO step as phases: D_t and M_{t-1} in, adapter A_t and M_t out.

    run_step(ctx, t, D_t, record, save)
      reference   D_t tokenised by TRL; M_{t-1} loaded as NF4 + a fresh LoRA; the reference
                  log-probs (the same NF4 model with the adapter off, or M_{t-1} loaded apart
                  when A_t starts from S) computed once into TRL's dataset cache and
                  ref_logps.safetensors; at step 1 also S's gamma-matrix row and samples
      train       TRL's DPOTrainer on D_t -> A_t (resumed from the last sealed checkpoint);
                  then the retention sample's gammas of the start and of start + A_t, and A_t saved
      merge       M_t = M_{t-1} + (alpha/r) B_t A_t, streamed in float32 (the chain stays in full precision)
      retention   NF4(M_t), as the next step loads it: how much of A_t's gamma gain it keeps;
                  M_t's gamma-matrix row and samples; the step's record completed

The manifest record's `phase` says which phase a killed step was in, and a resume redoes only
that phase (run.py decides, manifest.decide). Each phase takes the `StepRun` (the step's settings,
folders, record and clock) and what the phase before it produced; TRL's side of training (the
config, the resumable trainer, its callbacks) is in trainer.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import datasets
import torch
from safetensors.torch import load_file, save
from transformers import PrinterCallback, ProgressCallback, set_seed

from . import distributed, faults, memory
from .data import PairSet, tokenize_pair, write_pairs
from .diagnostics import gamma_file, gammas, save_gammas, stats
from .errors import DataError, TrainingDiverged
from .manifest import StepRecord
from .merge import merge_lora
from .model import load_base, lora_config, sequence_logps
from .recipe import LoadedRecipe, Recipe
from .rundir import RunDir, atomic_dir, atomic_write_bytes, atomic_write_bytes_if_changed, ensure_free_space, file_hashes, read_jsonl, verify_files
from .shards import model_tensors
from .splits import composition
from .tracking import StepTracking
from .trainer import (TOKENS, CheckpointSeal, JsonlMetrics, LossGuard, ResumableDPOTrainer, StepProgress, TokenTally, TrimEachUpdate,
                      dpo_config, sealed_checkpoint)


@dataclass
class StepContext:
    """What every step of a run shares."""

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


@dataclass
class StepRun:
    """Step t while it runs: its settings and folders, the manifest record it fills, its clock."""

    ctx: StepContext
    index: int
    pairs: PairSet
    record: StepRecord
    save: Callable[[StepRecord], None]  # writes the record into the manifest (a no-op off the main process)
    cfg: Recipe = field(init=False)  # the recipe as this step runs it ([steps.training] applied)
    timings: dict[str, float] = field(init=False)  # seconds per phase, those before a resume included

    def __post_init__(self):
        self.cfg = self.ctx.recipe.recipe.for_step(self.index)
        self.timings = dict(self.record.timings_partial or {})
        self._before = self.timings.pop("total", 0.0)
        self._t0 = time.perf_counter()

    @property
    def run(self) -> RunDir:
        return self.ctx.run

    @property
    def prev_dir(self) -> Path:
        """M_{t-1}: the step's reference (S at step 1)."""
        return self.ctx.base_dir if self.index == 1 else self.run.model_dir(self.index - 1)

    @property
    def target_dir(self) -> Path:
        """The base A_t is trained on: M_{t-1} (the paper), or S (model.target_init = "base")."""
        return self.prev_dir if self.cfg.model.target_init == "previous" else self.ctx.base_dir

    @property
    def data_dir(self) -> Path:
        return self.run.data_dir(self.index)

    @property
    def retention_path(self) -> Path:
        return self.run.step(self.index) / "retention_sample.safetensors"

    def total(self) -> float:
        return self._before + time.perf_counter() - self._t0

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's seconds to timings[phase]."""
        t = time.perf_counter()
        yield
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t

    def mark(self, phase: str, **fields) -> None:
        """Record that `phase` is next (with `fields` of the record), and write the manifest."""
        partial = {**self.timings, "total": self.total()}
        for k, v in {"phase": phase, "timings_partial": {k: round(v, 2) for k, v in partial.items()}, **fields}.items():
            setattr(self.record, k, v)
        self.save(self.record)


@dataclass
class Training:
    """What the reference phase builds and the train phase uses: the trainer on the target with a
    fresh LoRA, the reference log-probs it computed, and the callbacks that are read afterwards."""

    trainer: ResumableDPOTrainer
    dataset: object  # D_t as TRL tokenised it, with its reference log-probs (datasets.Dataset)
    ref_model: object  # M_{t-1} loaded apart when A_t starts from S; None: the adapter off is the reference
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    checkpoint: Path | None  # the sealed trainer checkpoint training resumes from
    guard: LossGuard
    tally: TokenTally
    ledger: distributed.BatchLedger

    @property
    def model(self):
        return self.trainer.model


@contextlib.contextmanager
def reference_view(model) -> Iterator[object]:
    """`model` (the PEFT model being trained) with its adapter off: the step's starting point, which
    is also its reference unless a separate reference model was loaded. At step 1 it is exactly S."""
    with model.disable_adapter():
        yield model


def run_step(ctx: StepContext, index: int, pairs: PairSet, record: StepRecord, save) -> tuple[StepRecord | None, dict]:
    """Run step `index` (1-based) on D_t = `pairs`; return its completed record and gamma-matrix rows.

    `record` is the step's manifest record so far (its `phase` says where a killed step stopped);
    `save(record)` writes it into the manifest. Off the main process the result is (None, {}).
    """
    step = StepRun(ctx, index, pairs, record, save)
    faults.set_step(index)
    rows: dict[str, dict] = {}
    saved = verify_files(step.run.adapter_dir(index), record.adapter_files) is None and step.retention_path.exists()
    if not distributed.broadcast(saved):  # (distributed) the main process's view of the files decides
        record.unset("model_files")  # an M_t merged from another A_t is not this step's
        if distributed.is_main():
            _free_space_for_model(step)
            write_pairs(pairs, step.data_dir / "pairs.jsonl")
        training = reference(step)
        rows.update(base_rows(step, training))
        step.mark("train", **({"resumed": [f"train from {training.checkpoint.name}"]} if training.checkpoint else {}))
        train(step, training)
        save_adapter(step, training)
        del training
        faults.point("adapter")
    memory.release()
    if not distributed.is_main():  # (distributed) merge, retention and the gamma matrix are the main process's
        return None, {}
    merge(step)
    rows.update(retention(step))
    done = finish(step)
    StepTracking(ctx.recipe, ctx.run, index).log_step_end(done, rows)
    return done, rows


# ----------------------------------------------------------------------------- reference


def reference(step: StepRun) -> Training:
    """D_t through TRL's tokenisation, the models loaded, the trainer built; TRL's reference pass
    (precompute_ref_log_probs, in the trainer's construction) gives the reference log-probs, which
    are also written to ref_logps.safetensors."""
    data_dir = step.data_dir
    with distributed.main_first():  # (distributed) the others read pairs.jsonl and the cache once it is written
        dataset = datasets.load_dataset(
            "json", data_files=str(data_dir / "pairs.jsonl"), split="train", cache_dir=str(data_dir / "hf_cache")
        )
    with step.timed("load"):
        model, ref_model = _load_models(step)
    with step.timed("reference"):
        training = _build_trainer(step, model, ref_model, dataset)
    faults.point("reference")
    rows = torch.tensor([r["row"] for r in step.pairs.rows])
    ref_bytes = _safetensors_bytes({"chosen": training.ref_chosen, "rejected": training.ref_rejected, "row": rows})
    if distributed.is_main():
        atomic_write_bytes_if_changed(data_dir / "ref_logps.safetensors", ref_bytes)
    return training


def _load_models(step: StepRun):
    """The target (NF4), and the reference apart only when A_t does not start from M_{t-1}."""
    adapter = step.ctx.recipe.adapter
    storage = distributed.quant_storage(step.cfg, adapter)  # fsdp shards floats only
    model = load_base(step.target_dir, adapter, quant_storage=storage)
    ref_model = None if step.target_dir == step.prev_dir else load_base(step.prev_dir, adapter, quant_storage=storage)
    return model, ref_model


def _build_trainer(step: StepRun, model, ref_model, dataset) -> Training:
    """TRL's DPOTrainer on `model` with a fresh LoRA (its reference pass runs here), set up to
    resume from the newest sealed checkpoint."""
    ctx, cfg, index = step.ctx, step.cfg, step.index
    trainer_dir = step.run.step(index) / "trainer"
    with distributed.main_first():  # the main process removes unsealed checkpoints first
        checkpoint = sealed_checkpoint(trainer_dir)
    resume_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    metrics = JsonlMetrics(step.run.metrics_path(index) if distributed.is_main() else None, keep_until=resume_step)
    tokens_file = checkpoint / TOKENS if checkpoint else None
    tally = TokenTally(None, json.loads(tokens_file.read_text()) if tokens_file and tokens_file.exists() else None)
    guard, ledger = LossGuard(), distributed.BatchLedger()
    set_seed(cfg.run.seed)  # LoRA's A is drawn inside DPOTrainer.__init__ (get_peft_model)
    args = dpo_config(ctx.recipe, trainer_dir, index)
    distributed.prepare_accelerate(args)  # FSDP2 on CPU processes too (accelerate enables it on accelerators only)
    trainer = ResumableDPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=ctx.tokenizer,
        peft_config=lora_config(ctx.recipe.adapter),
        # the tally writes into a checkpoint before CheckpointSeal seals it
        callbacks=[metrics, guard, tally, CheckpointSeal(), StepProgress(index), ledger, TrimEachUpdate()],
        prefix_sharing=cfg.training.prefix_sharing,
    )
    tally.model = trainer.model.get_base_model()
    distributed.check_trainer(trainer, cfg.distributed)  # no silent fallback to one process or to DDP
    distributed.compute_as_ddp(trainer)  # FSDP2: the training forward in the reference pass's dtypes
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # StepProgress is the progress bar
    # TRL has patched its fused LM head into both; lora-sdpo's own gamma passes reuse it.
    trainer.model.get_base_model()._lora_sdpo_fused = True
    if ref_model is not None:
        ref_model._lora_sdpo_fused = True
    train_ds = trainer.train_dataset
    if len(train_ds) != len(step.pairs.rows):
        raise DataError(f"step {index}: TRL kept {len(train_ds)} of {len(step.pairs.rows)} pairs; expected all")
    if cfg.training.group_by_length:  # a pair's padded width in TRL's collator
        widths = [len(p) + max(len(c), len(r)) for p, c, r in zip(train_ds["prompt_ids"], train_ds["chosen_ids"], train_ds["rejected_ids"])]
        trainer.train_dataset = train_ds.add_column("length", widths)
    return Training(
        trainer=trainer, dataset=train_ds, ref_model=ref_model, checkpoint=checkpoint, guard=guard, tally=tally, ledger=ledger,
        ref_chosen=torch.tensor(train_ds["ref_chosen_logps"], dtype=torch.float32),
        ref_rejected=torch.tensor(train_ds["ref_rejected_logps"], dtype=torch.float32),
    )


def base_rows(step: StepRun, training: Training) -> dict[str, dict]:
    """At step 1 (main process): S's gamma-matrix row (written to the manifest at once) and S's
    samples, from the model with the adapter off, which at step 1 is exactly S."""
    ctx, rows = step.ctx, {}
    if step.index != 1 or not distributed.is_main():
        return rows
    if step.cfg.diagnostics.gamma_matrix and "S" not in ctx.matrix_rows_done:
        with step.timed("diagnostics"), reference_view(training.model) as s:
            rows["S"] = ctx.gamma_row(s, "S")
        ctx.save_matrix_rows(rows)
    if ctx.sample_log is not None and ctx.sample_log.wanted("S"):
        with reference_view(training.model) as s:
            step.timings["samples"] = step.timings.get("samples", 0.0) + ctx.sample_log.record("S", s, ctx.tokenizer)
    return rows


# ----------------------------------------------------------------------------- train


def train(step: StepRun, training: Training) -> None:
    """DPO on D_t to the end (from the sealed checkpoint, if any); stops the step on a NaN or inf loss."""
    memory.release()  # the load's and the reference pass's leftovers, before training's peak
    trainer, checkpoint = training.trainer, training.checkpoint
    tracking = StepTracking(step.ctx.recipe, step.run, step.index) if distributed.is_main() else None  # the main process tracks
    for cb in tracking.trainer_callbacks(int(checkpoint.name.split("-")[1]) if checkpoint else 0) if tracking else []:
        trainer.add_callback(cb)
    try:
        with step.timed("train"):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if tracking:
            tracking.end_training()
    if training.guard.bad is not None:
        raise _diverged(step, *training.guard.bad)


def _diverged(step: StepRun, at: int, what: str, value: float) -> TrainingDiverged:
    kept = sealed_checkpoint(step.run.step(step.index) / "trainer")
    return TrainingDiverged(
        f"step {step.index}: the {what} became {value} at optimizer step {at}; training stopped and nothing of it "
        f"was merged. {'The last good checkpoint, ' + str(kept) + ', is kept.' if kept else 'No checkpoint was saved before it.'} "
        "Usual causes: fp16 overflow (use training.precision = \"bf16\" or \"fp32\"), a learning rate too "
        f"high for this model (training.learning_rate = {step.cfg.training.learning_rate:g}; try 10x lower), or "
        "max_grad_norm too loose. Fix the recipe and run with --restart (or another --output)."
    )


def adapter_gammas(step: StepRun, training: Training) -> tuple[torch.Tensor, torch.Tensor]:
    """Retention, part 1: gamma of the step's start and of start + A_t on the first pairs of D_t
    (every process runs it: under FSDP the model's forward is collective)."""
    model, train_ds = training.model, training.dataset
    pad_id, max_len, shared = step.ctx.tokenizer.pad_token_id, step.cfg.training.max_length, step.cfg.training.prefix_sharing
    sample = [train_ds[i] for i in range(min(step.cfg.retention.sample_size, len(train_ds)))]
    with step.timed("retention"):
        c, r = sequence_logps(model, sample, pad_id, max_len, prefix_sharing=shared)
        g_adapter = c - r
        if training.ref_model is None:  # the start is the reference: its gammas are the reference pass's
            g_start = (training.ref_chosen - training.ref_rejected)[: len(sample)]
        else:
            with reference_view(model) as start:
                c, r = sequence_logps(start, sample, pad_id, max_len, prefix_sharing=shared)
            g_start = c - r
    return g_start, g_adapter


def save_adapter(step: StepRun, training: Training) -> None:
    """A_t saved with the retention sample's gammas, what each process trained on and the tokens;
    the trainer's checkpoints are removed once A_t is on disk."""
    g_start, g_adapter = adapter_gammas(step, training)
    # (distributed) what each process trained on is gathered; the main process alone writes.
    shares = distributed.gather_object(training.ledger.summary(distributed.world().rank))
    tokens = training.tally.total()
    adapter_state = distributed.adapter_state_dict(training.trainer)
    if not distributed.is_main():
        return
    run, index = step.run, step.index
    atomic_write_bytes(run.step(index) / "ranks.json", json.dumps(shares, indent=1).encode())
    atomic_write_bytes(step.retention_path, _safetensors_bytes({"start": g_start, "adapter": g_adapter}))
    with atomic_dir(run.adapter_dir(index)) as tmp:
        training.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
    step.mark("merge", adapter_files=file_hashes(run.adapter_dir(index)), tokens=tokens,
              processes=distributed.batch_report(step.cfg, shares, len(step.pairs.rows)))
    shutil.rmtree(run.step(index) / "trainer", ignore_errors=True)  # checkpoints are not needed once A_t is saved


# ----------------------------------------------------------------------------- merge


def merge(step: StepRun) -> None:
    """M_t = target + (alpha/r) B_t A_t in float32, unless the M_t on disk is the one recorded."""
    run, index = step.run, step.index
    if verify_files(run.model_dir(index), step.record.model_files) is None:
        return
    with step.timed("merge"):
        merge_lora(step.target_dir, run.adapter_dir(index), run.model_dir(index), dtype="float32")
    step.mark("retention", model_files=file_hashes(run.model_dir(index)))


# ----------------------------------------------------------------------------- retention


def retention(step: StepRun) -> dict[str, dict]:
    """Retention, part 2: the merged M_t re-quantised exactly as the next step will load it, on the
    sample part 1 scored; then M_t's gamma-matrix row and samples. Returns the matrix rows."""
    ctx, cfg, index, rows = step.ctx, step.cfg, step.index, {}
    kept = load_file(step.retention_path)
    sample = _retention_sample(step)
    with step.timed("retention"):
        merged = load_base(step.run.model_dir(index), ctx.recipe.adapter)
        c, r = sequence_logps(merged, sample, ctx.tokenizer.pad_token_id, cfg.training.max_length,
                              prefix_sharing=cfg.training.prefix_sharing)
    if cfg.diagnostics.gamma_matrix:
        with step.timed("diagnostics"):
            rows[f"M_{index}"] = ctx.gamma_row(merged, f"M_{index}")
    if ctx.sample_log is not None:
        step.timings["samples"] = step.timings.get("samples", 0.0) + ctx.sample_log.record(f"M_{index}", merged, ctx.tokenizer)
    del merged
    memory.release()
    step.record.retention_detail = retention_stats(kept["start"], kept["adapter"], c - r)
    return rows


def _retention_sample(step: StepRun) -> list[dict]:
    """The first retention.sample_size pairs of D_t, tokenised as TRL tokenised them for training."""
    lines = (step.data_dir / "pairs.jsonl").read_text().splitlines()[: step.cfg.retention.sample_size]
    return [tokenize_pair(json.loads(line), step.ctx.tokenizer) for line in lines]


def finish(step: StepRun) -> StepRecord:
    """The step's completed record: data, losses and rewards from metrics.jsonl, gamma_ref from the
    reference pass, retention, the files of A_t and M_t, tokens and timings."""
    run, index, cfg, rec = step.run, step.index, step.cfg, step.record
    logs = [m for m in read_jsonl(run.metrics_path(index)) if "loss" in m and "train_runtime" not in m]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    tail = logs[-max(1, len(logs) // 4):]
    ref = load_file(step.data_dir / "ref_logps.safetensors")
    gamma_ref = ref["chosen"] - ref["rejected"]
    step.timings["total"] = step.total()
    return StepRecord(
        index=index, status="done", sources=[rep.summary() for rep in step.pairs.reports], rows=len(step.pairs.rows),
        composition=composition(step.pairs), data_fingerprint=step.pairs.fingerprint, reference=rec.reference_label,
        target_init=cfg.model.target_init, training=cfg.training.model_dump(mode="json"),  # the step's effective settings
        first_loss=first.get("loss"), first_reward_margin=first.get("rewards/margins"), last_loss=last.get("loss"),
        reward_accuracy=_mean([m.get("rewards/accuracies") for m in tail]), reward_margin=_mean([m.get("rewards/margins") for m in tail]),
        optimizer_steps=len(logs), gamma_ref_mean=float(gamma_ref.mean()),
        gamma_ref_std=float(gamma_ref.std()) if len(gamma_ref) > 1 else 0.0,
        retention=rec.retention_detail.retention, retention_detail=rec.retention_detail,
        adapter=run.rel(run.adapter_dir(index)), model=run.rel(run.model_dir(index)),
        adapter_files=rec.adapter_files, model_files=rec.model_files, resumed=rec.resumed, processes=rec.processes,
        # training's tokens: through the backbone, in TRL's padded two-row layout, completion tokens
        prefix_sharing=cfg.training.prefix_sharing, tokens=rec.tokens,
        timings={k: round(v, 2) for k, v in step.timings.items()},
    )


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


# ----------------------------------------------------------------------------- helpers


def _free_space_for_model(step: StepRun) -> None:
    """M_t is written as float32 shards; stop now, not after hours of training, if it cannot fit."""
    need = sum(math.prod(t.shape) * 4 if t.is_float else t.nbytes for t in model_tensors(step.target_dir).values())
    ensure_free_space(step.run.step(step.index), need, f"step {step.index}: writing M_{step.index} (float32)")


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def _safetensors_bytes(tensors: dict) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})
