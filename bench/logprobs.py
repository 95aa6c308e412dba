"""Log-probs of the labels: TRL's fused, chunked LM head against full logits, forward and backward.

What training computes per token: log p(label) = h @ W[label] - logsumexp(h @ W.T), then the
gradient with respect to the hidden states h (the LM head itself is frozen under LoRA). Two paths:

- fused: TRL's `ChunkedLogProbFunction` (what `add_fused_lm_head` and so DPOTrainer use), with
  the per-token outputs DPOTrainer asks for in training (log-probs, entropy, mean logit, top-1);
  on the CPU it runs its torch fallback on [4096 tokens, 32768 vocabulary] tiles;
- full: `logits = h @ W.T`, `log_softmax`, `gather`, autograd.

Also the fused path with a narrower vocabulary tile (`--chunk`, default 4096), a lever TRL exposes
only as the `chunk_size` argument of the function. Everything in float32 on the CPU, one process,
repetitions interleaved (fused, full, narrow, fused, ...). Peak memory is the peak RSS above the
inputs (Linux: /proc/self/clear_refs resets the high-water mark before each path); tensors this
large are mmapped by glibc and go back to the OS when freed, so the figure is per path.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/logprobs.py [--tokens 2048] [--shapes 32064x1024,128256x2048] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from trl.kernels import ChunkedLogProbFunction

from sidecar import Sidecar

TRAIN_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")  # DPOTrainer's, for the policy


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def fused(chunk: int):
    def run(h, w, y):
        out = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, chunk, None, 1.0, TRAIN_OUTPUTS)
        return out[0]

    return run


def full(h, w, y):
    logits = h @ w.t()
    return torch.log_softmax(logits, dim=-1).gather(-1, y[:, None]).squeeze(-1)


def one(path, h, w, y) -> dict:
    h.grad = None
    base = rss_mb("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    lp = path(h, w, y)
    t1 = time.perf_counter()
    lp.sum().backward()
    t2 = time.perf_counter()
    peak = rss_mb("VmHWM") - base
    return {"fwd": t1 - t0, "bwd": t2 - t1, "peak_mb": peak, "lp": lp.detach(), "grad": h.grad.detach().clone()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (2 x 1024)")
    p.add_argument("--shapes", default="32064x1024,32064x2048,128256x1024,128256x2048", help="VOCABxHIDDEN,...")
    p.add_argument("--chunk", type=int, default=4096, help="vocabulary tile of the narrow fused variant")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    car = Sidecar("logprobs")
    rows = []
    torch.manual_seed(0)
    for shape in a.shapes.split(","):
        vocab, hidden = map(int, shape.split("x"))
        # Real-scale logits: hidden states of unit RMS, an LM head with 1/sqrt(hidden) rows
        h = torch.randn(a.tokens, hidden, requires_grad=True)
        w = torch.randn(vocab, hidden) / hidden**0.5
        y = torch.randint(0, vocab, (a.tokens,))
        paths = {"fused": fused(32768), "full": full, f"fused-{a.chunk}": fused(a.chunk)}
        res: dict[str, list[dict]] = {k: [] for k in paths}
        for _ in range(a.repeats):
            for name, path in paths.items():
                res[name].append(one(path, h, w, y))
        ref = res["full"][0]
        full_peak = max(r["peak_mb"] for r in res["full"])
        full_time = min(r["fwd"] + r["bwd"] for r in res["full"])
        logits_mb = a.tokens * vocab * 4 / 2**20
        for name, rs in res.items():
            peak = max(r["peak_mb"] for r in rs)
            best = min(rs, key=lambda r: r["fwd"] + r["bwd"])  # the fastest repetition
            fwd, bwd = best["fwd"], best["bwd"]
            d_lp = (rs[0]["lp"] - ref["lp"]).abs().max().item()
            d_g = (rs[0]["grad"] - ref["grad"]).abs().max().item()
            print(
                f"log-probs | vocab {vocab}, hidden {hidden}, {a.tokens} tokens, fp32 CPU | {name:11s} | "
                f"peak {peak:7.0f} MB ({peak / full_peak:.2f}x full; fp32 logits are {logits_mb:.0f} MB) | "
                f"fwd {fwd:6.2f}s bwd {bwd:6.2f}s ({(fwd + bwd) / full_time:.2f}x full) | "
                f"max |d logp| {d_lp:.1e}, max |d grad| {d_g:.1e}"
            )
            car.figures[f"{vocab}x{hidden}/{name}"] = {"peak_mb": peak, "fwd_s": fwd, "bwd_s": bwd, "time_vs_full": (fwd + bwd) / full_time,
                                                      "peak_vs_full": peak / full_peak, "max_d_logp": d_lp, "max_d_grad": d_g}
            rows.append([f"{vocab} x {hidden}" if name == "fused" else "", name, f"{peak:,.0f} MB", f"{peak / full_peak:.2f}x",
                         f"{fwd:.2f} + {bwd:.2f} s", f"{(fwd + bwd) / full_time:.2f}x", f"{d_lp:.1e}", f"{d_g:.1e}"])
    car.table(f"{a.tokens} tokens, float32, best of {a.repeats} for time", ["vocab x hidden", "path", "peak memory", "vs full",
              "fwd + bwd", "vs full", "max abs diff log p", "max abs diff grad"], rows)
    f = car.figures
    big = max((k.split("/")[0] for k in f), key=lambda k: int(k.split("x")[0]))
    car.headline = (f"exact to {max(v['max_d_logp'] for v in f.values()):.1e} (log p); memory at vocab {big.split('x')[0]}: fused "
                    f"{f[big + '/fused']['peak_vs_full']:.2f}x full logits, 4096-wide tile {f[big + '/fused-' + str(a.chunk)]['peak_vs_full']:.2f}x; "
                    f"time {min(v['time_vs_full'] for k, v in f.items() if 'fused' in k):.1f}-"
                    f"{max(v['time_vs_full'] for k, v in f.items() if 'fused' in k):.1f}x full on the CPU")
    car.save()


if __name__ == "__main__":
    main()
