"""manifest.json, the run's state and the truth for resume, as typed records.

`Manifest` and its parts (`StepRecord`, `Retention`, `GammaMatrix`, `Overlap`, `EvalRecord`) name
every key lora-sdpo writes, with its type and one line of help; docs/manifest.md embeds the
reference generated from them (`python -m lora_sdpo.manifest`), and tests/test_docs.py checks that
it is current. Every module reads and writes the run state through them:

    m = manifest.read(run)          # Manifest | None; refuses an unknown format or a wrong type
    m.steps[0].first_loss           # attributes, typed
    manifest.write(run, m)          # atomic (temporary file, fsync, rename); sets `updated`

A record keeps only the keys that were set (read from the file or assigned), so a file written
back holds what it held plus what changed; keys not declared here (written by a newer step of the
pipeline) are kept as they are, not refused. `decide` is the resume decision for one step: skip,
redo, start it, or resume it from the phase its record names (step.py's phase table runs it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RunError
from .rundir import RunDir, atomic_write_json, verify_files

FORMAT = 1  # the manifest format this version writes and reads; `format` in every manifest


class _Record(BaseModel):
    # validate_assignment: `record.retention_detail = {...}` becomes a Retention, typed as if read
    model_config = ConfigDict(extra="allow", validate_assignment=True, ser_json_inf_nan="constants")

    def dump(self) -> dict:
        """The keys that were set (read or assigned), as JSON types: what manifest.json holds."""
        return self.model_dump(mode="json", exclude_unset=True)

    def unset(self, *names: str) -> None:
        """Drop keys from the record (back to their defaults, left out of the file), as `dict.pop` did."""
        for name in names:
            setattr(self, name, type(self).model_fields[name].get_default(call_default_factory=True))
            self.__pydantic_fields_set__.discard(name)


class Retention(_Record):
    """How much of A_t's gamma gain on a fixed sample of D_t survives the merge and NF4(M_t)."""

    retention: float | None = Field(None, description="kept / gain; None when the gain is 0.")
    reliable: bool = Field(False, description="Whether the gain is above 3 standard errors of the merged model's deviation.")
    gain: float | None = Field(None, description="Mean gamma of start + A_t minus that of the start.")
    kept: float | None = Field(None, description="Mean gamma of NF4(M_t) minus that of the start.")
    noise: float | None = Field(None, description="Standard error of NF4(M_t)'s gamma minus the adapter model's.")
    sample: int | None = Field(None, description="Pairs in the sample (the first retention.sample_size of D_t).")
    gamma_start: float | None = Field(None, description="Mean gamma of the step's starting model on the sample.")
    gamma_adapter: float | None = Field(None, description="Mean gamma of the start with A_t.")
    gamma_merged: float | None = Field(None, description="Mean gamma of NF4(M_t).")


