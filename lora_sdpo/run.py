"""A whole sDPO run: the steps in order, one summary line a step. The run loop owns the run state:
it alone writes manifest.json, after each phase of a step (step.py yields the step's record) and
after each step."""

from __future__ import annotations

import shutil
import time
from importlib.metadata import version
from pathlib import Path

from . import __version__, distributed, faults, manifest, tracking
from .data import prepare_run_data, tokenize_pair
from .diagnostics import gammas, paired_differences
from .errors import RunError, UserError
from .fetch import local_model_dir
from .gguf_import import gguf_sha256_of
from .model import device, load_base, load_tokenizer, lora_dtype
from .recipe import LoadedRecipe
from .manifest import GammaMatrix, Manifest, StepRecord
from .rundir import RunDir, atomic_write_text, remove_temporaries
from .samples import for_run
from .step import StepContext, run_step

LIBRARIES = ("lora-sdpo", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    """The versions a manifest records. lora-sdpo's own is the running code's `__version__` (the one
    definition; pyproject.toml reads it): a checkout run from PYTHONPATH, as bench/gpu_accept.sh
    does, has no installed distribution to ask, and an installed one could be another copy."""
    return {name: __version__ if name == "lora-sdpo" else version(name) for name in LIBRARIES}


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


def new_manifest(recipe: LoadedRecipe) -> Manifest:
    return Manifest(
        format=manifest.FORMAT,
        recipe_sha256=recipe.sha256,
        recipe="recipe.toml",
        settings=recipe.effective,
        versions=library_versions(),
        base_model=recipe.recipe.model.path,
        adapter=recipe.adapter.model_dump(),
        status="running",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        steps=[StepRecord(index=i + 1, status="pending") for i in range(len(recipe.recipe.steps))],
    )


def prepare_run_dir(recipe: LoadedRecipe, output: str | None, restart: bool) -> tuple[RunDir, Manifest]:
    root = recipe.output_dir(output)
    model_local = Path(recipe.model_location())
    if model_local.exists() and (root == model_local.resolve() or model_local.resolve() in root.parents):
        raise RunError(f"output folder {root} is inside the model folder {model_local}; choose another --output")
    run = RunDir(root)
    m = manifest.read(run)
    if root.exists() and any(root.iterdir()) and m is None:
        raise RunError(f"{root} exists and is not a lora-sdpo run directory (no manifest.json); choose another --output")
    if m is not None and restart:
        shutil.rmtree(root)
        m = None
    if m is not None and m.recipe_sha256 != recipe.sha256:
        changed = recipe_changes(m.settings or None, recipe.effective)
        raise RunError(
            f"{root} holds a run of a different recipe ({changed}); resume it with the same recipe, "
            "pass --restart to start over, or choose another --output"
        )
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    if m is None:
        m = new_manifest(recipe)
        atomic_write_text(run.recipe_path, recipe.text)
        manifest.write(run, m)
    return run, m


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


def run_recipe(recipe: LoadedRecipe, output: str | None = None, restart: bool = False, log=print) -> Manifest:
    # Model, data and trackers are checked before the run directory is touched: bad input writes nothing.
    tracking.require(recipe)
    base_dir = local_model_dir(recipe.model_location(), recipe.recipe.model.revision)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=recipe.recipe.model.trust_remote_code)
    data = prepare_run_data(recipe, tokenizer, score=_base_scorer(recipe, base_dir, tokenizer))
    # (distributed) Only the main process writes the run directory; the others follow its manifest.
    main = distributed.is_main()
    if main:
        run, m = prepare_run_dir(recipe, output, restart)
    distributed.barrier()
    if not main:
        run = RunDir(recipe.output_dir(output))
        m = manifest.read(run)
    log(f"run directory: {run.root}")
    _note_lora_dtype(recipe, log)
    _warn_about_data(data, log)
    m.base_gguf_sha256 = gguf_sha256_of(base_dir)
    m.overlap = data.audit.to_dict()
    m.split = recipe.recipe.data.split
    m.dropped_overlong = data.overlong
    ctx = _step_context(recipe, run, base_dir, tokenizer=tokenizer, data=data, m=m)
    if not main:
        _follow(ctx, recipe, data.steps)
        return m
    n = len(recipe.recipe.steps)
    for i in range(1, n + 1):
        if not _run_or_skip(ctx, recipe, m, i, data.steps[i - 1], log):
            continue
        if recipe.recipe.run.keep_models == "last" and i > 1:
            shutil.rmtree(run.model_dir(i - 1), ignore_errors=True)
            m.step(i - 1).model = None
        manifest.write(run, m)
        log(step_summary(m.step(i), n))
        faults.point("done")
    m.gamma_matrix.paired = paired_differences(run.root, m)
    m.status = "done"
    manifest.write(run, m)
    distributed.barrier()
    return m


def _note_lora_dtype(recipe: LoadedRecipe, log) -> None:
    if recipe.adapter.lora_dtype == "auto" and lora_dtype(recipe.adapter, device()) is not None:
        log("note: the LoRA weights train in float32: this CPU has no native bfloat16 matmuls "
            "(adapter.lora_dtype = \"auto\"; \"bfloat16\" follows TRL's QLoRA default anyway)")


def _warn_about_data(data, log) -> None:
    for i, ps in enumerate(data.steps, 1):
        for rep in ps.reports:
            if rep.notable:
                log(f"warning: step {i}: {rep.summary()}")
    if data.overlong:
        log(f"warning: {len(data.overlong)} pairs dropped, their prompt fills training.max_length: {', '.join(data.overlong[:5])}")
    for w in data.audit.warnings():
        log(f"warning: {w}")


