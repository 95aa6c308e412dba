"""One sDPO step: D_t and M_{t-1} in, adapter A_t and M_t out, in five phases.

    run_step(ctx, settings, pairs, record)
      reference    the target (M_{t-1}, or S when model.target_init = "base") loaded as NF4 with a fresh
                   LoRA in TRL's trainer; D_t's reference log-probs computed on M_{t-1} (the same model
                   with the adapter off, or M_{t-1} loaded apart) by lora-sdpo's pair forward, saved to
                   data/ref_logps.safetensors and handed to TRL as dataset columns
      train        TRL's DPOTrainer on D_t -> A_t, saved (resumed from the last sealed checkpoint)
      merge        M_t = target + (alpha/r) B_t A_t, streamed in float32 (the chain stays in full precision)
      retention    gamma of the start, of start + A_t and of NF4(M_t) (as the next step loads it) on the
                   first pairs of D_t: how much of A_t's gamma gain the merge keeps
      diagnostics  M_t's gamma-matrix row and samples (and S's, at step 1)

Each phase is a function of the `StepRun` (the step's settings, folders, record and clock) and of
what the phase before it produced, and ends by recording its result in the step's record
(`StepRun.passed`): the files it wrote, with their sha256, and the phase that comes next.
`run_step` yields the record after each phase; run.py writes it into the manifest.

Resume: the record's `phase` names the phase a killed step was in, and `PHASES` maps it to its
function; the phases before it are not run again, what they produced is read back from disk
(`READ_BACK`) once their recorded hashes verify it (`VERIFY`). An output that fails its check is
produced again from its own phase on. TRL's side of training (the config, its callbacks) is in
trainer.py; everything below TRL's public API in trl_compat.py.
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
from peft import PeftModel
from safetensors.torch import load_file, save
from transformers import PrinterCallback, ProgressCallback, set_seed
from trl.trainer import add_fused_lm_head

from . import distributed, faults, memory, pairs as pair_forward
from .data import PairSet, tokenize_pair, write_pairs
from .diagnostics import gamma_file, gammas, save_gammas, stats
from .errors import DataError, TrainingDiverged
from .manifest import Retention, StepRecord
from .merge import merge_lora
from .model import cast_lora, load_base, lora_config, lora_dtype, sequence_logps
from .recipe import StepSettings
from .rundir import RunDir, atomic_dir, atomic_write_bytes, ensure_free_space, file_hashes, read_jsonl, sha256_file, verify_files
from .shards import model_tensors
from .splits import composition
from .trainer import TOKENS, CheckpointSeal, JsonlMetrics, LossGuard, StepProgress, TokenTally, TrimEachUpdate, dpo_config, sealed_checkpoint
from .trl_compat import ResumableDPOTrainer, use_reference_logps

REF_LOGPS = "ref_logps.safetensors"


@dataclass
class StepContext:
    """What every step of a run shares."""

    run: RunDir
    base_dir: Path  # S, as a local folder of safetensors
    tokenizer: object
    samples: dict[str, list[dict]]  # tokenised first pairs of each D_t and of the eval data (gamma matrix)
    gamma_max_length: int  # the run's [training] max_length and prefix_sharing: every row of the matrix alike
    gamma_prefix_sharing: bool
    sample_log: object = None  # samples.SampleLog: what S and each M_t write, for the report (None: off)

    def gamma_row(self, model, label: str) -> dict[str, dict]:
        """One row of the gamma matrix: the model's gamma statistics on every dataset's sample; its
        per-pair gammas go to gamma/LABEL.safetensors, from which reports rebuild the paired differences."""
        per_pair = {name: gammas(model, rows, self.tokenizer, self.gamma_max_length, prefix_sharing=self.gamma_prefix_sharing)
                    for name, rows in self.samples.items()}
        save_gammas(gamma_file(self.run.root, label), per_pair)
        return {name: stats(g) for name, g in per_pair.items()}


@dataclass
class StepRun:
    """Step t while it runs: its settings and folders, the record it fills, its clock."""

    ctx: StepContext
    settings: StepSettings
    pairs: PairSet
    record: StepRecord
    tracker: object = None  # tracking.StepTracking of the step (main process; None: not tracked)
    rows_done: frozenset = frozenset()  # gamma-matrix rows already in the manifest
    timings: dict[str, float] = field(init=False)  # seconds per phase, those before a resume included

    def __post_init__(self):
        self.timings = dict(self.record.timings_partial or {})
        self._before = self.timings.pop("total", 0.0)
        self._t0 = time.perf_counter()

    @property
    def index(self) -> int:
        return self.settings.index

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
        return self.prev_dir if self.settings.target_init == "previous" else self.ctx.base_dir

    @property
    def data_dir(self) -> Path:
        return self.run.data_dir(self.index)

    def total(self) -> float:
        return self._before + time.perf_counter() - self._t0

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's seconds to timings[phase]."""
        t = time.perf_counter()
        yield
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t

    def passed(self, phase: str, **fields) -> None:
        """`phase` is done: the record names the next phase and holds `fields` (what the phase produced)."""
        partial = {k: round(v, 2) for k, v in {**self.timings, "total": self.total()}.items()}
        following = PHASE_NAMES[PHASE_NAMES.index(phase) + 1] if phase != PHASE_NAMES[-1] else None
        self.record = self.record.model_copy(update={"phase": following, "timings_partial": partial, **fields})


