"""A whole sDPO run: the steps in order, the manifest after every stage, one summary line a step."""

from __future__ import annotations

import shutil
import time
from importlib.metadata import version
from pathlib import Path

from . import distributed, faults, tracking
from .data import prepare_run_data, tokenize_pair
from .diagnostics import gammas, paired_differences
from .errors import RunError, UserError
from .fetch import local_model_dir
from .model import load_base, load_tokenizer
from .recipe import LoadedRecipe
from .rundir import RunDir, atomic_write_text, remove_temporaries, verify_files
from .samples import for_run
from .step import StepContext, run_step

LIBRARIES = ("lora-sdpo", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}


def _base_scorer(recipe: LoadedRecipe, base_dir: Path, tokenizer):
    """gamma of NF4(S) on pairs, for the curriculum split (None for the other splits)."""
    if recipe.recipe.data.split != "curriculum":
        return None

    def score(rows: list[dict]) -> list[float]:
        model = load_base(base_dir, recipe.adapter)
        t = recipe.recipe.training
        g = gammas(model, [tokenize_pair(r, tokenizer) for r in rows], tokenizer, t.max_length, prefix_sharing=t.prefix_sharing)
        del model
        return g.tolist()

    return score


def new_manifest(recipe: LoadedRecipe) -> dict:
    return {
        "format": 1,
        "recipe_sha256": recipe.sha256,
        "recipe": "recipe.toml",
        "settings": recipe.effective,
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
        changed = recipe_changes(manifest.get("settings"), recipe.effective)
        raise RunError(
            f"{root} holds a run of a different recipe ({changed}); resume it with the same recipe, "
            "pass --restart to start over, or choose another --output"
        )
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    if manifest is None:
        manifest = new_manifest(recipe)
        atomic_write_text(run.recipe_path, recipe.text)
        run.write_manifest(manifest)
    return run, manifest


def recipe_changes(old: dict | None, new: dict, n: int = 6) -> str:
    """What differs between the settings a run was started with and these, key by key."""
    if old is None:
        return "its manifest predates recorded settings"

    def flat(d, prefix=""):
        out = {}
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    diffs = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return "changed: " + "; ".join(diffs[:n]) + (f"; ... {len(diffs) - n} more" if len(diffs) > n else "")


def run_recipe(recipe: LoadedRecipe, output: str | None = None, restart: bool = False, log=print) -> dict:
    # Model, data and trackers are checked before the run directory is touched: bad input writes nothing.
    tracking.require(recipe)
    base_dir = local_model_dir(recipe.model_location(), recipe.recipe.model.revision)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=recipe.recipe.model.trust_remote_code)
    data = prepare_run_data(recipe, tokenizer, score=_base_scorer(recipe, base_dir, tokenizer))
    # (distributed) Only the main process writes the run directory; the others follow its manifest.
    main = distributed.is_main()
    if main:
        run, manifest = prepare_run_dir(recipe, output, restart)
    distributed.barrier()
    if not main:
        run = RunDir(recipe.output_dir(output))
        manifest = run.read_manifest()
    log(f"run directory: {run.root}")
    for i, ps in enumerate(data.steps, 1):
        for rep in ps.reports:
            if rep.notable:
                log(f"warning: step {i}: {rep.summary()}")
    if data.overlong:
        log(f"warning: {len(data.overlong)} pairs dropped, their prompt fills training.max_length: {', '.join(data.overlong[:5])}")
    for w in data.audit.warnings():
        log(f"warning: {w}")
    manifest["overlap"] = data.audit.to_dict()
    manifest["split"] = recipe.recipe.data.split
    manifest["dropped_overlong"] = data.overlong
    k = recipe.recipe.diagnostics.gamma_sample
    named = {f"D_{i + 1}": ps for i, ps in enumerate(data.steps)}
    if data.eval is not None:
        named["eval"] = data.eval
    samples = {name: [tokenize_pair(r, tokenizer) for r in ps.rows[:k]] for name, ps in named.items()}
    ctx = StepContext(recipe=recipe, run=run, base_dir=base_dir, tokenizer=tokenizer, samples=samples)
    if main:
        ctx.sample_log = for_run(run.root, recipe, data.eval)
    manifest.setdefault("gamma_matrix", {"sample": {name: len(rows) for name, rows in samples.items()}, "rows": {}})
    manifest["gamma_matrix"]["per_pair"] = "gamma/<row>.safetensors"  # one tensor per dataset, the sample's order
    ctx.matrix_rows_done = set(manifest["gamma_matrix"]["rows"])

    def save_rows(rows: dict) -> None:
        manifest["gamma_matrix"]["rows"].update(rows)
        run.write_manifest(manifest)

    n = len(recipe.recipe.steps)
    if not main:
        _follow(ctx, data.steps)
        return manifest
    ctx.save_matrix_rows = save_rows
    for i in range(1, n + 1):
        entry = manifest["steps"][i - 1]
        fingerprint = data.steps[i - 1].fingerprint
        if entry.get("data_fingerprint") not in (None, fingerprint):
            rows = f"{entry['rows']} -> {len(data.steps[i - 1].rows)} pairs, " if "rows" in entry else ""
            raise RunError(
                f"{run.root}: the data of step {i} changed since it ran ({rows}fingerprint "
                f"{entry['data_fingerprint'][:12]} -> {fingerprint[:12]}); "
                "pass --restart to start over, or choose another --output"
            )
        if entry.get("status") == "done":
            problem = verify_files(run.adapter_dir(i), entry.get("adapter_files"))
            if problem is None and entry.get("model") is not None:
                problem = verify_files(run.model_dir(i), entry.get("model_files"))
            if problem is None:
                log(f"step {i}/{n}: done earlier, skipped (files verified against the manifest's sha256)")
                distributed.barrier()  # (distributed) the others read the decision from the manifest
                continue
            if i > 1 and manifest["steps"][i - 2].get("model") is None:
                raise RunError(
                    f"step {i}: {problem}, and M_{i - 1}, needed to redo it, was removed (run.keep_models = "
                    "\"last\"); pass --restart to start over"
                )
            log(f"step {i}/{n}: {problem}; redoing step {i} and every step after it")
            for j in range(i, n + 1):
                shutil.rmtree(run.step(j), ignore_errors=True)
                manifest["steps"][j - 1] = {"index": j, "status": "pending"}
                manifest["gamma_matrix"]["rows"].pop(f"M_{j}", None)
            entry = manifest["steps"][i - 1]
        if entry.get("status") in ("running", "failed"):
            log(f"step {i}/{n}: resuming the interrupted step (its {entry.get('phase', 'start')} phase)")
            entry["status"] = "running"
            entry.pop("error", None)
        else:
            shutil.rmtree(run.step(i), ignore_errors=True)  # leftovers of a step that never got going
            entry = {"index": i, "status": "running", "phase": "reference", "data_fingerprint": fingerprint, "rows": len(data.steps[i - 1].rows)}
        manifest["steps"][i - 1] = entry

        def save(e: dict, i: int = i) -> None:
            manifest["steps"][i - 1] = e
            run.write_manifest(manifest)

        save(entry)
        distributed.barrier()  # (distributed) the others read the decision from the manifest
        log(f"step {i}/{n}: training on D_{i} with reference {'S' if i == 1 else f'M_{i - 1}'}")
        try:
            entry, matrix_rows = run_step(ctx, i, data.steps[i - 1], entry, save)
        except UserError as e:
            manifest["steps"][i - 1].update(status="failed", error=str(e))
            run.write_manifest(manifest)
            raise
        manifest["steps"][i - 1] = entry
        manifest["gamma_matrix"]["rows"].update(matrix_rows)
        if recipe.recipe.run.keep_models == "last" and i > 1:
            shutil.rmtree(run.model_dir(i - 1), ignore_errors=True)
            manifest["steps"][i - 2]["model"] = None
        run.write_manifest(manifest)
        log(step_summary(entry, n))
        faults.point("done")
    manifest["gamma_matrix"]["paired"] = paired_differences(run.root, manifest)
    manifest["status"] = "done"
    run.write_manifest(manifest)
    distributed.barrier()
    return manifest


