"""The memory planner: known shapes, monotonicity, and the 24/40/80 GB verdicts."""

import pytest

from lora_sdpo.plan import GIB, NF4_BYTES, fits, memory_estimate, memory_lines
from lora_sdpo.recipe import AdapterConfig, TrainingConfig

MISTRAL_7B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
)
ZEPHYR = AdapterConfig(r=128, alpha=128, quantization="nf4", double_quant=True, compute_dtype="bfloat16")
TWO_STEP = TrainingConfig(per_device_train_batch_size=4, gradient_accumulation_steps=4, max_length=1024, gradient_checkpointing=True, precision="bf16")


def total(config=MISTRAL_7B, adapter=ZEPHYR, training=TWO_STEP, **kw):
    return sum(memory_estimate(config, adapter, training, **kw).values())


def test_nf4_bytes_per_weight():
    # 4 bits + an fp8 absmax per 64 weights + an fp32 scale per 256 absmax; without double quant an fp32 absmax
    assert NF4_BYTES[True] == pytest.approx(0.51587, abs=1e-5)
    assert NF4_BYTES[False] == 0.5625


def test_known_shapes_mistral_7b():
    parts = memory_estimate(MISTRAL_7B, ZEPHYR, TWO_STEP)
    # 6.98e9 NF4 linear weights + 2 x 32000 x 4096 bf16 embeddings/head
    assert parts["base weights"] / GIB == pytest.approx((6_979_321_856 * NF4_BYTES[True] + 2 * 32000 * 4096 * 2 + 65 * 4096 * 2) / GIB)
    # r 128 on q,k,v,o,gate,up,down of 32 layers: 335,544,320 parameters; TRL keeps a QLoRA adapter
    # and its gradient in bf16 (2 + 2 bytes), paged_adamw_32bit its two moments in fp32 (8 bytes)
    assert parts["LoRA weights, grads, optimizer states"] == 335_544_320 * 12
    assert 12 * GIB < sum(parts.values()) < 20 * GIB


def test_verdicts():
    assert fits(20 * GIB) == {24: True, 40: True, 80: True}
    assert fits(30 * GIB) == {24: False, 40: True, 80: True}
    assert fits(79 * GIB) == {24: False, 40: False, 80: False}
    # the paper's recipe fits one 24 GB card with checkpointing; without it, at batch 4 x 1024, only 80 GB
    assert fits(total())[24]
    assert fits(total(gradient_checkpointing=False)) == {24: False, 40: False, 80: True}


def test_monotone_in_batch_length_rank_and_checkpointing():
    base = total()
    assert total(training=TWO_STEP.model_copy(update={"per_device_train_batch_size": 8})) > base
    assert total(training=TWO_STEP.model_copy(update={"max_length": 2048})) > base
    assert total(adapter=ZEPHYR.model_copy(update={"r": 256})) > base
    assert total(adapter=ZEPHYR.model_copy(update={"double_quant": False})) > base
    assert total(adapter=ZEPHYR.model_copy(update={"quantization": "none"})) > base + 9 * GIB  # bf16: 1.5 bytes more per weight
    assert total(gradient_checkpointing=False) > 3 * base
    assert total(config={**MISTRAL_7B, "num_hidden_layers": 48}) > base


def test_plan_lines_name_both_checkpointing_choices():
    lines = memory_lines(MISTRAL_7B, ZEPHYR, TWO_STEP)
    assert lines[0].startswith("peak GPU memory estimate:") and "24 GB: fits" in lines[0]
    assert "with gradient_checkpointing = false" in lines[-1]


LLAMA_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
)


def test_fsdp_shards_a_70b_nf4_base_over_the_gpus():
    from lora_sdpo.plan import fsdp_load_bytes
    from lora_sdpo.recipe import DistributedConfig

    fsdp = DistributedConfig(strategy="fsdp")
    adapter = ZEPHYR.model_copy(update={"r": 16, "alpha": 32})
    one, two, four = (memory_estimate(LLAMA_70B, adapter, TWO_STEP, processes=n, distributed=fsdp) for n in (1, 2, 4))
    shard = "base weights (a 1/N shard, NF4 scales whole)"
    # 69.5e9 linear weights: the packed 4 bits split N ways, their absmax/scales (1/64 byte + ...) whole
    linear = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    other = 2 * 128256 * 8192 + 161 * 8192
    for n, parts in ((2, two), (4, four)):
        assert parts[shard] == pytest.approx((linear * 0.5 + other * 2) / n + linear * (NF4_BYTES[True] - 0.5))
        assert parts["LoRA weights, grads, optimizer states"] == pytest.approx(one["LoRA weights, grads, optimizer states"] / n)
    assert one["base weights"] / GIB == pytest.approx(36.8, abs=0.1)  # one process: no sharding
    assert sum(one.values()) > sum(two.values()) > sum(four.values())
    # loading: each process first holds the whole 4-bit base (accelerate shards it after), and the verdicts count it
    assert fsdp_load_bytes(LLAMA_70B, adapter) / GIB == pytest.approx(37.4, abs=0.1)
    lines = {n: memory_lines(LLAMA_70B, adapter, TWO_STEP, n, fsdp) for n in (1, 2, 4)}
    assert lines[1][0].endswith("(24 GB: does not fit; 40 GB: does not fit; 80 GB: fits)")
    assert lines[2][0].startswith("peak GPU memory estimate per process (2 processes, fsdp): 39.5 GiB")
    assert lines[2][0].endswith("(24 GB: does not fit; 40 GB: does not fit; 80 GB: fits)")
    assert lines[4][0].endswith("(24 GB: does not fit; 40 GB: fits; 80 GB: fits)")
    assert any("loading, before FSDP shards it" in line for line in lines[4])
    # at batch 1 x 16 accumulated the sharded training peak fits a 24 GB card, and the load is what does not
    small = TWO_STEP.model_copy(update={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16})
    assert fits(sum(memory_estimate(LLAMA_70B, adapter, small, processes=4, distributed=fsdp).values()))[24]
    assert "24 GB: does not fit" in memory_lines(LLAMA_70B, adapter, small, 4, fsdp)[0]
