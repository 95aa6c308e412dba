"""A whole sDPO run: the steps in order, the manifest after every stage, one summary line a step."""

from __future__ import annotations

import shutil
import time
from importlib.metadata import version
from pathlib import Path

from .data import prepare_run_data, tokenize_pair
from .errors import RunError
from .hub import local_model_dir
from .model import load_tokenizer
from .recipe import LoadedRecipe
from .rundir import RunDir, atomic_write_text, remove_temporaries
from .step import StepContext, run_step

LIBRARIES = ("lora-sdpo", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}


def _base_scorer(recipe: LoadedRecipe, base_dir: Path, tokenizer):
    """gamma of NF4(S) on pairs, for the curriculum split (None for the other splits)."""
    if recipe.recipe.data.split != "curriculum":
        return None

    def score(rows: list[dict]) -> list[float]:
        from .diagnostics import gammas
        from .model import load_base

        model = load_base(base_dir, recipe.adapter)
        g = gammas(model, [tokenize_pair(r, tokenizer) for r in rows], tokenizer, recipe.recipe.training.max_length)
        del model
        return g.tolist()

    return score


def new_manifest(recipe: LoadedRecipe) -> dict:
    return {
        "format": 1,
        "recipe_sha256": recipe.sha256,
        "recipe": "recipe.toml",
        "versions": library_versions(),
        "base_model": recipe.recipe.model.path,
        "adapter": recipe.adapter.model_dump(),
        "status": "running",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": [{"index": i + 1, "status": "pending"} for i in range(len(recipe.recipe.steps))],
    }


def prepare_run_dir(recipe: LoadedRecipe, output: str | None, restart: bool) -> tuple[RunDir, dict]:
    root = recipe.output_dir(output)
    model_local = Path(recipe.model_location())
    if model_local.exists() and (root == model_local.resolve() or model_local.resolve() in root.parents):
        raise RunError(f"output folder {root} is inside the model folder {model_local}; choose another --output")
    run = RunDir(root)
    manifest = run.read_manifest()
    if root.exists() and any(root.iterdir()) and manifest is None:
        raise RunError(f"{root} exists and is not a lora-sdpo run directory (no manifest.json); choose another --output")
    if manifest is not None and restart:
        shutil.rmtree(root)
        manifest = None
    if manifest is not None and manifest.get("recipe_sha256") != recipe.sha256:
        raise RunError(
            f"{root} holds a run of a different recipe (recipe_sha256 {manifest.get('recipe_sha256', '?')[:12]} "
            f"vs {recipe.sha256[:12]}); resume it with the same recipe, pass --restart to start over, "
            "or choose another --output"
        )
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    if manifest is None:
        manifest = new_manifest(recipe)
        atomic_write_text(run.recipe_path, recipe.text)
        run.write_manifest(manifest)
    return run, manifest


def run_recipe(recipe: LoadedRecipe, output: str | None = None, restart: bool = False, log=print) -> dict:
    # Model and data are checked before the run directory is touched: bad input writes nothing.
    base_dir = local_model_dir(recipe.model_location(), recipe.recipe.model.revision)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=recipe.recipe.model.trust_remote_code)
    data = prepare_run_data(recipe, tokenizer, score=_base_scorer(recipe, base_dir, tokenizer))
    run, manifest = prepare_run_dir(recipe, output, restart)
    log(f"run directory: {run.root}")
    manifest["split"] = recipe.recipe.data.split
    manifest["dropped_overlong"] = data.overlong
    k = recipe.recipe.diagnostics.gamma_sample
    named = {f"D_{i + 1}": ps for i, ps in enumerate(data.steps)}
    if data.eval is not None:
        named["eval"] = data.eval
    samples = {name: [tokenize_pair(r, tokenizer) for r in ps.rows[:k]] for name, ps in named.items()}
    ctx = StepContext(recipe=recipe, run=run, base_dir=base_dir, tokenizer=tokenizer, samples=samples)
    manifest.setdefault("gamma_matrix", {"sample": {name: len(rows) for name, rows in samples.items()}, "rows": {}})
    n = len(recipe.recipe.steps)
    for i in range(1, n + 1):
        entry = manifest["steps"][i - 1]
        if entry.get("status") == "done" and run.adapter_dir(i).exists() and run.model_dir(i).exists():
            if entry.get("data_fingerprint") != data.steps[i - 1].fingerprint:
                raise RunError(
                    f"{run.root}: the data of step {i} changed since it ran (fingerprint "
                    f"{entry.get('data_fingerprint', '?')[:12]} -> {data.steps[i - 1].fingerprint[:12]}); "
                    "pass --restart to start over, or choose another --output"
                )
            log(f"step {i}/{n}: done earlier, skipped")
            continue
        # A step that did not finish is redone whole, from its own clean folder.
        shutil.rmtree(run.step(i), ignore_errors=True)
        manifest["steps"][i - 1] = {"index": i, "status": "running"}
        run.write_manifest(manifest)
        log(f"step {i}/{n}: training on D_{i} with reference {'S' if i == 1 else f'M_{i - 1}'}")
        entry, matrix_rows = run_step(ctx, i, data.steps[i - 1])
        manifest["steps"][i - 1] = entry
        manifest["gamma_matrix"]["rows"].update(matrix_rows)
        if recipe.recipe.run.keep_models == "last" and i > 1:
            shutil.rmtree(run.model_dir(i - 1), ignore_errors=True)
            manifest["steps"][i - 2]["model"] = None
        run.write_manifest(manifest)
        log(step_summary(entry, n))
    manifest["status"] = "done"
    run.write_manifest(manifest)
    return manifest


def step_summary(e: dict, n: int) -> str:
    ret = e["retention_detail"]
    if ret["retention"] is None:
        rtext = "retention n/a (no gain)"
    elif ret["reliable"]:
        rtext = f"retention {ret['retention']:.2f}"
    else:
        rtext = f"retention {ret['retention']:.2f} (gain {ret['gain']:.3g} within noise {ret['noise']:.2g}: not meaningful)"
    return (
        f"step {e['index']}/{n} done: {e['rows']} pairs, {e['timings']['total']:.0f}s, "
        f"loss {_f(e['first_loss'])} -> {_f(e['last_loss'])}, reward acc {_f(e['reward_accuracy'], 2)}, "
        f"gamma_ref {e['gamma_ref_mean']:.2f}, {rtext}"
    )


def _f(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"
