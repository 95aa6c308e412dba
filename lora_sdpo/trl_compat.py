"""Every place lora-sdpo reaches below TRL's public API (and the trainer methods of transformers'
it overrides), in one module.

TRL renames its internals between minor releases (1.x rewrote the DPO trainer: padding-free
forced off, `use_logits_to_keep` removed), so these names are where an install with another TRL
breaks first. `TOUCH_POINTS` lists each one, what lora-sdpo does with it and why; `check()` finds
the ones the installed TRL lacks, and runs when this module is imported: a missing name stops the
import with a message naming it, the range below and what to do; a TRL outside the range but with
every name present only warns. tests/test_trl_compat.py lists them against the installed TRL and
shows that removing one is caught.

Where TRL's public API does the job it is used instead: the reference log-probs of a step are
computed by lora-sdpo (step.py's reference phase, through TRL's public `compute_ref_log_probs`) and
reach the loss as the dataset columns `ref_chosen_logps` / `ref_rejected_logps` that TRL's collator
and `_compute_loss` read; the one private piece is the switch that makes the loss read them
(`use_reference_logps`).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass

import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from trl import DPOTrainer

# The TRL releases this module was written against (1.16.0 is the one tested); outside it, see check().
TRL_RANGE = ">=1.16.0,<1.17"
TRL_TESTED = "1.16.0"


@dataclass(frozen=True)
class TouchPoint:
    """One name below TRL's public API: where it is, and what lora-sdpo does with it."""

    module: str  # the module that defines it
    name: str  # attribute path in that module ("Class.method" for a method)
    use: str  # read, override or set, and what for
    needs_source: tuple[str, ...] = ()  # text the definition must still contain (an attribute set in __init__)

    def missing(self) -> str | None:
        """None when the installed TRL (or transformers) has it, else why not."""
        try:
            obj = importlib.import_module(self.module)
            for part in self.name.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            return f"{self.module}.{self.name} is gone"
        if self.needs_source:
            try:
                source = inspect.getsource(obj)
            except (OSError, TypeError):
                return f"{self.module}.{self.name}: its source cannot be read to check it"
            lost = [s for s in self.needs_source if s not in source]
            if lost:
                return f"{self.module}.{self.name} no longer reads {', '.join(lost)}"
        return None


TOUCH_POINTS = (
    TouchPoint("trl.trainer.dpo_trainer", "DPOTrainer._compute_loss",
               "set: `precompute_ref_logps` on the trainer, so that the loss reads the reference log-probs "
               "step.py computed from the batch (use_reference_logps)",
               needs_source=("self.precompute_ref_logps", 'inputs["ref_chosen_logps"]', 'inputs["ref_rejected_logps"]')),
    TouchPoint("trl.trainer.dpo_trainer", "DPOTrainer._set_signature_columns_if_needed",
               "relied on: keeps the ref_chosen_logps / ref_rejected_logps columns through remove_unused_columns",
               needs_source=('"ref_chosen_logps"', '"ref_rejected_logps"')),
    TouchPoint("trl.trainer.dpo_trainer", "DataCollatorForPreference",
               "read: batches pairs exactly as training does (reference pass, gammas); not exported by trl"),
    TouchPoint("trl.trainer.utils", "FusedCausalLMOutput",
               "read: the pair forward returns TRL's fused-head output type; not exported by trl"),
    TouchPoint("trl.kernels.chunked_logprob", "_use_triton",
               "read at call time: the pair forward's LM head takes TRL's Triton branch where TRL's own would"),
    TouchPoint("trl.kernels.chunked_logprob", "TOKEN_CHUNK_SIZE",
               "read: the token chunk of TRL's LM-head kernel, to size its vocabulary tile"),
    TouchPoint("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE",
               "read by bench/pair_forward.py and bench/memory_7b.py: the vocabulary tile of TRL's own fused head, their baseline"),
    TouchPoint("trl.data_utils", "_tokenize",
               "read: tokenises a pair exactly as DPOTrainer does (the gamma samples, the retention sample)"),
    TouchPoint("trl.data_utils", "common_prefix_length",
               "read: where DPOTrainer's completion starts; not exported by trl"),
    TouchPoint("transformers.trainer", "Trainer._get_train_sampler",
               "override: the length-grouped order from (seed, epoch) alone, so a resumed step has the same order"),
    TouchPoint("transformers.trainer", "Trainer._load_from_checkpoint",
               "override: the adapter keeps its dtype when a checkpoint is loaded (resume bit-equal)"),
)