class StepRecord(_Record):
    """One entry of `steps`: step t of the chain, D_t -> M_t."""

    index: int = Field(description="t, from 1.")
    status: Literal["pending", "running", "done", "failed"] = Field(description="Where the step stands; resume redoes what is not done.")
    phase: str | None = Field(None, description="While running: the phase to run next (reference, train, merge, retention, diagnostics); a resume runs it and the ones after it.")
    error: str | None = Field(None, description="Why a failed step stopped.")
    resumed: list[str] | None = Field(default_factory=list, description="What a resume picked up, e.g. `train from checkpoint-2`.")
    data_fingerprint: str | None = Field(None, description="sha256 of D_t's normalised pairs; a resume refuses other data.")
    rows: int | None = Field(None, description="Pairs in D_t.")
    sources: list[str] | None = Field(default_factory=list, description="Per source file: pairs used of rows read.")
    composition: dict[str, int] | None = Field(default_factory=dict, description="Pairs per source in D_t.")
    reference: str | None = Field(None, description="The reference model: S or M_{t-1}.")
    target_init: str | None = Field(None, description="Where the trained adapter's base came from (`previous` or `base`).")
    training: dict[str, Any] | None = Field(default_factory=dict, description="The [training] settings this step ran with (after per-step overrides).")
    prefix_sharing: bool | None = Field(None, description="Whether the pair forward computed the log-probs (else TRL's two-row forward).")
    first_loss: float | None = Field(None, description="Loss of the first optimizer update (ln 2 for the sigmoid loss when the reference is the start).")
    first_reward_margin: float | None = Field(None, description="TRL's reward margin at the first update.")
    last_loss: float | None = Field(None, description="Loss of the last update.")
    reward_accuracy: float | None = Field(None, description="TRL's reward accuracy over the last quarter of the updates.")
    reward_margin: float | None = Field(None, description="TRL's reward margin over the last quarter of the updates.")
    optimizer_steps: int | None = Field(None, description="Optimizer updates of the step.")
    gamma_ref_mean: float | None = Field(None, description="Mean gamma of the reference over D_t (from the reference pass).")
    gamma_ref_std: float | None = Field(None, description="Its standard deviation over the pairs.")
    retention: float | None = Field(None, description="Share of the adapter's gamma gain kept by NF4(M_t); None when the gain is 0.")
    retention_detail: Retention | None = Field(None, description="The retention check: gain, kept part, noise, sample (a `Retention` below).")
    tokens: dict[str, Any] | None = Field(default_factory=dict, description="Tokens through the backbone and the LM head, against TRL's two-row layout.")
    processes: dict[str, Any] | None = Field(default_factory=dict, description="How the global batch was split over processes.")
    timings: dict[str, float] | None = Field(default_factory=dict, description="Seconds per phase (load, reference, train, merge, retention, diagnostics, samples, total).")
    timings_partial: dict[str, float] | None = Field(default_factory=dict, description="While running: seconds of the phases done so far, carried over by a resume.")
    adapter: str | None = Field(None, description="A_t's folder, relative to the run directory.")
    model: str | None = Field(None, description="M_t's folder, relative to the run directory; None once pruned (run.keep_models).")
    reference_files: dict[str, str] | None = Field(default_factory=dict, description="sha256 of data/pairs.jsonl and data/ref_logps.safetensors (the reference phase); a resume verifies them.")
    adapter_files: dict[str, str] | None = Field(default_factory=dict, description="sha256 of every file of A_t; a resume verifies them.")
    model_files: dict[str, str] | None = Field(default_factory=dict, description="sha256 of every file of M_t; a resume verifies them.")

    @property
    def reference_label(self) -> str:
        """The reference of step t: S for the first step, M_{t-1} after (the paper's chain)."""
        return "S" if self.index == 1 else f"M_{self.index - 1}"


class GammaStats(_Record):
    """One cell of the gamma matrix: a model's gamma = log p(chosen) - log p(rejected) on one dataset's sample."""

    n: int = Field(description="Pairs in the sample.")
    mean: float | None = Field(None, description="Mean gamma.")
    median: float | None = Field(None, description="Median gamma.")
    std: float | None = Field(None, description="Standard deviation over the pairs.")
    se: float | None = Field(None, description="Standard error of the mean.")
    frac_positive: float | None = Field(None, description="Share of pairs with gamma > 0.")


class PairedDifference(_Record):
    """The paper's comparison for step t: gamma of its reference M_{t-1} minus gamma of S, pair by pair on D_t."""

    step: int = Field(description="t.")
    reference: str = Field(description="S or M_{t-1}.")
    data: str = Field(description="D_t.")
    n: int | None = Field(None, description="Pairs compared (absent for t = 1, where the reference is S).")
    mean: float | None = Field(None, description="Mean difference.")
    se: float | None = Field(None, description="Its standard error.")
    frac_positive: float | None = Field(None, description="Share of pairs where the reference's gamma is higher.")


