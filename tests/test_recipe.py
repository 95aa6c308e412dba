"""Recipes: every shipped one parses, bad ones get one clear message (docs/recipes.md's reference: tests/test_docs.py)."""

from __future__ import annotations


import pytest
import torch

from conftest import MODEL, ROOT, ULTRA, cli, cli_here, recipe_toml
from lora_sdpo.recipe import RecipeError, load_recipe, schema_reference

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    from lora_sdpo.zoo import is_fetched

    # recipes/smollm2.toml names the folder `lora-sdpo fetch smollm2` writes; without it, parse it on the pico model
    fetched = path.name != "smollm2.toml" or is_fetched("smollm2")
    loaded = load_recipe(path, [] if fetched else [f"model.path={MODEL}"])
    assert loaded.recipe.steps


def test_shipped_recipes_exist():
    assert {"quickstart.toml", "two_step.toml", "smollm2.toml"} <= {p.name for p in RECIPES}


def test_two_step_is_the_papers_setup():
    r = load_recipe(ROOT / "recipes" / "two_step.toml")
    assert r.adapter.r == 128 and r.adapter.alpha == 128 and r.adapter.dropout == 0.05
    assert r.adapter.quantization == "nf4"
    t = r.recipe.training
    assert (t.beta, t.learning_rate, t.lr_scheduler_type, t.warmup_ratio) == (0.01, 5e-6, "cosine", 0.1)
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 16
    assert t.max_length == 1024 and t.optim == "paged_adamw_32bit" and t.gradient_checkpointing
    assert [s.sources[0].dataset for s in r.recipe.steps] == [
        "Intel/orca_dpo_pairs",
        "argilla/ultrafeedback-binarized-preferences-cleaned",
    ]


def _bad(tmp_path, text: str):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return p


MINIMAL = recipe_toml(ULTRA, adapter=None, settings="")  # the defaults: no adapter key, no settings


def _assert_one_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    err = proc.stderr
    assert err.startswith("error: ")
    for n in needles:
        assert n in err, err


def test_unknown_key_is_named(tmp_path):
    p = _bad(tmp_path, MINIMAL + "\n[training]\nbetta = 0.1\n")
    proc = cli("plan", str(p), check=False)
    _assert_one_clean_error(proc, "training.betta", "unknown key", str(p))
    assert "1 problem" in proc.stderr


def test_wrong_type_is_named(tmp_path):
    p = _bad(tmp_path, MINIMAL + '\n[training]\nlearning_rate = "fast"\n')
    proc = cli("plan", str(p), check=False)
    _assert_one_clean_error(proc, "training.learning_rate", "1 problem")


def test_every_problem_is_reported_at_once(tmp_path):
    p = _bad(tmp_path, MINIMAL + '\n[training]\nbeta = 0\nmax_length = "long"\n[run]\nsed = 1\n')
    proc = cli("plan", str(p), check=False)
    _assert_one_clean_error(proc, "training.beta", "training.max_length", "run.sed", "3 problem")


def test_missing_preset_and_inline_adapter(tmp_path):
    p = _bad(tmp_path, 'adapter = "nope"\n' + MINIMAL)
    _assert_one_clean_error(cli("plan", str(p), check=False), "no preset named 'nope'", "qlora-r16")
    inline = load_recipe(_bad(tmp_path, "[adapter]\nr = 4\nalpha = 8\n" + MINIMAL))
    assert inline.adapter.r == 4 and inline.adapter_source == "inline [adapter]"
    with pytest.raises(RecipeError, match="adapter.r"):
        load_recipe(_bad(tmp_path, '[adapter]\nr = "four"\n' + MINIMAL))


def test_set_overrides(tmp_path):
    p = _bad(tmp_path, MINIMAL)
    r = load_recipe(p, ["training.beta=0.25", "steps.0.sources.0.limit=5", 'run.name="x"'])
    assert r.recipe.training.beta == 0.25 and r.recipe.steps[0].sources[0].limit == 5 and r.recipe.run.name == "x"
    assert "training.beta=0.25" in r.text
    with pytest.raises(RecipeError, match="steps.3"):
        load_recipe(p, ["steps.3.sources.0.limit=5"])


