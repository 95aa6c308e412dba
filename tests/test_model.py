"""Loading M_t as NF4: quantised from float32, and still differentiable after a reference pass."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from conftest import MODEL
from lora_sdpo.model import load_base
from lora_sdpo.recipe import AdapterConfig


def _lora_grads(eval_pass_first: bool) -> dict:
    torch.manual_seed(0)
    model = load_base(MODEL, AdapterConfig(compute_dtype="float32"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = torch.randint(0, 32000, (2, 32))
    if eval_pass_first:  # what the reference pass does before training
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_through_nf4_layers_survive_the_reference_pass():
    """bitsandbytes repacks CPU NF4 layers for a kernel without autograd after a no-grad eval pass."""
    before, after = _lora_grads(False), _lora_grads(True)
    assert before.keys() == after.keys() and len(before) == 2 * 4 * 2
    for name in before:
        assert after[name] is not None, f"{name}: no gradient after the reference pass"
        assert torch.equal(before[name], after[name]), name


def test_nf4_is_quantised_from_float32(tmp_path):
    """Loading must not round the fp32 chain to bf16 before quantising (transformers casts first)."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    w = fp32.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():  # an update that bf16 cannot hold
        w += 1e-4 * torch.randn_like(w) * w.abs().mean()
    fp32.save_pretrained(tmp_path / "m")
    saved = load_file(tmp_path / "m" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert saved.dtype == torch.float32

    model = load_base(tmp_path / "m", AdapterConfig(compute_dtype="bfloat16"))
    lin = model.model.layers[0].mlp.up_proj
    ours = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    direct = F.dequantize_4bit(*F.quantize_4bit(saved, quant_type="nf4", compress_statistics=True)).float()
    via_bf16 = F.dequantize_4bit(*F.quantize_4bit(saved.bfloat16(), quant_type="nf4", compress_statistics=True)).float()
    assert torch.equal(ours, direct)
    assert not torch.equal(ours, via_bf16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # non-quantised tensors in the compute dtype