class GammaMatrix(_Record):
    """Mean gamma of S and each M_t on each D_t's sample and the held-out data."""

    sample: dict[str, int] = Field(default_factory=dict, description="Pairs in each dataset's sample (D_1.., eval).")
    per_pair: str | None = Field(None, description="Where the per-pair gammas are: one safetensors file per row, relative to the run.")
    rows: dict[str, dict[str, GammaStats]] = Field(default_factory=dict, description="Model (S, M_1, ..) -> dataset -> statistics.")
    paired: list[PairedDifference] = Field(default_factory=list, description="Per step: its reference against S on D_t, paired.")

    def add_rows(self, rows: dict[str, dict[str, dict]]) -> None:
        """Add (or replace) model rows, typed as read back: gamma_row's statistics per dataset."""
        self.rows = {**self.rows, **rows}


class OverlapPair(_Record):
    """Pairs and prompts two datasets share."""

    a: str = Field(description="The first dataset (D_t).")
    b: str = Field(description="The second (D_u or eval).")
    exact: int = Field(description="Pairs in both (same prompt, chosen and rejected).")
    prompt: int = Field(description="Prompts in both.")
    exact_rows: list[list[Any]] = Field(default_factory=list, description="The first shared pairs, as source rows.")
    prompt_rows: list[list[Any]] = Field(default_factory=list, description="The first shared prompts, as source rows.")


class Overlap(_Record):
    """The overlap audit of the run's data."""

    eval_contaminated: bool = Field(False, description="Whether a step's data shares pairs or prompts with the held-out set.")
    eval_overlap_allowed: bool = Field(False, description="data.allow_eval_overlap as the recipe set it.")
    overlaps: list[OverlapPair] = Field(default_factory=list, description="Every pair of datasets that share something.")


class EvalRecord(_Record):
    """lm-evaluation-harness scores (`lora-sdpo eval`), kept per model."""

    models: dict[str, dict[str, Any]] = Field(default_factory=dict, description="S, M_1, ..: model, fingerprint, precision, lm_eval version, seconds, scores, seeds, h4.")


class Manifest(_Record):
    """manifest.json of a run directory."""

    format: int = Field(FORMAT, description="The manifest format; a version of lora-sdpo refuses formats newer than its own.")
    status: Literal["running", "done", "failed"] = Field(description="The run's state: done once every step is.")
    created: str | None = Field(None, description="When the run started (ISO 8601).")
    updated: str | None = Field(None, description="When the manifest was last written.")
    recipe: str = Field("recipe.toml", description="The recipe as run, relative to the run directory.")
    recipe_sha256: str = Field(description="sha256 of the effective settings; a resume refuses another recipe.")
    settings: dict[str, Any] | None = Field(default_factory=dict, description="The effective settings (the recipe with defaults and overrides).")
    versions: dict[str, str] | None = Field(default_factory=dict, description="Versions of torch, transformers, peft, trl, bitsandbytes and lora-sdpo.")
    base_model: str | None = Field(None, description="S as the recipe names it (a folder, a GGUF file or a Hub id).")
    base_gguf_sha256: str | None = Field(None, description="When S is a GGUF file: its sha256 (S is its float32 dequantisation).")
    adapter: dict[str, Any] | None = Field(default_factory=dict, description="The LoRA/QLoRA settings of every step.")
    split: str | None = Field(None, description="How the data was split into steps (natural, stratified, curriculum).")
    dropped_overlong: list[str] | None = Field(default_factory=list, description="Pairs dropped because their prompt fills max_length (`source row N`).")
    overlap: Overlap | None = Field(None, description="The overlap audit (an `Overlap` below).")
    gamma_matrix: GammaMatrix | None = Field(None, description="The gamma matrix (a `GammaMatrix` below).")
    eval: EvalRecord | None = Field(None, description="lm-evaluation-harness scores per model (`lora-sdpo eval`).")
    steps: list[StepRecord] = Field(description="One record per step of the recipe, in order.")

    def step(self, index: int) -> StepRecord:
        """Step t's record (t from 1)."""
        return self.steps[index - 1]


# ----------------------------------------------------------------------------- reading and writing


def _path(where: RunDir | Path | str) -> Path:
    return where.manifest_path if isinstance(where, RunDir) else Path(where) / "manifest.json"


