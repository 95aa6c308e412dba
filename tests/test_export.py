"""`lora-sdpo export`: the exact layout of the folder, the card as a user reads it, and that the
weights are M_t (merged) or A_t on M_{t-1} (adapter)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import cli
from lora_sdpo.errors import RunError
from lora_sdpo.export import export_run, plan_export
from lora_sdpo.manifest import Manifest
from lora_sdpo.merge import MergeError
from lora_sdpo.shards import model_tensors

TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE.onnxruntime-extensions"}


def _files(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _meta(card: str) -> dict:
    return ModelCard(card).data.to_dict()


def test_merged_export_layout_card_and_weights(two_step_run, tmp_path):
    out = tmp_path / "merged"
    proc = cli("export", str(two_step_run), "--output", str(out))
    assert "exported step 2 (merged, bfloat16)" in proc.stdout
    assert _files(out) == {"model.safetensors", "config.json", "README.md", "recipe.toml", "export.json"} | TOKENIZER
    marker = json.loads((out / "export.json").read_text())
    assert marker["what"] == "merged" and marker["step"] == 2 and marker["dtype"] == "bfloat16"
    assert marker["files"] == {f: (out / f).stat().st_size for f in _files(out) - {"export.json"}}
    assert {t.dtype for t in model_tensors(out).values()} == {"BF16"}
    assert (out / "recipe.toml").read_text() == (two_step_run / "recipe.toml").read_text()

    manifest = json.loads((two_step_run / "manifest.json").read_text())
    card = (out / "README.md").read_text()
    meta = _meta(card)
    assert meta["library_name"] == "transformers" and {"sdpo", "dpo", "lora", "qlora"} <= set(meta["tags"])
    assert "base_model" not in meta  # S is a local folder here, not a Hub id
    for s in manifest["steps"]:  # the per-step table carries the manifest's numbers
        row = next(line for line in card.splitlines() if line.startswith(f"| {s['index']} |"))
        for value in (f"{s['gamma_ref_mean']:.2f}", f"{s['last_loss']:.4f}", f"{s['reward_accuracy']:.2f}", str(s["rows"])):
            assert value in row
    assert "M_2 = S + dW_1 + dW_2" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "[training]" in card  # the recipe

    # The weights are M_2's rounded to bfloat16, tensor for tensor, bit for bit: nothing else.
    exported, m2 = _weights(out), _weights(two_step_run / "step-2" / "model")
    assert exported.keys() == m2.keys()
    assert [k for k in m2 if not torch.equal(exported[k], m2[k].to(torch.bfloat16))] == []
    # Negative controls that the check rejects: M_1 exported in place of M_2 (the step before:
    # its adapted tensors differ even after bf16 rounding), and M_2 with one weight moved by 1%.
    m1 = _weights(two_step_run / "step-1" / "model")
    assert sum(not torch.equal(exported[k], m1[k].to(torch.bfloat16)) for k in m1) > 0
    name = next(k for k in m2 if k.endswith("q_proj.weight"))
    moved = m2[name].clone()
    moved.view(-1)[moved.abs().argmax()] *= 1.01  # more than a bf16 step (0.4-0.8%)
    assert not torch.equal(exported[name], moved.to(torch.bfloat16))
    # and the folder loads as that model: its logits are those of M_2 rounded to bf16, exactly
    ids = torch.randint(0, 32000, (1, 24))
    with torch.no_grad():
        rounded = AutoModelForCausalLM.from_pretrained(two_step_run / "step-2" / "model", dtype=torch.bfloat16).float()
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(loaded(ids).logits, rounded(ids).logits)


def test_adapter_export_applies_to_the_previous_model(two_step_run, tmp_path):
    out = tmp_path / "adapter"
    plan = export_run(two_step_run, out, what="adapter")
    assert plan.step == 2
    assert _files(out) == {
        "adapter_model.safetensors", "adapter_config.json", "previous_adapters/step-1/adapter_model.safetensors",
        "previous_adapters/step-1/adapter_config.json", "README.md", "recipe.toml", "export.json",
    } | TOKENIZER
    card = (out / "README.md").read_text()
    assert "It applies to M_1, not to S" in card and "--step 1 --what merged" in card
    assert "previous_adapters/step-1 --output M_1" in card
    assert _meta(card)["library_name"] == "peft"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None  # M_1 is no Hub model; the run's local path does not travel
    assert str(two_step_run) not in (out / "adapter_config.json").read_text()

    ids = torch.randint(0, 32000, (1, 24))
    with torch.no_grad():
        m2 = AutoModelForCausalLM.from_pretrained(two_step_run / "step-2" / "model", dtype=torch.float32)(ids).logits
        m1 = AutoModelForCausalLM.from_pretrained(two_step_run / "step-1" / "model", dtype=torch.float32)
        on_m1 = PeftModel.from_pretrained(m1, out)(ids).logits
    assert (on_m1 - m2).abs().max() < 1e-3


def test_step_one_adapter_and_refusals(two_step_run, tmp_path):
    plan = plan_export(two_step_run, step=1, what="adapter")
    assert "It applies to S itself" in plan.card and "not to S" not in plan.card
    assert not any(f.path.startswith("previous_adapters") for f in plan.files)
    with pytest.raises(RunError, match="steps 1..2"):
        plan_export(two_step_run, step=3)
    # an export never lands inside the run, nor replaces a folder of something else
    with pytest.raises(MergeError, match="inside the run"):
        export_run(two_step_run, two_step_run / "export")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    proc = cli("export", str(two_step_run), "--output", str(tmp_path / "mine"), "--what", "adapter", check=False)
    assert proc.returncode == 2 and "holds other files" in proc.stderr and "Traceback" not in proc.stderr
    # a pruned M_t (keep_models = "last") is named, with what to do
    pruned = tmp_path / "run"
    shutil.copytree(two_step_run, pruned, ignore=shutil.ignore_patterns("hf_cache"))
    shutil.rmtree(pruned / "step-1" / "model")
    with pytest.raises(RunError, match="pruned"):
        plan_export(pruned, step=1)
    assert plan_export(pruned, step=1, what="adapter").files  # the tokenizer comes from the last M_t


def test_card_metadata_for_a_hub_base(tmp_path):
    """S from the Hub (the run loaded it from a cache snapshot) and Hub datasets reach the card's metadata."""
    from lora_sdpo.card import base_license, model_card

    adapter = tmp_path / "step-1" / "adapter"
    adapter.mkdir(parents=True)
    snapshot = "/home/u/.cache/huggingface/hub/models--teknium--OpenHermes-2.5-Mistral-7B/snapshots/" + "a" * 40
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": snapshot}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("---\nlicense: apache-2.0\ntags: [mistral]\n---\n# OpenHermes\n")
    recipe = '[model]\npath = "teknium/OpenHermes-2.5-Mistral-7B"\n[[steps]]\n[[steps.sources]]\ndataset = "Intel/orca_dpo_pairs"\n'
    m = Manifest.model_validate({
                "base_model": "teknium/OpenHermes-2.5-Mistral-7B", "adapter": {"quantization": "none"}, "status": "done",
                "recipe_sha256": "0" * 64, "steps": [{"index": 1, "status": "done", "sources": ["Intel/orca_dpo_pairs[train]: 100 pairs"], "rows": 100,
                           "gamma_ref_mean": -38.6, "retention": 0.5, "retention_detail": {"reliable": False},
                           "last_loss": 0.5, "reward_accuracy": 0.75}]})
    card = model_card(tmp_path, m, recipe, 1, "adapter", None, base_license(tmp_path / "model"), repo_id="me/x")
    meta = _meta(card)
    assert meta["base_model"] == "teknium/OpenHermes-2.5-Mistral-7B" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["Intel/orca_dpo_pairs"] and "qlora" not in meta["tags"] and meta["library_name"] == "peft"
    assert "not meaningful" in card and "/home/u" not in card and 'PeftModel.from_pretrained(base, "me/x")' in card
    assert 'AutoModelForCausalLM.from_pretrained("teknium/OpenHermes-2.5-Mistral-7B", dtype="auto")' in card
