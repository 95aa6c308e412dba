"""The streamed merge equals PEFT's merge_and_unload and base + scale * B @ A recomputed from the files,
across rank/alpha patterns, rsLoRA, modules_to_save, LoRA on lm_head and embeddings, tied embeddings,
multi-shard bases, and the NF4 round-trip merge base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import cli, nf4
from lora_sdpo.merge import MergeError, merge_lora, nf4_roundtrip
from lora_sdpo.shards import model_tensors, read_tensor


def _tiny(tmp_path, shard="60KB", tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size=shard)
    return model, base


def _adapter(model, config, path):
    """A random LoRA (B != 0) whose modules_to_save copies differ from the base, saved to `path`."""
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return peft_model


def _same_logits(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal to float32 rounding, relative to the logits' scale (random tiny models have large logits)."""
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    return {name: read_tensor(info) for name, info in model_tensors(folder).items()}


def _recomputed(base, adapter) -> dict[str, torch.Tensor]:
    """base + (alpha/r) B @ A from the files alone (an independent reading of PEFT's format)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    w = {k: v.float() for k, v in _all_tensors(base).items()}
    ad = {k.removeprefix("base_model.model."): v.float() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    for key, a in ad.items():
        if ".lora_A." in key or key.endswith("lora_embedding_A"):
            emb = key.endswith("lora_embedding_A")
            module = key.removesuffix(".lora_embedding_A") if emb else key.split(".lora_A.")[0]
            b = ad[module + (".lora_embedding_B" if emb else ".lora_B.weight")]
            r = next((v for p, v in cfg["rank_pattern"].items() if module.endswith(p)), cfg["r"])
            alpha = next((v for p, v in cfg["alpha_pattern"].items() if module.endswith(p)), cfg["lora_alpha"])
            scale = alpha / r**0.5 if cfg["use_rslora"] else alpha / r
            d = scale * (b @ a)
            w[module + ".weight"] += d.T if emb else d
    for key, t in ad.items():  # modules_to_save: the trained copy replaces the base tensor
        if "lora_" not in key and ".base_layer." not in key:
            w[key] = t
    return w


CASES = {
    "plain": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"q_proj": 4, "layers.1.self_attn.v_proj": 2},
                     alpha_pattern={"down_proj": 3.0}),
    "rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]),
    "lm_head_and_embedding": dict(target_modules=["q_proj", "embed_tokens", "lm_head"], rank_pattern={"embed_tokens": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_equals_peft_and_the_formula(tmp_path, case):
    model, base = _tiny(tmp_path)
    assert (base / "model.safetensors.index.json").exists()  # a multi-shard base
    peft_model = _adapter(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **CASES[case]), tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    reference = peft_model.merge_and_unload().state_dict()

    out = tmp_path / "merged"
    merge_lora(base, tmp_path / "adapter", out, dtype="float32", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()
    mine = _all_tensors(out)
    formula = _recomputed(base, tmp_path / "adapter")
    assert set(mine) == set(formula)
    for name, w in mine.items():
        assert torch.allclose(w, reference[name], atol=1e-6, rtol=0), f"{name} differs from merge_and_unload"
        assert torch.allclose(w, formula[name], atol=1e-6, rtol=0), f"{name} differs from base + scale * B @ A"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert _same_logits(merged(ids).logits, adapter_logits)


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D stores weights transposed; PEFT's fan_in_fan_out transposes the delta."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    reference = pm.merge_and_unload().state_dict()
    merge_lora(tmp_path / "base", tmp_path / "adapter", tmp_path / "m", dtype="float32")
    for name, w in _all_tensors(tmp_path / "m").items():
        assert torch.allclose(w, reference[name], atol=1e-6), name


TIED = {  # LoraConfig, whether the output is untied, whether PEFT's merge_and_unload gets it wrong
    "embedding_only": (dict(target_modules=["q_proj", "embed_tokens"]), True, True),
    "lm_head_only": (dict(target_modules=["lm_head"]), True, True),
    "lm_head_trained_copy": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True, False),
    "ensure_weight_tying": (dict(target_modules=["embed_tokens"], ensure_weight_tying=True), False, True),
}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_embeddings_keep_what_the_adapter_computed(tmp_path, case):
    """A tied base stores no lm_head. The merged model must compute what the adapter model computed:
    an update to only one of the tied pair unties them; a shared update (ensure_weight_tying) keeps them tied.
    (PEFT's merge_and_unload adds the delta to the shared tensor, changing both; not what was trained.)"""
    model, base = _tiny(tmp_path, shard="10MB", tie=True)
    assert "lm_head.weight" not in model_tensors(base)
    kwargs, untie, peft_wrong = TIED[case]
    pm = _adapter(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs), tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = pm(ids).logits
    res = merge_lora(base, tmp_path / "adapter", tmp_path / "m", dtype="float32")
    assert res["untied"] is untie
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is (not untie)
    assert ("lm_head.weight" in model_tensors(tmp_path / "m")) is untie
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert _same_logits(merged(ids).logits, expected)
        assert _same_logits(pm.merge_and_unload()(ids).logits, expected) is not peft_wrong


def test_nf4_roundtrip_merge_base_equals_the_qlora_model(tmp_path):
    """--merge-base nf4-roundtrip adds the delta to dequant(NF4(W)): with every Linear targeted, the
    merged model is the 4-bit + adapter model it was trained as, in full precision."""
    model, base = _tiny(tmp_path, shard="10MB")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    qlora = PeftModel.from_pretrained(nf4(base), tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = qlora(ids).logits
    logits = {}
    for merge_base in ("original", "nf4-roundtrip"):
        out = tmp_path / merge_base
        merge_lora(base, tmp_path / "adapter", out, dtype="float32", merge_base=merge_base)
        with torch.no_grad():
            logits[merge_base] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    w = read_tensor(model_tensors(base)["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(nf4_roundtrip(w), w)
    assert _same_logits(logits["nf4-roundtrip"], expected)
    assert (logits["original"] - expected).abs().max() > 100 * (logits["nf4-roundtrip"] - expected).abs().max()


def test_merge_cli_bf16_and_refusals(tmp_path):
    model, base = _tiny(tmp_path, shard="10MB")
    lc = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(model, lc).save_pretrained(tmp_path / "adapter")
    proc = cli("merge", str(base), str(tmp_path / "adapter"), "--output", str(tmp_path / "m"), "--max-shard-size", "100KB")
    assert "merged 2 weights" in proc.stdout
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert all(t.dtype == "BF16" for t in model_tensors(tmp_path / "m").values())
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # writing into the base folder is refused, and nothing is written there
    before = sorted(p.name for p in base.iterdir())
    proc = cli("merge", str(base), str(tmp_path / "adapter"), "--output", str(base / "out"), check=False)
    assert proc.returncode == 2 and "inside the base model folder" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in base.iterdir()) == before
    # a folder of something else is not replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(MergeError, match="holds other files"):
        merge_lora(base, tmp_path / "adapter", tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # DoRA and LoRA biases cannot be merged by adding B @ A
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, match in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        cfg_path.write_text(json.dumps({**cfg, key: True}))
        with pytest.raises(MergeError, match=match):
            merge_lora(base, tmp_path / "adapter", tmp_path / "m2")
        assert not (tmp_path / "m2").exists()


def test_adapter_for_another_model_is_refused(tmp_path):
    model, base = _tiny(tmp_path, shard="10MB")
    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(tmp_path / "resized")
    with pytest.raises(MergeError, match="resized vocabulary"):
        merge_lora(base, tmp_path / "resized", tmp_path / "m")
    deeper = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(deeper, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "deeper")
    proc = cli("merge", str(base), str(tmp_path / "deeper"), "--output", str(tmp_path / "m"), check=False)
    assert proc.returncode == 2 and "not in the base" in proc.stderr and "layers.2" in proc.stderr
    assert not (tmp_path / "m").exists()
