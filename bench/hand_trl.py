"""The quickstart's two sDPO steps written by hand with TRL + PEFT, the way a user would.

Each step: load the base in 4-bit (NF4, double quantisation), DPOTrainer with a fresh LoRA and a
precomputed reference, train, save the adapter; then PEFT's merge: reload the base in float32,
`PeftModel.from_pretrained(...).merge_and_unload()`, `save_pretrained`; step 2 starts from that.
The settings are recipes/quickstart.toml's (beta 0.1, lr 1e-3 cosine, no warm-up, 2 epochs,
batch 8, max_length 256, adamw_torch, float32 compute; LoRA r 16, alpha 32, dropout 0.05 on every
projection). Not done here and done by lora-sdpo: data checks and normalisation (this reads
already normalised pairs), the gamma matrix, the retention check, the report.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hand_trl.py --data D1.jsonl D2.jsonl --output DIR

Prints one JSON line with the wall time of each part.
"""

import argparse
import gc
import json
import time
from pathlib import Path

t_start = time.perf_counter()

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

t_imports = time.perf_counter() - t_start


def dpo_step(base: str, data: str, out: Path, settings: dict, timings: dict) -> str:
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        ),
    )
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer for an inference kernel without
    # autograd the first time it runs without gradients (the reference pass); training would then
    # get no gradients through the base. Same fix as lora-sdpo's (model.keep_nf4_layers_differentiable).
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    tok = AutoTokenizer.from_pretrained(base)
    dataset = load_dataset("json", data_files=data, split="train")
    timings["load"] = timings.get("load", 0) + time.perf_counter() - t

    t = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(out / "trainer"), precompute_ref_log_probs=True, **settings),
        train_dataset=dataset,
        processing_class=tok,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    timings["reference"] = timings.get("reference", 0) + time.perf_counter() - t
    t = time.perf_counter()
    trainer.train()
    timings["train"] = timings.get("train", 0) + time.perf_counter() - t
    trainer.save_model(str(out / "adapter"))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    timings.setdefault("first_loss", []).append(losses[0])
    del trainer, model
    gc.collect()

    t = time.perf_counter()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(out / "adapter"))
    merged = merged.merge_and_unload()
    merged.save_pretrained(str(out / "merged"))
    tok.save_pretrained(str(out / "merged"))
    del merged
    gc.collect()
    timings["merge"] = timings.get("merge", 0) + time.perf_counter() - t
    return str(out / "merged")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/pico-llama-phi3")
    p.add_argument("--data", nargs="+", required=True, help="one pairs file (prompt/chosen/rejected) per step")
    p.add_argument("--output", required=True)
    p.add_argument("--epochs", type=float, default=2)
    a = p.parse_args()
    settings = dict(
        beta=0.1,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.0,
        num_train_epochs=a.epochs,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_length=256,
        optim="adamw_torch",
        gradient_checkpointing=False,  # TRL's DPOConfig defaults to True
        bf16=False,  # TRL's DPOConfig defaults to True (autocast); the quickstart computes in float32
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        use_cpu=True,
    )
    timings = {"imports": t_imports}
    base = a.model
    for i, data in enumerate(a.data, 1):
        base = dpo_step(base, data, Path(a.output) / f"step-{i}", settings, timings)
    timings["total"] = time.perf_counter() - t_start
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in timings.items()}))


if __name__ == "__main__":
    main()
