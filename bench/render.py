"""Render BENCHMARKS.md from the benchmark sidecars in bench/results/ (see bench/sidecar.py).

    .venv/bin/python bench/render.py            # rewrite BENCHMARKS.md
    .venv/bin/python bench/render.py --check    # exit 1 if the page and the sidecars disagree

The page holds the latest result of each benchmark: its headline, what it measures and means, its
command, the machine and load it ran under, and its tables. What a section says about a result
is written here without figures, so that it stays true when the figures change; every figure comes
from a sidecar. History stays in git (`git log -p bench/results/`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"

# (sidecar name, heading, what it measures and how to read it), in page order.
SECTIONS: list[tuple[str, str, str]] = [
    ("quickstart_ab", "The quickstart: pair forward against TRL's forward",
     "The shipped quickstart (`lora-sdpo run recipes/quickstart.toml`, two steps of 64 pairs, 2 epochs) with "
     "`training.prefix_sharing` on (the default: each pair as one packed sequence, shared prompt computed once, "
     "LM head on completion tokens only) and off (TRL's two-row forward), each run its own process under "
     "`/usr/bin/time -v`, alternated. The logged losses of the two paths must agree to rounding: both compute the "
     "same DPO loss."),
    ("end_to_end", "End to end: `lora-sdpo run` against the same two steps written by hand",
     "`bench/hand_trl.py` is the quickstart's two steps as a user would write them with TRL and PEFT (4-bit "
     "`from_pretrained`, DPOTrainer with a LoRA `peft_config` and a precomputed reference, PEFT's "
     "`merge_and_unload`, step 2 from that), on the same rows with the same settings. It does not do what "
     "lora-sdpo adds (data checks, the retention check, the gamma matrix, the report). Each runs in its own "
     "process, alternated; wall time and peak RSS are measured from outside, the parts come from lora-sdpo's "
     "manifest and the script's JSON line. The step anatomy gives each phase's share of lora-sdpo's steps."),
    ("end_to_end-avx2", "End to end on an AVX2-only instruction set",
     "The same comparison with `ONEDNN_MAX_CPU_ISA=AVX2` for both processes, so that oneDNN computes as on a "
     "CPU without AVX-512 or AMX (many cloud EPYC machines). Only oneDNN's kernels are capped; torch's own "
     "vectorised kernels still use what the CPU has, so a true AVX2 machine can be slower still."),
    ("pair_forward-smollm2", "Training update at a real model's shape: SmolLM2-135M-Instruct",
     "One DPO training update (forward and backward of 8 pairs against precomputed reference log-probs) and "
     "the reference pass (no-grad forward, adapter off), on SmolLM2-135M-Instruct (from `lora-sdpo fetch "
     "smollm2`) loaded as lora-sdpo loads a step's base (NF4, float32 compute, LoRA r16 on every projection), "
     "on the shipped Orca and UltraFeedback pairs at the SmolLM2 recipe's max_length. Arms: `pairs` "
     "(lora-sdpo's pair forward) and `trl-random` (TRL's two-row forward on TRL's default random batches); "
     "each (dataset, round, arm) in its own process, alternated. Higher pairs/s is better; peak RSS is the "
     "whole child process."),
    ("logprobs", "Log-probs: TRL's fused LM head against full logits",
     "What training computes per token, `log p(label) = h.W[label] - logsumexp(h.W^T)` and its gradient with "
     "respect to h, in float32, paths interleaved in one process: `fused` is TRL's `ChunkedLogProbFunction` "
     "as `add_fused_lm_head` uses it (a CPU torch fallback over 32768-wide vocabulary tiles), `full` is "
     "`log_softmax` of the whole logits, `fused-4096` is the same TRL function with a 4096-wide tile. The "
     "fused paths must be exact to float32 rounding; their memory and time against full logits are the "
     "figures."),
    ("padding", "Padding: random batches against length-grouped batches",
     "TRL's collator pads the 2B sequences of a batch to the longest. This replays random order and "
     "transformers' `LengthGroupedSampler` over the real token lengths of the shipped data, averaged over "
     "shuffles, without training: the share of padded positions and the tokens processed, grouped over "
     "random. Grouping pays where lengths vary within a batch's reach (max_length 1024), not where most "
     "pairs are cut to the same length."),
    ("plan_check", "Memory planner against measured peaks (CPU)",
     "`lora-sdpo plan`'s estimate of a training step's peak against the peak RSS of a real step in a fresh "
     "process, with gradient checkpointing off and on: the pico model and a random-initialised Llama. An "
     "estimate above the measurement is the safe side."),
    ("merge_memory", "Merge: memory and time on a 1 GB model",
     "`lora-sdpo merge` of a rank-16 LoRA on every projection of a random 1.08 GB float32 Llama (6 shards) "
     "against PEFT's `from_pretrained` + `merge_and_unload` + `save_pretrained`, and `cp` of the shards as "
     "the floor, each in its own process under `/usr/bin/time -v`. lora-sdpo streams: it holds one row "
     "block and its delta at a time and copies unchanged tensors file to file; it fsyncs what it writes, "
     "so `cp` + `sync` is the fair floor."),
]

# Sections rendered only when their sidecar exists; otherwise listed under "Not on this page" with the
# command that brings them back (script defaults are the figures' settings).
LATER: list[tuple[str, str, str]] = [
    ("pair_forward", "Pair forward at hidden 1024 x 8 layers, max_length 1024", "bench/pair_forward.py --rounds 2"),
    ("flex_cpu", "Compiled FlexAttention against the SDPA loop for passes without gradients", "bench/flex_cpu.py"),
    ("quickstart_memory", "The quickstart's memory, phase by phase", "bench/quickstart_memory.py --quickstart"),
    ("memory_7b", "The planner against one step at Mistral-7B's layer shapes", "bench/memory_7b.py"),
    ("merge_divergence", "Which merge base, W or dequant(NF4(W)), against the trained model",
     "bench/merge_bench.py divergence --run RUN_DIR"),
    ("gamma_sample", "The gamma matrix's sample size against its standard error", "bench/gamma_sample.py RUN_DIR"),
]
MEANING_LATER = ("Rendered as the script's own tables; see the script's docstring for what it measures.")

HEADER = """# Benchmarks

