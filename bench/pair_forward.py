"""Training throughput of the pair forward against TRL's two-row forward, side by side, one process per arm.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/pair_forward.py [--hidden 1024 --layers 8 --rounds 2 --batches 1] [--cap-gb G]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/pair_forward.py --base ~/.cache/lora-sdpo/models/SmolLM2-135M-Instruct \
        --max-length 320 --arms pairs,trl-random      # a real model instead of the random one

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
forward and backward on its batches. Besides the whole step it times the backbone alone (forward +
backward of the decoder layers, the head's input gradient replaced by a constant) and the LM head
alone (forward + backward of the scored positions' log-probs from fixed hidden states), and the
reference pass (a no-grad forward with the adapter off).

Each (dataset, round, arm) runs in its own child process, the arms alternating (A, B, C, A, B,
C, ...), all with the same batch size. A child whose RSS passes the cap (default: the memory
available at the start less 2 GB; `--cap-gb`) is killed by the parent before the kernel's OOM
killer could take another process, and its arm is reported as out of memory with the RSS it
reached; later rounds skip that arm. Prints pairs/s and the ratios, each arm's peak RSS (the whole
child: interpreter, model and the step; and the part above the RSS before its first batch), and
the token accounting (backbone tokens per pair) of the batches it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar import Sidecar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
PICO = ROOT / "models" / "pico-llama-phi3"
DATA = {"orca": ROOT / "data" / "orca_dpo_pairs" / "validation.jsonl", "ultrafeedback": ROOT / "data" / "ultrafeedback" / "train_clean.jsonl"}
ARMS = ["pairs", "trl-grouped", "trl-random"]
MB = 2**20


def build_model(folder: Path, hidden: int, layers: int) -> None:
    import torch
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
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(seed)
    if arm == "trl-grouped":
        widths = [min(max_length, len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"]))) for r in rows]
        order = get_length_grouped_indices(widths, batch, generator=g)
    else:
        order = torch.randperm(len(rows), generator=g).tolist()
    return [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]


def child(args) -> dict:
    """One arm, one dataset, one round: its timings, token accounting (round 1) and RSS figures."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import add_fused_lm_head

    from lora_sdpo.trl_compat import DataCollatorForPreference, trl_vocab_tile

    from lora_sdpo import pairs
    from lora_sdpo.model import keep_nf4_layers_differentiable, load_base, load_tokenizer
    from lora_sdpo.recipe import AdapterConfig
    from memwatch import reset_peak, status

    a, name, rnd = args.arm, args.data, args.round
    tok = load_tokenizer(args.model)
    model = load_base(args.model, AdapterConfig(quantization="nf4", compute_dtype="float32"))
    keep_nf4_layers_differentiable(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    pairs.install(model)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.train()
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=args.max_length)
    rows = tokenised(name, tok, args.max_length, 100000)
    epoch = batches(rows, a, args.batch, args.max_length, seed=1)
    plan = epoch[rnd * args.batches : (rnd + 1) * args.batches]
    out = {"arm": a, "data": name, "round": rnd}
    if rnd == 0:  # the token accounting of all the arm's batches of one epoch (not only the timed ones)
        two_row = backbone = completion = 0
        for b in epoch:
            x = collate([{k: rows[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in b])
            segs = pairs.pair_segments(x["input_ids"], x["attention_mask"])
            two_row += x["input_ids"].numel()
            backbone += sum(p + q + r for p, q, r in segs) if a == "pairs" else x["input_ids"].numel()
            completion += int(x["completion_mask"].sum())
        n = len(epoch) * args.batch
        out["tokens"] = {"backbone_per_pair": backbone / n, "two_row_per_pair": two_row / n, "completion_per_pair": completion / n}
    times = {"step": [], "backbone": [], "head": [], "reference": [], "pairs": 0}
    model._lora_sdpo_pairs.enabled = a == "pairs"
    model.config._attn_implementation = pairs.ATTENTION if a == "pairs" else "sdpa"
    out["rss_before"] = status("VmRSS")
    reset_peak()
    for b in plan:
        x = collate([{k2: rows[i][k2] for k2 in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in b])
        labels = x["input_ids"].masked_fill(x["completion_mask"] == 0, -100)
        kw = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"], labels=labels, fused_lm_head=True)
        # reference pass
        t = time.perf_counter()
        with torch.no_grad(), peft.disable_adapter():
            ref = peft(**kw).log_probs.sum(1)
        times["reference"].append(time.perf_counter() - t)
        ref_c, ref_r = ref.chunk(2)
        # whole training step: DPO loss forward + backward
        peft.zero_grad(set_to_none=True)
        t = time.perf_counter()
        c, r = peft(**kw).log_probs.sum(1).chunk(2)
        loss = -F.logsigmoid(0.1 * ((c - ref_c) - (r - ref_r))).mean()
        loss.backward()
        times["step"].append(time.perf_counter() - t)
        del c, r, loss
        times["pairs"] += len(b)
        if args.no_parts:
            print(f"  {name} round {rnd + 1} {a}: step {times['step'][-1]:.1f}s, reference {times['reference'][-1]:.1f}s", file=sys.stderr, flush=True)
            continue
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
        times["backbone"].append(time.perf_counter() - t)
        hh = h.detach().requires_grad_(True)
        del h
        w = model.lm_head.weight
        targets = labels[:, 1:][mask] if a == "pairs" else labels[:, 1:].clamp(min=0).reshape(-1)
        chunk = pairs.vocab_tile(len(targets), w.shape[0], w.device) if a == "pairs" else trl_vocab_tile()
        t = time.perf_counter()
        lp = ChunkedLogProbFunction.apply(hh, w, None, targets, 1.0, chunk, None, 1.0,
                                          ("log_probs", "entropy", "mean_logits", "is_top1"))[0]
        (lp if a == "pairs" else lp.view(mask.shape)[mask]).sum().backward()
        times["head"].append(time.perf_counter() - t)
        del lp, hh
        print(f"  {name} round {rnd + 1} {a}: step {times['step'][-1]:.1f}s (backbone {times['backbone'][-1]:.1f}s, "
              f"head {times['head'][-1]:.1f}s), reference {times['reference'][-1]:.1f}s", file=sys.stderr, flush=True)
    out["times"] = times
    out["rss_peak"] = status("VmHWM")
    return out


def main() -> None:
    from memwatch import GB, default_cap, run_capped

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of A, B, C")
    ap.add_argument("--batches", type=int, default=1, help="batches per arm per round and dataset")
    ap.add_argument("--data", default="orca,ultrafeedback")
    ap.add_argument("--base", type=Path, help="a model folder to load instead of building a random one (e.g. the fetched SmolLM2)")
    ap.add_argument("--no-parts", action="store_true", help="time the whole update and the reference pass only (not the backbone and the head apart)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    ap.add_argument("--cap-gb", type=float, help="kill an arm whose RSS passes this (default: available memory at the start less 2 GB)")
    ap.add_argument("--json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build_model(Path(args.build), args.hidden, args.layers)
        return
    if args.child:
        Path(args.out).write_text(json.dumps(child(args)))
        return

    arms = args.arms.split(",")
    car = Sidecar("pair_forward" + (f"-{args.base.expanduser().name.split('-')[0].lower()}" if args.base else ""))
    cap = int(args.cap_gb * GB) if args.cap_gb else default_cap()
    print(f"pair forward | each arm in its own process, killed past {cap / GB:.1f} GB RSS", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    work = Path(tempfile.mkdtemp(prefix="pair-bench-"))
    if args.base:
        model = args.base.expanduser()
        cfg = json.loads((model / "config.json").read_text())
        shape = f"{model.name} (h{cfg['hidden_size']} x {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']:,})"
    else:
        model = work / "model"
        subprocess.run([sys.executable, __file__, "--build", str(model), "--hidden", str(args.hidden), "--layers", str(args.layers)],
                       check=True, env=env, cwd=ROOT)
        shape = f"random Llama h{args.hidden} x {args.layers} layers"
    common = ["--model", str(model), "--max-length", str(args.max_length), "--batch", str(args.batch), "--batches", str(args.batches)]
    common += ["--no-parts"] if args.no_parts else []
    results, heads = {}, []
    for name in args.data.split(","):
        res = {a: {"step": [], "backbone": [], "head": [], "reference": [], "pairs": 0, "rss_peak": 0, "rss_above": 0, "oom": None} for a in arms}
        for rnd in range(args.rounds):
            for a in arms:
                if res[a]["oom"]:
                    continue
                out = work / f"{name}-{a}-{rnd}.json"
                r = run_capped([sys.executable, __file__, "--child", "--arm", a, "--data", name, "--round", str(rnd), "--out", str(out), *common],
                               cap, env=env, cwd=ROOT)
                sys.stderr.write(r.stderr[-4000:] if r.returncode else "".join(line + "\n" for line in r.stderr.splitlines() if line.startswith(f"  {name} round")))
                if r.out_of_memory:
                    res[a]["oom"] = r.max_rss
                    print(f"  {name} round {rnd + 1} {a}: OUT OF MEMORY: killed at {r.max_rss / GB:.1f} GB RSS (cap {cap / GB:.1f} GB)", flush=True)
                    continue
                if r.returncode != 0:
                    sys.exit(f"{name} round {rnd + 1} {a}: the child failed (exit {r.returncode}); its output is above")
                c = json.loads(out.read_text())
                for k in ("step", "backbone", "head", "reference"):
                    res[a][k] += c["times"][k]
                res[a]["pairs"] += c["times"]["pairs"]
                res[a]["rss_peak"] = max(res[a]["rss_peak"], c["rss_peak"], r.max_rss)
                res[a]["rss_above"] = max(res[a]["rss_above"], c["rss_peak"] - c["rss_before"])
                res[a].setdefault("tokens", c.get("tokens"))
        out = {}
        for a in arms:
            x = res[a]
            out[a] = {"oom_at_bytes": x["oom"], "peak_rss_bytes": x["rss_peak"], "peak_above_start_bytes": x["rss_above"], "tokens": x.get("tokens")}
            if x["pairs"]:
                out[a] |= {k: x["pairs"] / sum(x[k]) for k in ("step", "backbone", "head", "reference") if x[k]}
        results[name] = out
        print(f"\n{name}, max_length {args.max_length}, {shape}, NF4 + LoRA r16, batch {args.batch}, "
              f"{args.rounds} round(s) x {args.batches} batch(es) per arm; pairs/s (higher is better)\n")
        print("| arm | step | backbone alone | head alone | reference | peak RSS (above start) | backbone tokens/pair (two-row, completion) |")
        print("|---|---|---|---|---|---|---|")
        for a in arms:
            o = out[a]
            tk = o["tokens"]
            toks = f"{tk['backbone_per_pair']:.0f} ({tk['two_row_per_pair']:.0f}, {tk['completion_per_pair']:.0f})" if tk else "-"
            if o["oom_at_bytes"] and "step" not in o:
                print(f"| {a} | out of memory at {o['oom_at_bytes'] / MB:,.0f} MB RSS (cap {cap / MB:,.0f} MB) | | | | | {toks} |")
                continue
            mem = f"{o['peak_rss_bytes'] / MB:,.0f} MB ({o['peak_above_start_bytes'] / MB:,.0f} MB)"
            if o["oom_at_bytes"]:
                mem += f"; out of memory in a later round at {o['oom_at_bytes'] / MB:,.0f} MB"
            part = lambda k: f"{o[k]:.3f}" if k in o else "-"  # noqa: E731
            print(f"| {a} | {o['step']:.3f} | {part('backbone')} | {part('head')} | {o['reference']:.3f} | {mem} | {toks} |")
        p = out.get("pairs", {})
        for other in [a for a in arms if a != "pairs"]:
            g = out[other]
            if "step" in p and "step" in g:
                x = {k: p[k] / g[k] for k in ("step", "backbone", "head", "reference", "peak_rss_bytes") if k in p and k in g}
                alone = f"backbone alone {x['backbone']:.2f}x, head alone {x['head']:.2f}x, " if "backbone" in x else ""
                print(f"pair forward | {name} | vs {other}: training {x['step']:.2f}x, {alone}reference pass {x['reference']:.2f}x", flush=True)
                car.line(f"{name}, pair forward against {other}: training update **{x['step']:.2f}x** as fast, reference pass "
                         f"{x['reference']:.2f}x, peak RSS {x['peak_rss_bytes']:.2f}x.")
                heads.append((name if len(arms) == 2 else f"{name} vs {other}", x["step"], x["reference"], x["peak_rss_bytes"]))
            elif g["oom_at_bytes"]:
                print(f"pair forward | {name} | vs {other}: {other} ran out of memory (killed at {g['oom_at_bytes'] / MB:,.0f} MB)", flush=True)
    pair_sidecar(car, results, args, shape, arms, heads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def pair_sidecar(car: Sidecar, results: dict, args, shape: str, arms: list[str], heads: list[tuple]) -> None:
    """The sidecar's table and headline; `heads` holds (data, update, reference, peak RSS) ratios, pair forward / TRL."""
    car.figures = results
    rows = []
    for name, out in results.items():
        for a in arms:
            o = out[a]
            if "step" not in o:
                rows.append([name, a, "out of memory", "", "", f"{(o['oom_at_bytes'] or 0) / MB:,.0f} MB (killed)", ""])
                continue
            tk = o["tokens"]
            rows.append([name, a, f"{args.batch / o['step']:.1f} s", f"{args.batch / o['reference']:.1f} s",
                         f"{o['step']:.3f} / {o['reference']:.3f}", f"{o['peak_rss_bytes'] / MB:,.0f} MB",
                         f"{tk['backbone_per_pair']:.0f} ({tk['two_row_per_pair']:.0f}, {tk['completion_per_pair']:.0f})" if tk else "-"])
    car.table(f"{shape}, NF4 + LoRA r16, max_length {args.max_length}, batch {args.batch}; {args.rounds} round(s) x "
              f"{args.batches} batch(es) per arm and dataset, mean", ["data", "arm", "training update", "reference pass",
              "pairs/s (update / reference)", "peak RSS", "backbone tokens per pair (two-row, completion)"], rows)
    if heads:
        car.headline = ("pair forward against TRL's two-row forward: training update " + ", ".join(f"{h[1]:.2f}x" for h in heads)
                        + " as fast, reference " + ", ".join(f"{h[2]:.2f}x" for h in heads) + ", peak RSS "
                        + ", ".join(f"{h[3]:.2f}x" for h in heads) + " (" + ", ".join(h[0] for h in heads) + ")")
    car.save()


if __name__ == "__main__":
    main()
