"""The comparison arms differ only in what they should; a real arm runs and is scored on held-out pairs."""

from __future__ import annotations

import json

import pytest

from conftest import cli, write_jsonl, short_rows, ULTRA, write_recipe
from lora_sdpo.compare import arm_recipe
from lora_sdpo.recipe import RecipeError, load_recipe
from lora_sdpo.trainer import dpo_config


def _recipe(tmp_path, data_dir):
    if not (data_dir / "eval.jsonl").exists():  # held out: the 4 short UltraFeedback pairs after the training ones
        write_jsonl(data_dir / "eval.jsonl", short_rows(ULTRA, 16)[12:16])
    return load_recipe(write_recipe(tmp_path, data_dir, extra=f'samples = 0  # report samples: tests/test_generate.py\n[[data.eval]]\npath = "{data_dir / "eval.jsonl"}"\n'))


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
    assert 0.0 <= r["pref_accuracy_vs_S"] <= 1.0 and r["final_train_loss"] is not None
    assert (out / "dpo" / "manifest.json").exists() and f"| dpo | 1 | {n} |" in (out / "comparison.md").read_text()
    assert "| arm | steps | pairs |" in proc.stdout
    again = cli("compare", str(recipe), "--arms", "dpo", "--output", str(out))
    assert "arm dpo: done earlier, skipped" in again.stdout