@dataclass
class Training:
    """What the reference phase hands to the train phase: TRL's trainer on the target with a fresh
    LoRA and the reference log-probs in its dataset, and the callbacks that are read afterwards."""

    trainer: ResumableDPOTrainer
    checkpoint: Path | None  # the sealed trainer checkpoint training resumes from
    guard: LossGuard
    tally: TokenTally
    ledger: distributed.BatchLedger

    @property
    def model(self):
        return self.trainer.model


@dataclass
class Retained:
    """What the retention phase hands to diagnostics: its measure, and NF4(M_t) while it is loaded."""

    detail: Retention
    merged: object = None  # None when it is not loaded (a resumed step): diagnostics loads it


@contextlib.contextmanager
def reference_view(model) -> Iterator[object]:
    """`model` (a PEFT model) with its adapter off: the step's starting point. At step 1 it is exactly
    S; when the target is M_{t-1} (the paper), it is the step's reference."""
    with model.disable_adapter():
        yield model


def run_step(ctx: StepContext, settings: StepSettings, pairs: PairSet, record: StepRecord, *, tracker=None,
             rows_done: frozenset = frozenset()) -> Iterator[tuple[StepRecord, dict]]:
    """Run step t = settings.index on D_t = `pairs`, from the phase `record` says a killed run was in.

    Yields (record, gamma rows) after each phase: run.py writes them into the manifest. The last
    one yielded is the step's completed record with its gamma-matrix rows. Off the main process,
    where only the reference and train phases run, nothing is written from what it yields.
    """
    step = StepRun(ctx, settings, pairs, record, tracker, rows_done)
    faults.set_step(step.index)
    first = distributed.broadcast(first_phase(step))  # (distributed) the main process's view of the files decides
    before = PHASE_NAMES.index(first) - 1
    produced = READ_BACK[PHASE_NAMES[before]](step) if before >= 0 else None
    for name in PHASE_NAMES[before + 1:]:
        if name in MAIN_ONLY and not distributed.is_main():  # (distributed) the others are done after training
            return
        produced = PHASES[name](step, produced)
        memory.release()
        if name != PHASE_NAMES[-1]:
            yield step.record, {}
    yield finish(step), produced


def first_phase(step: StepRun) -> str:
    """The phase to run first: the one the record names, or an earlier one whose output no longer
    matches what the record says it wrote."""
    wanted = step.record.phase or PHASE_NAMES[0]
    for name in PHASE_NAMES[: PHASE_NAMES.index(wanted)]:
        problem = VERIFY[name](step)
        if problem is not None:
            step.record = step.record.model_copy(update={"resumed": [f"{name} again: {problem}"]})
            return name
    return wanted


# ----------------------------------------------------------------------------- reference


