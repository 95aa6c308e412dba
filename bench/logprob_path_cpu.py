"""Time one forward and backward of the shipped pico model through TRL's fused LM head vs full logits.

A first look for issue 8 (the full benchmark is not written yet): on a model this small the
32k-vocabulary LM head dominates, so this shows what the fused, chunked head costs on a CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/logprob_path_cpu.py [--quantization nf4|none]
"""

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

from lora_sdpo.model import load_base
from lora_sdpo.recipe import AdapterConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/pico-llama-phi3")
    p.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    model = load_base(a.model, AdapterConfig(quantization=a.quantization, compute_dtype="float32"))
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, 32000, (a.batch, a.seq))
    print(f"threads {torch.get_num_threads()}, {a.batch}x{a.seq} tokens, base {a.quantization}")
    for fused in (True, False):
        fwd, bwd = [], []
        for _ in range(a.repeats):
            t = time.perf_counter()
            if fused:
                loss = -model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.sum()
            else:
                logits = model(input_ids=ids).logits.float()
                loss = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum()
            t1 = time.perf_counter()
            loss.backward()
            fwd.append(t1 - t)
            bwd.append(time.perf_counter() - t1)
        # the first repeat warms up; report the best of the rest
        print(f"{'fused LM head' if fused else 'full logits  '}: forward {min(fwd[1:]):.2f}s  backward {min(bwd[1:]):.2f}s")


if __name__ == "__main__":
    main()
