"""adapter.lora_dtype: the LoRA weights train in bfloat16 (TRL's QLoRA default) only where the device
multiplies bfloat16 natively; on an AVX2-only CPU a bfloat16 matmul is emulated and several times
slower than float32, so "auto" trains them in float32 there."""

from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open

from conftest import ORCA, ULTRA, cli, short_rows, write_jsonl, write_recipe
from lora_sdpo.model import cast_lora, lora_dtype, native_bf16
from lora_sdpo.recipe import AdapterConfig


def _cpu_has_bf16() -> bool:
    flags = next(line for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")).split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def test_auto_follows_the_instruction_set(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped as on an AVX2-only CPU
    assert native_bf16("cpu") is False
    assert lora_dtype(AdapterConfig(), "cpu") == torch.float32
    assert lora_dtype(AdapterConfig(lora_dtype="bfloat16"), "cpu") == torch.bfloat16  # asked for: kept
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16("cpu") is _cpu_has_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert native_bf16("cpu") is _cpu_has_bf16()
    assert lora_dtype(AdapterConfig(), "cpu") == (None if _cpu_has_bf16() else torch.float32)  # None: TRL's choice stays
    assert lora_dtype(AdapterConfig(lora_dtype="float32"), "cpu") == torch.float32


def test_cast_touches_the_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].weight.requires_grad_(False)
    assert cast_lora(model, torch.float32) == 3  # the second layer's weight and both biases
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    assert cast_lora(model, None) == 0 and cast_lora(model, torch.float32) == 0


def _adapter_dtypes(run, step: int) -> set:
    with safe_open(run / f"step-{step}" / "adapter" / "adapter_model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_run_trains_and_saves_the_lora_in_the_chosen_dtype(tmp_path, two_step_run):
    """The shared run (auto) saved TRL's bfloat16 adapters where this CPU has native bf16, float32
    elsewhere; a run with lora_dtype = "float32" trains and saves float32, and still starts at ln 2."""
    assert _adapter_dtypes(two_step_run, 1) == ({"BF16"} if _cpu_has_bf16() else {"F32"})
    write_jsonl(tmp_path / "orca.jsonl", short_rows(ORCA, 4))
    write_jsonl(tmp_path / "ultra.jsonl", short_rows(ULTRA, 4))
    run = tmp_path / "run"
    cli("run", str(write_recipe(tmp_path, tmp_path, steps=("orca.jsonl",))), "--output", str(run),
        "--set", "adapter.lora_dtype=float32", "--set", "retention.sample_size=4")
    assert _adapter_dtypes(run, 1) == {"F32"}
    first = json.loads((run / "step-1" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-6