Generated by `.venv/bin/python bench/render.py` from the JSON sidecars in `bench/results/`, one per
benchmark, each written by the script that measured it (command, commit, date, machine, load, every
figure). Do not edit this page: rerun the benchmark's command, then the render. Earlier results are
in git (`git log -p bench/results/`).

**Load** is the 1-minute load average sampled while the benchmark ran (start, end, highest). A
benchmark's own threads count: about 2 on a 2-core machine, so a figure above ~2.5 means something
else was running and wall times are inflated. Memory figures and numerical differences do not
depend on the load; ratios of alternated runs depend on it least.
"""

FOOTER = """## GPU: not measured

No GPU has run this code: no tokens/s, MFU or GPU peak memory here. `bench/gpu_accept.sh` is the one
command for the first GPU (the exactness tests on CUDA, the quickstart in float32 and bf16, and
`bench/gpu_step.py`'s step at Mistral-7B's shapes for the pair forward and plain TRL);
`bench/gpu_rehearsal.sh` rehearses it on a CPU.
"""


def load_sidecars(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def machine_line(s: dict) -> str:
    m, ld = s["machine"], s["load"]
    isa = ", ".join(m.get("isa", [])) or "no AVX2"
    libs = ", ".join(f"{k} {m[k]}" for k in ("transformers", "trl", "peft", "bitsandbytes") if k in m)
    threads = f" ({m['threads']} threads)" if "threads" in m else ""
    capped = f"; `ONEDNN_MAX_CPU_ISA={m['onednn_max_cpu_isa']}`" if m.get("onednn_max_cpu_isa") else ""
    dirty = " with uncommitted changes" if s.get("dirty") else ""
    return (f"*Machine:* {m['cpu']}, {m['cores']} cores ({isa}){capped}, {m['ram_gb']} GB RAM; Python {m['python']}, "
            f"torch {m.get('torch', '?')}{threads}, {libs}. *Load* {ld['start']:.2f} -> {ld['end']:.2f} (highest "
            f"{ld['max']:.2f}). *Run* {s['date']}, commit {s['commit']}{dirty}, {s['wall_s']:.0f} s.")


def table(t: dict) -> str:
    out = [f"**{t['title']}**", ""] if t.get("title") else []
    out += ["| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
    out += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    return "\n".join(out)


def anchor(heading: str) -> str:
    keep = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def render(sidecars: dict[str, dict]) -> str:
    sections = SECTIONS + [(name, heading, MEANING_LATER) for name, heading, _ in LATER]
    known = [s for s in sections if s[0] in sidecars]
    unknown = sorted(set(sidecars) - {s[0] for s in sections})
    if unknown:
        raise SystemExit(f"bench/results: no section in bench/render.py for {', '.join(unknown)}: add one to SECTIONS or delete the file")
    parts = [HEADER, "## At a glance", "", "| benchmark | result | load |", "|---|---|---|"]
    for name, heading, _ in known:
        s = sidecars[name]
        parts.append(f"| [{heading}](#{anchor(heading)}) | {s['headline']} | {s['load']['max']:.1f} |")
    parts.append("")
    for name, heading, meaning in known:
        s = sidecars[name]
        parts += [f"## {heading}", "", f"    {s['command']}", "", meaning, "", machine_line(s), ""]
        for t in s["tables"]:
            parts += [table(t), ""]
        parts += [f"- {line}" for line in s["lines"]]
        if s["lines"]:
            parts.append("")
    missing = [(cmd, heading) for name, heading, cmd in LATER if name not in sidecars]
    missing += [(f"bench/results/{name}.json", heading) for name, heading, _ in SECTIONS if name not in sidecars]
    if missing:
        parts += ["## Not on this page", "", "Not rerun since this page became generated, so no figures here (earlier ones are in "
                  "git); the command brings a result back:", ""]
        parts += [f"- {what}: `{cmd}`" for cmd, what in missing]
        parts.append("")
    parts.append(FOOTER)
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md is not what the sidecars render")
    a = ap.parse_args()
    text = render(load_sidecars())
    if a.check:
        if PAGE.read_text() != text:
            sys.exit("BENCHMARKS.md does not match bench/results/: run .venv/bin/python bench/render.py")
        print("BENCHMARKS.md matches bench/results/")
        return
    tmp = PAGE.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(PAGE)
    print(f"BENCHMARKS.md: {len(text.encode())} bytes from {len(load_sidecars())} sidecars")


if __name__ == "__main__":
    main()
