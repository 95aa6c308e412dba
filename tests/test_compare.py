"""The comparison arms differ only in what they should; a real arm runs and is scored on held-out pairs."""

from __future__ import annotations

import json

import pytest

from conftest import MODEL, ULTRA, cli, completion_logp, nf4, short_rows, write_jsonl, write_recipe
from lora_sdpo.compare import arm_recipe
from lora_sdpo.recipe import RecipeError, load_recipe
from lora_sdpo.trainer import dpo_config


def _recipe(tmp_path, data_dir):
    if not (data_dir / "eval.jsonl").exists():  # held out: the 4 short UltraFeedback pairs after the training ones
        write_jsonl(data_dir / "eval.jsonl", short_rows(ULTRA, 16)[12:16])
    return load_recipe(write_recipe(tmp_path, data_dir, extra=f'samples = 0  # report samples: tests/test_generate.py\n[[data.eval]]\npath = "{data_dir / "eval.jsonl"}"\n'))


def _gammas(model_dir, rows_file) -> list[float]:
    from transformers import AutoTokenizer

    from lora_sdpo.data import normalise

    model, tok = nf4(model_dir), AutoTokenizer.from_pretrained(str(MODEL))
    pairs = [normalise(json.loads(line))[1] for line in rows_file.read_text().splitlines()]
    return [completion_logp(model, tok, p["prompt"], p["chosen"], 128) - completion_logp(model, tok, p["prompt"], p["rejected"], 128)
            for p in pairs]


def test_arms_differ_only_in_what_they_should(tmp_path, data_dir):
    base = _recipe(tmp_path, data_dir)
    arms = {a: arm_recipe(base, a) for a in ("dpo", "sdpo", "sdpo-strat", "sdpo-curriculum", "sdpo-base-init")}
    trl = {a: dpo_config(r.step_settings(1), tmp_path / "x").to_dict() for a, r in arms.items()}
    assert all(cfg == trl["sdpo"] for cfg in trl.values())  # same DPO settings given to TRL
    assert all(r.adapter == base.adapter for r in arms.values())
    s = arms["sdpo"].recipe
    assert s.model_dump() == base.recipe.model_dump()
    d = arms["dpo"].recipe
    assert len(d.steps) == 1 and [x.path for x in d.steps[0].sources] == [x.path for st in s.steps for x in st.sources]
    for arm, field, value in (("sdpo-strat", "split", "stratified"), ("sdpo-curriculum", "split", "curriculum")):
        r = arms[arm].recipe
        assert r.data.split == value
        assert r.model_copy(update={"data": s.data}).model_dump() == s.model_dump()
    b = arms["sdpo-base-init"].recipe
    assert b.model.target_init == "base"
    assert b.model_copy(update={"model": s.model}).model_dump() == s.model_dump()
    assert len({r.sha256 for r in arms.values()}) == 5
    with pytest.raises(RecipeError, match="unknown arm"):
        arm_recipe(base, "ppo")


def test_dpo_arm_runs_and_is_scored(tmp_path, data_dir):
    recipe = _recipe(tmp_path, data_dir).path
    out = tmp_path / "cmp"
    proc = cli("compare", str(recipe), "--arms", "dpo", "--output", str(out))
    res = json.loads((out / "comparison.json").read_text())
    r = res["arms"]["dpo"]
    n = sum(len((data_dir / f).read_text().splitlines()) for f in ("orca.jsonl", "ultra.jsonl"))
    assert res["eval_pairs"] == 4 and r["steps"] == 1 and r["pairs"] == n
    assert r["final_train_loss"] is not None
    # The scores, recomputed apart (transformers + bitsandbytes, full logits): the arm's M_1 and S in NF4
    # on the held-out pairs; accuracy = share of pairs whose gamma rose over S's.
    g_s, g_m = _gammas(MODEL, data_dir / "eval.jsonl"), _gammas(out / "dpo" / "step-1" / "model", data_dir / "eval.jsonl")
    rose = [float(m > s) for m, s in zip(g_m, g_s)]
    assert r["pref_accuracy_vs_S"] == sum(rose) / 4
    assert abs(res["base_eval_gamma_mean"] - sum(g_s) / 4) < 1e-3 and abs(r["eval_gamma_mean"] - sum(g_m) / 4) < 1e-3
    # Negative controls, each a wrong result the bounds above reject: chosen and rejected swapped
    # (gammas negated), and S scored in place of the trained model.
    assert abs(r["eval_gamma_mean"] - (-sum(g_m) / 4)) > 1e-2
    assert abs(r["eval_gamma_mean"] - sum(g_s) / 4) > 1e-2
    assert r["pref_accuracy_vs_S"] != sum(float(-m > -s) for m, s in zip(g_m, g_s)) / 4 or sum(rose) == 2
    assert (out / "dpo" / "manifest.json").exists() and f"| dpo | 1 | {n} |" in (out / "comparison.md").read_text()
    assert "| arm | steps | pairs |" in proc.stdout
    again = cli("compare", str(recipe), "--arms", "dpo", "--output", str(out))
    assert "arm dpo: done earlier, skipped" in again.stdout


def test_compare_refuses_trackio_with_several_arms(tmp_path, data_dir):
    """Trackio reads its folder once a process and compare runs every arm in one: refused before any arm runs."""
    from lora_sdpo.compare import run_comparison

    loaded = load_recipe(_recipe(tmp_path, data_dir).path, ['run.report_to=["trackio"]'])
    with pytest.raises(RecipeError, match="compare one arm at a time"):
        run_comparison(loaded, ["sdpo", "dpo"], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
