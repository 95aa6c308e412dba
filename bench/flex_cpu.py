"""CPU no-grad passes (reference, gamma, retention): compiled FlexAttention against the SDPA loop.

The question it answers: should the CPU's no-grad passes use FlexAttention (`LORA_SDPO_FLEX=on`)
instead of the default per-pair SDPA loop? Compiled flex has a one-off compile per process, so the
comparison includes it. Each arm runs in its own process (a fresh compile, its own peak RSS):

    loop   the SDPA loop (the CPU default), --batches packed batches without gradients
    flex   the same batches through one compiled flex_attention call per pack and layer
           (torch.compile(dynamic=True): one compile for every pack length)

The model is a random Llama-shaped backbone (float32, `--hidden`, `--layers`; the LM head is not
timed); the pairs are synthetic, lengths drawn like the shipped Orca pairs at --max-length (prompt a
quarter to a half of it, answers the rest, cut at max_length), --pairs per batch, fresh lengths for
each batch so that dynamic shapes are exercised. It prints seconds per batch (first batch with the
compile, then steady), the compile time, peak RSS and the number of batches after which flex has
paid for its compile. Inductor's on-disk cache is disabled for the flex arm (a cold compile, what a
fresh machine pays) unless --warm-cache.

Timings need a machine with nothing else running (the CPU is shared otherwise). At the default
shape (hidden 1024 x 8 layers, max_length 1024, 8 pairs a batch, 5 batches) it takes about 3 minutes
on an idle 2-core machine; measured there twice: the loop 10.8 / 11.1 s a batch once warm, flex
15.3 / 15.7 s after an 18.3 / 22.4 s compile, peak RSS 1.70-1.74 against 2.26 GB (docs/pair-forward.md). Smoke it with

    python bench/flex_cpu.py --hidden 64 --layers 2 --max-length 128 --pairs 4 --batches 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from sidecar import Sidecar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def batches(n_batches: int, pairs: int, max_length: int, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n_batches):
        segs = []
        for _ in range(pairs):
            p = rng.randint(max_length // 4, max_length // 2)
            a, b = (min(rng.randint(max_length // 8, max_length), max_length - p) for _ in range(2))
            segs.append((p, max(a, 1), max(b, 1)))
        out.append(segs)
    return out


def arm(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_sdpo import pairs

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=32064, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    pairs.install(model)
    pairs.FLEX = "on" if args.arm == "flex" else "off"
    times = []
    with torch.no_grad():
        for segs in batches(args.batches, args.pairs, args.max_length):
            # a two-row batch's ids are not needed: a pack is built straight from the layout
            packs, _ = pairs.pack(torch.randint(0, 32000, (2 * len(segs), max(p + max(a, b) for p, a, b in segs))), segs)
            t = time.perf_counter()
            pairs.backbone_hidden(model, packs)
            times.append(time.perf_counter() - t)
    return {"arm": args.arm, "seconds": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_batch": [sum(p + a + b for p, a, b in s) for s in batches(args.batches, args.pairs, args.max_length)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (a second run's compile)")
    p.add_argument("--json")
    p.add_argument("--arm", choices=["loop", "flex"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:
        print(json.dumps(arm(a)))
        return
    car = Sidecar("flex_cpu")
    results = {}
    for name in ("loop", "flex"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if name == "flex" and not a.warm_cache:
            env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        cmd = [sys.executable, __file__, "--arm", name] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                           if k in ("hidden", "layers", "max_length", "pairs", "batches")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{name} arm failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    loop, flex = results["loop"]["seconds"], results["flex"]["seconds"]
    steady = lambda s: sum(s[1:]) / max(1, len(s) - 1)  # noqa: E731
    compile_s = flex[0] - steady(flex)
    gain = steady(loop) - steady(flex)
    print(f"shape: hidden {a.hidden} x {a.layers} layers, max_length {a.max_length}, {a.pairs} pairs a batch, {a.batches} batches "
          f"({sum(results['loop']['tokens_per_batch']) // a.batches} tokens a batch on average), float32, no gradients")
    print(f"{'arm':<6} {'first batch s':>14} {'steady s/batch':>15} {'total s':>9} {'peak RSS MB':>12}")
    for name, s in (("loop", loop), ("flex", flex)):
        print(f"{name:<6} {s[0]:>14.2f} {steady(s):>15.3f} {sum(s):>9.2f} {results[name]['peak_rss_mb']:>12.0f}")
    print(f"flex compile (first batch minus steady): {compile_s:.1f} s{' (warm cache)' if a.warm_cache else ' (cold cache)'}; "
          + (f"flex pays for it after {compile_s / gain:.0f} batches" if gain > 0 else "flex is not faster per batch: it never pays"))
    car.figures = {"args": vars(a), **results, "compile_s": compile_s}
    car.table(f"hidden {a.hidden} x {a.layers} layers, max_length {a.max_length}, {a.pairs} pairs a batch, {a.batches} batches, float32, no gradients",
              ["arm", "first batch", "steady, per batch", "peak RSS"],
              [[n, f"{s[0]:.2f} s", f"{steady(s):.3f} s", f"{results[n]['peak_rss_mb']:,.0f} MB"] for n, s in (("loop", loop), ("flex", flex))])
    car.headline = (f"compiled FlexAttention {steady(flex) / steady(loop):.2f}x the SDPA loop's time per batch once warm, plus a "
                    f"{compile_s:.0f} s compile; peak RSS {results['flex']['peak_rss_mb'] / results['loop']['peak_rss_mb']:.2f}x")
    car.save()
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), **results, "compile_s": compile_s}, indent=1))


if __name__ == "__main__":
    main()
