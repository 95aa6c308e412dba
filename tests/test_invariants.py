"""The invariants of sDPO (docs/design.md, section 2), each checked on a real run by code independent of the pipeline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MODEL, all_tensors, completion_logp as _completion_logp, merge_by_formula, nf4 as _nf4

LN2 = math.log(2)


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


def test_first_loss_of_every_step_is_ln2(two_step_run):
    """The reference of step t is exactly the step's starting model, so the first DPO loss is ln 2."""
    m = manifest(two_step_run)
    assert len(m["steps"]) == 2
    for step in m["steps"]:
        first = json.loads((two_step_run / f"step-{step['index']}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1
        assert abs(first["loss"] - LN2) < 1e-4, (step["index"], first["loss"])
        assert abs(first["rewards/margins"]) < 1e-4
        assert step["first_loss"] == first["loss"]
        # and training moved away from it: the check is not vacuous
        assert step["last_loss"] != pytest.approx(LN2, abs=1e-3)


def test_step2_reference_is_nf4_of_m1(two_step_run):
    """Step 2's cached reference log-probs are those of NF4(M_1) loaded from disk, within 1e-4 plus
    1e-6 of the sum (float32 rounding of a few hundred per-token terms, packed or not)."""
    m1 = two_step_run / "step-1" / "model"
    model = _nf4(m1)
    tok = AutoTokenizer.from_pretrained(str(m1))
    cache = load_file(two_step_run / "step-2" / "data" / "ref_logps.safetensors")
    rows = [json.loads(x) for x in (two_step_run / "step-2" / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == len(cache["chosen"]) > 0
    for i, r in enumerate(rows[:6]):
        c = _completion_logp(model, tok, r["prompt"], r["chosen"], 128)
        j = _completion_logp(model, tok, r["prompt"], r["rejected"], 128)
        assert abs(c - float(cache["chosen"][i])) < 1e-4 + 1e-6 * abs(c), (i, c, float(cache["chosen"][i]))
        assert abs(j - float(cache["rejected"][i])) < 1e-4 + 1e-6 * abs(j), (i, j, float(cache["rejected"][i]))
    # and it is not the reference S would give: the reference really moved to M_1
    s_model = _nf4(MODEL)
    r = rows[0]
    assert abs(_completion_logp(s_model, tok, r["prompt"], r["chosen"], 128) - float(cache["chosen"][0])) > 1e-3


def test_merged_weights_are_base_plus_scaled_lora(two_step_run):
    """M_t = M_{t-1} + (alpha/r) B @ A in float32, for every tensor, recomputed from the saved files."""
    for t, base in ((1, MODEL), (2, two_step_run / "step-1" / "model")):
        expected, changed = merge_by_formula(base, two_step_run / f"step-{t}" / "adapter")
        after = all_tensors(two_step_run / f"step-{t}" / "model")
        assert set(expected) == set(after)
        for name, e in expected.items():
            assert after[name].dtype == torch.float32
            assert torch.equal(after[name], e), name
        assert changed == 4 * 7  # every targeted projection of the 4 layers


def test_one_step_run_equals_plain_trl(tmp_path, data_dir, two_step_run):
    """A one-step sDPO run is plain DPO: on TRL's own path (prefix_sharing = false), the same adapter
    as TRL's DPOTrainer set up by hand, bit for bit; on the pair forward (the default, the shared
    fixture's step 1 on the same data), the same logged losses within 1e-3 at every update."""
    from conftest import cli, write_recipe

    recipe = write_recipe(tmp_path, data_dir, steps=("orca.jsonl",))
    # TRL's own order (random) and TRL's own forward. Its CPU head allocates 512 MB tiles, which glibc
    # maps and unmaps each time (page faults: 40% of this run's CPU); from the heap they are reused.
    cli("run", str(recipe), "--output", str(tmp_path / "run"), "--set", "training.group_by_length=false",
        "--set", "training.prefix_sharing=false", env={"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**32)})
    ours = load_file(tmp_path / "run" / "step-1" / "adapter" / "adapter_model.safetensors")

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in (tmp_path / "run" / "step-1" / "data" / "pairs.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, learning_rate=2e-3, lr_scheduler_type="constant",
        num_train_epochs=1, per_device_train_batch_size=4, max_length=128, optim="adamw_torch",
        gradient_checkpointing=False, bf16=False, logging_steps=1, precompute_ref_log_probs=True,
        save_strategy="no", report_to=[], seed=7, data_seed=7, use_cpu=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    set_seed(7)
    trainer = DPOTrainer(model=_nf4(MODEL), args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    # the LoRA in the dtype the recipe's adapter.lora_dtype = "auto" gives here: TRL's own bfloat16 on a
    # CPU with native bf16 matmuls (nothing cast), float32 elsewhere
    from lora_sdpo.model import cast_lora, lora_dtype
    from lora_sdpo.recipe import AdapterConfig

    cast_lora(trainer.model, lora_dtype(AdapterConfig(), "cpu"))
    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shared = [json.loads(x) for x in (two_step_run / "step-1" / "metrics.jsonl").read_text().splitlines()]
    shared_losses = [r["loss"] for r in shared if "loss" in r and "train_runtime" not in r]
    assert len(shared_losses) == len(trl_losses) >= 3
    assert max(abs(a - b) for a, b in zip(shared_losses, trl_losses)) < 1e-3, (shared_losses, trl_losses)
    assert manifest(two_step_run)["steps"][0]["prefix_sharing"] is True
    trainer.model.save_pretrained(str(tmp_path / "trl_adapter"))
    theirs = load_file(tmp_path / "trl_adapter" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6, rtol=0), k
    assert any(v.abs().max() > 0 for k, v in ours.items() if "lora_B" in k)  # it trained


def test_run_directory_layout_and_manifest(two_step_run):
    m = manifest(two_step_run)
    for key in ("recipe_sha256", "versions", "steps", "status"):
        assert key in m
    assert m["status"] == "done"
    assert {"torch", "transformers", "peft", "trl", "bitsandbytes"} <= set(m["versions"])
    assert (two_step_run / "recipe.toml").is_file()
    for s in m["steps"]:
        for key in ("index", "status", "rows", "first_loss", "gamma_ref_mean", "retention", "adapter", "model", "timings"):
            assert key in s, key
        assert s["status"] == "done"
        step = two_step_run / f"step-{s['index']}"
        assert (step / "adapter" / "adapter_model.safetensors").is_file()
        assert (step / "adapter" / "adapter_config.json").is_file()
        assert (step / "model" / "config.json").is_file()
        assert (step / "model" / "tokenizer.json").is_file()
        assert (step / "data" / "pairs.jsonl").is_file()
        assert (step / "data" / "ref_logps.safetensors").is_file()
        assert (step / "metrics.jsonl").is_file()
        assert s["adapter"] == f"step-{s['index']}/adapter" and s["model"] == f"step-{s['index']}/model"
        assert not list(step.rglob("*.bin")) and not list(step.rglob("*.pt"))
    assert not [p for p in two_step_run.rglob("*") if ".tmp-" in p.name]
    # M_2 loads as a plain transformers model
    AutoModelForCausalLM.from_pretrained(str(two_step_run / "step-2" / "model"))
