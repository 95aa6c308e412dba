"""The recipe: one pydantic schema is the single place every setting and its default live.

A recipe is a TOML file. Relative paths in it are resolved against the recipe's own folder, so a
recipe and the data beside it travel together. Every validation problem is gathered and reported
at once, each with its key path and what to do (see `RecipeError`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .formats import COLUMNS
from .locations import names_local_path, no_model_folder
from .roles import TRAINED, table_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_default=True)


class AdapterConfig(_Strict):
    """A LoRA/QLoRA preset: what `adapters/NAME.toml` holds, or an inline `[adapter]` table."""

    r: Annotated[int, Field(gt=0)] = Field(16, description="LoRA rank.")
    alpha: Annotated[float, Field(gt=0)] = Field(32, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.05, description="LoRA dropout (TRL disables it by default, see training.disable_dropout).")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get a LoRA adapter.",
    )
    use_rslora: bool = Field(False, description="Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.")
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4: 4-bit NF4 base (QLoRA); none: bf16/fp32 base.")
    double_quant: bool = Field(True, description="Quantise the NF4 scales again (QLoRA double quantisation).")
    compute_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the base's matmuls and of non-quantised weights (float32 is faster on CPUs)."
    )
    lora_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="dtype of the LoRA weights in training. auto: TRL's choice (bfloat16 on a 4-bit base, after the QLoRA "
        "paper) where the device has native bfloat16 matmuls (CUDA, a CPU with AVX512-BF16 or AMX), float32 elsewhere "
        "(an AVX2-only CPU emulates bfloat16 matmuls, slowly).",
    )

    @field_validator("target_modules")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one module, e.g. [\"q_proj\", \"v_proj\"]")
        return v


class ModelConfig(_Strict):
    path: str = Field(..., description="The SFT base S: a local folder of safetensors weights, a .gguf file (dequantised once to float32, cached by its sha256), or a Hub model id.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base.")
    trust_remote_code: bool = Field(False, description="Run model code from the Hub; needs a pinned revision.")
    target_init: Literal["previous", "base"] = Field(
        "previous",
        description="Where step t's target starts: previous = M_{t-1} (the paper); base = S (the paper's ablation).",
    )

    @model_validator(mode="after")
    def _remote_code_needs_pin(self) -> "ModelConfig":
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code = true needs model.revision pinned to a commit")
        return self


class SourceConfig(_Strict):
    path: str | None = Field(None, description="A local .jsonl/.json/.parquet/.csv/.tsv file, the text ones also as .gz/.bz2/.xz, or a folder written by datasets' save_to_disk (relative to the recipe).")
    dataset: str | None = Field(None, description="A Hub dataset id (instead of path).")
    split: str = Field("train", description="Split of a Hub dataset or of a saved DatasetDict folder.")
    revision: str | None = Field(None, description="Revision of a Hub dataset.")
    offset: Annotated[int, Field(ge=0)] = Field(0, description="Skip the first N valid rows (e.g. those held out for eval).")
    limit: Annotated[int, Field(gt=0)] | None = Field(None, description="Use at most N valid rows (after the offset).")
    columns: dict[str, str] | None = Field(
        None, description="The rows' own key names, e.g. {prompt = \"context\", chosen = \"answer_w\", rejected = \"answer_l\"}; "
        "mappable: " + ", ".join(COLUMNS) + " (role, content: the keys inside each message).")
    ignore: list[str] | None = Field(
        None, description="Keys of the rows that are not part of a pair (ids, sources, the judge's notes); any other key that is "
        "not read and looks like content (messages, free text) stops the run (docs/data-formats.md).")
    templated: Literal["refuse", "verbatim"] = Field(
        "refuse", description="Prompts already in a chat template (ChatML, Llama [INST], NeMo <extra_id_1>, Alpaca ### Instruction:, "
        "phi-3, the model's own markers): refuse them as bad rows, or train on prompt and answers verbatim, without a second template.")
    roles: dict[str, str] | None = Field(
        None, description="Role names added to the default table (" + table_text() + "), e.g. {narrator = \"system\"}.")
    pairs_from: Literal["scores", "ranking", "judgment"] | None = Field(
        None, description="Build pairs from rows without one (docs/data-formats.md): scores (highest vs lower scored answer), "
        "ranking (ranked answers), judgment (two answers and a verdict); ties are dropped and counted.")
    score_key: str | None = Field(
        None, description="pairs_from: the key of each answer's score (default overall_score for UltraFeedback, else score) or rank "
        "(default rank; lower is better).")
    pick_rejected: Literal["lowest", "random"] | None = Field(
        None, description="pairs_from = \"scores\": rejected = the lowest-scored answer, or a random lower one (seeded by "
        "run.seed and the row); default random for UltraFeedback completions (as UltraFeedback binarized), else lowest.")
    ranking_pairs: Literal["best_worst", "adjacent"] = Field(
        "best_worst", description="pairs_from = \"ranking\": one pair (best vs worst) or every adjacent pair of the ranking.")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceConfig":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of `path` (a local file) or `dataset` (a Hub id)")
        unknown = sorted(set(self.columns or {}) - set(COLUMNS))
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} cannot be mapped; the names are {', '.join(COLUMNS)} "
                             "(write them as NAME = \"the rows' key\")")
        bad_roles = sorted(k for k, v in (self.roles or {}).items() if v not in TRAINED)
        if bad_roles:
            raise ValueError(f"roles: {', '.join(bad_roles)} must map to one of {', '.join(TRAINED)}")
        for key, rule in (("pick_rejected", "scores"), ("score_key", ("scores", "ranking"))):
            if getattr(self, key) is not None and self.pairs_from not in ((rule,) if isinstance(rule, str) else rule):
                raise ValueError(f"{key} applies only with pairs_from = {' or '.join(repr(r) for r in ((rule,) if isinstance(rule, str) else rule))}")
        return self

    @property
    def label(self) -> str:
        return self.path if self.path is not None else f"{self.dataset}[{self.split}]"


class StepConfig(_Strict):
    sources: list[SourceConfig] = Field(..., description="The preference data of this step (natural split).")
    training: "TrainingOverride" = Field(
        default_factory=lambda: TrainingOverride(),
        description="[steps.training]: [training] keys that differ for this step only (e.g. learning_rate, beta, "
        "num_train_epochs, warmup_ratio, loss_type); the run-wide keys cannot be overridden.",
    )

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        if not v:
            raise ValueError("a step needs at least one source")
        return v


class DataConfig(_Strict):
    split: Literal["natural", "stratified", "curriculum"] = Field(
        "natural",
        description="How D_1..D_T are formed: natural = each step's sources; stratified = the union re-cut by "
        "`fractions` per source (seeded); curriculum = the union ranked by S's gamma, easiest first.",
    )
    fractions: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Share of the union per step for stratified/curriculum (default: the natural steps' sizes)."
    )
    eval: list[SourceConfig] = Field([], description="Held-out preference data, never trained on.")
    allow_eval_overlap: bool = Field(
        False,
        description="Accept held-out pairs or prompts that also occur in a step (refused by default); every report then "
        "marks the eval column as contaminated.",
    )
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.01, description="Refuse a source when more than this fraction of its rows is bad; below it, drop and report them."
    )


# TRL 1.16's DPOTrainer._compute_loss: the loss types it implements, and those its f-divergence
# generalisation and label smoothing apply to.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
SMOOTHED_LOSSES = ("exo_pair", "robust", "aot", "aot_unpaired")


class TrainingConfig(_Strict):
    beta: Annotated[float, Field(gt=0)] = Field(0.1, description="DPO beta (strength of the pull to the reference).")
    learning_rate: Annotated[float, Field(gt=0)] = Field(5e-6, description="Peak learning rate.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = Field(0.1, description="Fraction of steps spent warming up.")
    num_train_epochs: Annotated[float, Field(gt=0)] = Field(1.0, description="Epochs over each step's data.")
    per_device_train_batch_size: Annotated[int, Field(gt=0)] = Field(8, description="Pairs per forward pass.")
    gradient_accumulation_steps: Annotated[int, Field(gt=0)] = Field(2, description="Forward passes per optimizer step.")
    max_length: Annotated[int, Field(gt=1)] = Field(1024, description="Tokens of prompt + completion kept (from the start).")
    optim: str = Field("paged_adamw_32bit", description="transformers optimizer name.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: Annotated[float, Field(gt=0)] = Field(1.0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward (use_reentrant=False).")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="Autocast of training (fp16 is not offered with 4-bit).")

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, v: Any) -> Any:
        if v in ("fp16", "float16"):
            raise ValueError(
                "fp16 is not offered: with a 4-bit base its loss overflows to NaN; use \"bf16\" (GPUs since Ampere) or \"fp32\""
            )
        return v
    precompute_ref_batch_size: Annotated[int, Field(gt=0)] | None = Field(None, description="Batch of the reference pass.")
    disable_dropout: bool = Field(True, description="Turn dropout off in policy and reference (TRL's default).")
    prefix_sharing: bool = Field(
        True,
        description="lora-sdpo's pair forward: each pair as one sequence [prompt | chosen | rejected] (the prompt "
        "once, rejected blind to chosen), pairs packed without padding, the LM head on completion tokens only; exact "
        "to float rounding. false: TRL's own two-row forward, batch for batch.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch pairs of similar length together (transformers' LengthGroupedSampler): a third less "
        "padding at max_length 1024 on the shipped data (BENCHMARKS.md); the order comes from the seed and the epoch, "
        "so a resumed step sees the same batches.",
    )
    loss_type: str | list[str] = Field(
        "sigmoid",
        description="TRL's preference loss: one of " + ", ".join(LOSS_TYPES) + "; or a list of them, summed with "
        "loss_weights (e.g. MPO: [\"sigmoid\", \"bco_pair\", \"sft\"]).",
    )
    loss_weights: list[float] | None = Field(None, description="Weight of each loss_type in the list (default 1 each).")
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.0, description="Label noise epsilon of robust, exo_pair (needs > 0; the EXO paper: 1e-3), aot and aot_unpaired."
    )
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO regulariser; other than reverse_kl only with " + ", ".join(F_DIVERGENCE_LOSSES) + "."
    )
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of f_divergence_type = \"alpha_divergence\".")
    use_weighting: bool = Field(False, description="WPO: weight each pair by the policy's length-normalised sequence probabilities.")
    ld_alpha: float | None = Field(
        None,
        description="LD-DPO's weight of the verbose tail: not offered yet (TRL then caches length-weighted reference "
        "log-probs, which gamma_ref, retention and the gamma matrix would read as plain ones).",
    )

    @field_validator("loss_type")
    @classmethod
    def _known_losses(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names:
            raise ValueError("name at least one loss, e.g. \"sigmoid\"")
        for n in names:
            if n not in LOSS_TYPES:
                close = difflib.get_close_matches(n, LOSS_TYPES, n=1)
                raise ValueError(
                    f"unknown loss {n!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                    + f" TRL 1.16 offers: {', '.join(LOSS_TYPES)}"
                )
        return v

    @field_validator("ld_alpha")
    @classmethod
    def _no_ld_alpha(cls, v: float | None) -> float | None:
        if v is not None:
            raise ValueError(
                "not offered yet: with it TRL caches length-desensitised reference log-probs, which lora-sdpo's "
                "gamma_ref, retention check and gamma matrix would read as plain log-probs; remove it"
            )
        return v

    @model_validator(mode="after")
    def _loss_options_fit(self) -> "TrainingConfig":
        losses = self.losses
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(losses)} loss_type(s); give one per loss")
        if self.f_divergence_type != "reverse_kl" and not set(losses) <= set(F_DIVERGENCE_LOSSES):
            raise ValueError(
                f"f_divergence_type = {self.f_divergence_type!r} works only with {', '.join(F_DIVERGENCE_LOSSES)} "
                f"(not {', '.join(sorted(set(losses) - set(F_DIVERGENCE_LOSSES)))}); use \"reverse_kl\" with them"
            )
        if "exo_pair" in losses and self.label_smoothing == 0:
            raise ValueError("loss exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
        if self.label_smoothing and not set(losses) & set(SMOOTHED_LOSSES):
            raise ValueError(
                f"label_smoothing = {self.label_smoothing:g} has no effect on {', '.join(losses)} in TRL 1.16; it is "
                f"used by {', '.join(SMOOTHED_LOSSES)}: remove it or choose one of them"
            )
        if self.use_weighting and set(losses) & {"aot", "aot_unpaired"}:
            raise ValueError("use_weighting (WPO) does not work with aot/aot_unpaired (they sort pairs, so the weights would not match)")
        return self

    @property
    def losses(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def loss_label(self) -> str:
        """The loss as `plan` and the report show it, e.g. `sigmoid` or `0.8 sigmoid + 0.2 bco_pair`."""
        weights = self.loss_weights or [1.0] * len(self.losses)
        text = " + ".join(n if w == 1 else f"{w:g} {n}" for n, w in zip(self.losses, weights))
        extra = [f"label_smoothing={self.label_smoothing:g}"] if self.label_smoothing else []
        if self.f_divergence_type != "reverse_kl":
            extra.append(f"f_divergence={self.f_divergence_type}" + (
                f"({self.f_alpha_divergence_coef:g})" if self.f_divergence_type == "alpha_divergence" else ""))
        if self.use_weighting:
            extra.append("WPO weighting")
        return text + (f" ({', '.join(extra)})" if extra else "")


# Settings every step shares: the gamma matrix and the retention check compare models on the same
# tokens (max_length), and the global batch, precision, optimizer and checkpointing decide the
# distributed batch split and the planner's memory estimate of the run.
RUN_WIDE_TRAINING = ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps", "optim",
                     "precision", "gradient_checkpointing", "prefix_sharing")


def _override_model() -> type[BaseModel]:
    """[steps.training]: every per-step key of TrainingConfig, optional, with its constraints; no new definitions."""
    from pydantic import create_model

    fields = {}
    for name, f in TrainingConfig.model_fields.items():
        if name in RUN_WIDE_TRAINING:
            continue
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[name] = (ann | None, Field(None, description=f.description))
    return create_model("TrainingOverride", __base__=_Strict, **fields)


TrainingOverride = _override_model()
StepConfig.model_rebuild()


class RetentionConfig(_Strict):
    sample_size: Annotated[int, Field(gt=0)] = Field(64, description="Pairs of D_t (its first N) used to measure retention.")
    warn_below: float = Field(0.8, description="Warn when less than this share of the adapter's gamma gain survives.")


class DiagnosticsConfig(_Strict):
    gamma_matrix: bool = Field(True, description="Measure mean gamma of S, M_1..M_T on every D_t and the eval data (paper Fig. 2).")
    gamma_sample: Annotated[int, Field(gt=0)] = Field(
        64,
        description="Pairs per dataset for the gamma matrix (the first N of each); 64 puts the standard error of the "
        "paired M_{t-1} - S comparison near 2.5 nats on the quickstart's data (its standard deviation: 19.7).",
    )
    samples: Annotated[int, Field(ge=0)] = Field(
        2, description="Greedy completions of S and every M_t for the first N held-out prompts (data.eval), side by side "
        "in report.md, full texts in samples.json (0: off).")
    sample_tokens: Annotated[int, Field(gt=0)] = Field(64, description="New tokens of each sample at most.")


class DistributedConfig(_Strict):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With --num-processes N: ddp = every process holds the NF4 model; fsdp = FSDP2 (QLoRA "
        "with FSDP): the NF4 weights, stored in a float dtype, are sharded across the processes (GPUs or CPU processes).",
    )
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep the sharded parameters in CPU memory between uses (GPUs only).")
    timeout_minutes: Annotated[float, Field(gt=0)] = Field(
        60, description="A process that waits longer than this for the others (a dead peer, the main process's merge) fails the run."
    )


TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


class RunConfig(_Strict):
    name: str = Field("sdpo", description="Name of the run (used for the default output folder runs/NAME).")
    seed: int = Field(42, description="Seed of LoRA initialisation and data order.")
    output_dir: str | None = Field(None, description="Run directory (default runs/NAME under the current folder).")
    keep_models: Literal["all", "last"] = Field("all", description="Keep every M_t on disk, or only the last.")
    checkpoint_every: Annotated[int, Field(ge=0)] = Field(
        50, description="Save a trainer checkpoint every N optimizer steps, to resume a killed step from (0: never)."
    )
    report_to: list[str] = Field(
        [],
        description="Experiment trackers, each step a tracked run grouped under the run: tensorboard (RUN/step-N/"
        "tensorboard), mlflow (MLFLOW_TRACKING_URI, default sqlite RUN/mlflow.db), wandb (offline under RUN/wandb "
        "unless logged in, or WANDB_MODE), trackio (local, RUN/trackio). Each is an extra: pip install 'lora-sdpo[NAME]'.",
    )

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1)
                raise ValueError(f"unknown tracker {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                 + f" Offered: {', '.join(TRACKERS)}")
        if len(set(v)) != len(v):
            raise ValueError("a tracker is named twice")
        return v


class Recipe(_Strict):
    run: RunConfig = Field(default_factory=RunConfig, description="The run as a whole.")
    model: ModelConfig = Field(..., description="The SFT base model S.")
    adapter: str | AdapterConfig = Field(
        "qlora-r16", description="A preset name from adapters/ or an inline table of AdapterConfig keys."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="DPO settings for every step.")
    data: DataConfig = Field(default_factory=DataConfig, description="How steps get their data.")
    steps: list[StepConfig] = Field(..., description="The steps D_1..D_T, in order.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="The merge retention check.")
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig, description="Reference diagnostics.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Runs with --num-processes N.")

    @field_validator("steps")
    @classmethod
    def _has_steps(cls, v: list[StepConfig]) -> list[StepConfig]:
        if not v:
            raise ValueError("add at least one [[steps]] table")
        return v

    def step_training(self, index: int) -> TrainingConfig:
        override = self.steps[index - 1].training.model_dump(exclude_none=True)
        if not override:
            return self.training
        return TrainingConfig.model_validate({**self.training.model_dump(), **override})

    def step_overrides(self, index: int) -> dict:
        """The settings step `index` runs with that differ from [training]."""
        run, step = self.training.model_dump(), self.step_training(index).model_dump()
        return {k: v for k, v in step.items() if v != run[k]}

    @model_validator(mode="after")
    def _step_settings_valid(self) -> "Recipe":
        # Each key of [steps.training] was checked on its own; what is left is how it combines with
        # [training] (e.g. a step's loss_type with the run's label_smoothing).
        problems = []
        for i in range(1, len(self.steps) + 1):
            try:
                self.step_training(i)
            except ValidationError as e:
                problems += [f"steps.{i - 1}.training {x['msg'].removeprefix('Value error, ')} (with [training]'s values)" for x in e.errors()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _fractions_fit_steps(self) -> "Recipe":
        f = self.data.fractions
        if f is not None:
            if self.data.split == "natural":
                raise ValueError("data.fractions applies to split = stratified or curriculum; remove it for natural")
            if len(f) != len(self.steps):
                raise ValueError(f"data.fractions has {len(f)} entries for {len(self.steps)} steps; give one per step")
            if abs(sum(f) - 1) > 1e-6:
                raise ValueError(f"data.fractions sum to {sum(f):g}; they must sum to 1")
        return self


class StepSettings(_Strict):
    """What one step uses of the recipe: its [training] (with its [steps.training]) and the settings
    around it. step.py and trainer.py read this, not the whole recipe."""

    index: int = Field(description="t, from 1.")
    run_name: str = Field(description="The step's name for trackers: RUN/step-t.")
    seed: int = Field(description="run.seed.")
    checkpoint_every: int = Field(description="run.checkpoint_every.")
    target_init: Literal["previous", "base"] = Field(description="model.target_init.")
    adapter: AdapterConfig = Field(description="The LoRA/QLoRA preset.")
    training: TrainingConfig = Field(description="[training] with the step's [steps.training] applied.")
    retention: RetentionConfig = Field(description="[retention].")
    diagnostics: DiagnosticsConfig = Field(description="[diagnostics].")
    distributed: DistributedConfig = Field(description="[distributed].")


class LoadedRecipe(BaseModel):
    """A validated recipe with its paths resolved and its preset loaded."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    path: Path
    text: str
    recipe: Recipe
    adapter: AdapterConfig
    adapter_source: str

    @property
    def effective(self) -> dict:
        """Every setting as run: the recipe after --set overrides and defaults, and the adapter it names."""
        return {
            "recipe": self.recipe.model_dump(mode="json"),
            "adapter": self.adapter.model_dump(mode="json"),
            # each step's training settings after its [steps.training] overrides: resume compares them
            "step_training": [self.recipe.step_training(i).model_dump(mode="json") for i in range(1, len(self.recipe.steps) + 1)],
        }

    @property
    def sha256(self) -> str:
        """Identity of the settings (not of the file's comments or layout): resume needs the same one."""
        return hashlib.sha256(json.dumps(self.effective, sort_keys=True).encode()).hexdigest()

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.path.parent / q).resolve()

    def model_location(self) -> str:
        """A local folder when the model path names one (relative to the recipe), else the Hub id."""
        local = self.resolve(self.recipe.model.path)
        return str(local) if local.exists() or names_local_path(self.recipe.model.path) else self.recipe.model.path

    def step_settings(self, index: int) -> StepSettings:
        """The settings step `index` (1-based) runs with."""
        r = self.recipe
        return StepSettings(index=index, run_name=f"{r.run.name}/step-{index}", seed=r.run.seed,
                            checkpoint_every=r.run.checkpoint_every, target_init=r.model.target_init, adapter=self.adapter,
                            training=r.step_training(index), retention=r.retention, diagnostics=r.diagnostics,
                            distributed=r.distributed)

    def output_dir(self, override: str | None = None) -> Path:
        if override:
            return Path(override).resolve()
        if self.recipe.run.output_dir:
            return self.resolve(self.recipe.run.output_dir)
        return (Path.cwd() / "runs" / self.recipe.run.name).resolve()


