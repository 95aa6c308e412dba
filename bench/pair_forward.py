"""Training throughput of the pair forward against TRL's two-row forward, side by side in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/pair_forward.py [--hidden 1024 --layers 8 --rounds 2 --batches 1]

A random-initialised Llama (hidden 1024, 8 layers, intermediate 2816, 16 heads, the phi-3
vocabulary of the shipped tokenizer: the backbone is about three quarters of the FLOPs), loaded the
way lora-sdpo loads a step's base (NF4 quantised from float32, float32 compute) with a LoRA r16 on
every projection. The shipped Orca and UltraFeedback pairs are tokenised with TRL's helpers at
max_length 1024 and cut into batches of 8 pairs three ways:

- pairs: lora-sdpo's pair forward (training.prefix_sharing = true), batches in random order;
- trl-grouped: TRL's own forward on length-grouped batches (lora-sdpo's TRL path with
  training.group_by_length = true);
- trl-random: TRL's own forward on random batches (plain TRL defaults).

Every arm runs the same DPO loss (TRL's sigmoid form against precomputed reference log-probs)
forward and backward on its batches; the arms alternate batch by batch (A, B, C, A, B, C, ...).
Besides the whole step it times the backbone alone (forward + backward of the decoder layers,
the head's input gradient replaced by a constant) and the LM head alone (forward + backward of
the scored positions' log-probs from fixed hidden states), and the reference pass (a no-grad
forward with the adapter off). Prints pairs/s and the ratios, and the token accounting
(backbone tokens per pair) of the batches it ran.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PICO = ROOT / "models" / "pico-llama-phi3"
DATA = {"orca": ROOT / "data" / "orca_dpo_pairs" / "validation.jsonl", "ultrafeedback": ROOT / "data" / "ultrafeedback" / "train_clean.jsonl"}


def build_model(folder: Path, hidden: int, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=32000, eos_token_id=32000)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(PICO)).save_pretrained(folder)


def tokenised(name: str, tok, max_length: int, limit: int) -> list[dict]:
    from lora_sdpo.data import normalise, tokenize_pair

    out = []
    for line in DATA[name].read_text().splitlines():
        _, pair, problem = normalise(json.loads(line))
        if problem is None:
            t = tokenize_pair(pair, tok)
            if len(t["prompt_ids"]) < max_length:  # lora-sdpo drops prompts that fill max_length
                out.append(t)
        if len(out) == limit:
            break
    return out


def batches(rows: list[dict], arm: str, batch: int, max_length: int, seed: int) -> list[list[int]]:
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(seed)
    if arm == "trl-grouped":
        widths = [min(max_length, len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))) for r in rows]
        order = get_length_grouped_indices(widths, batch, generator=g)
    else:
        order = torch.randperm(len(rows), generator=g).tolist()
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A, B, C")
    ap.add_argument("--batches", type=int, default=1, help="batches per arm per round and dataset")
    ap.add_argument("--data", default="orca,ultrafeedback")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, add_fused_lm_head

    from lora_sdpo import pairs
    from lora_sdpo.model import keep_nf4_layers_differentiable, load_base, load_tokenizer
    from lora_sdpo.recipe import AdapterConfig

    work = Path(tempfile.mkdtemp(prefix="pair-bench-"))
    build_model(work / "model", args.hidden, args.layers)
    tok = load_tokenizer(work / "model")
    model = load_base(work / "model", AdapterConfig(quantization="nf4", compute_dtype="float32"))
    keep_nf4_layers_differentiable(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    pairs.install(model)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.train()
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=args.max_length)
    arms = ["pairs", "trl-grouped", "trl-random"]
    need = args.rounds * args.batches
    results = {}

    for name in args.data.split(","):
        rows = tokenised(name, tok, args.max_length, 100000)
        plan = {a: batches(rows, a, args.batch, args.max_length, seed=1)[:need] for a in arms}
        # the token accounting of all the arm's batches of one epoch (not only the timed ones)
        epoch = {a: batches(rows, a, args.batch, args.max_length, seed=1) for a in arms}
        acct = {}
        for a in arms:
            two_row = backbone = completion = 0
            for b in epoch[a]:
                x = collate([{k: rows[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in b])
                segs = pairs.pair_segments(x["input_ids"], x["attention_mask"])
                two_row += x["input_ids"].numel()
                backbone += sum(p + q + r for p, q, r in segs) if a == "pairs" else x["input_ids"].numel()
                completion += int(x["completion_mask"].sum())
            n = len(epoch[a]) * args.batch
            acct[a] = {"backbone_per_pair": backbone / n, "two_row_per_pair": two_row / n, "completion_per_pair": completion / n}
        times = {a: {"step": [], "backbone": [], "head": [], "reference": [], "pairs": 0} for a in arms}
        for rnd in range(args.rounds):
            for k in range(args.batches):
                for a in arms:
                    b = plan[a][rnd * args.batches + k]
                    x = collate([{k2: rows[i][k2] for k2 in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in b])
                    labels = x["input_ids"].masked_fill(x["completion_mask"] == 0, -100)
                    model._lora_sdpo_pairs.enabled = a == "pairs"
                    model.config._attn_implementation = pairs.ATTENTION if a == "pairs" else "sdpa"
                    kw = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=labels, fused_lm_head=True)
                    # reference pass
                    t = time.perf_counter()
                    with torch.no_grad(), peft.disable_adapter():
                        ref = peft(**kw).log_probs.sum(1)
                    times[a]["reference"].append(time.perf_counter() - t)
                    ref_c, ref_r = ref.chunk(2)
                    # whole training step: DPO loss forward + backward
                    peft.zero_grad(set_to_none=True)
                    t = time.perf_counter()
                    c, r = peft(**kw).log_probs.sum(1).chunk(2)
                    loss = -F.logsigmoid(0.1 * ((c - ref_c) - (r - ref_r))).mean()
                    loss.backward()
                    times[a]["step"].append(time.perf_counter() - t)
                    # the backbone alone, and the head alone
                    peft.zero_grad(set_to_none=True)
                    mask = labels[:, 1:] != -100
                    t = time.perf_counter()
                    if a == "pairs":
                        segs = pairs.pair_segments(x["input_ids"], x["attention_mask"])
                        packs, starts = pairs.pack(x["input_ids"], segs)
                        h = pairs.backbone_hidden(model, packs)
                        _, idx = pairs.gather_index(labels, segs, starts)
                        h = h[idx]
                    else:
                        h = peft.base_model.model.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state[:, :-1]
                        h = h.reshape(-1, h.shape[-1])
                    h.backward(torch.full_like(h, 1e-3))
                    times[a]["backbone"].append(time.perf_counter() - t)
                    hh = h.detach().requires_grad_(True)
                    w = model.lm_head.weight
                    targets = labels[:, 1:][mask] if a == "pairs" else labels[:, 1:].clamp(min=0).reshape(-1)
                    chunk = pairs.vocab_tile(len(targets), w.shape[0], w.device) if a == "pairs" else _CHUNKED_LOGPROB_CHUNK_SIZE
                    t = time.perf_counter()
                    lp = ChunkedLogProbFunction.apply(hh, w, None, targets, 1.0, chunk, None, 1.0,
                                                      ("log_probs", "entropy", "mean_logits", "is_top1"))[0]
                    (lp if a == "pairs" else lp.view(mask.shape)[mask]).sum().backward()
                    times[a]["head"].append(time.perf_counter() - t)
                    times[a]["pairs"] += len(b)
                    print(f"  {name} round {rnd + 1} {a}: step {times[a]['step'][-1]:.1f}s (backbone {times[a]['backbone'][-1]:.1f}s, "
                          f"head {times[a]['head'][-1]:.1f}s), reference {times[a]['reference'][-1]:.1f}s", flush=True)
        out = {}
        for a in arms:
            n = times[a]["pairs"]
            out[a] = {k: n / sum(times[a][k]) for k in ("step", "backbone", "head", "reference")} | {"tokens": acct[a]}
        results[name] = out
        p, g, rnd_ = out["pairs"], out["trl-grouped"], out["trl-random"]
        for a in arms:
            print(f"pair forward | {name} max_length {args.max_length} h{args.hidden}x{args.layers} NF4+LoRA r16 | {a}: "
                  f"{out[a]['step']:.3f} pairs/s (backbone alone {out[a]['backbone']:.3f}, head alone {out[a]['head']:.3f}), "
                  f"reference {out[a]['reference']:.3f} pairs/s | backbone tokens/pair {acct[a]['backbone_per_pair']:.0f} "
                  f"(two-row {acct[a]['two_row_per_pair']:.0f}, completion {acct[a]['completion_per_pair']:.0f})")
        print(f"pair forward | {name} | training vs trl-grouped {p['step'] / g['step']:.2f}x, vs trl-random {p['step'] / rnd_['step']:.2f}x; "
              f"backbone alone {p['backbone'] / g['backbone']:.2f}x / {p['backbone'] / rnd_['backbone']:.2f}x; "
              f"head alone {p['head'] / g['head']:.2f}x / {p['head'] / rnd_['head']:.2f}x; "
              f"reference pass {p['reference'] / g['reference']:.2f}x / {p['reference'] / rnd_['reference']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
