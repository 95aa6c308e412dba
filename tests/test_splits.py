"""Split strategies: sizes, seeding, no pair in two steps, stratification per source."""

from __future__ import annotations

import pytest

from conftest import ROOT, cli_here
from lora_sdpo.data import PairSet
from lora_sdpo.recipe import RecipeError, load_recipe
from lora_sdpo.splits import apply_split, composition


def _natural():
    a = [{"prompt": f"a{i}", "chosen": "x", "rejected": "y", "source": "A", "row": i + 1} for i in range(60)]
    b = [{"prompt": f"b{i}", "chosen": "x", "rejected": "y", "source": "B", "row": i + 1} for i in range(30)]
    return [PairSet(rows=a, reports=[]), PairSet(rows=b, reports=[])]


def _ids(ps):
    return [(r["source"], r["row"]) for r in ps.rows]


def test_natural_is_untouched():
    nat = _natural()
    assert apply_split("natural", nat, None, 0) is nat


def test_stratified_sizes_sources_and_seed():
    nat = _natural()
    parts = apply_split("stratified", nat, [1 / 6, 5 / 6], seed=3)
    assert [len(p.rows) for p in parts] == [10 + 5, 50 + 25]
    assert composition(parts[0]) == {"A": 10, "B": 5} and composition(parts[1]) == {"A": 50, "B": 25}
    ids = [i for p in parts for i in _ids(p)]
    assert len(ids) == len(set(ids)) == 90  # every pair exactly once
    again = apply_split("stratified", _natural(), [1 / 6, 5 / 6], seed=3)
    assert [_ids(p) for p in again] == [_ids(p) for p in parts]
    other = apply_split("stratified", _natural(), [1 / 6, 5 / 6], seed=4)
    assert [_ids(p) for p in other] != [_ids(p) for p in parts]


def test_stratified_defaults_to_natural_sizes():
    parts = apply_split("stratified", _natural(), None, seed=0)
    assert [len(p.rows) for p in parts] == [60, 30]
    assert composition(parts[0]) == {"A": 40, "B": 20}


def test_curriculum_easiest_first():
    nat = _natural()
    score = lambda rows: [(-1) ** i * i for i, _ in enumerate(rows)]  # noqa: E731
    parts = apply_split("curriculum", nat, [0.5, 0.5], seed=0, score=score)
    g = [r["gamma_base"] for p in parts for r in p.rows]
    assert g == sorted(g, reverse=True) and len(parts[0].rows) == 45
    ids = [i for p in parts for i in _ids(p)]
    assert len(set(ids)) == 90


def test_fractions_are_validated(tmp_path):
    base = (ROOT / "recipes" / "quickstart.toml").read_text().replace("../", str(ROOT) + "/")
    p = tmp_path / "r.toml"
    p.write_text(base.replace('split = "natural"', 'split = "stratified"\nfractions = [0.5, 0.6]'))
    with pytest.raises(RecipeError, match="sum to 1.1"):
        load_recipe(p)
    p.write_text(base.replace('split = "natural"', 'split = "stratified"\nfractions = [1.0]'))
    with pytest.raises(RecipeError, match="1 entries for 2 steps"):
        load_recipe(p)


def test_plan_shows_stratified_steps(tmp_path):
    base = (ROOT / "recipes" / "quickstart.toml").read_text().replace("../", str(ROOT) + "/")
    p = tmp_path / "r.toml"
    p.write_text(base.replace('split = "natural"', 'split = "stratified"\nfractions = [0.25, 0.75]'))
    out = cli_here("plan", str(p)).stdout
    assert "split: stratified, fractions [0.25, 0.75]" in out
    assert "from " + str(ROOT / "data" / "orca_dpo_pairs" / "validation.jsonl") in out
