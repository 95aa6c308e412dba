"""A self-contained folder from a run directory: M_t (or A_t), tokenizer, model card, recipe, marker.

    EXPORT/
      model*.safetensors (+ index), config.json      --what merged: M_t cast to --dtype, streamed
      adapter_model.safetensors, adapter_config.json  --what adapter: A_t, which applies to M_{t-1}
      previous_adapters/step-k/                       --what adapter: A_1..A_{t-1}, to rebuild M_{t-1} from S
      tokenizer files, generation_config.json, licence files of the base
      README.md                                       model card (lora_sdpo/card.py)
      recipe.toml                                     the recipe as run
      export.json                                     written last: the marker of a finished export,
                                                      with the size of every file (what `push` uploads)

The export is planned first (every file and its exact size), so `push --dry-run` on a run
directory can show what would be uploaded without writing gigabytes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .card import base_license, model_card
from . import manifest
from .errors import RunError
from .manifest import Manifest
from .merge import MergePlan, check_output, config_text, plan_merge, write_merge
from .rundir import EXPORT_MARKER as MARKER, RunDir, atomic_dir
from .shards import planned_files

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json", "spiece.model",
)
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
WHATS = ("merged", "adapter")


@dataclass
class ExportFile:
    path: str  # relative to the export folder, with /
    size: int
    source: Path | None = None  # copied from here
    text: str | None = None  # or generated


@dataclass
class ExportPlan:
    run_dir: Path
    step: int
    what: str
    dtype: str | None
    card: str
    files: list[ExportFile] = field(default_factory=list)  # every file but the marker
    merge: MergePlan | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _side_files(model_dir: Path | None) -> list[Path]:
    if model_dir is None:
        return []
    return sorted(
        p for p in model_dir.iterdir()
        if p.is_file() and (p.name in TOKENIZER_FILES or p.name == "generation_config.json" or p.name.upper().startswith(LICENCE_PREFIXES))
    )


def _text_file(path: str, text: str) -> ExportFile:
    return ExportFile(path, len(text.encode()), text=text)


def _copy_file(path: str, source: Path) -> ExportFile:
    return ExportFile(path, source.stat().st_size, source=source)


def read_run(run_dir: Path) -> tuple[RunDir, Manifest, str]:
    run = RunDir(Path(run_dir).resolve())
    m = manifest.read(run)  # a manifest without steps is refused there, naming the key
    if m is None:
        raise RunError(f"{run_dir}: not a lora-sdpo run directory (no manifest.json with steps); give the folder `lora-sdpo run` wrote")
    if not run.recipe_path.exists():
        raise RunError(f"{run.recipe_path}: missing; the run directory is incomplete")
    return run, m, run.recipe_path.read_text()


def pick_step(run: RunDir, m: Manifest, step: int | None) -> int:
    done = [s.index for s in m.steps if s.status == "done"]
    if step is None:
        if not done:
            raise RunError(f"{run.root}: no step has finished yet; run it to completion first (lora-sdpo run)")
        return max(done)
    if not 1 <= step <= len(m.steps):
        raise RunError(f"--step {step}: the run has steps 1..{len(m.steps)}")
    if step not in done:
        raise RunError(f"--step {step}: that step has not finished (status {m.step(step).status}); finish the run first")
    return step


def _adapter_config_text(adapter_dir: Path, base_ref: str | None) -> str:
    # The recorded base is a path on the training machine (for step t > 1 a run folder that does
    # not travel); the card says what the adapter applies to instead.
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_ref
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def plan_export(
    run_dir: Path, step: int | None = None, what: str = "merged", dtype: str = "bfloat16",
    max_shard_size: str | int = "2GB", repo_id: str | None = None,
) -> ExportPlan:
    """Every file the export will hold, with its exact size; reads headers and configs only."""
    if what not in WHATS:
        raise RunError(f"--what {what!r}: choose merged or adapter")
    run, m, recipe_text = read_run(run_dir)
    step = pick_step(run, m, step)
    # Tokenizer, generation config and licences travel with every M_t (the merge copies them from S).
    model_dirs = [run.model_dir(i) for i in [step, *range(len(m.steps), 0, -1)] if run.model_dir(i).is_dir()]
    side_src = model_dirs[0] if model_dirs else None
    licence = base_license(side_src)
    card = model_card(run.root, m, recipe_text, step, what, dtype if what == "merged" else None, licence, repo_id)
    plan = ExportPlan(run.root, step, what, dtype if what == "merged" else None, card)

    if what == "merged":
        model_dir = run.model_dir(step)
        if not model_dir.is_dir():
            raise RunError(
                f"{model_dir}: M_{step} was pruned (run.keep_models = \"last\"); export the last step, or rebuild M_{step} "
                f"from S with `lora-sdpo merge` and the adapters of steps 1..{step}"
            )
        plan.merge = plan_merge(model_dir, None, dtype, max_shard_size)
        plan.files += [ExportFile(name, size) for name, size in planned_files(plan.merge.shards).items()]
        cfg = config_text(model_dir, dtype, plan.merge.untie)
        if cfg is not None:
            plan.files.append(_text_file("config.json", cfg))
    else:
        hub_base = None
        if step == 1:
            from .card import base_identity

            hub_base = base_identity(run.root, m)[0]
        for i in range(1, step + 1):
            adir = run.adapter_dir(i)
            if not (adir / "adapter_model.safetensors").exists():
                raise RunError(f"{adir}: the adapter of step {i} is missing; the run directory is incomplete")
            prefix = "" if i == step else f"previous_adapters/step-{i}/"
            ref = hub_base if i == 1 else None
            plan.files.append(_text_file(prefix + "adapter_config.json", _adapter_config_text(adir, ref)))
            plan.files.append(_copy_file(prefix + "adapter_model.safetensors", adir / "adapter_model.safetensors"))
    names = {f.path for f in plan.files}
    plan.files += [_copy_file(p.name, p) for p in _side_files(side_src) if p.name not in names]
    plan.files.append(_text_file("README.md", card))
    plan.files.append(_text_file("recipe.toml", recipe_text))
    return plan


def write_export(plan: ExportPlan, output: Path) -> Path:
    """Write the planned export atomically; the marker goes in last, so its presence means complete."""
    output = Path(output).resolve()
    check_output(output, {"run": plan.run_dir}, replaceable=(MARKER,))
    with atomic_dir(output) as tmp:
        if plan.merge is not None:
            write_merge(plan.merge, tmp)
        for f in plan.files:
            dst = tmp / f.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if f.text is not None:
                dst.write_text(f.text)
            elif f.source is not None:
                shutil.copyfile(f.source, dst)
        written = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        planned = {f.path: f.size for f in plan.files}
        if written != planned:  # the dry run must show exactly what is written
            raise AssertionError(f"export wrote {sorted(set(written) ^ set(planned))} against its plan")
        marker = {
            "format": 1,
            "tool": f"lora-sdpo {__version__}",
            "what": plan.what,
            "step": plan.step,
            "dtype": plan.dtype,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": written,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return output


def export_run(run_dir: Path, output: Path, **kwargs) -> ExportPlan:
    plan = plan_export(run_dir, **kwargs)
    write_export(plan, output)
    return plan