def reference(step: StepRun, _=None) -> Training:
    """M_{t-1}'s log-probs of every pair of D_t, computed here, once, by the pair forward with the
    adapter off, and handed to TRL's trainer, which trains against them."""
    if distributed.is_main():
        _free_space_for_model(step)
        write_pairs(step.pairs, step.data_dir / "pairs.jsonl")
    training, ref_model = setup(step)
    batch = step.settings.training.precompute_ref_batch_size or training.trainer.args.per_device_train_batch_size
    with step.timed("reference"):
        if ref_model is None:  # A_t starts from M_{t-1}: with the adapter off, the model is the reference
            with reference_view(training.model) as start:
                chosen, rejected = reference_logps(training.trainer, start, batch, step.index)
        else:  # A_t starts from S: M_{t-1} was loaded apart for this pass only
            chosen, rejected = reference_logps(training.trainer, ref_model, batch, step.index)
    del ref_model
    faults.point("reference")
    path = step.data_dir / REF_LOGPS
    if distributed.is_main():
        rows = torch.tensor([r["row"] for r in step.pairs.rows])
        atomic_write_bytes(path, _safetensors_bytes({"chosen": chosen, "rejected": rejected, "row": rows}))
    use_reference_logps(training.trainer, chosen, rejected)
    _group_by_length(step, training.trainer)
    step.passed("reference", reference_files=_reference_files(step) if distributed.is_main() else {})
    return training