def test_set_overrides_one_field_of_a_named_preset(tmp_path):
    """--set adapter.KEY=VALUE on a recipe naming a preset changes that field only; plan and the manifest's
    settings (LoadedRecipe.effective, LoadedRecipe.adapter) carry the result."""
    quick = ROOT / "recipes" / "quickstart.toml"
    plain = load_recipe(quick)
    r = load_recipe(quick, ["adapter.compute_dtype=bfloat16", "training.precision=bf16"])
    assert plain.adapter.compute_dtype == "float32" and r.adapter.compute_dtype == "bfloat16"
    assert r.adapter.model_dump(exclude={"compute_dtype"}) == plain.adapter.model_dump(exclude={"compute_dtype"})
    assert r.effective["adapter"]["compute_dtype"] == "bfloat16" and r.sha256 != plain.sha256
    assert r.adapter_source.startswith("preset cpu-qlora-r16 (") and r.adapter_source.endswith("with --set adapter.compute_dtype")
    # a later --set adapter=NAME then adapter.KEY: the key applies to the preset named last
    r2 = load_recipe(quick, ["adapter=qlora-r16", "adapter.r=8"])
    assert r2.adapter.r == 8 and r2.adapter.compute_dtype == "bfloat16" and "preset qlora-r16" in r2.adapter_source
    default = load_recipe(_bad(tmp_path, MINIMAL), ["adapter.r=4"])  # no adapter key: the default preset's fields
    assert default.adapter.r == 4 and default.adapter_source.startswith("preset qlora-r16 (")
    assert default.adapter.model_dump(exclude={"r"}) == load_recipe(_bad(tmp_path, MINIMAL)).adapter.model_dump(exclude={"r"})
    with pytest.raises(RecipeError, match="adapter.compute_dtype"):
        load_recipe(quick, ["adapter.compute_dtype=float16"])
    with pytest.raises(RecipeError, match="adapter.rank: unknown key"):
        load_recipe(quick, ["adapter.rank=8"])
    from lora_sdpo.plan import compute_line  # plan's line (the CLI prints it: test_plan_on_quickstart)

    assert compute_line(r.adapter, r.recipe.training).startswith("computes in: bfloat16 (NF4 base dequantised to bfloat16, bf16 autocast")
    assert compute_line(r2.adapter, r2.recipe.training).startswith("computes in: mixed bfloat16/float32")


def test_plan_on_quickstart():
    proc = cli_here("plan", str(ROOT / "recipes" / "quickstart.toml"))
    out = proc.stdout
    assert "step 1: D_1 -> M_1 (reference S)" in out and "step 2: D_2 -> M_2 (reference M_1)" in out
    assert "prompt+chosen tokens: mean" in out
    assert "LoRA parameters: 155,648" in out  # 4 layers x 16 x (in+out) summed over the 7 projections
    assert "peak GPU memory estimate" in out
    assert "held-out eval" in out
    assert "NOT REACHABLE" not in out
    assert "computes in: float32 (NF4 base dequantised to float32, no autocast in training" in out
    assert "LoRA weights in bfloat16 (TRL's QLoRA default)" in out


def test_a_qlora_adapter_is_trained_in_bfloat16_as_plan_says(two_step_run):
    """plan's `computes in:` line names the LoRA weights' dtype: TRL casts a QLoRA adapter to
    bfloat16 even where the base computes in float32 (the shared run's cpu-qlora-r16)."""
    from safetensors.torch import load_file

    weights = load_file(two_step_run / "step-1" / "adapter" / "adapter_model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_plan_on_two_step_offline_says_what_is_not_reachable():
    proc = cli_here("plan", str(ROOT / "recipes" / "two_step.toml"))
    out = proc.stdout
    assert "NOT REACHABLE: model 'teknium/OpenHermes-2.5-Mistral-7B' is not reachable" in out
    assert "HF_HUB_OFFLINE" in out
    assert "Intel/orca_dpo_pairs" in out and "Traceback" not in proc.stderr


def test_schema_reference_names_every_field():
    ref = schema_reference()
    for key in ("beta", "target_init", "max_bad_fraction", "sample_size", "quantization", "keep_models"):
        assert f"`{key}`" in ref


def test_group_by_length_reaches_trl(tmp_path):
    from lora_sdpo.trainer import dpo_config

    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml", ["training.group_by_length=true"])
    args = dpo_config(recipe.step_settings(1), tmp_path)
    # step.py adds the "length" column the sampler reads; TRL would drop it as unused otherwise
    assert args.train_sampling_strategy == "group_by_length" and not args.remove_unused_columns
    args = dpo_config(load_recipe(ROOT / "recipes" / "quickstart.toml").step_settings(1), tmp_path)  # the default: off
    assert args.train_sampling_strategy == "random" and args.remove_unused_columns
