"""`lora-sdpo compare`: the paper's Table 2 in miniature, on your data.

Every arm is the same recipe with one thing changed, so they see the same pairs, epochs,
effective batch, learning rate and schedule per step (a step's [steps.training] applies to the
step of the same index in every sDPO arm; the dpo arm takes it only when all steps share it):
    dpo             one step on the union of all steps' data (plain DPO)
    sdpo            the recipe as written (natural split)
    sdpo-strat      the union re-cut per source into the natural steps' sizes (the paper's Strat.)
    sdpo-curriculum the union ranked by S's gamma, easiest first
    sdpo-base-init  each step's target starts from S, its reference stays M_{t-1} (paper sec. 3.5)
Arms run one after another, each in its own run directory, so the comparison resumes like a run.
Held-out results: preference accuracy against S (share of eval pairs where the final model's gamma
beats S's), mean held-out gamma, final train loss, wall time.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import prepare_run_data, tokenize_pair
from .diagnostics import GAMMA_DIR, gamma_file, gammas, load_gammas, paired_difference, save_gammas, stats
from .errors import RecipeError
from .fetch import local_model_dir
from .manifest import Manifest
from .model import load_base, load_tokenizer
from .recipe import LoadedRecipe, Recipe, format_errors
from .report import fmt_number, md_table, plus_minus
from .run import run_recipe
from .rundir import atomic_write_json, atomic_write_text

ARMS = {
    "dpo": "one step on the union of all steps' data",
    "sdpo": "the recipe as written",
    "sdpo-strat": 'data.split = "stratified"',
    "sdpo-curriculum": 'data.split = "curriculum"',
    "sdpo-base-init": 'model.target_init = "base"',
}


def arm_recipe(loaded: LoadedRecipe, arm: str) -> LoadedRecipe:
    """The recipe of one arm: the user's recipe with exactly the arm's change."""
    from pydantic import ValidationError

    if arm not in ARMS:
        raise RecipeError(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    # From the validated recipe, not its text: the text holds --set overrides only as comments.
    data = loaded.recipe.model_dump(mode="json")
    if arm == "dpo":
        data["steps"] = [{"sources": [s for step in data["steps"] for s in step["sources"]], **dpo_arm_training(loaded)}]
        data["data"]["split"] = "natural"
        data["data"].pop("fractions", None)
    elif arm == "sdpo-strat":
        data["data"]["split"] = "stratified"
    elif arm == "sdpo-curriculum":
        data["data"]["split"] = "curriculum"
    elif arm == "sdpo-base-init":
        data.setdefault("model", {})["target_init"] = "base"
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_errors(f"{loaded.path} (arm {arm})", e)) from None
    text = loaded.text.rstrip() + f"\n\n# lora-sdpo compare, arm {arm}: {ARMS[arm]}\n"
    return LoadedRecipe(path=loaded.path, text=text, recipe=recipe, adapter=loaded.adapter, adapter_source=loaded.adapter_source)


def dpo_arm_training(loaded: LoadedRecipe) -> dict:
    """How per-step settings map onto the one-step dpo arm: settings every step shares carry over
    (same epochs and learning rate over the same pairs, so the same budget); settings that differ
    between steps have no one-step equivalent, and the arm is refused rather than guessed."""
    r = loaded.recipe
    per_step = [r.step_overrides(i) for i in range(1, len(r.steps) + 1)]
    if all(o == per_step[0] for o in per_step):
        return {"training": r.steps[0].training.model_dump(exclude_none=True)} if per_step[0] else {}
    shown = "; ".join(f"step {i}: " + (", ".join(f"{k}={v}" for k, v in o.items()) or "as [training]")
                      for i, o in enumerate(per_step, 1))
    raise RecipeError(
        f"{loaded.path}: --arms dpo: the steps train with different settings ({shown}); the one-step dpo arm has "
        "no honest equivalent of a per-step schedule (one step on the union cannot train part of it with one "
        "setting and part with another). Compare the sDPO arms only (e.g. --arms sdpo,sdpo-strat), or give every "
        "step the same settings in [training]"
    )


def run_comparison(loaded: LoadedRecipe, arms: list[str], output: Path, log=print, tasks: str | None = None,
                   include: tuple[str, ...] = (), eval_precision: str = "bf16") -> dict:
    if not loaded.recipe.data.eval:
        raise RecipeError(f"{loaded.path}: compare needs held-out data: add a [[data.eval]] source")
    recipes = {arm: arm_recipe(loaded, arm) for arm in arms}  # every arm validated before any runs
    if "trackio" in loaded.recipe.run.report_to and len(arms) > 1:  # see tracking.import_trackio
        raise RecipeError(f"{loaded.path}: run.report_to names trackio, which tracks one run directory a process, and compare "
                          "runs its arms in one process: compare one arm at a time (--arms), or track with tensorboard, "
                          "mlflow or wandb")
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    results_path = output / "comparison.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"arms": {}}

    base_dir = local_model_dir(loaded.model_location(), loaded.recipe.model.revision)
    tokenizer = load_tokenizer(base_dir)
    max_len = loaded.recipe.training.max_length
    eval_rows = [tokenize_pair(r, tokenizer) for r in prepare_run_data(loaded, tokenizer).eval.rows]

    def eval_gammas(model_dir: Path):
        model = load_base(model_dir, loaded.adapter)
        g = gammas(model, eval_rows, tokenizer, max_len, prefix_sharing=loaded.recipe.training.prefix_sharing)
        del model
        return g

    g_base = eval_gammas(base_dir)
    results["eval_pairs"] = len(eval_rows)
    results["base_eval_gamma_mean"] = float(g_base.mean())
    results["base_eval_gammas"] = [round(float(x), 5) for x in g_base]
    for arm, rec in recipes.items():
        prev = results["arms"].get(arm)
        if prev and prev.get("recipe_sha256") == rec.sha256:
            log(f"arm {arm}: done earlier, skipped")
            continue
        log(f"arm {arm}: {ARMS[arm]}")
        m = run_recipe(rec, output=str(output / arm), log=log)
        last = m.steps[-1]
        g = eval_gammas(output / arm / last.model)
        results["arms"][arm] = {
            "recipe_sha256": rec.sha256,
            "steps": len(m.steps),
            "pairs": sum(s.rows for s in m.steps),
            "pref_accuracy_vs_S": float((g > g_base).float().mean()),
            "eval_gamma_mean": float(g.mean()),
            "final_train_loss": last.last_loss,
            "wall_s": round(manifest_wall(m), 1),
            "gamma_matrix": m.gamma_matrix.dump() if m.gamma_matrix else None,
            "eval_gammas": [round(float(x), 5) for x in g],  # per held-out pair, in order: the paired tables
        }
        atomic_write_json(results_path, results)
    if "dpo" in results["arms"] and "sdpo" in results["arms"] and "sdpo" in recipes:
        results["dpo_row"] = dpo_on_sdpo_samples(recipes["sdpo"], output, tokenizer, results, log)
    if tasks:
        results["benchmarks"] = benchmarks(results, base_dir, output, tasks, include, eval_precision, log)
    atomic_write_json(results_path, results)
    write_comparison_md(results, output / "comparison.md", output)
    return results


DPO_ROW = "DPO"  # the dpo arm's final model as a row of the sdpo arm's gamma matrix: gamma/DPO.safetensors


def dpo_on_sdpo_samples(sdpo: LoadedRecipe, output: Path, tokenizer, results: dict, log=print) -> dict:
    """The dpo arm's model on the very pairs of the sdpo arm's gamma matrix (the first gamma_sample pairs of
    each D_t and of the eval data), so that DPO, S, M_1 ... M_T are compared pair by pair. Computed once."""
    path = gamma_file(output, DPO_ROW)
    if path.is_file() and results.get("dpo_row", {}).get("dpo_sha256") == results["arms"]["dpo"]["recipe_sha256"]:
        return results["dpo_row"]
    k = sdpo.recipe.diagnostics.gamma_sample
    data = prepare_run_data(sdpo, tokenizer)
    named = {f"D_{i + 1}": ps.rows for i, ps in enumerate(data.steps)} | {"eval": data.eval.rows}
    samples = {name: [tokenize_pair(r, tokenizer) for r in rows[:k]] for name, rows in named.items()}
    last = Manifest.model_validate_json((output / "dpo" / "manifest.json").read_text()).steps[-1]
    log(f"the dpo arm's model on the sdpo arm's gamma-matrix pairs ({', '.join(f'{n} {len(r)}' for n, r in samples.items())})")
    model = load_base(output / "dpo" / last.model, sdpo.adapter)
    t = sdpo.recipe.training
    per_pair = {name: gammas(model, rows, tokenizer, t.max_length, prefix_sharing=t.prefix_sharing) for name, rows in samples.items()}
    del model
    save_gammas(path, per_pair)
    return {"dpo_sha256": results["arms"]["dpo"]["recipe_sha256"], "per_pair": f"{GAMMA_DIR}/{DPO_ROW}.safetensors"}


def manifest_wall(m: Manifest) -> float:
    return sum(s.timings["total"] for s in m.steps)


def benchmarks(results: dict, base_dir: Path, output: Path, tasks: str, include: tuple[str, ...], precision: str,
               log=print) -> dict:
    """lm-evaluation-harness scores of S and of every arm's final model (`--tasks`); a model already scored on
    the same tasks with the same weights is not scored again."""
    from .harness import evaluate, require_lm_eval
    from .targets import fingerprint, model_target

    require_lm_eval()
    done = results.get("benchmarks") or {}
    models = {"S": base_dir} | {arm: output / arm / Manifest.model_validate_json((output / arm / "manifest.json").read_text()).steps[-1].model
                               for arm in results["arms"]}
    out = {}
    for label, folder in models.items():
        seen = done.get(label)
        key = {"tasks": tasks, "precision": precision, "fingerprint": fingerprint(model_target(str(folder), None))}
        if seen and all(seen.get(k) == v for k, v in key.items()):
            out[label] = seen
            continue
        doc = evaluate(str(folder), tasks, include=list(include), limit=None, steps="all", batch_size="auto", adapter=None,
                       precision=precision, compute_dtype="float32" if precision == "fp32" else "bfloat16", log=log)
        out[label] = {**key, "record": next(iter(doc["models"].values()))}
    return out


def heldout_vs_s(results: dict) -> dict[str, dict]:
    """Per arm, on the held-out pairs, against S: reward accuracy (share of pairs whose implicit reward
    margin, gamma_arm - gamma_S, is above 0) and the mean margin, each with its standard error; and, when
    both arms ran, sdpo minus dpo on the same pairs (paired)."""
    import torch

    if "base_eval_gammas" not in results:
        return {}
    g_s = torch.tensor(results["base_eval_gammas"])
    margins = {arm: torch.tensor(r["eval_gammas"]) - g_s for arm, r in results["arms"].items() if "eval_gammas" in r}
    out = {arm: {"accuracy": stats((d > 0).float()), "margin": stats(d)} for arm, d in margins.items()}
    if "dpo" in margins and "sdpo" in margins:
        out["sdpo - dpo"] = {
            "accuracy": paired_difference((margins["sdpo"] > 0).float(), (margins["dpo"] > 0).float()),
            "margin": paired_difference(margins["sdpo"], margins["dpo"]),
        }
    return out


def cross_matrix(output: Path) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """The sdpo arm's gamma matrix (S, M_1 ... M_T) with the dpo arm's model as one more row, per-pair
    statistics from the gamma files; and the paired difference of every row against S on each dataset."""
    sdpo = output / "sdpo"
    m = Manifest.model_validate_json((sdpo / "manifest.json").read_text())
    labels = list(m.gamma_matrix.rows) if m.gamma_matrix else []
    per_pair = {label: load_gammas(sdpo, label) for label in labels}
    if gamma_file(output, DPO_ROW).is_file():
        per_pair[DPO_ROW] = load_gammas(output, DPO_ROW)
    per_pair = {k: v for k, v in per_pair.items() if v is not None}
    data = list(m.gamma_matrix.sample) if m.gamma_matrix else []
    cells = {label: {d: stats(g[d]) for d in data if d in g} for label, g in per_pair.items()}
    base = per_pair.get("S")
    diffs = {label: {d: paired_difference(g[d], base[d]) for d in data if d in g and d in base}
             for label, g in per_pair.items() if label != "S" and base is not None}
    return data, {"cells": cells, "vs_S": diffs}


def _pm(c: dict | None, digits: int = 2) -> str:
    """A statistics dict (stats / paired_difference) as report.plus_minus shows a cell."""
    return plus_minus((c or {}).get("mean"), (c or {}).get("se"), digits)


def write_comparison_md(results: dict, path: Path, output: Path | None = None) -> None:
    header = ["arm", "steps", "pairs", "pref. accuracy vs S", "mean eval gamma", "final train loss", "wall time"]
    rows = [
        [arm, str(r["steps"]), str(r["pairs"]), fmt_number(r["pref_accuracy_vs_S"], 3), fmt_number(r["eval_gamma_mean"], 2),
         fmt_number(r["final_train_loss"], 4), f"{r['wall_s']:.0f}s"]
        for arm, r in results["arms"].items()
    ]
    parts = [
        "# Comparison\n",
        f"Held-out: {results['eval_pairs']} pairs; S's mean gamma on them: {results['base_eval_gamma_mean']:.2f}. "
        "Preference accuracy vs S: the share of held-out pairs where the arm's final model has a larger "
        "gamma = log p(chosen) - log p(rejected) than S.\n",
        md_table(header, rows),
    ]
    heldout = heldout_vs_s(results)
    if heldout:
        parts += ["\n### Held-out pairs against S, paired\n",
                  "Implicit reward margin of a model on a pair: gamma_model - gamma_S. Reward accuracy: the share of "
                  "pairs whose margin is above 0. Each ± is a standard error; the last row is sdpo minus dpo on the "
                  "same pairs.\n",
                  md_table(["arm", "n", "reward accuracy vs S", "mean margin vs S"],
                           [[arm, str(v["margin"]["n"]), _pm(v["accuracy"], 3), _pm(v["margin"])] for arm, v in heldout.items()])]
    if output is not None and (output / "sdpo" / "manifest.json").is_file():
        data, cross = cross_matrix(output)
        if cross["cells"]:
            parts += ["\n### The sdpo arm's gamma matrix, with the dpo arm's model (DPO) on the same pairs\n",
                      "Mean gamma ± standard error of each model on the first pairs of each dataset, then each model "
                      "minus S on the same pairs (paired mean ± standard error).\n",
                      md_table(["model"] + data, [[label] + [_pm(c.get(d)) for d in data] for label, c in cross["cells"].items()]),
                      "",
                      md_table(["model - S"] + data, [[label] + [_pm(c.get(d)) for d in data] for label, c in cross["vs_S"].items()])]
    if results.get("benchmarks"):
        from .harness import results_table

        header, rows, notes = results_table({label: b["record"] for label, b in results["benchmarks"].items()})
        parts += ["\n### Benchmarks (lm-evaluation-harness): S and each arm's final model\n",
                  "Scores x 100 ± standard error.\n", md_table(header, rows), "", *[f"- {n}" for n in notes]]
    for arm, r in results["arms"].items():
        gm = r.get("gamma_matrix") or {}
        if gm.get("rows"):
            data = list(gm["sample"])
            parts += [f"\n### {arm}: mean gamma of each model on each dataset\n",
                      md_table(["model"] + data, [[m] + [fmt_number((v.get(d) or {}).get("mean"), 2) for d in data] for m, v in gm["rows"].items()])]
    atomic_write_text(path, "\n".join(parts) + "\n")