@torch.no_grad()
def reference_logps(trainer, model, batch_size: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen, rejected) of every pair of the trainer's dataset under
    `model`, in TRL's batches and collator, through TRL's public `compute_ref_log_probs` (no_grad,
    the trainer's autocast, length-desensitised sums when training.ld_alpha is set): the model's
    forward is lora-sdpo's pair forward, or TRL's own with training.prefix_sharing = false.
    (distributed) Each process computes every N-th batch; the results are gathered."""
    from tqdm.auto import tqdm

    ds, w = trainer.train_dataset, distributed.world()
    starts = list(range(0, len(ds), batch_size))[w.rank :: w.size]
    device = trainer.accelerator.device
    mine = {}
    for s in tqdm(starts, desc=f"step {index}: reference log-probs", unit="batch", leave=False, disable=not w.main):
        batch = trainer.data_collator([ds[i] for i in range(s, min(s + batch_size, len(ds)))])
        c, r = trainer.compute_ref_log_probs(model, {k: v.to(device) for k, v in batch.items()})
        mine[s] = (c.float().cpu(), r.float().cpu())
    parts = {s: cr for share in distributed.gather_object(mine) for s, cr in share.items()}
    return torch.cat([parts[s][0] for s in sorted(parts)]), torch.cat([parts[s][1] for s in sorted(parts)])


def setup(step: StepRun) -> tuple[Training, object]:
    """D_t tokenised by TRL, the target loaded as NF4 and TRL's trainer built on it with a fresh
    LoRA (TRL computes no reference of its own), set up to resume from the newest sealed checkpoint.
    Also returns M_{t-1} loaded apart when A_t does not start from it (else None)."""
    s, index = step.settings, step.index
    with distributed.main_first():  # (distributed) the others read pairs.jsonl and the cache once it is written
        dataset = datasets.load_dataset("json", data_files=str(step.data_dir / "pairs.jsonl"), split="train",
                                        cache_dir=str(step.data_dir / "hf_cache"))
    storage = distributed.quant_storage(s, s.adapter)  # fsdp shards floats only
    with step.timed("load"):
        model = load_base(step.target_dir, s.adapter, quant_storage=storage)
        ref_model = None if step.target_dir == step.prev_dir else load_base(step.prev_dir, s.adapter, quant_storage=storage)
    trainer_dir = step.run.step(index) / "trainer"
    with distributed.main_first():  # the main process removes unsealed checkpoints first
        checkpoint = sealed_checkpoint(trainer_dir)
    resume_step = int(checkpoint.name.split("-")[1]) if checkpoint else 0
    metrics = JsonlMetrics(step.run.metrics_path(index) if distributed.is_main() else None, keep_until=resume_step)
    tokens_file = checkpoint / TOKENS if checkpoint else None
    tally = TokenTally(None, json.loads(tokens_file.read_text()) if tokens_file and tokens_file.exists() else None)
    guard, ledger = LossGuard(), distributed.BatchLedger()
    set_seed(s.seed)  # LoRA's A is drawn inside DPOTrainer.__init__ (get_peft_model)
    args = dpo_config(s, trainer_dir)
    distributed.prepare_accelerate(args)  # FSDP2 on CPU processes too (accelerate enables it on accelerators only)
    with step.timed("load"):
        trainer = ResumableDPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=step.ctx.tokenizer, peft_config=lora_config(s.adapter),
            # the tally writes into a checkpoint before CheckpointSeal seals it
            callbacks=[metrics, guard, tally, CheckpointSeal(), StepProgress(index), ledger, TrimEachUpdate()],
        )
    # TRL has put its fused LM head on the model (add_fused_lm_head, in __init__): from here on, every
    # forward of a pair goes through the pair forward (pairs.py), or counts tokens on TRL's own path.
    pair_forward.install(trainer.model.get_base_model(), enabled=s.training.prefix_sharing)
    # TRL has cast a 4-bit base's LoRA to bfloat16; adapter.lora_dtype decides (float32 where bf16 is not native)
    cast_lora(trainer.model, lora_dtype(s.adapter, str(trainer.accelerator.device)))
    if ref_model is not None:
        add_fused_lm_head(ref_model)
        pair_forward.install(ref_model, enabled=s.training.prefix_sharing)
        ref_model.eval()
    tally.model = trainer.model.get_base_model()
    distributed.check_trainer(trainer, s.distributed)  # no silent fallback to one process or to DDP
    distributed.compute_as_ddp(trainer)  # FSDP2: the training forward in the reference pass's dtypes
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # StepProgress is the progress bar
    if len(trainer.train_dataset) != len(step.pairs.rows):
        raise DataError(f"step {index}: TRL kept {len(trainer.train_dataset)} of {len(step.pairs.rows)} pairs; expected all")
    return Training(trainer=trainer, checkpoint=checkpoint, guard=guard, tally=tally, ledger=ledger), ref_model


def _group_by_length(step: StepRun, trainer) -> None:
    """training.group_by_length: a pair's padded width in TRL's collator, as the "length" column."""
    if step.settings.training.group_by_length:
        ds = trainer.train_dataset
        widths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        trainer.train_dataset = ds.add_column("length", widths)


def _reference_files(step: StepRun) -> dict[str, str]:
    return {name: sha256_file(step.data_dir / name) for name in ("pairs.jsonl", REF_LOGPS)}


def read_reference(step: StepRun) -> Training:
    """The reference phase's result, when it is done: the trainer built again (the same fresh LoRA,
    from the seed) and the reference log-probs read back from ref_logps.safetensors."""
    training, ref_model = setup(step)
    del ref_model
    ref = load_file(step.data_dir / REF_LOGPS)
    use_reference_logps(training.trainer, ref["chosen"], ref["rejected"])
    _group_by_length(step, training.trainer)
    return training


# ----------------------------------------------------------------------------- train


def train(step: StepRun, training: Training) -> Path:
    """DPO on D_t to the end (from the sealed checkpoint, if any), then A_t saved with what each
    process trained on and the tokens. Stops the step on a NaN or inf loss."""
    trainer, checkpoint, tracker = training.trainer, training.checkpoint, step.tracker
    for cb in tracker.trainer_callbacks(int(checkpoint.name.split("-")[1]) if checkpoint else 0) if tracker else []:
        trainer.add_callback(cb)
    try:
        with step.timed("train"):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        if tracker:
            tracker.end_training()
    if training.guard.bad is not None:
        raise _diverged(step, *training.guard.bad)
    # (distributed) what each process trained on is gathered, the adapter too under FSDP; the main process alone writes.
    shares = distributed.gather_object(training.ledger.summary(distributed.world().rank))
    tokens = training.tally.total()
    adapter_state = distributed.adapter_state_dict(trainer)
    run, index, adapter_dir = step.run, step.index, step.run.adapter_dir(step.index)
    if distributed.is_main():
        atomic_write_bytes(run.step(index) / "ranks.json", json.dumps(shares, indent=1).encode())
        with atomic_dir(adapter_dir) as tmp:
            training.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
    faults.point("adapter")
    step.passed("train", adapter_files=file_hashes(adapter_dir) if distributed.is_main() else {}, tokens=tokens,
                processes=distributed.batch_report(step.settings, shares, len(step.pairs.rows)),
                resumed=[f"train from {checkpoint.name}"] if checkpoint else step.record.resumed)
    return adapter_dir


def _diverged(step: StepRun, at: int, what: str, value: float) -> TrainingDiverged:
    kept = sealed_checkpoint(step.run.step(step.index) / "trainer")
    return TrainingDiverged(
        f"step {step.index}: the {what} became {value} at optimizer step {at}; training stopped and nothing of it "
        f"was merged. {'The last good checkpoint, ' + str(kept) + ', is kept.' if kept else 'No checkpoint was saved before it.'} "
        "Usual causes: fp16 overflow (use training.precision = \"bf16\" or \"fp32\"), a learning rate too "
        f"high for this model (training.learning_rate = {step.settings.training.learning_rate:g}; try 10x lower), or "
        "max_grad_norm too loose. Fix the recipe and run with --restart (or another --output)."
    )


def saved_adapter(step: StepRun) -> Path:
    """The train phase's result, when it is done: A_t on disk."""
    return step.run.adapter_dir(step.index)


