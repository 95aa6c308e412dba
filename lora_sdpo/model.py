"""Loading M_t as the 4-bit base of a step, the LoRA of a preset, and sequence log-probs.

NF4 must be quantised from the full-precision weights: transformers casts every tensor to the
`dtype` it is given *before* bitsandbytes quantises it, so loading with dtype=bfloat16 would
round the fp32 chain M_t = S + dW_1 + ... + dW_t to bf16 first and lose most of a small DPO
update (docs/design.md, section 5). We load in float32, let bitsandbytes quantise that, and only
then cast the non-quantised tensors (embeddings, norms, LM head) to the compute dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl.trainer import add_fused_lm_head

from . import pairs
from .errors import ModelError
from .recipe import AdapterConfig
from .trl_compat import DataCollatorForPreference


def quantization_config(adapter: AdapterConfig, quant_storage: str | None = None) -> BitsAndBytesConfig | None:
    if adapter.quantization == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, adapter.compute_dtype),
        # the packed 4-bit values in a float dtype, so that FSDP can shard them (same numbers)
        bnb_4bit_quant_storage=getattr(torch, quant_storage or "uint8"),
    )


def load_base(path: str | Path, adapter: AdapterConfig, revision: str | None = None, trust_remote_code: bool = False,
              quant_storage: str | None = None):
    """M_t as the step's base: NF4 quantised from float32, or unquantised in the compute dtype."""
    compute = getattr(torch, adapter.compute_dtype)
    qc = quantization_config(adapter, quant_storage)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            revision=revision,
            quantization_config=qc,
            dtype=torch.float32 if qc is not None else compute,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            device_map={"": device()},
        )
    except OSError as e:
        raise ModelError(f"model {path}: cannot load ({e})") from None
    if qc is not None:
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.data = p.data.to(compute)
        keep_nf4_layers_differentiable(model)
    model.config.use_cache = False
    return model


def keep_nf4_layers_differentiable(model) -> int:
    """Turn off bitsandbytes' packed CPU inference format on every 4-bit layer.

    On a CPU with AVX512-BF16, a Linear4bit that runs once in eval mode without gradients (the
    reference pass) repacks its weight for an inference kernel, for good: the scales are rounded
    to bf16 (the layer's output moves by ~1e-2) and the kernel has no autograd, so training
    afterwards gets no gradient through the base weights (measured: input grad None). Keeping the
    standard format costs some inference speed and keeps reference and training exact.
    """
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def device() -> str:
    if os.environ.get("LORA_SDPO_DEVICE"):
        return os.environ["LORA_SDPO_DEVICE"]
    # one GPU per process when several run (torchrun's LOCAL_RANK)
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it still has native bfloat16 matmuls.
_BF16_ISA_MARKS = ("BF16", "AMX", "AVX10", "FP16")


def native_bf16(device: str) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX whose oneDNN is not capped below them (ONEDNN_MAX_CPU_ISA). Elsewhere (an
    AVX2-only CPU, an ARM CPU) a bf16 matmul is converted or emulated: under ONEDNN_MAX_CPU_ISA=AVX2
    the quickstart took 148 s with bfloat16 LoRA weights and 120 s with float32 (`lora-sdpo run
    recipes/quickstart.toml --set adapter.lora_dtype=bfloat16|float32`, one idle run each, AMD EPYC)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if cap not in ("", "ALL", "DEFAULT") and not any(m in cap for m in _BF16_ISA_MARKS):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lora_dtype(adapter: AdapterConfig, device: str) -> torch.dtype | None:
    """The dtype the LoRA weights train in, or None to keep what TRL chose (bfloat16 for a 4-bit base,
    after the QLoRA paper; PEFT's float32 otherwise). adapter.lora_dtype = "auto" keeps TRL's choice
    except on a device without native bfloat16, where it trains them in float32."""
    if adapter.lora_dtype == "auto":
        return None if native_bf16(device) else torch.float32
    return getattr(torch, adapter.lora_dtype)


def cast_lora(model, dtype: torch.dtype | None) -> int:
    """Cast the trainable (LoRA) parameters to `dtype` before the optimizer exists; returns how many."""
    if dtype is None:
        return 0
    cast = [p for p in model.parameters() if p.requires_grad and p.dtype != dtype]
    for p in cast:
        p.data = p.data.to(dtype)
    return len(cast)


def lora_config(adapter: AdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        use_rslora=adapter.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_parameter_count(config: dict, adapter: AdapterConfig) -> int:
    """LoRA parameters r * (in + out) per targeted Linear of a Llama/Mistral-style config."""
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    shapes = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(adapter.r * (i + o) for name, (i, o) in shapes.items() if name in adapter.target_modules)
    return per_layer * config["num_hidden_layers"]


@torch.no_grad()
def sequence_logps(model, tokenized: list[dict], pad_token_id: int, max_length: int, batch_size: int = 8,
                   prefix_sharing: bool = True):
    """Summed completion log-probs (chosen, rejected) per pair, through the path training uses:
    lora-sdpo's pair forward (prefix_sharing) or TRL's fused LM head on two rows.

    `tokenized` rows carry TRL's prompt_ids/chosen_ids/rejected_ids; batching, truncation and the
    label mask are TRL's collator's, so the numbers mean exactly what the trainer's do.
    """
    collator = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length)
    # TRL's head goes on the transformers model under any PEFT wrapper, once (the marker is also
    # set by step.py on models TRL has already patched).
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(target, "_lora_sdpo_fused", False):
        add_fused_lm_head(target)
        target._lora_sdpo_fused = True
    pairs.install(target, enabled=prefix_sharing)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(tokenized), batch_size):
        batch = collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in tokenized[i : i + batch_size]])
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=labels.to(device),
            fused_lm_head=True,
            use_cache=False,
        )
        lp = out.log_probs.float().sum(dim=1).cpu()
        c, r = lp.chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)