_UNION_MEMBERS = {"str", "AdapterConfig"}
_HINTS = {
    "extra_forbidden": "remove it or fix its spelling",
    "missing": "add it",
}


def format_errors(where: str, err: ValidationError) -> str:
    # A union (adapter = "name" | {table}) reports one error per member; keep the member that
    # matches what the user wrote and drop pydantic's member names from the key path.
    errors, seen = [], set()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in _UNION_MEMBERS)
        if e["loc"][-1:] == ("str",) and isinstance(e.get("input"), dict):
            continue
        if (loc, e["msg"]) not in seen:
            seen.add((loc, e["msg"]))
            errors.append((loc, e))
    lines = [f"{where}: {len(errors)} problem(s):"]
    for loc, e in errors:
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        hint = _HINTS.get(e["type"], "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if len(loc) == 4 and loc[0] == "steps" and loc[2] == "training" and loc[3] in RUN_WIDE_TRAINING:
                msg, hint = "run-wide: every step uses [training]'s value (set it there)", ""
        if not loc and msg.startswith("steps."):  # a step's overrides combined with [training]: the message names its key
            key, msg = msg.split(" ", 1)
        lines.append(f"  - {key}: {msg}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def parse_value(text: str) -> Any:
    """A --set value read as a TOML value (numbers, booleans, arrays, quoted strings); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides: list[str], preset=None) -> dict:
    """Apply `key.path=value` overrides; list items are addressed by index (steps.0.sources.0.limit=8).

    `adapter.KEY=VALUE` on a recipe whose `adapter` names a preset (or that has none: the default
    preset) overrides that one field of the preset: `preset(name)` returns the preset's table, which
    replaces the name before the key is set.
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.beta=0.1")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an index of the list")
                node = node[int(part)]
            else:
                if i == 0 and part == "adapter" and preset is not None:
                    named = node.get(part, Recipe.model_fields["adapter"].default)  # no adapter key: the default preset
                    if isinstance(named, str):
                        node[part] = preset(named)
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a table")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {key}: {last} is not an index of the list")
            node[int(last)] = parse_value(value)
        else:
            node[last] = parse_value(value)
    return data


