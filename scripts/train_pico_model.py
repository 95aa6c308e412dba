#!/usr/bin/env python
"""Train the tiny Llama-architecture model shipped for the quickstart (models/pico-llama-phi3).

The model only has to be a real, loadable causal LM that speaks the phi-3 chat format a
little, so the DPO quickstart and tests have something meaningful to optimise on CPU.
Run from the repository root:  HF_HUB_OFFLINE=1 python scripts/train_pico_model.py
"""
import argparse
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything it needs ships in the repo

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          get_cosine_schedule_with_warmup)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="models/pico-llama-phi3", help="also where the tokenizer files are read from")
    p.add_argument("--uf-train", default="data/ultrafeedback/train_clean.jsonl")
    p.add_argument("--uf-eval", default="data/ultrafeedback/eval_clean.jsonl", help="held out, never trained on")
    p.add_argument("--orca", default="data/orca_dpo_pairs/validation.jsonl")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="blocks per optimiser step")
    p.add_argument("--steps", type=int, default=440)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def render(tok, messages):
    return tok.apply_chat_template(messages, tokenize=False)

def training_texts(tok, args):
    # Both sides of every preference pair: the model should be able to produce either, so
    # DPO later has a non-degenerate reference policy to move away from.
    texts = []
    for r in read_jsonl(args.uf_train):
        for side in ("chosen", "rejected"):
            texts.append(render(tok, [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r[side]}]))
    for r in read_jsonl(args.orca):
        for side in ("preferred_output", "non_preferred_output"):
            texts.append(render(tok, r["input"]["messages"] + r[side]))
    return texts


def pack(tok, texts, block_size, keep_tail):
    # The chat template ends every conversation with <|endoftext|>, which serves as separator.
    ids = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    if blocks and len(blocks[-1]) < (block_size if not keep_tail else 2):
        blocks.pop()
    return ids, blocks


@torch.no_grad()
def heldout_loss(model, blocks):
    # One block at a time so the short tail block needs no padding; weight by predicted tokens.
    total = 0.0
    for b in blocks:
        x = torch.tensor([b])
        total += model(input_ids=x, labels=x).loss.item() * (len(b) - 1)
    return total / sum(len(b) - 1 for b in blocks)


def main():
    args = parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print("settings:", json.dumps(vars(args), indent=1))
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.out)
    vocab = math.ceil(len(tok) / 64) * 64  # 32011 -> 32064, keeps the embedding matmul aligned
    texts = training_texts(tok, args)
    random.shuffle(texts)  # so chosen/rejected twins don't always share a block
    train_ids, train_blocks = pack(tok, texts, args.block_size, keep_tail=False)
    eval_texts = [render(tok, [{"role": "user", "content": r["prompt"]},
                               {"role": "assistant", "content": r["chosen"]}]) for r in read_jsonl(args.uf_eval)]
    _, eval_blocks = pack(tok, eval_texts, args.block_size, keep_tail=True)
    print(f"train: {len(texts)} conversations, {len(train_ids)} tokens, {len(train_blocks)} blocks; "
          f"held-out: {len(eval_texts)} conversations, {len(eval_blocks)} blocks")

    # Baselines on exactly the tokens the model is scored on (every block token but the first).
    eval_targets = [t for b in eval_blocks for t in b[1:]]
    counts = Counter(train_ids)
    denom = len(train_ids) + vocab  # add-one smoothing over the full (padded) vocabulary
    unigram = -sum(math.log((counts[t] + 1) / denom) for t in eval_targets) / len(eval_targets)
    uniform = math.log(vocab)

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=384, max_position_embeddings=1024,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)  # fp32 on CPU
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,} (vocab {vocab})")

    # No decay on norms: decaying RMSNorm gains toward 0 only hurts such a small model.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    data = torch.tensor(train_blocks)
    order, cursor = torch.randperm(len(data)), 0
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):  # next epoch, freshly shuffled
            order, cursor = torch.randperm(len(data)), 0
        x = data[order[cursor:cursor + args.batch_size]]
        cursor += args.batch_size
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el:.0f}s ({el / step:.2f}s/step)", flush=True)
    train_time = time.time() - t0
    heldout = heldout_loss(model.eval(), eval_blocks)
    epochs = args.steps * args.batch_size / len(train_blocks)
    print(f"held-out loss {heldout:.4f} nats/token | unigram {unigram:.4f} | uniform ln({vocab}) {uniform:.4f}")
    print(f"trained {args.steps} steps ({epochs:.2f} epochs) in {train_time:.0f}s")

    # bf16 halves the shipped size; the tests load it in whatever dtype they need.
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    # Stop at the end of the assistant turn (<|end|>) as well as at <|endoftext|>.
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    model.save_pretrained(args.out, safe_serialization=True)

    # Round trip through the public loader, exactly as users will load it.
    loaded = AutoModelForCausalLM.from_pretrained(args.out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How do I cook rice?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.generate(**prompt, max_new_tokens=40, do_sample=False)
    sample = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=False)
    print("greedy sample:", repr(sample))

    metrics = {"heldout_loss": round(heldout, 4), "unigram_baseline": round(unigram, 4),
               "uniform_baseline": round(uniform, 4), "heldout_tokens": len(eval_targets),
               "train_tokens": len(train_ids), "train_blocks": len(train_blocks), "steps": args.steps,
               "epochs": round(epochs, 3), "train_seconds": round(train_time, 1), "parameters": n_params,
               "command": command, "settings": vars(args), "greedy_sample": sample}
    with open(os.path.join(args.out, "training_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(MODEL_CARD.format(n_params=n_params, vocab=vocab, **metrics,
                                  **{k: v for k, v in vars(args).items() if k != "steps"},
                                  minutes=train_time / 60, n_train=len(texts)))


