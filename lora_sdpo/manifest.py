"""manifest.json, the run's state and the truth for resume, as typed records.

`Manifest` and `StepRecord` name every key lora-sdpo writes, with its type and one line of help;
docs/manifest.md embeds the reference generated from them (`python -m lora_sdpo.manifest`), and
tests/test_docs.py checks that it is current. Reading goes through `read`, which validates the
types and refuses a manifest of a format this version does not know; writing stays with
`RunDir.write_manifest` (atomic: temporary file, fsync, rename). Keys not listed here (written by
a newer step of the pipeline) are kept as they are, not refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RunError

FORMAT = 1  # the manifest format this version writes and reads; `format` in every manifest


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class StepRecord(_Record):
    """One entry of `steps`: step t of the chain, D_t -> M_t."""

    index: int = Field(description="t, from 1.")
    status: Literal["pending", "running", "done", "failed"] = Field(description="Where the step stands; resume redoes what is not done.")
    phase: str | None = Field(None, description="While running: the phase reached (reference, train, merge, retention); resume restarts it.")
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
    retention: float | None = Field(None, description="Share of the adapter's gamma gain kept by NF4(M_t); None when the gain is within noise.")
    retention_detail: dict[str, Any] | None = Field(default_factory=dict, description="The retention check's gain, kept part, noise and sample.")
    tokens: dict[str, Any] | None = Field(default_factory=dict, description="Tokens through the backbone and the LM head, against TRL's two-row layout.")
    processes: dict[str, Any] | None = Field(default_factory=dict, description="How the global batch was split over processes.")
    timings: dict[str, Any] | None = Field(default_factory=dict, description="Seconds per phase (load, reference, train, merge, retention, diagnostics, samples, total).")
    timings_partial: dict[str, Any] | None = Field(default_factory=dict, description="While running: seconds of the phases done so far, carried over by a resume.")
    adapter: str | None = Field(None, description="A_t's folder, relative to the run directory.")
    model: str | None = Field(None, description="M_t's folder, relative to the run directory; None once pruned (run.keep_models).")
    adapter_files: dict[str, str] | None = Field(default_factory=dict, description="sha256 of every file of A_t; a resume verifies them.")
    model_files: dict[str, str] | None = Field(default_factory=dict, description="sha256 of every file of M_t; a resume verifies them.")


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
    base_model: str | None = Field(None, description="S as the recipe names it (a folder or a Hub id).")
    adapter: dict[str, Any] | None = Field(default_factory=dict, description="The LoRA/QLoRA settings of every step.")
    split: str | None = Field(None, description="How the data was split into steps (natural, stratified, curriculum).")
    dropped_overlong: list[str] | None = Field(default_factory=list, description="Pairs dropped because their prompt fills max_length (`source row N`).")
    overlap: dict[str, Any] | None = Field(default_factory=dict, description="The overlap audit: pairs shared between steps and with the held-out set.")
    gamma_matrix: dict[str, Any] | None = Field(default_factory=dict, description="Mean gamma of S and each M_t on each D_t and the held-out data, with the paired differences.")
    eval: dict[str, Any] | None = Field(default_factory=dict, description="lm-evaluation-harness scores per model (`lora-sdpo eval`).")
    steps: list[StepRecord] = Field(description="One record per step of the recipe, in order.")


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


def read(path: Path) -> dict | None:
    """The manifest at `path` as the dict it holds (None when there is none), checked by `check`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path}: not valid JSON ({e}); restore it, or start the run again with --restart") from None
    check(data, path)
    return data


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
    for title, cls in (("manifest.json", Manifest), ("each entry of `steps`", StepRecord)):
        out.append(f"**{title}**\n\n| key | type | meaning |\n|---|---|---|")
        for name, f in cls.model_fields.items():
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {f.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