def _step_context(recipe: LoadedRecipe, run: RunDir, base_dir: Path, *, tokenizer, data, m: Manifest) -> StepContext:
    """What every step shares: the tokenised gamma samples of each D_t and the eval data (the
    manifest's gamma matrix is set up for their rows), and the sample log."""
    k = recipe.recipe.diagnostics.gamma_sample
    named = {f"D_{i + 1}": ps for i, ps in enumerate(data.steps)}
    if data.eval is not None:
        named["eval"] = data.eval
    samples = {name: [tokenize_pair(r, tokenizer) for r in ps.rows[:k]] for name, ps in named.items()}
    t = recipe.recipe.training
    ctx = StepContext(run=run, base_dir=base_dir, tokenizer=tokenizer, samples=samples, gamma_max_length=t.max_length,
                      gamma_prefix_sharing=t.prefix_sharing)
    if m.gamma_matrix is None:
        m.gamma_matrix = GammaMatrix(sample={name: len(rows) for name, rows in samples.items()}, rows={})
    m.gamma_matrix.per_pair = "gamma/<row>.safetensors"  # one tensor per dataset, the sample's order
    if distributed.is_main():
        ctx.sample_log = for_run(run.root, recipe, data.eval)
    return ctx


def _run_or_skip(ctx: StepContext, recipe: LoadedRecipe, m: Manifest, i: int, pairs, log) -> bool:
    """Step i as the manifest's resume decision says: skipped (False) or run to the end (True). The
    manifest is written here after each phase of the step; its last record is left to the caller."""
    run, n = ctx.run, len(m.steps)
    decision = manifest.decide(run, m, i, pairs.fingerprint, len(pairs.rows))
    if decision.action == "skip":
        log(f"step {i}/{n}: done earlier, skipped (files verified against the manifest's sha256)")
        distributed.barrier()  # (distributed) the others read the decision from the manifest
        return False
    if decision.action == "redo":
        log(f"step {i}/{n}: {decision.reason}; redoing step {i} and every step after it")
        for j in range(i, n + 1):
            shutil.rmtree(run.step(j), ignore_errors=True)
            m.steps[j - 1] = StepRecord(index=j, status="pending")
            m.gamma_matrix.rows.pop(f"M_{j}", None)
    if decision.action == "resume":
        log(f"step {i}/{n}: resuming the interrupted step (its {decision.reason} phase)")
        rec = m.step(i)
        rec.status = "running"
        rec.unset("error")
    else:
        shutil.rmtree(run.step(i), ignore_errors=True)  # leftovers of a step that never got going
        m.steps[i - 1] = StepRecord(index=i, status="running", phase="reference", data_fingerprint=pairs.fingerprint,
                                    rows=len(pairs.rows))
    manifest.write(run, m)
    distributed.barrier()  # (distributed) the others read the decision from the manifest
    log(f"step {i}/{n}: training on D_{i} with reference {m.step(i).reference_label}")
    tracker = tracking.StepTracking(recipe, run, i)
    rows: dict = {}
    try:
        for record, rows in run_step(ctx, recipe.step_settings(i), pairs, m.step(i), tracker=tracker,
                                     rows_done=frozenset(m.gamma_matrix.rows)):
            m.steps[i - 1] = record
            if record.status != "done":
                manifest.write(run, m)
    except UserError as e:
        m.step(i).status, m.step(i).error = "failed", str(e)
        manifest.write(run, m)
        raise
    m.gamma_matrix.add_rows(rows)
    tracker.log_step_end(m.step(i), rows)
    return True


def _follow(ctx: StepContext, recipe: LoadedRecipe, steps: list) -> None:
    """(distributed) A process other than the main one: it trains each step that the main process
    starts or resumes, with it, and writes nothing; it waits while the main process merges."""
    for i, pairs in enumerate(steps, 1):
        distributed.barrier()  # the main process has decided: step i skipped, resumed or started
        rec = manifest.read(ctx.run).step(i)
        if rec.status != "done":
            for _ in run_step(ctx, recipe.step_settings(i), pairs, rec):
                pass
    distributed.barrier()


def step_summary(e: StepRecord, n: int) -> str:
    ret = e.retention_detail
    if ret.retention is None:
        rtext = "retention n/a (no gain)"
    elif ret.reliable:
        rtext = f"retention {ret.retention:.2f}"
    else:
        rtext = f"retention {ret.retention:.2f} (gain {ret.gain:.3g} within noise {ret.noise:.2g}: not meaningful)"
    procs = e.processes or {}
    if procs.get("count", 1) > 1:
        rtext += f"; {procs['count']} processes" + (
            f" ({procs['repeated_pairs']} pairs repeated to fill their last batches)" if procs["repeated_pairs"] else "")
    tok = e.tokens or {}
    if tok.get("two_row") and e.prefix_sharing:
        rtext += f"; backbone tokens {tok['backbone'] / tok['two_row']:.2f}x TRL's"
    return (
        f"step {e.index}/{n} done: {e.rows} pairs, {e.timings['total']:.0f}s, "
        f"loss {_f(e.first_loss)} -> {_f(e.last_loss)}, reward acc {_f(e.reward_accuracy, 2)}, "
        f"gamma_ref {e.gamma_ref_mean:.2f}, {rtext}"
    )


def _f(x, digits=4):
    return "n/a" if x is None else f"{x:.{digits}f}"
