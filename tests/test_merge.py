"""The streamed merge equals PEFT's merge_and_unload, across rank/alpha patterns, rsLoRA and shards."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import cli
from lora_sdpo.merge import MergeError, merge_lora


def _tiny(tmp_path, shard="60KB"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size=shard)
    return model, base


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"down_proj": 3.0}},
        {"use_rslora": True},
    ],
    ids=["plain", "patterns", "rslora"],
)
def test_streamed_merge_equals_peft(tmp_path, extra):
    model, base = _tiny(tmp_path)
    assert (base / "model.safetensors.index.json").exists()  # a multi-shard base
    lc = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, lc)
    peft_model.save_pretrained(tmp_path / "adapter")
    reference = peft_model.merge_and_unload().state_dict()

    out = tmp_path / "merged"
    res = merge_lora(base, tmp_path / "adapter", out, dtype="float32", max_shard_size="40KB")
    assert res["merged"] == 2 * 3
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, w in merged.state_dict().items():
        assert torch.allclose(w, reference[name], atol=1e-6, rtol=0), name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        diff = (merged(ids).logits - model(ids).logits).abs().max()
    assert diff < 1e-4
    assert (out / "model.safetensors.index.json").exists()


def test_merge_cli_bf16_and_refusals(tmp_path):
    model, base = _tiny(tmp_path, shard="10MB")
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, lc).save_pretrained(tmp_path / "adapter")
    proc = cli("merge", str(base), str(tmp_path / "adapter"), "--output", str(tmp_path / "m"))
    assert "merged 2 weights" in proc.stdout
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    # writing into the base folder is refused, and nothing is written there
    before = sorted(p.name for p in base.iterdir())
    proc = cli("merge", str(base), str(tmp_path / "adapter"), "--output", str(base / "out"), check=False)
    assert proc.returncode == 2 and "inside the base model folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in base.iterdir()) == before
    # DoRA cannot be merged by adding B @ A
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="DoRA"):
        merge_lora(base, tmp_path / "adapter", tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