def missing() -> list[str]:
    """The touch-points the installed TRL (or transformers) lacks, one line each."""
    return [p for p in (tp.missing() for tp in TOUCH_POINTS) if p]


def check(version: str | None = None) -> None:
    """Stop (ImportError) when a touch-point is missing; warn when TRL is outside TRL_RANGE."""
    version = version or trl.__version__
    gone = missing()
    advice = (f"lora-sdpo was written for TRL {TRL_RANGE} (tested with {TRL_TESTED}); this environment has TRL "
              f"{version}. Install a TRL in that range (pip install 'trl{TRL_RANGE}', or the project's lock), "
              "or a lora-sdpo release written for your TRL.")
    if gone:
        raise ImportError(f"{advice} These TRL internals it uses are not there: " + "; ".join(gone))
    if Version(version) not in SpecifierSet(TRL_RANGE):
        warnings.warn(f"{advice} Every internal it uses is present, so it may work; the tests have not run with it.",
                      stacklevel=2)


check()

from trl.data_utils import _tokenize, common_prefix_length  # noqa: E402
from trl.kernels import chunked_logprob as _chunked  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402,F401
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402,F401

__all__ = ["DataCollatorForPreference", "FusedCausalLMOutput", "ResumableDPOTrainer", "EpochSeededLengthGroupedSampler",
           "common_prefix_length", "tokenize", "token_chunk_size", "trl_vocab_tile", "use_triton", "use_reference_logps"]


def tokenize(tokenizer, text, **kwargs) -> dict:
    """TRL's tokenisation of a prompt or prompt + completion (chat template for conversations)."""
    return _tokenize(tokenizer, text, **kwargs)


def use_triton(device) -> bool:
    """TRL's own choice of its Triton LM head for `device`, read at call time (tests/test_triton_head.py
    patches it in trl.kernels.chunked_logprob)."""
    return _chunked._use_triton(device)


def token_chunk_size() -> int:
    """The token chunk of TRL's LM-head kernel."""
    return _chunked.TOKEN_CHUNK_SIZE


def trl_vocab_tile() -> int:
    """The vocabulary tile TRL's own fused head (add_fused_lm_head) uses."""
    from trl.trainer import utils

    return utils._CHUNKED_LOGPROB_CHUNK_SIZE


def use_reference_logps(trainer: DPOTrainer, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Hand the step's reference log-probs to TRL: as the `ref_chosen_logps` / `ref_rejected_logps`
    columns of its training dataset (what TRL's own precompute adds, and what its collator batches),
    and the trainer switched to read them instead of running a reference forward per batch.

    The trainer must have been built with `precompute_ref_log_probs=False` (TRL would otherwise
    compute them itself, in its __init__)."""
    ds = trainer.train_dataset
    if len(chosen) != len(ds) or len(rejected) != len(ds):
        raise ValueError(f"{len(chosen)} reference log-probs for {len(ds)} pairs")
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in ds.column_names:
            ds = ds.remove_columns(name)
    ds = ds.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())
    trainer.train_dataset = ds
    trainer.precompute_ref_logps = True  # DPOTrainer._compute_loss reads inputs["ref_*_logps"] when it is set


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
    - transformers' LengthGroupedSampler (training.group_by_length) draws its order from the global
      RNG when the epoch starts, which a resumed run is not in; here the order comes from the seed
      and the epoch alone, as the random sampler's does.
    """

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