def check(data: dict, where: Path) -> Manifest:
    """The manifest as records; a clear refusal for a format this version does not read or a wrong type."""
    fmt = data.get("format", FORMAT) if isinstance(data, dict) else None
    if isinstance(fmt, int) and fmt > FORMAT:
        raise RunError(f"{where}: manifest format {fmt}, written by a newer lora-sdpo; this version reads format "
                       f"{FORMAT} and older. Upgrade lora-sdpo to continue or read this run directory")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise RunError(f"{where}: not a manifest lora-sdpo can read ({problems}); it was edited by hand or damaged. "
                       "Restore it, or start the run again with --restart") from None


def read(where: RunDir | Path | str) -> Manifest | None:
    """The manifest of a run directory (a RunDir or its folder) as records; None when it has none."""
    path = _path(where)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e}); restore it, or start the run again with --restart") from None
    return check(data, path)


def write(where: RunDir | Path | str, m: Manifest) -> None:
    """Write the manifest atomically (temporary name, fsync, rename), stamped with the time."""
    m.updated = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(_path(where), m.dump())


# ----------------------------------------------------------------------------- the resume decision


@dataclass(frozen=True)
class Decision:
    """What a run does with step t: `skip` (done, files verified), `redo` (done but its files are not
    what the manifest recorded: step t and every later one again), `resume` (interrupted: from its
    phase), `start` (never got going)."""

    action: Literal["skip", "redo", "resume", "start"]
    reason: str | None = None


def decide(run: RunDir, m: Manifest, index: int, fingerprint: str, rows: int) -> Decision:
    """The resume decision for step `index` of the run in `run`, whose data now has `fingerprint`.

    Refuses (RunError) data that changed since the step ran, and a redo that needs M_{t-1} after
    run.keep_models = "last" removed it.
    """
    rec = m.step(index)
    if rec.data_fingerprint not in (None, fingerprint):
        was = f"{rec.rows} -> {rows} pairs, " if rec.rows is not None else ""
        raise RunError(
            f"{run.root}: the data of step {index} changed since it ran ({was}fingerprint "
            f"{rec.data_fingerprint[:12]} -> {fingerprint[:12]}); pass --restart to start over, or choose another --output"
        )
    if rec.status == "done":
        problem = verify_files(run.adapter_dir(index), rec.adapter_files)
        if problem is None and rec.model is not None:
            problem = verify_files(run.model_dir(index), rec.model_files)
        if problem is None:
            return Decision("skip")
        if index > 1 and m.step(index - 1).model is None:
            raise RunError(
                f"step {index}: {problem}, and M_{index - 1}, needed to redo it, was removed (run.keep_models = "
                "\"last\"); pass --restart to start over"
            )
        return Decision("redo", problem)
    if rec.status in ("running", "failed"):
        return Decision("resume", rec.phase or "start")
    return Decision("start")


# ----------------------------------------------------------------------------- the reference page


def _type_name(t) -> str:
    """A field's type for the reference table (no `|`, which would end the cell)."""
    args = [a for a in get_args(t) if a is not type(None)]
    if get_origin(t) is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if get_origin(t) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in get_args(t) else "")
    if get_origin(t) is not None:
        return {"dict": "object", "list": "list"}.get(get_origin(t).__name__, get_origin(t).__name__)
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(t.__name__, t.__name__)


def reference() -> str:
    """The manifest reference as markdown (docs/manifest.md embeds it; tests/test_docs.py compares)."""
    out = []
    parts = (("manifest.json", Manifest), ("each entry of `steps`", StepRecord), ("`Retention`", Retention),
             ("`GammaMatrix`", GammaMatrix), ("each cell of `GammaMatrix.rows`", GammaStats),
             ("each entry of `GammaMatrix.paired`", PairedDifference), ("`Overlap`", Overlap),
             ("each entry of `Overlap.overlaps`", OverlapPair), ("`EvalRecord`", EvalRecord))
    for title, cls in parts:
        out.append(f"**{title}**\n\n| key | type | meaning |\n|---|---|---|")
        for name, f in cls.model_fields.items():
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {f.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