def _follow(ctx: StepContext, steps: list) -> None:
    """(distributed) A process other than the main one: it trains each step that the main process
    starts or resumes, with it, and writes nothing; it waits while the main process merges."""
    for i, pairs in enumerate(steps, 1):
        distributed.barrier()  # the main process has decided: step i skipped, resumed or started
        entry = ctx.run.read_manifest()["steps"][i - 1]
        if entry.get("status") != "done":
            run_step(ctx, i, pairs, entry, save=lambda e: None)
    distributed.barrier()


def step_summary(e: dict, n: int) -> str:
    ret = e["retention_detail"]
    if ret["retention"] is None:
        rtext = "retention n/a (no gain)"
    elif ret["reliable"]:
        rtext = f"retention {ret['retention']:.2f}"
    else:
        rtext = f"retention {ret['retention']:.2f} (gain {ret['gain']:.3g} within noise {ret['noise']:.2g}: not meaningful)"
    procs = e.get("processes") or {}
    if procs.get("count", 1) > 1:
        rtext += f"; {procs['count']} processes" + (
            f" ({procs['repeated_pairs']} pairs repeated to fill their last batches)" if procs["repeated_pairs"] else "")
    tok = e.get("tokens") or {}
    if tok.get("two_row") and e.get("prefix_sharing"):
        rtext += f"; backbone tokens {tok['backbone'] / tok['two_row']:.2f}x TRL's"
    return (
        f"step {e['index']}/{n} done: {e['rows']} pairs, {e['timings']['total']:.0f}s, "
        f"loss {_f(e['first_loss'])} -> {_f(e['last_loss'])}, reward acc {_f(e['reward_accuracy'], 2)}, "
        f"gamma_ref {e['gamma_ref_mean']:.2f}, {rtext}"
    )


def _f(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"