# ----------------------------------------------------------------------------- merge


def merge(step: StepRun, adapter_dir: Path) -> Path:
    """M_t = target + (alpha/r) B_t A_t in float32. The trainer's checkpoints go first: A_t is recorded."""
    run, index = step.run, step.index
    shutil.rmtree(run.step(index) / "trainer", ignore_errors=True)
    with step.timed("merge"):
        merge_lora(step.target_dir, adapter_dir, run.model_dir(index), dtype="float32")
    step.passed("merge", model_files=file_hashes(run.model_dir(index)))
    return run.model_dir(index)


def merged_model(step: StepRun) -> Path:
    """The merge phase's result, when it is done: M_t on disk."""
    return step.run.model_dir(step.index)


# ----------------------------------------------------------------------------- retention


def retention(step: StepRun, model_dir: Path) -> Retained:
    """How much of A_t's gamma gain survives the merge and the re-quantisation: gamma of the start
    (the reference log-probs when the start is the reference), of the start + A_t, and of NF4(M_t)
    loaded exactly as the next step loads it, on the first retention.sample_size pairs of D_t."""
    s = step.settings
    sample = _retention_sample(step)

    def gamma(model) -> torch.Tensor:
        c, r = sequence_logps(model, sample, step.ctx.tokenizer.pad_token_id, s.training.max_length,
                              prefix_sharing=s.training.prefix_sharing)
        return c - r

    with step.timed("retention"):
        adapted = PeftModel.from_pretrained(load_base(step.target_dir, s.adapter), str(step.run.adapter_dir(step.index)),
                                            autocast_adapter_dtype=False)  # the adapter in the dtype it was trained in
        g_adapter = gamma(adapted)
        if step.target_dir == step.prev_dir:  # the start is the reference: its gammas are the reference pass's
            ref = load_file(step.data_dir / REF_LOGPS)
            g_start = (ref["chosen"] - ref["rejected"])[: len(sample)]
        else:
            with reference_view(adapted) as start:
                g_start = gamma(start)
        del adapted
        memory.release()
        merged = load_base(model_dir, s.adapter)
        g_merged = gamma(merged)
    detail = Retention.model_validate(retention_stats(g_start, g_adapter, g_merged))
    faults.point("retention")
    step.passed("retention", retention_detail=detail)
    return Retained(detail, merged)


def _retention_sample(step: StepRun) -> list[dict]:
    """The first retention.sample_size pairs of D_t, tokenised as TRL tokenised them for training."""
    return [tokenize_pair(r, step.ctx.tokenizer) for r in step.pairs.rows[: step.settings.retention.sample_size]]


def kept_retention(step: StepRun) -> Retained:
    """The retention phase's result, when it is done: its measure, as recorded."""
    return Retained(step.record.retention_detail)


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


# ----------------------------------------------------------------------------- diagnostics