MODEL_CARD = """# pico-llama-phi3

A {n_params:,}-parameter Llama-architecture causal LM trained from scratch on CPU, shipped so the
lora-sdpo quickstart and tests have a real model to run DPO on. It writes English-looking text
in the phi-3 chat format; it is not useful as an assistant.

## Architecture

`LlamaForCausalLM`: hidden_size 128, 4 layers, 4 attention heads (head_dim 32), 2 key/value heads,
intermediate_size 384, max_position_embeddings 1024, vocab_size {vocab} (the tokenizer's 32,011
tokens rounded up to a multiple of 64), tied input/output embeddings, rms_norm_eps 1e-5.
Every Linear has out_features divisible by 32 (bitsandbytes' CPU NF4 kernel needs this).
Weights are stored in bfloat16. bos `<s>` (1), eos = pad `<|endoftext|>` (32000); generation also
stops at `<|end|>` (32007).

Tokenizer: phi-3-mini's (`tokenizer.json`, `tokenizer_config.json` with its chat template), MIT,
see `LICENSE.onnxruntime-extensions` and the repository's NOTICE.md.

## Training data

{n_train} conversations rendered with the chat template: each of the 1,000 rows of
`data/ultrafeedback/train_clean.jsonl` as user prompt + chosen and as user prompt + rejected, and
each of the 284 rows of `data/orca_dpo_pairs/validation.jsonl` as its system/user messages +
preferred and + non-preferred output ({train_tokens:,} tokens, packed into {train_blocks} blocks of
{block_size}). `data/ultrafeedback/eval_clean.jsonl` is held out and never trained on.

## Training

    HF_HUB_OFFLINE=1 {command}

AdamW (lr {lr}, betas 0.9/0.95, weight decay {weight_decay}), cosine schedule with {warmup} warmup
steps, {batch_size} blocks per step, gradient clipping 1.0, fp32, {threads} CPU threads, seed {seed}.
{steps} steps ({epochs} epochs) took {train_seconds} s ({minutes:.1f} min) of training time.

## Evaluation (held-out `eval_clean.jsonl`, prompt + chosen, {heldout_tokens:,} tokens)

| | nats/token |
|---|---|
| this model | {heldout_loss} |
| unigram baseline (training token frequencies, add-one smoothed) | {unigram_baseline} |
| uniform baseline ln({vocab}) | {uniform_baseline} |

Greedy continuation of "How do I cook rice?": `{greedy_sample!r}`
"""

if __name__ == "__main__":
    main()