def adapter_preset_dirs(recipe_path: Path) -> list[Path]:
    return [recipe_path.parent / "adapters", recipe_path.parent.parent / "adapters", PROJECT_ROOT / "adapters"]


def _load_toml(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None


def load_adapter_preset(name: str, recipe_path: Path) -> tuple[AdapterConfig, Path]:
    dirs = adapter_preset_dirs(recipe_path)
    for d in dirs:
        f = d / f"{name}.toml"
        if f.is_file():
            _, data = _load_toml(f)
            try:
                return AdapterConfig.model_validate(data), f
            except ValidationError as e:
                raise RecipeError(format_errors(str(f), e)) from None
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise RecipeError(
        f"{recipe_path}: adapter: no preset named {name!r} (looked in {', '.join(str(d) for d in dirs)}); "
        f"known presets: {', '.join(known) or 'none'}. Name one of them or write an inline [adapter] table."
    )


def load_recipe(path: str | Path, overrides: list[str] = ()) -> LoadedRecipe:
    """Read, override, validate. Raises RecipeError with every problem at once."""
    path = Path(path).resolve()
    text, data = _load_toml(path)
    presets: list[str] = []  # presets that --set adapter.KEY=VALUE turned into tables

    def preset(name: str) -> dict:
        adapter, preset_path = load_adapter_preset(name, path)
        presets.append(f"preset {name} ({preset_path})")
        return adapter.model_dump(mode="json")

    if overrides:
        data = apply_overrides(data, list(overrides), preset)
    secrets = [key for key, v in _strings(data) if TOKEN_RE.search(v)]
    if secrets:
        raise RecipeError(
            f"{path}: {', '.join(secrets)} holds what looks like a Hugging Face access token. lora-sdpo never takes "
            "tokens from recipes or arguments (they would end up in the run directory and in logs): remove it, and "
            "set HF_TOKEN in the environment or run `hf auth login` instead"
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_errors(str(path), e)) from None
    if isinstance(recipe.adapter, str):
        adapter, preset_path = load_adapter_preset(recipe.adapter, path)
        source = f"preset {recipe.adapter} ({preset_path})"
    elif presets:
        changed = [o.split("=", 1)[0].strip() for o in overrides if o.split("=", 1)[0].strip().startswith("adapter.")]
        adapter, source = recipe.adapter, f"{presets[-1]} with --set {', '.join(changed)}"
    else:
        adapter, source = recipe.adapter, "inline [adapter]"
    loaded = LoadedRecipe(path=path, text=text, recipe=recipe, adapter=adapter, adapter_source=source)
    problems = []
    model_problem = no_model_folder(loaded.model_location())
    if model_problem:
        problems.append(f"model.path: {model_problem} (paths are relative to the recipe)")
    if adapter.quantization == "nf4" and recipe.training.precision not in ("bf16", "fp32"):
        problems.append("training.precision: 4-bit training needs bf16 or fp32")
    for i, step in enumerate(recipe.steps):
        for j, src in enumerate(step.sources):
            if src.path is not None and not loaded.resolve(src.path).exists():
                problems.append(
                    f"steps.{i}.sources.{j}.path: no file {loaded.resolve(src.path)} (paths are relative to the recipe)"
                )
    for j, src in enumerate(recipe.data.eval):
        if src.path is not None and not loaded.resolve(src.path).exists():
            problems.append(f"data.eval.{j}.path: no file {loaded.resolve(src.path)}")
    if problems:
        raise RecipeError(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
    if overrides:
        loaded.text = _with_overrides_comment(text, overrides)
    return loaded


TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{30,}")


def _strings(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, value) of every string in a parsed recipe."""
    if isinstance(data, str):
        return [(prefix, data)]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    return [kv for k, v in items for kv in _strings(v, f"{prefix}.{k}" if prefix else str(k))]


def _with_overrides_comment(text: str, overrides: list[str]) -> str:
    # The run directory keeps the recipe as run: the original text plus the overrides, which
    # `lora-sdpo run recipe.toml --set ...` reproduces exactly.
    return text.rstrip() + "\n\n# Overrides applied with --set:\n" + "".join(f"#   {o}\n" for o in overrides)


def schema_reference() -> str:
    """The recipe reference as markdown, generated from the schema (docs/recipes.md embeds it; tests/test_docs.py compares)."""
    sections = [
        ("[run]", RunConfig),
        ("[model]", ModelConfig),
        ("adapter = \"NAME\" or [adapter]", AdapterConfig),
        ("[training]", TrainingConfig),
        ("[data]", DataConfig),
        ("[[steps]] / [[steps.sources]] / [[data.eval]]", SourceConfig),
        ("[retention]", RetentionConfig),
        ("[diagnostics]", DiagnosticsConfig),
        ("[distributed]", DistributedConfig),
    ]
    out = []
    for title, cls in sections:
        out.append(f"**{title}**\n\n| key | default | meaning |\n|---|---|---|")
        for name, f in cls.model_fields.items():
            if cls is Recipe:
                continue
            default = "required" if f.is_required() else _fmt_default(f.default if f.default_factory is None else None)
            out.append(f"| `{name}` | {default} | {f.description or ''} |")
        if cls is TrainingConfig:
            out.append(
                "\nA `[steps.training]` table inside a `[[steps]]` entry overrides these keys for that step only "
                "(`plan`, the manifest and the report show each step's settings), except the run-wide ones: "
                + ", ".join(f"`{k}`" for k in RUN_WIDE_TRAINING) + "."
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _fmt_default(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, list):
        return "`[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in v) + "]`"
    return f"`{v}`"


if __name__ == "__main__":
    print(schema_reference(), end="")