def diagnostics(step: StepRun, retained: Retained) -> dict[str, dict]:
    """M_t's gamma-matrix row and samples, and at step 1 S's (unless the manifest has them): the
    rows, for the manifest's gamma matrix."""
    ctx, s, label = step.ctx, step.settings, f"M_{step.index}"
    merged, retained.merged, rows = retained.merged, None, {}
    if s.diagnostics.gamma_matrix or (ctx.sample_log is not None and ctx.sample_log.wanted(label)):
        merged = merged if merged is not None else load_base(step.run.model_dir(step.index), s.adapter)
        rows = _model_rows(step, label, merged)
    del merged
    memory.release()
    want_s = s.diagnostics.gamma_matrix and "S" not in step.rows_done
    if step.index == 1 and (want_s or (ctx.sample_log is not None and ctx.sample_log.wanted("S"))):
        base = load_base(ctx.base_dir, s.adapter)
        rows = {**_model_rows(step, "S", base, gamma_row=want_s), **rows}
        del base
    faults.point("diagnostics")
    return rows


def _model_rows(step: StepRun, label: str, model, gamma_row: bool = True) -> dict[str, dict]:
    rows = {}
    if gamma_row and step.settings.diagnostics.gamma_matrix:
        with step.timed("diagnostics"):
            rows[label] = step.ctx.gamma_row(model, label)
    log = step.ctx.sample_log
    if log is not None and log.wanted(label):
        step.timings["samples"] = step.timings.get("samples", 0.0) + log.record(label, model, step.ctx.tokenizer)
    return rows


# ----------------------------------------------------------------------------- the phase table

# phase -> its function, of the step and what the phase before produced
PHASES: dict[str, Callable] = {"reference": reference, "train": train, "merge": merge, "retention": retention,
                               "diagnostics": diagnostics}
PHASE_NAMES = tuple(PHASES)
# phase -> what it produced, read back from disk or the record when a resumed step starts after it
READ_BACK: dict[str, Callable] = {"reference": read_reference, "train": saved_adapter, "merge": merged_model,
                                  "retention": kept_retention}
# phase -> None when what it produced is what the record says it wrote, else what is wrong
VERIFY: dict[str, Callable] = {
    "reference": lambda step: verify_files(step.data_dir, step.record.reference_files),
    "train": lambda step: verify_files(step.run.adapter_dir(step.index), step.record.adapter_files),
    "merge": lambda step: verify_files(step.run.model_dir(step.index), step.record.model_files),
    "retention": lambda step: None if step.record.retention_detail is not None else "no retention recorded",
}
MAIN_ONLY = {"merge", "retention", "diagnostics"}  # (distributed) phases the main process runs alone


def finish(step: StepRun) -> StepRecord:
    """The step's completed record: its record so far (the files and results of every phase) with
    data, losses and rewards from metrics.jsonl, gamma_ref from the reference pass, and timings."""
    run, index, s, rec = step.run, step.index, step.settings, step.record
    logs = [m for m in read_jsonl(run.metrics_path(index)) if "loss" in m and "train_runtime" not in m]
    first, last = (logs[0], logs[-1]) if logs else ({}, {})
    tail = logs[-max(1, len(logs) // 4):]
    ref = load_file(step.data_dir / REF_LOGPS)
    gamma_ref = ref["chosen"] - ref["rejected"]
    step.timings["total"] = step.total()
    done = rec.model_copy(update=dict(
        status="done", sources=[r.summary() for r in step.pairs.reports], rows=len(step.pairs.rows),
        composition=composition(step.pairs), data_fingerprint=step.pairs.fingerprint, reference=rec.reference_label,
        target_init=s.target_init, training=s.training.model_dump(mode="json"),  # the step's effective settings
        first_loss=first.get("loss"), first_reward_margin=first.get("rewards/margins"), last_loss=last.get("loss"),
        reward_accuracy=_mean([m.get("rewards/accuracies") for m in tail]), reward_margin=_mean([m.get("rewards/margins") for m in tail]),
        optimizer_steps=len(logs), gamma_ref_mean=float(gamma_ref.mean()),
        gamma_ref_std=float(gamma_ref.std()) if len(gamma_ref) > 1 else 0.0, retention=rec.retention_detail.retention,
        adapter=run.rel(run.adapter_dir(index)), model=run.rel(run.model_dir(index)),
        # training's tokens (in `tokens`): through the backbone, in TRL's padded two-row layout, completion tokens
        prefix_sharing=s.training.prefix_sharing, timings={k: round(v, 2) for k, v in step.timings.items()},
    ))
    done.unset("phase", "timings_partial", "error")
    return done


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
